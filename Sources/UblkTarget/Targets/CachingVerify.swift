// CachingVerify: a verified image's pages checked against its dm-verity hash
// tree (PageCache/VerityTree.swift) by the home queue. What is checked when:
//
//   - AT FETCH. A run's bytes are hashed as they arrive (`verifyReceived`,
//     before `received` writes them): a page becomes present only after
//     every data block in it matched, because a chunk is checked whole
//     before any of it is written, and a page is marked present only once
//     written. A mismatch aborts the run: nothing more of it is written, the
//     run is fetched once more from its first page not yet present
//     (`verifyRunEnded`), and a second mismatch fails it: the requests
//     waiting on it complete with EIO. The bad bytes were never marked
//     present, so never served, and the next fetch overwrites them.
//   - ON REUSE. Pages found present when the device starts (a cache of an
//     earlier run, a server that died, a cache file written while the device
//     was down: nothing tells these apart, so all of them) are checked on
//     their first use in this run (`verifyReused`, before a request is
//     planned): read from the cache file, hashed; good ones get their bit in
//     `context.verified` (memory only, this run's), bad ones are dropped
//     (their present bit cleared as eviction clears it: persisted by the next
//     full cycle, punched after) and the request fetches them again.
//   - SCRUB (`ublk-http verify`). Every present remote page is read and
//     checked again, verified or not (`scrubStep`, a bounded batch per turn
//     of the loop); bad ones are dropped as above.
//   - THE TREE ON DEMAND (a tree URL, or a tree in the image): the hash blocks
//     a use needs are fetched first (TreeFetcher.swift): a run starts, a
//     request is handled, a scrub batch is checked only once every hash
//     block its pages need verifies; until then the run waits in
//     `runsWaiting`, the request in `requestsWaiting`. A hash block that
//     cannot be fetched, or does not verify once fetched, fails them (EIO).
// Local pages (http --writable) are the user's data, not the image's: they
// are never checked (they count as verified). Peers (-q N) serve a hit only
// when its pages are present AND verified; the rest comes to the home.
// The reads of the cache file here are synchronous (pread), as the writes of
// fetched bytes are (`received`): local file I/O of bounded size, on the
// home's thread, never a wait on the network.
import CUring
import Glibc
import PageCache

/// A verified device's state at the home (one per device).
final class VerifyState {
    let tree: VerityTree
    let verified: PageBits
    /// Each fetch run's stream of bytes being hashed, and where one failed.
    var streams: [RunID: VerityStream] = [:]
    var failedAt: [RunID: UInt64] = [:]
    /// Runs fetched again after a mismatch (a second one fails them).
    var retried: Set<RunID> = []
    /// While a run that failed its check ends: the page that did not match.
    /// Requests that waited on the run for other pages are planned again
    /// (CachingFetch.serve), so only the reads of that page fail.
    var failingPage: UInt64?
    /// A page-aligned buffer for reads of the cache file (`batchPages` pages).
    let buffer: UnsafeMutableRawPointer
    static let batchPages: UInt64 = 64
    /// How far past a run the tree is read ahead (`runMayStart`): 8 MiB of 4 KiB pages.
    static let treeAheadPages: UInt64 = 2048
    /// The tree's fetcher (nil: the whole tree is local), and what waits for it.
    let treeFetcher: TreeFetcher?
    var runsWaiting: [FetchRun] = []
    var requestsWaiting: [Request] = []
    /// The scrub (`verify`), when one ran in this server.
    var scrub: ScrubStatus?
    var scrubCursor: UInt64 = 0
    var scrubStarted: UInt64 = 0

    init(tree: VerityTree, verified: PageBits, pageSize: Int, treeFetcher: TreeFetcher?) {
        self.tree = tree
        self.verified = verified
        self.treeFetcher = treeFetcher
        var raw: UnsafeMutableRawPointer?
        precondition(posix_memalign(&raw, 4096, Int(VerifyState.batchPages) * pageSize) == 0, "out of memory")
        buffer = raw!
    }
    deinit { free(buffer) }
}

/// The reply of `verify` and `verify-status`.
public struct ScrubStatus: Codable, Sendable, Equatable {
    /// running, done, or stopped (the device is stopping).
    public var state: String
    /// Present remote pages when the scrub started, checked so far, and dropped (did not match).
    public var pagesTotal: UInt64
    public var pagesChecked: UInt64
    public var pagesDropped: UInt64
    public var elapsedSeconds: Double

