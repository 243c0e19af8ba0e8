// CacheContext: what a caching target (http, cache, overlay) hands the
// caching handler of each of its queues: the files, the bitmaps, the
// target's policy (writable, write-through or back, read-through, bounds).
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
    /// Admission by reuse (`cache` target with a size bound, `--admit reuse`):
    /// a read miss is copied into the cache only when one of its pages missed
    /// before within about the cache's size of misses (AdmissionFilter); a
    /// first miss reads through from the backing store, run by run, and
    /// leaves the cache as it was. Off: every read miss is fetched into the cache.
    var admitOnReuse = false
    /// Write-ahead by region (`cache` target): a write's write-back or
    /// unsettled bits are set, in the same intent cycle, for every present
    /// page of the aligned region of this many pages around it, so that the
    /// next writes there find their bits durable and do not wait for a cycle
    /// (CachingRequests.setIntent). 1: each page on its own.
    var intentRegionPages: UInt64 = 256
    /// A verified image (`http --verity-root`): its hash tree, and the pages
    /// checked in this run (shared by the queues: set by the home only, read
    /// by the peers; CachingVerify.swift).
    var verity: VerityTree?
    var verified: PageBits?
    /// The home's: fetches the tree's hash blocks on demand (nil: the tree is all local).
    var treeFetcher: TreeFetcher?

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
