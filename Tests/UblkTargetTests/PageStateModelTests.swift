// The randomised crash/fault model test of the caching handler.
//
// A writable overlay (the http target's `--writable`: present, local and dirty
// bitmaps) runs on a FakeQueue over real files with a durability model
// (FaultFiles) and a FakeFetcher serving a fixed remote image. Each seed is a
// random sequence of reads, writes, discards, FLUSHes, `dirty --clear`,
// `sync` to a replica, eviction under a small bound, fetch failures,
// ENOSPC/EIO on the cache file and failed fdatasyncs, with I/O completing in
// random order, and power losses at random points (every file goes back to
// its last good fdatasync; the handler is rebuilt from the files).
//
// What it checks, sector by sector (each written sector carries the id of its
// write and its own position, so a sector in the wrong place is caught too):
// - every read returns the remote's bytes or bytes last written there (or a
//   write in flight's), never zeros unless discarded, never another page's;
// - after a power loss, every write acknowledged by a FLUSH reads back, and
//   anything else reads as what a FLUSHed state or a later write left;
// - `sync` to a replica after any crash yields an exact replica;
// - every request completes exactly once.
// Queues (-q N): a seed runs 1 to 4 fake queues (MODEL_QUEUES to choose):
// queue 0's handler is the home, the others serve hits and hand the rest to
// it through their inboxes; requests go to random queues, and every queue's
// I/O and inbox deliveries interleave in the seeded random order, so
// eviction, FLUSH and write-back race hits and writes on other queues.
// A failing seed prints its replay: `MODEL_SEED=N MODEL_STEPS=K swift test --filter PageStateModel`.
import CUring
import Foundation
import Glibc
import PageCache
import XCTest
@testable import UblkTarget
@testable import UblkCLI

final class PageStateModelTests: XCTestCase {
    static let page = 4096
    static let sector = 512
    static let pages = 40
    static let imageSize = pages * page
    static let sectors = imageSize / sector
    static let remoteMark: UInt64 = 0x5245_4D4F_5445  // "REMOTE"
    /// The remote object after it changed (new ETag): reads as -2.
    static let remoteMark2: UInt64 = 0x3245_4D4F_5445

    // MARK: Sector contents

    static func fill(_ buf: UnsafeMutableRawPointer, id: UInt64, sector: Int) {
        buf.storeBytes(of: id, toByteOffset: 0, as: UInt64.self)
        buf.storeBytes(of: UInt64(sector), toByteOffset: 8, as: UInt64.self)
        memset(buf + 16, Int32(truncatingIfNeeded: Int(id &* 31) &+ sector &* 7 | 1), sector_ - 16)
    }
    static let sector_ = sector

    /// The id a sector holds: 0 the remote's, -1 zeros, n a write; -99 garbage.
    static func decode(_ p: UnsafeRawPointer, sector: Int) -> Int64 {
        let raw = UnsafeRawBufferPointer(start: p, count: PageStateModelTests.sector)
        if raw.allSatisfy({ $0 == 0 }) { return -1 }
        let id = p.load(as: UInt64.self), s = p.load(fromByteOffset: 8, as: UInt64.self)
        guard s == UInt64(sector) else { return -99 }
        let b = UInt8(truncatingIfNeeded: Int(id &* 31) &+ sector &* 7 | 1)
        guard raw[16...].allSatisfy({ $0 == b }) else { return -99 }
        return id == remoteMark ? 0 : id == remoteMark2 ? -2 : Int64(id)
    }

