// Prefetcher: fills the missing pages of a byte range of a cache from its
// HTTP source, without a device (`ublk-http prefetch`): what `add -t http`
// would fetch on reads, fetched ahead, into the same files.
//
// Contract: only pages absent from the present bitmap are fetched (a local
// overlay's written pages are present, so never fetched over); runs of at
// most `maxRunBytes`, `maxConnections` at once; a page's bit is set after
// its bytes are in the cache file and persisted after the cache file's
// fdatasync (every `commitInterval` and at the end), as in CachingHandler.
// Blocking: it runs the source's loop on the calling thread.
public final class Prefetcher {
    public let source: HTTPSource
    public let bitmap: Bitmap
    public let cache: CacheFile
    public let imageSize: UInt64
    public let maxConnections: Int
    public var maxRunBytes = 4 << 20
    public var commitInterval: UInt64 = 2_000_000_000

    public init(source: HTTPSource, bitmap: Bitmap, cache: CacheFile, imageSize: UInt64, maxConnections: Int) {
        self.source = source
        self.bitmap = bitmap
        self.cache = cache
        self.imageSize = imageSize
        self.maxConnections = max(1, maxConnections)
    }

    /// The missing pages of `bytes`, cut into runs of at most `maxRunBytes`.
    public func missingRuns(in bytes: Range<UInt64>) -> [Range<UInt64>] {
        let ps = UInt64(bitmap.pageSize)
        let pages = bytes.lowerBound / ps..<(bytes.upperBound + ps - 1) / ps
        var runs: [Range<UInt64>] = []
        var p = pages.lowerBound
        let maxPages = max(1, UInt64(maxRunBytes) / ps)
        while p < pages.upperBound, let m = bitmap.bits.nextClear(in: p..<pages.upperBound) {
            let e = bitmap.bits.nextSet(in: m..<pages.upperBound) ?? pages.upperBound
            var s = m
            while s < e { runs.append(s..<min(e, s + maxPages)); s = min(e, s + maxPages) }
            p = e
        }
        return runs
    }

    /// Bytes the runs cover.
    public func byteCount(_ runs: [Range<UInt64>]) -> UInt64 {
        let ps = UInt64(bitmap.pageSize)
        return runs.reduce(UInt64(0)) { $0 + min($1.upperBound * ps, imageSize) - $1.lowerBound * ps }
    }

    public enum Failure: Error, CustomStringConvertible {
        case fetch(HTTPError)
        case persist(BitmapError)
        public var description: String {
            switch self {
            case .fetch(let e): return e.description
            case .persist(let e): return "cannot persist the bitmap: \(e)"
            }
        }
    }

    /// Fetches `runs`; `received(n)` for every chunk stored, `tick()` a few times a second.
    public func fetch(_ runs: [Range<UInt64>], received: @escaping (UInt64) -> Void, tick: () -> Void) throws(Failure) {
        let ps = UInt64(bitmap.pageSize)
        var next = 0, active = 0
        var failure: HTTPError?
        var lastCommit = monotonicNanos()
        let bitmap = self.bitmap, cache = self.cache
        func startMore() {
            while active < maxConnections && next < runs.count && failure == nil {
                let run = runs[next]
                next += 1
                active += 1
                let offset = run.lowerBound * ps
                let length = Int(min(run.upperBound * ps, imageSize) - offset)
                source.fetch(offset: offset, length: length, onData: { off, data in
                    guard (try? cache.write(data, at: off)) != nil else { return false }
                    received(UInt64(data.count))
                    return true
                }, completion: { [self] result in
                    active -= 1
                    switch result {
                    case .success: bitmap.markPresent(run)
                    case .failure(let e): failure = failure ?? e
                    }
                    if monotonicNanos() &- lastCommit > commitInterval {
                        try? bitmap.commit(syncing: cache)
                        lastCommit = monotonicNanos()
                    }
                    startMore()
                })
            }
        }
        startMore()
        while !source.isIdle { source.runUntilIdle(timeout: 0.25); tick() }
        do { try bitmap.commit(syncing: cache) } catch { throw .persist(error) }
        if let failure { throw .fetch(failure) }
    }
}
