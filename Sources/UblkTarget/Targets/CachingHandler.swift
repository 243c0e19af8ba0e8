// CachingHandler: the request logic shared by the targets that serve a
// slower source through a page cache: `http` (the source is a remote object,
// fetched by libcurl) and `cache` (a slow block device or file, read through
// io_uring). HTTPTarget.swift and CacheTarget.swift say what each adds.
//
// A handler lives on one queue's thread and does all its file I/O on that
// queue's ring (reads, writes, fdatasync, punches, bitmap words); the one
// exception is `writeNow`, the pwrite of fetched bytes into the cache file.
//
// QUEUES (-q N; with one queue there is only the home and none of this runs).
// Queue 0's handler is the HOME: it alone owns the mutable state (planner,
// fetcher, page states, persistence cycles, eviction, write-back, control
// socket, statistics file). Every other queue's handler is a thin one:
//   - a READ whose pages are all present is a hit, served there and then:
//     the present bits are tested with atomic loads inside the grace gate
//     (CachingMesh.swift), the cache file is read into the request on that
//     queue's ring, and that queue completes it. No lock, no message.
//   - anything else (a read miss, WRITE, DISCARD, WRITE_ZEROES, FLUSH) goes
//     to the home as `request` through its inbox (posted in `idle`: a short
//     lock and an eventfd write; the home polls the eventfd on its ring). The
//     home runs it through the very same state machine as its own, in a slot
//     of its per-request arrays (slot = queue × depth + tag), and hands back
//     only what must happen on the owning queue, which alone may touch the
//     request's data and COMMIT it:
//       `read`     pages fetched and pinned: read them, complete, `readDone`
//                  (the pin ends; until then eviction keeps them);
//       `write`    intent bits durable: write the data into the cache file
//                  (and the backing store in write-through), answer `written`;
//                  the home then sets present/dirty state, runs what a FUA
//                  needs, and answers `complete`;
//       `complete` the result (errors, FLUSH, DISCARD done by the home, a
//                  write acknowledged).
// So a page in flight is fetched once across queues (one planner), every
// request is completed exactly once, by its own queue from its own thread,
// and FLUSH covers every write completed on any queue: a write is
// acknowledged only through the home, after its data landed, and a FLUSH
// is a full cycle of the home (fdatasync after all of them). Eviction
// clears bits on the home; a page is punched only after a grace period in
// which every hit that may have tested its bit before the clear has ended
// (CachingMesh.swift proves it). Queue threads block only in io_uring_enter.
// It talks to an `IOQueue`, so the whole state machine runs on the host with
// a fake queue and fault-injecting files (Tests/UblkTargetTests/PageStateModelTests).
// Requests live here; persistence cycles in CachingPersistence.swift, eviction
// in CachingEviction.swift, write-back in CachingWriteback.swift, control
// operations in CachingControl.swift, fetchers in RunFetcher.swift, background
// fills (hydration, profile replay) in CachingFill.swift.
//
// PAGE STATES. What a page *is* and what was *reported* about it are separate
// facts, persisted in separate bitmaps (all bound to one cache file):
//
//   persisted (bitmaps)   meaning                                   who sets / clears
//   present               the cache file holds the page's content   set after its data is written
//                                                                   (fetch, whole-page write); cleared
//                                                                   by eviction or a failed data sync
//   local    (http -w)    the content is data written here: never   set before a write's data is
//                         evicted, never replaced by remote bytes   issued; cleared only if the write
//                                                                   failed on a page never present
//   writeback (cache,back) the backing store lacks the page:        set before a write's data is
//                         never evicted                             issued; cleared after the copy to
//                                                                   the backing store and its fdatasync
//   unsettled (cache,thr) cache and backing store may differ: a     set before a write's data is
//                         crash drops the cache's copy              issued; cleared once both copies
//                                                                   are durable
//   dirty                 written since the last `dirty --clear` /  set before a write's data is
//                         `sync` (reporting only)                   issued; cleared by those commands
//
//   transient (memory)    a page in any of these is not evicted, and a request that would race it waits
//   fetching              in a planner run (FetchPlanner): reads wait for it, never fetched twice
//   reading / writing     a request in flight on the cache file covers it (`requests`)
//   intent                a write waits for its intent bits to be durable (`heldWrites`)
//   evicting              bits cleared, persisted, punch in flight: new requests wait (`deferred`)
//   syncing               handed to `sync`: stays dirty until the copy is confirmed (CachingControl)
//
// ORDER ON DISK (the crash-safety argument; `Cycle` issues it):
//   1. A write's local/dirty/writeback bits reach the disk BEFORE its data is
//      issued (an "intent" cycle: write the bitmap words, fdatasync them). So
//      after any crash a page that holds new data is local, dirty and pending
//      write-back; a bit without new data only costs a copy.
//   2. A present bit reaches the disk only AFTER its data: a "full" cycle
//      stages the bits, fdatasyncs the cache file (and the backing store),
//      then writes and fdatasyncs the bitmap words. FLUSH and FUA complete
//      after a full cycle; cleared write-back bits ride on it too (after the
//      backing store's fdatasync), and evicted pages are punched only once
//      their cleared bits are durable.
//   3. Cleared bits (dirty after `sync`/`dirty --clear`, write-back after the
//      copy, unsettled once both copies are durable) ride only on full
//      cycles, after the data they vouch for is durable.
//   4. A failed fdatasync of the cache file means the pages written since the
//      last good one may be lost, and a later fdatasync will not say so:
//      fetched pages among them not under I/O become absent (refetched),
//      written ones stay dirty, and until the device is restarted no present
//      bit goes to the disk, nothing is evicted and every FLUSH fails (EIO).
//      A power loss then finds those pages as the last good sync left them.
// Cycles run one at a time, so bitmap commits reach the disk in stage order.
// A full cycle runs at least once a second while present bits wait.
//
// WHICH DATA PATH A REQUEST TAKES (DataPath.swift; one per device, `list` shows it):
//   read hit                   cache file -> request: READ_FIXED into the registered request
//                              pages (auto-zero-copy, zero-copy), READ into the tag's buffer
//                              then pwrite on /dev/ublkcN (user-copy) or the driver's copy
//                              (kernel-copy); a cache file in memory without zero copy
//                              (6.12): one inline copy mapping -> request (inline-user-copy).
//   read miss                  the fetch lands in the cache file first (HTTP: pwrite of the
//                              body; `cache`: READ of the backing store into a run buffer,
//                              then pwrite), the pages become present, and the read is then
//                              served as a hit, by the path above.
//   write                      request -> cache file by WRITE_FIXED (zero copy), or WRITE of
//                              the tag's buffer after a pread on /dev/ublkcN (user-copy) or
//                              the driver's copy; inline: one copy request -> mapping.
//   write-through, backing     request -> backing store the same way (a second WRITE_FIXED);
//                              inline: from the mapping, which now holds the data.
//   past the image's end       zeros: zeroFill (memset of the tag's buffer, or pwrite of
//                              zeros on /dev/ublkcN).
//   write-back copy, fetches,  never request data: plain buffers.
//   bitmaps, statistics
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
    /// Write-through: pages a write may have reached in one of cache and backing
    /// store and not in the other (set before the write is issued, cleared once
    /// both are durable). A crash leaves them unknown: the cache drops them.
    var unsettled: Bitmap?
    /// Evict clean pages, least recently used first, to keep the cache under this many bytes (0: no bound).
    var maxCacheBytes: UInt64 = 0
    /// Publish statistics to /run/ublk-http/ublkN.stats.json (off in host tests).
    var publishStats = true
    /// Eviction: when each 1 MiB chunk was last used, shared by the device's queues
    /// (made by the first handler when `maxCacheBytes` > 0 and none was given).
    var chunks: ChunkUse?
    /// The fd data pages are read and written through: the cache file opened
    /// with O_DIRECT (DirectIO), or -1: `cache.fd`. The buffered `cache.fd`
    /// then touches only the trailer past the image and fdatasyncs the file.
    var dataFD: Int32 = -1
    /// With `dataFD` direct: the offset (and length) alignment of its I/O, which
    /// fetched bytes are staged to (`received`); 0: buffered, written as they come.
    var directAlignment = 0
    /// A background fill the home starts once it serves (`add --prefetch-profile`: ProfileControl.swift).
    var startFill: FillJobSpec?
    /// Reads through, with no admission (an overlay over a shared base): a
    /// read's pages that are not present are read from this fd straight into
    /// the request, run by run, and nothing read is kept; only a write's
    /// partial pages are fetched into the cache file (-1: every read miss is
    /// fetched into the cache first, as for `http` and `cache`).
    var readThroughFD: Int32 = -1

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

