// http: a remote disk image (HTTP(S) with Range, or S3) as a read-only block
// device, fetched on demand into a persistent page cache.
//
// A read whose pages are all present in the bitmap is served from the cache
// file by an io_uring READ and never leaves the ring. Otherwise the planner
// merges its missing pages with neighbours and with runs already in flight;
// each run is one Range GET through libcurl multi, driven from this queue's
// ring (the source's epoll fd is polled on the ring). Body bytes are written
// into the cache file as they arrive; as each page completes its bit is set in
// memory and the reads waiting for it are served from the cache file.
//
// Crash rule: the bitmap on disk lags behind memory. Every `persistInterval`
// (and at shutdown) the dirty bitmap words are staged, the cache file is
// fdatasync'ed through the ring, and only then the staged words are written
// and the bitmap fdatasync'ed. After `kill -9` the cache may have pages the
// bitmap does not claim (fetched again), never the reverse.
//
// Writable (`writable`): the cache file becomes a persistent local overlay. A
// WRITE, DISCARD or WRITE_ZEROES first makes every page it touches present
// (fetching what is missing, so partial pages are merged correctly and no
// fetch still in flight can land on top of it), then writes (or punches) the
// cache file and marks the pages present and dirty. The remote object is
// never modified. A FLUSH (and a FUA write) completes only after a sync
// cycle: stage both bitmaps, fdatasync the cache file, persist them. So a
// dirty bit is on disk before the write that set it is acknowledged by a FLUSH.
//
// Contract: one queue (the page bitmap and planner are single-threaded); every
// request completes: with data, -EIO when its fetch finally failed, or -EIO
// at drain (device stopping).
import CUring
import Glibc
import PageCache

public struct HTTPTargetOptions {
    public var http: HTTPConfig
    public var cachePath: String
    public var bitmapPath: String
    public var pageSize = 4096
    public var readaheadBytes = 8 << 20
    public var maxRunBytes = 4 << 20
    /// A local overlay: writes go to the cache file and are tracked in `dirtyPath`.
    public var writable = false
    public var dirtyPath: String { bitmapPath + ".dirty" }

    public init(http: HTTPConfig, cachePath: String, bitmapPath: String) {
        self.http = http
        self.cachePath = cachePath
        self.bitmapPath = bitmapPath
    }
}

public final class HTTPTarget: Target {
    public let name = "http"
    public let params: DeviceParams
    public let settings: HTTPTargetOptions
    public let remote: RemoteImage
    /// What happened to the cache at open: fresh, reused, or started afresh (and why).
    public let cacheState: String
    let cache: CacheFile
    let bitmap: Bitmap
    /// Pages written locally since the last clear (writable only).
    let dirty: Bitmap?
    public let stats = CacheStats()

    public var options: [String: String] {
        [
            "url": settings.http.url, "cache": settings.cachePath, "bitmap": settings.bitmapPath,
            "page_size": String(settings.pageSize), "image_size": String(remote.size),
            "etag": remote.etag ?? "", "last_modified": remote.lastModified ?? "", "cache_state": cacheState,
            "writable": settings.writable ? "true" : "false",
        ].merging(settings.writable ? ["dirty_bitmap": settings.dirtyPath] : [:]) { a, _ in a }
    }

