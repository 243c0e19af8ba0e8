// The background fill (CachingFill.swift: `hydrate`, profile replay) on the
// host, through the page-state model's world (PageStateModelTests.World: a
// FakeQueue over real files, a FakeFetcher serving a fixed remote, the
// reference of what each sector may read as):
// - hydration ends with every page present, the device reading exactly what
//   the reference says (the remote's bytes, or what was written locally: a
//   local page is never fetched over), in coalesced runs;
// - the same with random reads, writes, FLUSH, `sync`, kill -9 and power
//   losses while it runs (each restart hydrates again), 1-4 queues by the
//   seed, every target mode;
// - a read miss during hydration starts its own run at once (a slot stays free);
// - at most `maxInFlight` gaps of the fill at once, never a run planned behind;
// - stop, failure after a pass that gains nothing, refusal on a bounded cache;
// - the token bucket, and planFill leaving readers' readahead alone.
import Foundation
import Glibc
import PageCache
import XCTest
@testable import UblkTarget
@testable import UblkCLI

final class FillTests: XCTestCase {
    typealias World = PageStateModelTests.World

    /// A world without injected faults or an eviction bound (hydration refuses a bounded cache).
    func quietWorld(seed: UInt64, queues: Int? = nil) throws -> World {
        let w = try World(seed: seed, queues: queues)
        w.faulty = false
        w.setFaults(fsync: 0, write: 0)
        w.fake?.failPermille = 0
        w.evictBound = 0
        w.handler.context.maxCacheBytes = 0
        return w
    }

    func status(_ w: World) throws -> FillStatus {
        let reply = w.handler.control(ControlRequest(op: .fillStatus), queue: w.queue)
        return try JSONDecoder().decode(FillStatus.self, from: Data(reply.utf8))
    }

    @discardableResult
    func hydrate(_ w: World, rate: UInt64? = nil) throws -> FillStatus {
        var req = ControlRequest(op: .hydrate)
        req.rate = rate
        let reply = w.handler.control(req, queue: w.queue)
        guard !reply.contains("\"error\"") else { throw PageStateModelTests.Failure(description: "hydrate refused: \(reply)") }
        return try JSONDecoder().decode(FillStatus.self, from: Data(reply.utf8))
    }

    /// Pumps until the fill is no longer running and nothing is in flight.
    func runFill(_ w: World, limit: Int = 200_000) throws -> FillStatus {
        var n = 0
        while w.handler.filling.job?.state == .running || !w.inFlight.isEmpty || w.queuesBusy || !w.fetcher.isIdle {
            try w.pump()
            try checkInvariants(w)
            n += 1
            if n > limit { throw PageStateModelTests.Failure(description: "the fill never ended: \(try status(w))") }
        }
        return try status(w)
    }

    func checkInvariants(_ w: World) throws {
        guard let job = w.handler.filling.job else { return }
        if job.inFlight.count > job.spec.maxInFlight {
            throw PageStateModelTests.Failure(description: "\(job.inFlight.count) fill gaps in flight, more than \(job.spec.maxInFlight)")
        }
    }

    /// Every sector reads as the reference allows.
    func checkDevice(_ w: World) throws {
        let device = try w.readAll()
        for s in 0..<PageStateModelTests.sectors {
            let got = device.withUnsafeBytes { PageStateModelTests.decode($0.baseAddress! + s * PageStateModelTests.sector, sector: s) }
            if !w.current[s].contains(got) {
                throw PageStateModelTests.Failure(description: "sector \(s) reads \(got), expected one of \(w.current[s].sorted()); \(w.describePage(UInt64(s / 8)))")
            }
        }
    }

