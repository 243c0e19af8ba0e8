// CacheStore: binding, the afresh-or-refuse policy, the local bitmap and the
// live words (see CacheStore.swift and LiveBits.swift).
import Foundation
import Glibc
import XCTest
@testable import PageCache

final class CacheStoreTests: XCTestCase {
    var dir: TempDir!
    override func setUp() { dir = TempDir() }
    override func tearDown() { dir = nil }

    let size: UInt64 = 1 << 20 // 256 pages
    lazy var identity = BitmapIdentity(pageSize: 4096, imageSize: size, url: "http://example/image", etag: "\"one\"")

    func live(_ boot: String = "boot-A") -> LiveConfig {
        LiveConfig(directory: dir.file("run/live"), bootID: boot, required: true)
    }

    /// An http overlay's spec (writable: dirty and local open), or a read-only one.
    func httpSpec(writable: Bool = true, etag: String = "\"one\"", boot: String? = "boot-A") -> CacheStoreSpec {
        var id = identity
        id.etag = etag
        var s = CacheStoreSpec(cachePath: dir.file("c"), bitmapPath: dir.file("b"), identity: id)
        s.dirty = writable ? .open : .none
        s.local = writable ? .open : .refuse { "holds \($0) locally written pages: add it with --writable" }
        s.live = boot.map { live($0) }
        return s
    }

    /// Fills pages with the image's bytes (as a fetch would), marks them present
    /// (and local + dirty when `written`), and persists in the crash order.
    func fill(_ store: CacheStore, _ pages: Range<UInt64>, written: Bool = false, image: [UInt8]) throws {
        let ps = 4096
        for p in pages {
            let at = Int(p) * ps
            try image[at..<at + ps].withUnsafeBytes { try store.cache.write($0, at: UInt64(at)) }
        }
        store.present.markPresent(pages)
        if written {
            store.local?.markPresent(pages)
            store.dirty?.markPresent(pages)
        }
        try store.present.commit(syncing: store.cache)
        try store.local?.commit(syncing: store.cache)
        try store.dirty?.commit(syncing: store.cache)
    }

    func expectRefusal(_ spec: CacheStoreSpec, _ pattern: String, line: UInt = #line) {
        do {
            _ = try CacheStore.open(spec)
            XCTFail("opened; expected a refusal matching \(pattern)", line: line)
        } catch {
            let text = error.description
            XCTAssertFalse(text.contains("\n"), "one line: \(text)", line: line)
            XCTAssertTrue(text.range(of: pattern, options: .regularExpression) != nil, "'\(text)' !~ /\(pattern)/", line: line)
            guard case .refused = error else { return XCTFail("not a refusal: \(error)", line: line) }
        }
    }

