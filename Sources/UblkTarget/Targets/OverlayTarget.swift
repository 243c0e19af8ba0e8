// overlay: a writable device over a read-only lower device (the shared base
// of an image: a read-only `http` device that every overlay of that image
// reads through), keeping only the pages written here (OverlayStore.swift:
// the data file, its local and dirty bitmaps).
//
// Why a device under devices: the base's page cache then has one owner, the
// base's own server, and the kernel's block layer is the only protocol
// between processes: each page is fetched once host-wide and stored once, in
// the base's cache file under the base's one --cache-max-size budget, and an
// overlay's server dying (kill -9) leaves nothing of it in the base: it never
// touched the base's files. See README "Many devices from one image".
//
// REQUESTS (one queue):
//   READ          page by page the request splits into runs of local pages
//                 (read from the data file) and others (read from the lower
//                 device), one run at a time, in order.
//   WRITE         whole pages go to the data file as they are. A page the
//                 write covers in part and that is not local is copied up
//                 first (the lower's page read into the tag's bounce page,
//                 written to the data file, the page then local), so the rest
//                 of the page keeps the image's bytes. When the data landed,
//                 its pages are local and dirty (in memory), then the write
//                 completes (FUA: after a cycle, below).
//   FLUSH         a cycle: fdatasync of the data file, then the local and
//                 dirty bitmap words written and fdatasync'ed, then the FLUSH
//                 (and FUA writes) waiting on it complete. So a local bit
//                 never reaches the disk before its page's data (a crash
//                 leaves a page either as written or as the image's), and a
//                 dirty bit is durable before the FLUSH that covers its write.
//                 Cycles run one at a time; a FLUSH arriving during one waits
//                 for the next. A failed fdatasync fails that FLUSH and every
//                 later one (the data it covered may be lost; Linux will not
//                 say so again) until the device is added again.
//   DISCARD, WRITE_ZEROES  not offered (the kernel writes zeros itself).
//   `dirty`, `sync`  as for `http --writable` (CachingControl.swift): the
//                 dirty bitmap lists the pages written since the last clear.
// Two writes never race on one page's copy-up: a write that needs a copy-up
// waits while any write in flight touches its pages, and any write waits
// while a copy-up of one of its pages is in flight (`busy`, `copying`).
// The queue thread blocks only in io_uring_enter; `shutdown` persists what
// is left (blocking is allowed there).
import CUring
import Glibc
import PageCache

public struct OverlayTargetOptions {
    /// The lower device (or file): read only.
    public var lower: String
    /// Where overlays live, and this one's name.
    public var directory: String
    public var name: String
    /// What the lower device is (its image's identity, recorded in the overlay's bitmaps).
    public var identity: BitmapIdentity
    /// Create the overlay when absent (else: a one-line error).
    public var create = true

    public init(lower: String, directory: String, name: String, identity: BitmapIdentity) {
        self.lower = lower
        self.directory = directory
        self.name = name
        self.identity = identity
    }
}

public final class OverlayTarget: Target {
    public let name = "overlay"
    public let params: DeviceParams
    public let settings: OverlayTargetOptions
    let store: OverlayStore
    let lowerFD: Int32
    let lowerDirect: Bool
    let lowerIO: FileIO

    public var options: [String: String] {
        ["lower": settings.lower, "overlay": settings.name, "overlay_file": store.data.path,
         "image_url": settings.identity.url, "etag": settings.identity.etag ?? "",
         "last_modified": settings.identity.lastModified ?? "",
         "overlay_state": store.created ? "created" : "reattached",
         "lower_io": lowerIO.description]
    }

    public init(_ o: OverlayTargetOptions) throws(UblkError) {
        settings = o
        var fd = open(o.lower, O_RDONLY | O_CLOEXEC | cu_o_direct)
        var direct = true
        if fd < 0 && errno == EINVAL {
            fd = open(o.lower, O_RDONLY | O_CLOEXEC)
            direct = false
        }
        if fd < 0 { throw UblkError("cannot open the lower device \(o.lower)", errno: .current) }
        var st = stat()
        fstat(fd, &st)
        var size = UInt64(st.st_size)
        if (st.st_mode & S_IFMT) == S_IFBLK {
            var s: UInt64 = 0
            let r = cu_blkgetsize64(fd, &s)
            if r < 0 {
                close(fd)
                throw UblkError("cannot get the size of \(o.lower)", errno: Errno(returned: r))
            }
            size = s
        }
        size &= ~UInt64(511)
        guard size > 0 else {
            close(fd)
            throw UblkError("the lower device \(o.lower) is empty")
        }
        // Reads of the lower device with O_DIRECT (the base's cache already
        // holds the pages: no second copy in this page cache) are aligned as
        // it needs: the device's logical block covers that, as for `loop`.
        var io = FileIO.buffered("the lower device does not take O_DIRECT")
        if direct {
            io = DirectIO.decide(fsType: 0, openErrno: 0, alignment: DirectIO.alignment(fd: fd), pageSize: 4096,
                                 size: size, padsTail: true)
            if !io.isDirect {  // aligned as nothing here can promise: read it buffered
                close(fd)
                fd = open(o.lower, O_RDONLY | O_CLOEXEC)
                direct = false
                if fd < 0 { throw UblkError("cannot open the lower device \(o.lower)", errno: .current) }
            }
        }
        var id = o.identity
        id.imageSize = size
        lowerIO = io
        do { store = try OverlayStore(directory: o.directory, name: o.name, lower: id, create: o.create) } catch {
            close(fd)
            throw UblkError(error.description)
        }
        lowerFD = fd
        lowerDirect = direct
        var p = DeviceParams(size: size)
        p.logicalBlockShift = DirectIO.logicalBlockShift([io])
        p.dmaAlignment = DirectIO.dmaAlignment([io])
        p.writeCache = true
        p.discard = false
        p.dataPaths = [.autoZeroCopy, .zeroCopy, .userCopy, .kernelCopy]
        params = p
    }

