// Write-ahead by region on the `cache` target: a write that waits for its
// intent bits sets the write-back (write-back mode) or unsettled
// (write-through) bits of the present pages of its region in the same cycle,
// so that the next writes into the region find theirs durable and go ahead
// at once. Correctness under crashes is the seeded model's
// (PageStateModelTests draws the region size per seed); this counts waits.
// Writes of absent pages on a device without dirty tracking do not wait at
// all: their intent bits only have to reach the disk before their present
// bits (write-ahead deferred, CachingRequests.mayDeferIntent).
import Foundation
import XCTest
@testable import UblkTarget

final class WriteAheadTests: XCTestCase {
    typealias World = PageStateModelTests.World
    static let pageSectors = PageStateModelTests.page / PageStateModelTests.sector

    /// A cache device whose pages are all present, listed dirty (as after
    /// earlier writes: a dirty bit stays until `sync`) and written back or
    /// settled, all of it persisted; without faults, FUA or timed full cycles
    /// (only FLUSH runs one).
    func warmWorld(_ mode: PageStateModelTests.Mode, region: UInt64) throws -> World {
        let w = try World(seed: 2, queues: 1, mode: mode, trackDirty: true)
        w.faulty = false
        w.setFaults(fsync: 0, write: 0)
        w.fake?.failPermille = 0
        w.fuaWrites = false
        w.handler.context.maxCacheBytes = 0
        w.handler.persistInterval = .max / 2
        _ = try w.readAll()
        w.handler.context.intentRegionPages = 1
        _ = try writesHeld(w, pages: Array(0..<PageStateModelTests.pages))
        try w.backingMatches()  // FLUSHes until every write-back bit is cleared
        XCTAssertEqual(w.handler.writeback?.count ?? 0, 0)
        XCTAssertEqual(w.handler.unsettled?.count ?? 0, 0)
        XCTAssertEqual(w.handler.dirty?.count, UInt64(PageStateModelTests.pages))
        w.handler.context.intentRegionPages = region
        w.handler.context.stats.pagesSetAhead = 0
        return w
    }

    /// Writes each page alone, one after the other; returns how many waited for an intent cycle.
    func writesHeld(_ w: World, pages: [Int]) throws -> UInt64 {
        let before = w.handler.context.stats.writesHeldForIntent
        for p in pages {
            w.submit(op: Op.write, sector: p * WriteAheadTests.pageSectors, count: WriteAheadTests.pageSectors)
            try w.quiesce()
        }
        return w.handler.context.stats.writesHeldForIntent - before
    }

    func testAWaitingWriteSetsItsRegionAheadSoTheNextWritesThereDoNotWait() throws {
        for mode in [PageStateModelTests.Mode.cacheBack, .cacheThrough] {
            let w = try warmWorld(mode, region: 16)
            XCTAssertEqual(try writesHeld(w, pages: [0]), 1, "\(mode): the first write into a region waits")
            XCTAssertEqual(w.handler.context.stats.pagesSetAhead, 15, "\(mode): the region's other 15 pages were set ahead")
            XCTAssertEqual(try writesHeld(w, pages: [3, 9, 15]), 0, "\(mode): pages of page 0's region go ahead at once")
            XCTAssertEqual(try writesHeld(w, pages: [16]), 1, "\(mode): page 16 is in the next region")
            try w.backingMatches()
        }
    }

    func testPageByPageEveryFirstWriteWaits() throws {
        for mode in [PageStateModelTests.Mode.cacheBack, .cacheThrough] {
            let w = try warmWorld(mode, region: 1)
            XCTAssertEqual(try writesHeld(w, pages: [0, 3, 9, 15]), 4, "\(mode)")
            XCTAssertEqual(w.handler.context.stats.pagesSetAhead, 0)
        }
    }

    func testAFullCycleClearsTheBitsSetAheadOfWritesThatNeverCame() throws {
        let w = try warmWorld(.cacheBack, region: 16)
        XCTAssertEqual(try writesHeld(w, pages: [0]), 1)
        w.submit(op: Op.flush, sector: 0, count: 0)
        try w.quiesce()
        // Page 0 itself is pending write-back until copied; the 15 set ahead are not.
        let wb = w.handler.writeback!
        XCTAssertEqual(wb.bits.count(in: 1..<16), 0, "the bits set ahead are cleared by the full cycle")
        XCTAssertEqual(try writesHeld(w, pages: [5]), 1, "and a write there waits again")
    }

