// overlay: a writable device over a read-only lower device (the shared base
// of an image: a read-only `http` device that every overlay of that image
// reads through), keeping only the pages written here.
//
// It is a caching target like `http --writable`, with the lower device as
// its source and the overlay's files as its cache (OverlayStore.swift), run
// by the same handler (CachingHandler.swift) and so by the same persistence
// engine: a write's local and dirty bits are durable before its data is
// issued (an intent cycle), a present bit reaches the disk only after its
// data (a full cycle: FLUSH and FUA), the bits live in /run/ublk-http/live
// so that a server killed (kill -9) loses no acknowledged write, and the
// files are bound by one identity. What differs is admission: nothing a read
// finds missing is copied into the overlay; the read takes those pages from
// the lower device straight into the request (CacheContext.readThroughFD).
// Only a page a write covers in part is copied up first (fetched from the
// lower device into the overlay, like a write miss of `http --writable`), so
// the rest of that page keeps the image's bytes.
//
// Why a device under devices: the base's page cache then has one owner, the
// base's own server, and the kernel's block layer is the only protocol
// between processes: each page is fetched once host-wide and stored once, in
// the base's cache file under the base's one --cache-max-size budget, and an
// overlay's server dying (kill -9) leaves nothing of it in the base: it never
// touched the base's files. See README "Many devices from one image".
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
    /// The device's queues (-q): one thread and ring each.
    public var queues = 1
    /// Where the bitmaps' words live so that they survive the server (nil: private memory).
    public var liveState: LiveConfig? = LiveConfig.system(required: true)

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
    /// The overlay's files, statistics and queues (CachingDevice).
    let device: CachingDevice
    var store: CacheStore { device.store }
    let created: Bool
    let lowerFD: Int32
    let lowerIO: FileIO

    public var options: [String: String] {
        ["lower": settings.lower, "overlay": settings.name, "overlay_file": store.cache.path,
         "bitmap": store.present.path, "dirty_bitmap": store.dirty?.path ?? "",
         "image_url": settings.identity.url, "etag": settings.identity.etag ?? "",
         "last_modified": settings.identity.lastModified ?? "",
         "overlay_state": created ? "created" : "reattached", "cache_state": store.state.description,
         "lower_io": lowerIO.description, "cache_io": device.dataIO.description]
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
        // holds the pages: no second copy in this page cache), aligned as it
        // needs: the device's logical block covers that, as for `loop`.
        var io = FileIO.buffered("the lower device does not take O_DIRECT")
        if direct {
            io = DirectIO.decide(fsType: 0, openErrno: 0, alignment: DirectIO.alignment(fd: fd), pageSize: OverlayStore.pageSize,
                                 size: size, padsTail: true)
            if !io.isDirect {  // aligned as nothing here can promise: read it buffered
                close(fd)
                fd = open(o.lower, O_RDONLY | O_CLOEXEC)
                if fd < 0 { throw UblkError("cannot open the lower device \(o.lower)", errno: .current) }
            }
        }
        lowerIO = io
        var id = o.identity
        id.imageSize = size
        let opened: (store: CacheStore, created: Bool)
        do { opened = try OverlayStore.open(directory: o.directory, name: o.name, lower: id, create: o.create, live: o.liveState) } catch {
            close(fd)
            throw UblkError(error.description)
        }
        created = opened.created
        for note in opened.store.notes { log("ublk-http: overlay '\(o.name)': \(note)") }
        lowerFD = fd
        device = CachingDevice(store: opened.store, pageSize: OverlayStore.pageSize, imageSize: size, queues: o.queues,
                               maxCacheBytes: 0, padsTail: false)
        var p = DeviceParams(size: size)
        p.logicalBlockShift = DirectIO.logicalBlockShift([io, device.dataIO])
        p.dmaAlignment = DirectIO.dmaAlignment([io, device.dataIO])
        p.writeCache = true
        p.discard = true
        // Read-through moves data by runs into the request: every path but the
        // inline copy, which maps the whole request from the cache file.
        p.dataPaths = [.autoZeroCopy, .zeroCopy, .userCopy, .kernelCopy]
        params = p
    }

    deinit { close(lowerFD) }

    public func snapshot() -> HTTPStats { device.snapshot() }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        guard Int(queue.id) < settings.queues else { throw UblkError("queue \(queue.id) of \(settings.queues)?") }
        // Copy-ups only (a write's partial pages): no readahead.
        let planner = FetchPlanner(imageSize: params.size, pageSize: OverlayStore.pageSize, maxRunBytes: 1 << 20,
                                   initialReadaheadBytes: 0, maxReadaheadBytes: 0, maxActiveRuns: 8)
        return try device.makeHandler(for: queue, deviceSize: params.size, planner: planner,
                                      fetcher: { FileFetcher(fd: lowerFD) }) { context in
            context.writable = true
            context.readThroughFD = lowerFD
        }
    }
}
