// HTTPConfig and HTTPError: what an HTTP(S)/S3 range source is told, and the
// typed errors it reports (always with the URL, and the HTTP status if any).
//
// Secrets (header values, passwords, a presigned URL's query string) live only
// in memory: `HTTPError.description` shows URLs through `Redact.url`, and
// `Redact` is what every log line, state file and listing goes through.
// Header lines are checked by `HTTPHeader.problem` (no CR, LF or other control
// characters: a line break in a value would inject headers).
import CLibcrypto
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

    /// Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN;
    /// when that pair is absent, from the shared credentials file
    /// (`credentialsFilePath`) under the profile AWS_PROFILE (default "default"):
    /// aws_access_key_id, aws_secret_access_key, aws_session_token.
    /// Region from the argument, else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1;
    /// endpoint from the argument, else AWS_ENDPOINT_URL, else the regional AWS endpoint.
    /// Nil when no key pair is found.
    public static func fromEnvironment(endpoint: String? = nil, region: String? = nil,
                                       environment: [String: String]? = nil) -> S3Config? {
        let env = environment ?? S3Config.processEnvironment()
        var key = env["AWS_ACCESS_KEY_ID"] ?? "", secret = env["AWS_SECRET_ACCESS_KEY"] ?? ""
        var token = env["AWS_SESSION_TOKEN"]
        if key.isEmpty || secret.isEmpty {
            guard let path = credentialsFilePath(environment: env, useAccountHome: environment == nil),
                  let text = readSmallFile(path) else { return nil }
            let profile = (env["AWS_PROFILE"].flatMap { $0.isEmpty ? nil : $0 }) ?? "default"
            guard let section = parseINI(text)[profile] else { return nil }
            key = section["aws_access_key_id"] ?? ""
            secret = section["aws_secret_access_key"] ?? ""
            token = section["aws_session_token"]
            guard !key.isEmpty, !secret.isEmpty else { return nil }
        }
        let region = region ?? env["AWS_REGION"] ?? env["AWS_DEFAULT_REGION"] ?? "us-east-1"
        let endpoint = endpoint ?? env["AWS_ENDPOINT_URL"] ?? "https://s3.\(region).amazonaws.com"
        return S3Config(endpoint: endpoint, region: region, accessKeyID: key, secretAccessKey: secret,
                        sessionToken: token.flatMap { $0.isEmpty ? nil : $0 })
    }

    /// AWS_SHARED_CREDENTIALS_FILE, else $HOME/.aws/credentials (the account's home
    /// directory when HOME is unset and `useAccountHome`).
    public static func credentialsFilePath(environment env: [String: String], useAccountHome: Bool = true) -> String? {
        if let f = env["AWS_SHARED_CREDENTIALS_FILE"], !f.isEmpty { return f }
        var home = env["HOME"] ?? ""
        if home.isEmpty && useAccountHome, let pw = getpwuid(geteuid()), let dir = pw.pointee.pw_dir {
            home = String(cString: dir)
        }
        return home.isEmpty ? nil : home + "/.aws/credentials"
    }

    /// An INI file as the AWS tools write it: `[section]`, `key = value`, comments
    /// starting with # or ;. Keys are lowercased; later keys win; lines outside a
    /// section and lines without '=' are ignored.
    public static func parseINI(_ text: String) -> [String: [String: String]] {
        var out: [String: [String: String]] = [:]
        var section: String?
        for raw in text.split(omittingEmptySubsequences: true, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" }) {
            let line = raw.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                let name = String(line.dropFirst().dropLast()).trimmingWhitespace()
                section = name
                if out[name] == nil { out[name] = [:] }
                continue
            }
            guard let section, let eq = line.firstIndex(of: "=") else { continue }
            let k = line[..<eq].trimmingWhitespace().lowercased()
            let v = line[line.index(after: eq)...].trimmingWhitespace()
            out[section]?[k] = v
        }
        return out
    }

    /// A file's text, or nil (missing, unreadable, or larger than 1 MiB).
    static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { data += buf[0..<n]; if data.count > 1 << 20 { return nil } }
            else if n < 0 && errno == EINTR { continue }
            else if n < 0 { return nil }
            else { break }
        }
        return String(decoding: data, as: UTF8.self)
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
    /// Seconds a resolved host name is reused (libcurl's DNS cache; 0: not at all).
    public var dnsCacheSeconds = 60
    /// An attempt slower than `lowSpeedLimit` bytes/s for `lowSpeedTime` s is aborted (and retried).
    public var lowSpeedLimit = 1024
    public var lowSpeedTime = 20
    public var maxConnections = 8
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
        for (name, u) in [("URL", url), ("S3 endpoint", s3?.endpoint ?? "")] {
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
            ?? seconds(connectTimeout, "the connect timeout", zeroAllowed: false) { return why }
        if !(retryBaseDelay.isFinite && retryBaseDelay >= 0 && retryBaseDelay <= 1e6
             && retryMaxDelay.isFinite && retryMaxDelay >= 0 && retryMaxDelay <= 1e6) {
            return "retry delays must be between 0 and 1000000 seconds"
        }
        if !(0...86400).contains(dnsCacheSeconds) { return "the DNS cache time must be between 0 and 86400 seconds, not \(dnsCacheSeconds)" }
        if !(1...1024).contains(maxConnections) { return "connections must be between 1 and 1024, not \(maxConnections)" }
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
        case .redirectRefused(let why): s = "redirect refused: \(why)"
        case .aborted: s = "aborted by the data handler"
        case .cancelled: s = "cancelled"
        case .transport(let c): s = "transfer failed (curl error \(c))"
        case .imageTooLarge(let size, let limit):
            s = "the image has \(size) bytes, more than the \(limit) a cache of this page size can address (use a larger --page-size)"
        case .invalidConfig(let why): s = why
        }
        if status != 0, case .status = reason {} else if status != 0 { s += " (HTTP \(status))" }
        if !detail.isEmpty { s += ": \(Redact.text(detail))" }
        if attempts > 1 { s += " after \(attempts) attempts" }
        return "\(Redact.url(url)): \(s)"
    }
}

