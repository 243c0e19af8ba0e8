// Bitmap, persistence: staging changed words and writing them, in the crash
// order of the bit's kind.
//
// Contract:
// - CRASH RULE (present kind): a bit reaches the disk only after its page's
//   data has. The order is spelled out by the API:
//     1. write the page data into the cache file (pwrite completed);
//     2. `markPresent(pages)`: the bits are set in memory (reads may use the
//        pages now: the data is in the page cache) and their words recorded as changed;
//     3. `let c = stage()`: snapshots every changed word *now*; pages marked
//        after this call are not covered by `c`;
//     4. `cacheFile.sync()` (fdatasync): the data of every page in `c` is durable;
//     5. `persist(c)`: pwrites only the changed words (coalesced into ranges),
//        then fdatasync of the bitmap.
//   `commit(syncing:)` does 3–5 in a row, blocking. Commits are persisted in
//   the order they were staged (one may be skipped: `abandon` it to mark
//   its words changed again); a failed persist marks them changed again.
//   For the dirty kind the order is the reverse (bits before the FLUSH that
//   acknowledges the write): stage, persist, then acknowledge.
import Glibc

extension Bitmap {
    /// Step 3: snapshot every changed word. Cheap; no I/O.
    public func stage() -> BitmapCommit {
        let changed = bits.takeChanged().sorted()
        var values = [UInt64]()
        values.reserveCapacity(changed.count)
        for w in changed { values.append(bits.word(w)) }
        // From now on these words may be on the disk.
        if diskMaySet != nil { for (k, w) in changed.enumerated() { diskMaySet![w] |= values[k] } }
        defer { nextSequence += 1 }
        return BitmapCommit(sequence: nextSequence, indices: changed, values: values)
    }

    /// Step 5: write the snapshotted words (contiguous words in one pwrite),
    /// then fdatasync. Call only after the cache file's data sync (step 4).
    public func persist(_ commit: BitmapCommit) throws(BitmapError) {
        // An older snapshot after a newer one could undo cleared bits: refuse it.
        precondition(commit.sequence >= nextToPersist, "bitmap commits must be persisted in the order staged")
        nextToPersist = commit.sequence + 1
        if commit.isEmpty { return }
        if let failure = writeWords(commit.indices, commit.values) {
            // The words are not known to be on disk: write them again next time.
            markChangedAgain(commit.indices)
            throw .io(failure)
        }
        onDisk(commit)
    }

    /// A staged commit laid out for writing through someone else's I/O (the
    /// queue's io_uring): the words, little-endian, in one buffer, and the
    /// file ranges they go to. The buffer lives as long as this object; the
    /// caller writes every run, fdatasyncs `fd`, then calls `persisted(_:)`
    /// (or `abandon(_:)` when any of it failed).
    public final class PendingWrite {
        public let commit: BitmapCommit
        public let fd: Int32
        public let buffer: UnsafeMutableRawPointer
        /// (file offset, offset in `buffer`, byte count), one per run of contiguous words.
        public let runs: [(fileOffset: UInt64, bufferOffset: Int, count: Int)]

        init(commit: BitmapCommit, fd: Int32) {
            self.commit = commit
            self.fd = fd
            let n = commit.indices.count
            buffer = .allocate(byteCount: max(n, 1) * 8, alignment: 8)
            let words = buffer.bindMemory(to: UInt64.self, capacity: max(n, 1))
            var runs: [(UInt64, Int, Int)] = []
            var i = 0
            while i < n {
                var j = i + 1
                while j < n && commit.indices[j] == commit.indices[j - 1] + 1 { j += 1 }
                for k in i..<j { words[k] = commit.values[k].littleEndian }
                runs.append((UInt64(Bitmap.headerSize) + UInt64(commit.indices[i]) * 8, i * 8, (j - i) * 8))
                i = j
            }
            self.runs = runs
        }

        deinit { buffer.deallocate() }
    }

