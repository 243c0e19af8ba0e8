// LiveBits: a bitmap's words in a MAP_SHARED mapping of a file on /run, so
// that what a page *is* survives the server process (kill -9, a crash) but
// not the machine (/run is a tmpfs).
//
// Why: a write the server acknowledged is in the kernel's page cache; so is a
// page it fetched. Its bits (present, local, dirty, write-back) are set in
// memory at once and reach the bitmap file only with the next persist cycle.
// A server killed in between used to take those bits with it: after
// `recover` (or `add` again) the device read the backing's old bytes where an
// acknowledged write was. With the words mapped from a file on /run, the next
// server of the same boot finds them.
//
// File: DIR/<FNV-1a 64 of the bitmap's real path, hex>.<role>, 0600, in a 0700
// directory (default /run/ublk-http/live):
//
//   offset size  field
//        0    8  magic "UBLKLIVE"
//        8    4  version (1)
//       12    4  bitmap kind
//       16    8  page count
//       24    8  set generation  \ of the bitmap file these words belong to
//       32   16  set identity    /  (see Bitmap, CacheStore)
//       48   40  boot id (/proc/sys/kernel/random/boot_id), zero-padded
//       88    4  state: 1 = the words below are the bitmap's truth
//     4096    …  the words, native byte order, as PageBits holds them
//
// Contract:
// - The words are adopted (Bitmap.attachLive) only when every header field
//   matches: same boot, same bitmap file (path), same set and generation
//   (an older or other copy of the bitmap file is not vouched for), same
//   geometry. Otherwise the file is rewritten from the disk's words, with
//   state 0 until they are all in place.
// - A word in the mapping is set by the same store that sets it in memory:
//   nothing else to do at a crash. The bitmap file still lags behind and is
//   brought up to date by the normal persist cycle (data sync first), which
//   the adopting server starts because the differing words are marked dirty.
// - A bitmap closed with everything persisted removes its live file.
// - The file's blocks are reserved (fallocate) before it is mapped: a store
//   to a page of a MAP_SHARED mapping that the file system cannot back
//   (a full tmpfs) kills the process with SIGBUS, long after `add` said yes.
//   No room is an error at open instead, naming the directory and the bytes
//   (and a file made for it is removed again).
import Glibc

public struct LiveConfig: Sendable, Equatable {
    public static let defaultDirectory = "/run/ublk-http/live"

    public var directory: String
    public var bootID: String
    /// Without a usable directory: an error (true) or bits in private memory (false).
    public var required: Bool

    public init(directory: String, bootID: String, required: Bool) {
        self.directory = directory
        self.bootID = bootID
        self.required = required
    }

    /// The machine's boot id, or nil when it cannot be read.
    public static func currentBootID() -> String? {
        let fd = Glibc.open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 64)
        guard let n = buf.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, 64, 0) }).value, n > 0 else { return nil }
        let s = String(decoding: buf[0..<n], as: UTF8.self).trimmingNewline
        return s.isEmpty ? nil : s
    }

    /// The default directory and this boot's id (nil if the boot id is unreadable and not required).
    public static func system(required: Bool, directory: String = defaultDirectory) -> LiveConfig? {
        guard let boot = currentBootID() else {
            return required ? LiveConfig(directory: directory, bootID: "unknown-boot", required: true) : nil
        }
        return LiveConfig(directory: directory, bootID: boot, required: required)
    }
}

extension String {
    var trimmingNewline: String {
        var s = Substring(self)
        while let c = s.last, c == "\n" || c == " " || c == "\r" { s.removeLast() }
        return String(s)
    }
}

/// One live file, mapped.
public final class LiveFile {
    public static let magic: [UInt8] = Array("UBLKLIVE".utf8)
    static let headerSize = 4096

    public let path: String
    let fd: Int32
    let base: UnsafeMutableRawPointer
    let length: Int
    private var mapped = true

