// CachingEviction: keeping the cache file under --cache-max-size. Only pages
// the cache holds a clean copy of go (never local or write-back ones, nor
// pages under I/O); their bits are cleared and made durable by a full cycle
// first, and only then punched, while new requests wait (CachingHandler.swift).
import CUring
import Glibc
import PageCache

extension CachingHandler {
    // MARK: Eviction


    /// Pages some I/O in flight covers: requests on the cache file, the write-back copy.
    func pinnedRanges() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for case let r? in slots.map(\.request) { out.append(planner.pages(offset: r.offset, length: max(Int(r.length), 1))) }
        if let run = writebackRun { out.append(run.pages) }
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
        var present = bitmap.count * ps
        guard present > context.maxCacheBytes else { return }
        let target = context.maxCacheBytes - context.maxCacheBytes / 8  // some slack
        let perChunk = UInt64(1) << CachingHandler.chunkShift / ps
        guard let chunks = context.chunks else { return }
        let uses = (0..<chunks.count).map { chunks.use($0) }
        let order = uses.indices.sorted { uses[$0] < uses[$1] }
        let pinned = pinnedRanges()
        for c in order where present > target {
            let chunk = UInt64(c) * perChunk..<min(UInt64(c + 1) * perChunk, bitmap.pageCount)
            if chunk.isEmpty || bitmap.bits.count(in: chunk) == 0 { continue }
            var p = chunk.lowerBound
            while p < chunk.upperBound, let s = bitmap.bits.nextSet(in: p..<chunk.upperBound) {
                let e = bitmap.bits.nextClear(in: s..<chunk.upperBound) ?? chunk.upperBound
                var q = s
                while q < e {
                    if mustKeep(q, pinned: pinned) { q += 1; continue }
                    var r = q
                    while r < e && !mustKeep(r, pinned: pinned) { r += 1 }
                    bitmap.markAbsent(q..<r)
                    trace?("evict \(q..<r)")
                    evicting.append(q..<r)
                    present -= UInt64(r - q) * ps
                    q = r
                }
                p = e
            }
        }
        if !evicting.isEmpty { startCycle(queue, full: true) }
    }

    /// The cleared bits are durable. With one queue: punch now. With several,
    /// after a grace period (CachingMesh.swift): another queue may have tested
    /// a bit before it was cleared and still be reading the page.
    func punchAfterGrace(_ ranges: [Range<UInt64>], queue: IOQueue) {
        guard mesh != nil else { return punchEvicted(ranges, queue: queue) }
        graceNext += ranges
        advanceGrace(queue)
    }

    /// Punches what the ended grace period covered; starts the next one for what waits.
    func advanceGrace(_ queue: IOQueue) {
        guard let m = mesh else { return }
        while true {
            if m.gracePending {
                guard m.graceEnded() else { return }
                let ranges = graceRanges
                graceRanges = []
                if !ranges.isEmpty { punchEvicted(ranges, queue: queue) }
            }
            guard !graceNext.isEmpty else { return }
            // These bits were cleared before this flip (and persisted): see the proof in CachingMesh.swift.
            graceRanges = graceNext
            graceNext = []
            _ = m.flip()
        }
    }

    /// The cleared bits are durable: punch out what is still absent and not
    /// under I/O. Requests wait until the punches are done (`deferred`).
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
                punchesInFlight += 1
                trace?("punch \(p..<e)")
                queue.fallocate(fd: cacheFD, mode: cu_falloc_punch, offset: p * ps, length: min(e * ps, imageSize) - p * ps,
                                tag: Queue.internalTag, sub: Sub.evictPunch.rawValue)
                p = e
            }
        }
    }

    func punched(_ result: Int32, queue: IOQueue) {
        if result < 0 { log("ublk-http: punching evicted pages failed: \(Errno(returned: result))") }
        punchesInFlight -= 1
        guard punchesInFlight == 0 else { return }
        let waiting = deferred
        deferred = []
        for r in waiting { handle(r, queue: queue) }
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
