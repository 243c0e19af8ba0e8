// CachingControl: the control operations of the caching targets (`dirty`,
// `sync`, `flush`), answered on queue 0's ring through the control socket.
//
// Contract of `sync` (a live device; the CLI side is UblkCLI/Dirty.swift):
// - `sync-begin` lists the dirty pages and records them as a snapshot under a
//   fresh token. It clears nothing: until the client confirms, every page stays
//   dirty in memory and on disk.
// - Every write or discard that completes from then on (`SyncTracker.written`,
//   called by the handler) is subtracted from every outstanding snapshot: its
//   page may hold data newer than what the client copied.
// - `sync-end ok` (sent only after the replica was fdatasync'ed) clears the
//   snapshot's pages minus those written since `sync-begin`, then persists the
//   dirty bitmap. `sync-end` failed clears nothing.
// - No `sync-end` at all (the client was killed, the server died, power went
//   out) clears nothing: running `sync` again copies every page not durably
//   copied, and the replica is exact.
// - At most `SyncTracker.limit` snapshots are kept; a `sync-begin` past that
//   drops the oldest, whose `sync-end` is then refused as an unknown token
//   (its pages stay dirty). Tokens start at a random value, so a token from
//   before a server restart does not confirm another client's snapshot.
import Glibc
import PageCache

/// `sync` snapshots handed out and not yet confirmed (the contract above).
/// Memory: a snapshot holds its page runs (as many as the reply listed) and at
/// most `max(foldThreshold, runs)` unfolded writes; at most `limit` snapshots.
struct SyncTracker {
    static let limit = 16
    static let foldThreshold = 64

    struct Snapshot {
        let token: UInt64
        /// Pages dirty at sync-begin, sorted and disjoint, less the writes folded in so far.
        var runs: [Range<UInt64>]
        /// Pages written since sync-begin (within `span`), not yet subtracted from `runs`.
        var written: [Range<UInt64>] = []
        /// From the first run's start to the last run's end: writes outside it do not matter.
        var span: Range<UInt64>

        init(token: UInt64, runs: [Range<UInt64>]) {
            self.token = token
            self.runs = runs
            span = (runs.first?.lowerBound ?? 0)..<(runs.last?.upperBound ?? 0)
        }

        mutating func record(_ pages: Range<UInt64>) {
            if let last = written.last, pages.lowerBound <= last.upperBound, pages.upperBound >= last.lowerBound {
                written[written.count - 1] = min(last.lowerBound, pages.lowerBound)..<max(last.upperBound, pages.upperBound)
            } else {
                written.append(pages)
            }
            if written.count > max(SyncTracker.foldThreshold, runs.count) { fold() }
        }

        /// Subtracts the recorded writes from the runs.
        mutating func fold() {
            guard !written.isEmpty else { return }
            runs = SyncTracker.subtract(SyncTracker.merge(written), from: runs)
            written = []
            span = (runs.first?.lowerBound ?? 0)..<(runs.last?.upperBound ?? 0)
        }
    }

    /// Outstanding snapshots, oldest first.
    private(set) var snapshots: [Snapshot] = []
    private var nextToken: UInt64

    /// Tokens stay below 2^53, so any JSON reader keeps them exact.
    init(firstToken: UInt64 = UInt64.random(in: 1..<(1 << 52))) { nextToken = firstToken }

    /// Records the pages dirty now as a snapshot; returns its token. Drops the oldest past `limit`.
    mutating func begin(_ runs: [Range<UInt64>]) -> UInt64 {
        let token = nextToken
        nextToken = nextToken >= (1 << 53) - 1 ? 1 : nextToken + 1
        if snapshots.count >= SyncTracker.limit { snapshots.removeFirst(snapshots.count - SyncTracker.limit + 1) }
        snapshots.append(Snapshot(token: token, runs: runs))
        return token
    }

    /// A write or discard of `pages` completed (called by the handler for every one).
    mutating func written(_ pages: Range<UInt64>) {
        if snapshots.isEmpty || pages.isEmpty { return }
        for i in snapshots.indices {
            let span = snapshots[i].span
            let lo = max(pages.lowerBound, span.lowerBound), hi = min(pages.upperBound, span.upperBound)
            if lo < hi { snapshots[i].record(lo..<hi) }
        }
    }

    /// Ends the snapshot `token`: the pages to clear (none when the copy failed),
    /// or nil when the token is unknown (never given, already ended, or dropped).
    mutating func end(_ token: UInt64, ok: Bool) -> [Range<UInt64>]? {
        guard let i = snapshots.firstIndex(where: { $0.token == token }) else { return nil }
        var s = snapshots.remove(at: i)
        guard ok else { return [] }
        s.fold()
        return s.runs
    }

