// CachingHandler: the request logic shared by the targets that serve a
// slower source through a page cache: `http` (the source is a remote object,
// fetched by libcurl) and `cache` (a slow block device or file, read through
// io_uring). See HTTPTarget.swift for the read path and the crash rules, and
// CacheTarget.swift for write-through and write-back.
//
// The handler is single-threaded (one queue). Fetching is a `RunFetcher`:
// it moves a planned run's bytes into the cache file and reports each chunk
// (`received`) and the end (`runEnded`).
import CUring
import Glibc
import PageCache

/// What a caching target hands its handler.
final class CacheContext {
    let cache: CacheFile
    let bitmap: Bitmap
    /// Pages written since the last clear (writable targets).
    let dirty: Bitmap?
    /// Pages whose content is local data (an http overlay's writes): never
    /// evicted, never replaced by remote bytes, whatever their dirty bit says.
    var local: Bitmap?
    let imageSize: UInt64
    let pageSize: Int
    let stats: CacheStats
    let snapshot: () -> HTTPStats
    /// Writes are taken (into the cache file); `dirty` tracks them when not nil.
    var writable = false
    /// The `cache` target's backing store (-1: none, the source is read-only).
    var backingFD: Int32 = -1
    /// Write-through: writes reach the backing store before they complete.
    var writeThrough = false
    /// Write-back: pages written to the cache and not yet to the backing store.
    var writeback: Bitmap?
    /// Evict clean pages, least recently used first, to keep the cache under this many bytes (0: no bound).
    var maxCacheBytes: UInt64 = 0

    init(cache: CacheFile, bitmap: Bitmap, dirty: Bitmap?, imageSize: UInt64, pageSize: Int, stats: CacheStats,
         snapshot: @escaping () -> HTTPStats) {
        self.cache = cache
        self.bitmap = bitmap
        self.dirty = dirty
        self.imageSize = imageSize
        self.pageSize = pageSize
        self.stats = stats
        self.snapshot = snapshot
    }
}

/// Moves planned runs from the source into the cache file.
protocol RunFetcher: AnyObject {
    /// Starts `run`; the fetcher calls `handler.received` for its bytes and `handler.runEnded` once.
    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue)
    var isIdle: Bool { get }
    /// An fd the queue polls for the fetcher's progress (then `perform()`), if it has one.
    var pollFD: Int32? { get }
    func perform()
    /// A target I/O the fetcher submitted with `CachingHandler.subFetch` completed.
    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue)
    /// Ends every run now (device stopping); each still gets its `runEnded`.
    func cancelAll(handler: CachingHandler, queue: IOQueue)
}

/// Runs as HTTP Range GETs through libcurl multi.
final class HTTPFetcher: RunFetcher {
    let source: HTTPSource
    init(_ source: HTTPSource) { self.source = source }

    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue) {
        source.fetch(offset: run.offset, length: run.length, onData: { [unowned handler] offset, bytes in
            handler.received(run, offset: offset, bytes: bytes, queue: queue)
        }, completion: { [unowned handler] result in
            switch result {
            case .success: handler.runEnded(run, error: nil, queue: queue)
            case .failure(let e): handler.runEnded(run, error: e.description, queue: queue)
            }
        })
    }
    var isIdle: Bool { source.isIdle }
    var pollFD: Int32? { source.fd }
    func perform() { source.perform() }
    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue) {}
    func cancelAll(handler: CachingHandler, queue: IOQueue) {
        source.cancelAll()
        source.perform()
    }
}

/// Runs read from a file or block device through the queue's io_uring, into a
/// staging buffer, then handed to the handler like received HTTP bytes.
final class FileFetcher: RunFetcher {
    let fd: Int32
    private var slots: [UInt32: (run: FetchRun, buffer: UnsafeMutableRawPointer, done: Int)] = [:]
    private var nextSlot: UInt32 = 1
    private var cancelled = false

