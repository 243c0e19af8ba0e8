// CachingDevice: what every caching target (`http`, `cache`, `overlay`) is
// made of once its source is known: the files CacheStore opened and bound,
// the cache file's data pages opened with O_DIRECT where its file system
// takes it (DirectIO), the statistics, what the queues share (CachingMesh,
// the eviction clock) and the CachingHandler each queue gets. A target adds
// only its own part: how it finds its source and identity, the store spec,
// its fetcher and the policy it sets in the CacheContext.
import CUring
import Glibc
import PageCache

final class CachingDevice {
    let store: CacheStore
    /// The cache file's data pages with O_DIRECT (-1: buffered or in memory; see CacheFile), and how they are used.
    let dataFD: Int32
    let dataIO: FileIO
    let pageSize: Int
    let imageSize: UInt64
    let stats = CacheStats()
    /// -q N > 1: what the queues share.
    let mesh: CachingMesh?
    /// Eviction's chunk clock, shared by the queues (nil: no bound).
    let chunks: ChunkUse?
    let maxCacheBytes: UInt64
    /// A verified image: its tree, and the pages checked in this run (CachingVerify.swift).
    var verity: VerityTree?
    var verified: PageBits?

    /// `padsTail`: fetched bytes at the image's end are written padded to the
    /// alignment (the source may end off a block; CachingHandler.receivedDirect).
    init(store: CacheStore, pageSize: Int, imageSize: UInt64, queues: Int, maxCacheBytes: UInt64, padsTail: Bool) {
        self.store = store
        self.pageSize = pageSize
        self.imageSize = imageSize
        // A second fd: the buffered one keeps only the trailer, past the image.
        let direct = DirectIO.open(path: store.cache.path, flags: O_RDWR, existing: store.cache.fd, pageSize: pageSize,
                                   size: imageSize, padsTail: padsTail)
        dataFD = direct.fd
        dataIO = direct.io
        mesh = queues > 1 ? CachingMesh(queues: queues) : nil
        self.maxCacheBytes = maxCacheBytes
        chunks = maxCacheBytes > 0 ? ChunkUse(chunks: Int((imageSize >> CachingHandler.chunkShift) + 1)) : nil
    }

    deinit { if dataFD >= 0 { close(dataFD) } }

    /// Counters for `list` and `stats`.
    func snapshot() -> HTTPStats { stats.snapshot(mesh: mesh, present: store.present, pageSize: pageSize, verified: verity != nil) }

    /// The handler of `queue`: the context filled as every caching target
    /// fills it, `configure` adding the target's policy. Queue 0 gets the
    /// home (CachingHandler, with `fetcher`); the others a CachingPeer, which
    /// never fetches (its misses go to the home).
    func makeHandler(for queue: Queue, deviceSize: UInt64, planner: FetchPlanner, fetcher: () throws(UblkError) -> RunFetcher,
                     configure: (CacheContext) -> Void) throws(UblkError) -> QueueHandler {
        let context = CacheContext(cache: store.cache, bitmap: store.present, dirty: store.dirty, imageSize: imageSize,
                                   pageSize: pageSize, stats: stats) { [unowned self] in self.snapshot() }
        context.local = store.local
        context.writeback = store.writeback
        context.unsettled = store.unsettled
        context.dataFD = dataFD
        context.directAlignment = dataIO.isDirect ? dataIO.offsetAlignment : 0
        context.maxCacheBytes = maxCacheBytes
        context.chunks = chunks
        context.verity = verity
        context.verified = verified
        configure(context)
        if queue.id != 0, let mesh {
            return try CachingPeer.make(context: context, queue: queue, deviceSize: deviceSize, mesh: mesh)
        }
        return try CachingHandler.make(context: context, fetcher: try fetcher(), planner: planner, queue: queue,
                                       deviceSize: deviceSize, mesh: mesh)
    }
}