    func testHydrationFillsEveryPageAndKeepsLocalWrites() throws {
        let w = try quietWorld(seed: 3, queues: 1)  // an http --writable overlay
        XCTAssertEqual(w.mode, .overlay)
        w.handler.persistInterval = 0
        // Local writes first: whole pages (claimed, never fetched) and partial ones.
        w.submit(op: Op.write, sector: 16, count: 16)  // pages 2-3 whole
        w.submit(op: Op.write, sector: 83, count: 3)   // part of page 10
        try w.quiesce()
        let before = w.handler.bitmap.count
        XCTAssertGreaterThan(before, 0)
        let start = try hydrate(w)
        XCTAssertEqual(start.state, .running)
        XCTAssertEqual(start.kind, .hydrate)
        let end = try runFill(w)
        XCTAssertEqual(end.state, .done, "\(end)")
        XCTAssertEqual(end.pagesPresent, end.pagesTotal)
        XCTAssertEqual(end.percent, 100)
        XCTAssertEqual(w.handler.bitmap.count, UInt64(PageStateModelTests.pages))
        // Coalesced: runs of up to 4 pages (the world's 16 KiB planner runs).
        let fetched = UInt64(PageStateModelTests.pages) - before
        XCTAssertGreaterThan(end.requests, 0)
        XCTAssertLessThanOrEqual(end.requests, (fetched + 3) / 4 + 3, "\(end)")
        XCTAssertEqual(end.bytesFetched, fetched * 4096)
        try checkDevice(w)
        // The bits reach the disk after the data (a full cycle): persisted once one ran.
        var n = 0
        while !(try status(w)).persisted {
            w.handler.idle(queue: w.queue)
            try w.quiesce()
            n += 1
            if n > 1000 { return XCTFail("the present bits never persisted") }
        }
        // Nothing left to fetch: hydrating again ends at once, fetching nothing.
        let again = try hydrate(w)
        XCTAssertEqual(again.requests, 0)
        XCTAssertEqual(try runFill(w).state, .done)
    }

    func testAMissDuringHydrationStartsAtOnce() throws {
        let w = try quietWorld(seed: 3, queues: 1)
        let planner = w.handler.planner
        XCTAssertEqual(planner.maxActiveRuns, 3)
        try hydrate(w)
        // The fill took what it may: two gaps, one slot left for misses.
        XCTAssertEqual(w.handler.filling.job?.inFlight.count, 2)
        XCTAssertEqual(planner.activeRunCount, 2)
        XCTAssertEqual(planner.plannedRunCount, 0)
        // A read of the last page (far from the fill's cursor): its run starts now.
        w.submit(op: Op.read, sector: PageStateModelTests.sectors - 8, count: 8)
        XCTAssertEqual(planner.plannedRunCount, 0, "the miss waits behind fill runs")
        XCTAssertTrue(w.fake!.active.contains { $0.run.firstPage + $0.run.pageCount == UInt64(PageStateModelTests.pages) })
        // While the miss's run is active no slot is free: the fill adds nothing.
        let requests = w.handler.filling.job!.requests
        w.handler.idle(queue: w.queue)
        XCTAssertEqual(w.handler.filling.job!.requests, requests)
        XCTAssertEqual(try runFill(w).state, .done)
        try checkDevice(w)
    }

    /// The world's home handler again, over a planner with one connection
    /// (`--connections 1`): runs of up to 16 pages, a first readahead of 2
    /// (a fill run is then 4: a quarter of the largest, at least).
    func singleConnection(_ w: World) -> FetchPlanner {
        let planner = FetchPlanner(imageSize: UInt64(PageStateModelTests.imageSize), pageSize: PageStateModelTests.page,
                                   maxRunBytes: 64 << 10, initialReadaheadBytes: 8 << 10, maxReadaheadBytes: 64 << 10,
                                   maxActiveRuns: 1)
        let h = CachingHandler(context: w.handler.context, fetcher: w.fetcher, planner: planner, depth: w.depth)
        h.persistInterval = w.handler.persistInterval
        h.trace = w.handler.trace
        w.handler = h
        w.handlers = [h]
        w.queue.handler = h
        return planner
    }

