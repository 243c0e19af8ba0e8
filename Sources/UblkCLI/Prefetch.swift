import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

/// Hydrates a cache without a device: what `add -t http` would fetch on reads,
/// fetched ahead, in the same files. Works without ublk_drv.
struct Prefetch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fetch (part of) a remote image into the cache, without a device.",
        discussion: """
            Uses the same --cache/--bitmap files (and defaults) as `add -t http`, so a
            later `add` finds the pages present. Shows a progress bar on a terminal,
            plain lines otherwise. Needs neither root nor ublk_drv.
            """)

    @OptionGroup var http: HTTPOptions

    @Option(name: .customLong("range"), help: "Only bytes A-B of the image (K/M/G suffixes; B inclusive, or empty for the end).")
    var range: String?

    @Option(name: .customLong("profile"), help: "Only the pages a boot profile lists (`ublk-http profile --help`), in its order, coalesced into large ranges. Refused for another image.")
    var profile: String?

    func validate() throws {
        try http.check()
        if profile != nil && range != nil { throw Failure("give --range or --profile, not both") }
    }

    func parseRange(size: UInt64) throws -> Range<UInt64> {
        guard let r = range else { return 0..<size }
        let parts = r.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, let a = Size.parse(String(parts[0])) else { throw Failure("bad --range '\(r)': expected A-B") }
        let b = parts[1].isEmpty ? size : (Size.parse(String(parts[1])).map { $0 + 1 })
        guard let end = b, a < end else { throw Failure("bad --range '\(r)': expected A-B with A <= B") }
        return min(a, size)..<min(end, size)
    }

    func run() throws {
        let o = try http.targetOptions()
        // Offline fills are not checked against a hash tree: a verified image is filled by its device.
        if o.verity != nil {
            throw Failure("prefetch does not verify pages: add the device with --verity-root, then `ublk-http hydrate` (or --prefetch-profile) fills it, every page checked")
        }
        // A bad profile is refused before the network or the cache is touched.
        let bootProfile = try profile.map(loadProfile)
        let source: HTTPSource
        let remote: RemoteImage
        do {
            source = try HTTPSource(config: o.http)
            remote = try source.probeBlocking()
        } catch { throw Failure("\(error)") }
        if let p = bootProfile, let why = p.mismatch(url: HTTPTarget.identityURL(o.http.url), imageSize: remote.size,
                                                     etag: remote.etag, lastModified: remote.lastModified) {
            throw Failure("the profile \(profile!) does not fit \(Redact.url(o.http.url)): \(why)")
        }
        let identity = BitmapIdentity(kind: .present, pageSize: o.pageSize, imageSize: remote.size,
                                      url: HTTPTarget.identityURL(o.http.url), etag: remote.etag, lastModified: remote.lastModified)
        // The same files and policy as `add -t http` (CacheStore): a local
        // overlay's written pages are never dropped nor fetched over.
        var spec = CacheStoreSpec(cachePath: o.cachePath, bitmapPath: o.bitmapPath, identity: identity)
        spec.local = .protect
        spec.live = LiveConfig.system(required: false)
        let bitmap: Bitmap
        let cache: CacheFile
        do {
            let store = try CacheStore.open(spec)
            bitmap = store.present
            cache = store.cache
            if case .startedAfresh(let why) = store.state {
                printError(Redact.text("ublk-http: \(why); the cache starts afresh") + "\n")
            }
        } catch { throw Failure("\(error)") }

        let bytes = try parseRange(size: remote.size)
        let prefetcher = Prefetcher(source: source, bitmap: bitmap, cache: cache, imageSize: remote.size,
                                    maxConnections: o.http.maxConnections)
        var runs = prefetcher.missingRuns(in: bytes)
        if let p = bootProfile {
            // The profile's order, coalesced (BootProfile's REPLAY); only what is missing.
            let ps = UInt64(o.pageSize)
            runs = p.replayRanges(targetPageSize: o.pageSize, maxRunBytes: UInt64(prefetcher.maxRunBytes)).flatMap {
                prefetcher.missingRuns(in: $0.lowerBound * ps..<min($0.upperBound * ps, remote.size))
            }
        }
        let progress = Progress(total: prefetcher.byteCount(runs))
        defer { progress.finish() }
        do {
            try prefetcher.fetch(runs, received: { progress.add($0) }, tick: { progress.show() })
        } catch { throw Failure("\(error)") }
    }
}