    static func remoteImage(version: Int = 1) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: imageSize)
        out.withUnsafeMutableBytes { b in
            for s in 0..<sectors { fill(b.baseAddress! + s * sector, id: version == 1 ? remoteMark : remoteMark2, sector: s) }
        }
        return out
    }

    // MARK: One device's life

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Which target the world runs: the http target with `--writable` (`overlay`), the cache
    /// target over a backing file, or an overlay device over a read-only lower file
    /// (`layered`: reads through to the lower, copy-ups for partial writes).
    enum Mode: String { case overlay, cacheThrough = "cache-through", cacheBack = "cache-back", layered }

    final class World {
        // (also driven directly by RingOnlyPersistenceTests)
        let mode: Mode
        let dir: String
        let seed: UInt64
        var rng: SplitMix
        var trace: [String] = []
        let traceLimit = ProcessInfo.processInfo.environment["MODEL_TRACE"].flatMap { Int($0) } ?? 400
        var remote = PageStateModelTests.remoteImage()
        /// The remote object's version (its ETag is "e<version>"); it changes once at most.
        var remoteVersion = 1
        var lastState: CacheState = .fresh
        let files = FaultFiles()
        /// The home queue and handler (queue 0), and all of them.
        var queue: FakeQueue!
        var fetcher: RunFetcher!
        var fake: FakeFetcher?
        var backingFD: Int32 = -1
        var handler: CachingHandler!
        let queueCount: Int
        var queues: [FakeQueue] = []
        var handlers: [QueueHandler] = []
        var peers: [CachingPeer] { handlers.dropFirst().map { $0 as! CachingPeer } }
        var mesh: CachingMesh?
        var bitmaps: [Bitmap] = []
        let depth = 8
        let buffers: [UnsafeMutableRawPointer]
        let maxRequest = 16 * 1024

        // The reference: what each sector may read as.
        var current: [Set<Int64>]
        var inflight: [Set<Int64>]
        /// Guaranteed by the last successful FLUSH, and what may have landed since.
        var stable: [Int64]
        var since: [Set<Int64>]
        var replica: [UInt8]
        var nextWrite: Int64 = 1
        /// Tags in flight: the request, and for a FLUSH its snapshot.
        var inFlight: [UInt16: (op: UInt8, offset: Int, length: Int, id: Int64)] = [:]
        var flushSnapshots: [UInt16: (current: [Set<Int64>], inflight: [Set<Int64>], maxID: Int64, order: Int)] = [:]
        /// A read in flight may return, sector by sector, what was there when it
        /// was sent or anything written while it is in flight (a read racing a
        /// write has no order: a read-through reads run by run, at different times).
        var readAllowed: [UInt16: [Set<Int64>]] = [:]
        /// FLUSHes in the order they were sent, and the latest sent of those that
        /// completed: with several queues an older FLUSH may complete after a
        /// newer one, and then it promises nothing the newer one did not.
        var flushesSent = 0
        var latestFlushDone = -1
        var faulty = false
        /// Some writes are sent with FUA (off: none, for tests that count cycles).
        var fuaWrites = true
        var readMostly = false
        var evictBound: UInt64 = 0
        /// Write-ahead regions of the cache modes (CacheContext.intentRegionPages), by the
        /// seed without drawing from `rng` (so earlier seeds replay): 1 (page by page),
        /// 4, 16, or 64 (more than the image).
        var intentRegion: UInt64 { [1, 4, 16, 64][Int((seed / 12) % 4)] }
        /// Admission by reuse (CacheContext.admitOnReuse) in half the seeds; it acts
        /// in the cache modes with an eviction bound.
        var admitOnReuse: Bool { (seed &* 0x9E37_79B9_7F4A_7C15) >> 63 == 1 }
        var persistInterval: UInt64 = 0
        var crashes = 0, reads = 0, writes = 0, flushes = 0, syncs = 0, remoteChanges = 0, remoteRefusals = 0
        /// Reads other queues served by themselves (-q N), over the handlers' lives.
        var peerHits: UInt64 = 0
        /// Pages whose bits writes set ahead (write-ahead by region), over every server run.
        var pagesSetAhead: UInt64 = 0
        var writesDeferred: UInt64 = 0
        /// Read misses served through, not admitted (admission by reuse), over every server run.
        var readsThrough: UInt64 = 0
        /// Write-through writes that stood on the backing store alone (the cache file's copy failed).
        var cacheCopiesLost: UInt64 = 0
        /// The machine's boot: a power loss starts another (live bits on /run die with it).
        var boots = 0

        /// `dirty`/`sync` on this device (off: only some cache devices, drawn per seed).
        var trackDirty = true

        init(seed: UInt64, queues: Int? = nil, mode: Mode? = nil, trackDirty dirty: Bool? = nil) throws {
            logMuted = true
            self.seed = seed
            rng = SplitMix(seed: seed)
            self.mode = mode ?? ProcessInfo.processInfo.environment["MODEL_MODE"].flatMap { Mode(rawValue: $0) }
                ?? [Mode.overlay, .cacheThrough, .cacheBack][Int(seed % 3)]  // `layered`: OverlayModelTests
            // 1-4 queues by the seed, or MODEL_QUEUES of them (0: by the seed).
            let q = ProcessInfo.processInfo.environment["MODEL_QUEUES"].flatMap { Int($0) } ?? 0
            queueCount = queues ?? (q == 0 ? 1 + Int((seed / 3) % 4) : q)
            dir = NSTemporaryDirectory() + "ublk-model-\(getpid())-\(seed)"
            mkdir(dir, 0o700)
            buffers = (0..<8 * queueCount).map { _ in UnsafeMutableRawPointer.allocate(byteCount: 16 * 1024, alignment: 4096) }
            current = Array(repeating: [0], count: PageStateModelTests.sectors)
            inflight = Array(repeating: [], count: PageStateModelTests.sectors)
            stable = Array(repeating: 0, count: PageStateModelTests.sectors)
            since = Array(repeating: [], count: PageStateModelTests.sectors)
            replica = remote
            faulty = rng.next() % 3 == 0
            evictBound = rng.next() % 2 == 0 ? UInt64(8 + rng.next() % 16) * 4096 : 0
            persistInterval = rng.next() % 2 == 0 ? 0 : .max / 2
            // Some overlays are only read (as most are): a changed remote then starts them afresh.
            readMostly = mode == .overlay && rng.next() % 4 == 0
            // A third of the cache devices track no dirty pages (`--no-dirty-tracking`): their
            // writes of absent pages go before their bits (write-ahead deferred).
            // (MODEL_DIRTY=0 or 1: every cache device without or with tracking)
            let forced = ProcessInfo.processInfo.environment["MODEL_DIRTY"].map { $0 != "0" }
            trackDirty = dirty ?? (!(self.mode == .cacheBack || self.mode == .cacheThrough) || (forced ?? (rng.next() % 3 != 0)))
            // Those keep a small cache, so that many writes find their pages absent.
            if !trackDirty && evictBound == 0 { evictBound = UInt64(8 + rng.next() % 8) * 4096 }
            try start()
        }

        deinit {
            handler = nil
            handlers = []
            bitmaps = []
            for b in buffers { b.deallocate() }
            if backingFD >= 0 { close(backingFD) }
            try? FileManager.default.removeItem(atPath: dir)
        }

        func removeLive() {
            if let names = try? FileManager.default.contentsOfDirectory(atPath: dir + "/live") {
                for n in names { unlink(dir + "/live/" + n) }
            }
            rmdir(dir + "/live")
        }

        func note(_ s: String) {
            trace.append(s)
            if trace.count > traceLimit { trace.removeFirst(trace.count - traceLimit) }
        }

        /// Opens the files as the http target does, and a handler over them.
        func start() throws {
            if mode != .overlay && backingFD < 0 {
                // The backing store starts as the "remote" image; it is durable as made.
                let fd = open(dir + "/backing", O_RDWR | O_CREAT | O_TRUNC, 0o600)
                _ = remote.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, 0) }
                close(fd)
            }
            if backingFD >= 0 { close(backingFD) }
            backingFD = mode == .overlay ? -1 : open(dir + "/backing", mode == .layered ? O_RDONLY : O_RDWR)
            let id = BitmapIdentity(kind: .present, pageSize: PageStateModelTests.page,
                                    imageSize: UInt64(PageStateModelTests.imageSize), url: "model://image",
                                    etag: mode == .overlay || mode == .layered ? "e\(remoteVersion)" : "backing-1")
            // Opened as the targets open it: CacheStore binds the files and adopts live bits.
            let live = LiveConfig(directory: dir + "/live", bootID: "boot-\(boots)", required: true)
            let store: CacheStore
            if mode == .layered {
                // As `add -t overlay` opens it (the image's identity checked, the old layout migrated).
                do { store = try OverlayStore.open(directory: dir, name: "m", lower: id, create: true, live: live).store } catch {
                    throw Failure(description: "the overlay did not open: \(error)")
                }
            } else {
                var spec = CacheStoreSpec(cachePath: dir + "/c", bitmapPath: dir + "/b", identity: id)
                spec.dirty = trackDirty ? .open : .none
                spec.live = live
                if mode == .overlay {
                    spec.local = .open
                } else {
                    spec.companionValidators = false
                    spec.sourceName = "the backing store"
                    spec.writeback = mode == .cacheBack ? .open : .refuse { n in "\(n) pages not written back" }
                    spec.unsettled = true
                    spec.backing = BackingCheck(fd: backingFD, path: dir + "/backing")
                }
                store = try CacheStore.open(spec)
            }
            lastState = store.state
            let bitmap = store.present, dirty = store.dirty, local = store.local, writeback = store.writeback
            let unsettled = store.unsettled, cache = store.cache
            if case .startedAfresh(let why) = store.state { note("store started afresh: \(why)") }
            bitmaps = [bitmap] + [dirty, local, writeback, unsettled].compactMap { $0 }
            for b in bitmaps { files.track(b.fd, path: b.path) }
            files.track(cache.fd, path: cache.path)
            if backingFD >= 0 { files.track(backingFD, path: dir + "/backing") }
            // What opening wrote it made durable (and what a dead server left in
            // the page cache may always become durable: see FaultFiles).
            for fd in Array(files.files.keys) { _ = files.fdatasync(fd, fail: false) }
            let context = CacheContext(cache: cache, bitmap: bitmap, dirty: dirty, imageSize: UInt64(PageStateModelTests.imageSize),
                                       pageSize: PageStateModelTests.page, stats: CacheStats()) {
                HTTPStats(hits: 0, misses: 0, bytesFetched: 0, requests: 0, retries: 0, errors: 0, missLatencyP50Ms: nil,
                          missLatencyP99Ms: nil, pagesPresent: 0, pagesTotal: 0, pageSize: 4096)
            }
            context.writable = true
            context.local = local
            context.writeback = writeback
            context.unsettled = unsettled
            context.backingFD = mode == .layered ? -1 : backingFD
            context.readThroughFD = mode == .layered ? backingFD : -1
            context.writeThrough = mode == .cacheThrough
            context.publishStats = false
            context.maxCacheBytes = evictBound
            context.intentRegionPages = intentRegion
            context.admitOnReuse = admitOnReuse
            mesh = queueCount > 1 ? CachingMesh(queues: queueCount) : nil
            try mesh?.check(depth: depth)
            queues = (0..<queueCount).map { FakeQueue(depth: depth, files: files, id: UInt16($0)) }
            for q in queues {
                q.cacheFD = cache.fd
                q.rng = SplitMix(seed: rng.next())
                if faulty {
                    q.fsyncFailPermille = 40
                    q.writeFailPermille = 10
                }
                if let m = mesh {
                    let inbox = m.inboxes[Int(q.id)]
                    q.fireable = [inbox.fd]
                    q.isReadable = { [unowned inbox] _ in !inbox.isEmpty }  // as its eventfd, without a syscall
                }
            }
            queue = queues[0]
            if mode == .overlay {
                fake = FakeFetcher(remote: remote)
                fake!.failPermille = faulty ? 30 : 0
                fetcher = fake
            } else {
                fake = nil
                fetcher = FileFetcher(fd: backingFD)
            }
            let planner = FetchPlanner(imageSize: UInt64(PageStateModelTests.imageSize), pageSize: PageStateModelTests.page,
                                       maxRunBytes: 16 << 10, initialReadaheadBytes: 8 << 10, maxReadaheadBytes: 16 << 10,
                                       maxActiveRuns: 3)
            handler = CachingHandler(context: context, fetcher: fetcher, planner: planner, depth: depth, mesh: mesh)
            handler.persistInterval = persistInterval
            handler.trace = { [unowned self] in self.note("  handler 0: " + $0) }
            handlers = [handler] + (1..<queueCount).map {
                CachingPeer(context: context, mesh: mesh!, queueID: UInt16($0), depth: depth)
            }
            for p in peers { p.wakeInterval = persistInterval }
            for (q, h) in handlers.enumerated() {
                queues[q].handler = h
                if let m = mesh { queues[q].poll(fd: m.inboxes[q].fd, data: CachingHandler.Event.mesh.rawValue) }
            }
        }

        /// Every fault rate of every queue.
        func setFaults(fsync: Int, write: Int) {
            for q in queues {
                q.fsyncFailPermille = fsync
                q.writeFailPermille = write
            }
        }

        // MARK: Requests

        func freeTag() -> UInt16? {
            // A slot: queue × depth + tag.
            let free = (0..<UInt16(depth * queueCount)).filter { inFlight[$0] == nil }
            return free.isEmpty ? nil : free[Int(rng.next() % UInt64(free.count))]
        }

        func randomRange() -> (Int, Int) {
            var s = Int(rng.next() % UInt64(PageStateModelTests.sectors))
            let perPage = PageStateModelTests.page / PageStateModelTests.sector
            // A third are whole pages, as a file system sends: writes of absent pages then go first (mayDeferIntent).
            let aligned = rng.next() % (trackDirty ? 3 : 2) == 0
            if aligned { s -= s % perPage }
            let maxLen = min(maxRequest / PageStateModelTests.sector, PageStateModelTests.sectors - s)
            var n = 1 + Int(rng.next() % UInt64(maxLen))
            if aligned { n = min(max(perPage, n - n % perPage), PageStateModelTests.sectors - s) }
            return (s, n)
        }

        func submit(op: UInt8, sector: Int, count: Int) {
            guard let slot = freeTag() else { return }
            let q = Int(slot) / depth, tag = slot % UInt16(depth)
            let buf = buffers[Int(slot)]
            var id: Int64 = 0
            if op == Op.write {
                id = nextWrite
                nextWrite += 1
                for i in 0..<count { PageStateModelTests.fill(buf + i * PageStateModelTests.sector, id: UInt64(id), sector: sector + i) }
            } else if op == Op.discard {
                id = -1
            }
            if op == Op.write || op == Op.discard {
                for s in sector..<sector + count { inflight[s].insert(id); since[s].insert(id) }
                writes += 1
                for t in Array(readAllowed.keys) {
                    let f = inFlight[t]!
                    let lo = max(sector, f.offset), hi = min(sector + count, f.offset + f.length)
                    for s in lo..<max(lo, hi) { readAllowed[t]![s - f.offset].insert(id) }
                }
            }
            if op == Op.read { readAllowed[slot] = (sector..<sector + count).map { current[$0].union(inflight[$0]) } }
            if op == Op.flush {
                flushSnapshots[slot] = (current, inflight, nextWrite - 1, flushesSent)
                flushesSent += 1
                flushes += 1
            }
            if op == Op.read { reads += 1 }
            inFlight[slot] = (op, sector, count, id)
            queues[q].open.insert(tag)
            note("submit queue \(q) tag \(tag) op \(op) sectors \(sector)+\(count) id \(id)")
            // Some writes are FUA: acknowledged only after a full cycle, with their byte count.
            let fua = op == Op.write && fuaWrites && rng.next() % 5 == 0
            let r = Request(tag: tag, op: op, flags: fua ? UInt32(UBLK_IO_F_FUA) : 0, offset: UInt64(sector * PageStateModelTests.sector),
                            length: UInt32(op == Op.flush ? 0 : count * PageStateModelTests.sector), buffer: buf)
            handlers[q].handle(r, queue: queues[q])
        }

        /// Checks and retires the requests that completed.
        func collect() throws {
            for q in queues where !q.doubleCompletions.isEmpty {
                throw Failure(description: "queue \(q.id) tag \(q.doubleCompletions[0]) completed twice")
            }
            var done: [(tag: UInt16, result: Int32)] = []
            for q in queues {
                done += q.completed.map { (q.id * UInt16(depth) + $0.tag, $0.result) }
                q.completed = []
            }
            for (tag, result) in done {
                guard let f = inFlight.removeValue(forKey: tag) else { throw Failure(description: "tag \(tag) completed but not in flight") }
                note("done tag \(tag) op \(f.op) result \(result)")
                let range = f.offset..<f.offset + f.length
                switch f.op {
                case Op.read:
                    let allowedThen = readAllowed.removeValue(forKey: tag) ?? []
                    if result < 0 {
                        if !faulty { throw Failure(description: "read of sectors \(range) failed (\(result)) with no fault injected") }
                        continue
                    }
                    guard result == Int32(f.length * PageStateModelTests.sector) else {
                        throw Failure(description: "read of sectors \(range) returned \(result)")
                    }
                    for s in range {
                        let got = PageStateModelTests.decode(buffers[Int(tag)] + (s - f.offset) * PageStateModelTests.sector, sector: s)
                        let then = s - f.offset < allowedThen.count ? allowedThen[s - f.offset] : []
                        if !current[s].contains(got) && !inflight[s].contains(got) && !then.contains(got) {
                            throw Failure(description: "sector \(s) read as \(got); expected one of \(current[s].union(inflight[s]).union(then).sorted()); \(describePage(UInt64(s / 8)))")
                        }
                    }
                case Op.write, Op.discard:
                    let whole = f.op == Op.write ? Int32(f.length * PageStateModelTests.sector) : 0
                    if result >= 0 && result != whole {
                        throw Failure(description: "op \(f.op) of sectors \(range) completed with \(result), not \(whole): the kernel would send the rest again")
                    }
                    for s in range {
                        inflight[s].remove(f.id)
                        if result >= 0 { current[s] = [f.id] } else { current[s].insert(f.id) }
                    }
                    if result < 0 && !faulty { throw Failure(description: "write of sectors \(range) failed (\(result)) with no fault injected") }
                case Op.flush:
                    let snap = flushSnapshots.removeValue(forKey: tag)!
                    if result < 0 {
                        if !faulty { throw Failure(description: "FLUSH failed (\(result)) with no fault injected") }
                        continue
                    }
                    // Everything completed before the FLUSH was sent is durable now.
                    if snap.order < latestFlushDone { continue }
                    latestFlushDone = snap.order
                    for s in 0..<PageStateModelTests.sectors {
                        guard snap.current[s].count == 1, let v = snap.current[s].first else { continue }
                        stable[s] = v
                        since[s] = since[s].filter { $0 > snap.maxID || snap.inflight[s].contains($0) || $0 == -1 }
                    }
                default:
                    break
                }
            }
        }

        func describePage(_ p: UInt64) -> String {
            let h = handler!
            return "page \(p): present \(h.bitmap.test(p)) local \(h.local?.test(p) ?? false) dirty \(h.dirty?.test(p) ?? false) writeback \(h.writeback?.test(p) ?? false) unsettled \(h.unsettled?.test(p) ?? false) lost \(h.lostPages) fsync failures \(files.fsyncFailures) write failures \(files.writeFailures)"
        }

        /// Lets the handler and its I/O move on: one random action.
        func pump() throws {
            switch rng.next() % 10 {
            case 0..<5: (queueCount == 1 ? queue : queues[Int(rng.next() % UInt64(queueCount))]).runOne()
            case 5..<8: fake?.step(&rng, handler: handler, queue: queue)
            default:
                let q = queueCount == 1 ? 0 : Int(rng.next() % UInt64(queueCount))
                handlers[q].idle(queue: queues[q])
            }
            try collect()
        }

        /// Work left between the queues: I/O, inbox deliveries, posts, punches awaiting a grace period.
        var queuesBusy: Bool {
            if queueCount == 1 { return !queue.pending.isEmpty }
            return queues.contains { !$0.pending.isEmpty || !$0.readyPolls().isEmpty } || handler.outboxPending || peers.contains { $0.outboxPending }
                || (mesh.map { handler.eviction.graceWaiting($0) } ?? false)
        }

        /// Runs until nothing is in flight (bounded).
        func quiesce() throws {
            var n = 0
            while !inFlight.isEmpty || queuesBusy || !fetcher.isIdle {
                try pump()
                n += 1
                if n > 200_000 {
                    throw Failure(description: "requests never completed: tags \(inFlight.keys.sorted()), \(queue.pending.count) I/Os pending")
                }
            }
        }

        func readAll() throws -> [UInt8] {
            var out = [UInt8](repeating: 0, count: PageStateModelTests.imageSize)
            var s = 0
            let step = maxRequest / PageStateModelTests.sector
            while s < PageStateModelTests.sectors {
                let n = min(step, PageStateModelTests.sectors - s)
                var attempts = 0
                while true {
                    submit(op: Op.read, sector: s, count: n)
                    guard let tag = inFlight.first(where: { $0.value.op == Op.read && $0.value.offset == s })?.key else {
                        throw Failure(description: "no tag for a read")
                    }
                    try quiesce()
                    if queues[Int(tag) / depth].lastResult(tag % UInt16(depth)) >= 0 {
                        out.withUnsafeMutableBytes { _ = memcpy($0.baseAddress! + s * PageStateModelTests.sector, buffers[Int(tag)], n * PageStateModelTests.sector) }
                        break
                    }
                    attempts += 1
                    if attempts > 50 { throw Failure(description: "sectors \(s)+\(n) never read") }
                }
                s += n
            }
            return out
        }

        /// `ublk-http sync`: take the dirty extents, copy them from the device, confirm.
        func sync() throws {
            guard trackDirty else { return }
            try quiesce()
            let reply = handler.control(ControlRequest(op: .syncBegin), queue: queue)
            if reply.contains("\"error\"") {
                // Refused after a failed fdatasync (data may be lost): only ever with faults injected.
                if !faulty || !handler.durabilityLost { throw Failure(description: "sync-begin refused: \(reply)") }
                note("sync refused: \(reply)")
                return
            }
            let taken = try JSONDecoder().decode(DirtyExtents.self, from: Data(reply.utf8))
            let device = try readAll()
            for e in taken.extents {
                let r = Int(e.offset)..<Int(e.offset + e.length)
                replica.replaceSubrange(r, with: device[r])
            }
            let end = handler.control(ControlRequest(op: .syncEnd, token: taken.token, ok: true), queue: queue)
            if end.contains("error") { throw Failure(description: "sync-end: \(end)") }
            syncs += 1
            note("sync: \(taken.extents.map { "\($0.offset / 512)+\($0.length / 512)" })")
            try quiesce()
        }

        /// Power loss at this very point: in-flight I/O is gone, files keep what
        /// was durable. `processOnly`: the server was killed (kill -9); the
        /// machine goes on, and the files keep everything written.
        func powerLoss(processOnly: Bool = false) throws {
            note(processOnly ? "KILL -9" : "POWER LOSS")
            crashes += 1
            for q in queues {
                if processOnly { q.processDied() } else { q.pending = []; q.armed = [] }
                q.handler = nil
            }
            peerHits += peers.reduce(0) { $0 + $1.peerHits }
            pagesSetAhead += handler?.context.stats.pagesSetAhead ?? 0
            writesDeferred += handler?.context.stats.writesDeferred ?? 0
            readsThrough += handler?.context.stats.readsThrough ?? 0
            cacheCopiesLost += handler?.context.stats.cacheCopiesLost ?? 0
            handler = nil
            handlers = []
            mesh = nil
            fetcher = nil
            fake = nil
            bitmaps = []
            if processOnly {
                files.processDied()
            } else {
                files.powerLoss()
                removeLive()
                boots += 1
            }
            inFlight = [:]
            flushSnapshots = [:]
            readAllowed = [:]
            for s in 0..<PageStateModelTests.sectors {
                // kill -9: every acknowledged write is still there (the page cache and the
                // live bits outlive the process). Power loss: what FLUSHes made durable.
                current[s] = processOnly ? current[s].union(inflight[s]) : since[s].union([stable[s]])
                inflight[s] = []
            }
            if !processOnly && mode == .overlay && remoteVersion == 1 && rng.next() % 4 == 0 {
                // Meanwhile the remote object changed (a new ETag).
                remoteVersion = 2
                note("the remote changes")
                do {
                    try start()
                } catch let e as CacheStoreError {
                    // Refused: written pages would be lost. Then the old object is served again.
                    guard "\(e)".contains("locally written") else { throw Failure(description: "a changed remote refused for another reason: \(e)") }
                    note("refused: \(e)")
                    remoteRefusals += 1
                    remoteVersion = 1
                    try start()
                }
                if remoteVersion == 2 {
                    guard case .startedAfresh = lastState else {
                        throw Failure(description: "the remote changed but the cache was \(lastState.description)")
                    }
                    // Afresh: no page was local, so no FLUSHed write may have been there.
                    if let s = (0..<PageStateModelTests.sectors).first(where: { stable[$0] != 0 }) {
                        throw Failure(description: "a changed remote wiped FLUSHed data: sector \(s) held \(stable[s])")
                    }
                    remoteChanges += 1
                    remote = PageStateModelTests.remoteImage(version: 2)
                    fake?.remote = remote
                    replica = remote
                    for s in 0..<PageStateModelTests.sectors {
                        current[s] = [-2]
                        stable[s] = -2
                        since[s] = []
                    }
                }
            } else {
                try start()
            }
            let faultyNow = faulty
            // Check every sector once, without faults, then carry on.
            setFaults(fsync: 0, write: 0)
            fake?.failPermille = 0
            faulty = false
            let device = try readAll()
            for s in 0..<PageStateModelTests.sectors {
                let got = device.withUnsafeBytes { PageStateModelTests.decode($0.baseAddress! + s * PageStateModelTests.sector, sector: s) }
                if !current[s].contains(got) {
                    throw Failure(description: "after \(processOnly ? "kill -9" : "power loss") sector \(s) reads \(got); allowed \(current[s].sorted()) (stable \(stable[s])); \(describePage(UInt64(s / 8)))")
                }
                current[s] = [got]
                if !processOnly {
                    stable[s] = got
                    since[s] = []
                } else if got != stable[s] {
                    since[s].insert(got)
                }
            }
            try sync()
            let again = try readAll()
            if trackDirty && again != replica {
                let first = (0..<PageStateModelTests.imageSize).first { again[$0] != replica[$0] }!
                let sec = first / PageStateModelTests.sector
                let dev = again.withUnsafeBytes { PageStateModelTests.decode($0.baseAddress! + sec * PageStateModelTests.sector, sector: sec) }
                let rep = replica.withUnsafeBytes { PageStateModelTests.decode($0.baseAddress! + sec * PageStateModelTests.sector, sector: sec) }
                throw Failure(description: "sync after power loss: replica differs at sector \(sec): device \(dev), replica \(rep) (faulty: \(faultyNow))")
            }
            faulty = faultyNow
            if faulty {
                setFaults(fsync: 40, write: 10)
                fake?.failPermille = 30
            }
        }

        /// The cache target: after a FLUSH and `ublk-http flush` (write-back
        /// drained), the backing store alone holds exactly what the device reads.
        func backingMatches() throws {
            guard mode == .cacheThrough || mode == .cacheBack else { return }
            let was = (queue.fsyncFailPermille, queue.writeFailPermille)
            setFaults(fsync: 0, write: 0)
            defer { setFaults(fsync: was.0, write: was.1) }
            var rounds = 0
            while true {
                submit(op: Op.flush, sector: 0, count: 0)
                try quiesce()
                let reply = handler.control(ControlRequest(op: .flush), queue: queue)
                try quiesce()
                let st = try JSONDecoder().decode(WritebackStatus.self, from: Data(reply.utf8))
                if st.writebackPages == 0 && !st.inFlight && !st.unpersisted && handler.cycle == nil
                    && !handler.writebackCopy.hasCopied { break }
                handler.idle(queue: queue)
                try quiesce()
                rounds += 1
                if rounds > 500 { throw Failure(description: "write-back never drained: \(reply)") }
            }
            let device = try readAll()
            let backing = FaultFiles.contents(dir + "/backing")
            if device != Array(backing.prefix(device.count)) {
                let first = (0..<device.count).first { device[$0] != backing[$0] }!
                let sec = first / PageStateModelTests.sector
                let dev = device.withUnsafeBytes { PageStateModelTests.decode($0.baseAddress! + sec * PageStateModelTests.sector, sector: sec) }
                let back = backing.withUnsafeBytes { PageStateModelTests.decode($0.baseAddress! + sec * PageStateModelTests.sector, sector: sec) }
                throw Failure(description: "after flush the backing store differs from the device at sector \(sec): device \(dev), backing \(back)")
            }
            note("backing matches the device")
        }

        func step() throws {
            let roll = rng.next() % 1000
            switch roll {
            case 0..<300:
                if freeTag() != nil {
                    let (s, n) = randomRange()
                    let kind = rng.next() % 20
                    var op = kind < 9 ? Op.read : kind < 17 ? Op.write : kind < 18 ? Op.discard : Op.flush
                    if readMostly && (op == Op.write || op == Op.discard) { op = Op.read }
                    // Overlapping writes in flight have no defined order: the block layer never sends them.
                    if op == Op.write || op == Op.discard, (s..<s + n).contains(where: { !inflight[$0].isEmpty }) { return }
                    submit(op: op, sector: s, count: n)
                }
            case 300..<980:
                try pump()
            case 980..<988:
                // `dirty --clear` forgets the changes: the replica is brought up to date by hand first.
                guard trackDirty else { return }
                try quiesce()
                let device = try readAll()
                let reply = handler.control(ControlRequest(op: .dirty, clear: true), queue: queue)
                if reply.contains("\"error\"") {
                    if !faulty || !handler.durabilityLost { throw Failure(description: "dirty --clear refused: \(reply)") }
                    note("dirty --clear refused")
                } else {
                    replica = device
                    note("dirty --clear")
                }
            case 988..<994:
                try sync()
            case 994..<997:
                try powerLoss(processOnly: true)
            default:
                try powerLoss()
            }
        }
    }

    /// What the seeds did, summed (printed at the end: a run that exercised nothing shows).
    var totals = (crashes: 0, reads: 0, writes: 0, flushes: 0, syncs: 0, remoteChanges: 0, remoteRefusals: 0, peerHits: UInt64(0), pagesSetAhead: UInt64(0), writesDeferred: UInt64(0), readsThrough: UInt64(0), cacheCopiesLost: UInt64(0))

    func runSeed(_ seed: UInt64, steps: Int, mode: Mode? = nil) -> String? {
        let world: World
        do { world = try World(seed: seed, mode: mode) } catch { return "seed \(seed): cannot start: \(error)" }
        for i in 0..<steps {
            do { try world.step() } catch {
                return """
                    seed \(seed) failed at step \(i): \(error)
                    (faulty \(world.faulty), evict bound \(world.evictBound), persist interval \(world.persistInterval), write-ahead region \(world.intentRegion), admit on reuse \(world.admitOnReuse))
                    target: \(world.mode.rawValue)
                    queues: \(world.queueCount)
                    replay: MODEL_SEED=\(seed) MODEL_STEPS=\(i + 1) swift test --filter PageStateModelTests
                    last actions:
                      \(world.trace.joined(separator: "\n  "))
                    """
            }
        }
        do {
            try world.quiesce()
            try world.backingMatches()
            try world.powerLoss()
        } catch {
            return "seed \(seed) (\(world.mode.rawValue), \(world.queueCount) queues) failed in its final power loss: \(error)\n  \(world.trace.joined(separator: "\n  "))"
        }
        totals.crashes += world.crashes
        totals.reads += world.reads
        totals.writes += world.writes
        totals.flushes += world.flushes
        totals.syncs += world.syncs
        totals.remoteChanges += world.remoteChanges
        totals.remoteRefusals += world.remoteRefusals
        totals.peerHits += world.peerHits
        totals.pagesSetAhead += world.pagesSetAhead
        totals.writesDeferred += world.writesDeferred
        totals.readsThrough += world.readsThrough
        totals.cacheCopiesLost += world.cacheCopiesLost
        return nil
    }

    func testRandomSequencesWithCrashesAndFaults() {
        let env = ProcessInfo.processInfo.environment
        let steps = env["MODEL_STEPS"].flatMap { Int($0) } ?? 800
        let seeds: [UInt64] = env["MODEL_SEED"].flatMap { UInt64($0) }.map { [$0] }
            ?? Array(1...UInt64(env["MODEL_SEEDS"].flatMap { Int($0) } ?? 300))
        let deadline = Date().addingTimeInterval(Double(env["MODEL_SECONDS"].flatMap { Int($0) } ?? 60))
        var ran = 0
        for seed in seeds {
            if let failure = runSeed(seed, steps: steps) { return XCTFail(failure) }
            ran += 1
            // The time bound never cuts the run below 20 seeds: a loaded machine
            // runs longer instead of testing less.
            if Date() > deadline && ran >= 20 { break }
        }
        XCTAssertGreaterThanOrEqual(ran, min(seeds.count, 20), "too few seeds ran in the time bound")
        print("page-state model: \(ran) seeds of \(steps) steps passed: \(totals)")
        if seeds.count > 20 {
            XCTAssertGreaterThan(totals.crashes, ran, "crashes were exercised")
            XCTAssertGreaterThan(totals.syncs, 0)
            // A remote changes only under an overlay; the cache modes have write-ahead regions and admission.
            let modes = env["MODEL_MODE"].map { [$0] } ?? [Mode.overlay.rawValue, Mode.cacheBack.rawValue]
            if modes.contains(Mode.overlay.rawValue) {
                XCTAssertGreaterThan(totals.remoteChanges + totals.remoteRefusals, 0, "remote changes were exercised")
            }
            if modes.contains(Mode.cacheBack.rawValue) || modes.contains(Mode.cacheThrough.rawValue) {
                XCTAssertGreaterThan(totals.pagesSetAhead, 0, "write-ahead regions were exercised")
                do {
                    // (a third of the cache devices track no dirty pages: theirs go first)
                    XCTAssertGreaterThan(totals.writesDeferred, 0, "writes of absent pages issued before their intent bits were exercised")
                }
                XCTAssertGreaterThan(totals.readsThrough, 0, "misses not admitted were exercised")
            }
            if modes.contains(Mode.cacheThrough.rawValue) || env["MODEL_MODE"] == nil {
                XCTAssertGreaterThan(totals.cacheCopiesLost, 0, "write-through writes whose cache copy failed were exercised")
            }
        }
    }
}