    /// With one connection a miss arriving while a fill run holds it waits
    /// for that run only, and that run is small (4 pages here),
    /// not the planner's largest (16): the order of events on the fake queue
    /// and fetcher is checked, not time.
    func testWithOneConnectionAMissWaitsForOneSmallFillRunAtMost() throws {
        let w = try quietWorld(seed: 3, queues: 1)
        let planner = singleConnection(w)
        try hydrate(w)
        let job = w.handler.filling.job!
        XCTAssertEqual(job.spec.maxInFlight, 1)
        XCTAssertEqual(job.runPages, 4, "small fill runs")
        XCTAssertEqual(planner.activeRunCount, 1)
        let fake = w.fake!
        XCTAssertEqual(fake.active.count, 1)
        let fillRun = fake.active[0].run
        XCTAssertLessThanOrEqual(fillRun.pageCount, 4)
        // A read of the last page, far from the fill: planned, waiting for the connection.
        let last = UInt64(PageStateModelTests.pages - 1)
        w.submit(op: Op.read, sector: PageStateModelTests.sectors - 8, count: 8)
        XCTAssertEqual(planner.plannedRunCount, 1, "the miss waits for the only connection")
        // The fill takes no more while the miss waits, whatever runs.
        for _ in 0..<5 { w.handler.idle(queue: w.queue) }
        XCTAssertEqual(fake.active.map(\.run.id), [fillRun.id])
        // The fill run ends (its bytes arrive in pieces): what starts next is the miss's run.
        var rng = SplitMix(seed: 1)
        while fake.active.first?.run.id == fillRun.id { fake.step(&rng, handler: w.handler, queue: w.queue) }
        XCTAssertLessThanOrEqual(fillRun.length, 4 * 4096, "the miss waited behind one small fill run at most")
        XCTAssertEqual(fake.active.count, 1)
        XCTAssertEqual(fake.active[0].run.firstPage, last, "the miss's run starts before any other fill run")
        XCTAssertEqual(job.requests, 1)
        XCTAssertEqual(try runFill(w).state, .done)
        try checkDevice(w)
    }

    /// `profile-replay` requests are input: runs whose sums would overflow or
    /// leave the device, or too many of them, are one-line errors; runs that
    /// overlap (any number of times) count each page once.
    func testProfileReplayRequestsAreChecked() throws {
        let w = try quietWorld(seed: 3, queues: 1)
        let pages = UInt64(PageStateModelTests.pages)
        func replay(_ runs: [[UInt64]]) -> String {
            var r = ControlRequest(op: .profileReplay)
            r.runs = runs
            return w.handler.control(r, queue: w.queue)
        }
        for bad in [[[1, UInt64.max]], [[UInt64.max, 1]], [[UInt64.max, UInt64.max]], [[0, pages + 1]], [[pages, 1]],
                    [[0, 0]], [[1]], [[1, 2, 3]]] {
            let reply = replay(bad)
            XCTAssertTrue(reply.contains("\"error\"") && reply.contains("profile-replay"), "\(bad): \(reply)")
            XCTAssertFalse(reply.contains("\n"))
        }
        let tooMany = replay(Array(repeating: [0, 1], count: BootProfile.maxRuns + 1))
        XCTAssertTrue(tooMany.contains("at most \(BootProfile.maxRuns)"), tooMany)
        XCTAssertNil(w.handler.filling.job, "nothing started")
        // A profile's most runs, each the whole device: one walk of its pages.
        let reply = replay(Array(repeating: [0, pages], count: BootProfile.maxRuns))
        let status = try JSONDecoder().decode(FillStatus.self, from: Data(reply.utf8))
        XCTAssertEqual(status.fillPages, pages)
        XCTAssertEqual(w.handler.filling.job!.spec.ranges, [0..<pages])
        let end = try runFill(w)
        XCTAssertEqual(end.state, .done)
        XCTAssertEqual(end.fillPagesPresent, pages)
        try checkDevice(w)
    }

    /// Each page once, in the range that lists it first, against a page model.
    func testFirstCoversKeepsEachPageOnceInListOrder() {
        var rng = SplitMix(seed: 11)
        for _ in 0..<300 {
            let n = 1 + Int(rng.next() % 40)
            let ranges = (0..<n).map { _ -> Range<UInt64> in
                let a = rng.next() % 200
                return a..<a + rng.next() % 30
            }
            var seen = Set<UInt64>()
            var expected: [UInt64] = []
            for r in ranges { for p in r where seen.insert(p).inserted { expected.append(p) } }
            let got = FillJob.firstCovers(ranges)
            XCTAssertEqual(got.flatMap { Array($0) }, expected, "\(ranges)")
            XCTAssertFalse(got.contains { $0.isEmpty })
            for (x, y) in zip(got, got.dropFirst()) { XCTAssertNotEqual(x.upperBound, y.lowerBound, "unjoined pieces") }
        }
        XCTAssertEqual(FillJob.firstCovers([0..<UInt64.max, 5..<6, UInt64.max - 1..<UInt64.max]), [0..<UInt64.max])
    }