    init(fd: Int32) { self.fd = fd }
    deinit { for s in slots.values { free(s.buffer) } }

    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue) {
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, (run.length + 4095) & ~4095) == 0, let buf = raw else {
            return handler.runEnded(run, error: "out of memory", queue: queue)
        }
        let slot = nextSlot
        nextSlot = nextSlot == Queue.reservedData - 1 ? 1 : nextSlot + 1
        slots[slot] = (run, buf, 0)
        handler.context.stats.requests += 1
        queue.read(fd: fd, into: buf, length: UInt32(run.length), offset: run.offset,
                   tag: Queue.internalTag, sub: CachingHandler.subFetch, data: slot)
    }

    var isIdle: Bool { slots.isEmpty }
    var pollFD: Int32? { nil }
    func perform() {}

    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue) {
        guard var s = slots[data] else { return }
        func end(_ error: String?) {
            slots[data] = nil
            free(s.buffer)
            handler.runEnded(s.run, error: error, queue: queue)
        }
        if cancelled { return end("cancelled") }
        if result < 0 { return end("reading the backing store: \(Errno(returned: result))") }
        if result == 0 { return end("the backing store ended early") }
        handler.context.stats.bytesFetched += UInt64(result)
        let chunk = UnsafeRawBufferPointer(start: s.buffer + s.done, count: Int(result))
        guard handler.received(s.run, offset: s.run.offset + UInt64(s.done), bytes: chunk, queue: queue) else {
            return end("cannot write the cache file")
        }
        s.done += Int(result)
        slots[data] = s
        if s.done >= s.run.length { return end(nil) }
        queue.read(fd: fd, into: s.buffer + s.done, length: UInt32(s.run.length - s.done),
                   offset: s.run.offset + UInt64(s.done), tag: Queue.internalTag, sub: CachingHandler.subFetch, data: data)
    }

    func cancelAll(handler: CachingHandler, queue: IOQueue) {
        // Reads in flight finish on their own (a local read ends soon); they end their runs as cancelled.
        cancelled = true
    }
}

final class CachingHandler: QueueHandler {
    let context: CacheContext
    let fetcher: RunFetcher
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
    var cycle: (present: BitmapCommit, dirty: BitmapCommit?, writeback: BitmapCommit?, waiters: [UInt16])?
    /// fsyncs of the cycle in flight still outstanding, and the first failure.
    var cycleSyncs = 0
    var cycleFailure: Int32 = 0
    /// FLUSHes (and FUA writes) waiting for the next cycle.
    var flushWaiters: [UInt16] = []
    var lastPersist: UInt64 = 0
    let dirty: Bitmap?
    /// `sync` snapshots handed out and not yet confirmed (CachingControl.swift).
    var syncs = SyncTracker()
    let timerFD: Int32
    var timerArmed = false
    var draining = false

    static let subRead: UInt8 = 0, subSync: UInt8 = 1, subWrite: UInt8 = 2, subPunch: UInt8 = 3, subFetch: UInt8 = 4
    static let subBackingWrite: UInt8 = 5, subBackingPunch: UInt8 = 6, subBackingSync: UInt8 = 7
    static let subWritebackRead: UInt8 = 8, subWritebackWrite: UInt8 = 9

    /// Write-through: parts of a write still outstanding (cache, backing), and the backing's progress.
    var parts: [UInt8] = []
    var backingDone: [UInt32] = []
    var partFailed: [Int32] = []
    /// Pages a write covers whole and claimed instead of fetching (FetchPlanner.claimForWrite).
    var claimed: [[RunID]] = []
    /// Write-back: the one run being copied to the backing store (the throttle), and
    /// whether a write touched it meanwhile (then its bits stay set).
    var writebackRun: (pages: Range<UInt64>, buffer: UnsafeMutableRawPointer, done: Int, dirtied: Bool)?
    var writebackCursor: UInt64 = 0
    static let writebackRunPages: UInt64 = 256

    /// Eviction: the last use of each 1 MiB chunk (a request counter), and the
    /// ranges whose bits were cleared and go out (punched) once that is durable.
    var chunkUse: [UInt32] = []
    var useClock: UInt32 = 0
    var evicting: [Range<UInt64>] = []
    var punchAfterCycle: [Range<UInt64>] = []
    static let chunkShift: UInt64 = 20
    static let sourceEvent: UInt32 = 1, timerEvent: UInt32 = 2
    static let persistInterval: UInt64 = 1_000_000_000

    /// User-copy mode (the cache file lives in memory and the device has
    /// UBLK_F_USER_COPY): the cache file mapped, and the queue's char device.
    /// Request data then moves with one copy between the cache's pages and the
    /// kernel's request pages (pwrite/pread on /dev/ublkcN), like the loop
    /// target's; the tag buffers are unused.
    var mapping: UnsafeMutableRawPointer?
    var mappingSize = 0
    var charFD: Int32 = -1
    unowned(unsafe) var userCopyQueue: IOQueue?