    func readPage(_ path: String, _ page: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        _ = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4096, off_t(page * 4096)) }
        return b
    }

    // MARK: Binding

    func testFreshThenReusedAndBound() throws {
        let image = makeImage(size: Int(size))
        do {
            let s = try CacheStore.open(httpSpec())
            XCTAssertEqual(s.state, .fresh)
            XCTAssertEqual(s.cache.size, size, "size stays the image size")
            try fill(s, 0..<10, image: image)
        }
        var st = stat()
        XCTAssertEqual(stat(dir.file("c"), &st), 0)
        XCTAssertEqual(UInt64(st.st_size), CacheFile.trailerOffset(size: size) + 4096, "the trailer follows the image")
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        for suffix in ["", ".dirty", ".local"] {
            let info = try Bitmap.inspect(path: dir.file("b" + suffix))
            XCTAssertNotNil(info.binding, suffix)
        }
        let s = try CacheStore.open(httpSpec())
        XCTAssertEqual(s.state, .reused)
        XCTAssertEqual(s.present.count, 10)
        XCTAssertEqual(readPage(dir.file("c"), 3), Array(image[3 * 4096..<4 * 4096]))
    }

    func testDeletedCacheFileStartsAfreshWithoutLocalPages() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, image: image) }
        unlink(dir.file("c"))
        let s = try CacheStore.open(httpSpec())
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("missing"), why)
        XCTAssertEqual(s.present.count, 0, "the bitmap never vouches for a file it does not belong to")
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b")).present, 0, "zeroed on disk too")
    }

    func testTruncatedCacheFileStartsAfresh() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<200, image: image) }
        XCTAssertEqual(truncate(dir.file("c"), off_t(size / 2)), 0)
        let s = try CacheStore.open(httpSpec())
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("truncated"), why)
        XCTAssertEqual(s.present.count, 0)
    }

    func testTruncatedAndRegrownIsCaught() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, image: image) }
        let len = CacheFile.trailerOffset(size: size) + 4096
        XCTAssertEqual(truncate(dir.file("c"), 0), 0)
        XCTAssertEqual(truncate(dir.file("c"), off_t(len)), 0)
        let s = try CacheStore.open(httpSpec())
        guard case .startedAfresh = s.state else { return XCTFail("\(s.state)") }
        XCTAssertEqual(s.present.count, 0)
    }

    func testReplacedByAnotherFileOfTheSameSizeStartsAfresh() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, image: image) }
        let len = Int(CacheFile.trailerOffset(size: size)) + 4096
        let junk = makeImage(size: len, seed: 42)
        unlink(dir.file("c"))
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.file("c"), contents: Data(junk)))
        let s = try CacheStore.open(httpSpec())
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("trailer"), why)
        XCTAssertEqual(s.present.count, 0)
        XCTAssertEqual(readPage(dir.file("c"), 3), [UInt8](repeating: 0, count: 4096), "the junk is dropped")
    }

    func testRestoredOlderCopyOfTheCacheFileIsCaught() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, image: image) }
        // A backup of the cache file now, then one more run (a new generation).
        let backup = dir.file("c.bak")
        XCTAssertEqual(copyfile(dir.file("c"), backup), true)
        do { try fill(try CacheStore.open(httpSpec()), 10..<20, image: image) }
        unlink(dir.file("c"))
        XCTAssertEqual(rename(backup, dir.file("c")), 0)
        let s = try CacheStore.open(httpSpec())
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("older copy"), why)
        XCTAssertEqual(s.present.count, 0)
    }

    func testRestoredOlderBitmapIsCaught() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec(writable: false)), 0..<10, image: image) }
        XCTAssertTrue(copyfile(dir.file("b"), dir.file("b.bak")))
        do { _ = try CacheStore.open(httpSpec(writable: false)) }
        do { _ = try CacheStore.open(httpSpec(writable: false)) }
        unlink(dir.file("b"))
        XCTAssertEqual(rename(dir.file("b.bak"), dir.file("b")), 0)
        let s = try CacheStore.open(httpSpec(writable: false, boot: nil))
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("older copy"), why)
    }

    func testLostCacheFileWithLocalPagesIsRefusedAndNothingChanges() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, written: true, image: image) }
        unlink(dir.file("c"))
        expectRefusal(httpSpec(), "missing.*10 locally written pages; refusing")
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b.local")).present, 10, "the local bitmap is untouched")
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b")).present, 10)
        // Replaced, or truncated: the same.
        let len = Int(CacheFile.trailerOffset(size: size)) + 4096
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.file("c"), contents: Data(makeImage(size: len, seed: 7))))
        expectRefusal(httpSpec(), "no trailer.*locally written pages")
    }

    func testMixedSetsAreCaught() throws {
        let image = makeImage(size: Int(size))
        var other = httpSpec()
        other.cachePath = dir.file("c2")
        other.bitmapPath = dir.file("b2")
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, written: true, image: image) }
        do { try fill(try CacheStore.open(other), 0..<5, written: true, image: image) }
        // The local bitmap of set 2 beside set 1's bitmap.
        unlink(dir.file("b.local"))
        XCTAssertTrue(copyfile(dir.file("b2.local"), dir.file("b.local")))
        expectRefusal(httpSpec(), "local bitmap .*b.local belongs to another cache")
        // Another set's cache file under the name (nothing local at stake): afresh.
        var ro = httpSpec(writable: false)
        ro.local = .none
        unlink(dir.file("c"))
        XCTAssertTrue(copyfile(dir.file("c2"), dir.file("c")))
        let s = try CacheStore.open(ro)
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("another cache"), why)
    }

    func testMixedDirtyBitmapIsClearedNotTrusted() throws {
        let image = makeImage(size: Int(size))
        var other = httpSpec()
        other.cachePath = dir.file("c2")
        other.bitmapPath = dir.file("b2")
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, image: image) }
        do { try fill(try CacheStore.open(other), 0..<5, written: true, image: image) }
        unlink(dir.file("b.dirty"))
        XCTAssertTrue(copyfile(dir.file("b2.dirty"), dir.file("b.dirty")))
        let s = try CacheStore.open(httpSpec())
        XCTAssertEqual(s.dirty?.count, 0)
        XCTAssertTrue(s.notes.contains { $0.contains("belonged to another cache") }, "\(s.notes)")
        XCTAssertEqual(s.present.count, 10, "the set's own files still match")
    }

    // MARK: Class 1: local pages, apart from dirty ones

    func testRemoteChangeWithClearedDirtyButLocalPagesIsRefused() throws {
        let image = makeImage(size: Int(size))
        do { try fill(try CacheStore.open(httpSpec()), 0..<4, written: true, image: image) }
        // `dirty --clear` on the stopped device (or `sync`): nothing dirty, the pages stay local.
        do {
            let d = try CacheStore.openDirty(path: dir.file("b.dirty"), cachePath: nil, live: live())
            d.bitmap.markAbsent(0..<d.bitmap.pageCount)
            try d.bitmap.persist(d.bitmap.stage())
        }
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b.dirty")).present, 0)
        expectRefusal(httpSpec(etag: "\"two\""), "remote image changed.*4 locally written pages; refusing")
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b")).present, 4, "nothing was dropped")
        // Read-only: refused too (the overlay is not the remote's).
        expectRefusal(httpSpec(writable: false), "4 locally written pages: add it with --writable")
        // Without local pages, a changed remote starts afresh.
        var plain = httpSpec()
        plain.bitmapPath = dir.file("p")
        plain.cachePath = dir.file("pc")
        do { try fill(try CacheStore.open(plain), 0..<4, image: image) }
        plain.identity.etag = "\"two\""
        let s = try CacheStore.open(plain)
        XCTAssertEqual(s.state, .startedAfresh("the remote image changed (ETag \"one\" is now \"two\")"))
        XCTAssertEqual(s.present.count, 0)
    }

    func testLocalBitmapIsMadeFromDirtyAndPresentForOldCaches() throws {
        // A cache from before binding and the local bitmap: plain files.
        var dirtyID = identity
        dirtyID.kind = .dirty
        do {
            let cache = try CacheFile(path: dir.file("c"), size: size)
            let p = try Bitmap.open(path: dir.file("b"), identity: identity).bitmap
            let d = try Bitmap.open(path: dir.file("b.dirty"), identity: dirtyID).bitmap
            p.markPresent(0..<20)
            d.markPresent(10..<30) // 20..<30: a write whose data a crash lost (not present)
            try p.commit(syncing: cache)
            try d.commit(syncing: cache)
        }
        let s = try CacheStore.open(httpSpec())
        XCTAssertEqual(s.state, .reused, "an unbound cache of the right length is trusted once, and bound")
        XCTAssertEqual(s.local?.count, 10)
        XCTAssertTrue(s.local!.bits.allSet(10..<20))
        XCTAssertNotNil(try Bitmap.inspect(path: dir.file("b")).binding)
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b.local")).present, 10, "persisted at open")
    }

    func testReadOnlyOpenOfAnOldOverlayIsRefusedByItsDirtyPages() throws {
        var dirtyID = identity
        dirtyID.kind = .dirty
        do {
            let cache = try CacheFile(path: dir.file("c"), size: size)
            let d = try Bitmap.open(path: dir.file("b.dirty"), identity: dirtyID).bitmap
            d.markPresent(0..<3)
            try d.commit(syncing: cache)
        }
        expectRefusal(httpSpec(writable: false), "3 locally written pages")
    }

    // MARK: Class 4: the backing

    func backingSpec(_ backing: String, writeBack: Bool, fd: Int32) -> CacheStoreSpec {
        var id = BitmapIdentity(pageSize: 4096, imageSize: size, url: "file://" + backing)
        id.etag = BackingIdentity.describe(fd: fd)
        var s = CacheStoreSpec(cachePath: dir.file("c"), bitmapPath: dir.file("b"), identity: id)
        s.companionValidators = false
        s.sourceName = "the backing store"
        s.dirty = .open
        s.writeback = writeBack ? .open : .refuse { "\($0) pages not yet written back" }
        s.backing = BackingCheck(fd: fd, path: backing)
        s.live = live()
        return s
    }

    /// A new file (a new inode: written beside, renamed over) under `path`.
    func makeFile(_ path: String, _ bytes: [UInt8]) -> Int32 {
        XCTAssertTrue(FileManager.default.createFile(atPath: path + ".new", contents: Data(bytes)))
        XCTAssertEqual(rename(path + ".new", path), 0)
        return open(path, O_RDWR)
    }

    func testBackingReplacedByAnotherFileStartsAfresh() throws {
        let path = dir.file("backing")
        let image = makeImage(size: Int(size))
        var fd = makeFile(path, image)
        do { try fill(try CacheStore.open(backingSpec(path, writeBack: false, fd: fd)), 0..<64, image: image) }
        close(fd)
        do {
            fd = open(path, O_RDWR)
            let s = try CacheStore.open(backingSpec(path, writeBack: false, fd: fd))
            XCTAssertEqual(s.state, .reused, "same file, same content")
            close(fd)
        }
        // Another file (a new inode) under the same name, same size.
        fd = makeFile(path, makeImage(size: Int(size), seed: 99))
        do {
            let s = try CacheStore.open(backingSpec(path, writeBack: false, fd: fd))
            guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
            XCTAssertTrue(why.contains("replaced"), why)
            XCTAssertEqual(s.present.count, 0)
            try fill(s, 0..<64, image: makeImage(size: Int(size), seed: 99))
        }
        let s = try CacheStore.open(backingSpec(path, writeBack: false, fd: fd))
        XCTAssertEqual(s.state, .reused)
        close(fd)
    }

    func testBackingRewrittenInPlaceIsCaughtByContent() throws {
        let path = dir.file("backing")
        let image = makeImage(size: Int(size))
        let fd = makeFile(path, image)
        defer { close(fd) }
        do { try fill(try CacheStore.open(backingSpec(path, writeBack: true, fd: fd)), 0..<256, image: image) }
        // Same inode, other bytes (cp over it, dd conv=notrunc).
        let other = makeImage(size: Int(size), seed: 5)
        _ = other.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        let s = try CacheStore.open(backingSpec(path, writeBack: true, fd: fd))
        guard case .startedAfresh(let why) = s.state else { return XCTFail("\(s.state)") }
        XCTAssertTrue(why.contains("differs from the cache"), why)
        XCTAssertEqual(s.present.count, 0)
    }

    func testBackingReplacedWithWriteBackPagesIsRefused() throws {
        let path = dir.file("backing")
        let image = makeImage(size: Int(size))
        var fd = makeFile(path, image)
        do {
            let s = try CacheStore.open(backingSpec(path, writeBack: true, fd: fd))
            try fill(s, 0..<64, image: image)
            s.writeback!.markPresent(3..<5)
            try s.writeback!.commit(syncing: s.cache)
        }
        close(fd)
        fd = makeFile(path, makeImage(size: Int(size), seed: 99))
        defer { close(fd) }
        expectRefusal(backingSpec(path, writeBack: true, fd: fd), "replaced.*2 pages not written back.*refusing")
        // In place, same inode: caught by content, refused all the same.
        close(fd)
        fd = makeFile(path, image)
        var spec = backingSpec(path, writeBack: true, fd: fd)
        spec.identity.etag = try Bitmap.inspect(path: dir.file("b")).identity.etag // as if the inode matched
        let other = makeImage(size: 4096 * 64, seed: 3)
        _ = other.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        expectRefusal(spec, "differs from the cache.*not written back")
        // A lost cache file with write-back pages: refused.
        _ = image.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        unlink(dir.file("c"))
        expectRefusal(spec, "missing.*2 pages not written back")
    }

    func testWriteBackPagesAreNotSampled() throws {
        // A page pending write-back differs from the backing by design.
        let path = dir.file("backing")
        let image = makeImage(size: Int(size))
        let fd = makeFile(path, image)
        defer { close(fd) }
        do {
            let s = try CacheStore.open(backingSpec(path, writeBack: true, fd: fd))
            try fill(s, 0..<256, image: makeImage(size: Int(size), seed: 1)) // every page differs
            s.writeback!.markPresent(0..<256)
            try s.writeback!.commit(syncing: s.cache)
        }
        let s = try CacheStore.open(backingSpec(path, writeBack: true, fd: fd))
        XCTAssertEqual(s.state, .reused)
        XCTAssertEqual(s.writeback?.count, 256)
    }

    // MARK: Class 11: live words survive the process, not the boot

    func testLiveBitsSurviveAKilledServerInTheSameBoot() throws {
        let image = makeImage(size: Int(size))
        do {
            let s = try CacheStore.open(httpSpec())
            for p in 0..<8 { try image[p * 4096..<(p + 1) * 4096].withUnsafeBytes { try s.cache.write($0, at: UInt64(p * 4096)) } }
            s.present.markPresent(0..<8)
            s.local!.markPresent(2..<4)
            s.dirty!.markPresent(2..<4)
            // No persist: the process dies here (nothing more reaches the bitmap files).
        }
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b")).present, 0, "the disk lags")
        XCTAssertEqual(try CacheStore.inspect(bitmapPath: dir.file("b"), cachePath: dir.file("c"), live: live()).present.present, 8,
                       "status sees the live bits")
        let s = try CacheStore.open(httpSpec())
        XCTAssertTrue(s.adoptedLive)
        XCTAssertEqual(s.present.count, 8)
        XCTAssertEqual(s.local?.count, 2)
        XCTAssertEqual(s.dirty?.count, 2)
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b")).present, 8, "persisted at open, after the data sync")
        XCTAssertEqual(try Bitmap.inspect(path: dir.file("b.local")).present, 2)
    }

    func testLiveBitsOfAnotherBootAreIgnored() throws {
        do {
            let s = try CacheStore.open(httpSpec(boot: "boot-A"))
            s.present.markPresent(0..<8)
            s.local!.markPresent(0..<8)
        }
        let s = try CacheStore.open(httpSpec(boot: "boot-B"))
        XCTAssertFalse(s.adoptedLive)
        XCTAssertEqual(s.present.count, 0)
        XCTAssertEqual(s.local?.count, 0)
    }

    func testLiveBitsOfAnotherCopyOfTheBitmapAreIgnored() throws {
        do { _ = try CacheStore.open(httpSpec(writable: false)) }
        XCTAssertTrue(copyfile(dir.file("b"), dir.file("b.bak")))
        XCTAssertTrue(copyfile(dir.file("c"), dir.file("c.bak")))
        do {
            let s = try CacheStore.open(httpSpec(writable: false))
            s.present.markPresent(0..<8) // killed with these in the live file only
        }
        // The set is restored from its backup (an older generation): the live bits are not its.
        for n in ["b", "c"] { unlink(dir.file(n)); XCTAssertEqual(rename(dir.file(n + ".bak"), dir.file(n)), 0) }
        let s = try CacheStore.open(httpSpec(writable: false))
        XCTAssertFalse(s.adoptedLive)
        XCTAssertEqual(s.present.count, 0)
    }

    func testCleanCloseRemovesTheLiveFileAndFilesAre0600() throws {
        let image = makeImage(size: Int(size))
        var path = ""
        do {
            let s = try CacheStore.open(httpSpec())
            path = s.present.live!.path
            var st = stat()
            XCTAssertEqual(stat(path, &st), 0)
            XCTAssertEqual(st.st_mode & 0o777, 0o600)
            XCTAssertEqual(stat(live().directory, &st), 0)
            XCTAssertEqual(st.st_mode & 0o777, 0o700)
            try fill(s, 0..<3, image: image)
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: path), "everything persisted: nothing live to keep")
    }

    func testLiveWordsKeepThePageBitsBehaviour() throws {
        let s = try CacheStore.open(httpSpec())
        let bits = s.present.bits
        bits.set(5..<70)
        XCTAssertEqual(bits.count, 65)
        XCTAssertEqual(bits.takeChanged(), [0, 1])
        XCTAssertEqual(bits.nextClear(in: 5..<100), 70)
        bits.clear(5..<6)
        XCTAssertEqual(bits.count(in: 0..<256), 64)
    }

    // MARK: Stopped devices

    func testSyncOfAStoppedDeviceRefusesACacheFileOfAnotherSet() throws {
        let image = makeImage(size: Int(size))
        var other = httpSpec()
        other.cachePath = dir.file("c2")
        other.bitmapPath = dir.file("b2")
        do { try fill(try CacheStore.open(httpSpec()), 0..<10, written: true, image: image) }
        do { try fill(try CacheStore.open(other), 0..<5, written: true, image: image) }
        XCTAssertNoThrow(try CacheStore.openDirty(path: dir.file("b.dirty"), cachePath: dir.file("c"), live: live()))
        XCTAssertThrowsError(try CacheStore.openDirty(path: dir.file("b.dirty"), cachePath: dir.file("c2"), live: live())) { e in
            XCTAssertTrue("\(e)".contains("does not belong"), "\(e)")
        }
        unlink(dir.file("b.dirty"))
        XCTAssertTrue(copyfile(dir.file("b2.dirty"), dir.file("b.dirty")))
        XCTAssertThrowsError(try CacheStore.openDirty(path: dir.file("b.dirty"), cachePath: nil, live: live())) { e in
            XCTAssertTrue("\(e)".contains("belongs to another cache"), "\(e)")
        }
    }
}

/// cp SRC DST (a new file).
func copyfile(_ src: String, _ dst: String) -> Bool {
    guard let data = FileManager.default.contents(atPath: src) else { return false }
    return FileManager.default.createFile(atPath: dst, contents: data)
}
