// HTTPSource: byte ranges of one remote image over HTTP(S) (or S3 with SigV4),
// through libcurl's multi interface, driven by someone else's event loop.
//
// Contract:
// - Event-loop shape: the source owns an epoll fd (`fd`) holding curl's
//   sockets (CURLMOPT_SOCKETFUNCTION), a timerfd for curl's timeouts
//   (CURLMOPT_TIMERFUNCTION) and a timerfd for retry backoff. The owner polls
//   `fd` for readability and calls `perform()` when it is readable. Nothing
//   here blocks except `runUntilIdle`, the blocking convenience for tests and
//   one-shot tools. Single-threaded: one owner thread calls everything.
// - `fetch` is a Range GET of exactly [offset, offset+length). Body bytes are
//   handed to `onData(offset, bytes)` in order, each byte once, while
//   `perform()` runs; only after the response proved to be HTTP 206 with the
//   Content-Range asked for (and, once `expected` is set, the same total size
//   and validators). 200 (Range ignored), another range, a changed ETag or size
//   is a typed error: data is never delivered at a wrong offset.
// - Validators: when `expected` has an ETag (else a Last-Modified) and a 206
//   lacks it, the body is held in memory (the range, at most) and handed over
//   only after a HEAD started after that 206 arrived shows the same size and
//   validators; otherwise the fetch fails with `.validatorChanged` or
//   `.sizeChanged`, as a 206 with a different ETag does. Fetches held at once
//   share one HEAD.
// - Redirects (301, 302, 303, 307, 308; at most `maxRedirects`) are followed
//   here, hop by hop, not by curl: each hop is a request of its own, to the
//   Location curl resolved (CURLINFO_REDIRECT_URL), http or https only. The
//   credentials (headers, user and password, a user in the URL, S3 signing)
//   go only to the URL's origin (scheme, host and port): a hop elsewhere,
//   https to http included, is sent without them (`RedirectCredentials.drop`,
//   the default) or refused (`.refuse`, `.redirectRefused`, not retried);
//   once dropped they stay off for the rest of the attempt. Every request and
//   every retry starts again at the URL: the final URL is never remembered
//   (a presigned redirect target may expire; the probe's `effectiveURL` is
//   for display only).
// - Retries: 5xx/429, timeouts, resets, short bodies, and the transient
//   network faults (a name that did not resolve, a TLS handshake that failed
//   or was reset, a refused connection) are retried with exponential backoff,
//   up to `maxAttempts` attempts in all; a retry asks only for the bytes not
//   yet delivered. Then `completion` runs exactly once, with success or an
//   `HTTPError` naming the URL and status. Answers that would not change
//   (404, 403, a certificate that does not verify, a bad Content-Range) are
//   never retried. The probe retries the same faults except a refused
//   connection, which at `add` time is a prompt error, not a fault in passing.
// - Callbacks: `onData` runs inside curl's write callback (or, for a held
//   body, from `perform()` after its HEAD) and must not call back into the source. `completion` runs after curl's callbacks have
//   returned (from `perform()`), and may start new fetches.
// - `probe` learns size and validators: HEAD; on 403/405/501, or when HEAD
//   does not announce `Accept-Ranges: bytes`, a GET of `Range: bytes=0-0`
//   (whose Content-Range gives the total). A server that answers a Range GET
//   with 200 is refused (`.rangeIgnored`).
// - Connections: at most `maxConnections`, kept alive and shared by all
//   requests; easy handles are pooled. HTTP/2 when TLS offers it.
import CCurl
import Glibc

public final class HTTPSource {
    public typealias DataHandler = (_ offset: UInt64, _ bytes: UnsafeRawBufferPointer) -> Bool
    public typealias Completion = (Result<Void, HTTPError>) -> Void

    public let config: HTTPConfig
    public let url: String
    public let stats: CacheStats
    /// Size and validators every fetch must match (set by `probe`, or by the caller).
    public var expected: RemoteImage?

