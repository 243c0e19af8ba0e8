// CachingWriteback: the cache target's write-back, one run at a time (the
// throttle): present write-back pages with no write in flight are copied to
// the backing store; their bits are cleared by the next full cycle, after
// the backing store's fdatasync. `WritebackCopy` owns that state and answers
// with values; the handler runs its I/O on the ring.
import CUring
import Glibc
import PageCache

/// Write-back's state: the one run being copied (read from the cache file,
/// then written to the backing store), where the search for the next run
/// starts, and the runs copied whose bits wait for a full cycle.
struct WritebackCopy {
    static let runPages: UInt64 = 256

    private struct Run {
        let pages: Range<UInt64>
        let buffer: UnsafeMutableRawPointer
        let offset: UInt64
        let length: Int
        var done = 0
        /// A write touched the pages meanwhile: the copy is stale, their bits stay set.
        var dirtied = false
    }
    private var run: Run?
    private var cursor: UInt64 = 0
    /// Pages whose backing store copy is current (copied, or set ahead by
    /// region and never written): bits to clear at the next full cycle.
    let copied: PageBits

    init(pageCount: UInt64) { copied = PageBits(pageCount: pageCount) }

    /// The pages of the copy in flight.
    var pages: Range<UInt64>? { run?.pages }
    var isCopying: Bool { run != nil }
    /// Copied pages wait for a full cycle to clear their bits.
    var hasCopied: Bool { copied.count > 0 }

    /// The next run to copy: write-back pages (at most `runPages`) not copied
    /// yet, from the cursor on (wrapping once), that the cache file holds
    /// (`present`) and no write fills (`busy`). Nil when there is none now.
    mutating func next(writeback: PageBits, present: PageBits, busy: (Range<UInt64>) -> Bool) -> Range<UInt64>? {
        guard run == nil else { return nil }
        let all = 0..<writeback.pageCount
        var from = cursor
        var first: UInt64?
        for _ in 0..<2 {
            var p = from
            while p < all.upperBound, let s = writeback.nextSet(in: p..<all.upperBound) {
                if copied.test(s) { p = copied.nextClear(in: s..<all.upperBound) ?? all.upperBound; continue }
                first = s
                break
            }
            if first != nil { break }
            from = 0
        }
        guard let first else { return nil }
        let limit = min(first + WritebackCopy.runPages, all.upperBound)
        var end = writeback.nextClear(in: first..<limit) ?? limit
        end = copied.nextSet(in: first..<end) ?? end
        // Only what the cache file holds, and no page a write is still filling:
        // the backing store never gets bytes that are not the data.
        end = present.nextClear(in: first..<end) ?? end
        cursor = max(first + 1, end)
        if end == first || busy(first..<end) { return nil }
        return first..<end
    }

    /// The copy of `pages` (`length` bytes at `offset`) begins, into `buffer` (freed when it ends).
    mutating func begin(_ pages: Range<UInt64>, buffer: UnsafeMutableRawPointer, offset: UInt64, length: Int) {
        run = Run(pages: pages, buffer: buffer, offset: offset, length: length)
    }

    /// A write into `pages` begins: a copy of them in flight or done is stale.
    mutating func written(_ pages: Range<UInt64>) {
        if let r = run, r.pages.overlaps(pages) { run!.dirtied = true }
        if copied.count > 0 { _ = copied.clear(pages) }
    }

    /// `pages`' write-back bits were set ahead of any write (by region): the
    /// backing store holds their data, so they are not copied, and their bits
    /// go at the next full cycle unless a write comes first.
    func setAhead(_ pages: Range<UInt64>) { _ = copied.set(pages) }

    /// What the handler does next for the copy in flight.
    enum Step: Equatable {
        /// Write `length` bytes from `buffer` to the backing store at `offset`.
        case write(buffer: UnsafeMutableRawPointer, offset: UInt64, length: Int)
        /// The run is on the backing store: the next one may start.
        case copied
        /// The copy failed or was short: its bits stay set, tried again later.
        case ended
    }

    /// The read from the cache file completed with `result`.
    mutating func read(_ result: Int32) -> Step {
        guard let r = run else { return .ended }
        // Read it all (a page cache read is rarely short), then write it out.
        guard result > 0, Int(result) >= r.length else { return end() }
        return .write(buffer: r.buffer, offset: r.offset, length: r.length)
    }

