// CachingEviction: keeping the cache file under --cache-max-size. Only pages
// the cache holds a clean copy of go (never local or write-back ones, nor
// pages under I/O); their bits are cleared and made durable by a full cycle
// first, and only then punched, while new requests wait (CachingHandler.swift).
// `Eviction` owns that state and the choice of pages; the handler runs its
// I/O on the ring.
import CUring
import Glibc
import PageCache

/// Evicted pages on their way out. A range moves through: `cleared` (bits
/// cleared in memory; the next full cycle carries it, `takeCleared`), then,
/// once that cycle made the bits durable, `durable`: with one queue it is
/// punched at once; with several it waits for a grace period (CachingMesh.swift)
/// in `graceNext` (cleared after the running period's flip) and `graceRanges`
/// (before it). While punches are in flight, new requests wait in `deferred`.
struct Eviction {
    private(set) var cleared: [Range<UInt64>] = []
    private var graceRanges: [Range<UInt64>] = []
    private var graceNext: [Range<UInt64>] = []
    private(set) var punchesInFlight = 0
    private var deferred: [Request] = []
    /// What made the last choice fall short of its target (every page left
    /// was one to keep): nothing is chosen again until it changes.
    var futile: [UInt64]?

    /// Punches are in flight: nothing may touch the cache file's holes meanwhile.
    var isPunching: Bool { punchesInFlight > 0 }

    /// `pages`' present bits were cleared: they go out once that is durable.
    mutating func clearedBits(_ pages: Range<UInt64>) { cleared.append(pages) }

    /// What a full cycle persists and then hands back to `durable`.
    mutating func takeCleared() -> [Range<UInt64>] {
        defer { cleared = [] }
        return cleared
    }

    /// The least recently used chunks first (`uses`: each chunk's last use),
    /// clears present pages that `mustKeep` allows until at most `target`
    /// bytes are present; returns the bytes present after it.
    mutating func choose(_ bitmap: Bitmap, uses: [UInt32], pagesPerChunk: UInt64, pageSize: UInt64,
                         present start: UInt64, target: UInt64, mustKeep: (UInt64) -> Bool,
                         trace: ((String) -> Void)?) -> UInt64 {
        var present = start
        for c in uses.indices.sorted(by: { uses[$0] < uses[$1] }) where present > target {
            let chunk = UInt64(c) * pagesPerChunk..<min(UInt64(c + 1) * pagesPerChunk, bitmap.pageCount)
            if chunk.isEmpty || bitmap.bits.count(in: chunk) == 0 { continue }
            var p = chunk.lowerBound
            while p < chunk.upperBound, let s = bitmap.bits.nextSet(in: p..<chunk.upperBound) {
                let e = bitmap.bits.nextClear(in: s..<chunk.upperBound) ?? chunk.upperBound
                var q = s
                while q < e {
                    if mustKeep(q) { q += 1; continue }
                    var r = q
                    while r < e && !mustKeep(r) { r += 1 }
                    bitmap.markAbsent(q..<r)
                    trace?("evict \(q..<r)")
                    cleared.append(q..<r)
                    present -= UInt64(r - q) * pageSize
                    q = r
                }
                p = e
            }
        }
        return present
    }

    /// The cleared bits of `ranges` are durable: what to punch now (one
    /// queue), or nothing yet (several: after a grace period, `advance`).
    mutating func durable(_ ranges: [Range<UInt64>], mesh: CachingMesh?) -> [Range<UInt64>] {
        guard mesh != nil else { return ranges }
        graceNext += ranges
        return []
    }

    /// Whether a grace period runs or ranges wait for one.
    func graceWaiting(_ mesh: CachingMesh) -> Bool { !graceNext.isEmpty || mesh.gracePending }

    /// The ranges whose grace period has ended (punch them); starts the next
    /// period for what waits.
    mutating func advance(_ mesh: CachingMesh) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        while true {
            if mesh.gracePending {
                guard mesh.graceEnded() else { return out }
                out += graceRanges
                graceRanges = []
            }
            guard !graceNext.isEmpty else { return out }
            // These bits were cleared before this flip (and persisted): see the proof in CachingMesh.swift.
            graceRanges = graceNext
            graceNext = []
            _ = mesh.flip()
        }
    }

    /// A request waits for the punches in flight.
    mutating func wait(_ r: Request) { deferred.append(r) }

    mutating func punchIssued() { punchesInFlight += 1 }

    /// A punch completed: the requests that waited, once it was the last.
    mutating func punchCompleted() -> [Request] {
        punchesInFlight -= 1
        return punchesInFlight == 0 ? takeWaiting() : []
    }

    /// The requests waiting (none while punches are in flight: they end them).
    mutating func takeWaiting() -> [Request] {
        guard punchesInFlight == 0 else { return [] }
        defer { deferred = [] }
        return deferred
    }
}

extension CachingHandler {
    // MARK: Eviction

