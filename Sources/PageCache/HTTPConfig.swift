// HTTPConfig and HTTPError: what an HTTP(S)/S3 range source is told, and the
// typed errors it reports (always with the URL, and the HTTP status if any).
// `HTTPConfig.problem` refuses what cannot be sent or used (line breaks,
// numbers libcurl's options or the retry timer cannot take); S3 credentials
// are in S3Config.swift, what may be shown of secrets in Redact.swift.
import Glibc

public struct HTTPConfig: Sendable {
    /// http://, https://, or s3://BUCKET/KEY (needs `s3`).
    public var url: String
    /// Other http(s) URLs of the same image (mirrors), after `url` in order
    /// of preference; each must serve the same size and validators
    /// (HTTPSourceMirrors.swift). The credentials go to each one's origin.
    public var mirrors: [String] = []
    /// With mirrors: seconds a mirror with requests in flight may send no
    /// byte before they move to another.
    public var stallTimeout: Double = 0.5
    /// Extra request headers, "Name: value".
    public var headers: [String] = []
    public var username: String?
    /// Read from a file by the caller, never taken from a command line.
    public var password: String?
    public var caCertPath: String?
    /// Skip TLS peer and host verification.
    public var insecure = false
    /// Seconds.
    public var connectTimeout: Double = 10
    /// Seconds for one attempt of one request, whole body included (0: no limit;
    /// stalls are still caught by the low-speed limit). 60 s allows a 4 MiB run
    /// down to ~70 KB/s.
    public var requestTimeout: Double = 60
    /// Seconds a resolved host name is reused (libcurl's DNS cache; 0: not at all).
    public var dnsCacheSeconds = 60
    /// An attempt slower than `lowSpeedLimit` bytes/s for `lowSpeedTime` s is aborted (and retried).
    public var lowSpeedLimit = 1024
    public var lowSpeedTime = 20
    public var maxConnections = 8
    /// Requests in flight at once when the server multiplexes them (HTTP/2
    /// streams over the connections); over HTTP/1.1, one per connection.
    public var maxStreams = 32
    public var maxRedirects = 5
    /// What a redirect to another origin (scheme, host or port differ from the
    /// URL's) or from https to http does with the credentials: the headers,
    /// the user name and password, S3 signing (see `HTTPSource`).
    public var redirectCredentials = RedirectCredentials.drop
    /// Attempts per request, the first included.
    public var maxAttempts = 5
    /// The largest image the probe accepts (a bitmap has one bit per page in
    /// memory: the caller sets pageSize << 32). Larger is `.imageTooLarge`.
    public var maxImageSize = UInt64(Int64.max)
    /// Seconds before the first retry; doubles per retry, up to `retryMaxDelay`.
    public var retryBaseDelay: Double = 0.2
    public var retryMaxDelay: Double = 10
    /// HTTP/2 over TLS when the server offers it; HTTP/1.1 otherwise.
    public var http2 = true
    public var userAgent = "ublk-http"
    public var s3: S3Config?
    /// libcurl's own trace on stderr.
    public var verbose = false

    public init(url: String) { self.url = url }