    public init(_ o: HTTPTargetOptions) throws(UblkError) {
        settings = o
        guard o.pageSize >= 512, o.pageSize.nonzeroBitCount == 1, o.pageSize <= 1 << 20 else {
            throw UblkError("--page-size must be a power of two between 512 and 1M, not \(o.pageSize)")
        }
        do {
            let probe = try HTTPSource(config: o.http)
            remote = try probe.probeBlocking()
        } catch {
            throw UblkError(error.description)
        }
        guard remote.size > 0 else { throw UblkError("\(o.http.url) is empty: nothing to serve") }
        let identity = BitmapIdentity(kind: .present, pageSize: o.pageSize, imageSize: remote.size,
                                      url: o.http.url, etag: remote.etag, lastModified: remote.lastModified)
        let opened: (bitmap: Bitmap, outcome: BitmapOutcome)
        do { opened = try Bitmap.open(path: o.bitmapPath, identity: identity) } catch {
            throw UblkError("bitmap \(o.bitmapPath): \(error)")
        }
        bitmap = opened.bitmap
        do { cache = try CacheFile(path: o.cachePath, size: remote.size) } catch {
            throw UblkError("cache file: \(error)")
        }
        // Local writes (the dirty bitmap) must never be dropped or served unasked.
        var dirtyBitmap: Bitmap?
        var dirtyOutcome: BitmapOutcome = .fresh
        if o.writable {
            var id = identity
            id.kind = .dirty
            do {
                let d = try Bitmap.open(path: o.dirtyPath, identity: id)
                dirtyBitmap = d.bitmap
                dirtyOutcome = d.outcome
            } catch {
                throw UblkError("dirty bitmap \(o.dirtyPath): \(error)")
            }
        } else if let info = try? Bitmap.inspect(path: o.dirtyPath), info.present > 0 {
            throw UblkError("the cache \(o.cachePath) holds \(info.present) locally written pages: add it with --writable")
        }
        dirty = dirtyBitmap
        switch opened.outcome {
        case .fresh:
            cacheState = "fresh"
        case .reused:
            cacheState = "reused"
        case .invalidated(let why):
            if let d = dirtyBitmap, d.count > 0 {
                throw UblkError("the remote image changed (\(HTTPTarget.describe(why))) but the local overlay holds \(d.count) written pages; refusing to drop them (remove \(o.cachePath), \(o.bitmapPath) and \(o.dirtyPath) to start afresh)")
            }
            do {
                try bitmap.startAfresh()
                try cache.discardAll()
            } catch {
                throw UblkError("cannot start the cache afresh: \(error)")
            }
            cacheState = "started afresh: \(HTTPTarget.describe(why))"
            log("ublk-http: \(o.http.url): the remote image changed (\(HTTPTarget.describe(why))); the cache starts afresh")
        }
        if case .invalidated = dirtyOutcome, let d = dirtyBitmap {
            // No written pages (checked above, or the present bitmap still matched): record the new identity.
            do { if d.count == 0 { try d.startAfresh() } else { try d.adoptIdentity() } } catch {
                throw UblkError("dirty bitmap \(o.dirtyPath): \(error)")
            }
        }
        var p = DeviceParams(size: (remote.size + 511) & ~511)
        p.readOnly = !o.writable
        p.writeCache = o.writable
        p.discard = o.writable
        params = p
    }

    static func describe(_ why: InvalidationReason) -> String {
        switch why {
        case .urlChanged(let old, let new): return "URL \(old) is now \(new)"
        case .etagChanged(let old, let new): return "ETag \(old ?? "none") is now \(new ?? "none")"
        case .lastModifiedChanged(let old, let new): return "Last-Modified \(old ?? "none") is now \(new ?? "none")"
        }
    }

    /// Counters for `list` and `stats`.
    public func snapshot() -> HTTPStats {
        HTTPStats(hits: stats.hits, misses: stats.misses, bytesFetched: stats.bytesFetched, requests: stats.requests,
                  retries: stats.retries, errors: stats.errors,
                  missLatencyP50Ms: stats.missLatency.percentile(50).map { Double($0) / 1e6 },
                  missLatencyP99Ms: stats.missLatency.percentile(99).map { Double($0) / 1e6 },
                  pagesPresent: bitmap.count, pagesTotal: bitmap.pageCount, pageSize: settings.pageSize)
    }

