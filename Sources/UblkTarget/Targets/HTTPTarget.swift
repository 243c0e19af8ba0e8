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
// WRITE, DISCARD or WRITE_ZEROES first makes every page it covers only in part
// present (fetching what is missing, so partial pages are merged correctly) and
// waits for fetches in flight on its pages (so none lands on top of it); the
// missing pages it covers whole it claims instead (FetchPlanner.claimForWrite:
// no fetch, reads of them wait for the write). Then it writes (or punches) the
// cache file and marks the pages present and dirty. The remote object is
// never modified. A FLUSH (and a FUA write) completes only after a sync
// cycle: stage both bitmaps, fdatasync the cache file, persist them. So a
// dirty bit is on disk before the write that set it is acknowledged by a FLUSH.
//
// Queues (-q N): queue 0 is the home (planner, fetches, bitmaps, persistence);
// the others serve hits themselves and hand the rest to it (CachingHandler.swift).
// Every request completes: with data, -EIO when its fetch finally failed, or
// -EIO at drain (device stopping).
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
    /// Keep the cache file under this many bytes (0: unbounded).
    public var maxCacheBytes: UInt64 = 0
    public var dirtyPath: String { bitmapPath + ".dirty" }
    public var localPath: String { bitmapPath + ".local" }
    /// Where the bitmaps' words live so that they survive the server (nil: private memory).
    public var liveState: LiveConfig? = LiveConfig.system(required: true)
    /// The device's queues (-q): one thread and ring each.
    public var queues = 1
    /// A boot profile to replay in the background once the device serves (and the file it came from).
    public var prefetchProfile: (path: String, profile: BootProfile)?
    /// A verified image: every remote page checked against this hash tree (HTTPVerity.swift).
    public var verity: VeritySpec?

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
    /// The cache's files, statistics and queues (CachingDevice).
    let device: CachingDevice
    /// How the cache file's data pages are read and written.
    public var cacheIO: FileIO { device.dataIO }
    var stats: CacheStats { device.stats }

    /// nil: the probe answered; else why the device serves without the remote.
    public let remoteState: String?
    /// A verified image's hash tree (nil: not verified).
    let verity: VerityTree?
    /// The object as the probe found it (its size and validators, which every
    /// fetch checks): `remote` but for a tree appended to the image, where the
    /// device (`remote`) is the data before the tree.
    let object: RemoteImage

    /// How many fetches the device keeps in flight, and why (`list`).
    var inFlightText: String {
        let n = remote.requestsInFlight(settings.http)
        return remote.multiplexed ? "\(n) (HTTP/2 streams)" : "\(n) (one per connection)"
    }

    public var options: [String: String] {
        [
            "url": settings.http.url, "cache": settings.cachePath, "bitmap": settings.bitmapPath,
            "page_size": String(settings.pageSize), "image_size": String(remote.size),
            "etag": remote.etag ?? "", "last_modified": remote.lastModified ?? "", "cache_state": cacheState,
            "writable": settings.writable ? "true" : "false", "cache_io": cacheIO.description,
            "requests_in_flight": inFlightText,
        ].merging(settings.writable ? ["dirty_bitmap": settings.dirtyPath, "local_bitmap": settings.localPath] : [:]) { a, _ in a }
            .merging(remoteState.map { ["remote": $0] } ?? [:]) { a, _ in a }
            .merging(settings.http.mirrors.isEmpty ? [:] : ["mirrors": settings.http.mirrors.map { Redact.url($0) }.joined(separator: " ")]) { a, _ in a }
            .merging(settings.verity.map { v in
                ["verity_root": v.rootHex.lowercased(),
                 "verity_tree": v.tree.map { v.treeIsURL ? Redact.url($0) : $0 } ?? "appended at \(v.offset ?? 0)"]
            } ?? [:]) { a, _ in a }
    }

    /// A probe that reached no answer: refused, unreachable, timed out, a
    /// broken transfer or TLS handshake, or a gateway without its origin (502-504).
    static func isUnreachable(_ e: HTTPError) -> Bool {
        switch e.reason {
        case .connectFailed, .timedOut, .transport, .tls: return true
        case .status(let c): return (502...504).contains(c)
        default: return false
        }
    }

    /// The image as the cache's bitmap records it, when every page of it is
    /// present and the bitmap is this URL's (its identity URL and page size);
    /// nil otherwise. Read without taking the files (the live bits of a
    /// server of this boot that died count, as at open).
    static func completeCache(_ o: HTTPTargetOptions) -> RemoteImage? {
        guard let info = try? CacheStore.inspect(bitmapPath: o.bitmapPath, cachePath: o.cachePath, live: o.liveState) else { return nil }
        let id = info.present.identity
        guard id.kind == .present, id.url == cacheIdentity(o), id.pageSize == o.pageSize, id.imageSize > 0,
              info.present.present == id.pageCount,
              info.cacheFile == "ok" || info.cacheFile == "ok (unbound)" else { return nil }
        return RemoteImage(effectiveURL: o.http.url, size: id.imageSize, etag: id.etag, lastModified: id.lastModified)
    }

    public init(_ o: HTTPTargetOptions) throws(UblkError) {
        settings = o
        guard o.pageSize >= 512, o.pageSize.nonzeroBitCount == 1, o.pageSize <= 1 << 20 else {
            throw UblkError("--page-size must be a power of two between 512 and 1M, not \(o.pageSize)")
        }
        // The probe asks the remote what the image is. A remote that cannot be
        // reached is no obstacle where nothing needs fetching: a cache whose
        // every page is present (hydrated) for this URL serves as the image
        // its bitmaps name. Where a page is missing, the probe's error stands.
        // A remote that answers with another identity is handled below, as
        // always (afresh, or refused when local writes are at stake).
        var unreachable: HTTPError?
        var probed: RemoteImage
        do {
            let (image, notes) = try HTTPSource.probeAll(o.http)
            for note in notes { log(Redact.text("ublk-http: \(note)")) }
            probed = image
        } catch {
            guard HTTPTarget.isUnreachable(error), let cached = HTTPTarget.completeCache(o) else {
                throw UblkError(error.description)
            }
            probed = cached
            unreachable = error
        }
        // A verified image: its tree, checked against the root before anything is served.
        if let v = o.verity {
            let (tree, dataBytes) = try HTTPVerity.load(v, http: o.http, remote: unreachable == nil ? probed : nil,
                                                        cachePath: o.cachePath, pageSize: o.pageSize)
            // A tree appended to the image: the device is the data before it.
            object = probed
            if v.tree == nil { probed.size = dataBytes }
            verity = tree
        } else {
            object = probed
            verity = nil
        }
        remote = probed
        remoteState = unreachable == nil ? nil : "unreachable, serving the complete cache"
        guard remote.size > 0 else { throw UblkError("\(o.http.url) is empty: nothing to serve") }
        if let (path, p) = o.prefetchProfile, let why = p.mismatch(url: HTTPTarget.identityURL(o.http.url), imageSize: remote.size,
                                                                 etag: remote.etag, lastModified: remote.lastModified) {
            throw UblkError("the profile \(path) does not fit \(Redact.url(o.http.url)): \(why)")
        }
        let identity = BitmapIdentity(kind: .present, pageSize: o.pageSize, imageSize: remote.size,
                                      url: HTTPTarget.cacheIdentity(o), etag: remote.etag, lastModified: remote.lastModified)
        // CacheStore opens, validates and binds the files, and decides what a
        // changed remote or a mismatched cache file means (afresh, or refusal
        // when locally written pages would be lost).
        var spec = CacheStoreSpec(cachePath: o.cachePath, bitmapPath: o.bitmapPath, identity: identity)
        spec.dirty = o.writable ? .open : .none
        spec.local = o.writable ? .open : .refuse { n in
            "the cache \(o.cachePath) holds \(n) locally written pages: add it with --writable"
        }
        spec.live = o.liveState
        let opened: CacheStore
        do { opened = try CacheStore.open(spec) } catch { throw UblkError(error.description) }
        cacheState = opened.state.description
        if let e = unreachable {
            // The files opened may tell otherwise than the look before (a cache
            // file of another set starts afresh): then the probe's error stands.
            guard opened.state == .reused, opened.present.count == opened.present.pageCount else {
                throw UblkError(e.description)
            }
            log(Redact.text("ublk-http: \(e.description); every page is in the cache: serving it as the image its bitmap names"))
        }
        for note in opened.notes { log(Redact.text("ublk-http: \(note)")) }
        if case .startedAfresh(let why) = opened.state {
            log(Redact.text("ublk-http: \(o.http.url): \(why); the cache starts afresh"))
        }
        // Fetched bytes reach an O_DIRECT cache file in aligned blocks, the
        // image's last one padded (CachingHandler.receivedDirect).
        device = CachingDevice(store: opened, pageSize: o.pageSize, imageSize: remote.size, queues: o.queues,
                               maxCacheBytes: o.maxCacheBytes, padsTail: true)
        if let tree = verity {
            device.verity = tree
            device.verified = PageBits(pageCount: opened.present.pageCount)
        }
        let cacheIO = device.dataIO
        // The device: the image rounded up to whole logical blocks, at least
        // the cache file's direct I/O alignment (never past the trailer, which
        // starts at the image end rounded up to 4096).
        let shift = DirectIO.logicalBlockShift([cacheIO])
        let block = UInt64(1) << shift
        var p = DeviceParams(size: (remote.size + block - 1) & ~(block - 1))
        p.logicalBlockShift = shift
        p.dmaAlignment = DirectIO.dmaAlignment([cacheIO])
        p.readOnly = !o.writable
        p.writeCache = o.writable
        p.discard = o.writable
        p.dataPaths = CachingHandler.dataPaths(cacheFD: opened.cache.fd)
        params = p
    }

    /// The image's identity a cache's bitmap records (and `status` prints):
    /// the whole URL minus what signs or expires it, with no secret in clear
    /// (see `ImageIdentity`). URLs that differ in a query value are different
    /// images; a URL signed again finds its cache, and whether the object is
    /// the same is what its ETag and Last-Modified say.
    public static func identityURL(_ url: String) -> String { ImageIdentity.of(url) }

    /// What the cache's bitmap records: the image's identity, and a verified
    /// image's root hash (another root is another cache: it starts afresh).
    static func cacheIdentity(_ o: HTTPTargetOptions) -> String {
        identityURL(o.http.url) + (o.verity?.identitySuffix ?? "")
    }

    static func describe(_ why: InvalidationReason) -> String {
        switch why {
        case .urlChanged(let old, let new): return "URL \(old) is now \(new)"
        case .etagChanged(let old, let new): return "ETag \(old ?? "none") is now \(new ?? "none")"
        case .lastModifiedChanged(let old, let new): return "Last-Modified \(old ?? "none") is now \(new ?? "none")"
        }
    }

    /// Counters for `list` and `stats`.
    public func snapshot() -> HTTPStats { device.snapshot() }

    /// Readahead starts at 1 MiB on the second sequential read and doubles up to
    /// `readaheadBytes`; runs are capped at `maxRunBytes`.
    /// Runs in flight: `--streams` where the server multiplexes (HTTP/2), else one per connection.
    static func makePlanner(_ o: HTTPTargetOptions, remote: RemoteImage) -> FetchPlanner {
        FetchPlanner(imageSize: remote.size, pageSize: o.pageSize, maxRunBytes: o.maxRunBytes,
                     initialReadaheadBytes: min(1 << 20, o.readaheadBytes), maxReadaheadBytes: o.readaheadBytes,
                     maxActiveRuns: remote.requestsInFlight(o.http))
    }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        guard Int(queue.id) < settings.queues else { throw UblkError("queue \(queue.id) of \(settings.queues)?") }
        // The home fetches a remote tree's hash blocks on demand (HTTPVerity.swift).
        var treeFetcher: TreeFetcher?
        if queue.id == 0, let v = settings.verity, let tree = verity {
            treeFetcher = try HTTPVerity.fetcher(v, http: settings.http, cachePath: settings.cachePath, tree: tree, stats: stats)
        }
        return try device.makeHandler(for: queue, deviceSize: params.size,
                                      planner: HTTPTarget.makePlanner(settings, remote: remote),
                                      fetcher: { () throws(UblkError) -> RunFetcher in
            var config = settings.http
            config.maxAttempts = max(1, config.maxAttempts)
            let source: HTTPSource
            do { source = try HTTPSource(config: config, stats: stats) } catch { throw UblkError("\(error)") }
            source.expected = object
            let q = queue.id
            source.onMirrorEvent = { log(Redact.text("ublk-http: queue \(q): \($0)")) }
            return HTTPFetcher(source)
        }) { context in
            context.writable = settings.writable
            context.treeFetcher = treeFetcher
            if queue.id == 0, let p = settings.prefetchProfile?.profile {
                // In recorded order, coalesced (BootProfile's REPLAY); what is present is skipped.
                var spec = FillJobSpec(kind: .profile, ranges: p.replayRanges(targetPageSize: settings.pageSize,
                                                                              maxRunBytes: UInt64(settings.maxRunBytes)))
                spec.maxInFlight = max(1, min(2, settings.http.maxConnections - 1))
                spec.maxPasses = 3
                context.startFill = spec
            }
        }
    }
}
