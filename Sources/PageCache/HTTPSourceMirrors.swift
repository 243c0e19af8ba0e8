// HTTPSource, mirrors: one image served from several URLs (`HTTPConfig.mirrors`
// after the URL), each attempt sent to one of them.
//
// Contract (with one URL nothing here changes what a source does):
// - Choice: each attempt goes to the first mirror, in the order given, that
//   is up and whose time to a first body byte (a moving average) is within
//   twice the best one's; a mirror not measured yet counts as fast, and one
//   not measured with nothing in flight is chosen first, so the first
//   requests measure every mirror.
// - Slow: an attempt that has had no body byte for twice the time the
//   fastest other mirror takes (and twice its own mirror's usual time) moves
//   there, once per request, and its mirror counts as that slow: a burst
//   sent to a slow mirror before it was measured waits about twice the fast
//   one's time, not the slow one's.
// - Down: an attempt that fails as a fault in passing (what is retried with
//   one URL: 5xx, resets, refused, timeouts, short bodies) puts its mirror
//   down for a while (0.5 s, doubling per failure in a row up to 30 s) and
//   the request is sent again at once to a mirror that is up, asking only
//   for the bytes not yet delivered. With none up, the usual backoff applies
//   and the mirror whose down time ends first is tried.
// - Stalled: a mirror with requests in flight that delivers no byte for
//   `stallTimeout` is put down the same way and every request on it moves to
//   a mirror that is up (a mirror that stops answering mid-body is left
//   within that time, not after curl's low-speed limit).
// - Refused: a mirror whose answer is wrong for this image (another size or
//   validator, 404, 403, a Range it ignores, a TLS certificate that does not
//   verify...) is not used again by this source; the request moves on. Every
//   206 is checked against the image's size and validators, whichever mirror
//   sent it, so a mirror never delivers another object's bytes.
// - A held body's HEAD (a 206 without validators: see HTTPSourceResponses)
//   goes to the mirror that sent the body.
// - `onMirrorEvent` hears each change of a mirror's state, one line each.
extension HTTPSource {
    /// One URL the image is served from, as this source has seen it.
    struct Mirror {
        let url: String
        /// Consecutive failed attempts.
        var failures = 0
        /// Not chosen before this (monotonic ns).
        var downUntil: UInt64 = 0
        /// Why it is not used again (it served something else than the image).
        var refused: HTTPError?
        /// Moving average of an attempt's time to its first body byte (ns; 0: not measured).
        var latency: UInt64 = 0
        /// Attempts in flight, and when one of them last made progress.
        var active = 0
        var lastProgress: UInt64 = 0
    }

    var hasMirrors: Bool { mirrors.count > 1 }

    /// The mirror for a new attempt of `t` (its pinned one, if any).
    func chooseMirror(for t: Transfer) -> Int {
        if let p = t.pinned { return p }
        guard hasMirrors else { return 0 }
        let now = monotonicNanos()
        let up = mirrors.indices.filter { mirrors[$0].refused == nil && mirrors[$0].downUntil <= now }
        guard let best = up.map({ mirrors[$0].latency }).min() else {
            // None is up: the one back first (all refused: the first, which fails as it did).
            return mirrors.indices.filter { mirrors[$0].refused == nil }
                .min { mirrors[$0].downUntil < mirrors[$1].downUntil } ?? 0
        }
        if let unmeasured = up.first(where: { mirrors[$0].latency == 0 && mirrors[$0].active == 0 }) { return unmeasured }
        return up.first { mirrors[$0].latency <= 2 * best + 1_000_000 }!
    }

    /// A mirror other than `m` that is up now.
    func anotherUp(than m: Int) -> Bool {
        let now = monotonicNanos()
        return mirrors.indices.contains { $0 != m && mirrors[$0].refused == nil && mirrors[$0].downUntil <= now }
    }

    /// Whether an error that is final with one URL says only that this mirror is wrong.
    static func mirrorSpecific(_ r: HTTPError.Reason) -> Bool {
        switch r {
        case .aborted, .cancelled, .invalidConfig, .imageTooLarge: return false
        default: return true
        }
    }