    /// Why this configuration cannot be used, or nil. Keeps every number within
    /// what libcurl's options and the retry timer take (no trap converting them).
    public var problem: String? {
        for (name, u) in [("URL", url), ("S3 endpoint", s3?.endpoint ?? "")] + mirrors.map({ ("mirror URL", $0) }) {
            for b in u.utf8 where b <= 0x20 || b == 0x7F {
                return b == 0x0D || b == 0x0A ? "the \(name) contains a line break (CR or LF)"
                    : "the \(name) contains a space or a control character (percent-encode it)"
            }
        }
        for h in headers { if let why = HTTPHeader.problem(h) { return "header \(HTTPHeader.name(h)): \(why)" } }
        for (name, v) in [("user name", username ?? ""), ("password", password ?? ""), ("session token", s3?.sessionToken ?? "")] {
            if v.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) { return "the \(name) contains a line break" }
        }
        func seconds(_ v: Double, _ name: String, zeroAllowed: Bool) -> String? {
            v.isFinite && (v >= 0.001 || (zeroAllowed && v == 0)) && v <= 1e6 ? nil
                : "\(name) must be \(zeroAllowed ? "0 or " : "")between 0.001 and 1000000 seconds, not \(v)"
        }
        if let why = seconds(requestTimeout, "the request timeout", zeroAllowed: true)
            ?? seconds(connectTimeout, "the connect timeout", zeroAllowed: false)
            ?? seconds(stallTimeout, "the mirror stall time", zeroAllowed: false) { return why }
        for m in mirrors where !(m.lowercased().hasPrefix("http://") || m.lowercased().hasPrefix("https://")) {
            return "a mirror must be an http:// or https:// URL, not \(Redact.url(m))"
        }
        if !mirrors.isEmpty && s3 != nil { return "mirrors are http(s) URLs of one object; an s3:// URL takes none" }
        if !(retryBaseDelay.isFinite && retryBaseDelay >= 0 && retryBaseDelay <= 1e6
             && retryMaxDelay.isFinite && retryMaxDelay >= 0 && retryMaxDelay <= 1e6) {
            return "retry delays must be between 0 and 1000000 seconds"
        }
        if !(0...86400).contains(dnsCacheSeconds) { return "the DNS cache time must be between 0 and 86400 seconds, not \(dnsCacheSeconds)" }
        if !(1...1024).contains(maxConnections) { return "connections must be between 1 and 1024, not \(maxConnections)" }
        if !(1...1024).contains(maxStreams) { return "streams must be between 1 and 1024, not \(maxStreams)" }
        if !(1...100).contains(maxAttempts) { return "attempts must be between 1 and 100, not \(maxAttempts)" }
        if !(0...100).contains(maxRedirects) || lowSpeedLimit < 0 || !(0...1_000_000).contains(lowSpeedTime) {
            return "redirects, low-speed limit or low-speed time out of range"
        }
        return nil
    }

    /// The URL requests go to (s3:// mapped onto the endpoint).
    public var requestURL: String {
        if let s3, let mapped = s3.httpURL(for: url) { return mapped }
        return url
    }
}

/// What a redirect that leaves the URL's origin does while credentials are attached.
public enum RedirectCredentials: String, CaseIterable, Sendable {
    /// Follow it without them (a presigned or CDN URL on another host works).
    case drop
    /// Fail the request (`HTTPError.Reason.redirectRefused`).
    case refuse
}

/// What a probe learned about the remote image.
public struct RemoteImage: Equatable, Sendable {
    /// The URL after redirects.
    public var effectiveURL: String
    public var size: UInt64
    public var etag: String?
    public var lastModified: String?
    /// Whether the probe's answer came from HEAD (else from a 1-byte Range GET).
    public var fromHead: Bool
    /// Whether the server answered the probe over HTTP/2 or 3, which multiplex
    /// requests on a connection (not part of the image: left out of ==).
    public var multiplexed = false

    /// Requests a source of `config` keeps in flight against this server.
    public func requestsInFlight(_ config: HTTPConfig) -> Int { multiplexed ? config.maxStreams : config.maxConnections }

    public static func == (a: RemoteImage, b: RemoteImage) -> Bool {
        a.effectiveURL == b.effectiveURL && a.size == b.size && a.etag == b.etag
            && a.lastModified == b.lastModified && a.fromHead == b.fromHead
    }

    public init(effectiveURL: String, size: UInt64, etag: String? = nil, lastModified: String? = nil, fromHead: Bool = true) {
        self.effectiveURL = effectiveURL
        self.size = size
        self.etag = etag
        self.lastModified = lastModified
        self.fromHead = fromHead
    }
}

