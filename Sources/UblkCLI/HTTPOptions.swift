import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

/// The http target's options, shared by `add -t http`, `prefetch` and `status`.
struct HTTPOptions: ParsableArguments {
    @Option(name: .customLong("url"), help: "http(s)://HOST/PATH or s3://BUCKET/KEY of the disk image.")
    var url: String?

    @Option(name: .customLong("cache"), help: "The cache file (default: under /var/cache/ublk-http/, keyed by URL).")
    var cache: String?

    @Option(name: .customLong("bitmap"), help: "The page bitmap file (default: beside the cache file).")
    var bitmap: String?

    @Option(name: .customLong("page-size"), help: "Cache page size in bytes (power of two, 512-1M).")
    var pageSize: Int = 4096

    @Option(name: .customLong("header"), help: "Extra request header 'Name: value' (repeatable).")
    var headers: [String] = []

    @Option(name: .customLong("user"), help: "User name for HTTP authentication (with --password-file).")
    var user: String?

    @Option(name: .customLong("password-file"), help: "A file holding the password (never on the command line).")
    var passwordFile: String?

    @Option(name: .customLong("cacert"), help: "CA certificate bundle to verify the server with.")
    var cacert: String?

    @Flag(name: .customLong("insecure"), help: "Do not verify the server's TLS certificate.")
    var insecure = false

    @Option(name: .customLong("timeout"), help: "Seconds one request attempt may take.")
    var timeout: Double = 60

    @Option(name: .customLong("connections"), help: "Connections (and fetches in flight) at most.")
    var connections: Int = 8

    @Option(name: .customLong("readahead"), help: "Largest readahead window on sequential reads (K/M suffixes; 0 disables).")
    var readahead: String = "8M"

    @Flag(name: .customLong("writable"), help: "Make the cache a local overlay: writes stay local (tracked as dirty), the remote is never modified.")
    var writable = false

    @Option(name: .customLong("s3-endpoint"), help: "S3 endpoint URL for s3:// (default: AWS for --region).")
    var s3Endpoint: String?

    @Option(name: .customLong("region"), help: "S3 region.")
    var region: String?

    /// Options only the http target takes (--cache, --bitmap and --page-size serve `cache` too).
    var httpOnlyGiven: Bool {
        url != nil || !headers.isEmpty || user != nil || passwordFile != nil
            || cacert != nil || insecure || s3Endpoint != nil || region != nil || writable
    }

    var given: Bool {
        url != nil || cache != nil || bitmap != nil || !headers.isEmpty || user != nil || passwordFile != nil
            || cacert != nil || insecure || s3Endpoint != nil || region != nil || writable
    }

    /// Checks for the http target (not `validate()`: ArgumentParser would run that for every target).
    func check() throws {
        guard let url else { throw Failure("the http target needs --url URL") }
        let lower = url.lowercased()
        guard lower.hasPrefix("http://") || lower.hasPrefix("https://") || lower.hasPrefix("s3://") else {
            throw Failure("bad --url '\(url)': expected http://, https:// or s3://")
        }
        if cacert != nil && insecure { throw Failure("--cacert and --insecure contradict each other") }
        if (user == nil) != (passwordFile == nil) { throw Failure("--user and --password-file go together") }
        guard (1...64).contains(connections) else { throw Failure("--connections must be between 1 and 64") }
        guard timeout > 0 else { throw Failure("--timeout must be positive") }
        guard Size.parse(readahead) != nil else { throw Failure("bad --readahead '\(readahead)'") }
        for h in headers where !h.contains(":") { throw Failure("bad --header '\(h)': expected 'Name: value'") }
        if let c = cacert, access(c, R_OK) != 0 { throw Failure("cannot read --cacert \(c): \(Errno.current)") }
    }

    static let cacheDirectory = "/var/cache/ublk-http"

    /// Default cache and bitmap paths: a readable name from the URL plus a hash of the whole URL.
    static func defaultPaths(for url: String) -> (cache: String, bitmap: String) {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in url.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        let last = url.split(separator: "?").first.map { String($0) } ?? url
        let name = String((last.split(separator: "/").last.map(String.init) ?? "image")
            .map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_" ? $0 : "_" }.prefix(48))
        let hex = String(h, radix: 16)
        let base = "\(cacheDirectory)/\(name)-\(String(repeating: "0", count: 16 - hex.count))\(hex)"
        return (base + ".cache", base + ".bitmap")
    }

    func targetOptions() throws -> HTTPTargetOptions {
        guard let url else { throw Failure("the http target needs --url URL") }
        var config = HTTPConfig(url: url)
        config.headers = headers
        config.caCertPath = cacert
        config.insecure = insecure
        config.requestTimeout = timeout
        config.maxConnections = connections
        if let user, let passwordFile {
            guard let data = FileManager.default.contents(atPath: passwordFile) else {
                throw Failure("cannot read --password-file \(passwordFile)")
            }
            config.username = user
            config.password = String(decoding: data, as: UTF8.self).trimmed
        }
        if url.lowercased().hasPrefix("s3://") {
            guard let s3 = S3Config.fromEnvironment(endpoint: s3Endpoint, region: region) else {
                throw Failure("s3:// needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            }
            config.s3 = s3
        }
        let defaults = HTTPOptions.defaultPaths(for: url)
        let cachePath = cache ?? defaults.cache
        let bitmapPath = bitmap ?? (cache.map { $0 + ".bitmap" } ?? defaults.bitmap)
        if cache == nil || bitmap == nil { mkdir(HTTPOptions.cacheDirectory, 0o700) }
        var o = HTTPTargetOptions(http: config, cachePath: cachePath, bitmapPath: bitmapPath)
        o.pageSize = pageSize
        o.readaheadBytes = Int(Size.parse(readahead) ?? 0)
        o.writable = writable
        return o
    }
}
