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
// Queue 0's handler is the HOME, this class: it alone owns the mutable state
// (planner, fetcher, page states, persistence cycles, eviction, write-back,
// control socket, statistics file). Every other queue's handler is a
// CachingPeer (CachingPeer.swift), chosen once when the queue starts:
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
// The handler's state lives here (one `Slot` per request); how a request's
// data moves (for the home and the peers alike) in CacheIO.swift; the request path
// in CachingRequests.swift, fetched bytes in CachingFetch.swift, ring events,
// idle work and shutdown in CachingEvents.swift, persistence cycles in
// CachingPersistence.swift, eviction in CachingEviction.swift, write-back in
// CachingWriteback.swift, control operations in CachingControl.swift, what
// the target hands it in CacheContext.swift, fetchers in RunFetcher.swift, background
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
//   evicting              bits cleared, persisted, punch in flight: new requests wait (`Eviction`)
//   syncing               handed to `sync`: stays dirty until the copy is confirmed (CachingControl)
//
// ORDER ON DISK (the crash-safety argument; PersistenceCycle.swift orders each cycle's I/O):
//   1. A write's local/dirty/writeback bits reach the disk BEFORE its data is
//      issued (an "intent" cycle: write the bitmap words, fdatasync them). So
//      after any crash a page that holds new data is local, dirty and pending
//      write-back; a bit without new data only costs a copy. So a write that
//      waits for such a cycle sets the write-back (unsettled) bits of its
//      region's present pages in it too (write-ahead by region: setAhead in
//      CachingRequests.swift), and the next writes there need no cycle.
//      Except, without dirty tracking, a write of pages absent in memory and
//      on the disk (write-ahead deferred: mayDeferIntent there): its data
//      goes at once, and its bits need only reach the disk before its present
//      bits. The next full cycle is then ordered (PersistenceCycle.swift:
//      intent bits, then present bits, each phase durable before the next);
//      until it lands a crash finds the page absent, as before the write.
//   2. A present bit reaches the disk only AFTER its data: a "full" cycle
//      stages the bits, fdatasyncs the cache file (and the backing store),
//      then writes and fdatasyncs the bitmap words. FLUSH and FUA complete
//      after a full cycle; cleared write-back bits ride on it too (after the
//      backing store's fdatasync), and evicted pages are punched only once
//      their cleared bits are durable.
//   3. Cleared bits (dirty after `sync`/`dirty --clear`, write-back after the
//      copy, unsettled once both copies are durable) ride only on full
//      cycles, after the data they vouch for is durable. Cleared dirty bits go
//      after the cycle's other words are durable too: a page whose present
//      bit did not land is dropped at open (it reads the source again), so
//      it must still be listed dirty.
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
//   read miss not admitted     (`cache --admit reuse`, AdmissionFilter: a page's first miss)
//                              read through: absent runs from the backing store straight into
//                              the request (READ_FIXED), present runs from the cache file;
//                              nothing is kept. An overlay reads every miss this way.
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
    /// One request slot's state, all of it (slot = queue × depth + tag).
    struct Slot {
        var request: Request?
        var stage = Stage.idle
        /// When its read missed (the miss latency).
        var missStart: UInt64 = 0
        /// How far its data moved (its own queue's requests; another queue moves its own).
        var transfer = Transfer()
        /// Pages the write covers whole and claimed instead of fetching (FetchPlanner.claimForWrite).
        var claimed: [RunID] = []
        /// A verified image: how often the request was planned again after a run
        /// it waited on failed its check for another page (CachingFetch.serve).
        var replans: UInt8 = 0
        /// Waiting in `flushWaiters`: what the request completes with once a full
        /// cycle made it durable (a FUA write: its byte count; a FLUSH: 0).
        var durableResult: Int32 = 0
    }
    var slots: [Slot]
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


    // MARK: Persistence state

    /// The persistence cycle running, if any (PersistenceCycle.swift: a full
    /// one syncs the data first and carries the present bitmap; an intent
    /// cycle carries only the bitmaps a write sets before its data).
    var cycle: PersistenceCycle?
    var flushWaiters: [UInt16] = []
    var heldWrites: [UInt16] = []
    var unsyncedPresent: [Range<UInt64>] = []
    /// Dirty bits were cleared: the next cycle is a full one. A clear may reach
    /// the disk only after the data it was taken from (the copy `sync` made
    /// may be newer than what a power loss would leave), so never in an intent cycle.
    var dirtyCleared = false
    /// A write's intent bits were set after the last stage without its data
    /// waiting for them (mayDeferIntent): the next full cycle is ordered.
    /// True at start: words adopted from a server killed may hold such bits.
    var intentDeferred = true
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

    /// What each target I/O of the handler is (its `sub`): decoded once, in `ioCompleted`.
    enum Sub: UInt8 {
        case read, sync, write, punch, fetch, backingWrite, backingPunch, backingSync
        case writebackRead, writebackWrite, metaWrite, metaSync, evictPunch, stats
    }

    /// Write-back's copy to the backing store (CachingWriteback.swift).
    var writebackCopy: WritebackCopy
    /// Write-through: pages written to both, whose unsettled bits the next full
    /// cycle clears (a bitset: one entry per write would cost per write).
    var settled: PageBits?

    /// Evicted pages on their way out: cleared, persisted, after a grace
    /// period punched, while requests wait (CachingEviction.swift; the last
    /// use of each chunk is in `context.chunks`).
    var eviction = Eviction()
    static let chunkShift: UInt64 = 20
    /// What each poll or timer of the handler is (its `data`): decoded once, in `eventFired`.
    enum Event: UInt32 { case source = 1, timer, mesh, fillTimer, tree }

    // MARK: Queues (-q N; CachingMesh.swift, CachingPeer.swift)

    /// The device's queues when there are several (nil: one queue, the home alone).
    let mesh: CachingMesh?
    /// Tags per queue. The per-request arrays have a slot per tag of every
    /// queue: slot = queue × depth + tag (the home's own tags: slot = tag), and
    /// a request handed over by another queue carries its slot as its tag here.
    let depth: Int
    /// Messages for each queue, posted in `idle`.
    var outbox: [[MeshMessage]] = []
    var outboxPending = false
    /// The home's request data moves (CacheIO.swift).
    let io: CacheIO
    var presentWords: UnsafePointer<UInt64> { io.presentWords }

    /// Which read misses are copied into the cache (`CacheContext.admitOnReuse`; nil: all).
    var admission: AdmissionFilter?
    /// A verified image's checks (CachingVerify.swift; nil: no --verity-root).
    var verifier: VerifyState?
    /// The statistics file (StatsFile.swift), when it publishes.
    var statsFile: StatsFile?

    /// The data paths a caching target over `cacheFD` can run, best first. A cache
    /// file in memory: zero copy where the driver has it (measured faster than the
    /// inline copy on 7.3, as for `loop`: LoopTarget's `dataPaths`), else the inline
    /// copy through a mapping (the fastest on 6.12).
    static func dataPaths(cacheFD: Int32) -> [DataPath] {
        memoryFS.contains(cu_fs_type(cacheFD)) ? [.autoZeroCopy, .zeroCopy, .inlineUserCopy, .userCopy, .kernelCopy]
                                               : [.autoZeroCopy, .zeroCopy, .userCopy, .kernelCopy]
    }
    static let memoryFS: [Int64] = [0x0102_1994 /* tmpfs */, 0x8584_58f6 /* ramfs */]

    /// The handler of queue 0 (`queue`); maps the cache file when the queue copies data itself.
    static func make(context: CacheContext, fetcher: RunFetcher, planner: FetchPlanner, queue: IOQueue,
                     deviceSize: UInt64, mesh: CachingMesh? = nil) throws(UblkError) -> CachingHandler {
        precondition(queue.id == 0, "the home is queue 0; the others get a CachingPeer")
        if let m = mesh { try m.check(depth: queue.depth) }
        let h = CachingHandler(context: context, fetcher: fetcher, planner: planner, depth: queue.depth, mesh: mesh)
        if queue.dataPath == .inlineUserCopy { try h.io.map(context.cache, deviceSize: deviceSize) }
        if let m = mesh { queue.poll(fd: m.inboxes[Int(queue.id)].fd, data: Event.mesh.rawValue) }
        if let spec = context.startFill { h.scheduleFill(spec, queue: queue) }
        // Weak: the queue owns its handler; a strong reference back would keep the
        // queue, and its mapping of /dev/ublkcN, alive after the device stops (DEL_DEV then waits).
        if let tf = context.treeFetcher {
            tf.arrived = { [unowned h, weak queue] _ in
                if let queue { h.treeArrived(queue) }
            }
        }
        if context.publishStats { h.statsFile = StatsFile(device: queue.deviceID) }
        return h
    }

    init(context: CacheContext, fetcher: RunFetcher, planner: FetchPlanner, depth: Int, mesh: CachingMesh? = nil) {
        self.mesh = mesh
        self.depth = depth
        self.io = CacheIO(context: context)
        self.context = context
        self.fetcher = fetcher
        self.planner = planner
        self.bitmap = context.bitmap
        self.dirty = context.dirty
        self.local = context.local
        self.writeback = context.writeback
        self.unsettled = context.unsettled
        writebackCopy = WritebackCopy(pageCount: context.writeback?.pageCount ?? 0)
        if context.admitOnReuse && context.maxCacheBytes > 0 && context.backingFD >= 0 {
            admission = AdmissionFilter(window: context.maxCacheBytes / UInt64(context.pageSize))
        }
        // Unsettled bits matter to write-through only; in other modes the
        // bitmap is opened so that a crash of an earlier write-through run is settled.
        intentBitmaps = [context.local, context.dirty, context.writeback,
                         context.writeThrough && context.backingFD >= 0 ? context.unsettled : nil].compactMap { $0 }
        if context.writeThrough && context.backingFD >= 0 && context.unsettled != nil {
            settled = PageBits(pageCount: context.bitmap.pageCount)
        }
        self.cacheFD = context.dataFD >= 0 ? context.dataFD : context.cache.fd
        self.imageSize = context.imageSize
        self.pageSize = UInt64(context.pageSize)
        slots = Array(repeating: Slot(), count: depth * (mesh?.queueCount ?? 1))
        if context.maxCacheBytes > 0 && context.chunks == nil {
            context.chunks = ChunkUse(chunks: Int((context.imageSize >> CachingHandler.chunkShift) + 1))
        }
        if let m = mesh { outbox = Array(repeating: [], count: m.queueCount) }
        if let tree = context.verity, let verified = context.verified {
            verifier = VerifyState(tree: tree, verified: verified, pageSize: context.pageSize, treeFetcher: context.treeFetcher)
        }
        timerFD = cu_timerfd()
        lastPersist = monotonicNanos()
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
        // Write-ahead deferred (mayDeferIntent: writable, no dirty tracking) asks which
        // present bits may be on the disk; without the answer (the read failed) no write is deferred.
        if context.writable && dirty == nil { try? bitmap.trackDiskBits() }
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
            eviction.clearedBits(s..<e)
            u.markAbsent(s..<e)
            p = e
        }
    }

    deinit {
        if timerFD >= 0 { close(timerFD) }
        for s in staging.values { free(s.buffer) }
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
