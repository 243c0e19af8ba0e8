// cache: a slow block device or file (the backing store) cached page by page
// in a cache file on fast storage, with the same engine as `http`: reads hit
// the cache file or fetch missing pages from the backing store (io_uring
// reads) into it; the page bitmap gates them and persists with the same
// crash rule. Writes are tracked as dirty (for `dirty` and `sync`) and:
//   through: reach the cache and the backing store before they complete;
//   back:    complete once in the cache; a write-back bitmap records the pages
//            the backing store lacks, and one run at a time (the throttle) is
//            copied out in the background; `ublk-http flush -n ID` returns
//            when none are left. A FLUSH persists the write-back bitmap, so
//            after kill -9 and `add` again every acknowledged write still
//            reaches the backing store.
import CUring
import Glibc
import PageCache

public struct CacheTargetOptions {
    public var backing: String
    public var cachePath: String
    public var bitmapPath: String
    public var writeBack = false
    public var pageSize = 4096
    public var readOnly = false
    /// Keep the cache file under this many bytes (0: unbounded).
    public var maxCacheBytes: UInt64 = 0
    /// Track written pages for `dirty` and `sync` (off: measure what tracking costs).
    public var trackDirty = true
    /// With `maxCacheBytes`: read misses are cached only once reused (`--admit reuse`,
    /// CacheContext.admitOnReuse); off: every miss (`--admit all`).
    public var admitOnReuse = true
    /// Where the bitmaps' words live so that they survive the server (nil: private memory).
    public var liveState: LiveConfig? = LiveConfig.system(required: true)
    /// The device's queues (-q): one thread and ring each.
    public var queues = 1

    public init(backing: String, cachePath: String, bitmapPath: String) {
        self.backing = backing
        self.cachePath = cachePath
        self.bitmapPath = bitmapPath
    }
}

public final class CacheTarget: Target {
    public let name = "cache"
    public let params: DeviceParams
    public let settings: CacheTargetOptions
    let backingFD: Int32
    /// How the cache file's data pages and the backing store are read and written.
    public var cacheIO: FileIO { device.dataIO }
    public let backingIO: FileIO
    /// The cache's files, statistics and queues (CachingDevice).
    let device: CachingDevice
    let cacheState: String

    public var options: [String: String] {
        ["backing": settings.backing, "cache": settings.cachePath, "bitmap": settings.bitmapPath,
         "write_mode": settings.writeBack ? "back" : "through", "page_size": String(settings.pageSize),
         "cache_state": cacheState, "dirty_bitmap": settings.trackDirty ? settings.bitmapPath + ".dirty" : "",
         "cache_io": cacheIO.description, "backing_io": backingIO.description,
         "admit": settings.maxCacheBytes > 0 && settings.admitOnReuse ? "reuse" : "all"]
    }

    public init(_ o: CacheTargetOptions) throws(UblkError) {
        settings = o
        guard o.pageSize >= 512, o.pageSize.nonzeroBitCount == 1, o.pageSize <= 1 << 20 else {
            throw UblkError("--page-size must be a power of two between 512 and 1M, not \(o.pageSize)")
        }
        var st = stat()
        if stat(o.backing, &st) != 0 { throw UblkError("cannot use \(o.backing) as the backing store", errno: .current) }
        let isBlock = (st.st_mode & S_IFMT) == S_IFBLK
        guard isBlock || (st.st_mode & S_IFMT) == S_IFREG else {
            throw UblkError("\(o.backing) is neither a regular file nor a block device")
        }
        var fd = open(o.backing, (o.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        if fd < 0 { throw UblkError("cannot open \(o.backing)", errno: .current) }
        var size = UInt64(st.st_size)
        if isBlock {
            var s: UInt64 = 0
            let r = cu_blkgetsize64(fd, &s)
            if r < 0 { close(fd); throw UblkError("cannot get the size of \(o.backing)", errno: Errno(returned: r)) }
            size = s
        }
        size &= ~511
        guard size > 0 else { close(fd); throw UblkError("\(o.backing) is empty") }
        // The backing store with O_DIRECT where its file system takes it (DirectIO).
        let backingDirect = DirectIO.open(path: o.backing, flags: o.readOnly ? O_RDONLY : O_RDWR, existing: fd,
                                          pageSize: o.pageSize, size: size, padsTail: false) { .buffered("file in memory: \($0)") }
        if backingDirect.fd >= 0 {
            close(fd)
            fd = backingDirect.fd
        }
        backingIO = backingDirect.io
        backingFD = fd

        var real = [CChar](repeating: 0, count: Int(PATH_MAX))
        let url = "file://" + (realpath(o.backing, &real) != nil ? String(cString: real) : o.backing)
        // The backing's identity beyond its path (file system and inode, or
        // what /sys says of the disk) goes in the ETag field: another disk or
        // file under the same name is a changed source (CacheStore).
        let identity = BitmapIdentity(kind: .present, pageSize: o.pageSize, imageSize: size, url: url,
                                      etag: BackingIdentity.describe(fd: fd))
        var spec = CacheStoreSpec(cachePath: o.cachePath, bitmapPath: o.bitmapPath, identity: identity)
        spec.companionValidators = false
        spec.sourceName = "the backing store"
        spec.dirty = o.trackDirty ? .open : .none
        spec.writeback = o.writeBack ? .open : .refuse { n in
            "the cache holds \(n) pages not yet written back to \(o.backing): add it with --write-mode back and run `ublk-http flush`"
        }
        spec.backing = BackingCheck(fd: fd, path: o.backing)
        spec.unsettled = true
        spec.live = o.liveState
        let opened: CacheStore
        do { opened = try CacheStore.open(spec) } catch {
            close(fd)
            throw UblkError(error.description)
        }
        cacheState = opened.state.description
        for note in opened.notes { log("ublk-http: \(note)") }
        if case .startedAfresh(let why) = opened.state { log("ublk-http: \(o.backing): \(why); the cache starts afresh") }
        device = CachingDevice(store: opened, pageSize: o.pageSize, imageSize: size, queues: o.queues,
                               maxCacheBytes: o.maxCacheBytes, padsTail: false)
        var p = DeviceParams(size: size)
        // Requests aligned for both files: offsets and lengths (logical block), buffers (dma_align).
        p.logicalBlockShift = DirectIO.logicalBlockShift([device.dataIO, backingIO])
        p.dmaAlignment = DirectIO.dmaAlignment([device.dataIO, backingIO])
        p.readOnly = o.readOnly
        p.writeCache = true
        p.discard = !o.readOnly
        p.dataPaths = CachingHandler.dataPaths(cacheFD: opened.cache.fd)
        params = p
    }

    deinit { close(backingFD) }

    public func snapshot() -> HTTPStats { device.snapshot() }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        guard Int(queue.id) < settings.queues else { throw UblkError("queue \(queue.id) of \(settings.queues)?") }
        // Local reads: runs of up to 1 MiB, modest readahead, a few in flight.
        let planner = FetchPlanner(imageSize: params.size, pageSize: settings.pageSize, maxRunBytes: 1 << 20,
                                   initialReadaheadBytes: 128 << 10, maxReadaheadBytes: 1 << 20, maxActiveRuns: 8)
        return try device.makeHandler(for: queue, deviceSize: params.size, planner: planner,
                                      fetcher: { FileFetcher(fd: backingFD) }) { context in
            context.backingFD = backingFD
            context.writeThrough = !settings.writeBack
            context.writable = !settings.readOnly
            context.admitOnReuse = settings.admitOnReuse
        }
    }
}