/// Header lines as the command line and header files give them.
public enum HTTPHeader {
    /// Why `line` cannot be sent as a request header, or nil when it can. Never
    /// quotes the value (it may be a secret).
    public static func problem(_ line: String) -> String? {
        guard let colon = line.firstIndex(of: ":") else { return "expected 'Name: value'" }
        let name = line[..<colon]
        guard !name.isEmpty else { return "the header name is empty" }
        let tchar = Set("!#$%&'*+-.^_`|~".utf8)
        for b in name.utf8 where !(tchar.contains(b) || (b >= 0x30 && b <= 0x39) || (b | 0x20 >= 0x61 && b | 0x20 <= 0x7A)) {
            return "the header name '\(Redact.printable(String(name)))' has a character not allowed in a name"
        }
        for b in line[line.index(after: colon)...].utf8 {
            if b == 0x0D || b == 0x0A { return "the value of '\(name)' contains a line break (CR or LF)" }
            if (b < 0x20 && b != 0x09) || b == 0x7F { return "the value of '\(name)' contains a control character" }
        }
        return nil
    }

    /// The name of a header line (for messages that must not show its value).
    public static func name(_ line: String) -> String {
        Redact.printable(String(line.prefix { $0 != ":" }.prefix(64)))
    }

    /// A header file: one `Name: value` per line; empty lines and lines starting
    /// with '#' are skipped. Throws a message naming the line, never its value.
    public static func parseFile(_ text: String) throws(HeaderFileError) -> [String] {
        var out: [String] = []
        var number = 0
        // Split on LF only: a CR left in a line is refused below, not taken as a line end.
        for raw in text.utf8.split(separator: 0x0A, omittingEmptySubsequences: false) {
            number += 1
            let line = String(decoding: raw, as: UTF8.self)
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) || line.hasPrefix("#") { continue }
            if let why = problem(line) {
                let hint = line.hasSuffix("\r") ? " (Windows line endings? one header per LF-terminated line)" : ""
                throw HeaderFileError(line: number, message: why + hint)
            }
            let colon = line.firstIndex(of: ":")!
            out.append(String(line[..<colon]) + ": " + line[line.index(after: colon)...].trimmingWhitespace())
        }
        return out
    }
}

