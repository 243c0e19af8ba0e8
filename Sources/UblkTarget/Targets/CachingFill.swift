// CachingFill: filling a caching device's cache in the background, on its
// home queue: hydration (`ublk-http hydrate`: every missing page) and the
// replay of a boot profile (its recorded runs, in order). One mechanism for
// both: a FILL JOB is an ordered list of page ranges that the home walks
// with a cursor, fetching what is missing through the very path a read miss
// takes (FetchPlanner.planFill, the RunFetcher, `received`, `markPresent`),
// so everything the handler guarantees holds for filled pages too:
//   - a page's present bit reaches the disk only after its data (it is set in
//     memory by `markPresent` and persisted by the next full cycle, after the
//     cache file's fdatasync: ORDER ON DISK in CachingHandler.swift);
//   - a page in flight is fetched once: a gap that a run already covers (a
//     reader's miss, readahead) is waited for, never fetched again;
//   - a local page (http --writable) is never fetched over: it is present,
//     and the walk also skips any page whose local bit is set; a page a
//     write claimed is covered by the claim's run and only waited for.
//
// How it yields to the device's own reads. A job adds a run to the planner
// only when (a) no run is planned and waiting for a slot (a miss that waits
// for a connection never waits behind a fill run: fill runs are started the
// moment they are planned, so they never sit in the planner's FIFO), (b) at
// least one of the planner's `maxActiveRuns` slots stays free for misses
// (with one slot: only when no run is active), (c) fewer than
// `maxInFlight` of its own gaps are in flight, (d) no evicted pages are
// being punched (requests wait then too). Each gap is one contiguous range
// of missing pages, at most `runPages` long, so it becomes at most one new
// run: one Range GET (`http`) or one read of the backing store (`cache`).
//
// ONE CONNECTION (`maxActiveRuns` 1: `--connections 1`). No slot can be kept
// free, so a miss may arrive while a fill run holds the only connection; it
// then waits for that run, never for more: by (a) and (b) the miss's run is
// the next to start. So that this wait stays short, a fill run is then at
// most one readahead unit (`fillRunLimit`: the planner's first readahead
// window, 1 MiB by default for `http`, at least a quarter of the largest
// run) instead of the planner's largest (4 MiB): a miss waits behind at most
// what it could wait behind for another reader's readahead. Nothing is cancelled (a run's pages keep the usual
// order: data, then the bit); hydration with one connection costs more round
// trips instead.
//
// The list (a profile's runs, a `profile-replay` request) may hold any
// ranges, overlapping ones included: the job keeps each page once, in the
// range that lists it first (`FillJob.firstCovers`), so a walk costs at most
// the image's pages and the list's pages never add up past the image's.
//
// Rate (`rate` bytes/s, 0: none): a token bucket refilled by the clock,
// spent per run started (debt allowed: a run starts when the bucket is not
// negative), at most one run's worth saved up; while it is negative the job
// waits on its own timerfd, polled on the ring. Runs are then a quarter of a
// second's worth (at least one page, at most the planner's largest run), so
// the rate holds over short spans too. Nothing sleeps: the queue thread
// blocks only in io_uring_enter.
//
// Passes. The walk ends when the cursor has passed the last range and no
// gap of the job is in flight. Then every page of the list present: done.
// Otherwise (a fetch failed for good, a covered run failed, a page was
// evicted) another pass starts if this one gained pages and `maxPasses`
// allows it, else the job fails with the last fetch error.
//
// Driving it: `startFill` (replaces a running job), `stopFill`,
// `fillStatus`; `fillStep` runs in the handler's `idle` (after every batch
// of completions: every condition above changes only with a completion or
// the job's timer), `fillOutcome` gets the job's planner contexts (from
// `serve`: contexts at or above `FillJob.contextBase` are the fill's, never a
// request's slot), `fillDrain` ends the job when the device stops. The
// control operations `hydrate`, `fill-status`, `fill-stop` are answered by
// `fillControl` (CachingControl.swift). Stopping a job leaves its runs in
// flight to finish (their pages are good); nothing is undone.
import CUring
import Glibc
import PageCache

/// What a fill job is for (it changes nothing in how it runs).
public enum FillKind: String, Codable, Sendable {
    case hydrate
    case profile
}

/// A fill job's state, as `fill-status` reports it.
public enum FillState: String, Codable, Sendable {
    /// Fetching (or waiting for its turn, its rate or its runs).
    case running
    /// Every page of the list was present at the end of a pass.
    case done
    /// `fill-stop`, another job replaced it, or the device is stopping.
    case stopped
    /// Pages stayed missing after a pass that gained nothing (`reason` says why).
    case failed
    /// No job ran on this device since its server started.
    case idle
}