    /// Whether a caching target over `cacheFD` asks for UBLK_F_USER_COPY.
    static func wantsUserCopy(cacheFD: Int32) -> Bool { memoryFS.contains(cu_fs_type(cacheFD)) }
    static let memoryFS: [Int64] = [0x0102_1994 /* tmpfs */, 0x8584_58f6 /* ramfs */]

    /// A handler for `queue`; maps the cache file when the queue copies data itself.
    static func make(context: CacheContext, fetcher: RunFetcher, planner: FetchPlanner, queue: IOQueue,
                     deviceSize: UInt64) throws(UblkError) -> CachingHandler {
        let h = CachingHandler(context: context, fetcher: fetcher, planner: planner, depth: queue.depth)
        if queue.userCopy {
            // The mapping covers the device (the image rounded up to 512 bytes,
            // so never past the cache file's last page): bytes past the end read as zeros.
            guard deviceSize > 0, let m = mmap(nil, Int(deviceSize), PROT_READ | PROT_WRITE, MAP_SHARED, context.cache.fd, 0),
                  m != MAP_FAILED else {
                throw UblkError("cannot map the cache file \(context.cache.path)", errno: .current)
            }
            h.mapping = m
            h.mappingSize = Int(deviceSize)
            h.charFD = queue.charFD
            h.userCopyQueue = queue
        }
        return h
    }

    init(context: CacheContext, fetcher: RunFetcher, planner: FetchPlanner, depth: Int) {
        self.context = context
        self.fetcher = fetcher
        self.planner = planner
        self.bitmap = context.bitmap
        self.dirty = context.dirty
        self.cacheFD = context.cache.fd
        self.imageSize = context.imageSize
        self.pageSize = UInt64(context.pageSize)
        requests = Array(repeating: nil, count: depth)
        parts = Array(repeating: 0, count: depth)
        if context.maxCacheBytes > 0 {
            chunkUse = Array(repeating: 0, count: Int((context.imageSize >> CachingHandler.chunkShift) + 1))
        }
        backingDone = Array(repeating: 0, count: depth)
        partFailed = Array(repeating: 0, count: depth)
        claimed = Array(repeating: [], count: depth)
        missStart = Array(repeating: 0, count: depth)
        waiting = Array(repeating: false, count: depth)
        done = Array(repeating: 0, count: depth)
        timerFD = cu_timerfd()
        lastPersist = monotonicNanos()
    }

    deinit {
        close(timerFD)
        if let m = mapping { munmap(m, mappingSize) }
    }

    /// User-copy mode: moves `r`'s data between the mapped cache file and the
    /// kernel's request pages (read: to the request; write: from it). One copy.
    func copyMapped(_ r: Request, queue: IOQueue, mapping: UnsafeMutableRawPointer) -> Int32 {
        let len = Int(r.length)
        guard Int(r.offset) + len <= mappingSize else { return -EIO }
        let at = mapping + Int(r.offset)
        let pos = off_t(queue.userCopyOffset(r.tag))
        var done = 0
        while done < len {
            let n = r.op == Op.read
                ? pwrite(charFD, at + done, len - done, pos + off_t(done))
                : pread(charFD, at + done, len - done, pos + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return n < 0 ? -errno : -EIO }
            done += n
        }
        return Int32(len)
    }

    /// Where a write's data is (for the backing store's copy): the cache's mapped
    /// pages in user-copy mode, else the tag's buffer.
    @inline(__always)
    func writeSource(_ r: Request) -> UnsafeMutableRawPointer {
        if let m = mapping { return m + Int(r.offset) }
        return r.buffer
    }

    // MARK: Requests

