import Glibc
import XCTest
@testable import PageCache

final class PageBitsTests: XCTestCase {
    func testRangeOperationsMatchANaiveModel() {
        let n: UInt64 = 1000
        let bits = PageBits(pageCount: n)
        var model = [Bool](repeating: false, count: Int(n))
        var seed: UInt64 = 12345
        func next(_ bound: UInt64) -> UInt64 {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            return (seed >> 33) % bound
        }
        for _ in 0..<2000 {
            let a = next(n), len = next(150)
            let r = a..<min(a + len, n)
            if next(3) == 0 {
                let before = r.filter { model[Int($0)] }.count
                XCTAssertEqual(bits.clear(r), UInt64(before))
                for p in r { model[Int(p)] = false }
            } else {
                let before = r.filter { !model[Int($0)] }.count
                XCTAssertEqual(bits.set(r), UInt64(before))
                for p in r { model[Int(p)] = true }
            }
            let q = next(n)..<n
            XCTAssertEqual(bits.nextClear(in: q), q.first { !model[Int($0)] })
            XCTAssertEqual(bits.nextSet(in: q), q.first { model[Int($0)] })
            XCTAssertEqual(bits.count(in: r), UInt64(r.filter { model[Int($0)] }.count))
        }
        for p in 0..<n { XCTAssertEqual(bits.test(p), model[Int(p)]) }
        XCTAssertEqual(bits.count, UInt64(model.filter { $0 }.count))
        // Ranges past the end are clamped.
        XCTAssertEqual(bits.nextClear(in: n..<n + 100), nil)
        bits.set(990..<5000)
        XCTAssertTrue(bits.allSet(990..<1000))
    }

    func testDirtyWordsAreRecordedOnceInOrder() {
        let bits = PageBits(pageCount: 1 << 12)
        bits.set(130..<131)
        bits.set(0..<1)
        bits.set(129..<200) // word 2 again, word 3
        bits.set(0..<1) // no change
        XCTAssertEqual(bits.takeChanged(), [2, 0, 3])
        XCTAssertEqual(bits.takeChanged(), [])
        bits.clear(0..<1)
        XCTAssertEqual(bits.takeChanged(), [0])
    }
}

final class BitmapTests: XCTestCase {
    var dir: TempDir!
    override func setUp() { dir = TempDir() }
    override func tearDown() { dir = nil }

    let identity = BitmapIdentity(pageSize: 4096, imageSize: 10 << 20, url: "http://example/image",
                                  etag: "\"abc\"", lastModified: "Mon, 01 Jan 2024 00:00:00 GMT")

