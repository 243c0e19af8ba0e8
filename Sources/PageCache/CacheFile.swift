// CacheFile: the sparse local copy of the image, page for page at the image's
// own offsets.
//
// Contract:
// - Created 0600; `size` is the image's size, and the image's bytes are at
//   their own offsets, so unfetched pages are holes that cost nothing and
//   read as zeros. An unbound file (`init(path:size:)`) is exactly `size`
//   bytes long (ftruncate).
// - A bound file (CacheStore: `create(path:size:pageSize:binding:)`) carries
//   a trailer block past the image, at `trailerOffset(size:)` (the image end
//   rounded up to 4096): magic "UBLKCTRL", version, page size, image size,
//   set generation and identity, checksum. It names the set of bitmaps the
//   file belongs to; a file without it, shorter than it, or with another set
//   is not this cache's (see CacheStore). `size` stays the image size.
// - The targets read and write the image's pages through a second fd opened
//   with O_DIRECT where the file system takes it (UblkTarget's DirectIO);
//   this buffered `fd` then only writes and reads the trailer and fdatasyncs
//   (the same inode: one fdatasync covers both). Mixing the two on one file
//   is safe because they never share a page: the trailer starts at the image
//   end rounded up to 4096, past every direct write (alignments are at most
//   4096 and the padded last block ends there at the latest), so no page
//   cache copy of an image page can go stale behind a direct write.
// - The file says nothing about which pages are valid: only the bitmap does.
//   A page's bytes are trusted only after its bit is set (see Bitmap).
// - `sync()` (fdatasync) is what makes written pages durable; callers run it
//   before persisting bits that describe those pages.
// - Errors are `FileError` values naming the call and the path.
import Glibc

public final class CacheFile {
    public let path: String
    public let size: UInt64
    public let fd: Int32
    /// The set this file is bound to (its trailer), if bound.
    public private(set) var binding: SetBinding?
    public private(set) var pageSize: Int = 0

    /// Opens or creates `path` (0600) and sets its length to `size`.
    public init(path: String, size: UInt64) throws(FileError) {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw FileError("open", path: path, errno: errno) }
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = errno
            close(fd)
            throw FileError("fstat", path: path, errno: e)
        }
        if UInt64(st.st_size) != size {
            if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(size)) }) {
                close(fd)
                throw FileError("ftruncate", path: path, errno: e)
            }
        }
        self.path = path
        self.size = size
        self.fd = fd
    }

    private init(path: String, size: UInt64, fd: Int32) {
        self.path = path
        self.size = size
        self.fd = fd
    }

    deinit { close(fd) }

    /// Reads up to `count` bytes at `offset`; fewer only past the end.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws(FileError) -> Int {
        switch preadFully(fd, buffer, count, offset) {
        case .success(let n): return n
        case .failure(let e): throw FileError("pread", path: path, errno: e)
        }
    }

    /// Writes all `count` bytes at `offset`.
    public func write(_ buffer: UnsafeRawPointer, count: Int, at offset: UInt64) throws(FileError) {
        if offset + UInt64(count) > size { throw FileError("pwrite", path: path, errno: EINVAL) }
        if case .failure(let e) = pwriteFully(fd, buffer, count, offset) {
            throw FileError("pwrite", path: path, errno: e)
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(FileError) {
        guard let base = bytes.baseAddress else { return }
        try write(base, count: bytes.count, at: offset)
    }

    /// fdatasync: every page written so far is durable when this returns.
    public func sync() throws(FileError) {
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            throw FileError("fdatasync", path: path, errno: e)
        }
    }

    /// Drops every byte (the file becomes one hole of `size` bytes). Used when
    /// the bitmap starts afresh; call it before the zeroed bitmap is persisted.
    public func discardAll() throws(FileError) {
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, 0) }) {
            throw FileError("ftruncate", path: path, errno: e)
        }
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(binding == nil ? size : fileLength)) }) {
            throw FileError("ftruncate", path: path, errno: e)
        }
        if let binding { try writeTrailer(binding, pageSize: pageSize) }
    }
}

// MARK: Trailer (binding)

public extension CacheFile {
    static let trailerMagic: [UInt8] = Array("UBLKCTRL".utf8)
    static let trailerSize = 4096

