import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

/// The http target's options, shared by `add -t http`, `prefetch` and `status`.
extension RedirectCredentials: ExpressibleByArgument {}

struct HTTPOptions: ParsableArguments {
    @Option(name: .customLong("url"), help: ArgumentHelp(
        "http(s)://HOST/PATH or s3://BUCKET/KEY of the disk image; again for each mirror.",
        discussion: """
            Given more than once (http(s) URLs only), the URLs are mirrors of one image, in order of \
            preference: each must serve the same size and ETag/Last-Modified (else `add` is refused; a mirror \
            that does not answer at `add` is used once it does), and every answer is checked against them. \
            A request goes to the first mirror that is up and not more than twice as slow as the fastest, and \
            moves once to a faster one after waiting twice that mirror's time; a mirror that fails (5xx, reset, refused), serves something else (404, another object) or sends \
            nothing for --mirror-stall seconds while requests wait on it is left at once, and the requests move \
            on, asking only for the bytes not yet received. The first URL names the image and its cache; the \
            credentials go to every mirror's origin. `stats` counts the moves as failovers.
            The image is the whole URL (every query parameter with its value, in the order given) minus what signs or expires it: \
            URLs that differ in a query value are different images, with their own caches; a presigned URL \
            signed again finds its cache (an ETag or Last-Modified that changed still starts it afresh). \
            Left out: X-Amz-* (AWS SigV4), X-Goog-* (Google Cloud Storage), Expires and Signature; with \
            Signature also AWSAccessKeyId, GoogleAccessId, Key-Pair-Id and Policy (AWS SigV2, GCS, CloudFront); \
            with sig the Azure SAS fields sv ss srt sr sp st se sip spr si sig sdd ses skoid sktid skt ske sks skv \
            skdutid saoid suoid sduoid scid rscc rscd rsce rscl rsct. Names are matched ignoring case. The \
            password is left out too. Query values are never recorded in clear: the identity shows them as \
            REDACTED plus a SHA-256 digest (e.g. https://h/download?id=REDACTED#sha256=...).
            """,
        valueName: "url"))
    var urls: [String] = []
    /// The image's URL (the first --url) and its mirrors (the others).
    var url: String? { urls.first }
    var mirrors: [String] { Array(urls.dropFirst()) }

    @Option(name: .customLong("mirror-stall"), help: ArgumentHelp(
        "With mirrors: seconds a mirror may send nothing while requests wait on it before they move to another.",
        valueName: "seconds"))
    var mirrorStall = HTTPConfig(url: "").stallTimeout

    @Option(name: .customLong("cache"), help: "The cache file (default: under /var/cache/ublk-http/, keyed by URL).")
    var cache: String?

    @Option(name: .customLong("bitmap"), help: "The page bitmap file (default: beside the cache file).")
    var bitmap: String?

    @Option(name: .customLong("page-size"), parsing: .unconditional, help: "Cache page size in bytes (power of two, 512-1M). An image may have 2^32 pages at most (16T at 4096).")
    var pageSize: Int = 4096

    @Option(name: .customLong("header"), help: "Extra request header 'Name: value' (repeatable). Other users can see it in the process list while `add` runs: put secrets in --header-file.")
    var headers: [String] = []

    @Option(name: .customLong("header-file"), help: ArgumentHelp(
        "Extra request headers from FILE: one 'Name: value' per line; empty lines and lines starting with # are skipped.",
        discussion: "The file must not be readable by its group or other users (chmod 600); its values are never printed, logged or passed on a command line. Read again by `recover`.",
        valueName: "file"))
    var headerFile: String?

    @Option(name: .customLong("user"), help: "User name for HTTP authentication (with --password-file).")
    var user: String?

    @Option(name: .customLong("password-file"), help: "A file holding the password (never on the command line; not readable by its group or other users: chmod 600).")
    var passwordFile: String?

    @Option(name: .customLong("redirect-credentials"), help: ArgumentHelp(
        "What a redirect to another host does with the credentials: drop (default) or refuse.",
        discussion: "Credentials are the --header and --header-file headers, --user/--password-file and S3 signing. They go only to the scheme, host and port of each --url (the image's and its mirrors'). A redirect elsewhere, or from https to http, is followed without them with drop (so an API that redirects to a presigned or CDN URL works), or fails the request with refuse. Every request starts again at --url.",
        valueName: "drop|refuse"))
    var redirectCredentials: RedirectCredentials = .drop

    @Option(name: .customLong("cacert"), help: "CA certificate bundle to verify the server with.")
    var cacert: String?