    /// An attempt of `t` failed with `reason`: with mirrors, marks its mirror
    /// down (a fault in passing) or refused (a wrong answer) and sends `t` to
    /// another that is up at once. False: handle it as with one URL.
    func failOver(_ t: Transfer, _ reason: HTTPError.Reason, status: Int, retryable: Bool) -> Bool {
        guard hasMirrors, t.pinned == nil, t.kind == .fetch else { return false }
        let m = t.mirror
        if retryable {
            markDown(m, because: HTTPError(reason, url: mirrors[m].url, status: status).reasonText)
        } else if HTTPSource.mirrorSpecific(reason) {
            refuse(m, HTTPError(reason, url: mirrors[m].url, status: status))
        } else {
            return false
        }
        let attemptsLeft = t.attempt < config.maxAttempts + mirrors.count - 1
        guard anotherUp(than: m), attemptsLeft else {
            // None other is up: a fault in passing takes the usual backoff; a
            // refusal does too while some mirror is not refused (it is down).
            guard !retryable, mirrors.contains(where: { $0.refused == nil }), attemptsLeft else { return false }
            scheduleRetry(t)
            return true
        }
        moveToAnotherMirror(t)
        return true
    }

    /// Starts `t`'s next attempt (its last one detached), on the mirror chosen now.
    private func moveToAnotherMirror(_ t: Transfer) {
        stats.failovers += 1
        start(t)
    }

    func markDown(_ m: Int, because why: String) {
        let now = monotonicNanos()
        let wasUp = mirrors[m].downUntil <= now
        mirrors[m].failures += 1
        let seconds = min(0.5 * Double(1 << min(mirrors[m].failures - 1, 6)), 30)
        mirrors[m].downUntil = now + UInt64(seconds * 1e9)
        if wasUp { onMirrorEvent?("mirror \(Redact.url(mirrors[m].url)) is down for \(seconds) s: \(why)") }
    }

    func refuse(_ m: Int, _ e: HTTPError) {
        guard mirrors[m].refused == nil else { return }
        mirrors[m].refused = e
        onMirrorEvent?("mirror \(Redact.url(mirrors[m].url)) is no longer used: \(e.reasonText)")
    }

    /// Bytes arrived on `t`'s attempt (`first`: its first body bytes).
    func progressed(_ t: Transfer, first: Bool) {
        guard hasMirrors else { return }
        let now = monotonicNanos()
        let m = t.mirror
        mirrors[m].lastProgress = now
        if first {
            let sample = now - t.attemptStartedAt
            if mirrors[m].latency == 0 {
                mirrors[m].latency = max(sample, 1)
                // The first measure: the next check comes at its pace, not the stall timer's.
                stallTimerArmed = true
                arm(stallTimerFD, nanosFromNow: max(sample, 5_000_000))
            } else {
                mirrors[m].latency = (mirrors[m].latency * 3 + sample) / 4
            }
        }
    }

    /// An attempt of `t` ended well: its mirror is up again.
    func succeeded(_ t: Transfer) {
        guard hasMirrors else { return }
        let m = t.mirror
        if mirrors[m].failures > 0 || mirrors[m].downUntil > monotonicNanos() {
            mirrors[m].failures = 0
            mirrors[m].downUntil = 0
            onMirrorEvent?("mirror \(Redact.url(mirrors[m].url)) answers again")
        }
    }

    func attemptStarted(_ t: Transfer) {
        guard hasMirrors else { return }
        let m = t.mirror
        if mirrors[m].active == 0 { mirrors[m].lastProgress = monotonicNanos() }
        mirrors[m].active += 1
        t.onMirror = true
        armStallTimer()
    }

    func attemptLeft(_ t: Transfer) {
        guard t.onMirror else { return }
        t.onMirror = false
        mirrors[t.mirror].active -= 1
    }