    var words: UnsafeMutablePointer<UInt64> {
        (base + LiveFile.headerSize).assumingMemoryBound(to: UInt64.self)
    }

    /// The live file's path for a bitmap file (which must exist).
    public static func path(config: LiveConfig, bitmapPath: String, role: String) -> String {
        var real = [CChar](repeating: 0, count: Int(PATH_MAX))
        let key = realpath(bitmapPath, &real) != nil ? String(cString: real) : bitmapPath
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        let hex = String(h, radix: 16)
        return config.directory + "/" + String(repeating: "0", count: 16 - hex.count) + hex + "." + role
    }

    /// Reserves the blocks of the file's first `length` bytes: 0, or the
    /// errno (ENOSPC: no room). posix_fallocate: fallocate(2), or where the
    /// file system has none, glibc writes a zero byte into each block that
    /// reads as zero (so words already there are kept).
    static func reserveBlocks(_ fd: Int32, _ length: Int) -> Int32 {
        while true {
            let e = posix_fallocate(fd, 0, off_t(length))
            if e == EINTR { continue }
            return e
        }
    }

    /// Opens (creating, 0600), reserves and maps the live file of
    /// `bitmapPath`. nil when the directory is unusable and `config.required`
    /// is false. `reserve` is `reserveBlocks` (a test passes a failing one).
    static func open(config: LiveConfig, bitmapPath: String, role: String, pageCount: UInt64,
                     reserve: (Int32, Int) -> Int32 = LiveFile.reserveBlocks) throws(FileError) -> LiveFile? {
        let path = LiveFile.path(config: config, bitmapPath: bitmapPath, role: role)
        if !makeDirectory(config.directory) {
            let e = errno
            if config.required { throw FileError("mkdir", path: config.directory, errno: e) }
            return nil
        }
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        if fd < 0 {
            let e = errno
            var st = stat()
            // A live file that exists but cannot be read may hold newer bits: never ignore it.
            if config.required || lstat(path, &st) == 0 { throw FileError("open", path: path, errno: e) }
            return nil
        }
        let length = headerSize + Int((pageCount + 63) / 64) * 8
        var st = stat()
        if fstat(fd, &st) != 0 { let e = errno; close(fd); throw FileError("fstat", path: path, errno: e) }
        if (st.st_mode & S_IFMT) != S_IFREG { close(fd); throw FileError("open", path: path, errno: EINVAL) }
        let remade = Int(st.st_size) != length
        if remade {
            // New, or another geometry: its header cannot match; start it over.
            if case .failure(let e) = retryingEINTR({ ftruncate(fd, 0) }) { close(fd); throw FileError("ftruncate", path: path, errno: e) }
            if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(length)) }) { close(fd); throw FileError("ftruncate", path: path, errno: e) }
        }
        let e = reserve(fd, length)
        if e != 0 {
            close(fd)
            // A file made here holds nothing yet: removed. One that was there
            // may hold the bits of a server that died: kept, and an error.
            if remade { unlink(path) }
            if remade && !config.required { return nil }
            throw FileError("cannot reserve \(length) bytes for the live page states of \(bitmapPath) in",
                            path: config.directory, errno: e)
        }
        _ = fchmod(fd, 0o600)
        guard let m = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), m != MAP_FAILED else {
            let e = errno
            close(fd)
            throw FileError("mmap", path: path, errno: e)
        }
        return LiveFile(path: path, fd: fd, base: m, length: length)
    }

    private init(path: String, fd: Int32, base: UnsafeMutableRawPointer, length: Int) {
        self.path = path
        self.fd = fd
        self.base = base
        self.length = length
    }

    deinit { unmap() }

    func unmap() {
        guard mapped else { return }
        mapped = false
        munmap(base, length)
        close(fd)
    }

    /// Unlinks the file (its words said nothing the bitmap file does not).
    func remove() { unlink(path) }

    // MARK: Header

    private func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
        withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { base.storeBytes(of: b, toByteOffset: at + i, as: UInt8.self) } }
    }

    private func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
        var v: T = 0
        withUnsafeMutableBytes(of: &v) { for i in 0..<$0.count { $0[i] = base.load(fromByteOffset: at + i, as: UInt8.self) } }
        return T(littleEndian: v)
    }

    private func bytes(_ range: Range<Int>) -> [UInt8] {
        range.map { base.load(fromByteOffset: $0, as: UInt8.self) }
    }

    private static func bootBytes(_ bootID: String) -> [UInt8] {
        var b = Array(bootID.utf8.prefix(40))
        b += [UInt8](repeating: 0, count: 40 - b.count)
        return b
    }

    func matches(bootID: String, kind: BitmapKind, binding: SetBinding, pageCount: UInt64) -> Bool {
        bytes(0..<8) == LiveFile.magic && get(8, UInt32.self) == 1 && get(12, UInt32.self) == kind.rawValue
            && get(16, UInt64.self) == pageCount && get(24, UInt64.self) == binding.generation
            && bytes(32..<48) == binding.setID && bytes(48..<88) == LiveFile.bootBytes(bootID)
            && get(88, UInt32.self) == 1
    }

    func invalidate() { put(UInt32(0), 88) }

    /// Records whose words these are; the words must be in place.
    func validate(bootID: String, kind: BitmapKind, binding: SetBinding, pageCount: UInt64) {
        invalidate()
        for (i, b) in LiveFile.magic.enumerated() { base.storeBytes(of: b, toByteOffset: i, as: UInt8.self) }
        put(UInt32(1), 8)
        put(kind.rawValue, 12)
        put(pageCount, 16)
        setBinding(binding)
        for (i, b) in LiveFile.bootBytes(bootID).enumerated() { base.storeBytes(of: b, toByteOffset: 48 + i, as: UInt8.self) }
        put(UInt32(1), 88)
    }

    func setBinding(_ b: SetBinding) {
        put(b.generation, 24)
        for (i, v) in b.setID.enumerated() { base.storeBytes(of: v, toByteOffset: 32 + i, as: UInt8.self) }
    }

    /// The words of the live file of `bitmapPath`, if it is valid for
    /// (boot, kind, binding, pages): for read-only commands (`status`).
    static func peek(config: LiveConfig, bitmapPath: String, role: String, kind: BitmapKind, binding: SetBinding,
                     pageCount: UInt64) -> PageBits? {
        let path = LiveFile.path(config: config, bitmapPath: bitmapPath, role: role)
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        if fd < 0 { return nil }
        defer { close(fd) }
        let length = headerSize + Int((pageCount + 63) / 64) * 8
        var buf = [UInt8](repeating: 0, count: length)
        guard buf.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, length, 0) }).value == length else { return nil }
        return buf.withUnsafeMutableBytes { raw -> PageBits? in
            let probe = LiveFile(path: path, fd: -1, base: raw.baseAddress!, length: 0)
            probe.mapped = false
            guard probe.matches(bootID: config.bootID, kind: kind, binding: binding, pageCount: pageCount) else { return nil }
            let bits = PageBits(pageCount: pageCount)
            let words = probe.words
            bits.load { b in
                let w = b.bindMemory(to: UInt64.self)
                for i in 0..<w.count { w[i] = words[i] }
            }
            return bits
        }
    }

    /// mkdir -p, 0700 for what it creates. True when the directory exists.
    static func makeDirectory(_ dir: String) -> Bool {
        var st = stat()
        if stat(dir, &st) == 0 { return (st.st_mode & S_IFMT) == S_IFDIR }
        if let slash = dir.lastIndex(of: "/"), slash != dir.startIndex {
            guard makeDirectory(String(dir[..<slash])) else { return false }
        }
        return mkdir(dir, 0o700) == 0 || errno == EEXIST
    }
}
