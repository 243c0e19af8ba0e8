// Bitmap: the persistent page bitmap of a cache file: which pages of the
// image the cache file holds.
//
// File format (little-endian; the header is one 4096-byte block, so the bits
// start block-aligned):
//
//   offset size  field
//        0    8  magic "UBLKBMP\0"
//        8    4  version (1)
//       12    4  kind: 1 = present (page fetched), 2 = dirty (page written
//                since the last clear; also the `cache` target's write-back
//                bitmap), 3 = local (the page holds data written here).
//       16    4  page size in bytes
//       20    4  header size = offset of the bits (4096)
//       24    8  image size in bytes
//       32    8  page count = ceil(image size / page size)
//       40    8  checksum: FNV-1a 64 of the 4096 header bytes with this field 0
//       48    2  URL length        (UTF-8 bytes)
//       50    2  ETag length       (0: none)
//       52    2  Last-Modified length (0: none)
//       54    2  flags: bit 0 = bound (the set identity below is valid)
//       56    8  generation of the set (bound only; see CacheStore)
//       64    …  URL, ETag, Last-Modified bytes, back to back (≤ 4016 in all)
//     4080   16  set identity (bound only): random bytes shared by the files
//                of one cache (bitmaps and cache file), see CacheStore
//     4096    …  bits: ceil(page count / 64) 64-bit words; bit p%64 of word
//                p/64 is page p. Bits past the page count are ignored.
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
// - CRASH RULE (present kind): a bit reaches the disk only after its page's
//   data has. The order is spelled out by the API:
//     1. write the page data into the cache file (pwrite completed);
//     2. `markPresent(pages)`: the bits are set in memory (reads may use the
//        pages now: the data is in the page cache) and recorded as dirty;
//     3. `let c = stage()`: snapshots every dirty word *now*; pages marked
//        after this call are not covered by `c`;
//     4. `cacheFile.sync()` (fdatasync): the data of every page in `c` is durable;
//     5. `persist(c)`: pwrites only the changed words (coalesced into ranges),
//        then fdatasync of the bitmap.
//   `commit(syncing:)` does 3–5 in a row, blocking. Commits are persisted in
//   the order they were staged (one may be skipped: `abandon` it to re-mark
//   its words dirty); a failed persist re-marks its words dirty.
//   For the dirty kind the order is the reverse (bits before the FLUSH that
//   acknowledges the write): stage, persist, then acknowledge.
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

    private var nextSequence: UInt64 = 0
    private var nextToPersist: UInt64 = 0

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
            let bitmap = Bitmap(path: path, fd: fd, identity: stored, requested: identity)
            bitmap.binding = try readBinding(fd: fd, path: path)
            try bitmap.loadBits()
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
        if let live, !bits.hasDirty, nextToPersist == nextSequence { live.remove() }
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

    // MARK: Persistence

    /// Step 3: snapshot every dirty word. Cheap; no I/O.
    public func stage() -> BitmapCommit {
        let dirty = bits.takeDirty().sorted()
        var values = [UInt64]()
        values.reserveCapacity(dirty.count)
        for w in dirty { values.append(bits.word(w)) }
        defer { nextSequence += 1 }
        return BitmapCommit(sequence: nextSequence, indices: dirty, values: values)
    }

    /// Step 5: write the snapshotted words (contiguous words in one pwrite),
    /// then fdatasync. Call only after the cache file's data sync (step 4).
    public func persist(_ commit: BitmapCommit) throws(BitmapError) {
        // An older snapshot after a newer one could undo cleared bits: refuse it.
        precondition(commit.sequence >= nextToPersist, "bitmap commits must be persisted in the order staged")
        nextToPersist = commit.sequence + 1
        if commit.isEmpty { return }
        var failure: FileError?
        var i = 0
        let n = commit.indices.count
        var run = [UInt64]()
        while i < n && failure == nil {
            var j = i + 1
            while j < n && commit.indices[j] == commit.indices[j - 1] + 1 { j += 1 }
            run.removeAll(keepingCapacity: true)
            for k in i..<j { run.append(commit.values[k].littleEndian) }
            let offset = UInt64(Bitmap.headerSize) + UInt64(commit.indices[i]) * 8
            let r = run.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, $0.count, offset) }
            if case .failure(let e) = r { failure = FileError("pwrite", path: path, errno: e) }
            i = j
        }
        if failure == nil, case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            failure = FileError("fdatasync", path: path, errno: e)
        }
        if let failure {
            // The words are not known to be on disk: write them again next time.
            redirty(commit.indices)
            throw .io(failure)
        }
    }

    /// A staged commit laid out for writing through someone else's I/O (the
    /// queue's io_uring): the words, little-endian, in one buffer, and the
    /// file ranges they go to. The buffer lives as long as this object; the
    /// caller writes every run, fdatasyncs `fd`, then calls `persisted(_:)`
    /// (or `abandon(_:)` when any of it failed).
    public final class PendingWrite {
        public let commit: BitmapCommit
        public let fd: Int32
        public let buffer: UnsafeMutableRawPointer
        /// (file offset, offset in `buffer`, byte count), one per run of contiguous words.
        public let runs: [(fileOffset: UInt64, bufferOffset: Int, count: Int)]

        init(commit: BitmapCommit, fd: Int32) {
            self.commit = commit
            self.fd = fd
            let n = commit.indices.count
            buffer = .allocate(byteCount: max(n, 1) * 8, alignment: 8)
            let words = buffer.bindMemory(to: UInt64.self, capacity: max(n, 1))
            var runs: [(UInt64, Int, Int)] = []
            var i = 0
            while i < n {
                var j = i + 1
                while j < n && commit.indices[j] == commit.indices[j - 1] + 1 { j += 1 }
                for k in i..<j { words[k] = commit.values[k].littleEndian }
                runs.append((UInt64(Bitmap.headerSize) + UInt64(commit.indices[i]) * 8, i * 8, (j - i) * 8))
                i = j
            }
            self.runs = runs
        }

        deinit { buffer.deallocate() }
    }

    /// Step 5 without doing the I/O: what to write for `commit`.
    public func pendingWrite(_ commit: BitmapCommit) -> PendingWrite {
        precondition(commit.sequence >= nextToPersist, "bitmap commits must be persisted in the order staged")
        return PendingWrite(commit: commit, fd: fd)
    }

    /// The words of `commit` were written and the file fdatasync'ed by the caller.
    public func persisted(_ commit: BitmapCommit) {
        precondition(commit.sequence >= nextToPersist, "bitmap commits must be persisted in the order staged")
        nextToPersist = commit.sequence + 1
    }

    /// Whether any word holding `pages` changed since the last `stage()`
    /// (its new value is not on its way to the disk yet).
    public func hasUnstaged(_ pages: Range<UInt64>) -> Bool { bits.hasPendingWords(pages) }

    /// Gives up on a staged commit (its data sync failed or will not happen):
    /// its words become dirty again, for a later stage.
    public func abandon(_ commit: BitmapCommit) {
        redirty(commit.indices)
    }

    /// Steps 3–5, blocking: stage, fdatasync the cache file, persist.
    public func commit(syncing cacheFile: CacheFile) throws(BitmapError) {
        let c = stage()
        if c.isEmpty {
            nextToPersist = c.sequence + 1
            return
        }
        do { try cacheFile.sync() } catch {
            abandon(c)
            throw .io(error)
        }
        try persist(c)
    }

    /// Zeroes every bit, in memory and on disk, and records `requested` as the
    /// identity. Pending stages are void: stage again after this.
    public func startAfresh() throws(BitmapError) {
        _ = bits.takeDirty()
        bits.load { $0.initializeMemory(as: UInt8.self, repeating: 0) }
        nextToPersist = nextSequence
        let size = Bitmap.fileSize(pageCount: bits.pageCount)
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(Bitmap.headerSize)) }) {
            throw .io(FileError("ftruncate", path: path, errno: e))
        }
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(size)) }) {
            throw .io(FileError("ftruncate", path: path, errno: e))
        }
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            throw .io(FileError("fdatasync", path: path, errno: e))
        }
        try writeHeader(requested)
    }

    /// Keeps the bits and records `requested` as the identity (the caller
    /// knows the source is the same image, e.g. a moved URL).
    public func adoptIdentity() throws(BitmapError) {
        try writeHeader(requested)
    }

    /// Reads a bitmap file without opening it for use (no lock, no
    /// validation against an expected identity): for status commands.
    public static func inspect(path: String) throws(BitmapError) -> BitmapInfo {
        try read(path: path).info
    }

    /// `inspect`, with the bits.
    static func read(path: String) throws(BitmapError) -> (info: BitmapInfo, bits: PageBits) {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw .io(FileError("open", path: path, errno: errno)) }
        defer { close(fd) }
        var h = [UInt8](repeating: 0, count: headerSize)
        switch h.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, headerSize, 0) }) {
        case .success(let n) where n >= 8 && Array(h[0..<8]) != magic: throw .badMagic(path: path)
        case .success(let n) where n < headerSize: throw .tooShort(path: path, size: UInt64(n), expected: UInt64(headerSize))
        case .success: break
        case .failure(let e): throw .io(FileError("pread", path: path, errno: e))
        }
        let kind = BitmapKind(rawValue: UInt32(h[12]) | UInt32(h[13]) << 8 | UInt32(h[14]) << 16 | UInt32(h[15]) << 24) ?? .present
        let pageSize = Int(UInt32(h[16]) | UInt32(h[17]) << 8 | UInt32(h[18]) << 16 | UInt32(h[19]) << 24)
        var imageSize: UInt64 = 0
        for i in (24..<32).reversed() { imageSize = imageSize << 8 | UInt64(h[i]) }
        let probe = BitmapIdentity(kind: kind, pageSize: pageSize, imageSize: imageSize, url: "")
        // A crafted header must not make us divide by zero, overflow or allocate without bound.
        guard probe.hasValidGeometry else { throw .corruptHeader(path: path) }
        let identity = try readHeader(fd: fd, path: path, expected: probe)
        let words = Int((identity.pageCount + 63) / 64)
        let bits = PageBits(pageCount: identity.pageCount)
        var failure: FileError?
        bits.load { buf in
            guard words > 0 else { return }
            switch preadFully(fd, buf.baseAddress!, words * 8, UInt64(headerSize)) {
            case .success(let n) where n == words * 8: break
            case .success: failure = FileError("pread", path: path, errno: EIO)
            case .failure(let e): failure = FileError("pread", path: path, errno: e)
            }
            let w = buf.bindMemory(to: UInt64.self)
            for i in w.indices { w[i] = UInt64(littleEndian: w[i]) }
        }
        if let failure { throw .io(failure) }
        bits.recount()
        return (BitmapInfo(identity: identity, present: bits.count, binding: try readBinding(fd: fd, path: path)), bits)
    }

    // MARK: Internals

    private func redirty(_ indices: [Int]) {
        for w in indices { bits.markDirty(w) }
    }

    private func writeHeader(_ id: BitmapIdentity) throws(BitmapError) {
        let header = try Bitmap.encodeHeader(id, binding: binding)
        let r = header.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, $0.count, 0) }
        if case .failure(let e) = r { throw .io(FileError("pwrite", path: path, errno: e)) }
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            throw .io(FileError("fdatasync", path: path, errno: e))
        }
        identity = id
    }

    private func loadBits() throws(BitmapError) {
        var failure: FileError?
        let count = bits.wordCount * 8
        bits.load { buf in
            guard count > 0 else { return }
            switch preadFully(fd, buf.baseAddress!, count, UInt64(Bitmap.headerSize)) {
            case .success(let n) where n == count: break
            case .success: failure = FileError("pread", path: path, errno: EIO)
            case .failure(let e): failure = FileError("pread", path: path, errno: e)
            }
            let words = buf.bindMemory(to: UInt64.self)
            for i in words.indices { words[i] = UInt64(littleEndian: words[i]) }
        }
        if let failure { throw .io(failure) }
    }

    private static func create(path: String, identity: BitmapIdentity, binding: SetBinding?) throws(BitmapError) {
        let tmp = path + ".tmp.\(getpid())"
        let fd = Glibc.open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 { throw .io(FileError("open", path: tmp, errno: errno)) }
        defer { close(fd) }
        let header = try encodeHeader(identity, binding: binding)
        let r = header.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, $0.count, 0) }
        if case .failure(let e) = r { unlink(tmp); throw .io(FileError("pwrite", path: tmp, errno: e)) }
        if ftruncate(fd, off_t(fileSize(pageCount: identity.pageCount))) != 0 {
            let e = errno; unlink(tmp); throw .io(FileError("ftruncate", path: tmp, errno: e))
        }
        if fsync(fd) != 0 { let e = errno; unlink(tmp); throw .io(FileError("fsync", path: tmp, errno: e)) }
        if rename(tmp, path) != 0 { let e = errno; unlink(tmp); throw .io(FileError("rename", path: path, errno: e)) }
        syncDirectory(of: path)
    }

    static func encodeHeader(_ id: BitmapIdentity, binding: SetBinding? = nil) throws(BitmapError) -> [UInt8] {
        let url = Array(id.url.utf8), etag = Array((id.etag ?? "").utf8), lm = Array((id.lastModified ?? "").utf8)
        let strings = url.count + etag.count + lm.count
        guard strings <= headerSize - 80, url.count <= 0xFFFF, etag.count <= 0xFFFF, lm.count <= 0xFFFF else {
            throw .headerTooLong(length: strings)
        }
        var h = [UInt8](repeating: 0, count: headerSize)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { h[at + i] = b } }
        }
        h.replaceSubrange(0..<8, with: magic)
        put(version, 8)
        put(id.kind.rawValue, 12)
        put(UInt32(id.pageSize), 16)
        put(UInt32(headerSize), 20)
        put(id.imageSize, 24)
        put(id.pageCount, 32)
        put(UInt16(url.count), 48)
        put(UInt16(etag.count), 50)
        put(UInt16(lm.count), 52)
        h.replaceSubrange(64..<64 + url.count, with: url)
        h.replaceSubrange(64 + url.count..<64 + url.count + etag.count, with: etag)
        h.replaceSubrange(64 + url.count + etag.count..<64 + strings, with: lm)
        if let b = binding {
            put(UInt16(1), 54)
            put(b.generation, 56)
            h.replaceSubrange(headerSize - 16..<headerSize, with: b.setID)
        }
        put(fnv1a(h), 40)
        return h
    }

    static func fnv1a(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for (i, b) in bytes.enumerated() {
            let v: UInt8 = (40..<48).contains(i) ? 0 : b
            hash = (hash ^ UInt64(v)) &* 0x0000_0100_0000_01b3
        }
        return hash
    }

    private static func readHeader(fd: Int32, path: String, expected: BitmapIdentity) throws(BitmapError) -> BitmapIdentity {
        var st = stat()
        if fstat(fd, &st) != 0 { throw .io(FileError("fstat", path: path, errno: errno)) }
        var h = [UInt8](repeating: 0, count: headerSize)
        let r = h.withUnsafeMutableBytes { preadFully(fd, $0.baseAddress!, headerSize, 0) }
        let got: Int
        switch r {
        case .success(let n): got = n
        case .failure(let e): throw .io(FileError("pread", path: path, errno: e))
        }
        if got >= 8, Array(h[0..<8]) != magic { throw .badMagic(path: path) }
        if got < headerSize { throw .tooShort(path: path, size: UInt64(st.st_size), expected: UInt64(headerSize)) }
        func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
            var v: T = 0
            withUnsafeMutableBytes(of: &v) { for i in 0..<$0.count { $0[i] = h[at + i] } }
            return T(littleEndian: v)
        }
        let version = get(8, UInt32.self)
        if version != Bitmap.version { throw .unsupportedVersion(path: path, version: version) }
        if get(40, UInt64.self) != fnv1a(h) { throw .corruptHeader(path: path) }
        let kind = get(12, UInt32.self)
        if kind != expected.kind.rawValue { throw .kindMismatch(path: path, file: kind, expected: expected.kind.rawValue) }
        let pageSize = Int(get(16, UInt32.self))
        if pageSize != expected.pageSize { throw .pageSizeMismatch(path: path, file: pageSize, expected: expected.pageSize) }
        let imageSize = get(24, UInt64.self)
        if imageSize != expected.imageSize { throw .imageSizeMismatch(path: path, file: imageSize, expected: expected.imageSize) }
        if get(20, UInt32.self) != UInt32(headerSize) || get(32, UInt64.self) != expected.pageCount {
            throw .corruptHeader(path: path)
        }
        let needed = fileSize(pageCount: expected.pageCount)
        if UInt64(st.st_size) < needed { throw .tooShort(path: path, size: UInt64(st.st_size), expected: needed) }
        let ul = Int(get(48, UInt16.self)), el = Int(get(50, UInt16.self)), ll = Int(get(52, UInt16.self))
        guard 64 + ul + el + ll <= headerSize else { throw .corruptHeader(path: path) }
        let url = String(decoding: h[64..<64 + ul], as: UTF8.self)
        let etag = String(decoding: h[64 + ul..<64 + ul + el], as: UTF8.self)
        let lm = String(decoding: h[64 + ul + el..<64 + ul + el + ll], as: UTF8.self)
        return BitmapIdentity(kind: expected.kind, pageSize: pageSize, imageSize: imageSize, url: url,
                              etag: etag.isEmpty ? nil : etag, lastModified: lm.isEmpty ? nil : lm)
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
    /// the disk is marked dirty so that the next persist writes it (after the
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
            for w in 0..<mapped.wordCount where mapped.word(w) != bits.word(w) { mapped.markDirty(w) }
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
        for w in bits.takeDirty() { mapped.markDirty(w) }
        bits = mapped
        live = file
        return adopted
    }

    static func readBinding(fd: Int32, path: String) throws(BitmapError) -> SetBinding? {
        var h = [UInt8](repeating: 0, count: headerSize)
        switch h.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, headerSize, 0) }) {
        case .success(let n) where n == headerSize: break
        case .success: throw .corruptHeader(path: path)
        case .failure(let e): throw .io(FileError("pread", path: path, errno: e))
        }
        guard h[54] & 1 != 0 else { return nil }
        var gen: UInt64 = 0
        for i in (56..<64).reversed() { gen = gen << 8 | UInt64(h[i]) }
        return SetBinding(setID: Array(h[headerSize - 16..<headerSize]), generation: gen)
    }
}