    @Flag(name: .customLong("insecure"), help: "Do not verify the server's TLS certificate.")
    var insecure = false

    @Option(name: .customLong("timeout"), parsing: .unconditional, help: "Seconds one request attempt may take (0.1-86400). Failed attempts (5xx, resets, timeouts, DNS and TLS handshake failures) are retried with backoff, 5 attempts in all.")
    var timeout: Double = 60

    @Option(name: .customLong("dns-cache"), parsing: .unconditional, help: "Seconds a resolved host name is reused before it is looked up again (0-86400; 0: every request looks it up). Lower it when the name's address changes for failover.")
    var dnsCache: Int = 60

    @Option(name: .customLong("connections"), parsing: .unconditional, help: "Connections at most (1-64); over HTTP/1.1 also the fetches in flight.")
    var connections: Int = 8

    @Option(name: .customLong("streams"), parsing: .unconditional, help: ArgumentHelp(
        "Fetches in flight at once where the server multiplexes them: HTTP/2 streams over the connections (1-256).",
        discussion: "HTTP/2 is asked for over https (ALPN); a server that answers the probe over HTTP/1.1 gets one fetch per connection (--connections) instead. `list` shows which: requests_in_flight."))
    var streams = HTTPConfig(url: "").maxStreams

    @Option(name: .customLong("readahead"), help: "Largest readahead window on sequential reads (K/M suffixes, at most 1G; 0 disables).")
    var readahead: String = "8M"

    @Flag(name: .customLong("writable"), help: "Make the cache a local overlay: writes stay local (tracked as dirty), the remote is never modified.")
    var writable = false

    @Option(name: .customLong("s3-endpoint"), help: "S3 endpoint URL for s3:// (default: AWS for --region). Credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), else the profile AWS_PROFILE (default: default) of AWS_SHARED_CREDENTIALS_FILE (default: ~/.aws/credentials).")
    var s3Endpoint: String?

    @Option(name: .customLong("region"), help: "S3 region.")
    var region: String?

    @Option(name: .customLong("verity-root"), help: ArgumentHelp(
        "A verified image: the root hash `veritysetup format` printed for it (hex).",
        discussion: "Every page fetched is checked against the image's dm-verity hash tree before it is kept, and every page the cache held before is checked again on its first read; a page that does not match is never served (the read fails with EIO). Get this value from a channel you trust: it is the only one trusted."))
    var verityRoot: String?

    @Option(name: .customLong("verity-tree"), help: ArgumentHelp(
        "The hash tree `veritysetup format IMAGE TREE` wrote: a URL (downloaded at add, kept beside the cache as CACHE.verity) or a local file.",
        valueName: "url-or-file"))
    var verityTree: String?

    @Option(name: .customLong("verity-offset"), help: ArgumentHelp(
        "Where the tree's superblock is, in bytes (veritysetup's --hash-offset). Without --verity-tree: the tree is appended to the image there, and the device is the data before it.",
        valueName: "bytes"))
    var verityOffset: String?

    /// Options only the http target takes (--cache, --bitmap and --page-size serve `cache` too).
    var httpOnlyGiven: Bool {
        url != nil || !headers.isEmpty || headerFile != nil || user != nil || passwordFile != nil
            || cacert != nil || insecure || s3Endpoint != nil || region != nil || writable
            || redirectCredentials != .drop || verityRoot != nil || verityTree != nil || verityOffset != nil || mirrorStall != HTTPConfig(url: "").stallTimeout || streams != HTTPConfig(url: "").maxStreams
    }

    /// Any http or caching option (the null and loop targets take none).
    var given: Bool { cache != nil || bitmap != nil || httpOnlyGiven }

    /// The fetch size (largest Range GET): a page must fit in one.
    static let maxRunBytes = HTTPTargetOptions(http: HTTPConfig(url: ""), cachePath: "", bitmapPath: "").maxRunBytes
    /// Largest --readahead.
    static let maxReadahead: UInt64 = 1 << 30
    /// Longest --timeout (a day) and shortest (libcurl counts milliseconds; 0 would mean "none").
    static let timeoutRange = 0.1...86400.0