    func handle(_ r: Request, queue: IOQueue) {
        switch r.op {
        case Op.read, Op.write, Op.discard, Op.writeZeroes:
            if r.op != Op.read && !context.writable { return queue.complete(tag: r.tag, result: -EROFS) }
            if draining { return queue.complete(tag: r.tag, result: -EIO) }
            if !chunkUse.isEmpty { touch(r) }
            // A write needs every page it touches present first (see the header),
            // except pages it covers whole: those it claims (reads of them wait).
            if r.op != Op.read,
               let claims = planner.claimForWrite(offset: r.offset, length: Int(r.length), present: bitmap.bits) {
                claimed[Int(r.tag)] = claims
                return proceed(r, queue: queue)
            }
            let plan = planner.plan(offset: r.offset, length: Int(r.length), context: UInt64(r.tag), present: bitmap.bits)
            if plan.isHit {
                if r.op == Op.read { context.stats.hits += 1 }
                proceed(r, queue: queue)
            } else {
                if r.op == Op.read { context.stats.misses += 1 }
                requests[Int(r.tag)] = r
                waiting[Int(r.tag)] = true
                missStart[Int(r.tag)] = monotonicNanos()
            }
            if planner.plannedRunCount > 0 { startRuns(queue) }
        case Op.flush:
            if !context.writable { return queue.complete(tag: r.tag, result: 0) }
            flushWaiters.append(r.tag)
            startCycle(queue)
        default:
            queue.complete(tag: r.tag, result: -EOPNOTSUPP)
        }
    }

    /// Every page of `r` is present: read it, or write it.
    func proceed(_ r: Request, queue: IOQueue) {
        switch r.op {
        case Op.read:
            readFromCache(r, queue: queue)
        case Op.write:
            let t = Int(r.tag)
            requests[t] = r
            waiting[t] = false
            done[t] = 0
            backingDone[t] = 0
            partFailed[t] = 0
            parts[t] = through ? 2 : 1
            if let m = mapping {
                // The data lands in the cache's pages straight from the request.
                let copied = copyMapped(r, queue: queue, mapping: m)
                if copied < 0 {
                    parts[t] = 1
                    return partDone(r, copied, queue: queue)
                }
            } else {
                queue.write(fd: cacheFD, from: r.buffer, length: r.length, offset: r.offset, tag: r.tag, sub: CachingHandler.subWrite)
            }
            if through {
                queue.write(fd: context.backingFD, from: writeSource(r), length: r.length, offset: r.offset,
                            flags: r.fua ? cu_rwf_dsync : 0, tag: r.tag, sub: CachingHandler.subBackingWrite)
            }
            if mapping != nil { partDone(r, 0, queue: queue) }
        default:
            // DISCARD / WRITE_ZEROES: a hole reads as zeros; partial pages are zeroed by the punch.
            let t = Int(r.tag)
            requests[t] = r
            waiting[t] = false
            partFailed[t] = 0
            let end = min(r.offset + UInt64(r.length), imageSize)
            if r.offset >= end { return written(r, queue: queue) }
            parts[t] = through ? 2 : 1
            queue.fallocate(fd: cacheFD, mode: cu_falloc_punch, offset: r.offset, length: end - r.offset,
                            tag: r.tag, sub: CachingHandler.subPunch)
            if through {
                queue.fallocate(fd: context.backingFD, mode: r.op == Op.writeZeroes && r.noUnmap ? cu_falloc_zero : cu_falloc_punch,
                                offset: r.offset, length: end - r.offset, tag: r.tag, sub: CachingHandler.subBackingPunch)
            }
        }
    }

    var through: Bool { context.writeThrough && context.backingFD >= 0 }

    /// One part of a write is done (or failed); the write completes when all are.
    func partDone(_ r: Request, _ result: Int32, queue: IOQueue) {
        let t = Int(r.tag)
        if result < 0 && partFailed[t] == 0 { partFailed[t] = result }
        parts[t] -= 1
        guard parts[t] == 0 else { return }
        if !claimed[t].isEmpty {
            // Pages the write covered whole: present now that their data is in the cache.
            let claims = claimed[t]
            claimed[t] = []
            if partFailed[t] == 0 { bitmap.markPresent(planner.pages(offset: r.offset, length: Int(r.length))) }
            for id in claims { serve(planner.complete(run: id, success: partFailed[t] == 0), queue) }
        }
        if partFailed[t] < 0 { return finish(r.tag, partFailed[t], queue) }
        written(r, queue: queue)
    }