    func testCreateMarkCommitReopen() throws {
        let path = dir.file("bm")
        let cache = try CacheFile(path: dir.file("cache"), size: identity.imageSize)
        do {
            let (bm, outcome) = try Bitmap.open(path: path, identity: identity)
            XCTAssertEqual(outcome, .fresh)
            XCTAssertEqual(bm.pageCount, 2560)
            bm.markPresent(0..<10)
            bm.markPresent(100..<300)
            bm.markPresent(2559..<2560)
            try bm.commit(syncing: cache)
        }
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        XCTAssertEqual(UInt64(st.st_size), Bitmap.fileSize(pageCount: 2560))
        XCTAssertEqual(stat(dir.file("cache"), &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        XCTAssertEqual(UInt64(st.st_size), identity.imageSize)

        let (bm, outcome) = try Bitmap.open(path: path, identity: identity)
        XCTAssertEqual(outcome, .reused)
        XCTAssertEqual(bm.count, 211)
        XCTAssertTrue(bm.bits.allSet(100..<300))
        XCTAssertFalse(bm.test(10))
        XCTAssertFalse(bm.test(99))
        XCTAssertTrue(bm.test(2559))
        XCTAssertEqual(bm.identity, identity)
    }

    func testABitmapFileHasItsBlocksReservedSoAFullFileSystemCannotFailAWordWrite() throws {
        // A large image: its words span many blocks, which a sparse file would allocate only when written.
        let big = BitmapIdentity(pageSize: 4096, imageSize: 4 << 30, url: "http://example/image", etag: "\"abc\"")
        let path = dir.file("bm")
        let size = Bitmap.fileSize(pageCount: big.imageSize / 4096)
        func allocated() -> UInt64 {
            var st = stat()
            XCTAssertEqual(stat(path, &st), 0)
            return UInt64(st.st_blocks) * 512
        }
        do { _ = try Bitmap.open(path: path, identity: big) }
        XCTAssertGreaterThanOrEqual(allocated(), size, "created with every block allocated")
        // A file made sparse (by an older version) is filled in when opened.
        XCTAssertEqual(truncate(path, off_t(Bitmap.headerSize)), 0)
        XCTAssertEqual(truncate(path, off_t(size)), 0)
        XCTAssertLessThan(allocated(), size)
        let (bm, _) = try Bitmap.open(path: path, identity: big)
        XCTAssertGreaterThanOrEqual(allocated(), size)
        try bm.startAfresh()
        XCTAssertGreaterThanOrEqual(allocated(), size, "and again after starting afresh")
    }

    func testMismatchedGeometryIsATypedErrorNeverReused() throws {
        let path = dir.file("bm")
        _ = try Bitmap.open(path: path, identity: identity)
        func expect(_ id: BitmapIdentity, _ check: (BitmapError) -> Bool, line: UInt = #line) {
            do {
                _ = try Bitmap.open(path: path, identity: id)
                XCTFail("opened a mismatched bitmap", line: line)
            } catch {
                XCTAssertTrue(check(error), "\(error)", line: line)
            }
        }
        var other = identity
        other.pageSize = 8192
        expect(other) { if case .pageSizeMismatch(_, 4096, 8192) = $0 { return true }; return false }
        other = identity
        other.imageSize += 4096
        expect(other) { if case .imageSizeMismatch(_, 10 << 20, _) = $0 { return true }; return false }
        other = identity
        other.kind = .dirty
        expect(other) { if case .kindMismatch(_, 1, 2) = $0 { return true }; return false }

        // Damage the file in different ways.
        func patch(_ offset: off_t, _ bytes: [UInt8]) {
            let fd = open(path, O_RDWR)
            _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, offset) }
            close(fd)
        }
        patch(70, [0x41]) // a URL byte: checksum catches it
        expect(identity) { if case .corruptHeader = $0 { return true }; return false }
        patch(8, [2, 0, 0, 0]) // version 2
        expect(identity) { if case .unsupportedVersion(_, 2) = $0 { return true }; return false }
        patch(0, Array("NOTABMAP".utf8))
        expect(identity) { if case .badMagic = $0 { return true }; return false }

        // A good header over a truncated bit array.
        let path2 = dir.file("bm2")
        _ = try Bitmap.open(path: path2, identity: identity)
        XCTAssertEqual(truncate(path2, 4096 + 8), 0)
        do {
            _ = try Bitmap.open(path: path2, identity: identity)
            XCTFail("opened a short bitmap")
        } catch {
            guard case .tooShort = error else { return XCTFail("\(error)") }
        }
    }

    func testChangedSourceIsReportedAndStartAfreshZeroes() throws {
        let path = dir.file("bm")
        let cache = try CacheFile(path: dir.file("cache"), size: identity.imageSize)
        do {
            let (bm, _) = try Bitmap.open(path: path, identity: identity)
            bm.markPresent(0..<64)
            try bm.commit(syncing: cache)
        }
        var changed = identity
        changed.etag = "\"def\""
        do {
            let (bm, outcome) = try Bitmap.open(path: path, identity: changed)
            XCTAssertEqual(outcome, .invalidated(.etagChanged(old: "\"abc\"", new: "\"def\"")))
            XCTAssertEqual(bm.count, 64, "bits are loaded; the caller decides")
            XCTAssertEqual(bm.identity, identity, "the file keeps its identity until the caller decides")
        }
        var moved = identity
        moved.url = "http://mirror/image"
        do {
            let (_, outcome) = try Bitmap.open(path: path, identity: moved)
            XCTAssertEqual(outcome, .invalidated(.urlChanged(old: "http://example/image", new: "http://mirror/image")))
        }
        var touched = identity
        touched.lastModified = nil
        do {
            let (_, outcome) = try Bitmap.open(path: path, identity: touched)
            XCTAssertEqual(outcome, .invalidated(.lastModifiedChanged(old: identity.lastModified, new: nil)))
        }
        // Start afresh under the new ETag.
        do {
            let (bm, _) = try Bitmap.open(path: path, identity: changed)
            try bm.startAfresh()
            XCTAssertEqual(bm.count, 0)
            XCTAssertEqual(bm.identity, changed)
        }
        do {
            let (bm, outcome) = try Bitmap.open(path: path, identity: changed)
            XCTAssertEqual(outcome, .reused)
            XCTAssertEqual(bm.count, 0)
        }
        // Adopt keeps bits.
        do {
            let (bm, _) = try Bitmap.open(path: path, identity: changed)
            bm.markPresent(5..<6)
            try bm.commit(syncing: cache)
        }
        do {
            let (bm, outcome) = try Bitmap.open(path: path, identity: moved)
            guard case .invalidated = outcome else { return XCTFail("\(outcome)") }
            try bm.adoptIdentity()
        }
        let (bm, outcome) = try Bitmap.open(path: path, identity: moved)
        XCTAssertEqual(outcome, .reused)
        XCTAssertEqual(bm.count, 1)
    }

