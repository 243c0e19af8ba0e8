// CachingWriteback: the cache target's write-back, one run at a time (the
// throttle): present write-back pages with no write in flight are copied to
// the backing store; their bits are cleared by the next full cycle, after
// the backing store's fdatasync.
import CUring
import Glibc
import PageCache

extension CachingHandler {
    // MARK: Write-back

    /// Copies the next run of write-back pages (at most 1 MiB, one at a time:
    /// the throttle) from the cache file to the backing store.
    func startWriteback(_ queue: IOQueue) {
        guard writebackRun == nil, let wb = writeback, wb.count > 0 else { return }
        let all = 0..<wb.pageCount
        // Skip pages already copied and waiting for the next cycle to clear their bits.
        var from = writebackCursor
        var first: UInt64?
        for _ in 0..<2 {
            var p = from
            while p < all.upperBound, let s = wb.bits.nextSet(in: p..<all.upperBound) {
                if let c = writebackCopied.first(where: { $0.contains(s) }) { p = c.upperBound; continue }
                first = s
                break
            }
            if first != nil { break }
            from = 0
        }
        guard let first else { return }
        let limit = min(first + CachingHandler.writebackRunPages, all.upperBound)
        var end = wb.bits.nextClear(in: first..<limit) ?? limit
        if let c = writebackCopied.first(where: { $0.lowerBound > first && $0.lowerBound < end }) { end = c.lowerBound }
        // Only what the cache file holds, and no page a write is still filling:
        // the backing store never gets bytes that are not the data.
        end = bitmap.bits.nextClear(in: first..<end) ?? end
        if end == first || writeInFlight(overlapping: first..<end) {
            writebackCursor = max(first + 1, end)
            return
        }
        let ps = UInt64(context.pageSize)
        let length = Int(min(end * ps, imageSize) - first * ps)
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, (length + 4095) & ~4095) == 0, let buf = raw else { return }
        writebackRun = (first..<end, buf, 0, false)
        trace?("write-back copy \(first..<end)")
        writebackCursor = end
        queue.read(fd: cacheFD, into: buf, length: UInt32(length), offset: first * ps,
                   tag: Queue.internalTag, sub: Sub.writebackRead.rawValue)
    }

    func writebackProgress(_ sub: Sub, _ result: Int32, queue: IOQueue) {
        guard var run = writebackRun else { return }
        let ps = UInt64(context.pageSize)
        let offset = run.pages.lowerBound * ps
        let length = Int(min(run.pages.upperBound * ps, imageSize) - offset)
        func end() {
            free(run.buffer)
            writebackRun = nil
        }
        if result <= 0 {
            log("ublk-http: write-back of bytes \(offset)-\(offset + UInt64(length) - 1) failed: \(result < 0 ? "\(Errno(returned: result))" : "short")")
            return end()  // the bits stay set: tried again later
        }
        if sub == .writebackRead {
            // Read it all (a page cache read is rarely short), then write it out.
            if Int(result) < length { return end() }
            return queue.write(fd: context.backingFD, from: run.buffer, length: UInt32(length), offset: offset,
                               tag: Queue.internalTag, sub: Sub.writebackWrite.rawValue)
        }
        run.done += Int(result)
        writebackRun = run
        if run.done < length {
            return queue.write(fd: context.backingFD, from: run.buffer + run.done, length: UInt32(length - run.done),
                               offset: offset + UInt64(run.done), tag: Queue.internalTag, sub: Sub.writebackWrite.rawValue)
        }
        // On the backing store now; the bits are cleared by the next full cycle, after its fdatasync.
        if !run.dirtied && !writeInFlight(overlapping: run.pages) { writebackCopied.append(run.pages) }
        end()
        startWriteback(queue)
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