final class CachingHandler: QueueHandler {
    let context: CacheContext
    let fetcher: RunFetcher
    let planner: FetchPlanner
    let bitmap: Bitmap
    let cacheFD: Int32
    let imageSize: UInt64
    let pageSize: UInt64
    let dirty: Bitmap?
    let local: Bitmap?
    let writeback: Bitmap?
    let unsettled: Bitmap?
    /// The bitmaps a write sets before its data is issued (see ORDER ON DISK, 1).
    let intentBitmaps: [Bitmap]

    /// What a tag's request is doing.
    enum Stage: UInt8 {
        case idle, waitingFetch, waitingIntent, waitingAck, reading, writing
    }
    var requests: [Request?]
    var stage: [Stage]
    var missStart: [UInt64]
    var done: [UInt32]
    /// Bytes of each started run written so far.
    var runBytes: [RunID: UInt64] = [:]
    /// Direct I/O: each run's received bytes not yet written (less than one
    /// alignment unit, kept between deliveries), in an aligned buffer.
    var staging: [RunID: Staging] = [:]
    struct Staging {
        var buffer: UnsafeMutableRawPointer?
        var capacity = 0
        var count = 0
    }
    var pollArmed = false

    /// Write-through: parts of a write still outstanding (cache, backing), and the backing's progress.
    var parts: [UInt8] = []
    var backingDone: [UInt32] = []
    var partFailed: [Int32] = []
    /// Pages a write covers whole and claimed instead of fetching (FetchPlanner.claimForWrite).
    var claimed: [[RunID]] = []

    // MARK: Persistence state

    /// One persistence cycle (ORDER ON DISK): `full` syncs the data first and
    /// carries the present bitmap; an intent cycle carries only the bitmaps a
    /// write sets before its data.
    struct Cycle {
        let full: Bool
        var commits: [(bitmap: Bitmap, commit: BitmapCommit, write: Int?)] = []
        /// The non-empty commits, laid out for writing (index = `data` of their I/O).
        var writes: [Bitmap.PendingWrite] = []
        var failedWrites: Set<Int> = []
        var outstanding = 0
        var dataFailure: Int32 = 0
        /// FLUSH (and FUA) tags completed when the cycle ends.
        var flushes: [UInt16] = []
        /// Writes whose intent bits this cycle persists (then issued, or acknowledged).
        var held: [UInt16] = []
        /// Present pages whose data this cycle's fdatasync covers.
        var unsynced: [Range<UInt64>] = []
        /// Evicted pages, punched once the cleared bits are durable.
        var punch: [Range<UInt64>] = []
        /// Write-back bits cleared by this cycle (set again if the backing's fdatasync fails).
        var writebackCleared: [Range<UInt64>] = []
        /// Pages written before this cycle's fdatasync.
        var writtenPages: [Range<UInt64>] = []
        /// Unsettled bits cleared by this cycle (set again if a data sync fails).
        var settledCleared: [Range<UInt64>] = []
    }
    var cycle: Cycle?
    var flushWaiters: [UInt16] = []
    var heldWrites: [UInt16] = []
    var unsyncedPresent: [Range<UInt64>] = []
    /// Dirty bits were cleared: the next cycle is a full one. A clear may reach
    /// the disk only after the data it was taken from (the copy `sync` made
    /// may be newer than what a power loss would leave), so never in an intent cycle.
    var dirtyCleared = false
    /// Pages written since the last good data sync (the next full cycle's fdatasync covers them).
    var unsyncedWrites: [Range<UInt64>] = []
    /// Pages whose written data a failed fdatasync may have lost and that were
    /// not written (and synced) again since: they stay dirty, and FLUSH fails.
    var lostPages: [Range<UInt64>] = []
    /// A data sync failed: present bits no longer go to the disk (nor does
    /// eviction run) until the device is restarted, and every FLUSH fails.
    var presentFrozen = false
    var durabilityLost: Bool { presentFrozen || !lostPages.isEmpty }
    /// When the last full cycle started, and the statistics were last published.
    var lastPersist: UInt64 = 0
    var lastStats: UInt64 = 0
    /// After a bitmap write failed, leftover bits are tried again from then on (no busy loop).
    var retryAfter: UInt64 = 0
    var persistInterval: UInt64 = 1_000_000_000
    static let metaRunShift: UInt32 = 26