    deinit { close(lowerFD) }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        guard queue.id == 0 else { throw UblkError("an overlay device has one queue") }
        return OverlayHandler(store: store, lowerFD: lowerFD, size: params.size, depth: queue.depth)
    }
}

final class OverlayHandler: QueueHandler {
    let store: OverlayStore
    let local: Bitmap
    let dirty: Bitmap
    let dataFD: Int32
    let lowerFD: Int32
    let size: UInt64
    static let page = UInt64(OverlayStore.pageSize)

    static let subRead: UInt8 = 0, subWrite: UInt8 = 1, subCopyRead: UInt8 = 2, subCopyWrite: UInt8 = 3
    static let subSync: UInt8 = 4, subMetaWrite: UInt8 = 5, subMetaSync: UInt8 = 6

    var requests: [Request?]
    var done: [UInt32]
    /// A write's pages still to copy up, the one in flight first.
    var copyUps: [[UInt64]]
    /// Each tag's page for copy-ups (lower page in, data file page out), aligned for O_DIRECT.
    let bounce: UnsafeMutableRawPointer
    /// Pages under a write in flight (count), and under a copy-up.
    var busy: [UInt64: Int] = [:]
    var copying: Set<UInt64> = []
    /// Writes waiting for a page to be free, in arrival order.
    var deferred: [Request] = []

    struct Cycle {
        var waiters: [UInt16]
        var commits: [(bitmap: Bitmap, commit: BitmapCommit)]
        var writes: [Bitmap.PendingWrite] = []
        var outstanding = 0
        var failed = false
        var syncing = false
    }
    var cycle: Cycle?
    /// FLUSH and FUA writes waiting for the next cycle; what each completes with.
    var flushWaiters: [UInt16] = []
    var flushResult: [Int32]
    /// A data sync failed: every FLUSH fails from now on.
    var durabilityLost = false
    /// `sync` snapshots handed out and not yet confirmed.
    var syncs = SyncTracker()

    init(store: OverlayStore, lowerFD: Int32, size: UInt64, depth: Int) {
        self.store = store
        local = store.local
        dirty = store.dirty
        dataFD = store.data.fd
        self.lowerFD = lowerFD
        self.size = size
        requests = Array(repeating: nil, count: depth)
        done = Array(repeating: 0, count: depth)
        copyUps = Array(repeating: [], count: depth)
        flushResult = Array(repeating: 0, count: depth)
        var p: UnsafeMutableRawPointer?
        posix_memalign(&p, 4096, depth * Int(OverlayHandler.page))
        bounce = p!
    }

    deinit { free(bounce) }

    func handle(_ r: Request, queue: IOQueue) {
        let t = Int(r.tag)
        requests[t] = r
        done[t] = 0
        switch r.op {
        case Op.read: nextRead(r, queue)
        case Op.write: startWrite(r, queue)
        case Op.flush:
            flushResult[t] = 0
            flushWaiters.append(r.tag)
            startCycle(queue)
        default: finish(r.tag, -EOPNOTSUPP, queue)
        }
    }

    func finish(_ tag: UInt16, _ result: Int32, _ queue: IOQueue) {
        requests[Int(tag)] = nil
        queue.complete(tag: tag, result: result)
    }

    // MARK: Reads

    /// The next run of the read: pages of one kind (local or not) from `done` on.
    func nextRead(_ r: Request, _ queue: IOQueue) {
        let t = Int(r.tag)
        let start = r.offset + UInt64(done[t]), end = r.offset + UInt64(r.length)
        let ps = OverlayHandler.page
        let isLocal = local.test(start / ps)
        var stop = (start / ps + 1) * ps
        while stop < end && local.test(stop / ps) == isLocal { stop += ps }
        stop = min(stop, end)
        queue.readIntoRequest(r, at: done[t], length: UInt32(stop - start), fd: isLocal ? dataFD : lowerFD,
                              offset: start, tag: r.tag, sub: OverlayHandler.subRead, data: 0)
    }

