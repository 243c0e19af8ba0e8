import XCTest
@testable import PageCache

final class FetchPlannerTests: XCTestCase {
    let ps = 4096
    func planner(pages: UInt64 = 4096, maxRun: Int = 4 << 20, initialRA: Int = 0, maxRA: Int = 0,
                 active: Int = 8) -> (FetchPlanner, PageBits) {
        let p = FetchPlanner(imageSize: pages * UInt64(ps), pageSize: ps, maxRunBytes: maxRun,
                             initialReadaheadBytes: initialRA, maxReadaheadBytes: maxRA, maxActiveRuns: active)
        return (p, PageBits(pageCount: pages))
    }
    func off(_ page: UInt64) -> UInt64 { page * UInt64(ps) }
    func len(_ pages: Int) -> Int { pages * ps }

    func testHitNeedsNothing() {
        let (p, bits) = planner()
        bits.set(0..<100)
        let plan = p.plan(offset: off(10), length: len(20), context: 1, present: bits)
        XCTAssertTrue(plan.isHit)
        XCTAssertEqual(plan.presentPages, 20)
        XCTAssertEqual(p.startableRuns(), [])
        XCTAssertEqual(p.waiterCount, 0)
        // Zero-length and past-the-end reads are hits too.
        XCTAssertTrue(p.plan(offset: 0, length: 0, context: 2, present: bits).isHit)
        XCTAssertTrue(p.plan(offset: off(5000), length: 4096, context: 3, present: bits).isHit)
    }