public struct HeaderFileError: Error, CustomStringConvertible, Sendable {
    public var line: Int
    public var message: String
    public var description: String { "line \(line): \(message)" }
}

/// What may be shown of secrets: URLs without their query values or password,
/// header lines without their values.
public enum Redact {
    public static let placeholder = "REDACTED"

    /// `scheme://user:REDACTED@host/path?key=REDACTED&flag=REDACTED#fragment`.
    public static func url(_ u: String) -> String {
        var rest = Substring(u)
        var out = ""
        if let colon = rest.firstIndex(of: ":"), rest[colon...].hasPrefix("://"),
           !rest[..<colon].contains(where: { $0 == "/" || $0 == "?" }) {
            let hostStart = rest.index(colon, offsetBy: 3)
            out += rest[..<hostStart]
            rest = rest[hostStart...]
            let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
            let authority = rest[..<authorityEnd]
            if let at = authority.lastIndex(of: "@") {
                let user = authority[..<at]
                if let colon = user.firstIndex(of: ":") {
                    out += user[..<colon] + ":" + placeholder
                } else {
                    out += user
                }
                out += authority[at...]
            } else {
                out += authority
            }
            rest = rest[authorityEnd...]
        }
        guard let q = rest.firstIndex(of: "?") else { return out + rest }
        out += rest[...q]
        let afterQ = rest[rest.index(after: q)...]
        let fragmentStart = afterQ.firstIndex(of: "#") ?? afterQ.endIndex
        let pairs = afterQ[..<fragmentStart].split(separator: "&", omittingEmptySubsequences: false).map { pair -> String in
            if pair.isEmpty { return "" }
            if let eq = pair.firstIndex(of: "=") { return pair[..<eq] + "=" + placeholder }
            return placeholder
        }
        return out + pairs.joined(separator: "&") + afterQ[fragmentStart...]
    }

    /// `text` with every URL in it (scheme://... up to white space or a quote) redacted.
    public static func text(_ text: String) -> String {
        guard text.contains("://") else { return text }
        let chars = Array(text)
        var out = ""
        var i = 0
        while i < chars.count {
            // A URL starts at a scheme ([A-Za-z][A-Za-z0-9+.-]*) followed by "://".
            if chars[i].isASCII && chars[i].isLetter && (i == 0 || !isSchemeChar(chars[i - 1])) {
                var j = i
                while j < chars.count && isSchemeChar(chars[j]) { j += 1 }
                if j + 2 < chars.count && chars[j] == ":" && chars[j + 1] == "/" && chars[j + 2] == "/" {
                    var end = j + 3
                    while end < chars.count && !ends(chars[end]) { end += 1 }
                    // Sentence punctuation after a URL is not part of it.
                    while end > j + 3 && ".,:;)!".contains(chars[end - 1]) { end -= 1 }
                    out += url(String(chars[i..<end]))
                    i = end
                    continue
                }
                out += String(chars[i..<j])
                i = j
                continue
            }
            out.append(chars[i])
            i += 1
        }
        return out
    }

    /// A header line with its value replaced: `Name: REDACTED`.
    public static func header(_ line: String) -> String {
        guard let colon = line.firstIndex(of: ":") else { return placeholder }
        return line[..<colon] + ": " + placeholder
    }

    /// Control characters shown as '?': a message stays one line.
    public static func printable(_ s: String) -> String {
        String(s.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? "?" : Character($0) })
    }

    private static func isSchemeChar(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == "+" || c == "." || c == "-")
    }

    private static func ends(_ c: Character) -> Bool {
        c.isWhitespace || c == "\"" || c == "'" || c == "<" || c == ">" || c == "`"
    }
}