    // MARK: Writes

    func pages(_ r: Request) -> Range<UInt64> {
        let ps = OverlayHandler.page
        return r.offset / ps..<(r.offset + UInt64(r.length) + ps - 1) / ps
    }

    /// The pages `r` covers in part and that are not local yet.
    func partialPages(_ r: Request) -> [UInt64] {
        let ps = OverlayHandler.page
        let end = r.offset + UInt64(r.length)
        let range = pages(r)
        var out: [UInt64] = []
        for p in [range.lowerBound, range.upperBound - 1] where !out.contains(p) {
            let a = p * ps, b = min((p + 1) * ps, size)
            if (r.offset > a || end < b) && !local.test(p) { out.append(p) }
        }
        return out
    }

    func startWrite(_ r: Request, _ queue: IOQueue) {
        let range = pages(r)
        let partial = partialPages(r)
        let blocked = range.contains { copying.contains($0) } || partial.contains { busy[$0] != nil }
        if blocked { return deferred.append(r) }
        for p in range { busy[p, default: 0] += 1 }
        let t = Int(r.tag)
        copyUps[t] = partial
        for p in partial { copying.insert(p) }
        nextCopyUp(r, queue)
    }

    func nextCopyUp(_ r: Request, _ queue: IOQueue) {
        let t = Int(r.tag)
        guard let p = copyUps[t].first else {
            return queue.writeFromRequest(r, at: 0, length: r.length, fd: dataFD, offset: r.offset, flags: 0,
                                          tag: r.tag, sub: OverlayHandler.subWrite, data: 0)
        }
        let ps = OverlayHandler.page
        queue.read(fd: lowerFD, into: bounce + t * Int(ps), length: UInt32(ps), offset: p * ps,
                   tag: r.tag, sub: OverlayHandler.subCopyRead, data: 0)
    }

    /// The write is over (data landed, or failed): its pages are free again.
    func endWrite(_ r: Request, _ result: Int32, _ queue: IOQueue) {
        let t = Int(r.tag)
        for p in copyUps[t] { copying.remove(p) }
        copyUps[t] = []
        for p in pages(r) {
            if let n = busy[p], n > 1 { busy[p] = n - 1 } else { busy[p] = nil }
        }
        if result >= 0 {
            local.markPresent(pages(r))
            dirty.markPresent(pages(r))
            syncs.written(pages(r))
        }
        if result >= 0 && r.fua {
            flushResult[t] = result
            flushWaiters.append(r.tag)
            startCycle(queue)
        } else {
            finish(r.tag, result, queue)
        }
        retryDeferred(queue)
    }

    func retryDeferred(_ queue: IOQueue) {
        guard !deferred.isEmpty else { return }
        let waiting = deferred
        deferred = []
        for r in waiting { startWrite(r, queue) }
    }

    // MARK: Cycles

    func startCycle(_ queue: IOQueue) {
        guard cycle == nil, let tag = flushWaiters.first else { return }
        if durabilityLost { return endCycle(Cycle(waiters: takeWaiters(), commits: []), -EIO, queue) }
        let c = Cycle(waiters: takeWaiters(), commits: [(local, local.stage()), (dirty, dirty.stage())])
        cycle = c
        queue.fsync(fd: dataFD, tag: tag, sub: OverlayHandler.subSync)
    }

    func takeWaiters() -> [UInt16] {
        defer { flushWaiters = [] }
        return flushWaiters
    }

    func cycleStep(_ sub: UInt8, _ data: UInt32, _ result: Int32, _ queue: IOQueue) {
        guard var c = cycle else { return }
        let tag = c.waiters[0]
        switch sub {
        case OverlayHandler.subSync:
            if result < 0 {
                durabilityLost = true
                for x in c.commits { x.bitmap.abandon(x.commit) }
                return endCycle(c, -EIO, queue)
            }
            c.writes = c.commits.filter { !$0.commit.isEmpty }.map { $0.bitmap.pendingWrite($0.commit) }
            var n = 0
            for (i, w) in c.writes.enumerated() {
                for run in w.runs {
                    queue.write(fd: w.fd, from: w.buffer + run.bufferOffset, length: UInt32(run.count),
                                offset: run.fileOffset, flags: 0, tag: tag, sub: OverlayHandler.subMetaWrite, data: UInt32(i))
                    n += 1
                }
            }
            c.outstanding = n
            cycle = c
            if n == 0 { metaWritten(queue) }
        case OverlayHandler.subMetaWrite:
            if result <= 0 { c.failed = true }
            c.outstanding -= 1
            cycle = c
            if c.outstanding == 0 { metaWritten(queue) }
        default:  // subMetaSync
            if result < 0 { c.failed = true }
            c.outstanding -= 1
            cycle = c
            if c.outstanding > 0 { return }
            if c.failed {
                for x in c.commits { x.bitmap.abandon(x.commit) }
                return endCycle(c, -EIO, queue)
            }
            for x in c.commits { x.bitmap.persisted(x.commit) }
            endCycle(c, 0, queue)
        }
    }