    func testSecondOpenIsLocked() throws {
        let path = dir.file("bm")
        let first = try Bitmap.open(path: path, identity: identity)
        XCTAssertThrowsError(try Bitmap.open(path: path, identity: identity)) { error in
            XCTAssertEqual(error as? BitmapError, .locked(path: path))
        }
        _ = first
    }

    /// The crash rule: bits reach the disk only through stage → (data sync) → persist,
    /// and a commit carries exactly the bits marked before it was staged.
    func testCrashOrderStagePersist() throws {
        let path = dir.file("bm")
        let (bm, _) = try Bitmap.open(path: path, identity: identity)
        bm.markPresent(0..<3)
        // Nothing on disk yet: a crash now loses the bits (safe: the pages are refetched).
        XCTAssertEqual(try diskCount(path), 0)
        let c1 = bm.stage()
        XCTAssertEqual(c1.wordCount, 1)
        bm.markPresent(3..<5)        // same word, after the stage
        bm.markPresent(640..<641)    // another word, after the stage
        XCTAssertTrue(bm.test(4), "memory sees pages at once")
        // (the cache file's fdatasync would happen here)
        try bm.persist(c1)
        XCTAssertEqual(try diskBits(path, word: 0), 0b111, "only pages staged in c1 are on disk")
        XCTAssertEqual(try diskBits(path, word: 10), 0)
        let c2 = bm.stage()
        XCTAssertEqual(c2.wordCount, 2)
        try bm.persist(c2)
        XCTAssertEqual(try diskBits(path, word: 0), 0b11111)
        XCTAssertEqual(try diskBits(path, word: 10), 1)
        XCTAssertTrue(bm.stage().isEmpty)
    }

    func testPersistWritesOnlyChangedWords() throws {
        let path = dir.file("bm")
        let (bm, _) = try Bitmap.open(path: path, identity: identity)
        // Scribble on a word behind the bitmap's back: a persist of other words must not touch it.
        let fd = open(path, O_RDWR)
        var junk: UInt64 = 0xDEAD_BEEF
        XCTAssertEqual(pwrite(fd, &junk, 8, 4096 + 8 * 20), 8)
        close(fd)
        bm.markPresent(0..<1)
        bm.markPresent(64 * 21..<64 * 23)
        try bm.persist(bm.stage())
        XCTAssertEqual(try diskBits(path, word: 20), 0xDEAD_BEEF)
        XCTAssertEqual(try diskBits(path, word: 21), .max)
        XCTAssertEqual(try diskBits(path, word: 22), .max)
        XCTAssertEqual(try diskBits(path, word: 0), 1)
    }

    func testInspectAndAbandon() throws {
        let path = dir.file("bm")
        let cache = try CacheFile(path: dir.file("cache"), size: identity.imageSize)
        let (bm, _) = try Bitmap.open(path: path, identity: identity)
        bm.markPresent(0..<100)
        let c = bm.stage()
        bm.abandon(c)              // e.g. the data sync failed
        XCTAssertEqual(try Bitmap.inspect(path: path), BitmapInfo(identity: identity, present: 0))
        try bm.commit(syncing: cache) // the abandoned words were re-marked dirty
        XCTAssertEqual(try Bitmap.inspect(path: path), BitmapInfo(identity: identity, present: 100))
        XCTAssertThrowsError(try Bitmap.inspect(path: dir.file("cache"))) { error in
            XCTAssertEqual(error as? BitmapError, .badMagic(path: dir.file("cache")))
        }
    }