    enum CodingKeys: String, CodingKey {
        case state, pagesTotal = "pages_total", pagesChecked = "pages_checked", pagesDropped = "pages_dropped"
        case elapsedSeconds = "elapsed_seconds"
    }
}

extension CachingHandler {
    // MARK: Verified images

    /// A run's bytes, before they are written: nil when they all belong to
    /// blocks that match (or are not complete yet), else how many of them come
    /// before the block that did not match (the caller writes those; the run ends).
    func verifyReceived(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer) -> Int? {
        guard let v = verifier else { return nil }
        let stream: VerityStream
        if let s = v.streams[run.id] {
            stream = s
        } else {
            stream = v.tree.stream(from: offset)
            v.streams[run.id] = stream
        }
        if stream.feed(bytes) { return nil }
        let block = stream.failed!
        context.stats.verifyFailures += 1
        let again = !v.retried.contains(run.id)
        log("ublk-http: data block \(block) (bytes \(block * UInt64(v.tree.dataBlockSize))+\(v.tree.dataBlockSize)) does not match the verity tree" +
            (again ? "; fetching it again" : " again; failing the reads of it"))
        v.failedAt[run.id] = block
        return stream.goodBytes
    }

    /// Pages just fetched and checked: verified in this run.
    func verifiedFetched(_ pages: Range<UInt64>) {
        guard let v = verifier else { return }
        context.stats.pagesVerified += v.verified.set(pages)
        planner.resumeReadahead(pages)
    }

    /// What a run's end means to verification.
    enum VerifiedEnd: Equatable {
        /// No mismatch: the run ended as the fetcher says.
        case asIs
        /// Its first mismatch: started again from its first page not yet present (it has not ended).
        case fetchedAgain
        /// A mismatch again (or the device is stopping): it failed, for this reason.
        case failed(String)
    }

    func verifyRunEnded(_ run: FetchRun, queue: IOQueue) -> VerifiedEnd {
        guard let v = verifier else { return .asIs }
        v.streams[run.id] = nil
        guard let block = v.failedAt.removeValue(forKey: run.id) else {
            v.retried.remove(run.id)
            return .asIs
        }
        if v.retried.contains(run.id) || draining {
            v.retried.remove(run.id)
            v.failingPage = block * UInt64(v.tree.dataBlockSize) / pageSize
            planner.stopReadahead(before: v.failingPage!)
            return .failed("data block \(block) does not match the image's verity tree")
        }
        v.retried.insert(run.id)
        // Every page up to what was written is present (and good): resume after them.
        let done = (runBytes[run.id] ?? 0) / pageSize * pageSize
        runBytes[run.id] = done
        if let s = staging.removeValue(forKey: run.id), let b = s.buffer { free(b) }
        fetcher.resume(run, from: run.offset + done, handler: self, queue: queue)
        return .fetchedAgain
    }

    /// Before `pages` are used: those present from before this run (not
    /// fetched in it, not local, not checked yet) are read and checked; bad
    /// ones are dropped (absent: the request fetches them). False: their hash
    /// blocks are being fetched first (the request waits: `requestsWaiting`).
    func verifyReused(_ pages: Range<UInt64>, queue: IOQueue) -> Bool {
        guard let v = verifier else { return true }
        if v.treeFetcher != nil, let unchecked = reusedSpan(pages, v), !treeReady(unchecked, v, queue: queue) {
            return false
        }
        var p = pages.lowerBound
        while p < pages.upperBound, let a = v.verified.nextClear(in: p..<pages.upperBound) {
            guard bitmap.test(a) else { p = a + 1; continue }
            if let l = local, l.test(a) {
                _ = v.verified.set(a..<a + 1)
                p = a + 1
                continue
            }
            var e = a + 1
            while e < pages.upperBound && e - a < VerifyState.batchPages && bitmap.test(e) && !v.verified.test(e)
                    && !(local?.test(e) ?? false) { e += 1 }
            checkPresent(a..<e, v, scrub: false)
            p = e
        }
        return true
    }

    /// From the first page of `pages` present and not checked yet to their end
    /// (what `verifyReused` needs the tree for), or nil.
    func reusedSpan(_ pages: Range<UInt64>, _ v: VerifyState) -> Range<UInt64>? {
        var p = pages.lowerBound
        while p < pages.upperBound, let a = v.verified.nextClear(in: p..<pages.upperBound) {
            guard let b = bitmap.bits.nextSet(in: a..<pages.upperBound) else { return nil }
            if !v.verified.test(b) { return b..<pages.upperBound }
            p = b + 1
        }
        return nil
    }

