// CachingFetch: fetched bytes into the cache file. Planned runs start on the
// fetcher (RunFetcher.swift); their bytes land in the cache file as they
// arrive (staged to the O_DIRECT alignment), whole pages become present, and
// the requests waiting on them are served (FetchPlanner's outcomes).
import CUring
import Glibc
import PageCache

extension CachingHandler {
    // MARK: Fetching

    func startRuns(_ queue: IOQueue) {
        for run in planner.startableRuns() {
            trace?("fetch \(run.firstPage)+\(run.pageCount)")
            runBytes[run.id] = 0
            // A verified image whose tree is fetched on demand: its hash blocks first.
            if verifier != nil && !runMayStart(run, queue: queue) { continue }
            fetcher.start(run, handler: self, queue: queue)
        }
        armPoll(queue)
    }

    /// Pages whose data was just written into the cache file: present (in memory;
    /// on disk after the next full cycle's data sync).
    func markPresent(_ pages: Range<UInt64>) {
        trace?("present \(pages)")
        if bitmap.markPresent(pages) > 0 { unsyncedPresent.append(pages) }
    }

    /// Body bytes of `run` at `offset`: into the cache file; completed pages become present.
    func received(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: IOQueue) -> Bool {
        guard bytes.baseAddress != nil else { return true }
        // A verified image: the bytes are checked before any of them is written (CachingVerify.swift);
        // of a chunk with a block that does not match, only the blocks before it are.
        if verifier != nil, let good = verifyReceived(run, offset: offset, bytes: bytes) {
            if good > 0 { _ = writeFetched(run, offset: offset, bytes: UnsafeRawBufferPointer(rebasing: bytes[0..<good]), queue: queue) }
            return false
        }
        return writeFetched(run, offset: offset, bytes: bytes, queue: queue)
    }

