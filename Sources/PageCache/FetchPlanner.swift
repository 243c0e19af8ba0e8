// FetchPlanner: which pages a read needs, which fetches to start, and who is
// waiting for what. Pure logic: no I/O, no clock, deterministic.
//
// Contract:
// - `plan(offset:length:context:present:)` classifies a read's pages as
//   present (bitmap), already covered by a run (planned or started: never
//   fetched twice) or missing. Missing pages become runs: adjacent pages
//   coalesce, a miss next to a planned-but-not-started run extends it, and no
//   run is longer than `maxRunPages`. A read that needs nothing is a hit
//   (`waiter == nil`); otherwise it gets a waiter, attached to every run it
//   needs, and its `context` (the caller's tag) comes back exactly once: as
//   satisfied (all its runs done) or failed (one of its runs failed).
// - Readahead: a read that starts where the previous one ended (or inside it)
//   is sequential; the window starts at `initialReadaheadPages` and doubles per
//   sequential read up to `maxReadaheadPages`; any other read resets it to 0.
//   When the lead (present or covered pages right after a sequential read) is
//   below half the window, the rest of the window is planned, with no waiter,
//   rounded down to whole runs once it spans one.
//   Never past the image end. Sequentiality is judged per `stream` (a
//   device's queue: each CPU's reads arrive on its own), so readers on
//   different queues do not reset each other's window; `hint` reports a
//   read served without the planner (a hit on another queue) so that its
//   stream's window grows and is refilled as if the planner had seen it.
// - Runs are started by the caller in FIFO order through `startableRuns()`, at
//   most `maxActiveRuns` at once. Only a run not yet started can grow.
// - `progress(run:pagesDone:)` (a contiguous prefix of the run is written and
//   marked present) releases waiters whose pages in that run are all done;
//   `complete(run:success:)` ends a run. Both return the contexts that are
//   now satisfied / failed. The caller marks bits present before calling.
// - Cost: work is per run and per 64-page bitmap word, never per page; a hit
//   allocates nothing.

public struct RunID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let raw: UInt64
    public static func < (a: RunID, b: RunID) -> Bool { a.raw < b.raw }
    public var description: String { "run#\(raw)" }
}

/// A fetch to start: pages [firstPage, firstPage + pageCount), bytes [offset, offset + length).
public struct FetchRun: Equatable, Sendable {
    public let id: RunID
    public let firstPage: UInt64
    public let pageCount: UInt64
    public let offset: UInt64
    public let length: Int
}

public struct ReadPlan: Equatable, Sendable {
    /// Nil: every page is present; serve the read from the cache file now.
    public var waiter: UInt64?
    public var presentPages: UInt64 = 0
    /// Needed pages already covered by runs (planned or started).
    public var inFlightPages: UInt64 = 0
    /// Needed pages added to runs by this read.
    public var newPages: UInt64 = 0
    /// Readahead pages added to runs by this read.
    public var readaheadPages: UInt64 = 0
    /// Runs this read waits for (each counted once).
    public var runsWaitedOn: Int = 0
    public var isHit: Bool { waiter == nil }
}

/// Contexts released by a run's progress or completion.
public struct RunOutcome: Equatable, Sendable {
    public var satisfied: [UInt64] = []
    public var failed: [UInt64] = []
}

public final class FetchPlanner {
    public let imageSize: UInt64
    public let pageSize: Int
    public let pageCount: UInt64
    public let maxRunPages: UInt64
    public let initialReadaheadPages: UInt64
    public let maxReadaheadPages: UInt64
    public let maxActiveRuns: Int

    final class Run {
        let id: RunID
        var first: UInt64
        var end: UInt64
        var started = false
        /// Claimed by a write (`claimForWrite`): never fetched, not counted as active.
        var claimed = false
        var waiters: [UInt64] = []
        init(id: RunID, first: UInt64, end: UInt64) {
            self.id = id
            self.first = first
            self.end = end
        }
    }