    /// Reads present pages `range` from the cache file and checks them; marks
    /// the good ones verified, drops the bad ones. Returns how many it dropped.
    @discardableResult
    func checkPresent(_ range: Range<UInt64>, _ v: VerifyState, scrub: Bool) -> UInt64 {
        let ps = Int(pageSize)
        let length = Int(min(range.upperBound * pageSize, imageSize) - range.lowerBound * pageSize)
        var got = 0
        while got < length {
            let n = pread(cacheFD, v.buffer + got, (length - got + ps - 1) / ps * ps, off_t(range.lowerBound * pageSize) + off_t(got))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            got += n
        }
        if got < length { memset(v.buffer + got, 0, length - got) }
        var dropped: UInt64 = 0
        for q in range {
            let o = Int(q - range.lowerBound) * ps
            let bytes = UnsafeRawBufferPointer(start: v.buffer + o, count: min(ps, length - o))
            if v.tree.firstBad(offset: q * pageSize, bytes: bytes) == nil {
                if v.verified.set(q..<q + 1) > 0 { context.stats.pagesVerified += 1 }
                continue
            }
            context.stats.verifyFailures += 1
            dropped += 1
            log("ublk-http: page \(q) (bytes \(q * pageSize)+\(ps)) in the cache file does not match the verity tree" +
                (scrub ? " (verify)" : "") + "; dropped, it is fetched again")
            _ = v.verified.clear(q..<q + 1)
            bitmap.markAbsent(q..<q + 1)
            eviction.clearedBits(q..<q + 1)
        }
        return dropped
    }

    // MARK: The tree on demand

    /// The data blocks of `pages` (the image's last page may be short).
    func dataBlocks(_ pages: Range<UInt64>, _ v: VerifyState) -> Range<UInt64> {
        let dbs = UInt64(v.tree.dataBlockSize)
        let end = min(pages.upperBound * pageSize, imageSize)
        return pages.lowerBound * pageSize / dbs..<(end + dbs - 1) / dbs
    }

    /// Whether every hash block `pages` need verifies; if not, those missing are asked for.
    func treeReady(_ pages: Range<UInt64>, _ v: VerifyState, queue: IOQueue) -> Bool {
        guard let tf = v.treeFetcher else { return true }
        let need = v.tree.missing(forData: dataBlocks(pages, v))
        if need.isEmpty { return true }
        tf.request(need)
        armTreePoll(queue)
        return false
    }

    /// A run may start: its hash blocks verify, or it waits for them. The
    /// tree is read ahead too: when the hash block after the run's is missing,
    /// those of the next `VerifyState.treeAheadPages` pages are asked for, so
    /// that a sequential reader's next runs do not wait a round trip each.
    func runMayStart(_ run: FetchRun, queue: IOQueue) -> Bool {
        guard let v = verifier, let tf = v.treeFetcher else { return true }
        let pages = run.firstPage..<run.firstPage + run.pageCount
        let ready = treeReady(pages, v, queue: queue)
        let next = pages.upperBound..<min(pages.upperBound + 1, bitmap.pageCount)
        if !next.isEmpty, !v.tree.missing(forData: dataBlocks(next, v)).isEmpty {
            let ahead = pages.upperBound..<min(pages.upperBound + VerifyState.treeAheadPages, bitmap.pageCount)
            tf.request(v.tree.missing(forData: dataBlocks(ahead, v)))
            armTreePoll(queue)
        }
        if ready { return true }
        v.runsWaiting.append(run)
        return false
    }

    func armTreePoll(_ queue: IOQueue) {
        guard let tf = verifier?.treeFetcher, !tf.pollArmed, !tf.isIdle else { return }
        tf.pollArmed = true
        queue.poll(fd: tf.pollFD, data: Event.tree.rawValue)
    }

    func treePollFired(_ queue: IOQueue) {
        guard let tf = verifier?.treeFetcher else { return }
        tf.pollArmed = false
        tf.perform()
        armTreePoll(queue)
    }