    /// `sync` snapshots handed out and not yet confirmed (CachingControl.swift).
    var syncs = SyncTracker()
    /// A boot profile being recorded, or ended and not yet taken (ProfileControl.swift).
    var profile: ProfileRecorder?
    let timerFD: Int32
    var timerArmed = false
    var draining = false
    /// Background filling: hydration, profile replay (CachingFill.swift; the home's).
    let filling = CacheFilling()
    /// Host tests: a line per state change, for a failing seed's replay.
    var trace: ((String) -> Void)?

    static let subRead: UInt8 = 0, subSync: UInt8 = 1, subWrite: UInt8 = 2, subPunch: UInt8 = 3, subFetch: UInt8 = 4
    static let subBackingWrite: UInt8 = 5, subBackingPunch: UInt8 = 6, subBackingSync: UInt8 = 7
    static let subWritebackRead: UInt8 = 8, subWritebackWrite: UInt8 = 9
    static let subMetaWrite: UInt8 = 10, subMetaSync: UInt8 = 11, subEvictPunch: UInt8 = 12, subStats: UInt8 = 13

    /// Write-back: the one run being copied to the backing store (the throttle), and
    /// whether a write touched it meanwhile (then its bits stay set).
    var writebackRun: (pages: Range<UInt64>, buffer: UnsafeMutableRawPointer, done: Int, dirtied: Bool)?
    var writebackCursor: UInt64 = 0
    /// Copied to the backing store, bits to clear at the next full cycle (after the backing's fdatasync).
    var writebackCopied: [Range<UInt64>] = []
    /// Write-through: pages written to both, whose unsettled bits the next full
    /// cycle clears (a bitset: one entry per write would cost per write).
    var settled: PageBits?
    static let writebackRunPages: UInt64 = 256

    /// Eviction: the ranges whose bits were cleared and go out (punched) once
    /// that is durable (the last use of each chunk is in `context.chunks`).
    var evicting: [Range<UInt64>] = []
    /// Punches in flight; requests arriving meanwhile wait in `deferred`.
    var punchesInFlight = 0
    var deferred: [Request] = []
    static let chunkShift: UInt64 = 20
    static let sourceEvent: UInt32 = 1, timerEvent: UInt32 = 2, meshEvent: UInt32 = 3

    // MARK: Queues (-q N; CachingMesh.swift)

    /// The device's queues when there are several (nil: one queue, the home alone).
    let mesh: CachingMesh?
    /// This handler's queue; queue 0 is the home.
    let queueID: UInt16
    /// Tags per queue. The home's per-request arrays have a slot per tag of
    /// every queue: slot = queue × depth + tag (its own tags: slot = tag), and
    /// a request handed over by another queue carries its slot as its tag here.
    let depth: Int
    @inline(__always) var isHome: Bool { queueID == 0 }
    /// Messages for each queue, posted in `idle`.
    var outbox: [[MeshMessage]] = []
    var outboxPending = false
    /// Another queue's: the grace parity each hit's read registered with, and hits served.
    var hitParity: [UInt64] = []
    /// Another queue's: the tag's request went to the home (which then awaits `readDone` of a read it handed back).
    var viaHome: [Bool] = []
    var peerHits: UInt64 = 0
    var publishedHits: UInt64 = 0
    /// Another queue's last read (hit or not), to tell the home of sequential hits (readahead).
    var lastReadStart: UInt64 = .max
    var lastReadEnd: UInt64 = .max
    let presentWords: UnsafePointer<UInt64>
    /// The home's: evicted ranges whose punch waits for the running grace
    /// period (cleared before its flip), and for the next one (cleared after).
    var graceRanges: [Range<UInt64>] = []
    var graceNext: [Range<UInt64>] = []

    /// Statistics published through the ring (a fixed 4 KiB record, rewritten in place).
    var statsFD: Int32 = -1
    var statsBuffer: UnsafeMutableRawPointer?
    var statsInFlight = false
    var writtenStatsSignature: UInt64 = .max

    /// User-copy mode (the cache file lives in memory and the device has
    /// UBLK_F_USER_COPY): the cache file mapped.
    /// Request data then moves with one copy between the cache's pages and the
    /// kernel's request pages (pwrite/pread on /dev/ublkcN), like the loop
    /// target's; the tag buffers are unused.
    var mapping: UnsafeMutableRawPointer?
    var mappingSize = 0

    /// The data paths a caching target over `cacheFD` can run, best first. A cache
    /// file in memory: zero copy where the driver has it (measured faster than the
    /// inline copy on 7.3, as for `loop`: LoopTarget's `dataPaths`), else the inline
    /// copy through a mapping (the fastest on 6.12).
    static func dataPaths(cacheFD: Int32) -> [DataPath] {
        memoryFS.contains(cu_fs_type(cacheFD)) ? [.autoZeroCopy, .zeroCopy, .inlineUserCopy, .userCopy, .kernelCopy]
                                               : [.autoZeroCopy, .zeroCopy, .userCopy, .kernelCopy]
    }
    static let memoryFS: [Int64] = [0x0102_1994 /* tmpfs */, 0x8584_58f6 /* ramfs */]