    struct Waiter {
        let context: UInt64
        let first: UInt64
        let end: UInt64
        var remaining: Int
        var failed = false
    }

    /// Runs by first page; never overlapping.
    private var ordered: [Run] = []
    private var byID: [UInt64: Run] = [:]
    /// Not yet started, FIFO.
    private var pending: [Run] = []
    private var pendingHead = 0
    private var waiters: [UInt64: Waiter] = [:]
    private var nextRunID: UInt64 = 1
    private var nextWaiterID: UInt64 = 1
    public private(set) var activeRunCount = 0

    // Sequential detection, per stream.
    struct Stream {
        var lastStart: UInt64 = .max
        var lastEnd: UInt64 = .max
        var window: UInt64 = 0
    }
    private var streams: [Stream] = [Stream()]
    /// Stream 0's readahead window.
    public var readaheadWindowPages: UInt64 { streams[0].window }

    /// Pages readahead stops before, sorted (a verified image's pages whose
    /// fetch failed its check): only a read of such a page fetches it again, so
    /// a sequential reader short of it does not fetch it (and fail) at every step.
    public private(set) var readaheadStops: [UInt64] = []
    public static let maxReadaheadStops = 1024

    /// Readahead stops before `page` from now on (the oldest stop goes past the bound).
    public func stopReadahead(before page: UInt64) {
        guard !readaheadStops.contains(page) else { return }
        if readaheadStops.count >= FetchPlanner.maxReadaheadStops { readaheadStops.removeFirst() }
        readaheadStops.insert(page, at: readaheadStops.firstIndex { $0 > page } ?? readaheadStops.count)
    }

    /// `pages` are present again: readahead goes through them.
    public func resumeReadahead(_ pages: Range<UInt64>) {
        if !readaheadStops.isEmpty { readaheadStops.removeAll { pages.contains($0) } }
    }

    public init(imageSize: UInt64, pageSize: Int, maxRunBytes: Int = 4 << 20,
                initialReadaheadBytes: Int = 128 << 10, maxReadaheadBytes: Int = 4 << 20,
                maxActiveRuns: Int = 8) {
        precondition(pageSize > 0 && maxRunBytes >= pageSize && maxActiveRuns > 0)
        self.imageSize = imageSize
        self.pageSize = pageSize
        self.pageCount = (imageSize + UInt64(pageSize) - 1) / UInt64(pageSize)
        self.maxRunPages = UInt64(maxRunBytes / pageSize)
        self.initialReadaheadPages = UInt64(initialReadaheadBytes / pageSize)
        self.maxReadaheadPages = UInt64(max(maxReadaheadBytes, initialReadaheadBytes) / pageSize)
        self.maxActiveRuns = maxActiveRuns
    }

    public var plannedRunCount: Int { pending.count - pendingHead }
    public var runCount: Int { ordered.count }
    public var waiterCount: Int { waiters.count }

    /// Pages [first, end) a byte range touches, clamped to the image.
    @inline(__always)
    public func pages(offset: UInt64, length: Int) -> Range<UInt64> {
        let ps = UInt64(pageSize)
        let a = min(offset / ps, pageCount)
        let b = min((offset + UInt64(length) + ps - 1) / ps, pageCount)
        return a..<max(a, b)
    }

    // MARK: Planning

    public func plan(offset: UInt64, length: Int, context: UInt64, present: PageBits, stream: Int = 0) -> ReadPlan {
        let r = pages(offset: offset, length: length)
        var plan = ReadPlan()
        let sequential = noteAccess(r, stream: stream)
        if r.isEmpty { return plan }

        if present.allSet(r) {
            plan.presentPages = UInt64(r.count)
        } else {
            wait(for: r, context: context, present: present, plan: &plan)
        }
        if sequential { readahead(after: r.upperBound, window: streams[stream].window, present: present, plan: &plan) }
        return plan
    }