public struct HTTPError: Error, Equatable, CustomStringConvertible, Sendable {
    public enum Reason: Equatable, Sendable {
        /// An HTTP status that is not an answer (404, 403, 416, 5xx after the last retry...).
        case status(Int)
        /// 200 to a Range request: the server ignores Range.
        case rangeIgnored
        /// A 206 whose Content-Range is not the range asked for.
        case rangeMismatch(expected: String, got: String?)
        /// The total in Content-Range differs from the probed size.
        case sizeChanged(expected: UInt64, got: UInt64)
        /// ETag or Last-Modified differs from the probed one: the image changed.
        case validatorChanged(expected: String, got: String)
        /// The body ended before the range did (after the last retry).
        case shortBody(expected: Int, got: Int)
        /// Neither Content-Length nor Content-Range gave a size.
        case noSize
        /// Refused, unreachable, or the name did not resolve.
        case connectFailed
        /// TLS handshake or certificate verification.
        case tls
        case timedOut
        case tooManyRedirects
        /// A redirect not followed: to a scheme other than http(s), or (with
        /// `RedirectCredentials.refuse`) to another origin while credentials were attached.
        case redirectRefused(String)
        /// The data handler asked to stop.
        case aborted
        case cancelled
        /// Any other libcurl error.
        case transport(code: Int32)
        /// The image is larger than `HTTPConfig.maxImageSize`.
        case imageTooLarge(size: UInt64, limit: UInt64)
        /// A mirror serves another size or validators than the URL before it (`other`).
        case mirrorDisagrees(other: String, String)
        /// The configuration cannot be used: a line break in a header or the URL, a
        /// timeout that is not a finite number of seconds... (see `HTTPConfig.problem`).
        case invalidConfig(String)
    }

    public var reason: Reason
    public var url: String
    /// The last HTTP status seen (0: none).
    public var status: Int
    /// libcurl's message, if any.
    public var detail: String
    public var attempts: Int

    public init(_ reason: Reason, url: String, status: Int = 0, detail: String = "", attempts: Int = 1) {
        self.reason = reason
        self.url = url
        self.status = status
        self.detail = detail
        self.attempts = attempts
    }

    /// The errno a block I/O failing on this should carry.
    public var errno: Int32 {
        switch reason {
        case .timedOut: return ETIMEDOUT
        case .cancelled: return ECANCELED
        default: return EIO
        }
    }

    public var description: String { "\(Redact.url(url)): \(reasonText)" }

    /// What went wrong, without the URL.
    public var reasonText: String {
        var s: String
        switch reason {
        case .status(let c): s = "HTTP \(c)"
        case .rangeIgnored: s = "server ignores Range requests (answered 200 to a Range GET)"
        case .rangeMismatch(let x, let g): s = "wrong Content-Range \(g ?? "(none)"), expected \(x)"
        case .sizeChanged(let x, let g): s = "image size changed from \(x) to \(g)"
        case .validatorChanged(let x, let g): s = "image changed on the server (validator \(x) became \(g))"
        case .shortBody(let x, let g): s = "short body: \(g) of \(x) bytes"
        case .noSize: s = "server did not tell the size"
        case .connectFailed: s = "cannot connect"
        case .tls: s = "TLS failure"
        case .timedOut: s = "timed out"
        case .tooManyRedirects: s = "too many redirects"
        case .redirectRefused(let why): s = "redirect refused: \(why)"
        case .aborted: s = "aborted by the data handler"
        case .cancelled: s = "cancelled"
        case .transport(let c): s = "transfer failed (curl error \(c))"
        case .imageTooLarge(let size, let limit):
            s = "the image has \(size) bytes, more than the \(limit) a cache of this page size can address (use a larger --page-size)"
        case .invalidConfig(let why): s = why
        case .mirrorDisagrees(let other, let why): s = "serves another object than \(other) (\(why)): mirrors must serve the same size and validators"
        }
        if status != 0, case .status = reason {} else if status != 0 { s += " (HTTP \(status))" }
        if !detail.isEmpty { s += ": \(Redact.text(detail))" }
        if attempts > 1 { s += " after \(attempts) attempts" }
        return s
    }
}