extension FakeQueue {
    /// The result a tag completed with last (kept by `World.collect`).
    func lastResult(_ tag: UInt16) -> Int32 { lastResults[tag] ?? -1 }
}

/// The queue thread blocks only in io_uring_enter. Every
/// write and fdatasync of a FLUSH (cache file, bitmaps) is handed to the
/// queue's ring, none made by the handler itself.
final class RingOnlyPersistenceTests: XCTestCase {
    func testAFlushIssuesEveryWriteAndSyncThroughTheQueue() throws {
        let world = try PageStateModelTests.World(seed: 3, queues: 1)  // a writable overlay
        let queue = world.queue!
        queue.fsyncFailPermille = 0
        queue.writeFailPermille = 0
        world.handler.persistInterval = .max / 2  // only the FLUSH persists
        // A whole-page write (no fetch), then a FLUSH: the write's intent bits,
        // its data, the cache file's fdatasync and the present bits.
        world.submit(op: Op.write, sector: 8, count: 8)
        world.submit(op: Op.flush, sector: 0, count: 0)
        var syncs = Set<Int32>(), writes = Set<Int32>()
        var steps = 0
        while !world.inFlight.isEmpty {
            for p in queue.pending {
                switch p.op {
                case .fsync(let fd): syncs.insert(fd)
                case .write(let fd, _, _, _): writes.insert(fd)
                default: break
                }
            }
            queue.runOne()
            try world.collect()
            steps += 1
            XCTAssertLessThan(steps, 10_000)
        }
        let bitmaps = Set(world.bitmaps.map(\.fd))
        XCTAssertTrue(syncs.contains(world.handler.cacheFD), "the cache file's fdatasync went through the queue")
        XCTAssertFalse(syncs.intersection(bitmaps).isEmpty, "bitmap fdatasyncs went through the queue: \(syncs) of \(bitmaps)")
        XCTAssertFalse(writes.intersection(bitmaps).isEmpty, "bitmap words were written through the queue")
    }
}