    /// Body bytes, checked: into the cache file; completed pages become present.
    func writeFetched(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: IOQueue) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        if context.directAlignment > 0 { return receivedDirect(run, offset: offset, bytes: bytes, queue: queue) }
        let w = queue.writeNow(fd: cacheFD, from: base, length: bytes.count, offset: offset)
        if w < 0 {
            log("ublk-http: cache file write failed: \(Errno(returned: w))")
            return false
        }
        return wroteFetched(run, upTo: offset + UInt64(bytes.count), queue: queue)
    }

    /// Direct I/O: fetched bytes reach the cache file in aligned pieces from an
    /// aligned buffer. What arrives is appended to the run's staging buffer;
    /// every whole alignment unit staged is written at once (runs start on a
    /// page, so the file offsets are aligned), the rest waits for the next
    /// bytes. The run's last bytes, at the image end, are written padded with
    /// zeros to the alignment: past the image, before the trailer (which
    /// starts at the image end rounded up to 4096, and alignments are at most
    /// 4096). A chunk that is already aligned (a backing store read) is
    /// written from where it is.
    func receivedDirect(_ run: FetchRun, offset: UInt64, bytes: UnsafeRawBufferPointer, queue: IOQueue) -> Bool {
        let align = context.directAlignment
        let runEnd = run.offset + UInt64(run.length)
        let end = offset + UInt64(bytes.count)
        func write(_ from: UnsafeRawPointer, _ length: Int, at: UInt64) -> Bool {
            let w = queue.writeNow(fd: cacheFD, from: from, length: length, offset: at)
            if w < 0 { log("ublk-http: cache file write failed: \(Errno(returned: w))") }
            return w >= 0
        }
        var st = staging[run.id] ?? Staging()
        if st.count == 0, Int(bitPattern: bytes.baseAddress!) % 4096 == 0, offset % UInt64(align) == 0, bytes.count % align == 0 {
            guard write(bytes.baseAddress!, bytes.count, at: offset) else { return false }
            return wroteFetched(run, upTo: end, queue: queue)
        }
        // Where the staged bytes start in the file: an aligned offset.
        let stageStart = offset - UInt64(st.count)
        let need = (st.count + bytes.count + align - 1) / align * align
        if st.capacity < need {
            let capacity = max(need, 64 << 10)
            var raw: UnsafeMutableRawPointer?
            guard posix_memalign(&raw, 4096, capacity) == 0, let buf = raw else { return false }
            if let old = st.buffer { memcpy(buf, old, st.count); free(old) }
            st.buffer = buf
            st.capacity = capacity
        }
        let sb = st.buffer!
        memcpy(sb + st.count, bytes.baseAddress!, bytes.count)
        st.count += bytes.count
        var writeLen = st.count / align * align
        if end == runEnd && writeLen < st.count {
            // The image's last bytes: the block is padded with zeros.
            writeLen = need
            memset(sb + st.count, 0, writeLen - st.count)
        }
        staging[run.id] = st
        guard writeLen > 0 else { return true }
        guard write(sb, writeLen, at: stageStart) else { return false }
        let left = max(st.count - writeLen, 0)
        if left > 0 { memmove(sb, sb + writeLen, left) }
        staging[run.id]!.count = left
        return wroteFetched(run, upTo: min(stageStart + UInt64(writeLen), runEnd), queue: queue)
    }

    /// The cache file holds `run`'s bytes up to `upTo`: the whole pages among them are present.
    func wroteFetched(_ run: FetchRun, upTo: UInt64, queue: IOQueue) -> Bool {
        let before = runBytes[run.id] ?? 0
        let after = upTo - run.offset
        if after <= before { return true }
        runBytes[run.id] = after
        // Whole pages now written (the run's last page may be short at the image end).
        let pagesBefore = before / pageSize
        var pagesAfter = after / pageSize
        if after == UInt64(run.length) { pagesAfter = run.pageCount }
        if pagesAfter > pagesBefore {
            markPresent(run.firstPage + pagesBefore..<run.firstPage + pagesAfter)
            verifiedFetched(run.firstPage + pagesBefore..<run.firstPage + pagesAfter)
            serve(planner.progress(run: run.id, pagesDone: pagesAfter), queue)
        }
        return true
    }

    /// `error`: nil on success, else what failed (logged).
    func runEnded(_ run: FetchRun, error fetchError: String?, queue: IOQueue) {
        var error = fetchError
        // A verified image's first mismatch in a run fetches the rest of the run once more.
        if verifier != nil {
            switch verifyRunEnded(run, queue: queue) {
            case .asIs: break
            case .fetchedAgain: return
            case .failed(let why): error = why
            }
        }
        let got = runBytes.removeValue(forKey: run.id) ?? 0
        if let s = staging.removeValue(forKey: run.id), let b = s.buffer { free(b) }
        if let e = error {
            log("ublk-http: fetch of bytes \(run.offset)-\(run.offset + UInt64(run.length) - 1) failed: \(e)")
            filling.lastFetchError = e
            serve(planner.complete(run: run.id, success: false), queue)
        } else if got < UInt64(run.length) {
            log("ublk-http: fetch of bytes \(run.offset)-\(run.offset + UInt64(run.length) - 1) ended short (\(got) bytes)")
            serve(planner.complete(run: run.id, success: false), queue)
        } else {
            serve(planner.complete(run: run.id, success: true), queue)
        }
        verifier?.failingPage = nil
        if planner.plannedRunCount > 0 && !draining { startRuns(queue) }
    }

    func serve(_ outcome: RunOutcome, _ queue: IOQueue) {
        let now = monotonicNanos()
        for ctx in outcome.satisfied {
            if ctx >= FillJob.contextBase { fillOutcome(ctx, ok: true); continue }
            let tag = UInt16(ctx)
            guard slots[Int(tag)].stage == .waitingFetch, let r = slots[Int(tag)].request else { continue }
            if r.op == Op.read { context.stats.missLatency.record(nanoseconds: now &- slots[Int(tag)].missStart) }
            proceed(r, queue: queue)
        }
        for ctx in outcome.failed {
            if ctx >= FillJob.contextBase { fillOutcome(ctx, ok: false); continue }
            let tag = UInt16(ctx)
            guard slots[Int(tag)].stage == .waitingFetch else { continue }
            // A verified image's run that failed its check: a request that does not
            // need the page that did not match is planned again (CachingVerify.swift).
            // A few times at most (runs shared with other readers may fail for other pages): never a loop.
            if let bad = verifier?.failingPage, let r = slots[Int(tag)].request, slots[Int(tag)].replans < 8,
               !planner.pages(offset: r.offset, length: Int(r.length)).contains(bad) {
                slots[Int(tag)].stage = .idle
                slots[Int(tag)].request = nil
                slots[Int(tag)].replans += 1
                handle(r, queue: queue)
                continue
            }
            // A read over a local backing store (the `cache` target) whose pages the cache
            // file could not take (full, EIO) reads them through, as a miss not admitted
            // does: the backing store is the data. A backing store that failed fails it again.
            if let r = slots[Int(tag)].request, r.op == Op.read, io.sourceFD >= 0 {
                context.stats.readsThrough += 1
                readFromCache(r, through: true, queue: queue)
            } else {
                finish(tag, -EIO, queue)
            }
        }
    }
}
