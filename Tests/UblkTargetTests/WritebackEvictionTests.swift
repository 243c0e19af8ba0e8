// The write-back copy's and eviction's state, without a queue: which run is
// copied next (write-back pages the cache holds, not copied yet, no write
// filling them), what a write during a copy does to it, and which pages
// eviction clears (least recently used chunks first, never what must stay)
// and when they are punched (at once with one queue; requests wait for the
// punches).
import Foundation
import Glibc
import PageCache
import XCTest
@testable import UblkTarget

final class WritebackEvictionTests: XCTestCase {
    func bits(_ count: UInt64, _ ranges: Range<UInt64>...) -> PageBits {
        let b = PageBits(pageCount: count)
        for r in ranges { _ = b.set(r) }
        return b
    }

    func buffer(_ bytes: Int) -> UnsafeMutableRawPointer { malloc(bytes)! }

    func testWritebackCopiesPresentWritebackRunsAndSkipsWhatWritesFill() {
        // Only what the cache holds: 10..<15, not 15..<20.
        var w = WritebackCopy(pageCount: 1024)
        XCTAssertEqual(w.next(writeback: bits(1024, 10..<20), present: bits(1024, 0..<15), busy: { _ in false }), 10..<15)
        // A write fills the run: none now, and the search moves past it.
        var v = WritebackCopy(pageCount: 1024)
        let wb = bits(1024, 500..<900), all = bits(1024, 0..<1024)
        XCTAssertNil(v.next(writeback: wb, present: all, busy: { $0.overlaps(500..<501) }))
        // At most runPages per copy, from where the search stopped, then from the start again.
        XCTAssertEqual(v.next(writeback: wb, present: all, busy: { _ in false }), 500 + WritebackCopy.runPages..<900)
        XCTAssertEqual(v.next(writeback: wb, present: all, busy: { _ in false }), 500..<500 + WritebackCopy.runPages)
    }

    func testACopyRunsToTheEndThenItsPagesWaitForACycle() {
        var w = WritebackCopy(pageCount: 1024)
        w.begin(10..<12, buffer: buffer(8192), offset: 40960, length: 8192)
        XCTAssertTrue(w.isCopying)
        XCTAssertNil(w.next(writeback: bits(64, 0..<64), present: bits(64, 0..<64), busy: { _ in false }), "one copy at a time")
        guard case .write(_, let offset, let length) = w.read(8192) else { return XCTFail("the read should lead to the write") }
        XCTAssertEqual(offset, 40960); XCTAssertEqual(length, 8192)
        guard case .write(_, let rest, let left) = w.wrote(4096, busy: { _ in false }) else { return XCTFail("a short write goes on") }
        XCTAssertEqual(rest, 40960 + 4096); XCTAssertEqual(left, 4096)
        XCTAssertEqual(w.wrote(4096, busy: { _ in false }), .copied)
        XCTAssertFalse(w.isCopying)
        XCTAssertEqual(w.takeCopied(), [10..<12])
        XCTAssertFalse(w.hasCopied)
        XCTAssertEqual(w.takeCopied(), [])
    }

    func testAWriteDuringTheCopyKeepsThePagesPending() {
        var w = WritebackCopy(pageCount: 1024)
        w.begin(10..<12, buffer: buffer(8192), offset: 40960, length: 8192)
        w.written(11..<12)
        _ = w.read(8192)
        XCTAssertEqual(w.wrote(8192, busy: { _ in false }), .copied)
        XCTAssertFalse(w.hasCopied, "a copy a write overtook does not clear the bits")
        // A write after the copy: the copied run loses those pages.
        w.begin(20..<24, buffer: buffer(16384), offset: 81920, length: 16384)
        _ = w.read(16384)
        _ = w.wrote(16384, busy: { _ in false })
        w.written(21..<22)
        XCTAssertEqual(w.takeCopied(), [20..<21, 22..<24])
    }

    func testAFailedOrShortCopyEndsWithItsBitsSet() {
        var w = WritebackCopy(pageCount: 1024)
        w.begin(0..<2, buffer: buffer(8192), offset: 0, length: 8192)
        XCTAssertEqual(w.read(4096), .ended, "a short read is tried again later")
        w.begin(0..<2, buffer: buffer(8192), offset: 0, length: 8192)
        _ = w.read(8192)
        XCTAssertEqual(w.wrote(-EIO, busy: { _ in false }), .ended)
        XCTAssertFalse(w.hasCopied)
        XCTAssertFalse(w.isCopying)
    }

    func testEvictionClearsTheLeastRecentlyUsedChunksFirstAndKeepsWhatMustStay() throws {
        let dir = NSTemporaryDirectory() + "evict-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let id = BitmapIdentity(kind: .present, pageSize: 4096, imageSize: 4 << 20, url: "http://h/a.img", etag: "\"1\"")
        let b = try Bitmap.open(path: dir + "/present", identity: id).0
        _ = b.markPresent(0..<1024)  // 4 chunks of 256 pages, all present
        var e = Eviction()
        // Chunk 2 is the oldest, then 0; page 520 (chunk 2) must stay.
        let left = e.choose(b, uses: [5, 9, 1, 7], pagesPerChunk: 256, pageSize: 4096, present: 1024 * 4096,
                            target: 600 * 4096, mustKeep: { $0 == 520 }, trace: nil)
        XCTAssertEqual(e.cleared, [512..<520, 521..<768, 0..<256])
        XCTAssertEqual(left, (1024 - 255 - 256) * 4096)
        XCTAssertTrue(b.test(520) && !b.test(512) && !b.test(0) && b.test(256) && b.test(768))
        XCTAssertEqual(e.takeCleared(), [512..<520, 521..<768, 0..<256])
        XCTAssertTrue(e.cleared.isEmpty)
    }

    func testWithOneQueueDurableRangesArePunchedAtOnceAndRequestsWaitForThePunches() {
        var e = Eviction()
        XCTAssertEqual(e.durable([3..<5], mesh: nil), [3..<5])
        e.punchIssued(); e.punchIssued()
        XCTAssertTrue(e.isPunching)
        let r = Request(tag: 7, op: Op.read, flags: 0, offset: 0, length: 4096, buffer: buffer(4096))
        e.wait(r)
        XCTAssertTrue(e.takeWaiting().isEmpty, "requests wait while punches are in flight")
        XCTAssertTrue(e.punchCompleted().isEmpty)
        XCTAssertEqual(e.punchCompleted().map(\.tag), [7])
        XCTAssertFalse(e.isPunching)
    }
}
