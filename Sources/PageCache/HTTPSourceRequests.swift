// HTTPSource, requests: the options, headers and credentials one attempt
// (or one redirect hop) is sent with, and `Transfer`, one request across
// its attempts (with the response headers it parses). The contracts it
// serves are stated where they are decided: which hop gets the credentials
// (`Transfer.credentials`) in HTTPSourceRedirects.swift, what a retry asks
// for in HTTPSourceAttempts.swift.
import CCurl

extension HTTPSource {
    func configure(_ e: UnsafeMutableRawPointer, for t: Transfer) {
        let c = config
        ccurl_easy_setopt_string(e, CURLOPT_URL, t.target)
        ccurl_easy_setopt_pointer(e, CURLOPT_PRIVATE, Unmanaged.passUnretained(t).toOpaque())
        ccurl_easy_setopt_write_callback(e, CURLOPT_WRITEFUNCTION, HTTPSource.writeCallback)
        ccurl_easy_setopt_pointer(e, CURLOPT_WRITEDATA, Unmanaged.passUnretained(t).toOpaque())
        ccurl_easy_setopt_write_callback(e, CURLOPT_HEADERFUNCTION, HTTPSource.headerCallback)
        ccurl_easy_setopt_pointer(e, CURLOPT_HEADERDATA, Unmanaged.passUnretained(t).toOpaque())
        ccurl_easy_setopt_pointer(e, CURLOPT_ERRORBUFFER, t.errorBuffer)
        ccurl_easy_setopt_long(e, CURLOPT_NOSIGNAL, 1)
        // Redirects are followed by `redirect`, hop by hop, so credentials are chosen per hop.
        ccurl_easy_setopt_long(e, CURLOPT_FOLLOWLOCATION, 0)
        ccurl_easy_setopt_string(e, CURLOPT_PROTOCOLS_STR, "http,https")
        ccurl_easy_setopt_string(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https")
        ccurl_easy_setopt_long(e, CURLOPT_HTTP_VERSION, c.http2 ? ccurl_http_version_2tls : ccurl_http_version_1_1)
        ccurl_easy_setopt_long(e, CURLOPT_PIPEWAIT, 1)
        ccurl_easy_setopt_long(e, CURLOPT_TCP_KEEPALIVE, 1)
        // Larger receive chunks: fewer write callbacks and cache-file writes per run.
        ccurl_easy_setopt_long(e, CURLOPT_BUFFERSIZE, 512 << 10)
        ccurl_easy_setopt_long(e, CURLOPT_CONNECTTIMEOUT_MS, Int(c.connectTimeout * 1000))
        ccurl_easy_setopt_long(e, CURLOPT_DNS_CACHE_TIMEOUT, c.dnsCacheSeconds)
        if c.requestTimeout > 0 { ccurl_easy_setopt_long(e, CURLOPT_TIMEOUT_MS, Int(c.requestTimeout * 1000)) }
        ccurl_easy_setopt_long(e, CURLOPT_LOW_SPEED_LIMIT, c.lowSpeedLimit)
        ccurl_easy_setopt_long(e, CURLOPT_LOW_SPEED_TIME, c.lowSpeedTime)
        ccurl_easy_setopt_string(e, CURLOPT_USERAGENT, c.userAgent)
        ccurl_easy_setopt_long(e, CURLOPT_SSL_VERIFYPEER, c.insecure ? 0 : 1)
        ccurl_easy_setopt_long(e, CURLOPT_SSL_VERIFYHOST, c.insecure ? 0 : 2)
        if let ca = c.caCertPath { ccurl_easy_setopt_string(e, CURLOPT_CAINFO, ca) }
        if c.verbose { ccurl_easy_setopt_long(e, CURLOPT_VERBOSE, 1) }
        var list: UnsafeMutablePointer<curl_slist>?
        // Credentials go only to the URL's own origin (see `redirect`).
        if t.credentials {
            if let s3 = c.s3 {
                ccurl_easy_setopt_string(e, CURLOPT_AWS_SIGV4, "aws:amz:\(s3.region):s3")
                ccurl_easy_setopt_string(e, CURLOPT_USERNAME, s3.accessKeyID)
                ccurl_easy_setopt_string(e, CURLOPT_PASSWORD, s3.secretAccessKey)
            } else {
                if let u = c.username { ccurl_easy_setopt_string(e, CURLOPT_USERNAME, u) }
                if let p = c.password { ccurl_easy_setopt_string(e, CURLOPT_PASSWORD, p) }
            }
            for h in c.headers { list = curl_slist_append(list, h) }
            if let token = c.s3?.sessionToken { list = curl_slist_append(list, "x-amz-security-token: \(token)") }
            if c.s3 != nil { list = curl_slist_append(list, "x-amz-content-sha256: UNSIGNED-PAYLOAD") }
        }
        t.setHeaders(list)
        if let list { ccurl_easy_setopt_slist(e, CURLOPT_HTTPHEADER, list) }
        switch t.kind {
        case .head:
            ccurl_easy_setopt_long(e, CURLOPT_NOBODY, 1)
        case .rangeProbe:
            ccurl_easy_setopt_string(e, CURLOPT_RANGE, "0-0")
        case .fetch:
            let first = t.offset + UInt64(t.delivered)
            let last = t.offset + UInt64(t.length) - 1
            ccurl_easy_setopt_string(e, CURLOPT_RANGE, "\(first)-\(last)")
        }
    }
}

extension StringProtocol {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        // "\r\n" is one Character: test for whitespace, not for single characters.
        while let c = s.first, c.isWhitespace { s.removeFirst() }
        while let c = s.last, c.isWhitespace { s.removeLast() }
        return String(s)
    }
}