/// A progress bar on a terminal (bytes, rate, ETA); a line every few seconds otherwise.
final class Progress {
    let total: UInt64
    var done: UInt64 = 0
    let start = monotonicNanos()
    var lastShown: UInt64 = 0
    let tty = isatty(2) != 0

    init(total: UInt64) { self.total = total }
    func add(_ n: UInt64) { done += n }

    func line() -> String {
        let secs = max(Double(monotonicNanos() - start) / 1e9, 0.001)
        let rate = Double(done) / secs
        let eta = rate > 0 ? Double(total - min(done, total)) / rate : 0
        let pct = total == 0 ? 100 : Int(Double(done) * 100 / Double(total))
        return "\(Size.format(done)) / \(Size.format(total)) (\(pct)%)  \(Size.format(UInt64(rate)))/s  ETA \(Int(eta))s"
    }

    func show() {
        let now = monotonicNanos()
        if tty {
            guard now - lastShown > 100_000_000 else { return }
            let width = 30
            let filled = total == 0 ? width : Int(Double(done) / Double(total) * Double(width))
            let bar = String(repeating: "#", count: min(filled, width)) + String(repeating: "-", count: max(0, width - filled))
            printError("\r[\(bar)] \(line())\u{1b}[K")
        } else {
            guard now - lastShown > 5_000_000_000 else { return }
            printError("prefetch: \(line())\n")
        }
        lastShown = now
    }

    func finish() {
        lastShown = 0
        if tty { show(); printError("\n") } else { printError("prefetch: \(line())\n") }
    }
}

/// Writes to stderr as is (no newline added).
func printError(_ s: String) {
    _ = s.withCString { Glibc.write(2, $0, strlen($0)) }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a cache's state as JSON: pages present, percent, validators, URL.",
        discussion: """
            Reads only the cache's files (and the page states a server of this
            boot left on /run); needs neither the network, root nor ublk_drv.
            With --cache, cache_file says whether the cache file belongs to the
            bitmap ("ok") or why not.
            """)

    @Option(name: .customLong("bitmap"), help: "The page bitmap file.")
    var bitmap: String

    @Option(name: .customLong("cache"), help: "The cache file (its allocated size is reported).")
    var cache: String?

    struct Output: Encodable {
        var url: String
        var etag: String?
        var lastModified: String?
        var pageSize: Int
        var imageSize: UInt64
        var pagesPresent: UInt64
        var pagesTotal: UInt64
        var percent: Double
        var cacheAllocatedBytes: UInt64?
        /// Pages in the companions, when they exist.
        var pagesDirty: UInt64?
        var pagesLocal: UInt64?
        var pagesWriteback: UInt64?
        /// "ok", or why the cache file does not belong to the bitmap (with --cache).
        var cacheFile: String?
        enum CodingKeys: String, CodingKey {
            case url, etag, lastModified = "last_modified", pageSize = "page_size", imageSize = "image_size"
            case pagesPresent = "pages_present", pagesTotal = "pages_total", percent
            case cacheAllocatedBytes = "cache_allocated_bytes"
            case pagesDirty = "pages_dirty", pagesLocal = "pages_local", pagesWriteback = "pages_writeback"
            case cacheFile = "cache_file"
        }
    }

    func run() throws {
        let store: CacheStore.Info
        do { store = try CacheStore.inspect(bitmapPath: bitmap, cachePath: cache, live: LiveConfig.system(required: false)) } catch {
            throw Failure("\(error)")
        }
        let info = store.present
        var allocated: UInt64?
        if let cache {
            var st = stat()
            guard stat(cache, &st) == 0 else { throw Failure("cannot read \(cache): \(Errno.current)") }
            allocated = UInt64(st.st_blocks) * 512
        }
        let total = info.identity.pageCount
        let pct = total == 0 ? 100 : (Double(info.present) * 10000 / Double(total)).rounded() / 100
        print(jsonLine(Output(url: info.identity.url, etag: info.identity.etag, lastModified: info.identity.lastModified,
                              pageSize: info.identity.pageSize, imageSize: info.identity.imageSize,
                              pagesPresent: info.present, pagesTotal: total, percent: pct,
                              cacheAllocatedBytes: allocated, pagesDirty: store.dirty, pagesLocal: store.local,
                              pagesWriteback: store.writeback, cacheFile: store.cacheFile)))
    }
}