    /// Readahead starts at 1 MiB on the second sequential read and doubles up to
    /// `readaheadBytes`; runs are capped at `maxRunBytes`.
    static func makePlanner(_ o: HTTPTargetOptions, imageSize: UInt64) -> FetchPlanner {
        FetchPlanner(imageSize: imageSize, pageSize: o.pageSize, maxRunBytes: o.maxRunBytes,
                     initialReadaheadBytes: min(1 << 20, o.readaheadBytes), maxReadaheadBytes: o.readaheadBytes,
                     maxActiveRuns: o.http.maxConnections)
    }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        guard queue.id == 0 else { throw UblkError("the http target serves one queue (-q 1)") }
        var config = settings.http
        config.maxAttempts = max(1, config.maxAttempts)
        let source: HTTPSource
        do { source = try HTTPSource(config: config, stats: stats) } catch { throw UblkError(error.description) }
        source.expected = remote
        return Handler(target: self, source: source, depth: queue.depth)
    }

    final class Handler: QueueHandler {
        let target: HTTPTarget
        let source: HTTPSource
        let planner: FetchPlanner
        let bitmap: Bitmap
        let cacheFD: Int32
        let imageSize: UInt64
        let pageSize: UInt64
        var requests: [Request?]
        var missStart: [UInt64]
        /// Tags waiting for a fetch (not yet reading the cache file).
        var waiting: [Bool]
        var done: [UInt32]
        /// Bytes of each started run written so far.
        var runBytes: [RunID: UInt64] = [:]

        var pollArmed = false
        /// A sync cycle in flight: what it staged, and the FLUSH tags it completes.
        var cycle: (present: BitmapCommit, dirty: BitmapCommit?, waiters: [UInt16])?
        /// FLUSHes (and FUA writes) waiting for the next cycle.
        var flushWaiters: [UInt16] = []
        var lastPersist: UInt64 = 0
        let dirty: Bitmap?
        /// `sync` snapshots handed out and not yet confirmed: token → page runs.
        var syncSnapshots: [UInt64: [Range<UInt64>]] = [:]
        var nextToken: UInt64 = 1
        let timerFD: Int32
        var timerArmed = false
        var draining = false

        static let subRead: UInt8 = 0, subSync: UInt8 = 1, subWrite: UInt8 = 2, subPunch: UInt8 = 3
        static let sourceEvent: UInt32 = 1, timerEvent: UInt32 = 2
        static let persistInterval: UInt64 = 1_000_000_000

        init(target: HTTPTarget, source: HTTPSource, depth: Int) {
            self.target = target
            self.source = source
            self.bitmap = target.bitmap
            self.dirty = target.dirty
            self.cacheFD = target.cache.fd
            self.imageSize = target.remote.size
            self.pageSize = UInt64(target.settings.pageSize)
            planner = HTTPTarget.makePlanner(target.settings, imageSize: target.remote.size)
            requests = Array(repeating: nil, count: depth)
            missStart = Array(repeating: 0, count: depth)
            waiting = Array(repeating: false, count: depth)
            done = Array(repeating: 0, count: depth)
            timerFD = cu_timerfd()
            lastPersist = monotonicNanos()
        }

        deinit { close(timerFD) }

        // MARK: Requests

        func handle(_ r: Request, queue: Queue) {
            switch r.op {
            case Op.read, Op.write, Op.discard, Op.writeZeroes:
                if r.op != Op.read && dirty == nil { return queue.complete(tag: r.tag, result: -EROFS) }
                if draining { return queue.complete(tag: r.tag, result: -EIO) }
                // A write needs every page it touches present first (see the header).
                let plan = planner.plan(offset: r.offset, length: Int(r.length), context: UInt64(r.tag), present: bitmap.bits)
                if plan.isHit {
                    if r.op == Op.read { target.stats.hits += 1 }
                    proceed(r, queue: queue)
                } else {
                    if r.op == Op.read { target.stats.misses += 1 }
                    requests[Int(r.tag)] = r
                    waiting[Int(r.tag)] = true
                    missStart[Int(r.tag)] = monotonicNanos()
                }
                if planner.plannedRunCount > 0 { startRuns(queue) }
            case Op.flush:
                if dirty == nil { return queue.complete(tag: r.tag, result: 0) }
                flushWaiters.append(r.tag)
                startCycle(queue)
            default:
                queue.complete(tag: r.tag, result: -EOPNOTSUPP)
            }
        }

        /// Every page of `r` is present: read it, or write it.
        func proceed(_ r: Request, queue: Queue) {
            switch r.op {
            case Op.read:
                readFromCache(r, queue: queue)
            case Op.write:
                requests[Int(r.tag)] = r
                waiting[Int(r.tag)] = false
                done[Int(r.tag)] = 0
                queue.write(fd: cacheFD, from: r.buffer, length: r.length, offset: r.offset, tag: r.tag, sub: Handler.subWrite)
            default:
                // DISCARD / WRITE_ZEROES: a hole reads as zeros; partial pages are zeroed by the punch.
                requests[Int(r.tag)] = r
                waiting[Int(r.tag)] = false
                let end = min(r.offset + UInt64(r.length), imageSize)
                if r.offset >= end { return written(r, queue: queue) }
                queue.fallocate(fd: cacheFD, mode: cu_falloc_punch, offset: r.offset, length: end - r.offset,
                                tag: r.tag, sub: Handler.subPunch)
            }
        }

        /// A write's data is in the cache file: its pages are present (they were) and dirty.
        func written(_ r: Request, queue: Queue) {
            let pages = planner.pages(offset: r.offset, length: Int(r.length))
            dirty?.markPresent(pages)
            if r.fua {
                requests[Int(r.tag)] = nil
                flushWaiters.append(r.tag)
                startCycle(queue)
            } else {
                finish(r.tag, r.op == Op.write ? Int32(r.length) : 0, queue)
            }
        }

        func readFromCache(_ r: Request, queue: Queue) {
            requests[Int(r.tag)] = r
            waiting[Int(r.tag)] = false
            done[Int(r.tag)] = 0
            if r.offset >= imageSize {
                memset(r.buffer, 0, Int(r.length))
                return finish(r.tag, Int32(r.length), queue)
            }
            queue.read(fd: cacheFD, into: r.buffer, length: r.length, offset: r.offset, tag: r.tag, sub: Handler.subRead)
        }

        @inline(__always)
        func finish(_ tag: UInt16, _ result: Int32, _ queue: Queue) {
            requests[Int(tag)] = nil
            waiting[Int(tag)] = false
            queue.complete(tag: tag, result: result)
        }

        func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: Queue) {
            if sub == Handler.subSync { return cycleSynced(result, queue: queue) }
            let t = Int(tag)
            guard let r = requests[t] else { return }
            if result < 0 { return finish(tag, result, queue) }
            if sub == Handler.subPunch { return written(r, queue: queue) }
            if sub == Handler.subWrite {
                if result == 0 { return finish(tag, -EIO, queue) }
                done[t] += UInt32(result)
                if done[t] >= r.length { return written(r, queue: queue) }
                return queue.write(fd: cacheFD, from: r.buffer + Int(done[t]), length: r.length - done[t],
                                   offset: r.offset + UInt64(done[t]), tag: tag, sub: Handler.subWrite)
            }
            if result == 0 {
                // Past the end of the object (the device is rounded up to 512 bytes): zeros.
                memset(r.buffer + Int(done[t]), 0, Int(r.length - done[t]))
                return finish(tag, Int32(r.length), queue)
            }
            done[t] += UInt32(result)
            if done[t] >= r.length { return finish(tag, Int32(r.length), queue) }
            queue.read(fd: cacheFD, into: r.buffer + Int(done[t]), length: r.length - done[t],
                       offset: r.offset + UInt64(done[t]), tag: tag, sub: Handler.subRead)
        }

        // MARK: Fetching

        func startRuns(_ queue: Queue) {
            for run in planner.startableRuns() {
                runBytes[run.id] = 0
                source.fetch(offset: run.offset, length: run.length, onData: { [unowned self] offset, bytes in
                    self.received(run, offset: offset, bytes: bytes, queue: queue)
                }, completion: { [unowned self] result in
                    self.runEnded(run, result, queue: queue)
                })
            }
            armPoll(queue)
        }

        /// Body bytes of `run` at `offset`: into the cache file; completed pages become present.
        func received(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: Queue) -> Bool {
            guard let base = bytes.baseAddress else { return true }
            var written = 0
            while written < bytes.count {
                let n = pwrite(cacheFD, base + written, bytes.count - written, off_t(offset) + off_t(written))
                if n < 0 {
                    if errno == EINTR { continue }
                    log("ublk-http: cache file write failed: \(Errno.current)")
                    return false
                }
                written += n
            }
            let before = runBytes[run.id] ?? 0
            let after = offset + UInt64(bytes.count) - run.offset
            runBytes[run.id] = after
            // Whole pages now written (the run's last page may be short at the image end).
            let pagesBefore = before / pageSize
            var pagesAfter = after / pageSize
            if after == UInt64(run.length) { pagesAfter = run.pageCount }
            if pagesAfter > pagesBefore {
                bitmap.markPresent(run.firstPage + pagesBefore..<run.firstPage + pagesAfter)
                serve(planner.progress(run: run.id, pagesDone: pagesAfter), queue)
            }
            return true
        }

        func runEnded(_ run: FetchRun, _ result: Result<Void, HTTPError>, queue: Queue) {
            runBytes[run.id] = nil
            switch result {
            case .success:
                bitmap.markPresent(run.firstPage..<run.firstPage + run.pageCount)
                serve(planner.complete(run: run.id, success: true), queue)
            case .failure(let e):
                log("ublk-http: fetch of bytes \(run.offset)-\(run.offset + UInt64(run.length) - 1) failed: \(e)")
                serve(planner.complete(run: run.id, success: false), queue)
            }
            if planner.plannedRunCount > 0 && !draining { startRuns(queue) }
        }

        func serve(_ outcome: RunOutcome, _ queue: Queue) {
            let now = monotonicNanos()
            for ctx in outcome.satisfied {
                let tag = UInt16(ctx)
                guard waiting[Int(tag)], let r = requests[Int(tag)] else { continue }
                if r.op == Op.read { target.stats.missLatency.record(nanoseconds: now &- missStart[Int(tag)]) }
                proceed(r, queue: queue)
            }
            for ctx in outcome.failed {
                let tag = UInt16(ctx)
                if waiting[Int(tag)] { finish(tag, -EIO, queue) }
            }
        }

        // MARK: Events

        func armPoll(_ queue: Queue) {
            if !pollArmed {
                pollArmed = true
                queue.poll(fd: source.fd, data: Handler.sourceEvent)
            }
        }

        func eventFired(data: UInt32, result: Int32, queue: Queue) {
            switch data {
            case Handler.sourceEvent:
                pollArmed = false
                source.perform()
                if !source.isIdle { armPoll(queue) }
            case Handler.timerEvent:
                timerArmed = false
                var v: UInt64 = 0
                _ = read(timerFD, &v, 8)
            default:
                break
            }
        }

        func idle(queue: Queue) {
            if !source.isIdle { armPoll(queue) }
            let statsDirty = statsSignature != writtenStatsSignature
            let bitsDirty = bitmap.bits.hasDirty || (dirty?.bits.hasDirty ?? false)
            guard statsDirty || (bitsDirty && cycle == nil) else { return }
            let now = monotonicNanos()
            if now &- lastPersist >= Handler.persistInterval {
                lastPersist = now
                if statsDirty { publishStats(queue) }
                if bitsDirty { startCycle(queue) }
            } else if !timerArmed {
                _ = cu_timerfd_arm(timerFD, max(1, Handler.persistInterval - (now &- lastPersist)))
                timerArmed = true
                queue.poll(fd: timerFD, data: Handler.timerEvent)
            }
        }

        /// A sync cycle: stage both bitmaps, fdatasync the cache file through the
        /// ring, then persist them and complete the FLUSHes that were waiting.
        /// One at a time, so commits are persisted in the order they were staged.
        func startCycle(_ queue: Queue) {
            guard cycle == nil else { return }
            cycle = (bitmap.stage(), dirty?.stage(), flushWaiters)
            flushWaiters = []
            lastPersist = monotonicNanos()
            queue.fsync(fd: cacheFD, tag: Queue.internalTag, sub: Handler.subSync)
        }

        func cycleSynced(_ result: Int32, queue: Queue) {
            guard let c = cycle else { return }
            cycle = nil
            var status: Int32 = 0
            if result < 0 {
                // The data is not known to be durable: the staged words wait for the next cycle.
                log("ublk-http: fdatasync of the cache file failed: \(Errno(returned: result))")
                bitmap.abandon(c.present)
                if let d = c.dirty { dirty?.abandon(d) }
                status = -EIO
            } else {
                do {
                    try bitmap.persist(c.present)
                    if let d = c.dirty { try dirty?.persist(d) }
                } catch {
                    log("ublk-http: cannot persist the bitmaps: \(error)")
                    status = -EIO
                }
            }
            for tag in c.waiters { queue.complete(tag: tag, result: status) }
            if !flushWaiters.isEmpty { startCycle(queue) }
        }

        var writtenStatsSignature: UInt64 = .max
        var statsSignature: UInt64 {
            let s = target.stats
            return s.hits &+ s.misses &* 3 &+ s.requests &* 7 &+ s.errors &* 11 &+ bitmap.count &* 13
        }

        func publishStats(_ queue: Queue) {
            writtenStatsSignature = statsSignature
            target.snapshot().save(device: queue.deviceID)
        }

        // MARK: Control (dirty tracking)

        func control(_ request: ControlRequest, queue: Queue) -> String {
            guard let dirty else { return controlError("ublk\(queue.deviceID) is not writable: no dirty tracking") }
            switch request.op {
            case "dirty":
                let runs = DirtyExtents.runs(dirty.bits)
                let reply = DirtyExtents(runs: runs, pageSize: pageSize, imageSize: imageSize, token: nil)
                if request.clear == true {
                    dirty.markAbsent(0..<dirty.pageCount)
                    startCycle(queue)
                }
                return controlJSON(reply)
            case "sync-begin":
                // Hand out the dirty pages and clear them: a page written from now on is dirty again.
                let runs = DirtyExtents.runs(dirty.bits)
                for r in runs { dirty.markAbsent(r) }
                let token = nextToken
                nextToken += 1
                syncSnapshots[token] = runs
                return controlJSON(DirtyExtents(runs: runs, pageSize: pageSize, imageSize: imageSize, token: token))
            case "sync-end":
                guard let token = request.token, let runs = syncSnapshots.removeValue(forKey: token) else {
                    return controlError("unknown sync token")
                }
                // Copied: the cleared bits may reach the disk. Failed: they are dirty again.
                if request.ok != true { for r in runs { dirty.markPresent(r) } }
                startCycle(queue)
                return controlJSON(["ok": true])
            default:
                return controlError("unknown command \(request.op)")
            }
        }

        func drain(queue: Queue) {
            if !flushWaiters.isEmpty { startCycle(queue) }
            draining = true
            source.cancelAll()
            source.perform()
            for t in 0..<waiting.count where waiting[t] {
                finish(UInt16(t), -EIO, queue)
            }
        }

        func shutdown(queue: Queue) {
            publishStats(queue)
            // The loop ended with no target I/O outstanding: no staged commit is waiting for its sync.
            do {
                try bitmap.commit(syncing: target.cache)
                if let d = dirty { try d.commit(syncing: target.cache) }
            } catch {
                log("ublk-http: cannot persist the bitmaps at shutdown: \(error)")
            }
        }
    }
}