/// What names a remote image: the string a cache's bitmaps record, `status`
/// prints, default cache file names hash, an overlay finds its base by and a
/// boot profile records. It is the whole URL minus only what signs or
/// expires it, so that
/// - URLs that differ in anything else (scheme, user, host, port, path, a
///   query parameter's name or value, the fragment) are different images,
///   with their own caches: `/download?id=a` is never served from the cache
///   of `/download?id=b`;
/// - a presigned URL signed again (new signature, date, expiry, credential)
///   is the same image and finds its cache; whether the object itself changed
///   is what its ETag and Last-Modified say.
///
/// FORM. No secret is in clear in it:
/// - a URL with no query left (once the signing parameters are out): the URL
///   as `Redact.url` shows it (a password as REDACTED). A plain URL is its own
///   identity, as it always was, so caches of plain URLs stay valid;
/// - otherwise: the URL as `Redact.url` shows it (query values REDACTED, the
///   fragment left out) plus `#sha256=` and the first 32 hex digits (128
///   bits) of the SHA-256 of the canonical URL: the URL with the signing
///   parameters and the password left out, every other parameter with its
///   value, in the order given (order is kept, not sorted: a server may read
///   `id=1&id=2` differently from `id=2&id=1`), fragment included. Empty
///   pairs (`&&`) are dropped. The password is in neither part: a password
///   authenticates, it does not choose the image.
///
/// SIGNING PARAMETERS (names compared case-insensitively, not percent-decoded):
/// - always: `X-Amz-*` (AWS SigV4, incl. X-Amz-Security-Token), `X-Goog-*`
///   (Google Cloud Storage V4), `Expires` and `Signature` (AWS SigV2,
///   CloudFront, GCS V2);
/// - with a `Signature` parameter present: `AWSAccessKeyId` (AWS SigV2),
///   `GoogleAccessId` (GCS V2), `Key-Pair-Id` and `Policy` (CloudFront);
/// - with a `sig` parameter present (an Azure SAS token always has one): the
///   Azure Storage SAS fields, from the account, service and user delegation
///   SAS parameter tables:
///   https://learn.microsoft.com/rest/api/storageservices/create-account-sas
///   https://learn.microsoft.com/rest/api/storageservices/create-service-sas
///   https://learn.microsoft.com/rest/api/storageservices/create-user-delegation-sas
///   These names are short and common (`sp`, `st`, `si`, `sr`...), so they
///   leave the identity only in a URL signed that way: elsewhere they may
///   well choose the image. Azure's `snapshot` and `versionid` are not SAS
///   fields: they choose the blob, and stay.
public enum ImageIdentity {
    /// The identity of the image at `url` (see the type).
    public static func of(_ url: String) -> String {
        let p = split(url)
        guard let query = p.query else { return Redact.url(url) }
        let kept = keptPairs(query)
        if kept.isEmpty {
            // Only signing parameters (or none): the URL without its query.
            return Redact.url(p.authority + p.path + (p.fragment.map { "#" + $0 } ?? ""))
        }
        let q = "?" + kept.joined(separator: "&")
        let canonical = p.authorityWithoutPassword + p.path + q + (p.fragment.map { "#" + $0 } ?? "")
        return Redact.url(p.authority + p.path + q) + "#sha256=" + sha256Hex(canonical).prefix(32)
    }

    /// Whether `old` is the identity an earlier version recorded for the image
    /// now named `new`: every query value redacted, no digest. Such a cache
    /// cannot tell which of the URLs that differ only in a query value filled
    /// it, so it is not reused; this only lets a message say why.
    public static func isEarlierForm(_ old: String, of new: String) -> Bool {
        old != new && (new.hasPrefix(old + "#sha256=") || of(old) == new)
    }