    func testHeaderTooLongIsRejected() {
        var id = identity
        id.url = String(repeating: "x", count: 5000)
        XCTAssertThrowsError(try Bitmap.open(path: dir.file("bm"), identity: id)) { error in
            guard case .headerTooLong = error as? BitmapError else { return XCTFail("\(error)") }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.file("bm")))
    }

    func testCacheFileRoundTrip() throws {
        let cache = try CacheFile(path: dir.file("cache"), size: 1 << 20)
        let data = makeImage(size: 10000)
        try data.withUnsafeBytes { try cache.write($0, at: 4096) }
        var back = [UInt8](repeating: 0, count: 10000)
        let n = try back.withUnsafeMutableBytes { try cache.read(into: $0.baseAddress!, count: 10000, at: 4096) }
        XCTAssertEqual(n, 10000)
        XCTAssertEqual(back, data)
        try cache.sync()
        XCTAssertThrowsError(try data.withUnsafeBytes { try cache.write($0, at: (1 << 20) - 100) })
        try cache.discardAll()
        let n2 = try back.withUnsafeMutableBytes { try cache.read(into: $0.baseAddress!, count: 10000, at: 4096) }
        XCTAssertEqual(n2, 10000)
        XCTAssertEqual(back, [UInt8](repeating: 0, count: 10000))
    }

    /// The set identity and generation live in the header (CacheStore binds
    /// with them); every header rewrite keeps them, and unbound files stay valid.
    func testBindingIsRecordedAndKept() throws {
        let path = dir.file("bm")
        let b = SetBinding.random()
        XCTAssertEqual(b.setID.count, 16)
        XCTAssertNotEqual(b.setID, SetBinding.random().setID)
        do {
            let (bm, outcome) = try Bitmap.open(path: path, identity: identity, binding: b)
            XCTAssertEqual(outcome, .fresh)
            XCTAssertEqual(bm.binding, b)
        }
        XCTAssertEqual(try Bitmap.inspect(path: path).binding, b)
        var changed = identity
        changed.etag = "\"new\""
        do {
            let (bm, _) = try Bitmap.open(path: path, identity: changed)
            try bm.startAfresh()
            XCTAssertEqual(bm.binding, b, "startAfresh keeps the binding")
            var next = b
            next.generation += 1
            try bm.bind(next)
        }
        let info = try Bitmap.inspect(path: path)
        XCTAssertEqual(info.binding?.generation, b.generation + 1)
        XCTAssertEqual(info.identity, changed)
        // A file without a binding (from before) opens as before.
        _ = try Bitmap.open(path: dir.file("old"), identity: identity)
        XCTAssertNil(try Bitmap.inspect(path: dir.file("old")).binding)
    }

    /// The live words: a PageBits over a caller's mapping behaves as one over its own memory.
    func testPageBitsOverAMapping() {
        let words = UnsafeMutablePointer<UInt64>.allocate(capacity: 4)
        words.initialize(repeating: 0, count: 4)
        words[1] = 0b1011
        words[3] = .max // past the page count for the last 56 bits
        var released = false
        do {
            let bits = PageBits(pageCount: 200, mapping: words) { released = true }
            XCTAssertEqual(bits.count, 3 + 8)
            XCTAssertTrue(bits.test(64))
            XCTAssertFalse(bits.test(66))
            bits.set(0..<2)
            XCTAssertEqual(words[0], 0b11, "writes go to the mapping")
            XCTAssertEqual(bits.takeChanged(), [0])
        }
        XCTAssertTrue(released)
        words.deallocate()
    }

    // Raw file reads, independent of the Bitmap code.
    private func diskBits(_ path: String, word: Int) throws -> UInt64 {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var v: UInt64 = 0
        XCTAssertEqual(pread(fd, &v, 8, off_t(4096 + word * 8)), 8)
        return UInt64(littleEndian: v)
    }

    private func diskCount(_ path: String) throws -> Int {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return data.dropFirst(4096).reduce(0) { $0 + $1.nonzeroBitCount }
    }
}

/// A bitmap header is read from a file anyone may have
/// crafted (its checksum is no secret): every field is bounded before use.
final class CraftedHeaderTests: XCTestCase {
    func crafted(imageSize: UInt64, pageSize: UInt32, fileSize: off_t = 8192) throws -> String {
        let path = NSTemporaryDirectory() + "crafted-\(getpid())-\(imageSize)-\(pageSize).bitmap"
        var h = try Bitmap.encodeHeader(BitmapIdentity(pageSize: 4096, imageSize: 4096, url: "http://x/y"))
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { h[at + i] = b } }
        }
        put(pageSize, 16)
        put(imageSize, 24)
        let ps = UInt64(max(pageSize, 1))
        put(imageSize / ps + (imageSize % ps != 0 ? 1 : 0), 32)
        put(Bitmap.fnv1a(h), 40)
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        _ = h.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, 0) }
        ftruncate(fd, fileSize)
        close(fd)
        return path
    }

    func testHugeOrZeroGeometryIsACorruptHeaderNotATrap() throws {
        for (size, ps) in [(UInt64.max - 10, UInt32(4096)), (UInt64.max, UInt32(512)), (1 << 20, UInt32(0)),
                           (1 << 20, UInt32(3000)), (1 << 60, UInt32(4096)), (0, UInt32(4096)), (1 << 20, UInt32(1 << 30))] {
            let path = try crafted(imageSize: size, pageSize: ps)
            defer { unlink(path) }
            XCTAssertThrowsError(try Bitmap.inspect(path: path), "image \(size), page \(ps)") { e in
                XCTAssertEqual(e as? BitmapError, .corruptHeader(path: path))
            }
        }
    }

    func testTheLargestAllowedGeometryStillOpens() throws {
        // 2^20 pages of 4 KiB: the bitmap file holds 128 KiB of words (sparse).
        let path = try crafted(imageSize: 1 << 32, pageSize: 4096, fileSize: off_t(Bitmap.fileSize(pageCount: 1 << 20)))
        defer { unlink(path) }
        XCTAssertEqual(try Bitmap.inspect(path: path).identity.pageCount, 1 << 20)
    }
}