    /// Checks for the http target (not `validate()`: ArgumentParser would run that for every target).
    func check() throws {
        guard let url else { throw Failure("the http target needs --url URL") }
        let lower = url.lowercased()
        guard lower.hasPrefix("http://") || lower.hasPrefix("https://") || lower.hasPrefix("s3://") else {
            throw Failure("bad --url '\(Redact.printable(Redact.url(url)))': expected http://, https:// or s3://")
        }
        if !mirrors.isEmpty, let bad = urls.first(where: { u in !["http://", "https://"].contains(where: { u.lowercased().hasPrefix($0) }) }) {
            throw Failure("bad --url '\(Redact.printable(Redact.url(bad)))': mirrors (--url given more than once) are http:// or https:// URLs")
        }
        if Set(urls).count < urls.count { throw Failure("a --url is given twice: each mirror once") }
        guard mirrorStall.isFinite, (0.05...3600).contains(mirrorStall) else {
            throw Failure("--mirror-stall must be between 0.05 and 3600 seconds, not \(mirrorStall)")
        }
        for (name, u) in urls.map({ ("--url", $0) }) + [("--s3-endpoint", s3Endpoint ?? "")] {
            for b in u.utf8 where b <= 0x20 || b == 0x7F {
                throw Failure(b == 0x0D || b == 0x0A ? "bad \(name): it contains a line break (CR or LF)"
                                                     : "bad \(name): it contains a space or a control character (percent-encode it)")
            }
        }
        if cacert != nil && insecure { throw Failure("--cacert and --insecure contradict each other") }
        if (user == nil) != (passwordFile == nil) { throw Failure("--user and --password-file go together") }
        guard (1...64).contains(connections) else { throw Failure("--connections must be between 1 and 64, not \(connections)") }
        guard (1...256).contains(streams) else { throw Failure("--streams must be between 1 and 256, not \(streams)") }
        guard HTTPOptions.timeoutRange.contains(timeout) else {
            throw Failure("--timeout must be between \(HTTPOptions.timeoutRange.lowerBound) and \(Int(HTTPOptions.timeoutRange.upperBound)) seconds, not \(timeout)")
        }
        guard (0...86400).contains(dnsCache) else { throw Failure("--dns-cache must be between 0 and 86400 seconds, not \(dnsCache)") }
        guard let ra = Size.parse(readahead), ra <= HTTPOptions.maxReadahead else {
            throw Failure("bad --readahead '\(Redact.printable(readahead))': expected a size from 0 to 1G")
        }
        try checkPageSize()
        for h in headers {
            if let why = HTTPHeader.problem(h) { throw Failure("bad --header '\(HTTPHeader.name(h))': \(why)") }
        }
        if let u = user, u.utf8.contains(where: { $0 < 0x20 || $0 == 0x7F }) { throw Failure("bad --user: it contains a control character") }
        _ = try readHeaderFile()
        _ = try readPassword()
        if let c = cacert, access(c, R_OK) != 0 { throw Failure("cannot read --cacert \(c): \(Errno.current)") }
        _ = try veritySpec()
    }

    /// `--verity-*`, checked (nil: not a verified image).
    func veritySpec() throws -> VeritySpec? {
        guard let root = verityRoot else {
            if verityTree != nil || verityOffset != nil { throw Failure("--verity-tree and --verity-offset need --verity-root (the root hash)") }
            return nil
        }
        guard let bytes = VerityTree.hex(root), bytes.count >= 16 else {
            throw Failure("bad --verity-root '\(Redact.printable(root))': expected the hex digits of the root hash veritysetup printed")
        }
        var offset: UInt64?
        if let o = verityOffset {
            guard let v = Size.parse(o), v % 512 == 0 else {
                throw Failure("bad --verity-offset '\(Redact.printable(o))': expected a byte offset, a multiple of 512")
            }
            offset = v
        }
        if verityTree == nil && offset == nil {
            throw Failure("--verity-root needs --verity-tree (a URL or a file), or --verity-offset for a tree appended to the image")
        }
        if let t = verityTree, !t.lowercased().hasPrefix("http://"), !t.lowercased().hasPrefix("https://"),
           !t.lowercased().hasPrefix("s3://"), access(t, R_OK) != 0 {
            throw Failure("cannot read --verity-tree \(t): \(Errno.current)")
        }
        return VeritySpec(rootHex: root, tree: verityTree, offset: offset)
    }

    /// --page-size: a power of two from 512 to 1M, and never above the fetch size.
    func checkPageSize() throws {
        guard pageSize >= 512, pageSize <= 1 << 20, pageSize.nonzeroBitCount == 1, pageSize <= HTTPOptions.maxRunBytes else {
            throw Failure("--page-size must be a power of two between 512 and 1M (and at most the \(HTTPOptions.maxRunBytes >> 20)M fetch size), not \(pageSize)")
        }
    }