    func testStopFailureAndRefusal() throws {
        // Stopped: no new run after fill-stop; its runs in flight finish.
        let w = try quietWorld(seed: 3, queues: 1)
        try hydrate(w)
        let reply = w.handler.control(ControlRequest(op: .fillStop), queue: w.queue)
        let stopped = try JSONDecoder().decode(FillStatus.self, from: Data(reply.utf8))
        XCTAssertEqual(stopped.state, .stopped)
        // A status, not an error reply (ControlClient takes any "error" key for one).
        XCTAssertFalse(reply.contains("\"error\""), reply)
        XCTAssertEqual(stopped.reason, "stopped by fill-stop")
        let requests = stopped.requests
        XCTAssertEqual(try runFill(w).requests, requests)
        XCTAssertLessThan(w.handler.bitmap.count, UInt64(PageStateModelTests.pages))

        // Every fetch fails: the pass gains nothing, the job fails with the reason.
        let f = try quietWorld(seed: 6, queues: 1)
        f.fake!.failPermille = 1000
        try hydrate(f)
        let failed = try runFill(f)
        XCTAssertEqual(failed.state, .failed)
        XCTAssertTrue(failed.reason?.contains("could not be fetched: injected failure") ?? false, "\(failed)")
        XCTAssertGreaterThan(failed.failedRuns, 0)

        // A cache bounded below the image cannot hold it: refused, one line.
        let b = try quietWorld(seed: 9, queues: 1)
        b.handler.context.maxCacheBytes = 8 * 4096
        let refused = b.handler.control(ControlRequest(op: .hydrate), queue: b.queue)
        XCTAssertTrue(refused.contains("\"error\"") && refused.contains("--cache-max-size"), refused)
        XCTAssertNil(b.handler.filling.job)
    }

    func testRateLimitedHydrationWaitsOnItsTimer() throws {
        let w = try quietWorld(seed: 3, queues: 1)
        // 8 KiB/s: runs of one page (a quarter second's worth, at least a page).
        let s = try hydrate(w, rate: 8 << 10)
        XCTAssertEqual(s.rate, 8 << 10)
        let job = w.handler.filling.job!
        XCTAssertEqual(job.runPages, 1)
        XCTAssertEqual(job.requests, 1, "one run, then the bucket is in debt")
        XCTAssertTrue(w.handler.filling.timerArmed)
        // Pumping without time passing starts nothing more.
        for _ in 0..<200 { try w.pump() }
        XCTAssertEqual(job.requests, 1)
    }

    func testTokenBucket() {
        var spec = FillJobSpec(kind: .hydrate, ranges: [0..<1000])
        spec.rate = 1 << 20
        let job = FillJob(spec, pageCount: 1000, now: 0)
        job.size(pageSize: 4096, plannerMax: 1024)
        XCTAssertEqual(job.runPages, 64)  // 256 KiB: a quarter second at 1 MiB/s
        XCTAssertEqual(job.refill(now: 0), 0)
        job.tokens -= 256 * 1024
        let wait = job.refill(now: 0)
        XCTAssertEqual(Double(wait) / 1e9, 0.25, accuracy: 0.001)
        XCTAssertEqual(job.refill(now: 250_000_001), 0)
        // Idle time saves up at most one run.
        XCTAssertEqual(job.refill(now: 60_000_000_000), 0)
        XCTAssertEqual(job.tokens, 256 * 1024)
        // Unbounded: never waits.
        let free = FillJob(FillJobSpec(kind: .hydrate, ranges: [0..<10]), pageCount: 10, now: 0)
        free.size(pageSize: 4096, plannerMax: 1024)
        XCTAssertEqual(free.runPages, 1024)
        free.tokens = -1e12
        XCTAssertEqual(free.refill(now: 1), 0)
        XCTAssertEqual(FillStatus.percent(999, of: 1000), 99.9)
        XCTAssertEqual(FillStatus.percent(9999, of: 10000), 99.9, "never rounded up to 100")
        XCTAssertEqual(FillStatus.percent(5, of: 5), 100)
    }