    /// A cache device with nothing present and nothing persisted but its empty bitmaps.
    func coldWorld(_ mode: PageStateModelTests.Mode, trackDirty: Bool) throws -> World {
        let w = try World(seed: 2, queues: 1, mode: mode, trackDirty: trackDirty)
        w.faulty = false
        w.setFaults(fsync: 0, write: 0)
        w.fake?.failPermille = 0
        w.fuaWrites = false
        w.handler.context.maxCacheBytes = 0
        w.handler.persistInterval = .max / 2
        w.handler.context.intentRegionPages = 1
        return w
    }

    func testWritesOfAbsentPagesDoNotWaitWithoutDirtyTracking() throws {
        let w = try coldWorld(.cacheBack, trackDirty: false)
        XCTAssertEqual(try writesHeld(w, pages: [0, 3, 9, 15]), 0, "absent pages: the data goes first")
        XCTAssertEqual(w.handler.context.stats.writesDeferred, 4)
        XCTAssertEqual(w.handler.context.stats.intentCycles, 0, "no intent cycle ran")
        // A FLUSH makes their present bits durable: a page written again then waits for its
        // write-back bit (cleared by the copy) before its data replaces the copy the disk vouches for.
        w.submit(op: Op.flush, sector: 0, count: 0)
        try w.quiesce()
        XCTAssertEqual(try writesHeld(w, pages: [21]), 0, "an absent page beside the present ones still goes first")
        try w.backingMatches()
        XCTAssertEqual(try writesHeld(w, pages: [3]), 1, "a present page written again waits")
        // A FLUSH (an ordered full cycle) then a power loss: every write reads back.
        w.submit(op: Op.flush, sector: 0, count: 0)
        try w.quiesce()
        try w.powerLoss()
        _ = try w.readAll()  // checks every sector against what the FLUSH made durable
        try w.backingMatches()
    }

    func testWritesOfAbsentPagesWaitWithDirtyTracking() throws {
        // A `sync` may copy the new bytes at once: their dirty bit must be durable first.
        for mode in [PageStateModelTests.Mode.cacheBack, .cacheThrough] {
            let w = try coldWorld(mode, trackDirty: true)
            XCTAssertEqual(try writesHeld(w, pages: [0, 3]), 2, "\(mode)")
            XCTAssertEqual(w.handler.context.stats.writesDeferred, 0)
        }
    }

    func testWriteThroughWritesOfAbsentPagesDoNotWaitWithoutDirtyTracking() throws {
        let w = try coldWorld(.cacheThrough, trackDirty: false)
        XCTAssertEqual(try writesHeld(w, pages: [0, 3, 9]), 0)
        w.submit(op: Op.flush, sector: 0, count: 0)
        try w.quiesce()
        try w.powerLoss()
        _ = try w.readAll()
        try w.backingMatches()
    }

    /// A cache file that takes no writes (its file system full): read misses are
    /// served from the backing store, not failed, and nothing becomes present.
    func testAReadMissTheCacheFileCannotTakeReadsThrough() throws {
        for mode in [PageStateModelTests.Mode.cacheBack, .cacheThrough] {
            let w = try coldWorld(mode, trackDirty: true)
            XCTAssertNil(w.handler.admission, "every miss would be admitted")
            w.setFaults(fsync: 0, write: 1000)
            for page in [0, 5, 17] {
                w.submit(op: Op.read, sector: page * WriteAheadTests.pageSectors, count: WriteAheadTests.pageSectors)
                let tag = try XCTUnwrap(w.inFlight.first { $0.value.op == Op.read }?.key)
                try w.quiesce()  // checks the bytes read against the backing store's
                XCTAssertGreaterThanOrEqual(w.queues[0].lastResult(tag), 0, "\(mode): page \(page) read")
            }
            XCTAssertEqual(w.handler.context.stats.readsThrough, 3, "\(mode)")
            XCTAssertEqual(w.handler.bitmap.bits.count(in: 0..<UInt64(PageStateModelTests.pages)), 0, "\(mode): nothing present")
        }
    }
}