    /// Whether the query parameter `name` signs or expires a URL whose
    /// parameter names (lowercased) are `names`.
    static func isSigning(_ name: Substring, among names: Set<String>) -> Bool {
        let n = name.lowercased()
        if n.hasPrefix("x-amz-") || n.hasPrefix("x-goog-") || n == "expires" || n == "signature" { return true }
        if names.contains("signature") && signatureCompanions.contains(n) { return true }
        if names.contains("sig") && azureSAS.contains(n) { return true }
        return false
    }

    static let signatureCompanions: Set<String> = ["awsaccesskeyid", "googleaccessid", "key-pair-id", "policy"]

    /// Azure Storage SAS fields: version, services, resource types, resource,
    /// permissions, start, expiry, IP range, protocol, policy identifier,
    /// signature, directory depth, encryption scope, the user delegation
    /// key's fields (skoid, sktid, skt, ske, sks, skv, skdutid), the
    /// authorized/unauthorized/delegated user and correlation ids, and the
    /// response header overrides a SAS signs (rscc, rscd, rsce, rscl, rsct).
    static let azureSAS: Set<String> = [
        "sv", "ss", "srt", "sr", "sp", "st", "se", "sip", "spr", "si", "sig", "sdd", "ses",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "skdutid",
        "saoid", "suoid", "sduoid", "scid",
        "rscc", "rscd", "rsce", "rscl", "rsct",
    ]

    /// The query's pairs that are not signing parameters, in order; empty pairs dropped.
    static func keptPairs(_ query: Substring) -> [Substring] {
        let pairs = query.split(separator: "&", omittingEmptySubsequences: true)
        let names = Set(pairs.map { name(of: $0).lowercased() })
        return pairs.filter { !isSigning(name(of: $0), among: names) }
    }

    static func name(of pair: Substring) -> Substring {
        pair.firstIndex(of: "=").map { pair[..<$0] } ?? pair
    }

    struct Parts {
        /// `scheme://userinfo@host:port` as given ("" when not a scheme:// URL).
        var authority: Substring
        /// The same with the password (`:...` in the userinfo) left out.
        var authorityWithoutPassword: String
        var path: Substring
        var query: Substring?
        var fragment: Substring?
    }

    /// The URL's parts, found the way `Redact.url` finds them.
    static func split(_ u: String) -> Parts {
        var rest = Substring(u)
        var authority = rest[rest.startIndex..<rest.startIndex]
        var bare = ""
        if let colon = rest.firstIndex(of: ":"), rest[colon...].hasPrefix("://"),
           !rest[..<colon].contains(where: { $0 == "/" || $0 == "?" }) {
            let hostStart = rest.index(colon, offsetBy: 3)
            let end = rest[hostStart...].firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
            authority = rest[..<end]
            bare = String(rest[..<hostStart])
            let hostPart = rest[hostStart..<end]
            if let at = hostPart.lastIndex(of: "@") {
                let user = hostPart[..<at]
                bare += (user.firstIndex(of: ":").map { user[..<$0] } ?? user) + hostPart[at...]
            } else {
                bare += hostPart
            }
            rest = rest[end...]
        }
        var fragment: Substring?
        if let hash = rest.firstIndex(of: "#") {
            fragment = rest[rest.index(after: hash)...]
            rest = rest[..<hash]
        }
        var query: Substring?
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        return Parts(authority: authority, authorityWithoutPassword: bare, path: rest, query: query, fragment: fragment)
    }

    /// SHA-256 (OpenSSL's libcrypto) as 64 lowercase hex digits.
    public static func sha256Hex(_ s: String) -> String {
        var out = [UInt8](repeating: 0, count: 32)
        let ok = Array(s.utf8).withUnsafeBytes { b in clibcrypto_sha256(b.baseAddress, b.count, &out) } == 0
        // EVP_Digest fails only when it cannot allocate its context (out of
        // memory, where Swift traps too); no identity would be right then.
        precondition(ok, "libcrypto's SHA-256 failed")
        return out.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
