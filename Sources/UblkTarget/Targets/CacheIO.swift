// CacheIO: how one queue of a caching device moves a request's data (WHICH
// DATA PATH A REQUEST TAKES, in CachingHandler.swift's header): a read from
// the cache file (read-through: absent runs from the source) into the
// request; a write's data from the request into the cache file (and, in
// write-through, the backing store). The home (CachingHandler) and the other
// queues (CachingPeer) each move their own requests' data with one, on their
// own ring. It holds no page state: which pages are present, and when a
// request may move its data, is the caller's to know.
import CUring
import Glibc
import PageCache

/// How far a request's data has moved.
struct Transfer {
    /// Bytes moved so far (a read; a write to the cache file).
    var done: UInt32 = 0
    /// A read that reads through: absent runs from `CacheIO.sourceFD`.
    var through = false
    /// Write-through: parts of the write still outstanding (cache, backing),
    /// the backing's progress, and the first part's failure.
    var parts: UInt8 = 0
    var backingDone: UInt32 = 0
    var failed: Int32 = 0
}

final class CacheIO {
    let cacheFD: Int32
    /// Every read reads through (an overlay): absent pages from its lower device.
    let alwaysThrough: Bool
    /// Where a read that reads through takes its absent pages: the overlay's
    /// lower device, or the `cache` target's backing store (-1: none).
    let sourceFD: Int32
    /// Write-through: writes go to this backing store too (-1: they do not).
    let throughFD: Int32
    let imageSize: UInt64
    let pageSize: UInt64
    let pageCount: UInt64
    /// The present bits, tested with atomic loads (read-through runs).
    let presentWords: UnsafePointer<UInt64>
    /// Inline user copy (the cache file lives in memory and the device has
    /// UBLK_F_USER_COPY): the cache file mapped. Request data then moves with
    /// one copy between the cache's pages and the kernel's request pages
    /// (pwrite/pread on /dev/ublkcN), like the loop target's; the tag buffers are unused.
    private(set) var mapping: UnsafeMutableRawPointer?
    private var mappingSize = 0
    /// The cache file lives in memory (tmpfs, ramfs).
    let cacheInMemory: Bool

    init(context: CacheContext) {
        cacheFD = context.dataFD >= 0 ? context.dataFD : context.cache.fd
        alwaysThrough = context.readThroughFD >= 0
        sourceFD = context.readThroughFD >= 0 ? context.readThroughFD : context.backingFD
        throughFD = context.writeThrough ? context.backingFD : -1
        imageSize = context.imageSize
        pageSize = UInt64(context.pageSize)
        pageCount = context.bitmap.pageCount
        presentWords = context.bitmap.bits.sharedWords
        cacheInMemory = CachingHandler.memoryFS.contains(cu_fs_type(cacheFD))
    }

    deinit { if let m = mapping { munmap(m, mappingSize) } }

    /// Maps the cache file for the inline copy. The mapping covers the device
    /// (the image rounded up to 512 bytes, so never past the cache file's last
    /// page): bytes past the end read as zeros.
    func map(_ cache: CacheFile, deviceSize: UInt64) throws(UblkError) {
        guard deviceSize > 0, let m = mmap(nil, Int(deviceSize), PROT_READ | PROT_WRITE, MAP_SHARED, cache.fd, 0),
              m != MAP_FAILED else {
            throw UblkError("cannot map the cache file \(cache.path)", errno: .current)
        }
        mapping = m
        mappingSize = Int(deviceSize)
    }

    var through: Bool { throughFD >= 0 }

    /// The pages a request covers (as FetchPlanner.pages).
    func pages(offset: UInt64, length: Int) -> Range<UInt64> {
        let a = min(offset / pageSize, pageCount)
        let b = min((offset + UInt64(length) + pageSize - 1) / pageSize, pageCount)
        return a..<max(a, b)
    }

    // MARK: Reads

    /// Starts reading `r` into the request: nil when I/O was issued (tagged
    /// `r.tag`, `Sub.read`; `readCompleted` goes on), else the final result.
    func startRead(_ r: Request, _ t: inout Transfer, queue: IOQueue) -> Int32? {
        t.done = 0
        if alwaysThrough || t.through { readNextRun(r, t, queue: queue); return nil }
        if let m = mapping { return copyMapped(r, queue: queue, mapping: m) }
        if r.offset >= imageSize {
            let z = queue.zeroFill(r, at: 0, length: r.length)
            return z < 0 ? z : Int32(r.length)
        }
        if cacheInMemory && queue.dataPath == .kernelCopy {
            // As for loop: io_uring would punt a tmpfs read to an io-wq worker; the copy is cheaper.
            var got: UInt32 = 0
            while true {
                let n = pread(cacheFD, r.buffer + Int(got), Int(r.length - got), off_t(r.offset) + off_t(got))
                if n < 0 && errno == EINTR { continue }
                if let final = r.readProgress(n < 0 ? -errno : Int32(n), done: &got) { return final }
            }
        }
        queue.readIntoRequest(r, at: 0, length: r.length, fd: cacheFD, offset: r.offset, tag: r.tag,
                              sub: CachingHandler.Sub.read.rawValue, data: 0)
        return nil
    }