    func metaWritten(_ queue: IOQueue) {
        guard var c = cycle else { return }
        if c.failed {
            for x in c.commits { x.bitmap.abandon(x.commit) }
            return endCycle(c, -EIO, queue)
        }
        if c.writes.isEmpty {
            for x in c.commits { x.bitmap.persisted(x.commit) }
            return endCycle(c, 0, queue)
        }
        c.outstanding = c.writes.count
        cycle = c
        for (i, w) in c.writes.enumerated() {
            queue.fsync(fd: w.fd, tag: c.waiters[0], sub: OverlayHandler.subMetaSync, data: UInt32(i))
        }
    }

    func endCycle(_ c: Cycle, _ result: Int32, _ queue: IOQueue) {
        cycle = nil
        for t in c.waiters { finish(t, result < 0 ? result : flushResult[Int(t)], queue) }
        startCycle(queue)
    }

    // MARK: Completions

    func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: IOQueue) {
        if sub >= OverlayHandler.subSync { return cycleStep(sub, data, result, queue) }
        let t = Int(tag)
        guard let r = requests[t] else { return }
        let ps = OverlayHandler.page
        switch sub {
        case OverlayHandler.subRead:
            if result < 0 { return finish(tag, result, queue) }
            if result == 0 {
                // Past the end of a file: zeros to the end of this run, then on.
                let start = r.offset + UInt64(done[t])
                let runEnd = min((start / ps + 1) * ps, r.offset + UInt64(r.length))
                let z = queue.zeroFill(r, at: done[t], length: UInt32(runEnd - start))
                if z < 0 { return finish(tag, z, queue) }
                done[t] += UInt32(runEnd - start)
            } else {
                done[t] += UInt32(result)
            }
            if done[t] >= r.length { return finish(tag, Int32(r.length), queue) }
            nextRead(r, queue)
        case OverlayHandler.subCopyRead:
            if result < 0 { return endWrite(r, result, queue) }
            let p = copyUps[t][0]
            let want = min(ps, size - p * ps)
            if UInt64(result) < want { memset(bounce + t * Int(ps) + Int(result), 0, Int(ps) - Int(result)) }
            queue.write(fd: dataFD, from: bounce + t * Int(ps), length: UInt32(want), offset: p * ps,
                        flags: 0, tag: tag, sub: OverlayHandler.subCopyWrite, data: 0)
        case OverlayHandler.subCopyWrite:
            let p = copyUps[t][0]
            if result != Int32(min(ps, size - p * ps)) { return endWrite(r, result < 0 ? result : -EIO, queue) }
            // The data file holds the image's page now: local, so no other write copies it again.
            local.markPresent(p..<p + 1)
            copying.remove(p)
            copyUps[t].removeFirst()
            nextCopyUp(r, queue)
        default:  // subWrite
            if result <= 0 { return endWrite(r, result < 0 ? result : -EIO, queue) }
            done[t] += UInt32(result)
            if done[t] < r.length {
                return queue.writeFromRequest(r, at: done[t], length: r.length - done[t], fd: dataFD,
                                              offset: r.offset + UInt64(done[t]), flags: 0, tag: tag,
                                              sub: OverlayHandler.subWrite, data: 0)
            }
            endWrite(r, Int32(r.length), queue)
        }
    }

    /// `dirty` and `sync` (CachingControl.swift's contract): cleared bits reach
    /// the disk with the next cycle, after the data they vouch for.
    func control(_ request: ControlRequest, queue: IOQueue) -> String {
        switch request.op {
        case .dirty, .syncBegin, .syncEnd:
            return DirtyControl.answer(request, dirty: dirty, syncs: &syncs, pageSize: OverlayHandler.page, imageSize: size) { runs in
                // After a failed data sync the pages may be lost: they stay dirty.
                guard !durabilityLost else { return }
                for r in runs { dirty.markAbsent(r) }
            }
        default:
            return controlError("the \(request.op) command is not supported by an overlay device")
        }
    }

    func shutdown(queue: IOQueue) {
        // A cycle cut short: its words go out with the rest, in the crash order.
        if let c = cycle {
            for x in c.commits { x.bitmap.abandon(x.commit) }
            cycle = nil
        }
        if !durabilityLost { store.persistAll() }
    }
}