    /// Background filling (hydration, profile replay: CachingFill.swift): pages
    /// `r` as a read would need them (missing pages become runs, pages a run
    /// covers are waited for, `context` comes back exactly once, satisfied or
    /// failed), but no stream's sequential state is touched and nothing is read
    /// ahead: a fill is not a reader, and must not grow a reader's window.
    public func planFill(_ r: Range<UInt64>, context: UInt64, present: PageBits) -> ReadPlan {
        let r = r.clamped(to: 0..<pageCount)
        var plan = ReadPlan()
        if r.isEmpty || present.allSet(r) {
            plan.presentPages = UInt64(r.count)
            return plan
        }
        wait(for: r, context: context, present: present, plan: &plan)
        return plan
    }

    /// A waiter for the pages of `r` not present: each is covered by a run
    /// (started or joined), and `context` comes back once they all landed.
    private func wait(for r: Range<UInt64>, context: UInt64, present: PageBits, plan: inout ReadPlan) {
        let key = nextWaiterID
        nextWaiterID += 1
        waiters[key] = Waiter(context: context, first: r.lowerBound, end: r.upperBound, remaining: 0)
        var p = r.lowerBound
        var missing: UInt64 = 0
        while p < r.upperBound, let m = present.nextClear(in: p..<r.upperBound) {
            let e = present.nextSet(in: m..<r.upperBound) ?? r.upperBound
            missing += e - m
            cover(m..<e, waiter: key, plan: &plan, readahead: false)
            p = e
        }
        plan.presentPages = UInt64(r.count) - missing
        plan.waiter = key
        plan.runsWaitedOn = waiters[key]!.remaining
    }

    /// A read of `stream` served without `plan` (its pages were present):
    /// sequential detection and readahead as `plan` would do them, no waiter.
    public func hint(offset: UInt64, length: Int, stream: Int, present: PageBits) -> ReadPlan {
        let r = pages(offset: offset, length: length)
        var plan = ReadPlan()
        if noteAccess(r, stream: stream), !r.isEmpty {
            readahead(after: r.upperBound, window: streams[stream].window, present: present, plan: &plan)
        }
        return plan
    }

    /// A write of bytes [offset, offset + length) needs no fetch when every page
    /// of it that `present` lacks is covered whole by the write (its old content
    /// is overwritten) and no run covers it (no fetch can land on top of it).
    /// Then those pages are claimed: reads of them wait for the claim as for a
    /// fetch, until the caller, the write done and the pages marked present,
    /// ends each claim with `complete(run:success:)`. Returns the claims ([]
    /// when nothing is missing), or nil when a page must be fetched (the write
    /// covers part of it) or waited for first (then `plan` the write as a read).
    public func claimForWrite(offset: UInt64, length: Int, present: PageBits) -> [RunID]? {
        let r = pages(offset: offset, length: length)
        if r.isEmpty || present.allSet(r) { return [] }
        let ps = UInt64(pageSize)
        let end = offset + UInt64(length)
        let headPartial = offset % ps != 0
        let tailPartial = end % ps != 0 && end < imageSize
        var gaps: [Range<UInt64>] = []
        var p = r.lowerBound
        while p < r.upperBound, let m = present.nextClear(in: p..<r.upperBound) {
            let e = present.nextSet(in: m..<r.upperBound) ?? r.upperBound
            if (m == r.lowerBound && headPartial) || (e == r.upperBound && tailPartial) { return nil }
            let i = firstRunIndex(endingAfter: m)
            if i < ordered.count && ordered[i].first < e { return nil }
            gaps.append(m..<e)
            p = e
        }
        return gaps.map { g in
            let run = Run(id: RunID(raw: nextRunID), first: g.lowerBound, end: g.upperBound)
            nextRunID += 1
            run.started = true
            run.claimed = true
            ordered.insert(run, at: firstRunIndex(endingAfter: g.lowerBound))
            byID[run.id.raw] = run
            return run.id
        }
    }

