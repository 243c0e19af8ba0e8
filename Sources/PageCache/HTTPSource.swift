// HTTPSource: byte ranges of one remote image over HTTP(S) (or S3 with SigV4),
// through libcurl's multi interface, driven by someone else's event loop. This
// file holds the source's state and the multi driver; the rest is in
// HTTPSourceRequests.swift (what a request sends), HTTPSourceResponses.swift
// (what a response may deliver; validators), HTTPSourceRedirects.swift
// (redirects and credentials) and HTTPSourceAttempts.swift (how an attempt
// ends: retries, the probe's fallbacks).
//
// Contract:
// - Event-loop shape: the source owns an epoll fd (`fd`) holding curl's
//   sockets (CURLMOPT_SOCKETFUNCTION), a timerfd for curl's timeouts
//   (CURLMOPT_TIMERFUNCTION) and a timerfd for retry backoff. The owner polls
//   `fd` for readability and calls `perform()` when it is readable. Nothing
//   here blocks except `runUntilIdle`, the blocking convenience for tests and
//   one-shot tools. Single-threaded: one owner thread calls everything.
// - Callbacks: `onData` runs inside curl's write callback (or, for a held
//   body, from `perform()` after its HEAD) and must not call back into the
//   source. `completion` runs after curl's callbacks have returned (from
//   `perform()`), and may start new fetches.
// - Connections: at most `maxConnections`, kept alive and shared by all
//   requests; easy handles are pooled. HTTP/2 when TLS offers it: requests
//   wait to share a connection (PIPEWAIT) as streams rather than open more;
//   how many the caller keeps in flight is its choice
//   (`RemoteImage.requestsInFlight`: `maxStreams` over HTTP/2, else one per
//   connection).
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
    /// When the curl timer is armed to fire (nil: not armed).
    private var curlTimerDeadline: UInt64?
    let retryTimerFD: Int32
    private let multi: UnsafeMutableRawPointer
    private var registered: Set<Int32> = []
    private var active: [UInt64: Transfer] = [:]
    var retryQueue: [Transfer] = []
    private var finished: [(Transfer, Result<Void, HTTPError>)] = []
    private var pool: [UnsafeMutableRawPointer] = []
    var nextID: UInt64 = 1
    private var events = [epoll_event](repeating: epoll_event(), count: 64)
    private var performing = false
    /// Requests to the URL's origin carry credentials: headers, a user name, S3 signing, a user in the URL.
    let credentialed: Bool
    /// Fetches whose bodies are held for a HEAD not started yet, and those the HEAD in flight decides.
    var awaitingCheck: [Transfer] = []
    var checking: [Transfer] = []
    var checkInFlight = false
    /// The URL and the mirrors after it (HTTPSourceMirrors.swift), and the
    /// timer that looks for a mirror gone silent.
    var mirrors: [Mirror]
    let stallTimerFD: Int32
    var stallTimerArmed = false
    /// One line per change of a mirror's state (down, answering again, no longer used).
    public var onMirrorEvent: ((String) -> Void)?

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
        let t3 = timerfd_create(CLOCK_MONOTONIC, Int32(TFD_CLOEXEC | TFD_NONBLOCK))
        if ep < 0 || t1 < 0 || t2 < 0 || t3 < 0 {
            let e = errno
            for f in [ep, t1, t2, t3] where f >= 0 { close(f) }
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
        self.stallTimerFD = t3
        self.mirrors = ([url] + config.mirrors).map { Mirror(url: $0) }
        for t in [t1, t2, t3] {
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
        close(stallTimerFD)
    }

    /// No request is running, waiting for a retry, or waiting to report.
    public var isIdle: Bool {
        active.isEmpty && retryQueue.isEmpty && finished.isEmpty && awaitingCheck.isEmpty && checking.isEmpty
    }
    public var activeCount: Int { active.count + retryQueue.count + awaitingCheck.count + checking.count }

    // MARK: Requests

    /// Range GET of [offset, offset + length): see HTTPSourceResponses.swift for what it delivers.
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
                    curlTimerDeadline = nil
                    curl_multi_socket_action(multi, ccurl_socket_timeout, 0, &running)
                } else if f == retryTimerFD {
                    drainTimer(f)
                    startDueRetries()
                } else if f == stallTimerFD {
                    drainTimer(f)
                    checkStalls()
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

    /// curl asks for its timer several times per request. The timerfd is set
    /// only when the new deadline comes before the armed one: firing early is
    /// harmless (curl finds nothing due and asks again), and a timerfd_settime
    /// per call was the largest cost of a small fetch (a fifth of its CPU time,
    /// measured with perf). A timer curl cancels is left to fire once.
    private static let timerCallback: curl_multi_timer_callback = { _, timeoutMS, userp in
        let me = Unmanaged<HTTPSource>.fromOpaque(userp!).takeUnretainedValue()
        guard timeoutMS >= 0 else { return 0 }
        let deadline = monotonicNanos() + UInt64(timeoutMS) * 1_000_000
        if let armed = me.curlTimerDeadline, armed <= deadline { return 0 }
        me.curlTimerDeadline = deadline
        me.arm(me.curlTimerFD, nanosFromNow: UInt64(timeoutMS) * 1_000_000)
        return 0
    }

    static let writeCallback: curl_write_callback = { ptr, size, count, userdata in
        let t = Unmanaged<Transfer>.fromOpaque(userdata!).takeUnretainedValue()
        let n = size * count
        return t.source!.received(t, UnsafeRawBufferPointer(start: ptr, count: n))
    }

    static let headerCallback: curl_write_callback = { ptr, size, count, userdata in
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
    func arm(_ timer: Int32, nanosFromNow nanos: UInt64?) {
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

    /// Starts an attempt at the URL (or, with `hop`, the next hop of a redirect).
    func start(_ t: Transfer, hop: Bool = false) {
        if !hop {
            t.attempt += 1
            t.mirror = chooseMirror(for: t)
            t.target = mirrors[t.mirror].url
            t.hops = 0
            t.credentials = true
            t.attemptStartedAt = monotonicNanos()
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
        attemptStarted(t)
        stats.requests += 1
        let r = curl_multi_add_handle(multi, easy)
        if r != CURLM_OK {
            detach(t)
            finish(t, .failure(HTTPError(.transport(code: Int32(r.rawValue)), url: url,
                                         detail: String(cString: curl_multi_strerror(r)))))
            arm(retryTimerFD, nanosFromNow: 0)
        }
    }

    /// The attempts in flight (a copy: detaching one does not disturb it).
    var activeTransfers: [Transfer] { Array(active.values) }

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

    /// Takes an attempt's easy handle back into the pool.
    func detach(_ t: Transfer) {
        active.removeValue(forKey: t.id)
        attemptLeft(t)
        guard let e = t.easy else { return }
        curl_multi_remove_handle(multi, e)
        t.easy = nil
        t.freeHeaders()
        if pool.count < max(config.maxConnections, config.maxStreams) * 2 { pool.append(e) } else { curl_easy_cleanup(e) }
    }

    func finish(_ t: Transfer, _ result: Result<Void, HTTPError>) {
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
