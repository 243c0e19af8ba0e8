// HTTPSource, attempts: how an attempt ends (success, retry, a final error,
// a redirect, the probe's fallback to a Range GET) and the retry backoff.
//
// Contract:
// - Retries: 5xx/429, timeouts, resets, short bodies, and the transient
//   network faults (a name that did not resolve, a TLS handshake that failed
//   or was reset, a refused connection) are retried with exponential backoff,
//   up to `maxAttempts` attempts in all; a retry asks only for the bytes not
//   yet delivered. Then `completion` runs exactly once, with success or an
//   `HTTPError` naming the URL and status. Answers that would not change
//   (404, 403, a certificate that does not verify, a bad Content-Range) are
//   never retried. The probe retries the same faults except a refused
//   connection, which at `add` time is a prompt error, not a fault in passing.
// - `probe` learns size and validators: HEAD; on 403/405/501, or when HEAD
//   does not announce `Accept-Ranges: bytes`, a GET of `Range: bytes=0-0`
//   (whose Content-Range gives the total). A server that answers a Range GET
//   with 200 is refused (`.rangeIgnored`).
import CCurl

extension HTTPSource {
    /// An attempt ended: finish, retry, or switch HEAD to a Range GET.
    func done(_ t: Transfer, code: CURLcode) {
        if !t.checked {
            t.checked = true
            t.status = responseCode(t)
            t.bodyOK = code == CURLE_OK ? checkResponse(t) : false
        }
        let status = t.status
        let detail = t.errorMessage
        var effective: String?
        var location: String?
        var version = 0
        if let e = t.easy {
            ccurl_easy_getinfo_long(e, CURLINFO_HTTP_VERSION, &version)
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
            if failOver(t, reason, status: status, retryable: retryable) { return }
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
            t.image!.multiplexed = version == ccurl_http_version_2_0 || version == ccurl_http_version_3
            finish(t, .success(()))
        case .rangeProbe:
            if !t.bodyOK { return fail(.status(status), retryable: false) }
            guard let cr = t.headers.contentRange, let total = parseContentRange(cr)?.total else {
                return fail(.noSize, retryable: false)
            }
            if total > config.maxImageSize { return fail(.imageTooLarge(size: total, limit: config.maxImageSize), retryable: false) }
            t.image = RemoteImage(effectiveURL: effective ?? url, size: total, etag: t.headers.etag,
                                  lastModified: t.headers.lastModified, fromHead: false)
            t.image!.multiplexed = version == ccurl_http_version_2_0 || version == ccurl_http_version_3
            finish(t, .success(()))
        case .fetch:
            if !t.bodyOK { return fail(.status(status), retryable: false) }
            if t.delivered + t.held.count < t.length {
                return fail(.shortBody(expected: t.length, got: t.delivered + t.held.count), retryable: true)
            }
            succeeded(t)
            if t.hold { return revalidate(t) }
            stats.fetchLatency.record(nanoseconds: monotonicNanos() - t.startedAt)
            finish(t, .success(()))
        }
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

    func scheduleRetry(_ t: Transfer) {
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

    func startDueRetries() {
        let now = monotonicNanos()
        let due = retryQueue.filter { $0.retryAt <= now }
        retryQueue.removeAll { $0.retryAt <= now }
        for t in due { start(t) }
        armRetryTimer()
    }
}