    /// A write's data is in the cache file: its pages are present (they were) and dirty.
    func written(_ r: Request, queue: IOQueue) {
        let pages = planner.pages(offset: r.offset, length: Int(r.length))
        dirty?.markPresent(pages)
        syncs.written(pages)
        if let wb = context.writeback {
            wb.markPresent(pages)
            if let run = writebackRun, run.pages.overlaps(pages) { writebackRun!.dirtied = true }
        }
        if r.fua {
            requests[Int(r.tag)] = nil
            flushWaiters.append(r.tag)
            startCycle(queue)
        } else {
            finish(r.tag, r.op == Op.write ? Int32(r.length) : 0, queue)
        }
    }

    func readFromCache(_ r: Request, queue: IOQueue) {
        requests[Int(r.tag)] = r
        waiting[Int(r.tag)] = false
        done[Int(r.tag)] = 0
        if let m = mapping { return finish(r.tag, copyMapped(r, queue: queue, mapping: m), queue) }
        if r.offset >= imageSize {
            memset(r.buffer, 0, Int(r.length))
            return finish(r.tag, Int32(r.length), queue)
        }
        if cacheInMemory {
            // As for loop: io_uring would punt a tmpfs read to an io-wq worker; the copy is cheaper.
            var got: UInt32 = 0
            while true {
                let n = pread(cacheFD, r.buffer + Int(got), Int(r.length - got), off_t(r.offset) + off_t(got))
                if n < 0 && errno == EINTR { continue }
                if let final = r.readProgress(n < 0 ? -errno : Int32(n), done: &got) { return finish(r.tag, final, queue) }
            }
        }
        queue.read(fd: cacheFD, into: r.buffer, length: r.length, offset: r.offset, tag: r.tag, sub: CachingHandler.subRead)
    }

    /// The cache file lives in memory (tmpfs, ramfs).
    lazy var cacheInMemory: Bool = [0x0102_1994, 0x8584_58f6].contains(cu_fs_type(cacheFD))

    @inline(__always)
    func finish(_ tag: UInt16, _ result: Int32, _ queue: IOQueue) {
        requests[Int(tag)] = nil
        waiting[Int(tag)] = false
        queue.complete(tag: tag, result: result)
    }