    /// A read of `r` completed with `result`: the final result, or nil when more was issued.
    func readCompleted(_ r: Request, _ result: Int32, _ t: inout Transfer, queue: IOQueue) -> Int32? {
        // Past the end of the object (the device is rounded up to 512 bytes): zeros.
        if let final = queue.readProgress(r, result, done: &t.done) { return final }
        if alwaysThrough || t.through { readNextRun(r, t, queue: queue); return nil }
        queue.readIntoRequest(r, at: t.done, length: r.length - t.done, fd: cacheFD, offset: r.offset + UInt64(t.done),
                              tag: r.tag, sub: CachingHandler.Sub.read.rawValue, data: 0)
        return nil
    }

    /// Read-through: the next run of `r` from `t.done` on, of pages all present
    /// (from the cache file) or all not (from the source). The bits are
    /// tested anew for each run (with atomic loads: another queue reads them
    /// too); a page that turns present meanwhile is read either way, as a
    /// read racing a write may be. The caller keeps the pages under the read
    /// pinned (the home's `requests`; on another queue, the grace gate), as for a hit.
    private func readNextRun(_ r: Request, _ t: Transfer, queue: IOQueue) {
        let start = r.offset + UInt64(t.done), end = r.offset + UInt64(r.length)
        let first = start / pageSize
        let present = CachingMesh.allSet(presentWords, first..<first + 1)
        var stop = (first + 1) * pageSize
        while stop < end && CachingMesh.allSet(presentWords, stop / pageSize..<stop / pageSize + 1) == present { stop += pageSize }
        stop = min(stop, end)
        queue.readIntoRequest(r, at: t.done, length: UInt32(stop - start), fd: present ? cacheFD : sourceFD,
                              offset: start, tag: r.tag, sub: CachingHandler.Sub.read.rawValue, data: 0)
    }

    // MARK: Writes

    /// Starts moving a WRITE's data (its intent bits are durable): nil while
    /// parts are outstanding (`writeCompleted` goes on), else the result (0 or -errno).
    func startWrite(_ r: Request, _ t: inout Transfer, queue: IOQueue) -> Int32? {
        t = Transfer(parts: through ? 2 : 1)
        if let m = mapping {
            // The data lands in the cache's pages straight from the request.
            let copied = copyMapped(r, queue: queue, mapping: m)
            if copied < 0 { return copied }
        } else {
            queue.writeFromRequest(r, at: 0, length: r.length, fd: cacheFD, offset: r.offset, flags: 0,
                                   tag: r.tag, sub: CachingHandler.Sub.write.rawValue, data: 0)
        }
        if through { writeBacking(r, at: 0, queue: queue) }
        return mapping != nil ? partDone(0, &t) : nil
    }

    /// A write's I/O (`.write` to the cache file, `.backingWrite`) completed:
    /// the write's result once every part is done, else nil.
    func writeCompleted(_ r: Request, _ sub: CachingHandler.Sub, _ result: Int32, _ t: inout Transfer,
                        queue: IOQueue) -> Int32? {
        if result <= 0 { return partDone(result < 0 ? result : -EIO, &t) }
        if sub == .write {
            t.done += UInt32(result)
            if t.done >= r.length { return partDone(0, &t) }
            queue.writeFromRequest(r, at: t.done, length: r.length - t.done, fd: cacheFD, offset: r.offset + UInt64(t.done),
                                   flags: 0, tag: r.tag, sub: CachingHandler.Sub.write.rawValue, data: 0)
        } else {
            t.backingDone += UInt32(result)
            if t.backingDone >= r.length { return partDone(0, &t) }
            writeBacking(r, at: t.backingDone, queue: queue)
        }
        return nil
    }

    /// One part of a write is done (or failed): the first failure (or 0) once all are, else nil.
    func partDone(_ result: Int32, _ t: inout Transfer) -> Int32? {
        if result < 0 && t.failed == 0 { t.failed = result }
        t.parts -= 1
        return t.parts == 0 ? t.failed : nil
    }

    /// Write-through: `r`'s data from byte `at` to the backing store; inline, from
    /// the cache's mapped pages (they hold it now), else from the request.
    private func writeBacking(_ r: Request, at: UInt32, queue: IOQueue) {
        let flags = r.fua ? cu_rwf_dsync : 0
        if let m = mapping {
            return queue.write(fd: throughFD, from: m + Int(r.offset) + Int(at), length: r.length - at,
                               offset: r.offset + UInt64(at), flags: flags, tag: r.tag, sub: CachingHandler.Sub.backingWrite.rawValue)
        }
        queue.writeFromRequest(r, at: at, length: r.length - at, fd: throughFD, offset: r.offset + UInt64(at),
                               flags: flags, tag: r.tag, sub: CachingHandler.Sub.backingWrite.rawValue, data: 0)
    }

    /// User-copy mode: moves `r`'s data between the mapped cache file and the
    /// kernel's request pages (read: to the request; write: from it). One copy.
    private func copyMapped(_ r: Request, queue: IOQueue, mapping: UnsafeMutableRawPointer) -> Int32 {
        let len = Int(r.length)
        guard Int(r.offset) + len <= mappingSize else { return -EIO }
        let e = queue.copyRequest(r, at: 0, mapping + Int(r.offset), length: len, toRequest: r.op == Op.read)
        return e < 0 ? e : Int32(len)
    }
}