    /// The lines of --header-file; nil without one.
    func readHeaderFile() throws -> [String]? {
        guard let path = headerFile else { return nil }
        let text = try HTTPOptions.readSecretFile(path, option: "--header-file")
        do { return try HTTPHeader.parseFile(text) } catch { throw Failure("--header-file \(path) \(error)") }
    }

    /// The password of --password-file, trimmed; nil without one.
    func readPassword() throws -> String? {
        guard let path = passwordFile else { return nil }
        let password = try HTTPOptions.readSecretFile(path, option: "--password-file").trimmed
        if password.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) {
            throw Failure("--password-file \(path): the password is one line")
        }
        return password
    }

    /// A file of secrets: a regular file of at most 64K that neither its group nor other users can read.
    static func readSecretFile(_ path: String, option: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure("cannot read \(option) \(path): \(Errno.current)") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw Failure("cannot read \(option) \(path): \(Errno.current)") }
        guard st.st_mode & S_IFMT == S_IFREG else { throw Failure("\(option) \(path) is not a regular file") }
        if st.st_mode & 0o044 != 0 {
            let who = st.st_mode & 0o004 != 0 ? "every user" : "its group"
            throw Failure("\(option) \(path) is readable by \(who) (mode \(String(st.st_mode & 0o777, radix: 8))): chmod 600 it")
        }
        guard st.st_size <= 64 << 10 else { throw Failure("\(option) \(path) is larger than 64K") }
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { data += buf[0..<n]; if data.count > 64 << 10 { throw Failure("\(option) \(path) is larger than 64K") } }
            else if n < 0 && errno == EINTR { continue }
            else if n < 0 { throw Failure("cannot read \(option) \(path): \(Errno.current)") }
            else { break }
        }
        return String(decoding: data, as: UTF8.self)
    }

    static let cacheDirectory = "/var/cache/ublk-http"

    /// Default cache and bitmap paths: a readable name from the URL plus a hash
    /// (FNV-1a 64: a file name, not a check; the bitmap header holds the
    /// identity itself) of the image's identity (`ImageIdentity`): URLs that
    /// differ in a query value get their own files, a presigned URL signed
    /// again finds the same ones (ETag and Last-Modified tell a changed
    /// object), and a plain URL keeps the name it always had.
    static func defaultPaths(for url: String) -> (cache: String, bitmap: String) {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in HTTPTarget.identityURL(url).utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
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
        config.mirrors = mirrors
        config.stallTimeout = mirrorStall
        config.headers = headers.map { h in
            let colon = h.firstIndex(of: ":")!  // check() made sure
            return String(h[..<colon]) + ": " + h[h.index(after: colon)...].trimmed
        } + (try readHeaderFile() ?? [])
        config.caCertPath = cacert
        config.insecure = insecure
        config.requestTimeout = timeout
        config.dnsCacheSeconds = dnsCache
        config.maxConnections = connections
        config.maxStreams = streams
        config.redirectCredentials = redirectCredentials
        // One bit per page in memory: 2^32 pages (512 MiB of bitmap) at most.
        config.maxImageSize = UInt64(pageSize) << 32
        if let user, let password = try readPassword() {
            config.username = user
            config.password = password
        }
        if url.lowercased().hasPrefix("s3://") {
            guard let s3 = S3Config.fromEnvironment(endpoint: s3Endpoint, region: region) else {
                let file = S3Config.credentialsFilePath(environment: ProcessInfo.processInfo.environment) ?? "~/.aws/credentials"
                let profile = ProcessInfo.processInfo.environment["AWS_PROFILE"].flatMap { $0.isEmpty ? nil : $0 } ?? "default"
                throw Failure("s3:// needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put aws_access_key_id and aws_secret_access_key under [\(profile)] in \(file)")
            }
            config.s3 = s3
        }
        if let why = config.problem { throw Failure(why) }
        let defaults = HTTPOptions.defaultPaths(for: url)
        let cachePath = cache ?? defaults.cache
        let bitmapPath = bitmap ?? (cache.map { $0 + ".bitmap" } ?? defaults.bitmap)
        if cache == nil || bitmap == nil { mkdir(HTTPOptions.cacheDirectory, 0o700) }
        var o = HTTPTargetOptions(http: config, cachePath: cachePath, bitmapPath: bitmapPath)
        o.pageSize = pageSize
        o.readaheadBytes = Int(Size.parse(readahead) ?? 0)  // at most 1G: check()
        o.writable = writable
        o.verity = try veritySpec()
        return o
    }
}
