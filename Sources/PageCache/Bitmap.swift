// Bitmap: the persistent page bitmap of a cache file: which pages of the
// image the cache file holds.
//
// The file format is in BitmapFormat.swift; the crash order of persisting
// the bits in BitmapPersistence.swift.
//
// Contract:
// - Open-or-create validates: another magic, version, kind, page size or image
//   size, a bad checksum or a short file is a typed `BitmapError`, never
//   silently reused. A different URL or validators (ETag / Last-Modified)
//   opens with outcome `.invalidated(reason)`: the caller decides, by calling
//   `startAfresh()` (zero the bits, record the new identity) or
//   `adoptIdentity()` (keep the bits, record the new identity).
// - Created atomically (temp file, fsync, rename, directory fsync), 0600, and
//   locked (flock, exclusive) for as long as the instance lives.
// - Binding (CacheStore): `binding` is the set identity and generation read
//   from the header (nil: a file from before binding); `bind(_:)` rewrites
//   the header with another. Every header write keeps the current binding.
// - Live words (LiveBits.swift): `attachLive` moves the bits into a shared
//   mapping of a file on /run, so that they survive the process (not the
//   machine); the file's words are adopted when they belong to this very
//   file, set and generation in this boot. The API is the same either way.
// - A torn header write (crash during `startAfresh`/`adoptIdentity`) shows up
//   as `.corruptHeader` on the next open; bits are zeroed on disk before a new
//   header is written, so a torn state never claims pages it does not hold.
import Glibc

public final class Bitmap {
    public static let magic: [UInt8] = Array("UBLKBMP\0".utf8)
    public static let version: UInt32 = 1
    public static let headerSize = 4096

    public let path: String
    public let fd: Int32
    /// The identity recorded in the file (after `startAfresh`/`adoptIdentity`: the new one).
    public private(set) var identity: BitmapIdentity
    /// The identity the caller opened with.
    public let requested: BitmapIdentity
    /// The bits (their words move into a shared mapping at `attachLive`).
    public private(set) var bits: PageBits
    /// The set identity and generation recorded in the header (nil: unbound).
    public private(set) var binding: SetBinding?
    /// The live file holding the words, once attached.
    public private(set) var live: LiveFile?

    /// Sequence numbers of the next commit staged and the next one persisted (BitmapPersistence.swift).
    var nextSequence: UInt64 = 0
    var nextToPersist: UInt64 = 0
    /// Per word, the bits that may be set in the file (`trackDiskBits`): its
    /// words as last persisted, with those of a commit staged since OR'd in.
    var diskMaySet: [UInt64]?

    public var pageSize: Int { identity.pageSize }
    public var pageCount: UInt64 { bits.pageCount }

    public static func fileSize(pageCount: UInt64) -> UInt64 {
        UInt64(headerSize) + (pageCount + 63) / 64 * 8
    }

