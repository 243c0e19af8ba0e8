// HTTPSource, responses: whether a response may deliver bytes, and the
// validators that decide whether held bytes are the image's.
//
// Contract:
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
import CCurl

extension HTTPSource {
    /// Body bytes of the current attempt (curl's write callback).
    func received(_ t: Transfer, _ bytes: UnsafeRawBufferPointer) -> Int {
        let n = bytes.count
        if !t.checked {
            t.checked = true
            t.status = responseCode(t)
            t.bodyOK = checkResponse(t)
        }
        if t.failure != nil { return ccurl_writefunc_error }
        guard t.bodyOK else { return n } // an error page we will retry or report: swallow it
        stats.bytesFetched += UInt64(n)
        progressed(t, first: !t.bodySeen)
        t.bodySeen = true
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

    func responseCode(_ t: Transfer) -> Int {
        var code = 0
        if let e = t.easy { ccurl_easy_getinfo_long(e, CURLINFO_RESPONSE_CODE, &code) }
        return code
    }

    /// Decides, at the first body byte (or at the end when there is no body),
    /// whether the response may deliver data. Sets `t.failure` for final errors.
    func checkResponse(_ t: Transfer) -> Bool {
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

    // MARK: Validators

    /// Holds `t`'s bytes until a HEAD started after its 206 arrived sees the
    /// image's size and validators; then delivers them, or fails `t` as a
    /// changed image does. Fetches waiting at once share one HEAD.
    func revalidate(_ t: Transfer) {
        awaitingCheck.append(t)
        startCheck()
    }

    private func startCheck() {
        guard !checkInFlight, let first = awaitingCheck.first else { return }
        // The HEAD goes to the mirror that sent the bodies it decides.
        let batch = awaitingCheck.filter { $0.mirror == first.mirror }
        awaitingCheck.removeAll { $0.mirror == first.mirror }
        checkInFlight = true
        checking = batch
        let h = Transfer(id: nextID, kind: .head, offset: 0, length: 0)
        nextID += 1
        h.startedAt = monotonicNanos()
        h.pinned = first.mirror
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