    /// A transfer of hash blocks ended: what waited for them goes on, or
    /// fails when a block it needs is neither there (verified) nor on its way.
    func treeArrived(_ queue: IOQueue) {
        guard let v = verifier, let tf = v.treeFetcher else { return }
        func state(_ pages: Range<UInt64>) -> Bool? {
            let need = v.tree.missing(forData: dataBlocks(pages, v))
            if need.isEmpty { return true }
            return need.allSatisfy { tf.inFlight.contains($0) } ? nil : false
        }
        let why = "the image's verity tree: " + (tf.lastError ?? "hash blocks that do not verify")
        let runs = v.runsWaiting
        v.runsWaiting = []
        for run in runs {
            switch draining ? false : state(run.firstPage..<run.firstPage + run.pageCount) {
            case true?: fetcher.start(run, handler: self, queue: queue)
            case nil: v.runsWaiting.append(run)
            case false?: runEnded(run, error: why, queue: queue)
            }
        }
        let requests = v.requestsWaiting
        v.requestsWaiting = []
        for r in requests {
            let span = reusedSpan(planner.pages(offset: r.offset, length: Int(r.length)), v)
            switch draining ? false : span.map(state) ?? true {
            case true?: handle(r, queue: queue)
            case nil: v.requestsWaiting.append(r)
            case false?:
                log("ublk-http: a request at byte \(r.offset) fails: \(why)")
                completeSlot(r.tag, -EIO, queue)
            }
        }
        armPoll(queue)
    }

    /// The device stops: what waits for the tree ends (EIO, failed runs).
    func verifyDrain() {
        verifier?.treeFetcher?.cancelAll()
    }

    // MARK: The scrub (`ublk-http verify`)

    func verifyControl(_ request: ControlRequest, queue: IOQueue) -> String? {
        switch request.op {
        case .verify:
            guard let v = verifier else { return controlError("ublk\(queue.deviceID) is not a verified image (add it with --verity-root)") }
            if v.scrub?.state != "running" {
                var total: UInt64 = 0
                var p: UInt64 = 0
                while p < bitmap.pageCount, let a = bitmap.bits.nextSet(in: p..<bitmap.pageCount) {
                    let e = bitmap.bits.nextClear(in: a..<bitmap.pageCount) ?? bitmap.pageCount
                    total += e - a - (local.map { l in (a..<e).reduce(0) { $0 + (l.test($1) ? 1 : 0) } } ?? 0)
                    p = e
                }
                v.scrub = ScrubStatus(state: "running", pagesTotal: total, pagesChecked: 0, pagesDropped: 0, elapsedSeconds: 0)
                v.scrubCursor = 0
                v.scrubStarted = monotonicNanos()
            }
            return controlJSON(scrubStatus(v))
        case .verifyStatus:
            guard let v = verifier else { return controlError("ublk\(queue.deviceID) is not a verified image (add it with --verity-root)") }
            guard v.scrub != nil else { return controlError("no verify ran on ublk\(queue.deviceID) since its server started") }
            return controlJSON(scrubStatus(v))
        default:
            return nil
        }
    }

    func scrubStatus(_ v: VerifyState) -> ScrubStatus {
        var s = v.scrub!
        if s.state == "running" { s.elapsedSeconds = Double(monotonicNanos() &- v.scrubStarted) / 1e9 }
        return s
    }

    /// One batch of the scrub (from `idle`): the next present remote pages,
    /// checked whether verified or not. Pages under I/O wait for a later turn.
    func scrubStep(_ queue: IOQueue) {
        guard let v = verifier, var s = v.scrub, s.state == "running" else { return }
        if draining {
            s.state = "stopped"
            v.scrub = s
            return
        }
        let n = bitmap.pageCount
        let pinned = pinnedRanges()
        var budget = VerifyState.batchPages * 4
        var p = v.scrubCursor
        while budget > 0, p < n, let a = bitmap.bits.nextSet(in: p..<n) {
            if (local?.test(a) ?? false) || planner.run(covering: a) != nil { p = a + 1; continue }
            if pinned.contains(where: { $0.contains(a) }) { break }
            var e = a + 1
            while e < n && e - a < min(VerifyState.batchPages, budget) && bitmap.test(e) && !(local?.test(e) ?? false)
                    && planner.run(covering: e) == nil && !pinned.contains(where: { $0.contains(e) }) { e += 1 }
            if !treeReady(a..<e, v, queue: queue) { break }
            s.pagesDropped += checkPresent(a..<e, v, scrub: true)
            s.pagesChecked += e - a
            budget -= e - a
            p = e
        }
        v.scrubCursor = p
        if p >= n || bitmap.bits.nextSet(in: p..<n) == nil {
            s.state = "done"
            s.elapsedSeconds = Double(monotonicNanos() &- v.scrubStarted) / 1e9
            s.pagesChecked = max(s.pagesChecked, 0)
        }
        v.scrub = s
    }

    /// The scrub has pages left to check (the loop comes back to it).
    var scrubRunning: Bool { verifier?.scrub?.state == "running" }
}