    /// A write to the backing store completed with `result`. `busy`: whether
    /// a write in flight covers the pages (then their bits stay set).
    mutating func wrote(_ result: Int32, busy: (Range<UInt64>) -> Bool) -> Step {
        guard var r = run else { return .ended }
        guard result > 0 else { return end() }  // the bits stay set: tried again later
        r.done += Int(result)
        run = r
        if r.done < r.length {
            return .write(buffer: r.buffer + r.done, offset: r.offset + UInt64(r.done), length: r.length - r.done)
        }
        // On the backing store now; the bits are cleared by the next full cycle, after its fdatasync.
        if !r.dirtied && !busy(r.pages) { _ = copied.set(r.pages) }
        _ = end()
        return .copied
    }

    /// The copied runs, for a cycle that clears their bits (none are left).
    func takeCopied() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for w in copied.takeChanged() where copied.word(w) != 0 {
            let first = UInt64(w) << 6, end = min(first + 64, copied.pageCount)
            var p = first
            while p < end, let a = copied.nextSet(in: p..<end) {
                let b = copied.nextClear(in: a..<end) ?? end
                if let last = out.last, last.upperBound == a { out[out.count - 1] = last.lowerBound..<b } else { out.append(a..<b) }
                p = b
            }
        }
        for r in out { _ = copied.clear(r) }
        _ = copied.takeChanged()
        return out
    }

    private mutating func end() -> Step {
        if let r = run { free(r.buffer) }
        run = nil
        return .ended
    }
}

extension CachingHandler {
    // MARK: Write-back

    /// Copies the next run of write-back pages (one at a time: the throttle)
    /// from the cache file to the backing store.
    func startWriteback(_ queue: IOQueue) {
        guard let wb = writeback, wb.count > 0,
              let pages = writebackCopy.next(writeback: wb.bits, present: bitmap.bits,
                                             busy: { self.writeInFlight(overlapping: $0) }) else { return }
        let ps = UInt64(context.pageSize)
        let offset = pages.lowerBound * ps
        let length = Int(min(pages.upperBound * ps, imageSize) - offset)
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, (length + 4095) & ~4095) == 0, let buf = raw else { return }
        writebackCopy.begin(pages, buffer: buf, offset: offset, length: length)
        trace?("write-back copy \(pages)")
        queue.read(fd: cacheFD, into: buf, length: UInt32(length), offset: offset,
                   tag: Queue.internalTag, sub: Sub.writebackRead.rawValue)
    }

    func writebackProgress(_ sub: Sub, _ result: Int32, queue: IOQueue) {
        guard let pages = writebackCopy.pages else { return }
        if result <= 0 {
            let ps = UInt64(context.pageSize)
            log("ublk-http: write-back of bytes \(pages.lowerBound * ps)-\(min(pages.upperBound * ps, imageSize) - 1) failed: \(result < 0 ? "\(Errno(returned: result))" : "short")")
        }
        let step = sub == .writebackRead ? writebackCopy.read(result)
                                         : writebackCopy.wrote(result, busy: { self.writeInFlight(overlapping: $0) })
        switch step {
        case .write(let buffer, let offset, let length):
            queue.write(fd: context.backingFD, from: buffer, length: UInt32(length), offset: offset,
                        tag: Queue.internalTag, sub: Sub.writebackWrite.rawValue)
        case .copied:
            startWriteback(queue)
        case .ended:
            break
        }
    }

    /// The pages of every write (or discard) in flight, or waiting for its intent bits.
    func writesInFlight() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for (t, s) in slots.map(\.stage).enumerated() where s == .writing || s == .waitingIntent || s == .waitingAck {
            if let r = slots[t].request { out.append(planner.pages(offset: r.offset, length: Int(r.length))) }
        }
        return out
    }

    /// Whether a write (or discard) in flight, or waiting for its intent bits, covers one of `pages`.
    func writeInFlight(overlapping pages: Range<UInt64>) -> Bool {
        for (t, s) in slots.map(\.stage).enumerated() where s == .writing || s == .waitingIntent || s == .waitingAck {
            if let r = slots[t].request, planner.pages(offset: r.offset, length: Int(r.length)).overlaps(pages) { return true }
        }
        return false
    }
}