    /// A handler for `queue`; maps the cache file when the queue copies data itself.
    static func make(context: CacheContext, fetcher: RunFetcher, planner: FetchPlanner, queue: IOQueue,
                     deviceSize: UInt64, mesh: CachingMesh? = nil) throws(UblkError) -> CachingHandler {
        if let m = mesh { try m.check(depth: queue.depth) }
        let h = CachingHandler(context: context, fetcher: fetcher, planner: planner, depth: queue.depth,
                               mesh: mesh, queueID: queue.id)
        if queue.dataPath == .inlineUserCopy {
            // The mapping covers the device (the image rounded up to 512 bytes,
            // so never past the cache file's last page): bytes past the end read as zeros.
            guard deviceSize > 0, let m = mmap(nil, Int(deviceSize), PROT_READ | PROT_WRITE, MAP_SHARED, context.cache.fd, 0),
                  m != MAP_FAILED else {
                throw UblkError("cannot map the cache file \(context.cache.path)", errno: .current)
            }
            h.mapping = m
            h.mappingSize = Int(deviceSize)
        }
        if let m = mesh { queue.poll(fd: m.inboxes[Int(queue.id)].fd, data: CachingHandler.meshEvent) }
        if h.isHome, let spec = context.startFill { h.scheduleFill(spec, queue: queue) }
        if context.publishStats && h.isHome {
            h.statsFD = open(HTTPStats.path(queue.deviceID), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        }
        return h
    }

    init(context: CacheContext, fetcher: RunFetcher, planner: FetchPlanner, depth: Int,
         mesh: CachingMesh? = nil, queueID: UInt16 = 0) {
        self.mesh = mesh
        self.queueID = queueID
        self.depth = depth
        self.presentWords = context.bitmap.bits.sharedWords
        self.context = context
        self.fetcher = fetcher
        self.planner = planner
        self.bitmap = context.bitmap
        self.dirty = context.dirty
        self.local = context.local
        self.writeback = context.writeback
        self.unsettled = context.unsettled
        // Unsettled bits matter to write-through only; in other modes the
        // bitmap is opened so that a crash of an earlier write-through run is settled.
        intentBitmaps = [context.local, context.dirty, context.writeback,
                         context.writeThrough && context.backingFD >= 0 ? context.unsettled : nil].compactMap { $0 }
        if context.writeThrough && context.backingFD >= 0 && context.unsettled != nil && queueID == 0 {
            settled = PageBits(pageCount: context.bitmap.pageCount)
        }
        self.cacheFD = context.dataFD >= 0 ? context.dataFD : context.cache.fd
        self.imageSize = context.imageSize
        self.pageSize = UInt64(context.pageSize)
        let slots = queueID == 0 ? depth * (mesh?.queueCount ?? 1) : depth
        requests = Array(repeating: nil, count: slots)
        stage = Array(repeating: .idle, count: slots)
        parts = Array(repeating: 0, count: slots)
        if context.maxCacheBytes > 0 && context.chunks == nil {
            context.chunks = ChunkUse(chunks: Int((context.imageSize >> CachingHandler.chunkShift) + 1))
        }
        backingDone = Array(repeating: 0, count: slots)
        partFailed = Array(repeating: 0, count: slots)
        claimed = Array(repeating: [], count: slots)
        missStart = Array(repeating: 0, count: slots)
        done = Array(repeating: 0, count: slots)
        if let m = mesh {
            outbox = Array(repeating: [], count: m.queueCount)
            if queueID != 0 {
                hitParity = Array(repeating: 0, count: depth)
                viaHome = Array(repeating: false, count: depth)
            }
        }
        // The other queues only serve hits and move data: what follows is the home's.
        timerFD = queueID == 0 ? cu_timerfd() : -1
        lastPersist = monotonicNanos()
        if queueID != 0 { return }
        settleAfterCrash()
        // A local or write-back bit without a present one is a write whose data
        // never became durable (its present bit comes after the data): the page
        // is still the remote's (the backing store's).
        for l in [local, writeback].compactMap({ $0 }) {
            var p: UInt64 = 0
            while p < l.pageCount, let s = l.bits.nextSet(in: p..<l.pageCount) {
                let e = l.bits.nextClear(in: s..<l.pageCount) ?? l.pageCount
                var q = s
                while q < e {
                    if let a = bitmap.bits.nextClear(in: q..<e) {
                        let b = bitmap.bits.nextSet(in: a..<e) ?? e
                        l.markAbsent(a..<b)
                        q = b
                    } else { q = e }
                }
                p = e
            }
        }
    }

    /// Write-through after a crash: a page whose write may have reached only
    /// one of cache and backing store is dropped from the cache (the backing
    /// store's copy is what the device reads from now on).
    func settleAfterCrash() {
        guard let u = unsettled, u.count > 0 else { return }
        var p: UInt64 = 0
        while p < u.pageCount, let s = u.bits.nextSet(in: p..<u.pageCount) {
            let e = u.bits.nextClear(in: s..<u.pageCount) ?? u.pageCount
            bitmap.markAbsent(s..<e)
            evicting.append(s..<e)
            u.markAbsent(s..<e)
            p = e
        }
    }

    deinit {
        if timerFD >= 0 { close(timerFD) }
        if statsFD >= 0 { close(statsFD) }
        statsBuffer?.deallocate()
        if let m = mapping { munmap(m, mappingSize) }
        for s in staging.values { free(s.buffer) }
    }

    /// User-copy mode: moves `r`'s data between the mapped cache file and the
    /// kernel's request pages (read: to the request; write: from it). One copy.
    func copyMapped(_ r: Request, queue: IOQueue, mapping: UnsafeMutableRawPointer) -> Int32 {
        let len = Int(r.length)
        guard Int(r.offset) + len <= mappingSize else { return -EIO }
        let e = queue.copyRequest(r, at: 0, mapping + Int(r.offset), length: len, toRequest: r.op == Op.read)
        return e < 0 ? e : Int32(len)
    }

    /// Write-through: `r`'s data from byte `at` to the backing store; inline, from
    /// the cache's mapped pages (they hold it now), else from the request.
    func writeBacking(_ r: Request, at: UInt32, queue: IOQueue) {
        let flags = r.fua ? cu_rwf_dsync : 0
        if let m = mapping {
            return queue.write(fd: context.backingFD, from: m + Int(r.offset) + Int(at), length: r.length - at,
                               offset: r.offset + UInt64(at), flags: flags, tag: r.tag, sub: CachingHandler.subBackingWrite)
        }
        queue.writeFromRequest(r, at: at, length: r.length - at, fd: context.backingFD, offset: r.offset + UInt64(at),
                               flags: flags, tag: r.tag, sub: CachingHandler.subBackingWrite, data: 0)
    }

    var through: Bool { context.writeThrough && context.backingFD >= 0 }

    // MARK: Requests

    func handle(_ r: Request, queue: IOQueue) {
        if !isHome { return handleOnOtherQueue(r, queue: queue) }
        switch r.op {
        case Op.read, Op.write, Op.discard, Op.writeZeroes:
            if r.op == Op.read && profile != nil { recordRead(offset: r.offset, length: r.length) }
            if r.op != Op.read && !context.writable { return completeSlot(r.tag, -EROFS, queue) }
            if draining { return completeSlot(r.tag, -EIO, queue) }
            // Evicted pages are being punched: nothing may touch the cache file's holes meanwhile.
            if punchesInFlight > 0 { return deferred.append(r) }
            if let c = context.chunks { c.touch(offset: r.offset, length: r.length) }
            if r.op == Op.read && context.readThroughFD >= 0 {
                // Nothing is fetched for a read: present runs come from the cache file, the rest from the source.
                if CachingMesh.allSet(presentWords, planner.pages(offset: r.offset, length: Int(r.length))) {
                    context.stats.hits += 1
                } else {
                    context.stats.misses += 1
                }
                return readFromCache(r, queue: queue)
            }
            // A write needs every page it touches present first (see the header),
            // except pages it covers whole: those it claims (reads of them wait).
            if r.op != Op.read,
               let claims = planner.claimForWrite(offset: r.offset, length: Int(r.length), present: bitmap.bits) {
                claimed[Int(r.tag)] = claims
                return startWrite(r, queue: queue)
            }
            // Sequential reads are told apart per queue (each CPU's arrive on one).
            let plan = planner.plan(offset: r.offset, length: Int(r.length), context: UInt64(r.tag), present: bitmap.bits,
                                    stream: mesh == nil ? 0 : Int(r.tag) / depth)
            if plan.isHit {
                if r.op == Op.read { context.stats.hits += 1 }
                proceed(r, queue: queue)
            } else {
                if r.op == Op.read { context.stats.misses += 1 }
                requests[Int(r.tag)] = r
                stage[Int(r.tag)] = .waitingFetch
                missStart[Int(r.tag)] = monotonicNanos()
            }
            if planner.plannedRunCount > 0 { startRuns(queue) }
        case Op.flush:
            if !context.writable { return completeSlot(r.tag, 0, queue) }
            flushWaiters.append(r.tag)
            startCycle(queue, full: true)
        default:
            completeSlot(r.tag, -EOPNOTSUPP, queue)
        }
    }

    /// Every page of `r` is present: read it, or write it.
    func proceed(_ r: Request, queue: IOQueue) {
        if r.op == Op.read { readFromCache(r, queue: queue) } else { startWrite(r, queue: queue) }
    }

    /// Sets a write's intent bits (local, dirty, write-back); true when some of
    /// them are not durable yet, so its data must wait for an intent cycle.
    func setIntent(_ pages: Range<UInt64>) -> Bool {
        if let run = writebackRun, run.pages.overlaps(pages) { writebackRun!.dirtied = true }
        if writebackCopied.contains(where: { $0.overlaps(pages) }) { writebackCopied = writebackCopied.flatMap { $0.subtracting(pages) } }
        if let st = settled, st.count > 0 { st.clear(pages) }
        var wait = false
        for b in intentBitmaps {
            b.markPresent(pages)
            if b.hasUnstaged(pages) { wait = true }
            if let c = cycle, c.commits.contains(where: { $0.bitmap === b && $0.commit.touches(pages) }) { wait = true }
        }
        return wait
    }

    func startWrite(_ r: Request, queue: IOQueue) {
        let t = Int(r.tag)
        requests[t] = r
        context.stats.writes += 1
        if setIntent(planner.pages(offset: r.offset, length: Int(r.length))) {
            context.stats.writesHeldForIntent += 1
            stage[t] = .waitingIntent
            heldWrites.append(r.tag)
            return startCycle(queue, full: false)
        }
        issueWrite(r, queue: queue)
    }

    /// The write's intent bits are durable: its data goes to the cache file (and the backing store).
    func issueWrite(_ r: Request, queue: IOQueue) {
        trace?("issue tag \(r.tag) op \(r.op) at \(r.offset)+\(r.length)")
        let t = Int(r.tag)
        requests[t] = r
        stage[t] = .writing
        partFailed[t] = 0
        switch r.op {
        case Op.write:
            if mesh != nil && isHome && t >= depth {
                // Another queue's request: its data moves there (the request's
                // buffer is that queue's), which answers `written` when done.
                parts[t] = 1
                return send(.write(tag: r.tag % UInt16(depth)), to: r.tag / UInt16(depth))
            }
            done[t] = 0
            backingDone[t] = 0
            parts[t] = through ? 2 : 1
            if let m = mapping {
                // The data lands in the cache's pages straight from the request.
                let copied = copyMapped(r, queue: queue, mapping: m)
                if copied < 0 {
                    parts[t] = 1
                    return partDone(r, copied, queue: queue)
                }
            } else {
                queue.writeFromRequest(r, at: 0, length: r.length, fd: cacheFD, offset: r.offset, flags: 0,
                                       tag: r.tag, sub: CachingHandler.subWrite, data: 0)
            }
            if through { writeBacking(r, at: 0, queue: queue) }
            if mapping != nil { partDone(r, 0, queue: queue) }
        default:
            // DISCARD / WRITE_ZEROES: a hole reads as zeros; partial pages are zeroed by the punch.
            let end = min(r.offset + UInt64(r.length), imageSize)
            if r.offset >= end { parts[t] = 1; return partDone(r, 0, queue: queue) }
            parts[t] = through ? 2 : 1
            queue.fallocate(fd: cacheFD, mode: cu_falloc_punch, offset: r.offset, length: end - r.offset,
                            tag: r.tag, sub: CachingHandler.subPunch)
            if through {
                queue.fallocate(fd: context.backingFD, mode: r.op == Op.writeZeroes && r.noUnmap ? cu_falloc_zero : cu_falloc_punch,
                                offset: r.offset, length: end - r.offset, tag: r.tag, sub: CachingHandler.subBackingPunch)
            }
        }
    }

    /// One part of a write is done (or failed); the write completes when all are.
    func partDone(_ r: Request, _ result: Int32, queue: IOQueue) {
        let t = Int(r.tag)
        if result < 0 && partFailed[t] == 0 { partFailed[t] = result }
        parts[t] -= 1
        guard parts[t] == 0 else { return }
        if !isHome {
            // The data moved for the home's state machine, which completes the request.
            stage[t] = .waitingFetch
            return send(.written(slot: UInt16(Int(queueID) * depth + t), result: partFailed[t]), to: 0)
        }
        let failed = partFailed[t] < 0
        let pages = planner.pages(offset: r.offset, length: Int(r.length))
        if !claimed[t].isEmpty {
            // Pages the write covered whole: present now that their data is in the cache.
            let claims = claimed[t]
            claimed[t] = []
            if !failed {
                markPresent(pages)
            } else {
                // Never present, and no data of it counts: the page is still the remote's.
                for b in [local, writeback].compactMap({ $0 }) {
                    for p in pages where !bitmap.test(p) { b.markAbsent(p..<p + 1) }
                }
            }
            for id in claims { serve(planner.complete(run: id, success: !failed), queue) }
        }
        if failed {
            // Write-through: one copy may have it and the other not. The cache's
            // goes (the page is read from the backing store again); the
            // unsettled bit stays until a write of the page succeeds.
            if through { for p in pages where bitmap.test(p) { bitmap.markAbsent(p..<p + 1); evicting.append(p..<p + 1) } }
            // Some of it may have landed: a `sync` under way must not clear these pages.
            syncs.written(pages)
            return finish(r.tag, partFailed[t], queue)
        }
        written(r, pages, queue: queue)
    }

    /// A write's data is in the cache file. Its intent bits were set before it
    /// was issued; a `dirty --clear` meanwhile may have cleared them, so they
    /// are set again, and the write is acknowledged once they are durable.
    func written(_ r: Request, _ pages: Range<UInt64>, queue: IOQueue) {
        syncs.written(pages)
        unsyncedWrites.append(pages)
        settled?.set(pages)
        var newly = false
        for b in intentBitmaps where b.markPresent(pages) > 0 { newly = true }
        let t = Int(r.tag)
        if newly {
            stage[t] = .waitingAck
            heldWrites.append(r.tag)
            return startCycle(queue, full: false)
        }
        acknowledge(r, queue: queue)
    }

    func acknowledge(_ r: Request, queue: IOQueue) {
        if r.fua {
            requests[Int(r.tag)] = nil
            stage[Int(r.tag)] = .idle
            flushWaiters.append(r.tag)
            startCycle(queue, full: true)
        } else {
            finish(r.tag, r.op == Op.write ? Int32(r.length) : 0, queue)
        }
    }

    func readFromCache(_ r: Request, queue: IOQueue) {
        if mesh != nil && isHome && Int(r.tag) >= depth {
            // Another queue's read: its pages are present, that queue reads them;
            // they stay pinned here (`requests`: not evicted) until it says `readDone`.
            requests[Int(r.tag)] = r
            stage[Int(r.tag)] = .reading
            return send(.read(tag: r.tag % UInt16(depth)), to: r.tag / UInt16(depth))
        }
        requests[Int(r.tag)] = r
        stage[Int(r.tag)] = .reading
        done[Int(r.tag)] = 0
        if context.readThroughFD >= 0 { return readNextRun(r, queue: queue) }
        if let m = mapping { return finish(r.tag, copyMapped(r, queue: queue, mapping: m), queue) }
        if r.offset >= imageSize {
            let z = queue.zeroFill(r, at: 0, length: r.length)
            return finish(r.tag, z < 0 ? z : Int32(r.length), queue)
        }
        if cacheInMemory && queue.dataPath == .kernelCopy {
            // As for loop: io_uring would punt a tmpfs read to an io-wq worker; the copy is cheaper.
            var got: UInt32 = 0
            while true {
                let n = pread(cacheFD, r.buffer + Int(got), Int(r.length - got), off_t(r.offset) + off_t(got))
                if n < 0 && errno == EINTR { continue }
                if let final = r.readProgress(n < 0 ? -errno : Int32(n), done: &got) { return finish(r.tag, final, queue) }
            }
        }
        queue.readIntoRequest(r, at: 0, length: r.length, fd: cacheFD, offset: r.offset, tag: r.tag,
                              sub: CachingHandler.subRead, data: 0)
    }

    /// Read-through: the next run of `r` from `done` on, of pages all present
    /// (from the cache file) or all not (from the source). The bits are
    /// tested anew for each run (with atomic loads: another queue reads them
    /// too); a page that turns present meanwhile is read either way, as a
    /// read racing a write may be. Pages under the read stay pinned
    /// (`requests`; on another queue, the grace gate), as for a hit.
    func readNextRun(_ r: Request, queue: IOQueue) {
        let t = Int(r.tag)
        let start = r.offset + UInt64(done[t]), end = r.offset + UInt64(r.length)
        let first = start / pageSize
        let present = CachingMesh.allSet(presentWords, first..<first + 1)
        var stop = (first + 1) * pageSize
        while stop < end && CachingMesh.allSet(presentWords, stop / pageSize..<stop / pageSize + 1) == present { stop += pageSize }
        stop = min(stop, end)
        queue.readIntoRequest(r, at: done[t], length: UInt32(stop - start), fd: present ? cacheFD : context.readThroughFD,
                              offset: start, tag: r.tag, sub: CachingHandler.subRead, data: 0)
    }

    /// The cache file lives in memory (tmpfs, ramfs).
    lazy var cacheInMemory: Bool = CachingHandler.memoryFS.contains(cu_fs_type(cacheFD))

    @inline(__always)
    func finish(_ tag: UInt16, _ result: Int32, _ queue: IOQueue) {
        if let m = mesh, !isHome {
            if stage[Int(tag)] == .reading {
                if m.exit(queueID, hitParity[Int(tag)]) { send(.graceDrained, to: 0) }
                if viaHome[Int(tag)] { send(.readDone(slot: UInt16(Int(queueID) * depth + Int(tag))), to: 0) }
            }
            viaHome[Int(tag)] = false
        }
        requests[Int(tag)] = nil
        stage[Int(tag)] = .idle
        completeSlot(tag, result, queue)
    }

    /// Completes the request in `slot`: on this queue, or (the home, for
    /// another queue's request) by that queue, from its own thread.
    @inline(__always)
    func completeSlot(_ slot: UInt16, _ result: Int32, _ queue: IOQueue) {
        if mesh != nil && isHome && Int(slot) >= depth {
            return send(.complete(tag: slot % UInt16(depth), result: result), to: slot / UInt16(depth))
        }
        queue.complete(tag: slot, result: result)
    }

    func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: IOQueue) {
        switch sub {
        case CachingHandler.subSync, CachingHandler.subBackingSync, CachingHandler.subMetaWrite, CachingHandler.subMetaSync:
            return cycleIO(sub, data: data, result: result, queue: queue)
        case CachingHandler.subWritebackRead, CachingHandler.subWritebackWrite:
            return writebackProgress(sub, result, queue: queue)
        case CachingHandler.subFetch:
            return fetcher.ioCompleted(data: data, result: result, handler: self, queue: queue)
        case CachingHandler.subEvictPunch:
            return punched(result, queue: queue)
        case CachingHandler.subStats:
            statsInFlight = false
            return
        default:
            break
        }
        let t = Int(tag)
        guard let r = requests[t] else { return }
        switch sub {
        case CachingHandler.subPunch, CachingHandler.subBackingPunch:
            return partDone(r, result == -EOPNOTSUPP && r.op == Op.discard ? 0 : min(result, 0), queue: queue)
        case CachingHandler.subWrite:
            if result <= 0 { return partDone(r, result < 0 ? result : -EIO, queue: queue) }
            done[t] += UInt32(result)
            if done[t] >= r.length { return partDone(r, 0, queue: queue) }
            return queue.writeFromRequest(r, at: done[t], length: r.length - done[t], fd: cacheFD,
                                          offset: r.offset + UInt64(done[t]), flags: 0, tag: tag, sub: CachingHandler.subWrite, data: 0)
        case CachingHandler.subBackingWrite:
            if result <= 0 { return partDone(r, result < 0 ? result : -EIO, queue: queue) }
            backingDone[t] += UInt32(result)
            if backingDone[t] >= r.length { return partDone(r, 0, queue: queue) }
            return writeBacking(r, at: backingDone[t], queue: queue)
        default:
            break
        }
        // Past the end of the object (the device is rounded up to 512 bytes): zeros.
        if let final = queue.readProgress(r, result, done: &done[t]) { return finish(tag, final, queue) }
        if context.readThroughFD >= 0 { return readNextRun(r, queue: queue) }
        queue.readIntoRequest(r, at: done[t], length: r.length - done[t], fd: cacheFD,
                              offset: r.offset + UInt64(done[t]), tag: tag, sub: CachingHandler.subRead, data: 0)
    }

