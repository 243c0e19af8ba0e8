// HTTPConfig and HTTPError: what an HTTP(S)/S3 range source is told, and the
// typed errors it reports (always with the URL, and the HTTP status if any).
import Glibc

public struct S3Config: Equatable, Sendable {
    /// Where requests go, e.g. "https://s3.eu-west-1.amazonaws.com" or "http://127.0.0.1:9000".
    public var endpoint: String
    public var region: String
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String?

    public init(endpoint: String, region: String, accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil) {
        self.endpoint = endpoint
        self.region = region
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
    }

    /// Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
    /// region from the argument, else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1;
    /// endpoint from the argument, else AWS_ENDPOINT_URL, else the regional AWS endpoint.
    /// Nil when the key pair is missing.
    public static func fromEnvironment(endpoint: String? = nil, region: String? = nil,
                                       environment: [String: String]? = nil) -> S3Config? {
        let env = environment ?? S3Config.processEnvironment()
        guard let key = env["AWS_ACCESS_KEY_ID"], !key.isEmpty,
              let secret = env["AWS_SECRET_ACCESS_KEY"], !secret.isEmpty else { return nil }
        let region = region ?? env["AWS_REGION"] ?? env["AWS_DEFAULT_REGION"] ?? "us-east-1"
        let endpoint = endpoint ?? env["AWS_ENDPOINT_URL"] ?? "https://s3.\(region).amazonaws.com"
        let token = env["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 }
        return S3Config(endpoint: endpoint, region: region, accessKeyID: key, secretAccessKey: secret, sessionToken: token)
    }

    static func processEnvironment() -> [String: String] {
        var out: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { out[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return out
    }

    /// `s3://BUCKET/KEY` → path-style `ENDPOINT/BUCKET/KEY`; nil if not an s3 URL.
    public func httpURL(for s3URL: String) -> String? {
        guard s3URL.hasPrefix("s3://") else { return nil }
        let rest = s3URL.dropFirst(5)
        guard let slash = rest.firstIndex(of: "/"), slash != rest.startIndex,
              rest.index(after: slash) != rest.endIndex else { return nil }
        var base = endpoint
        while base.hasSuffix("/") { base.removeLast() }
        return base + "/" + rest
    }
}

public struct HTTPConfig: Sendable {
    /// http://, https://, or s3://BUCKET/KEY (needs `s3`).
    public var url: String
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
    /// An attempt slower than `lowSpeedLimit` bytes/s for `lowSpeedTime` s is aborted (and retried).
    public var lowSpeedLimit = 1024
    public var lowSpeedTime = 20
    public var maxConnections = 8
    public var maxRedirects = 5
    /// Attempts per request, the first included.
    public var maxAttempts = 5
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

    /// The URL requests go to (s3:// mapped onto the endpoint).
    public var requestURL: String {
        if let s3, let mapped = s3.httpURL(for: url) { return mapped }
        return url
    }
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
        /// The data handler asked to stop.
        case aborted
        case cancelled
        /// Any other libcurl error.
        case transport(code: Int32)
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

    public var description: String {
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
        case .aborted: s = "aborted by the data handler"
        case .cancelled: s = "cancelled"
        case .transport(let c): s = "transfer failed (curl error \(c))"
        }
        if status != 0, case .status = reason {} else if status != 0 { s += " (HTTP \(status))" }
        if !detail.isEmpty { s += ": \(detail)" }
        if attempts > 1 { s += " after \(attempts) attempts" }
        return "\(url): \(s)"
    }
}