/// One request, across its attempts.
final class Transfer {
    enum Kind { case head, rangeProbe, fetch }

    struct Headers {
        var contentRange: String?
        var contentLength: UInt64?
        var etag: String?
        var lastModified: String?
        var acceptRanges: String?
    }

    let id: UInt64
    var kind: Kind
    let offset: UInt64
    let length: Int
    var delivered = 0
    var attempt = 0
    var retryAt: UInt64 = 0
    var startedAt: UInt64 = 0
    var easy: UnsafeMutableRawPointer?
    weak var source: HTTPSource?
    var onData: HTTPSource.DataHandler?
    var completion: HTTPSource.Completion?
    var image: RemoteImage?
    /// This hop's URL, how many redirects led to it, and whether it gets the credentials.
    var target = ""
    var hops = 0
    var credentials = true
    /// The mirror this attempt went to (HTTPSourceMirrors.swift); `pinned`:
    /// every attempt goes to that one. Whether it counts in the mirror's
    /// attempts in flight, and when the attempt started.
    var mirror = 0
    var pinned: Int?
    var onMirror = false
    /// Moved once to a faster mirror (HTTPSourceMirrors.swift): not again.
    var movedForSpeed = false
    var attemptStartedAt: UInt64 = 0
    /// Body bytes not yet the caller's: the 206 lacked the image's validator.
    var held: [UInt8] = []

    // Per attempt.
    var headers = Headers()
    var status = 0
    var checked = false
    var bodyOK = false
    var failure: HTTPError.Reason?
    var hold = false
    var bodySeen = false
    let errorBuffer: UnsafeMutablePointer<CChar>
    private var slist: UnsafeMutablePointer<curl_slist>?

    init(id: UInt64, kind: Kind, offset: UInt64, length: Int) {
        self.id = id
        self.kind = kind
        self.offset = offset
        self.length = length
        errorBuffer = .allocate(capacity: Int(ccurl_error_size))
        errorBuffer.initialize(repeating: 0, count: Int(ccurl_error_size))
    }

    deinit {
        errorBuffer.deallocate()
        freeHeaders()
    }

    var rangeAsked: String {
        guard kind == .fetch, length > 0 else { return "bytes 0-0" }
        return "bytes \(offset + UInt64(delivered))-\(offset + UInt64(length) - 1)"
    }

    var errorMessage: String { String(cString: errorBuffer) }

    func resetAttempt() {
        headers = Headers()
        status = 0
        checked = false
        bodyOK = false
        failure = nil
        hold = false
        bodySeen = false
        held = []
        errorBuffer[0] = 0
    }

    func setHeaders(_ list: UnsafeMutablePointer<curl_slist>?) {
        freeHeaders()
        slist = list
    }

    func freeHeaders() {
        if let s = slist { curl_slist_free_all(s) }
        slist = nil
    }

    /// Drops the closures (breaking cycles through captured state).
    func release() {
        onData = nil
        completion = nil
    }

    /// One header line of the response; a status line starts a new response
    /// (after a redirect or a 100 Continue).
    func header(_ line: UnsafeRawBufferPointer) {
        let text = String(decoding: line, as: UTF8.self)
        if text.hasPrefix("HTTP/") {
            headers = Headers()
            return
        }
        guard let colon = text.firstIndex(of: ":") else { return }
        let name = text[..<colon].lowercased()
        let value = text[text.index(after: colon)...].trimmingWhitespace()
        switch name {
        case "content-range": headers.contentRange = value
        case "content-length": headers.contentLength = UInt64(value)
        case "etag": headers.etag = value
        case "last-modified": headers.lastModified = value
        case "accept-ranges": headers.acceptRanges = value
        default: break
        }
    }
}