/// The reply of `hydrate`, `fill-status` and `fill-stop`.
public struct FillStatus: Codable, Sendable, Equatable {
    public var kind: FillKind?
    public var state: FillState
    /// The device's pages present now, and all of them (every fill, whatever its list).
    public var pagesPresent: UInt64
    public var pagesTotal: UInt64
    /// pagesPresent / pagesTotal, in percent (one decimal; 100 only when all are).
    public var percent: Double
    /// Pages of the job's list, and how many of them are present now.
    public var fillPages: UInt64
    public var fillPagesPresent: UInt64
    /// Bytes and runs (Range GETs, backing reads) the job's own runs fetched and started.
    public var bytesFetched: UInt64
    public var requests: UInt64
    /// Runs of the job that failed (after the fetcher's own retries).
    public var failedRuns: UInt64
    /// Bytes per second (0: unbounded).
    public var rate: UInt64
    public var passes: Int
    public var elapsedSeconds: Double
    /// Every present bit is on the disk (its data was synced before it).
    public var persisted: Bool
    /// Why the job stopped or failed. Not named "error": a reply with that
    /// key is an error reply to ControlClient (and this one is a status).
    public var reason: String?

    enum CodingKeys: String, CodingKey {
        case kind, state, pagesPresent = "pages_present", pagesTotal = "pages_total", percent
        case fillPages = "fill_pages", fillPagesPresent = "fill_pages_present", bytesFetched = "bytes_fetched"
        case requests, failedRuns = "failed_runs", rate, passes, elapsedSeconds = "elapsed_seconds", persisted, reason
    }

    /// Percent with one decimal, never rounded up to 100 while a page is missing.
    public static func percent(_ present: UInt64, of total: UInt64) -> Double {
        guard total > 0 else { return 100 }
        if present >= total { return 100 }
        // present * 1000 fits for any image below 2^54 pages; above, a ratio (still never 100).
        if present <= UInt64.max / 1000 { return Double(present * 1000 / total) / 10 }
        return min(99.9, (Double(present) / Double(total) * 1000).rounded(.down) / 10)
    }
}

/// What to fill. `ranges` are pages, in the order to fill them (clamped to
/// the image; overlaps allowed, a page present is skipped).
public struct FillJobSpec: Sendable {
    public var kind: FillKind
    public var ranges: [Range<UInt64>]
    /// Bytes per second (0: unbounded).
    public var rate: UInt64 = 0
    /// Gaps of this job in flight at once (each at most one run).
    public var maxInFlight = 2
    /// Longest run (bytes; 0: the planner's largest). A rate makes runs smaller.
    public var maxRunBytes = 0
    /// Passes over the list while pages stay missing (each must gain pages).
    public var maxPasses = Int.max
    public init(kind: FillKind, ranges: [Range<UInt64>]) {
        self.kind = kind
        self.ranges = ranges
    }
}

/// One running (or ended) job: the walk's cursor, its gaps in flight, its bucket, its counters.
final class FillJob {
    /// Planner contexts of fill gaps are at or above this; requests' slots are below 2^16.
    static let contextBase: UInt64 = 1 << 32

    let spec: FillJobSpec
    var state = FillState.running
    var reason: String?
    /// The walk: the range at `index`, from page `cursor` on.
    var index = 0
    var cursor: UInt64 = 0
    var pass = 1
    /// Pages of the list present when the pass began (did the pass gain any?).
    var presentAtPassStart: UInt64 = 0
    /// Gaps in flight: planner context -> bytes its new run fetches (0: it waits for another's run).
    var inFlight: [UInt64: UInt64] = [:]
    var bytesFetched: UInt64 = 0
    var requests: UInt64 = 0
    var failedRuns: UInt64 = 0
    var rate: UInt64
    var runPages: UInt64 = 1
    /// What the bucket may save up: one run's bytes.
    var burst: Double = 1
    /// The token bucket (bytes; negative: in debt) and when it was last refilled.
    var tokens: Double = 0
    var refilled: UInt64
    let started: UInt64
    var ended: UInt64?
    let listPages: UInt64