    /// Step 5 without doing the I/O: what to write for `commit`.
    public func pendingWrite(_ commit: BitmapCommit) -> PendingWrite {
        precondition(commit.sequence >= nextToPersist, "bitmap commits must be persisted in the order staged")
        return PendingWrite(commit: commit, fd: fd)
    }

    /// The words of `commit` were written and the file fdatasync'ed by the caller.
    public func persisted(_ commit: BitmapCommit) {
        precondition(commit.sequence >= nextToPersist, "bitmap commits must be persisted in the order staged")
        nextToPersist = commit.sequence + 1
        onDisk(commit)
    }

    /// Keeps, from now on, which bits may be set in the file (read from it
    /// now; nothing staged may be in flight): `mayBeSetOnDisk` then answers
    /// per page, where a changed word says nothing about the page's own bit.
    public func trackDiskBits() throws(BitmapError) {
        let n = Int((bits.pageCount + 63) / 64)
        var words = [UInt64](repeating: 0, count: n)
        if n > 0 {
            let r = words.withUnsafeMutableBytes { preadFully(fd, $0.baseAddress!, n * 8, UInt64(Bitmap.headerSize)) }
            if case .failure(let e) = r { throw .io(FileError("pread", path: path, errno: e)) }
        }
        for i in 0..<n { words[i] = UInt64(littleEndian: words[i]) }
        diskMaySet = words
    }

    /// Whether one of `pages` may have its bit set in the file (a staged
    /// commit counts as on the disk). Always true without `trackDiskBits`.
    public func mayBeSetOnDisk(_ pages: Range<UInt64>) -> Bool {
        guard let d = diskMaySet else { return true }
        var p = pages.lowerBound
        while p < pages.upperBound {
            let w = Int(p >> 6), lo = p & 63, hi = min(64, lo + (pages.upperBound - p))
            let mask: UInt64 = hi - lo == 64 ? ~0 : ((1 << (hi - lo)) - 1) << lo
            if d[w] & mask != 0 { return true }
            p += hi - lo
        }
        return false
    }

    private func onDisk(_ commit: BitmapCommit) {
        guard diskMaySet != nil else { return }
        for (k, w) in commit.indices.enumerated() { diskMaySet![w] = commit.values[k] }
    }

    /// Whether any word holding `pages` changed since the last `stage()`
    /// (its new value is not on its way to the disk yet).
    public func hasUnstaged(_ pages: Range<UInt64>) -> Bool { bits.hasPendingWords(pages) }

    /// Gives up on a staged commit (its data sync failed or will not happen):
    /// its words are marked changed again, for a later stage.
    public func abandon(_ commit: BitmapCommit) {
        markChangedAgain(commit.indices)
    }

    /// Steps 3–5, blocking: stage, fdatasync the cache file, persist.
    public func commit(syncing cacheFile: CacheFile) throws(BitmapError) {
        let c = stage()
        if c.isEmpty {
            nextToPersist = c.sequence + 1
            return
        }
        do { try cacheFile.sync() } catch {
            abandon(c)
            throw .io(error)
        }
        try persist(c)
    }

    /// pwrites `values` at the words `indices` (sorted; contiguous words in one pwrite), then fdatasync.
    private func writeWords(_ indices: [Int], _ values: [UInt64]) -> FileError? {
        var i = 0
        let n = indices.count
        var run = [UInt64]()
        while i < n {
            var j = i + 1
            while j < n && indices[j] == indices[j - 1] + 1 { j += 1 }
            run.removeAll(keepingCapacity: true)
            for k in i..<j { run.append(values[k].littleEndian) }
            let offset = UInt64(Bitmap.headerSize) + UInt64(indices[i]) * 8
            let r = run.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, $0.count, offset) }
            if case .failure(let e) = r { return FileError("pwrite", path: path, errno: e) }
            i = j
        }
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) { return FileError("fdatasync", path: path, errno: e) }
        return nil
    }

    private func markChangedAgain(_ indices: [Int]) {
        for w in indices { bits.markChanged(w) }
    }
}