    /// Where a bound file's trailer starts: the image end rounded up to 4096.
    static func trailerOffset(size: UInt64) -> UInt64 { (size + 4095) & ~4095 }

    /// A bound file's length.
    var fileLength: UInt64 { CacheFile.trailerOffset(size: size) + UInt64(CacheFile.trailerSize) }

    /// Opens `path` as it is (no resizing, no creating); nil when it does not exist.
    static func openExisting(path: String, size: UInt64) throws(FileError) -> CacheFile? {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw FileError("open", path: path, errno: errno)
        }
        return CacheFile(path: path, size: size, fd: fd)
    }

    /// Creates `path` anew (0600; what it held is dropped): `size` bytes of
    /// holes, then the trailer naming `binding`, fdatasync'ed.
    static func create(path: String, size: UInt64, pageSize: Int, binding: SetBinding) throws(FileError) -> CacheFile {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw FileError("open", path: path, errno: errno) }
        let file = CacheFile(path: path, size: size, fd: fd)
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, 0) }) { throw FileError("ftruncate", path: path, errno: e) }
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(file.fileLength)) }) {
            throw FileError("ftruncate", path: path, errno: e)
        }
        try file.writeTrailer(binding, pageSize: pageSize)
        syncDirectory(of: path)
        return file
    }

    /// The file's current length.
    func currentLength() throws(FileError) -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw FileError("fstat", path: path, errno: errno) }
        return UInt64(st.st_size)
    }

    /// The trailer, or why there is none that can be trusted.
    func readTrailer() throws(FileError) -> Result<(binding: SetBinding, pageSize: Int), TrailerProblem> {
        let length = try currentLength()
        if length < fileLength {
            return .failure(length == size ? .missing : .shorter(length: length, expected: fileLength))
        }
        var t = [UInt8](repeating: 0, count: 64)
        switch t.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, 64, CacheFile.trailerOffset(size: size)) }) {
        case .success(64): break
        case .success: return .failure(.missing)
        case .failure(let e): throw FileError("pread", path: path, errno: e)
        }
        func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
            var v: T = 0
            withUnsafeMutableBytes(of: &v) { for i in 0..<$0.count { $0[i] = t[at + i] } }
            return T(littleEndian: v)
        }
        guard Array(t[0..<8]) == CacheFile.trailerMagic, get(8, UInt32.self) == 1,
              get(56, UInt64.self) == CacheFile.checksum(Array(t[0..<56])) else { return .failure(.missing) }
        guard get(16, UInt64.self) == size else { return .failure(.otherSize(get(16, UInt64.self))) }
        let b = SetBinding(setID: Array(t[32..<48]), generation: get(24, UInt64.self))
        return .success((b, Int(get(12, UInt32.self))))
    }

    /// Writes the trailer naming `binding` (after the image), then fdatasync.
    func writeTrailer(_ b: SetBinding, pageSize: Int) throws(FileError) {
        var t = [UInt8](repeating: 0, count: 64)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, x) in $0.enumerated() { t[at + i] = x } }
        }
        t.replaceSubrange(0..<8, with: CacheFile.trailerMagic)
        put(UInt32(1), 8)
        put(UInt32(pageSize), 12)
        put(size, 16)
        put(b.generation, 24)
        t.replaceSubrange(32..<48, with: b.setID)
        put(CacheFile.checksum(Array(t[0..<56])), 56)
        if (try currentLength()) < fileLength,
           case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(fileLength)) }) {
            throw FileError("ftruncate", path: path, errno: e)
        }
        let r = t.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, 64, CacheFile.trailerOffset(size: size)) }
        if case .failure(let e) = r { throw FileError("pwrite", path: path, errno: e) }
        try sync()
        binding = b
        self.pageSize = pageSize
    }

    private static func checksum(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes { hash = (hash ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        return hash
    }
}

/// Why a cache file's trailer cannot be trusted.
public enum TrailerProblem: Error, Equatable, Sendable {
    /// No trailer (a file from before binding, or another file).
    case missing
    /// Shorter than a bound file of this image (truncated).
    case shorter(length: UInt64, expected: UInt64)
    /// A trailer for an image of another size.
    case otherSize(UInt64)
}