    /// The fd to poll for readability; then call `perform()`.
    public let fd: Int32
    private let curlTimerFD: Int32
    private let retryTimerFD: Int32
    private let multi: UnsafeMutableRawPointer
    private var registered: Set<Int32> = []
    private var active: [UInt64: Transfer] = [:]
    private var retryQueue: [Transfer] = []
    private var finished: [(Transfer, Result<Void, HTTPError>)] = []
    private var pool: [UnsafeMutableRawPointer] = []
    private var nextID: UInt64 = 1
    private var events = [epoll_event](repeating: epoll_event(), count: 64)
    private var performing = false
    /// Requests to the URL's origin carry credentials: headers, a user name, S3 signing, a user in the URL.
    private let credentialed: Bool
    /// Fetches whose bodies are held for a HEAD not started yet, and those the HEAD in flight decides.
    private var awaitingCheck: [Transfer] = []
    private var checking: [Transfer] = []
    private var checkInFlight = false

    private static let globalInit: Bool = {
        curl_global_init(ccurl_global_default) == CURLE_OK
    }()

    public init(config: HTTPConfig, stats: CacheStats = CacheStats()) throws(HTTPError) {
        let url = config.requestURL
        if let why = config.problem { throw HTTPError(.invalidConfig(why), url: Redact.printable(url)) }
        guard HTTPSource.globalInit, let m = curl_multi_init() else {
            throw HTTPError(.transport(code: Int32(CURLE_FAILED_INIT.rawValue)), url: url, detail: "curl_multi_init")
        }
        let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
        let t1 = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC | TFD_NONBLOCK))
        let t2 = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC | TFD_NONBLOCK))
        if ep < 0 || t1 < 0 || t2 < 0 {
            let e = errno
            for f in [ep, t1, t2] where f >= 0 { close(f) }
            curl_multi_cleanup(m)
            throw HTTPError(.transport(code: Int32(CURLE_FAILED_INIT.rawValue)), url: url,
                            detail: "epoll/timerfd: \(String(cString: strerror(e)))")
        }
        self.config = config
        self.url = url
        self.credentialed = !config.headers.isEmpty || config.username != nil || config.password != nil
            || config.s3 != nil || HTTPSource.hasUserInfo(url)
        self.stats = stats
        self.multi = m
        self.fd = ep
        self.curlTimerFD = t1
        self.retryTimerFD = t2
        for t in [t1, t2] {
            var ev = epoll_event()
            ev.events = EPOLLIN.rawValue
            ev.data.u64 = UInt64(UInt32(bitPattern: t))
            epoll_ctl(ep, EPOLL_CTL_ADD, t, &ev)
        }
        let me = Unmanaged.passUnretained(self).toOpaque()
        ccurl_multi_setopt_socket_callback(m, HTTPSource.socketCallback)
        ccurl_multi_setopt_pointer(m, CURLMOPT_SOCKETDATA, me)
        ccurl_multi_setopt_timer_callback(m, HTTPSource.timerCallback)
        ccurl_multi_setopt_pointer(m, CURLMOPT_TIMERDATA, me)
        ccurl_multi_setopt_long(m, CURLMOPT_MAX_TOTAL_CONNECTIONS, config.maxConnections)
        ccurl_multi_setopt_long(m, CURLMOPT_MAXCONNECTS, config.maxConnections)
        ccurl_multi_setopt_long(m, CURLMOPT_PIPELINING, ccurl_pipe_multiplex)
    }

    deinit {
        for t in active.values {
            if let e = t.easy { curl_multi_remove_handle(multi, e); curl_easy_cleanup(e) }
            t.release()
        }
        for t in retryQueue + awaitingCheck + checking { t.release() }
        for e in pool { curl_easy_cleanup(e) }
        curl_multi_cleanup(multi)
        close(fd)
        close(curlTimerFD)
        close(retryTimerFD)
    }

    /// No request is running, waiting for a retry, or waiting to report.
    public var isIdle: Bool {
        active.isEmpty && retryQueue.isEmpty && finished.isEmpty && awaitingCheck.isEmpty && checking.isEmpty
    }
    public var activeCount: Int { active.count + retryQueue.count + awaitingCheck.count + checking.count }

    // MARK: Requests

    /// Range GET of [offset, offset + length). See the contract above.
    @discardableResult
    public func fetch(offset: UInt64, length: Int, onData: @escaping DataHandler,
                      completion: @escaping Completion) -> UInt64 {
        let t = Transfer(id: nextID, kind: .fetch, offset: offset, length: length)
        nextID += 1
        t.onData = onData
        t.completion = completion
        t.startedAt = monotonicNanos()
        if length <= 0 {
            finish(t, .success(()))
            arm(retryTimerFD, nanosFromNow: 0) // report from the next perform()
        } else {
            start(t)
        }
        return t.id
    }

    /// Learns size and validators, and sets `expected` on success.
    public func probe(_ completion: @escaping (Result<RemoteImage, HTTPError>) -> Void) {
        let t = Transfer(id: nextID, kind: .head, offset: 0, length: 0)
        nextID += 1
        t.startedAt = monotonicNanos()
        t.completion = { [unowned t, weak self] result in
            switch result {
            case .success:
                let image = t.image!
                self?.expected = image
                completion(.success(image))
            case .failure(let e):
                completion(.failure(e))
            }
        }
        start(t)
    }

    /// `probe`, blocking until it completes.
    public func probeBlocking(timeout: Double = 120) throws(HTTPError) -> RemoteImage {
        var outcome: Result<RemoteImage, HTTPError>?
        probe { outcome = $0 }
        while outcome == nil {
            if !runUntilIdle(timeout: timeout) && outcome == nil {
                throw HTTPError(.timedOut, url: url, detail: "probe did not finish")
            }
        }
        return try outcome!.get()
    }

    /// Completes every request with `.cancelled`.
    public func cancelAll() {
        for t in Array(active.values) {
            detach(t)
            finish(t, .failure(HTTPError(.cancelled, url: url, attempts: t.attempt)))
        }
        // The fetches `checking` holds fail with the cancelled HEAD.
        let waiting = retryQueue + awaitingCheck
        retryQueue = []
        awaitingCheck = []
        for t in waiting { finish(t, .failure(HTTPError(.cancelled, url: url, attempts: t.attempt))) }
        runCompletions()
    }

    // MARK: Event loop

    /// Handles whatever is ready on `fd`, without blocking, then runs completions.
    public func perform() {
        precondition(!performing, "HTTPSource.perform is not reentrant")
        performing = true
        defer { performing = false }
        let n = events.withUnsafeMutableBufferPointer { epoll_wait(fd, $0.baseAddress, Int32($0.count), 0) }
        var running: Int32 = 0
        if n > 0 {
            for i in 0..<Int(n) {
                let ev = events[i]
                let f = Int32(bitPattern: UInt32(truncatingIfNeeded: ev.data.u64))
                if f == curlTimerFD {
                    drainTimer(f)
                    curl_multi_socket_action(multi, ccurl_socket_timeout, 0, &running)
                } else if f == retryTimerFD {
                    drainTimer(f)
                    startDueRetries()
                } else {
                    var flags: Int32 = 0
                    if ev.events & EPOLLIN.rawValue != 0 { flags |= ccurl_cselect_in }
                    if ev.events & EPOLLOUT.rawValue != 0 { flags |= ccurl_cselect_out }
                    if ev.events & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0 { flags |= ccurl_cselect_err }
                    curl_multi_socket_action(multi, f, flags, &running)
                }
            }
        }
        collectFinished()
        runCompletions()
    }

    /// Polls and performs until idle or `timeout` seconds passed; true if idle.
    @discardableResult
    public func runUntilIdle(timeout: Double? = nil) -> Bool {
        let deadline = timeout.map { monotonicNanos() + UInt64($0 * 1e9) }
        // Completions queued outside perform (e.g. a zero-length fetch).
        runCompletions()
        while !isIdle {
            var wait: Int32 = -1
            if let deadline {
                let now = monotonicNanos()
                if now >= deadline { return false }
                wait = Int32(min((deadline - now) / 1_000_000 + 1, 1000))
            }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, wait)
            perform()
        }
        return true
    }

    // MARK: curl callbacks (C)

    private static let socketCallback: curl_socket_callback = { _, s, what, userp, _ in
        let me = Unmanaged<HTTPSource>.fromOpaque(userp!).takeUnretainedValue()
        me.watch(socket: s, what: what)
        return 0
    }

    private static let timerCallback: curl_multi_timer_callback = { _, timeoutMS, userp in
        let me = Unmanaged<HTTPSource>.fromOpaque(userp!).takeUnretainedValue()
        if timeoutMS < 0 {
            me.arm(me.curlTimerFD, nanosFromNow: nil)
        } else {
            me.arm(me.curlTimerFD, nanosFromNow: UInt64(timeoutMS) * 1_000_000)
        }
        return 0
    }

    private static let writeCallback: curl_write_callback = { ptr, size, count, userdata in
        let t = Unmanaged<Transfer>.fromOpaque(userdata!).takeUnretainedValue()
        let n = size * count
        return t.source!.received(t, UnsafeRawBufferPointer(start: ptr, count: n))
    }

    private static let headerCallback: curl_write_callback = { ptr, size, count, userdata in
        let t = Unmanaged<Transfer>.fromOpaque(userdata!).takeUnretainedValue()
        let n = size * count
        t.header(UnsafeRawBufferPointer(start: ptr, count: n))
        return n
    }

    private func watch(socket s: curl_socket_t, what: Int32) {
        if what == ccurl_poll_remove {
            if registered.remove(s) != nil { epoll_ctl(fd, EPOLL_CTL_DEL, s, nil) }
            return
        }
        var ev = epoll_event()
        var mask: UInt32 = 0
        if what & ccurl_poll_in != 0 { mask |= EPOLLIN.rawValue }
        if what & ccurl_poll_out != 0 { mask |= EPOLLOUT.rawValue }
        ev.events = mask
        ev.data.u64 = UInt64(UInt32(bitPattern: s))
        // A socket closed without a REMOVE leaves epoll by itself, and its number
        // may come back: fall back between MOD and ADD rather than trust the set.
        if registered.contains(s) {
            if epoll_ctl(fd, EPOLL_CTL_MOD, s, &ev) != 0 && errno == ENOENT { epoll_ctl(fd, EPOLL_CTL_ADD, s, &ev) }
        } else {
            registered.insert(s)
            if epoll_ctl(fd, EPOLL_CTL_ADD, s, &ev) != 0 && errno == EEXIST { epoll_ctl(fd, EPOLL_CTL_MOD, s, &ev) }
        }
    }

    /// Arms a timerfd `nanos` from now (0 fires at once); nil disarms.
    private func arm(_ timer: Int32, nanosFromNow nanos: UInt64?) {
        var spec = itimerspec()
        if let nanos {
            let n = max(nanos, 1)
            spec.it_value.tv_sec = Int(n / 1_000_000_000)
            spec.it_value.tv_nsec = Int(n % 1_000_000_000)
        }
        timerfd_settime(timer, 0, &spec, nil)
    }

    private func drainTimer(_ timer: Int32) {
        var expirations: UInt64 = 0
        _ = read(timer, &expirations, 8)
    }

    // MARK: Transfers

    /// Starts an attempt at the URL (or, with `hop`, the next hop of a redirect).
    private func start(_ t: Transfer, hop: Bool = false) {
        if !hop {
            t.attempt += 1
            t.target = url
            t.hops = 0
            t.credentials = true
        }
        t.resetAttempt()
        let easy: UnsafeMutableRawPointer
        if let e = pool.popLast() {
            curl_easy_reset(e)
            easy = e
        } else if let e = curl_easy_init() {
            easy = e
        } else {
            finish(t, .failure(HTTPError(.transport(code: Int32(CURLE_FAILED_INIT.rawValue)), url: url, detail: "curl_easy_init")))
            arm(retryTimerFD, nanosFromNow: 0)
            return
        }
        t.easy = easy
        t.source = self
        configure(easy, for: t)
        active[t.id] = t
        stats.requests += 1
        let r = curl_multi_add_handle(multi, easy)
        if r != CURLM_OK {
            detach(t)
            finish(t, .failure(HTTPError(.transport(code: Int32(r.rawValue)), url: url,
                                         detail: String(cString: curl_multi_strerror(r)))))
            arm(retryTimerFD, nanosFromNow: 0)
        }
    }

    private func configure(_ e: UnsafeMutableRawPointer, for t: Transfer) {
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

    /// Body bytes of the current attempt (curl's write callback).
    private func received(_ t: Transfer, _ bytes: UnsafeRawBufferPointer) -> Int {
        let n = bytes.count
        if !t.checked {
            t.checked = true
            t.status = responseCode(t)
            t.bodyOK = checkResponse(t)
        }
        if t.failure != nil { return ccurl_writefunc_error }
        guard t.bodyOK else { return n } // an error page we will retry or report: swallow it
        stats.bytesFetched += UInt64(n)
        switch t.kind {
        case .fetch:
            let remaining = t.length - t.delivered - t.held.count
            if n > remaining {
                t.failure = .rangeMismatch(expected: t.rangeAsked, got: "more than \(remaining) bytes")
                return ccurl_writefunc_error
            }
            if t.hold {
                // Not the caller's until `revalidate` has seen the same object.
                if t.held.isEmpty { t.held.reserveCapacity(t.length - t.delivered) }
                t.held.append(contentsOf: bytes)
                return n
            }
            if !t.onData!(t.offset + UInt64(t.delivered), bytes) {
                t.failure = .aborted
                return ccurl_writefunc_error
            }
            t.delivered += n
            return n
        case .rangeProbe, .head:
            return n
        }
    }

    private func responseCode(_ t: Transfer) -> Int {
        var code = 0
        if let e = t.easy { ccurl_easy_getinfo_long(e, CURLINFO_RESPONSE_CODE, &code) }
        return code
    }

    /// Decides, at the first body byte (or at the end when there is no body),
    /// whether the response may deliver data. Sets `t.failure` for final errors.
    private func checkResponse(_ t: Transfer) -> Bool {
        let status = t.status
        if status >= 500 || status == 429 || status == 408 { return false } // retried at completion
        switch t.kind {
        case .head:
            return (200..<300).contains(status)
        case .rangeProbe, .fetch:
            if status == 200 { t.failure = .rangeIgnored; return false }
            if status != 206 {
                if !(300..<400).contains(status) { t.failure = .status(status) }
                return false
            }
            guard let cr = t.headers.contentRange, let parsed = parseContentRange(cr) else {
                t.failure = .rangeMismatch(expected: t.rangeAsked, got: t.headers.contentRange)
                return false
            }
            if t.kind == .fetch {
                let first = t.offset + UInt64(t.delivered)
                let last = t.offset + UInt64(t.length) - 1
                if parsed.first != first || parsed.last != last {
                    t.failure = .rangeMismatch(expected: t.rangeAsked, got: cr)
                    return false
                }
            } else if parsed.first != 0 || parsed.last != 0 {
                t.failure = .rangeMismatch(expected: "bytes 0-0/*", got: cr)
                return false
            }
            if let x = expected {
                if let total = parsed.total, total != x.size {
                    t.failure = .sizeChanged(expected: x.size, got: total)
                    return false
                }
                if let want = x.etag, let got = t.headers.etag, want != got {
                    t.failure = .validatorChanged(expected: want, got: got)
                    return false
                }
                if let want = x.lastModified, let got = t.headers.lastModified, want != got,
                   x.etag == nil || t.headers.etag == nil {
                    t.failure = .validatorChanged(expected: want, got: got)
                    return false
                }
                // A 206 without the validator the image has proves nothing: its
                // bytes are held until a HEAD sees the same object (`revalidate`).
                if t.kind == .fetch {
                    if x.etag != nil { t.hold = t.headers.etag == nil }
                    else if x.lastModified != nil { t.hold = t.headers.lastModified == nil }
                }
            }
            return true
        }
    }

    private func collectFinished() {
        var left: Int32 = 0
        while let msg = curl_multi_info_read(multi, &left) {
            guard msg.pointee.msg == CURLMSG_DONE, let easy = msg.pointee.easy_handle else { continue }
            let code = ccurl_msg_result(msg)
            var priv: UnsafeMutableRawPointer?
            ccurl_easy_getinfo_pointer(easy, CURLINFO_PRIVATE, &priv)
            guard let priv else { continue }
            let t = Unmanaged<Transfer>.fromOpaque(priv).takeUnretainedValue()
            done(t, code: code)
        }
    }

    /// An attempt ended: finish, retry, or switch HEAD to a Range GET.
    private func done(_ t: Transfer, code: CURLcode) {
        if !t.checked {
            t.checked = true
            t.status = responseCode(t)
            t.bodyOK = code == CURLE_OK ? checkResponse(t) : false
        }
        let status = t.status
        let detail = t.errorMessage
        var effective: String?
        var location: String?
        if let e = t.easy {
            var p: UnsafePointer<CChar>?
            ccurl_easy_getinfo_string(e, CURLINFO_EFFECTIVE_URL, &p)
            effective = p.map { String(cString: $0) }
            // Location resolved against this hop's URL by curl itself.
            var r: UnsafePointer<CChar>?
            ccurl_easy_getinfo_string(e, CURLINFO_REDIRECT_URL, &r)
            location = r.map { String(cString: $0) }
        }
        detach(t)

        func fail(_ reason: HTTPError.Reason, retryable: Bool) {
            if retryable && t.attempt < config.maxAttempts {
                scheduleRetry(t)
            } else {
                finish(t, .failure(HTTPError(reason, url: url, status: status, detail: detail, attempts: t.attempt)))
            }
        }

        if let f = t.failure {
            // Decided from the response itself: never retried (the answer would be the same).
            return fail(f, retryable: false)
        }
        if code != CURLE_OK {
            let (reason, retryable) = classify(code, kind: t.kind)
            // A truncated body is retried as a short body, resuming where it stopped.
            return fail(reason, retryable: retryable)
        }
        if status >= 500 || status == 429 || status == 408 {
            return fail(.status(status), retryable: true)
        }
        if [301, 302, 303, 307, 308].contains(status) {
            guard let location else { return fail(.status(status), retryable: false) }
            if let refused = redirect(t, to: location) { return fail(refused, retryable: false) }
            return
        }
        switch t.kind {
        case .head:
            if status == 403 || status == 405 || status == 501 {
                t.kind = .rangeProbe
                t.attempt = 0
                return start(t)
            }
            guard (200..<300).contains(status) else { return fail(.status(status), retryable: false) }
            guard let size = t.headers.contentLength else { return switchToRangeProbe(t) }
            if t.headers.acceptRanges?.lowercased() != "bytes" { return switchToRangeProbe(t) }
            if size > config.maxImageSize { return fail(.imageTooLarge(size: size, limit: config.maxImageSize), retryable: false) }
            t.image = RemoteImage(effectiveURL: effective ?? url, size: size, etag: t.headers.etag,
                                  lastModified: t.headers.lastModified, fromHead: true)
            finish(t, .success(()))
        case .rangeProbe:
            if !t.bodyOK { return fail(.status(status), retryable: false) }
            guard let cr = t.headers.contentRange, let total = parseContentRange(cr)?.total else {
                return fail(.noSize, retryable: false)
            }
            if total > config.maxImageSize { return fail(.imageTooLarge(size: total, limit: config.maxImageSize), retryable: false) }
            t.image = RemoteImage(effectiveURL: effective ?? url, size: total, etag: t.headers.etag,
                                  lastModified: t.headers.lastModified, fromHead: false)
            finish(t, .success(()))
        case .fetch:
            if !t.bodyOK { return fail(.status(status), retryable: false) }
            if t.delivered + t.held.count < t.length {
                return fail(.shortBody(expected: t.length, got: t.delivered + t.held.count), retryable: true)
            }
            if t.hold { return revalidate(t) }
            stats.fetchLatency.record(nanoseconds: monotonicNanos() - t.startedAt)
            finish(t, .success(()))
        }
    }

    // MARK: Redirects

    /// Follows a 3xx to `next` (already absolute) as the next hop of `t`'s
    /// attempt, or returns why not. A hop to another origin than the URL's
    /// (scheme, host or port differ; so https to http too) goes without the
    /// credentials (`.drop`), or is refused (`.refuse`) while they are attached;
    /// once dropped they stay off for the rest of the attempt.
    private func redirect(_ t: Transfer, to next: String) -> HTTPError.Reason? {
        if t.hops >= config.maxRedirects { return .tooManyRedirects }
        guard let to = HTTPSource.origin(next), to.scheme == "http" || to.scheme == "https" else {
            return .redirectRefused("\(Redact.url(next)) is not an http(s) URL")
        }
        if t.credentials && credentialed && to != HTTPSource.origin(url) {
            switch config.redirectCredentials {
            case .refuse:
                return .redirectRefused("\(Redact.url(next)) is another origin than the URL's (scheme, host or port) "
                                        + "and the request carries credentials")
            case .drop:
                t.credentials = false
            }
        }
        t.target = next
        t.hops += 1
        start(t, hop: true)
        return nil
    }

    /// A URL's scheme, host and port (the default port when none is written),
    /// lowercased, as curl's URL parser reads them; nil when it does not parse.
    static func origin(_ u: String) -> Origin? {
        guard let h = curl_url() else { return nil }
        defer { curl_url_cleanup(h) }
        guard curl_url_set(h, CURLUPART_URL, u, 0) == CURLUE_OK else { return nil }
        func part(_ what: CURLUPart, _ flags: UInt32) -> String? {
            var out: UnsafeMutablePointer<CChar>?
            guard curl_url_get(h, what, &out, flags) == CURLUE_OK, let out else { return nil }
            defer { curl_free(out) }
            return String(cString: out).lowercased()
        }
        guard let scheme = part(CURLUPART_SCHEME, 0), let host = part(CURLUPART_HOST, 0),
              let port = part(CURLUPART_PORT, UInt32(CURLU_DEFAULT_PORT)) else { return nil }
        return Origin(scheme: scheme, host: host, port: port)
    }

    /// Whether a URL names a user (and maybe a password) before its host.
    static func hasUserInfo(_ u: String) -> Bool {
        guard let h = curl_url() else { return false }
        defer { curl_url_cleanup(h) }
        guard curl_url_set(h, CURLUPART_URL, u, 0) == CURLUE_OK else { return false }
        var out: UnsafeMutablePointer<CChar>?
        let r = curl_url_get(h, CURLUPART_USER, &out, 0)
        if let out { curl_free(out) }
        return r == CURLUE_OK
    }

    struct Origin: Equatable {
        var scheme: String
        var host: String
        var port: String
    }

    // MARK: Validators

    /// Holds `t`'s bytes until a HEAD started after its 206 arrived sees the
    /// image's size and validators; then delivers them, or fails `t` as a
    /// changed image does. Fetches waiting at once share one HEAD.
    private func revalidate(_ t: Transfer) {
        awaitingCheck.append(t)
        startCheck()
    }

    private func startCheck() {
        guard !checkInFlight, !awaitingCheck.isEmpty else { return }
        let batch = awaitingCheck
        awaitingCheck = []
        checkInFlight = true
        checking = batch
        let h = Transfer(id: nextID, kind: .head, offset: 0, length: 0)
        nextID += 1
        h.startedAt = monotonicNanos()
        h.completion = { [unowned h, weak self] result in
            guard let self else { return }
            self.checkInFlight = false
            let batch = self.checking
            self.checking = []
            var verdict: HTTPError.Reason?
            switch result {
            case .failure(let e): verdict = e.reason
            case .success: verdict = self.expected.flatMap { HTTPSource.difference(from: $0, to: h.image!) }
            }
            for t in batch { self.settle(t, verdict) }
            self.startCheck()
        }
        start(h)
    }

    /// How `now` differs from `was` (size, then ETag, then Last-Modified), or nil.
    static func difference(from was: RemoteImage, to now: RemoteImage) -> HTTPError.Reason? {
        if now.size != was.size { return .sizeChanged(expected: was.size, got: now.size) }
        if let want = was.etag {
            if now.etag != want { return .validatorChanged(expected: want, got: now.etag ?? "(none)") }
        } else if let want = was.lastModified, now.lastModified != want {
            return .validatorChanged(expected: want, got: now.lastModified ?? "(none)")
        }
        return nil
    }

    /// Delivers a held body (`verdict` nil) or fails its fetch.
    private func settle(_ t: Transfer, _ verdict: HTTPError.Reason?) {
        if let verdict {
            t.held = []
            return finish(t, .failure(HTTPError(verdict, url: url, attempts: t.attempt)))
        }
        let chunk = 512 << 10
        var at = 0
        while at < t.held.count {
            let n = min(chunk, t.held.count - at)
            let ok = t.held.withUnsafeBytes { t.onData!(t.offset + UInt64(t.delivered), UnsafeRawBufferPointer(rebasing: $0[at..<at + n])) }
            if !ok {
                t.held = []
                return finish(t, .failure(HTTPError(.aborted, url: url, attempts: t.attempt)))
            }
            t.delivered += n
            at += n
        }
        t.held = []
        stats.fetchLatency.record(nanoseconds: monotonicNanos() - t.startedAt)
        finish(t, .success(()))
    }

    private func switchToRangeProbe(_ t: Transfer) {
        t.kind = .rangeProbe
        t.attempt = 0
        start(t)
    }

    private func classify(_ code: CURLcode, kind: Transfer.Kind) -> (HTTPError.Reason, Bool) {
        switch code {
        case CURLE_OPERATION_TIMEDOUT:
            return (.timedOut, true)
        case CURLE_COULDNT_CONNECT:
            // Refused mid-run (a server restarting) is a fault in passing; at the probe it is the answer.
            return (.connectFailed, kind == .fetch)
        case CURLE_COULDNT_RESOLVE_HOST, CURLE_COULDNT_RESOLVE_PROXY:
            // A resolver timing out or SERVFAIL looks the same as NXDOMAIN: retry either.
            return (.connectFailed, true)
        case CURLE_PARTIAL_FILE, CURLE_RECV_ERROR, CURLE_SEND_ERROR, CURLE_GOT_NOTHING,
             CURLE_HTTP2, CURLE_HTTP2_STREAM, CURLE_HTTP3:
            return (.transport(code: Int32(code.rawValue)), true)
        case CURLE_SSL_CONNECT_ERROR:
            // The handshake failed or was reset (a middlebox, an overloaded server).
            return (.tls, true)
        case CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CERTPROBLEM,
             CURLE_SSL_CIPHER, CURLE_SSL_CACERT_BADFILE, CURLE_SSL_ISSUER_ERROR,
             CURLE_SSL_PINNEDPUBKEYNOTMATCH, CURLE_SSL_INVALIDCERTSTATUS, CURLE_SSL_ENGINE_NOTFOUND,
             CURLE_SSL_CRL_BADFILE, CURLE_SSL_SHUTDOWN_FAILED:
            return (.tls, false)
        case CURLE_TOO_MANY_REDIRECTS:
            return (.tooManyRedirects, false)
        default:
            return (.transport(code: Int32(code.rawValue)), false)
        }
    }

    private func scheduleRetry(_ t: Transfer) {
        stats.retries += 1
        let delay = min(config.retryBaseDelay * Double(1 << min(t.attempt - 1, 20)), config.retryMaxDelay)
        t.retryAt = monotonicNanos() + UInt64(delay * 1e9)
        retryQueue.append(t)
        armRetryTimer()
    }

    private func armRetryTimer() {
        guard let due = retryQueue.map(\.retryAt).min() else { return arm(retryTimerFD, nanosFromNow: nil) }
        let now = monotonicNanos()
        arm(retryTimerFD, nanosFromNow: due > now ? due - now : 0)
    }

    private func startDueRetries() {
        let now = monotonicNanos()
        let due = retryQueue.filter { $0.retryAt <= now }
        retryQueue.removeAll { $0.retryAt <= now }
        for t in due { start(t) }
        armRetryTimer()
    }

    /// Takes an attempt's easy handle back into the pool.
    private func detach(_ t: Transfer) {
        active.removeValue(forKey: t.id)
        guard let e = t.easy else { return }
        curl_multi_remove_handle(multi, e)
        t.easy = nil
        t.freeHeaders()
        if pool.count < config.maxConnections * 2 { pool.append(e) } else { curl_easy_cleanup(e) }
    }

    private func finish(_ t: Transfer, _ result: Result<Void, HTTPError>) {
        if case .failure = result { stats.errors += 1 }
        finished.append((t, result))
    }

    private func runCompletions() {
        while !finished.isEmpty {
            let batch = finished
            finished = []
            for (t, result) in batch {
                let c = t.completion
                t.release()
                c?(result)
            }
        }
    }
}

/// Content-Range "bytes FIRST-LAST/TOTAL" (TOTAL may be "*").
func parseContentRange(_ value: String) -> (first: UInt64, last: UInt64, total: UInt64?)? {
    let v = value.trimmingWhitespace()
    guard v.lowercased().hasPrefix("bytes ") else { return nil }
    let rest = v.dropFirst(6)
    guard let dash = rest.firstIndex(of: "-"), let slash = rest.firstIndex(of: "/"), dash < slash,
          let first = UInt64(rest[..<dash]),
          let last = UInt64(rest[rest.index(after: dash)..<slash]), first <= last else { return nil }
    let totalText = rest[rest.index(after: slash)...]
    if totalText == "*" { return (first, last, nil) }
    guard let total = UInt64(totalText), last < total else { return nil }
    return (first, last, total)
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
    /// Body bytes not yet the caller's: the 206 lacked the image's validator.
    var held: [UInt8] = []

    // Per attempt.
    var headers = Headers()
    var status = 0
    var checked = false
    var bodyOK = false
    var failure: HTTPError.Reason?
    var hold = false
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