    // MARK: Fetching

    func startRuns(_ queue: IOQueue) {
        for run in planner.startableRuns() {
            trace?("fetch \(run.firstPage)+\(run.pageCount)")
            runBytes[run.id] = 0
            fetcher.start(run, handler: self, queue: queue)
        }
        armPoll(queue)
    }

    /// Pages whose data was just written into the cache file: present (in memory;
    /// on disk after the next full cycle's data sync).
    func markPresent(_ pages: Range<UInt64>) {
        trace?("present \(pages)")
        if bitmap.markPresent(pages) > 0 { unsyncedPresent.append(pages) }
    }

    /// Body bytes of `run` at `offset`: into the cache file; completed pages become present.
    func received(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: IOQueue) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        if context.directAlignment > 0 { return receivedDirect(run, offset: offset, bytes: bytes, queue: queue) }
        let w = queue.writeNow(fd: cacheFD, from: base, length: bytes.count, offset: offset)
        if w < 0 {
            log("ublk-http: cache file write failed: \(Errno(returned: w))")
            return false
        }
        return wroteFetched(run, upTo: offset + UInt64(bytes.count), queue: queue)
    }

    /// Direct I/O: fetched bytes reach the cache file in aligned pieces from an
    /// aligned buffer. What arrives is appended to the run's staging buffer;
    /// every whole alignment unit staged is written at once (runs start on a
    /// page, so the file offsets are aligned), the rest waits for the next
    /// bytes. The run's last bytes, at the image end, are written padded with
    /// zeros to the alignment: past the image, before the trailer (which
    /// starts at the image end rounded up to 4096, and alignments are at most
    /// 4096). A chunk that is already aligned (a backing store read) is
    /// written from where it is.
    func receivedDirect(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: IOQueue) -> Bool {
        let align = context.directAlignment
        let runEnd = run.offset + UInt64(run.length)
        let end = offset + UInt64(bytes.count)
        func write(_ from: UnsafeRawPointer, _ length: Int, at: UInt64) -> Bool {
            let w = queue.writeNow(fd: cacheFD, from: from, length: length, offset: at)
            if w < 0 { log("ublk-http: cache file write failed: \(Errno(returned: w))") }
            return w >= 0
        }
        var st = staging[run.id] ?? Staging()
        if st.count == 0, Int(bitPattern: bytes.baseAddress!) % 4096 == 0, offset % UInt64(align) == 0, bytes.count % align == 0 {
            guard write(bytes.baseAddress!, bytes.count, at: offset) else { return false }
            return wroteFetched(run, upTo: end, queue: queue)
        }
        // Where the staged bytes start in the file: an aligned offset.
        let stageStart = offset - UInt64(st.count)
        let need = (st.count + bytes.count + align - 1) / align * align
        if st.capacity < need {
            let capacity = max(need, 64 << 10)
            var raw: UnsafeMutableRawPointer?
            guard posix_memalign(&raw, 4096, capacity) == 0, let buf = raw else { return false }
            if let old = st.buffer { memcpy(buf, old, st.count); free(old) }
            st.buffer = buf
            st.capacity = capacity
        }
        let sb = st.buffer!
        memcpy(sb + st.count, bytes.baseAddress!, bytes.count)
        st.count += bytes.count
        var writeLen = st.count / align * align
        if end == runEnd && writeLen < st.count {
            // The image's last bytes: the block is padded with zeros.
            writeLen = need
            memset(sb + st.count, 0, writeLen - st.count)
        }
        staging[run.id] = st
        guard writeLen > 0 else { return true }
        guard write(sb, writeLen, at: stageStart) else { return false }
        let left = max(st.count - writeLen, 0)
        if left > 0 { memmove(sb, sb + writeLen, left) }
        staging[run.id]!.count = left
        return wroteFetched(run, upTo: min(stageStart + UInt64(writeLen), runEnd), queue: queue)
    }

    /// The cache file holds `run`'s bytes up to `upTo`: the whole pages among them are present.
    func wroteFetched(_ run: FetchRun, upTo: UInt64, queue: IOQueue) -> Bool {
        let before = runBytes[run.id] ?? 0
        let after = upTo - run.offset
        if after <= before { return true }
        runBytes[run.id] = after
        // Whole pages now written (the run's last page may be short at the image end).
        let pagesBefore = before / pageSize
        var pagesAfter = after / pageSize
        if after == UInt64(run.length) { pagesAfter = run.pageCount }
        if pagesAfter > pagesBefore {
            markPresent(run.firstPage + pagesBefore..<run.firstPage + pagesAfter)
            serve(planner.progress(run: run.id, pagesDone: pagesAfter), queue)
        }
        return true
    }

    /// `error`: nil on success, else what failed (logged).
    func runEnded(_ run: FetchRun, error: String?, queue: IOQueue) {
        let got = runBytes.removeValue(forKey: run.id) ?? 0
        if let s = staging.removeValue(forKey: run.id), let b = s.buffer { free(b) }
        if let e = error {
            log("ublk-http: fetch of bytes \(run.offset)-\(run.offset + UInt64(run.length) - 1) failed: \(e)")
            filling.lastFetchError = e
            serve(planner.complete(run: run.id, success: false), queue)
        } else if got < UInt64(run.length) {
            log("ublk-http: fetch of bytes \(run.offset)-\(run.offset + UInt64(run.length) - 1) ended short (\(got) bytes)")
            serve(planner.complete(run: run.id, success: false), queue)
        } else {
            serve(planner.complete(run: run.id, success: true), queue)
        }
        if planner.plannedRunCount > 0 && !draining { startRuns(queue) }
    }

    func serve(_ outcome: RunOutcome, _ queue: IOQueue) {
        let now = monotonicNanos()
        for ctx in outcome.satisfied {
            if ctx >= FillJob.contextBase { fillOutcome(ctx, ok: true); continue }
            let tag = UInt16(ctx)
            guard stage[Int(tag)] == .waitingFetch, let r = requests[Int(tag)] else { continue }
            if r.op == Op.read { context.stats.missLatency.record(nanoseconds: now &- missStart[Int(tag)]) }
            proceed(r, queue: queue)
        }
        for ctx in outcome.failed {
            if ctx >= FillJob.contextBase { fillOutcome(ctx, ok: false); continue }
            let tag = UInt16(ctx)
            if stage[Int(tag)] == .waitingFetch { finish(tag, -EIO, queue) }
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
        case CachingHandler.fillTimerEvent:
            fillTimerFired()
        case CachingHandler.meshEvent:
            received(mesh!.inboxes[Int(queueID)].take(), queue: queue)
            queue.poll(fd: mesh!.inboxes[Int(queueID)].fd, data: CachingHandler.meshEvent)
        default:
            break
        }
    }

    func idle(queue: IOQueue) {
        if mesh != nil && !isHome { return otherQueueIdle() }
        defer { if mesh != nil { flushOutbox() } }
        if let m = mesh, !graceNext.isEmpty || m.gracePending { advanceGrace(queue) }
        if !fetcher.isIdle { armPoll(queue) }
        let statsDirty = context.publishStats && statsSignature != writtenStatsSignature
        if writeback != nil && !draining { startWriteback(queue) }
        if filling.job != nil { fillStep(queue) }
        if context.maxCacheBytes > 0 && cycle == nil && punchesInFlight == 0 && !presentFrozen { evictIfNeeded(queue) }
        let now = monotonicNanos()
        if statsDirty && now &- lastStats >= persistInterval {
            lastStats = now
            publishStats(queue)
        }
        // Present bits (and what rides with them) go out once per interval,
        // in a full cycle; intent bits left over go out at once.
        let presentDirty = presentNeedsCycle
        let fullDue = presentDirty && now &- lastPersist >= persistInterval
        let intentLeft = intentBitmaps.contains(where: { $0.bits.hasDirty })
        if cycle == nil {
            if fullDue {
                startCycle(queue, full: true)
            } else if intentLeft && now >= retryAfter {
                startCycle(queue, full: false)
            }
        }
        let statsWait = statsDirty && now &- lastStats < persistInterval
        if (presentDirty && !fullDue) || statsWait || (intentLeft && now < retryAfter), !timerArmed {
            let untilFull = persistInterval &- min(now &- lastPersist, persistInterval)
            let untilStats = persistInterval &- min(now &- lastStats, persistInterval)
            _ = cu_timerfd_arm(timerFD, max(1, min(presentDirty ? untilFull : .max, statsWait ? untilStats : .max)))
            timerArmed = true
            queue.poll(fd: timerFD, data: CachingHandler.timerEvent)
        }
    }

    /// Something only a full cycle persists is waiting.
    var presentNeedsCycle: Bool {
        bitmap.bits.hasDirty || !writebackCopied.isEmpty || !evicting.isEmpty || (settled?.count ?? 0) > 0
    }

    func drain(queue: IOQueue) {
        // Another queue's requests are the home's to end (it answers each).
        guard isHome else { return }
        if !flushWaiters.isEmpty { startCycle(queue, full: true) }
        draining = true
        fillDrain()
        fetcher.cancelAll(handler: self, queue: queue)
        for t in 0..<stage.count where stage[t] == .waitingFetch {
            finish(UInt16(t), -EIO, queue)
        }
        if punchesInFlight == 0 {
            let waiting = deferred
            deferred = []
            for r in waiting { completeSlot(r.tag, -EIO, queue) }
        }
    }

    func shutdown(queue: IOQueue) {
        guard isHome else { return }
        if context.publishStats { context.snapshot().saveAtomically(device: queue.deviceID) }
        // The loop ended with no target I/O outstanding: no cycle is in flight. Blocking is allowed here.
        do {
            if let wb = writeback, !writebackCopied.isEmpty, context.backingFD >= 0, fdatasync(context.backingFD) == 0 {
                for r in writebackCopied { wb.markAbsent(r) }
                writebackCopied = []
            }
            if let u = unsettled, let st = settled, st.count > 0, context.backingFD >= 0, fdatasync(context.backingFD) == 0 {
                try context.cache.sync()
                for r in DirtyExtents.runs(st) { u.markAbsent(r) }
            }
            if !durabilityLost { try bitmap.commit(syncing: context.cache) }
            for b in intentBitmaps { try b.commit(syncing: context.cache) }
        } catch {
            log("ublk-http: cannot persist the bitmaps at shutdown: \(error)")
        }
    }
}

extension Range where Bound == UInt64 {
    /// This range without `other`: zero, one or two ranges.
    func subtracting(_ other: Range<UInt64>) -> [Range<UInt64>] {
        guard overlaps(other) else { return [self] }
        var out: [Range<UInt64>] = []
        if lowerBound < other.lowerBound { out.append(lowerBound..<other.lowerBound) }
        if other.upperBound < upperBound { out.append(other.upperBound..<upperBound) }
        return out
    }
}