    init(_ spec: FillJobSpec, pageCount: UInt64, now: UInt64) {
        var s = spec
        s.ranges = FillJob.firstCovers(spec.ranges.map { $0.clamped(to: 0..<pageCount) }.filter { !$0.isEmpty })
        s.maxInFlight = max(1, spec.maxInFlight)
        s.maxPasses = max(1, spec.maxPasses)
        self.spec = s
        rate = spec.rate
        started = now
        refilled = now
        // Disjoint and within the image: no overflow.
        listPages = s.ranges.reduce(0) { $0 + ($1.upperBound - $1.lowerBound) }
    }

    /// Each page of `ranges` once, in the range that lists it first: the
    /// parts of each range no earlier range covers, in the list's order
    /// (pieces that continue the previous one are joined). O(n log n): the
    /// bounds cut the line into segments, and a "next segment not yet
    /// taken" forest (path-halving) skips what earlier ranges took.
    static func firstCovers(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
        guard ranges.count > 1 else { return ranges }
        var points = ranges.flatMap { [$0.lowerBound, $0.upperBound] }
        points.sort()
        var unique: [UInt64] = []
        unique.reserveCapacity(points.count)
        for p in points where unique.last != p { unique.append(p) }
        func index(_ v: UInt64) -> Int {
            var lo = 0, hi = unique.count
            while lo < hi {
                let mid = (lo + hi) / 2
                if unique[mid] < v { lo = mid + 1 } else { hi = mid }
            }
            return lo
        }
        // next[k]: k if segment k (unique[k]..<unique[k + 1]) is free, else toward the next free one.
        var next = Array(0..<unique.count)
        func free(_ k: Int) -> Int {
            var k = k
            while next[k] != k {
                next[k] = next[next[k]]
                k = next[k]
            }
            return k
        }
        var out: [Range<UInt64>] = []
        for r in ranges where !r.isEmpty {
            let end = index(r.upperBound)
            var k = free(index(r.lowerBound))
            while k < end {
                let piece = unique[k]..<unique[k + 1]
                if let last = out.last, last.upperBound == piece.lowerBound {
                    out[out.count - 1] = last.lowerBound..<piece.upperBound
                } else {
                    out.append(piece)
                }
                next[k] = k + 1
                k = free(k + 1)
            }
        }
        return out
    }

    /// Runs sized for the rate: a quarter of a second's worth, one page to the planner's largest.
    func size(pageSize: UInt64, plannerMax: UInt64) {
        let cap = spec.maxRunBytes > 0 ? max(1, min(plannerMax, UInt64(spec.maxRunBytes) / pageSize)) : plannerMax
        runPages = rate == 0 ? cap : max(1, min(cap, rate / 4 / pageSize))
        burst = Double(runPages * pageSize)
    }

    /// Refills the bucket; returns nanoseconds until it is not negative (0: now).
    func refill(now: UInt64) -> UInt64 {
        guard rate > 0 else { return 0 }
        let dt = Double(now &- refilled) / 1e9
        refilled = now
        tokens = min(burst, tokens + dt * Double(rate))
        if tokens >= 0 { return 0 }
        return UInt64((-tokens / Double(rate)) * 1e9) + 1
    }

    func end(_ s: FillState, now: UInt64, reason: String? = nil) {
        guard state == .running else { return }
        state = s
        self.reason = reason
        ended = now
    }
}

/// The home handler's fill machinery: the job, its timer, the planner contexts.
final class CacheFilling {
    var job: FillJob?
    /// The job's rate timer (made on first use, kept for the handler's life:
    /// a poll may still be armed on it when a job ends) and whether it is armed.
    private(set) var timerFD: Int32 = -1
    var timerArmed = false
    var nextContext = FillJob.contextBase
    /// The last fetch error of any run (the reason a job fails).
    var lastFetchError: String?

    func timer() -> Int32 {
        if timerFD < 0 { timerFD = cu_timerfd() }
        return timerFD
    }

    deinit { if timerFD >= 0 { close(timerFD) } }
}

extension CachingHandler {
    // MARK: Background fill (the header above)


    /// Starts `spec` as the device's fill job, replacing a running one. The
    /// home queue only.
    @discardableResult
    func startFill(_ spec: FillJobSpec, queue: IOQueue) -> FillJob {
        let now = monotonicNanos()
        filling.job?.end(.stopped, now: now, reason: "replaced by a \(spec.kind.rawValue) job")
        let job = FillJob(spec, pageCount: bitmap.pageCount, now: now)
        job.size(pageSize: pageSize, plannerMax: fillRunLimit)
        job.presentAtPassStart = fillPresent(job)
        filling.job = job
        trace?("fill \(spec.kind.rawValue) start: \(job.listPages) pages, rate \(job.rate)")
        fillStep(queue)
        return job
    }