    /// Sorted, merged (overlapping or adjacent ranges joined).
    static func merge(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for r in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) where !r.isEmpty {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// `runs` minus `cuts` (both sorted and disjoint).
    static func subtract(_ cuts: [Range<UInt64>], from runs: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        out.reserveCapacity(runs.count)
        var j = 0
        for r in runs {
            var start = r.lowerBound
            while j < cuts.count && cuts[j].upperBound <= start { j += 1 }
            var k = j
            while k < cuts.count && cuts[k].lowerBound < r.upperBound {
                if cuts[k].lowerBound > start { out.append(start..<cuts[k].lowerBound) }
                start = max(start, cuts[k].upperBound)
                k += 1
            }
            if start < r.upperBound { out.append(start..<r.upperBound) }
        }
        return out
    }
}

/// The dirty-tracking operations on a dirty bitmap and its sync snapshots,
/// apart from the handler so that the host tests drive them directly.
enum DirtyControl {
    struct SyncEnded: Encodable {
        var ok: Bool
        var pagesCleared: UInt64
        enum CodingKeys: String, CodingKey { case ok, pagesCleared = "pages_cleared" }
    }

    /// The reply. `clear` clears dirty bits and persists that (the handler's
    /// policy: it may keep pages whose data a failed data sync may have lost).
    static func answer(_ request: ControlRequest, dirty: Bitmap, syncs: inout SyncTracker,
                       pageSize: UInt64, imageSize: UInt64, clear: ([Range<UInt64>]) -> Void) -> String {
        switch request.op {
        case .dirty:
            let runs = DirtyExtents.runs(dirty.bits)
            let reply = DirtyExtents(runs: runs, pageSize: pageSize, imageSize: imageSize, token: nil)
            if request.clear == true && !runs.isEmpty { clear(runs) }
            return controlJSON(reply)
        case .syncBegin:
            // Nothing is cleared here: see the contract above.
            let runs = DirtyExtents.runs(dirty.bits)
            let token = syncs.begin(runs)
            return controlJSON(DirtyExtents(runs: runs, pageSize: pageSize, imageSize: imageSize, token: token))
        case .syncEnd:
            guard let token = request.token, let confirmed = syncs.end(token, ok: request.ok == true) else {
                return controlError("unknown sync token (more than \(SyncTracker.limit) syncs began since, or the server restarted); its pages stay dirty")
            }
            // The replica holds these pages durably, and none was written since sync-begin.
            let before = dirty.count
            if !confirmed.isEmpty { clear(confirmed) }
            return controlJSON(SyncEnded(ok: true, pagesCleared: before - min(before, dirty.count)))
        case .flush:
            return controlError("this device has no write-back")
        case .profileStart, .profileStop, .profileStatus, .profileReplay:
            return controlError("not a dirty-tracking operation")
        case .hydrate, .fillStatus, .fillStop:
            return controlError("\(request.op.rawValue) is a fill operation (CachingFill.swift)")
        case .verify, .verifyStatus:
            return controlError("\(request.op.rawValue) is a verified image's operation (CachingVerify.swift)")
        }
    }
}

extension CachingHandler {
    // MARK: Control (dirty tracking)

    func control(_ request: ControlRequest, queue: IOQueue) -> String {
        if let reply = profileControl(request, queue: queue) { return reply }
        if let reply = fillControl(request, queue: queue) { return reply }
        if let reply = verifyControl(request, queue: queue) { return reply }
        if request.op == .flush {
            guard let wb = context.writeback else { return controlJSON(WritebackStatus(writebackPages: 0, inFlight: false, unpersisted: false)) }
            startWriteback(queue)
            // (copied pages too: their bits go with the next full cycle)
            if wb.bits.hasChanged || writebackCopy.hasCopied { startCycle(queue) }
            return controlJSON(WritebackStatus(writebackPages: wb.count, inFlight: writebackCopy.isCopying || cycle != nil,
                                               unpersisted: wb.bits.hasChanged || writebackCopy.hasCopied))
        }
        guard let dirty else { return controlError("ublk\(queue.deviceID) does not track written pages") }
        // Clearing is the handler's: it keeps pages a failed data sync may have lost.
        return DirtyControl.answer(request, dirty: dirty, syncs: &syncs, pageSize: pageSize, imageSize: imageSize) { runs in
            clearDirty(runs, queue: queue)
        }
    }
}