    func testPlanFillLeavesReadaheadAlone() {
        let p = FetchPlanner(imageSize: 1 << 24, pageSize: 4096, maxRunBytes: 1 << 20,
                             initialReadaheadBytes: 64 << 10, maxReadaheadBytes: 1 << 20, maxActiveRuns: 4)
        let bits = PageBits(pageCount: 4096)
        _ = p.plan(offset: 0, length: 4096, context: 1, present: bits)
        _ = p.plan(offset: 4096, length: 4096, context: 2, present: bits)
        let window = p.readaheadWindowPages
        XCTAssertGreaterThan(window, 0)
        let runs = p.runCount
        let fill = p.planFill(1000..<1100, context: FillJob.contextBase, present: bits)
        XCTAssertEqual(fill.newPages, 100)
        XCTAssertEqual(fill.readaheadPages, 0)
        XCTAssertEqual(p.runCount, runs + 1)
        XCTAssertEqual(p.readaheadWindowPages, window)
        // The reader's next sequential read still grows its window.
        _ = p.plan(offset: 8192, length: 4096, context: 3, present: bits)
        XCTAssertGreaterThan(p.readaheadWindowPages, window)
        // Pages a run covers are waited for, not fetched again.
        let over = p.planFill(1050..<1150, context: FillJob.contextBase + 1, present: bits)
        XCTAssertEqual(over.inFlightPages, 50)
        XCTAssertEqual(over.newPages, 50)
    }

    /// Seeded: hydration under random reads, writes, FLUSH, sync, kill -9 and
    /// power losses (the model's own checks run at every step), 1-4 queues,
    /// every target mode. A restart ends the job: it is asked for again.
    func testHydrationUnderRandomLoadAndCrashes() throws { try randomHydration(faults: false) }

    /// The same with the model's faults: failed fdatasyncs (a job then fails:
    /// nothing more may be persisted), ENOSPC, failed fetches. Whatever the job
    /// ends as, the model's checks hold at every step; then the faults stop,
    /// the power goes out, and a hydration on the restarted device must finish.
    func testHydrationUnderFaults() throws { try randomHydration(faults: true) }

    func randomHydration(faults: Bool) throws {
        let env = ProcessInfo.processInfo.environment
        let seeds: [UInt64] = env["FILL_SEED"].flatMap { UInt64($0) }.map { [$0] } ?? Array(1...UInt64(env["FILL_SEEDS"].flatMap { Int($0) } ?? 12))
        let steps = env["FILL_STEPS"].flatMap { Int($0) } ?? 600
        var crashes = 0, failedJobs = 0
        var failed = Set<ObjectIdentifier>()
        for seed in seeds {
            let w = try quietWorld(seed: seed)
            if faults {
                w.faulty = true
                w.setFaults(fsync: 40, write: 10)
                w.fake?.failPermille = 30
            }
            do {
                // A restart is told by the world's crash count: a new handler may
                // reuse the freed one's address, so its identity cannot tell.
                var seen = w.crashes
                var hydrations = 0
                for i in 0..<steps {
                    if i == steps / 4 { try hydrate(w); hydrations += 1 }
                    // With faults, pages a failed fdatasync dropped are missing again: hydrate again now and then.
                    if faults && i > steps / 4 && i % 40 == 0 && w.handler.filling.job?.state != .running {
                        try hydrate(w)
                    }
                    try w.step()
                    if w.crashes != seen {
                        // A new server (kill -9 or power loss): the files decide, hydrate again.
                        seen = w.crashes
                        crashes += 1
                        w.handler.context.maxCacheBytes = 0
                        if i >= steps / 4 { try hydrate(w); hydrations += 1 }
                    }
                    try checkInvariants(w)
                    if let job = w.handler.filling.job, job.state == .failed, !failed.contains(ObjectIdentifier(job)) {
                        failed.insert(ObjectIdentifier(job))
                        failedJobs += 1
                    }
                }
                if faults {
                    if w.handler.filling.job?.state == .running { _ = try runFill(w) }
                    // Faults off, a power loss (it checks every sector), then hydrate on the new server.
                    w.faulty = false
                    w.setFaults(fsync: 0, write: 0)
                    w.fake?.failPermille = 0
                    try w.powerLoss()
                    w.handler.context.maxCacheBytes = 0
                }
                if hydrations == 0 || faults || w.handler.filling.job == nil { try hydrate(w) }
                var end = try runFill(w)
                if end.state == .stopped {
                    // Stopped by a restart in quiesce's way: once more.
                    try hydrate(w)
                    end = try runFill(w)
                }
                guard end.state == .done, end.pagesPresent == end.pagesTotal else {
                    throw PageStateModelTests.Failure(description: "hydration ended \(end)")
                }
                try checkDevice(w)
            } catch {
                return XCTFail("""
                    seed \(seed) (\(w.mode.rawValue), \(w.queueCount) queues): \(error)
                    replay: FILL_SEED=\(seed) swift test --filter FillTests
                      \(w.trace.suffix(60).joined(separator: "\n  "))
                    """)
            }
        }
        if seeds.count > 1 { XCTAssertGreaterThan(crashes, 0, "crashes were exercised") }
        if faults && seeds.count > 1 { XCTAssertGreaterThan(failedJobs, 0, "a fault ended a hydration") }
    }
}