    /// Ticks a quarter of the stall time apart, or as often as the fastest
    /// mirror answers (5 ms at least) once one is measured, to move slow
    /// attempts in time.
    func armStallTimer() {
        guard !stallTimerArmed else { return }
        stallTimerArmed = true
        var tick = UInt64(config.stallTimeout * 1e9 / 4)
        if let fastest = mirrors.map(\.latency).filter({ $0 > 0 }).min() { tick = min(tick, max(fastest, 5_000_000)) }
        arm(stallTimerFD, nanosFromNow: tick)
    }

    /// The stall timer fired: mirrors silent for `stallTimeout` with requests
    /// in flight go down, and their requests move to a mirror that is up.
    func checkStalls() {
        stallTimerArmed = false
        guard hasMirrors else { return }
        let now = monotonicNanos()
        let limit = UInt64(config.stallTimeout * 1e9)
        for m in mirrors.indices where mirrors[m].active > 0 && now > mirrors[m].lastProgress + limit && anotherUp(than: m) {
            markDown(m, because: "no byte for \(config.stallTimeout) s")
            mirrors[m].latency = max(mirrors[m].latency, limit)  // slow, whatever its first bytes took
            for t in activeTransfers where t.mirror == m && t.kind == .fetch && t.pinned == nil {
                detach(t)
                moveToAnotherMirror(t)
            }
        }
        moveSlowAttempts(now: now)
        if mirrors.contains(where: { $0.active > 0 }) { armStallTimer() }
    }

    /// Attempts with no body byte for twice what the fastest other mirror up
    /// takes, and twice what their own usually takes, move there (once per
    /// request); their mirror counts as that slow.
    private func moveSlowAttempts(now: UInt64) {
        for t in activeTransfers where t.kind == .fetch && t.pinned == nil && !t.bodySeen && !t.movedForSpeed {
            let m = t.mirror
            let others = mirrors.indices.filter {
                $0 != m && mirrors[$0].refused == nil && mirrors[$0].downUntil <= now && mirrors[$0].latency > 0
            }
            guard let fastest = others.map({ mirrors[$0].latency }).min(), now > t.attemptStartedAt else { continue }
            let waited = now - t.attemptStartedAt
            guard waited > max(2 * fastest, 10_000_000), waited > 2 * mirrors[m].latency else { continue }
            mirrors[m].latency = max(mirrors[m].latency, waited)
            t.movedForSpeed = true
            detach(t)
            moveToAnotherMirror(t)
        }
    }
}

extension HTTPSource {
    /// What the URL and its mirrors serve, asked at `add`: the first URL that
    /// answers is the image; every other that answers must serve the same size
    /// and validators (else `.mirrorDisagrees`, naming both); one that does not
    /// answer is named in the notes and used once it does (each 206 it sends
    /// is checked then). None answering: the URL's own error.
    public static func probeAll(_ config: HTTPConfig) throws(HTTPError) -> (image: RemoteImage, notes: [String]) {
        var single = config
        single.mirrors = []
        var found: (url: String, image: RemoteImage)?
        var firstError: HTTPError?
        var notes: [String] = []
        for (i, u) in ([config.url] + config.mirrors).enumerated() {
            if i > 0 { single.url = u }
            do throws(HTTPError) {
                let image = try HTTPSource(config: single).probeBlocking()
                guard let (refURL, ref) = found else { found = (u, image); continue }
                if HTTPSource.difference(from: ref, to: image) != nil {
                    func show(_ i: RemoteImage) -> String {
                        "\(i.size) bytes, ETag \(i.etag ?? "none"), Last-Modified \(i.lastModified ?? "none")"
                    }
                    throw HTTPError(.mirrorDisagrees(other: Redact.url(refURL), "\(show(image)), not \(show(ref))"),
                                    url: single.requestURL)
                }
            } catch {
                if case .mirrorDisagrees = error.reason { throw error }
                if firstError == nil { firstError = error }
                if !config.mirrors.isEmpty { notes.append("\(error.description); used once it answers") }
            }
        }
        guard let found else { throw firstError! }
        return (found.image, notes)
    }
}