    func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: IOQueue) {
        if sub == CachingHandler.subSync || sub == CachingHandler.subBackingSync { return cycleSynced(result, queue: queue) }
        if sub == CachingHandler.subWritebackRead || sub == CachingHandler.subWritebackWrite {
            return writebackProgress(sub, result, queue: queue)
        }
        if sub == CachingHandler.subFetch { return fetcher.ioCompleted(data: data, result: result, handler: self, queue: queue) }
        let t = Int(tag)
        guard let r = requests[t] else { return }
        switch sub {
        case CachingHandler.subPunch, CachingHandler.subBackingPunch:
            return partDone(r, result == -EOPNOTSUPP && r.op == Op.discard ? 0 : min(result, 0), queue: queue)
        case CachingHandler.subWrite:
            if result <= 0 { return partDone(r, result < 0 ? result : -EIO, queue: queue) }
            done[t] += UInt32(result)
            if done[t] >= r.length { return partDone(r, 0, queue: queue) }
            return queue.write(fd: cacheFD, from: r.buffer + Int(done[t]), length: r.length - done[t],
                               offset: r.offset + UInt64(done[t]), tag: tag, sub: CachingHandler.subWrite)
        case CachingHandler.subBackingWrite:
            if result <= 0 { return partDone(r, result < 0 ? result : -EIO, queue: queue) }
            backingDone[t] += UInt32(result)
            if backingDone[t] >= r.length { return partDone(r, 0, queue: queue) }
            return queue.write(fd: context.backingFD, from: writeSource(r) + Int(backingDone[t]), length: r.length - backingDone[t],
                               offset: r.offset + UInt64(backingDone[t]), flags: r.fua ? cu_rwf_dsync : 0,
                               tag: tag, sub: CachingHandler.subBackingWrite)
        default:
            break
        }
        // Past the end of the object (the device is rounded up to 512 bytes): zeros.
        if let final = r.readProgress(result, done: &done[t]) { return finish(tag, final, queue) }
        queue.read(fd: cacheFD, into: r.buffer + Int(done[t]), length: r.length - done[t],
                   offset: r.offset + UInt64(done[t]), tag: tag, sub: CachingHandler.subRead)
    }

    // MARK: Fetching

    func startRuns(_ queue: IOQueue) {
        for run in planner.startableRuns() {
            runBytes[run.id] = 0
            fetcher.start(run, handler: self, queue: queue)
        }
        armPoll(queue)
    }

    /// Body bytes of `run` at `offset`: into the cache file; completed pages become present.
    func received(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: IOQueue) -> Bool {
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

    /// `error`: nil on success, else what failed (logged).
    func runEnded(_ run: FetchRun, error: String?, queue: IOQueue) {
        runBytes[run.id] = nil
        if let e = error {
            log("ublk-http: fetch of bytes \(run.offset)-\(run.offset + UInt64(run.length) - 1) failed: \(e)")
            serve(planner.complete(run: run.id, success: false), queue)
        } else {
            bitmap.markPresent(run.firstPage..<run.firstPage + run.pageCount)
            serve(planner.complete(run: run.id, success: true), queue)
        }
        if planner.plannedRunCount > 0 && !draining { startRuns(queue) }
    }

    func serve(_ outcome: RunOutcome, _ queue: IOQueue) {
        let now = monotonicNanos()
        for ctx in outcome.satisfied {
            let tag = UInt16(ctx)
            guard waiting[Int(tag)], let r = requests[Int(tag)] else { continue }
            if r.op == Op.read { context.stats.missLatency.record(nanoseconds: now &- missStart[Int(tag)]) }
            proceed(r, queue: queue)
        }
        for ctx in outcome.failed {
            let tag = UInt16(ctx)
            if waiting[Int(tag)] { finish(tag, -EIO, queue) }
        }
    }

    // MARK: Events

    func armPoll(_ queue: IOQueue) {
        if !pollArmed, let fd = fetcher.pollFD {
            pollArmed = true
            queue.poll(fd: fd, data: CachingHandler.sourceEvent)
        }
    }

    func eventFired(data: UInt32, result: Int32, queue: IOQueue) {
        switch data {
        case CachingHandler.sourceEvent:
            pollArmed = false
            fetcher.perform()
            if !fetcher.isIdle { armPoll(queue) }
        case CachingHandler.timerEvent:
            timerArmed = false
            var v: UInt64 = 0
            _ = read(timerFD, &v, 8)
        default:
            break
        }
    }

    func idle(queue: IOQueue) {
        if !fetcher.isIdle { armPoll(queue) }
        let statsDirty = statsSignature != writtenStatsSignature
        if context.writeback != nil && !draining { startWriteback(queue) }
        if context.maxCacheBytes > 0 && cycle == nil { evictIfNeeded(queue) }
        let bitsDirty = bitmap.bits.hasDirty || (dirty?.bits.hasDirty ?? false) || (context.writeback?.bits.hasDirty ?? false)
        guard statsDirty || (bitsDirty && cycle == nil) else { return }
        let now = monotonicNanos()
        if now &- lastPersist >= CachingHandler.persistInterval {
            lastPersist = now
            if statsDirty { publishStats(queue) }
            if bitsDirty { startCycle(queue) }
        } else if !timerArmed {
            _ = cu_timerfd_arm(timerFD, max(1, CachingHandler.persistInterval - (now &- lastPersist)))
            timerArmed = true
            queue.poll(fd: timerFD, data: CachingHandler.timerEvent)
        }
    }

    /// A sync cycle: stage the bitmaps, fdatasync the cache file through the
    /// ring, then persist them and complete the FLUSHes that were waiting
    /// (dirty bits alone, with no FLUSH waiting, are persisted at once).
    /// One at a time, so commits are persisted in the order they were staged.
    func startCycle(_ queue: IOQueue) {
        guard cycle == nil else { return }
        // Only dirty bits changed, and no FLUSH waits: those go out without an
        // fdatasync of the cache file first. A dirty bit on disk before its data
        // lists a page whose write a crash lost (it costs a copy in `sync`, never
        // wrong data), and a FLUSH still takes the full cycle. Without this, dirty
        // tracking forced the cache file's writeback every second.
        if flushWaiters.isEmpty && evicting.isEmpty && !bitmap.bits.hasDirty
            && !(context.writeback?.bits.hasDirty ?? false), let d = dirty, d.bits.hasDirty {
            lastPersist = monotonicNanos()
            let staged = d.stage()
            do { try d.persist(staged) } catch {
                log("ublk-http: cannot persist the dirty bitmap: \(error)")
                d.abandon(staged)
            }
            return
        }
        punchAfterCycle = evicting
        evicting = []
        cycle = (bitmap.stage(), dirty?.stage(), context.writeback?.stage(), flushWaiters)
        flushWaiters = []
        lastPersist = monotonicNanos()
        cycleSyncs = 1
        cycleFailure = 0
        queue.fsync(fd: cacheFD, tag: Queue.internalTag, sub: CachingHandler.subSync)
        // The backing store too: a FLUSH covers written-through data, and a cleared
        // write-back bit may reach the disk only after the data it stood for.
        if context.backingFD >= 0 {
            cycleSyncs += 1
            queue.fsync(fd: context.backingFD, tag: Queue.internalTag, sub: CachingHandler.subBackingSync)
        }
    }

    func cycleSynced(_ result: Int32, queue: IOQueue) {
        guard let c = cycle else { return }
        if result < 0 && cycleFailure == 0 { cycleFailure = result }
        cycleSyncs -= 1
        guard cycleSyncs == 0 else { return }
        cycle = nil
        var status: Int32 = 0
        if cycleFailure < 0 {
            // The data is not known to be durable: the staged words wait for the next cycle.
            log("ublk-http: fdatasync failed: \(Errno(returned: cycleFailure))")
            bitmap.abandon(c.present)
            if let d = c.dirty { dirty?.abandon(d) }
            if let w = c.writeback { context.writeback?.abandon(w) }
            status = -EIO
        } else {
            do {
                try bitmap.persist(c.present)
                if let d = c.dirty { try dirty?.persist(d) }
                if let w = c.writeback { try context.writeback?.persist(w) }
            } catch {
                log("ublk-http: cannot persist the bitmaps: \(error)")
                status = -EIO
            }
        }
        if status == 0 { punchEvicted() } else { evicting += punchAfterCycle }
        punchAfterCycle = []
        for tag in c.waiters { queue.complete(tag: tag, result: status) }
        if !flushWaiters.isEmpty { startCycle(queue) }
    }

    var writtenStatsSignature: UInt64 = .max
    var statsSignature: UInt64 {
        let s = context.stats
        return s.hits &+ s.misses &* 3 &+ s.requests &* 7 &+ s.errors &* 11 &+ bitmap.count &* 13
    }

    func publishStats(_ queue: IOQueue) {
        writtenStatsSignature = statsSignature
        context.snapshot().save(device: queue.deviceID)
    }

    // MARK: Eviction

    @inline(__always)
    func touch(_ r: Request) {
        useClock &+= 1
        let first = Int(r.offset >> CachingHandler.chunkShift)
        let last = Int((r.offset + UInt64(max(r.length, 1)) - 1) >> CachingHandler.chunkShift)
        for c in first...min(last, chunkUse.count - 1) { chunkUse[c] = useClock }
    }

    /// Over the bound: clear the bits of clean pages in the least recently used
    /// chunks (never dirty or write-back pages, nor pages a fetch is filling),
    /// persist that through a cycle, and only then punch the pages out.
    func evictIfNeeded(_ queue: IOQueue) {
        let ps = UInt64(context.pageSize)
        var present = bitmap.count * ps
        guard present > context.maxCacheBytes else { return }
        let target = context.maxCacheBytes - context.maxCacheBytes / 8  // some slack
        let perChunk = UInt64(1) << CachingHandler.chunkShift / ps
        let order = chunkUse.indices.sorted { chunkUse[$0] < chunkUse[$1] }
        for c in order where present > target {
            let chunk = UInt64(c) * perChunk..<min(UInt64(c + 1) * perChunk, bitmap.pageCount)
            if chunk.isEmpty || bitmap.bits.count(in: chunk) == 0 { continue }
            var p = chunk.lowerBound
            while p < chunk.upperBound, let s = bitmap.bits.nextSet(in: p..<chunk.upperBound) {
                let e = bitmap.bits.nextClear(in: s..<chunk.upperBound) ?? chunk.upperBound
                var q = s
                while q < e {
                    // Split around pages that must stay: dirty, awaiting write-back, or being filled.
                    let keep = { (page: UInt64) -> Bool in
                        (self.dirty?.test(page) ?? false) || (self.context.writeback?.test(page) ?? false)
                            || self.planner.run(covering: page) != nil
                    }
                    if keep(q) { q += 1; continue }
                    var r = q
                    while r < e && !keep(r) { r += 1 }
                    bitmap.markAbsent(q..<r)
                    evicting.append(q..<r)
                    present -= UInt64(r - q) * ps
                    q = r
                }
                p = e
            }
        }
        if !evicting.isEmpty { startCycle(queue) }
    }

    /// The cleared bits are durable: punch out what is still absent and not being fetched.
    func punchEvicted() {
        let ps = UInt64(context.pageSize)
        for range in punchAfterCycle {
            var p = range.lowerBound
            while p < range.upperBound {
                if bitmap.test(p) || planner.run(covering: p) != nil { p += 1; continue }
                var e = p
                while e < range.upperBound && !bitmap.test(e) && planner.run(covering: e) == nil { e += 1 }
                _ = cu_fallocate(cacheFD, cu_falloc_punch, Int64(p * ps), Int64(min(e * ps, imageSize) - p * ps))
                p = e
            }
        }
    }

    // MARK: Write-back

    /// Copies the next run of write-back pages (at most 1 MiB, one at a time:
    /// the throttle) from the cache file to the backing store.
    func startWriteback(_ queue: IOQueue) {
        guard writebackRun == nil, let wb = context.writeback, wb.count > 0 else { return }
        let all = 0..<wb.pageCount
        guard let first = wb.bits.nextSet(in: writebackCursor..<all.upperBound) ?? wb.bits.nextSet(in: all) else { return }
        let limit = min(first + CachingHandler.writebackRunPages, all.upperBound)
        let end = wb.bits.nextClear(in: first..<limit) ?? limit
        let ps = UInt64(context.pageSize)
        let length = Int(min(end * ps, imageSize) - first * ps)
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, (length + 4095) & ~4095) == 0, let buf = raw else { return }
        writebackRun = (first..<end, buf, 0, false)
        writebackCursor = end
        queue.read(fd: cacheFD, into: buf, length: UInt32(length), offset: first * ps,
                   tag: Queue.internalTag, sub: CachingHandler.subWritebackRead)
    }

    func writebackProgress(_ sub: UInt8, _ result: Int32, queue: IOQueue) {
        guard var run = writebackRun else { return }
        let ps = UInt64(context.pageSize)
        let offset = run.pages.lowerBound * ps
        let length = Int(min(run.pages.upperBound * ps, imageSize) - offset)
        func end() {
            free(run.buffer)
            writebackRun = nil
        }
        if result <= 0 {
            log("ublk-http: write-back of bytes \(offset)-\(offset + UInt64(length) - 1) failed: \(result < 0 ? "\(Errno(returned: result))" : "short")")
            return end()  // the bits stay set: tried again later
        }
        if sub == CachingHandler.subWritebackRead {
            // Read it all (a page cache read is rarely short), then write it out.
            if Int(result) < length { return end() }
            return queue.write(fd: context.backingFD, from: run.buffer, length: UInt32(length), offset: offset,
                               tag: Queue.internalTag, sub: CachingHandler.subWritebackWrite)
        }
        run.done += Int(result)
        writebackRun = run
        if run.done < length {
            return queue.write(fd: context.backingFD, from: run.buffer + run.done, length: UInt32(length - run.done),
                               offset: offset + UInt64(run.done), tag: Queue.internalTag, sub: CachingHandler.subWritebackWrite)
        }
        // On the backing store now; the cleared bits are persisted by the next cycle, after its fsync.
        if !run.dirtied { context.writeback?.markAbsent(run.pages) }
        end()
        startWriteback(queue)
    }

    func drain(queue: IOQueue) {
        if !flushWaiters.isEmpty { startCycle(queue) }
        draining = true
        fetcher.cancelAll(handler: self, queue: queue)
        for t in 0..<waiting.count where waiting[t] {
            finish(UInt16(t), -EIO, queue)
        }
    }

    func shutdown(queue: IOQueue) {
        publishStats(queue)
        // The loop ended with no target I/O outstanding: no staged commit is waiting for its sync.
        do {
            try bitmap.commit(syncing: context.cache)
            if let d = dirty { try d.commit(syncing: context.cache) }
            if let w = context.writeback {
                if context.backingFD >= 0 { fdatasync(context.backingFD) }
                try w.commit(syncing: context.cache)
            }
        } catch {
            log("ublk-http: cannot persist the bitmaps at shutdown: \(error)")
        }
    }
}