    /// Opens `path`, or creates it when absent (bound to `binding`, if given).
    public static func open(path: String, identity: BitmapIdentity,
                            binding: SetBinding? = nil) throws(BitmapError) -> (bitmap: Bitmap, outcome: BitmapOutcome) {
        guard identity.pageSize >= 512, identity.pageSize & (identity.pageSize - 1) == 0 else {
            throw .invalidPageSize(identity.pageSize)
        }
        _ = try encodeHeader(identity) // length check before touching the disk
        var fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        var created = false
        if fd < 0 {
            guard errno == ENOENT else { throw .io(FileError("open", path: path, errno: errno)) }
            try create(path: path, identity: identity, binding: binding)
            fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
            if fd < 0 { throw .io(FileError("open", path: path, errno: errno)) }
            created = true
        }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            close(fd)
            if e == EWOULDBLOCK { throw .locked(path: path) }
            throw .io(FileError("flock", path: path, errno: e))
        }
        do {
            let stored = try readHeader(fd: fd, path: path, expected: identity)
            // Its blocks reserved now: a full file system later must not fail a
            // word's write into a hole (every write then waits on the bitmaps).
            try reserve(fd: fd, path: path, pageCount: stored.pageCount)
            let bitmap = Bitmap(path: path, fd: fd, identity: stored, requested: identity)
            bitmap.binding = try readBinding(fd: fd, path: path)
            try readWords(fd: fd, path: path, into: bitmap.bits)
            if created { return (bitmap, .fresh) }
            if stored.url != identity.url {
                return (bitmap, .invalidated(.urlChanged(old: stored.url, new: identity.url)))
            }
            if stored.etag != identity.etag {
                return (bitmap, .invalidated(.etagChanged(old: stored.etag, new: identity.etag)))
            }
            if stored.lastModified != identity.lastModified {
                return (bitmap, .invalidated(.lastModifiedChanged(old: stored.lastModified, new: identity.lastModified)))
            }
            return (bitmap, .reused)
        } catch {
            close(fd)
            throw error
        }
    }

    private init(path: String, fd: Int32, identity: BitmapIdentity, requested: BitmapIdentity) {
        self.path = path
        self.fd = fd
        self.identity = identity
        self.requested = requested
        self.bits = PageBits(pageCount: identity.pageCount)
    }

    deinit {
        // Every change is on disk: the live copy says nothing more, drop it.
        if let live, !bits.hasChanged, nextToPersist == nextSequence { live.remove() }
        close(fd)
    }

    // MARK: Bits

    @inline(__always)
    public func test(_ page: UInt64) -> Bool { bits.test(page) }

    /// Step 2 of the crash rule: call only after the pages' data was written.
    @discardableResult
    public func markPresent(_ pages: Range<UInt64>) -> UInt64 { bits.set(pages) }

    /// Clears bits (the page must not be trusted any more). For the present
    /// kind, persist the cleared bits *before* overwriting the page's data.
    @discardableResult
    public func markAbsent(_ pages: Range<UInt64>) -> UInt64 { bits.clear(pages) }

    public var count: UInt64 { bits.count }

    // MARK: Identity

    /// Zeroes every bit, in memory and on disk, and records `requested` as the
    /// identity. Pending stages are void: stage again after this.
    public func startAfresh() throws(BitmapError) {
        _ = bits.takeChanged()
        bits.load { $0.initializeMemory(as: UInt8.self, repeating: 0) }
        nextToPersist = nextSequence
        if diskMaySet != nil { diskMaySet = [UInt64](repeating: 0, count: diskMaySet!.count) }
        let size = Bitmap.fileSize(pageCount: bits.pageCount)
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(Bitmap.headerSize)) }) {
            throw .io(FileError("ftruncate", path: path, errno: e))
        }
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(size)) }) {
            throw .io(FileError("ftruncate", path: path, errno: e))
        }
        try Bitmap.reserve(fd: fd, path: path, pageCount: bits.pageCount)
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            throw .io(FileError("fdatasync", path: path, errno: e))
        }
        try writeHeader(requested)
    }

    /// Allocates the file's blocks, as a live file's are (LiveFile.reserveBlocks).
    static func reserve(fd: Int32, path: String, pageCount: UInt64) throws(BitmapError) {
        let e = LiveFile.reserveBlocks(fd, Int(fileSize(pageCount: pageCount)))
        if e != 0 && e != EOPNOTSUPP && e != ENOSYS { throw .io(FileError("fallocate", path: path, errno: e)) }
    }

    /// Keeps the bits and records `requested` as the identity (the caller
    /// knows the source is the same image, e.g. a moved URL).
    public func adoptIdentity() throws(BitmapError) {
        try writeHeader(requested)
    }

    // MARK: Internals

    private func writeHeader(_ id: BitmapIdentity) throws(BitmapError) {
        let header = try Bitmap.encodeHeader(id, binding: binding)
        let r = header.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, $0.count, 0) }
        if case .failure(let e) = r { throw .io(FileError("pwrite", path: path, errno: e)) }
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            throw .io(FileError("fdatasync", path: path, errno: e))
        }
        identity = id
    }
}


// MARK: Binding and live words

extension Bitmap {
    /// Records `binding` in the header (durably), keeping identity and bits;
    /// the live file, if attached, follows.
    public func bind(_ binding: SetBinding) throws(BitmapError) {
        let old = self.binding
        self.binding = binding
        do { try writeHeader(identity) } catch {
            self.binding = old
            throw error
        }
        live?.setBinding(binding)
    }

    /// Moves the words into the live file for this bitmap under `config`
    /// (see LiveBits.swift). When that file holds the words of this file,
    /// set and generation in this boot (a server of this boot died with
    /// them), they are the truth: adopted, and every word that differs from
    /// the disk is marked changed so that the next persist writes it (after the
    /// cache file's data sync, as always). Otherwise the file is (re)made from
    /// the words read from disk. Returns whether live words were adopted.
    /// Needs a binding. Without a usable live directory: `config.required`
    /// decides between an error and staying in private memory (false).
    @discardableResult
    public func attachLive(_ config: LiveConfig, role: String) throws(BitmapError) -> Bool {
        guard live == nil, let binding else { return false }
        let file: LiveFile
        do {
            guard let f = try LiveFile.open(config: config, bitmapPath: path, role: role, pageCount: pageCount) else { return false }
            file = f
        } catch { throw .io(error) }
        let mapped = PageBits(pageCount: pageCount, mapping: file.words) { [file] in file.unmap() }
        let adopted = file.matches(bootID: config.bootID, kind: identity.kind, binding: binding, pageCount: pageCount)
        if adopted {
            mapped.recount()
            for w in 0..<mapped.wordCount where mapped.word(w) != bits.word(w) { mapped.markChanged(w) }
        } else {
            file.invalidate()
            let old = bits
            mapped.load { buf in
                let w = buf.bindMemory(to: UInt64.self)
                for i in 0..<old.wordCount { w[i] = old.word(i) }
            }
            file.validate(bootID: config.bootID, kind: identity.kind, binding: binding, pageCount: pageCount)
        }
        // Words changed before the move still have to reach the disk.
        for w in bits.takeChanged() { mapped.markChanged(w) }
        bits = mapped
        live = file
        return adopted
    }

}