    /// The longest fill run (pages): the planner's largest; with one
    /// connection one readahead unit (the header's ONE CONNECTION), and no
    /// less than a quarter of the largest (--readahead 0 has no unit: runs
    /// of a page would make hydration a round trip per page).
    var fillRunLimit: UInt64 {
        if planner.maxActiveRuns > 1 { return planner.maxRunPages }
        return max(1, min(planner.maxRunPages, max(planner.initialReadaheadPages, planner.maxRunPages / 4)))
    }

    /// Stops the job (its runs in flight finish; their pages count).
    func stopFill(reason: String? = nil) {
        filling.job?.end(.stopped, now: monotonicNanos(), reason: reason)
    }

    /// Pages of `job`'s list present now.
    func fillPresent(_ job: FillJob) -> UInt64 {
        // Hydration's list is the whole image: the bitmap keeps that count (no
        // scan of every word of a large image each time the CLI asks).
        if job.spec.ranges == [0..<bitmap.pageCount] { return bitmap.count }
        return job.spec.ranges.reduce(0) { $0 + bitmap.bits.count(in: $1) }
    }

    func fillStatus() -> FillStatus {
        let present = bitmap.count, total = bitmap.pageCount
        let persisted = unsyncedPresent.isEmpty && !bitmap.bits.hasChanged && cycle?.full != true && !presentFrozen
        guard let job = filling.job else {
            return FillStatus(kind: nil, state: .idle, pagesPresent: present, pagesTotal: total,
                              percent: FillStatus.percent(present, of: total), fillPages: 0, fillPagesPresent: 0,
                              bytesFetched: 0, requests: 0, failedRuns: 0, rate: 0, passes: 0, elapsedSeconds: 0,
                              persisted: persisted, reason: nil)
        }
        let elapsed = Double((job.ended ?? monotonicNanos()) &- job.started) / 1e9
        return FillStatus(kind: job.spec.kind, state: job.state, pagesPresent: present, pagesTotal: total,
                          percent: FillStatus.percent(present, of: total), fillPages: job.listPages,
                          fillPagesPresent: fillPresent(job), bytesFetched: job.bytesFetched, requests: job.requests,
                          failedRuns: job.failedRuns, rate: job.rate, passes: job.pass,
                          elapsedSeconds: (elapsed * 1000).rounded() / 1000, persisted: persisted, reason: job.reason)
    }

    /// The next gap of the walk: missing pages, not local, either all covered
    /// by one run in flight (waited for) or none (one new run), at most
    /// `runPages` long. Nil: the walk has passed the list's end.
    func nextFillGap(_ job: FillJob) -> Range<UInt64>? {
        let ranges = job.spec.ranges
        let bits = bitmap.bits
        while job.index < ranges.count {
            let r = ranges[job.index]
            if job.cursor < r.lowerBound || job.cursor > r.upperBound { job.cursor = r.lowerBound }
            guard job.cursor < r.upperBound, let p = bits.nextClear(in: job.cursor..<r.upperBound) else {
                job.index += 1
                if job.index < ranges.count { job.cursor = ranges[job.index].lowerBound }
                continue
            }
            // A local page is the device's own data: never fetched over (it is
            // present; this guards the rule, whatever happens to that bit).
            if let l = local, l.test(p) {
                job.cursor = p + 1
                continue
            }
            var limit = min(r.upperBound, p + job.runPages)
            if let run = planner.run(covering: p) {
                // Being fetched (a reader's miss, readahead, a write's claim): wait for it.
                let e = min(limit, run.firstPage + run.pageCount)
                job.cursor = e
                return p..<e
            }
            limit = min(limit, bits.nextSet(in: p..<limit) ?? limit)
            if let l = local { limit = min(limit, l.bits.nextSet(in: p..<limit) ?? limit) }
            var e = p + 1
            while e < limit && planner.run(covering: e) == nil { e += 1 }
            job.cursor = e
            return p..<e
        }
        return nil
    }