    /// Runs to start now (marked started), FIFO, up to the active limit.
    public func startableRuns() -> [FetchRun] {
        var out: [FetchRun] = []
        while activeRunCount < maxActiveRuns, pendingHead < pending.count {
            let run = pending[pendingHead]
            pendingHead += 1
            run.started = true
            activeRunCount += 1
            out.append(fetchRun(run))
        }
        if pendingHead > 64, pendingHead * 2 > pending.count {
            pending.removeFirst(pendingHead)
            pendingHead = 0
        }
        return out
    }

    /// The first `pagesDone` pages of a started run are present.
    public func progress(run id: RunID, pagesDone: UInt64) -> RunOutcome {
        var out = RunOutcome()
        guard let run = byID[id.raw] else { return out }
        let done = run.first + pagesDone
        var kept: [UInt64] = []
        for key in run.waiters {
            guard var w = waiters[key] else { continue }
            if min(w.end, run.end) <= done {
                w.remaining -= 1
                release(key, w, into: &out)
            } else {
                kept.append(key)
            }
        }
        run.waiters = kept
        return out
    }

    /// A started run ended. On success the caller has marked its pages present.
    public func complete(run id: RunID, success: Bool) -> RunOutcome {
        var out = RunOutcome()
        guard let run = byID.removeValue(forKey: id.raw) else { return out }
        if let i = index(ofRunStarting: run.first) { ordered.remove(at: i) }
        if run.started && !run.claimed { activeRunCount -= 1 }
        for key in run.waiters {
            guard var w = waiters[key] else { continue }
            w.remaining -= 1
            if !success && !w.failed {
                w.failed = true
                out.failed.append(w.context)
            }
            release(key, w, into: &out)
        }
        return out
    }

    /// The run covering `page`, if any.
    public func run(covering page: UInt64) -> FetchRun? {
        let i = firstRunIndex(endingAfter: page)
        guard i < ordered.count, ordered[i].first <= page else { return nil }
        return fetchRun(ordered[i])
    }

    // MARK: Internals

    private func release(_ key: UInt64, _ w: Waiter, into out: inout RunOutcome) {
        if w.remaining == 0 {
            waiters.removeValue(forKey: key)
            if !w.failed { out.satisfied.append(w.context) }
        } else {
            waiters[key] = w
        }
    }

    private func fetchRun(_ run: Run) -> FetchRun {
        let ps = UInt64(pageSize)
        let offset = run.first * ps
        let end = min(run.end * ps, imageSize)
        return FetchRun(id: run.id, firstPage: run.first, pageCount: run.end - run.first,
                        offset: offset, length: Int(end - offset))
    }

    /// Updates the sequential state; returns whether this read is sequential.
    private func noteAccess(_ r: Range<UInt64>, stream: Int) -> Bool {
        while streams.count <= stream { streams.append(Stream()) }
        var s = streams[stream]
        let sequential = s.lastEnd != .max && r.lowerBound >= s.lastStart && r.lowerBound <= s.lastEnd
        if sequential {
            s.window = s.window == 0 ? initialReadaheadPages : min(s.window * 2, maxReadaheadPages)
        } else {
            s.window = 0
        }
        s.lastStart = r.lowerBound
        s.lastEnd = r.upperBound
        streams[stream] = s
        return sequential && s.window > 0
    }