    func testUnalignedReadTouchesEveryPageItOverlaps() {
        let (p, bits) = planner()
        let plan = p.plan(offset: off(3) + 100, length: ps, context: 1, present: bits)
        XCTAssertEqual(plan.newPages, 2)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[3, 2]])
        XCTAssertEqual(runs[0].offset, off(3))
        XCTAssertEqual(runs[0].length, len(2))
    }

    func testMissesCoalesceAroundPresentPages() {
        let (p, bits) = planner()
        bits.set(10..<12)
        bits.set(20..<21)
        let plan = p.plan(offset: off(0), length: len(32), context: 7, present: bits)
        XCTAssertEqual(plan.presentPages, 3)
        XCTAssertEqual(plan.newPages, 29)
        XCTAssertEqual(plan.runsWaitedOn, 3)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[0, 10], [12, 8], [21, 11]])
        XCTAssertEqual(p.complete(run: runs[0].id, success: true), RunOutcome())
        XCTAssertEqual(p.complete(run: runs[2].id, success: true), RunOutcome())
        XCTAssertEqual(p.complete(run: runs[1].id, success: true), RunOutcome(satisfied: [7]))
        XCTAssertEqual(p.waiterCount, 0)
        XCTAssertEqual(p.runCount, 0)
    }

    func testRunsAreCappedAtMaxRunBytes() {
        let (p, bits) = planner(pages: 4096, maxRun: 4 << 20) // 1024 pages per run
        let plan = p.plan(offset: 0, length: 5 << 20, context: 1, present: bits)
        XCTAssertEqual(plan.newPages, 1280)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[0, 1024], [1024, 256]])
        XCTAssertEqual(runs.map(\.length), [4 << 20, 1 << 20])
    }

    func testPagesInFlightAreNeverFetchedTwice() {
        let (p, bits) = planner()
        let a = p.plan(offset: 0, length: len(16), context: 1, present: bits)
        XCTAssertEqual(a.newPages, 16)
        let started = p.startableRuns()
        XCTAssertEqual(started.count, 1)
        // Overlaps the started run on pages 8..<16, new on 16..<24.
        let b = p.plan(offset: off(8), length: len(16), context: 2, present: bits)
        XCTAssertEqual(b.inFlightPages, 8)
        XCTAssertEqual(b.newPages, 8)
        XCTAssertEqual(b.runsWaitedOn, 2)
        // Entirely inside the started run: waits, fetches nothing.
        let c = p.plan(offset: off(2), length: len(2), context: 3, present: bits)
        XCTAssertEqual(c.inFlightPages, 2)
        XCTAssertEqual(c.newPages, 0)
        let more = p.startableRuns()
        XCTAssertEqual(more.map { [$0.firstPage, $0.pageCount] }, [[16, 8]], "a started run is not extended")
        bits.set(0..<16)
        XCTAssertEqual(p.complete(run: started[0].id, success: true), RunOutcome(satisfied: [1, 3]))
        bits.set(16..<24)
        XCTAssertEqual(p.complete(run: more[0].id, success: true), RunOutcome(satisfied: [2]))
    }

    func testAdjacentMissesExtendAPlannedRun() {
        let (p, bits) = planner()
        _ = p.plan(offset: off(8), length: len(4), context: 1, present: bits)   // 8..<12
        _ = p.plan(offset: off(12), length: len(4), context: 2, present: bits)  // extends right
        _ = p.plan(offset: off(4), length: len(4), context: 3, present: bits)   // extends left
        _ = p.plan(offset: off(6), length: len(8), context: 4, present: bits)   // inside
        XCTAssertEqual(p.plannedRunCount, 1)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[4, 12]])
        bits.set(4..<16)
        XCTAssertEqual(p.complete(run: runs[0].id, success: true), RunOutcome(satisfied: [1, 2, 3, 4]))
    }

    func testExtensionRespectsTheCap() {
        let (p, bits) = planner(maxRun: 8 * 4096)
        _ = p.plan(offset: 0, length: len(6), context: 1, present: bits)
        _ = p.plan(offset: off(6), length: len(6), context: 2, present: bits)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[0, 8], [8, 4]])
    }

    func testActiveRunLimit() {
        let (p, bits) = planner(active: 2)
        for i in 0..<5 { _ = p.plan(offset: off(UInt64(i) * 100), length: ps, context: UInt64(i), present: bits) }
        let first = p.startableRuns()
        XCTAssertEqual(first.map(\.firstPage), [0, 100])
        XCTAssertEqual(p.startableRuns(), [])
        bits.set(0..<1)
        XCTAssertEqual(p.complete(run: first[0].id, success: true).satisfied, [0])
        XCTAssertEqual(p.startableRuns().map(\.firstPage), [200])
    }

    func testFailureFailsEachWaiterOnce() {
        let (p, bits) = planner()
        bits.set(8..<9)
        _ = p.plan(offset: 0, length: len(16), context: 1, present: bits)       // runs 0..<8, 9..<16
        _ = p.plan(offset: off(10), length: len(2), context: 2, present: bits)  // inside 9..<16
        let runs = p.startableRuns()
        XCTAssertEqual(runs.count, 2)
        XCTAssertEqual(p.complete(run: runs[0].id, success: false), RunOutcome(failed: [1]))
        XCTAssertEqual(p.complete(run: runs[1].id, success: true), RunOutcome(satisfied: [2]),
                       "waiter 1 already failed: not reported again")
        XCTAssertEqual(p.waiterCount, 0)
        // After a failure the pages are missing again and planned afresh.
        let again = p.plan(offset: 0, length: len(4), context: 3, present: bits)
        XCTAssertEqual(again.newPages, 4)
    }

    func testProgressReleasesWaitersEarly() {
        let (p, bits) = planner()
        _ = p.plan(offset: 0, length: len(64), context: 1, present: bits)
        let run = p.startableRuns()[0]
        let early = p.plan(offset: off(2), length: len(2), context: 2, present: bits)
        XCTAssertEqual(early.inFlightPages, 2)
        bits.set(0..<3)
        XCTAssertEqual(p.progress(run: run.id, pagesDone: 3), RunOutcome())
        bits.set(3..<4)
        XCTAssertEqual(p.progress(run: run.id, pagesDone: 4), RunOutcome(satisfied: [2]))
        bits.set(4..<64)
        XCTAssertEqual(p.complete(run: run.id, success: true), RunOutcome(satisfied: [1]))
    }

    func testReadaheadGrowsOnSequentialAndResetsOnRandom() {
        // 128 KiB initial, 1 MiB max: 32 → 64 → 128 → 256 pages.
        let (p, bits) = planner(pages: 100_000, initialRA: 128 << 10, maxRA: 1 << 20)
        func read(_ page: UInt64, _ pages: Int = 8) -> ReadPlan {
            let plan = p.plan(offset: off(page), length: len(pages), context: page, present: bits)
            // Everything planned completes at once.
            for run in p.startableRuns() {
                bits.set(run.firstPage..<run.firstPage + run.pageCount)
                _ = p.complete(run: run.id, success: true)
            }
            return plan
        }
        let r0 = read(0)
        XCTAssertEqual(r0.readaheadPages, 0, "the first read is not known to be sequential")
        let r1 = read(8)
        XCTAssertEqual(p.readaheadWindowPages, 32)
        XCTAssertEqual(r1.newPages, 8)
        XCTAssertEqual(r1.readaheadPages, 32)           // 16..<48
        let r2 = read(16)                                // a hit; lead 24..<48 is below 64/2: refill
        XCTAssertEqual(p.readaheadWindowPages, 64)
        XCTAssertTrue(r2.isHit)
        XCTAssertEqual(r2.readaheadPages, 40)            // 48..<88 (24 + 64)
        _ = read(24); _ = read(32); _ = read(40)
        XCTAssertEqual(p.readaheadWindowPages, 256, "capped at 1 MiB")
        // Random access resets the window and plans no readahead.
        let r = read(50_000)
        XCTAssertEqual(p.readaheadWindowPages, 0)
        XCTAssertEqual(r.readaheadPages, 0)
        XCTAssertEqual(r.newPages, 8)
    }

    /// -q N: each queue's reads are a stream of their own; hits another
    /// queue served are reported with `hint` and grow that stream's window.
    func testStreamsAreSequentialApartAndHintsGrowTheirWindows() {
        let (p, bits) = planner(pages: 100_000, initialRA: 128 << 10, maxRA: 1 << 20)
        _ = p.plan(offset: off(0), length: len(8), context: 1, present: bits, stream: 1)
        // Stream 0 reads elsewhere in between: stream 1's next read is still sequential.
        _ = p.plan(offset: off(50_000), length: len(8), context: 2, present: bits, stream: 0)
        let r = p.plan(offset: off(8), length: len(8), context: 3, present: bits, stream: 1)
        XCTAssertEqual(r.readaheadPages, 32, "stream 1 continues: readahead planned")
        XCTAssertEqual(p.readaheadWindowPages, 0, "stream 0's window is its own")
        for run in p.startableRuns() {
            bits.set(run.firstPage..<run.firstPage + run.pageCount)
            _ = p.complete(run: run.id, success: true)
        }
        // Hits on stream 1, seen only as hints: the window doubles and is refilled ahead.
        let h = p.hint(offset: off(16), length: len(8), stream: 1, present: bits)
        XCTAssertTrue(h.isHit)
        XCTAssertEqual(h.readaheadPages, 40, "48..<88, as a planned hit would have")
        XCTAssertEqual(p.waiterCount, 0, "a hint waits for nothing")
    }

    func testReadaheadStopsAtTheImageEnd() {
        let (p, bits) = planner(pages: 100, initialRA: 1 << 20, maxRA: 4 << 20)
        _ = p.plan(offset: off(80), length: len(4), context: 1, present: bits)
        let plan = p.plan(offset: off(84), length: len(4), context: 2, present: bits)
        XCTAssertEqual(plan.newPages, 4)
        XCTAssertEqual(plan.readaheadPages, 12)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[80, 20]], "one run, demand and readahead merged")
        XCTAssertEqual(runs[0].offset + UInt64(runs[0].length), off(100))
    }

    func testReadaheadStopsBeforeAPageWhoseFetchFailedItsCheck() {
        let (p, bits) = planner(pages: 100, initialRA: 1 << 20, maxRA: 4 << 20)
        p.stopReadahead(before: 90)
        _ = p.plan(offset: off(80), length: len(4), context: 1, present: bits)
        let plan = p.plan(offset: off(84), length: len(4), context: 2, present: bits)
        XCTAssertEqual(plan.readaheadPages, 2, "88 and 89: not 90 nor after it")
        XCTAssertEqual(p.startableRuns().map { [$0.firstPage, $0.pageCount] }, [[80, 10]])
        // A read of the page itself still fetches it.
        let own = p.plan(offset: off(90), length: len(1), context: 3, present: bits)
        XCTAssertEqual(own.newPages, 1)
        // Once present again, readahead goes through.
        p.resumeReadahead(90..<91)
        XCTAssertEqual(p.readaheadStops, [])
        let (q, qb) = planner(pages: 100, initialRA: 1 << 20, maxRA: 4 << 20)
        for page in [UInt64(10), 20, 30] { q.stopReadahead(before: page) }
        q.resumeReadahead(15..<25)
        XCTAssertEqual(q.readaheadStops, [10, 30])
        _ = qb
    }

    func testPartialLastPageLength() {
        let p = FetchPlanner(imageSize: 10_000, pageSize: 4096)
        let bits = PageBits(pageCount: p.pageCount)
        XCTAssertEqual(p.pageCount, 3)
        _ = p.plan(offset: 8000, length: 2000, context: 1, present: bits)
        let runs = p.startableRuns()
        XCTAssertEqual(runs.map { [$0.firstPage, $0.pageCount] }, [[1, 2]])
        XCTAssertEqual(runs[0].length, 10_000 - 4096)
    }

    func testHugeReadIsPlannedPerRunNotPerPage() {
        // 64 GiB image, a 1 GiB read with every other 4 MiB chunk present.
        let pages: UInt64 = 16 << 20
        let (p, bits) = planner(pages: pages)
        for chunk in stride(from: UInt64(0), to: 262_144, by: 2048) { bits.set(chunk..<chunk + 1024) }
        let start = monotonicNanos()
        let plan = p.plan(offset: 0, length: 1 << 30, context: 1, present: bits)
        let elapsed = monotonicNanos() - start
        XCTAssertEqual(plan.presentPages, 131_072)
        XCTAssertEqual(plan.newPages, 131_072)
        XCTAssertEqual(p.plannedRunCount, 128)
        XCTAssertLessThan(elapsed, 50_000_000, "planning took \(elapsed / 1000) µs")
    }

    // MARK: Writes that cover pages whole

    func testWholePageWritesClaimInsteadOfFetching() {
        let (p, bits) = planner()
        bits.set(4..<5)
        // Pages 2..<8, page 4 present: two claims, no run to fetch.
        let claims = p.claimForWrite(offset: off(2), length: len(6), present: bits)
        XCTAssertEqual(claims?.count, 2)
        XCTAssertEqual(p.plannedRunCount, 0)
        XCTAssertEqual(p.startableRuns(), [])
        XCTAssertEqual(p.activeRunCount, 0, "claims do not take fetch slots")
        // A read of a claimed page waits for the claim and fetches nothing.
        let plan = p.plan(offset: off(3), length: len(1), context: 9, present: bits)
        XCTAssertFalse(plan.isHit)
        XCTAssertEqual(plan.inFlightPages, 1)
        XCTAssertEqual(p.plannedRunCount, 0)
        // Another write of a claimed page must wait too (no second claim).
        XCTAssertNil(p.claimForWrite(offset: off(3), length: len(1), present: bits))
        bits.set(2..<8)
        XCTAssertEqual(p.complete(run: claims![1], success: true), RunOutcome())
        XCTAssertEqual(p.complete(run: claims![0], success: true), RunOutcome(satisfied: [9]))
        XCTAssertEqual(p.runCount, 0)
        XCTAssertEqual(p.activeRunCount, 0)
    }

    func testPartialPagesAndInFlightPagesAreNotClaimed() {
        let (p, bits) = planner(pages: 64)
        // Unaligned head or tail on a missing page: fetch first.
        XCTAssertNil(p.claimForWrite(offset: off(1) + 512, length: len(2), present: bits))
        XCTAssertNil(p.claimForWrite(offset: off(1), length: len(2) - 512, present: bits))
        // ...but not when that page is present.
        bits.set(1..<2)
        bits.set(3..<4)
        XCTAssertEqual(p.claimForWrite(offset: off(1) + 512, length: len(3) - 1024, present: bits)?.count, 1)
        // A page a fetch is filling is never claimed.
        _ = p.plan(offset: off(10), length: len(4), context: 1, present: bits)
        XCTAssertNil(p.claimForWrite(offset: off(8), length: len(4), present: bits))
        // Fully present: nothing to claim.
        bits.set(20..<30)
        XCTAssertEqual(p.claimForWrite(offset: off(20) + 7, length: 100, present: bits), [])
        // The image's last page may be short: a write to the image's end covers it.
        let q = FetchPlanner(imageSize: off(4) + 1000, pageSize: ps, maxRunBytes: 1 << 20)
        let qb = PageBits(pageCount: 5)
        XCTAssertEqual(q.claimForWrite(offset: off(4), length: 1024, present: qb)?.count, 1)
    }

    func testAFailedClaimFailsItsWaiters() {
        let (p, bits) = planner()
        let claims = p.claimForWrite(offset: off(0), length: len(4), present: bits)!
        _ = p.plan(offset: off(1), length: len(1), context: 5, present: bits)
        XCTAssertEqual(p.complete(run: claims[0], success: false), RunOutcome(failed: [5]))
        XCTAssertEqual(p.waiterCount, 0)
    }
}