    /// Pages some I/O in flight covers: requests on the cache file, the write-back copy.
    func pinnedRanges() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for case let r? in slots.map(\.request) { out.append(planner.pages(offset: r.offset, length: max(Int(r.length), 1))) }
        if let run = writebackCopy.pages { out.append(run) }
        return out
    }

    /// Whether `page` must stay: local data, pending write-back, being fetched, or under I/O.
    func mustKeep(_ page: UInt64, pinned: [Range<UInt64>]) -> Bool {
        (local?.test(page) ?? false) || (writeback?.test(page) ?? false)
            || planner.run(covering: page) != nil || pinned.contains { $0.contains(page) }
    }

    /// Over the bound: clear the bits of clean pages in the least recently used
    /// chunks (never local or write-back pages, nor pages under I/O), persist
    /// that through a full cycle, and only then punch the pages out.
    func evictIfNeeded(_ queue: IOQueue) {
        let ps = UInt64(context.pageSize)
        let present = bitmap.count * ps
        guard present > context.maxCacheBytes, let chunks = context.chunks else { return }
        // A cache full of pages to keep (write-back pending, local, under I/O)
        // is not scanned again, page by page, on every turn of the loop: only
        // once one of those counts moved.
        let pinned = pinnedRanges()
        let state = [bitmap.count, writeback?.count ?? 0, local?.count ?? 0, UInt64(pinned.count),
                     UInt64(planner.plannedRunCount), writebackCopy.hasCopied ? 1 : 0]
        if eviction.futile == state { return }
        let target = context.maxCacheBytes - context.maxCacheBytes / 8  // some slack
        let after = eviction.choose(bitmap, uses: (0..<chunks.count).map { chunks.use($0) },
                                    pagesPerChunk: UInt64(1) << CachingHandler.chunkShift / ps, pageSize: ps,
                                    present: present, target: target,
                                    mustKeep: { self.mustKeep($0, pinned: pinned) }, trace: trace)
        eviction.futile = after > target && eviction.cleared.isEmpty ? state : nil
        if !eviction.cleared.isEmpty { startCycle(queue, full: true) }
    }

    /// The cleared bits are durable: punch now, or after a grace period.
    func punchAfterGrace(_ ranges: [Range<UInt64>], queue: IOQueue) {
        let now = eviction.durable(ranges, mesh: mesh)
        if !now.isEmpty { punchEvicted(now, queue: queue) }
        advanceGrace(queue)
    }

    /// Punches what an ended grace period covered; starts the next one for what waits.
    func advanceGrace(_ queue: IOQueue) {
        guard let m = mesh else { return }
        let ranges = eviction.advance(m)
        if !ranges.isEmpty { punchEvicted(ranges, queue: queue) }
    }

    /// The cleared bits are durable: punch out what is still absent and not
    /// under I/O. Requests wait until the punches are done.
    func punchEvicted(_ ranges: [Range<UInt64>], queue: IOQueue) {
        let ps = UInt64(context.pageSize)
        let pinned = pinnedRanges()
        let gone = { (p: UInt64) -> Bool in !self.bitmap.test(p) && !self.mustKeep(p, pinned: pinned) }
        for range in ranges {
            var p = range.lowerBound
            while p < range.upperBound {
                if !gone(p) { p += 1; continue }
                var e = p
                while e < range.upperBound && gone(e) { e += 1 }
                eviction.punchIssued()
                trace?("punch \(p..<e)")
                queue.fallocate(fd: cacheFD, mode: cu_falloc_punch, offset: p * ps, length: min(e * ps, imageSize) - p * ps,
                                tag: Queue.internalTag, sub: Sub.evictPunch.rawValue)
                p = e
            }
        }
    }

    func punched(_ result: Int32, queue: IOQueue) {
        if result < 0 { log("ublk-http: punching evicted pages failed: \(Errno(returned: result))") }
        for r in eviction.punchCompleted() { handle(r, queue: queue) }
    }
}
/// When each 1 MiB chunk of the image was last used (a clock shared by the
/// device's queues, each of which stamps what its requests touch). Relaxed
/// atomics: an LRU order that is off by a few concurrent requests is fine.
final class ChunkUse {
    let count: Int
    private let uses: UnsafeMutablePointer<UInt32>
    private let clock: UnsafeMutablePointer<UInt32>

    init(chunks: Int) {
        count = chunks
        uses = .allocate(capacity: chunks)
        uses.initialize(repeating: 0, count: chunks)
        clock = .allocate(capacity: 1)
        clock.initialize(to: 0)
    }

    deinit {
        uses.deallocate()
        clock.deallocate()
    }

    @inline(__always)
    func touch(offset: UInt64, length: UInt32) {
        let now = cu_atomic_add_relaxed_u32(clock, 1)
        let first = Int(offset >> CachingHandler.chunkShift)
        let last = Int((offset + UInt64(max(length, 1)) - 1) >> CachingHandler.chunkShift)
        guard first < count else { return }
        for c in first...min(last, count - 1) { cu_atomic_store_relaxed_u32(uses + c, now) }
    }

    @inline(__always)
    func use(_ chunk: Int) -> UInt32 { cu_atomic_load_relaxed_u32(uses + chunk) }
}