    private func readahead(after start: UInt64, window readaheadWindowPages: UInt64, present: PageBits, plan: inout ReadPlan) {
        let stop = readaheadStops.first { $0 >= start } ?? pageCount
        let limit = min(start + readaheadWindowPages, pageCount, stop)
        guard start < limit else { return }
        // The first page that is neither present nor covered by a run.
        var p = start
        var gap: UInt64?
        while p < limit, let m = present.nextClear(in: p..<limit) {
            let i = firstRunIndex(endingAfter: m)
            if i < ordered.count, ordered[i].first <= m {
                p = ordered[i].end
            } else {
                gap = m
                break
            }
        }
        guard let first = gap, first - start < readaheadWindowPages / 2 else { return }
        // Refill in whole runs once the window is that large: a refill of 4.5 runs
        // would otherwise leave a small request behind every large one.
        var want = start + readaheadWindowPages - first
        if want >= maxRunPages { want = want / maxRunPages * maxRunPages }
        let end = min(first + want, limit)
        p = first
        while p < end, let m = present.nextClear(in: p..<end) {
            let e = present.nextSet(in: m..<end) ?? end
            cover(m..<e, waiter: nil, plan: &plan, readahead: true)
            p = e
        }
    }

    /// Puts every page of `range` (all absent from the bitmap) into a run, and
    /// attaches `waiter` to each run involved.
    private func cover(_ range: Range<UInt64>, waiter: UInt64?, plan: inout ReadPlan, readahead: Bool) {
        var cur = range.lowerBound
        var i = firstRunIndex(endingAfter: cur)
        while cur < range.upperBound {
            if i < ordered.count, ordered[i].first <= cur {
                // Covered by an existing run.
                let run = ordered[i]
                let upto = min(run.end, range.upperBound)
                if !readahead { plan.inFlightPages += upto - cur }
                attach(waiter, to: run)
                cur = upto
                i += 1
                continue
            }
            let gapEnd = i < ordered.count ? min(ordered[i].first, range.upperBound) : range.upperBound
            i = addPages(cur..<gapEnd, waiter: waiter, at: i)
            if readahead { plan.readaheadPages += gapEnd - cur } else { plan.newPages += gapEnd - cur }
            cur = gapEnd
        }
    }

    /// Adds uncovered pages `gap` to runs: extends the planned run ending at
    /// gap.lowerBound, prepends to the planned run starting at gap.upperBound,
    /// and makes new runs for the rest. `i` is the index of the first run after
    /// the gap; returns the index of the first run after the gap afterwards.
    private func addPages(_ gap: Range<UInt64>, waiter: UInt64?, at index: Int) -> Int {
        var i = index
        var lo = gap.lowerBound
        let hi = gap.upperBound
        // Extend the left neighbour.
        if i > 0 {
            let left = ordered[i - 1]
            if !left.started, left.end == lo, left.end - left.first < maxRunPages {
                let take = min(maxRunPages - (left.end - left.first), hi - lo)
                left.end += take
                lo += take
                attach(waiter, to: left)
            }
        }
        guard lo < hi else { return i }
        // Prepend to the right neighbour.
        var hiNew = hi
        if i < ordered.count {
            let right = ordered[i]
            if !right.started, right.first == hi, right.end - right.first < maxRunPages {
                let take = min(maxRunPages - (right.end - right.first), hi - lo)
                right.first -= take
                hiNew -= take
                attach(waiter, to: right)
            }
        }
        // New runs for the rest, each at most maxRunPages.
        var p = lo
        while p < hiNew {
            let e = min(p + maxRunPages, hiNew)
            let run = Run(id: RunID(raw: nextRunID), first: p, end: e)
            nextRunID += 1
            ordered.insert(run, at: i)
            i += 1
            byID[run.id.raw] = run
            pending.append(run)
            attach(waiter, to: run)
            p = e
        }
        return i
    }

    @inline(__always)
    private func attach(_ waiter: UInt64?, to run: Run) {
        guard let key = waiter else { return }
        if run.waiters.last == key { return }
        run.waiters.append(key)
        waiters[key]!.remaining += 1
    }

    /// Index of the first run whose end is after `page` (binary search).
    private func firstRunIndex(endingAfter page: UInt64) -> Int {
        var lo = 0, hi = ordered.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if ordered[mid].end <= page { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    private func index(ofRunStarting page: UInt64) -> Int? {
        let i = firstRunIndex(endingAfter: page)
        return i < ordered.count && ordered[i].first == page ? i : nil
    }
}