/// `hydrate`'s command line, without a kernel: --rate as people write it, bad input in one line.
final class HydrateCLITests: XCTestCase {
    func testRates() {
        XCTAssertEqual(Hydrate.parseRate("4M/s"), 4 << 20)
        XCTAssertEqual(Hydrate.parseRate("4MiB/s"), 4 << 20)
        XCTAssertEqual(Hydrate.parseRate("500K"), 500 << 10)
        XCTAssertEqual(Hydrate.parseRate("1048576"), 1 << 20)
        for bad in ["0", "0/s", "-1M/s", "abc", "/s", "", "4M/m", "1e6"] { XCTAssertNil(Hydrate.parseRate(bad), bad) }
    }

    func testProgressBar() {
        var s = FillStatus(kind: .hydrate, state: .running, pagesPresent: 5, pagesTotal: 10, percent: 50, fillPages: 10,
                           fillPagesPresent: 5, bytesFetched: 3 << 20, requests: 1, failedRuns: 0, rate: 4 << 20, passes: 1,
                           elapsedSeconds: 2, persisted: false, reason: nil)
        XCTAssertEqual(Hydrate.barLine(s), "[###############...............]  50.0%  3.0 MiB fetched  1.5 MiB/s (at most 4.0 MiB/s)")
        s.percent = 100
        s.rate = 0
        XCTAssertEqual(Hydrate.barLine(s), "[##############################] 100.0%  3.0 MiB fetched  1.5 MiB/s")
        XCTAssertFalse(Hydrate.barLine(s).contains("\n"))
    }

    func testBadInputsAreOneLine() {
        func failure(_ args: [String]) -> String {
            do {
                var c = try UblkHTTP.parseAsRoot(args)
                try c.validate()
                return "parsed"
            } catch {
                return UblkHTTP.message(for: error)
            }
        }
        for (args, want) in [(["hydrate", "-n", "0", "--rate", "0"], "bad --rate '0'"),
                             (["hydrate", "-n", "0", "--rate", "fast"], "bad --rate 'fast'"),
                             (["hydrate", "-n", "0", "--stop", "--rate", "1M"], "--stop takes no"),
                             (["hydrate"], "Missing expected argument")] {
            let m = failure(args)
            XCTAssertTrue(m.contains(want), "\(args): \(m)")
            XCTAssertEqual(UblkHTTP.oneLine(m).contains("\n"), false)
        }
        let h = try? UblkHTTP.parseAsRoot(["hydrate", "-n", "2", "--rate", "4M/s"]) as? Hydrate
        XCTAssertEqual(h?.number, 2)
        XCTAssertEqual(h?.rate, "4M/s")
    }
}