    /// Adds the job's next gaps to the planner while the rules of the header allow.
    func fillStep(_ queue: IOQueue) {
        guard let job = filling.job, job.state == .running else { return }
        if draining { return fillDrain() }
        if presentFrozen {
            return job.end(.failed, now: monotonicNanos(),
                           reason: "a sync of the cache file failed: nothing more is persisted until the device is restarted")
        }
        // One slot stays free for the device's own misses (with one slot: it must be idle).
        let slots = planner.maxActiveRuns > 1 ? planner.maxActiveRuns - 1 : 1
        while job.inFlight.count < job.spec.maxInFlight {
            if planner.plannedRunCount > 0 || planner.activeRunCount >= slots || eviction.isPunching { break }
            if job.rate > 0 {
                let wait = job.refill(now: monotonicNanos())
                if wait > 0 {
                    armFillTimer(wait, queue)
                    break
                }
            }
            guard let gap = nextFillGap(job) else {
                if job.inFlight.isEmpty { endFillPass(job) }
                break
            }
            let context = filling.nextContext
            filling.nextContext += 1
            let plan = planner.planFill(gap, context: context, present: bitmap.bits)
            if plan.isHit { continue }
            var bytes: UInt64 = 0
            if plan.newPages > 0 {
                // The gap is within the image's pages: only its last page may end past imageSize.
                let end = gap.upperBound >= bitmap.pageCount ? imageSize : min(gap.upperBound * pageSize, imageSize)
                bytes = end - gap.lowerBound * pageSize
                job.requests += 1
                job.tokens -= Double(bytes)
            }
            job.inFlight[context] = bytes
            // Started now: a fill run never waits in the planner's FIFO, where a miss would queue behind it.
            if planner.plannedRunCount > 0 { startRuns(queue) }
        }
    }

    /// The walk passed the list's end with nothing in flight.
    func endFillPass(_ job: FillJob) {
        let present = fillPresent(job)
        let now = monotonicNanos()
        if present >= job.listPages { return job.end(.done, now: now) }
        if present > job.presentAtPassStart && job.pass < job.spec.maxPasses {
            job.pass += 1
            job.presentAtPassStart = present
            job.index = 0
            job.cursor = job.spec.ranges.first?.lowerBound ?? 0
            return
        }
        let missing = job.listPages - present
        job.end(.failed, now: now, reason: "\(missing) pages could not be fetched"
                + (filling.lastFetchError.map { ": \($0)" } ?? ""))
    }

    /// A gap's planner context came back (`serve`): its pages are present, or a run of it failed.
    func fillOutcome(_ context: UInt64, ok: Bool) {
        guard let job = filling.job, let bytes = job.inFlight.removeValue(forKey: context) else { return }
        if ok { job.bytesFetched += bytes } else { job.failedRuns += 1 }
    }

    func armFillTimer(_ nanos: UInt64, _ queue: IOQueue) {
        guard !filling.timerArmed else { return }
        let fd = filling.timer()
        guard fd >= 0, cu_timerfd_arm(fd, max(1, nanos)) == 0 else {
            filling.job?.end(.failed, now: monotonicNanos(), reason: "cannot arm the rate timer: \(Errno.current)")
            return
        }
        filling.timerArmed = true
        queue.poll(fd: fd, data: Event.fillTimer.rawValue)
    }

    /// The rate timer fired: `idle`, which follows, takes the next step.
    func fillTimerFired() {
        filling.timerArmed = false
        var v: UInt64 = 0
        _ = read(filling.timerFD, &v, 8)  // non-blocking
    }

    /// The device is stopping: the job ends (its runs are cancelled with the rest).
    func fillDrain() {
        filling.job?.end(.stopped, now: monotonicNanos(), reason: "the device is stopping")
    }

    /// `hydrate`, `fill-status`, `fill-stop`; nil for any other operation.
    func fillControl(_ request: ControlRequest, queue: IOQueue) -> String? {
        switch request.op {
        case .hydrate:
            if context.maxCacheBytes > 0 && context.maxCacheBytes < imageSize {
                return controlError("the cache is bounded (--cache-max-size \(context.maxCacheBytes) bytes) below the image (\(imageSize) bytes): it cannot hold every page")
            }
            if let job = filling.job, job.state == .running, job.spec.kind == .hydrate {
                // Already hydrating: a new rate applies from now on.
                if let r = request.rate {
                    job.rate = r
                    job.size(pageSize: pageSize, plannerMax: fillRunLimit)
                    job.tokens = min(job.tokens, 0)
                }
            } else {
                var spec = FillJobSpec(kind: .hydrate, ranges: [0..<bitmap.pageCount])
                spec.rate = request.rate ?? 0
                spec.maxInFlight = max(1, min(2, planner.maxActiveRuns - 1))
                startFill(spec, queue: queue)
            }
            return controlJSON(fillStatus())
        case .fillStatus:
            return controlJSON(fillStatus())
        case .fillStop:
            stopFill(reason: "stopped by fill-stop")
            return controlJSON(fillStatus())
        default:
            return nil
        }
    }
}
