// RunFetcher: how a caching handler's planned runs get their bytes: HTTP
// Range GETs through libcurl multi (`http`), or reads of the backing store
// through the queue's ring (`cache`). Both hand bytes to the handler as they
// arrive (`received`) and end each run exactly once (`runEnded`).
import CUring
import Glibc
import PageCache

/// Moves planned runs from the source into the cache file.
protocol RunFetcher: AnyObject {
    /// Starts `run`; the fetcher calls `handler.received` for its bytes and `handler.runEnded` once.
    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue)
    /// Starts `run` again from the image's byte `from` (a page boundary inside it) to its end.
    func resume(_ run: FetchRun, from: UInt64, handler: CachingHandler, queue: IOQueue)
    var isIdle: Bool { get }
    /// An fd the queue polls for the fetcher's progress (then `perform()`), if it has one.
    var pollFD: Int32? { get }
    func perform()
    /// A target I/O the fetcher submitted with `CachingHandler.Sub.fetch.rawValue` completed.
    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue)
    /// Ends every run now (device stopping); each still gets its `runEnded`.
    func cancelAll(handler: CachingHandler, queue: IOQueue)
}

/// Runs as HTTP Range GETs through libcurl multi.
final class HTTPFetcher: RunFetcher {
    let source: HTTPSource
    init(_ source: HTTPSource) { self.source = source }

    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue) {
        resume(run, from: run.offset, handler: handler, queue: queue)
    }
    func resume(_ run: FetchRun, from: UInt64, handler: CachingHandler, queue: IOQueue) {
        source.fetch(offset: from, length: run.length - Int(from - run.offset), onData: { [unowned handler] offset, bytes in
            handler.received(run, offset: offset, bytes: bytes, queue: queue)
        }, completion: { [unowned handler] result in
            switch result {
            case .success: handler.runEnded(run, error: nil, queue: queue)
            case .failure(let e): handler.runEnded(run, error: e.description, queue: queue)
            }
        })
    }
    var isIdle: Bool { source.isIdle }
    var pollFD: Int32? { source.fd }
    func perform() { source.perform() }
    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue) {}
    func cancelAll(handler: CachingHandler, queue: IOQueue) {
        source.cancelAll()
        source.perform()
    }
}

/// Runs read from a file or block device through the queue's io_uring, into a
/// staging buffer, then handed to the handler like received HTTP bytes.
final class FileFetcher: RunFetcher {
    let fd: Int32
    private var slots: [UInt32: (run: FetchRun, buffer: UnsafeMutableRawPointer, done: Int)] = [:]
    private var nextSlot: UInt32 = 1
    private var cancelled = false

    init(fd: Int32) { self.fd = fd }
    deinit { for s in slots.values { free(s.buffer) } }

    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue) {
        resume(run, from: run.offset, handler: handler, queue: queue)
    }
    func resume(_ run: FetchRun, from: UInt64, handler: CachingHandler, queue: IOQueue) {
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, (run.length + 4095) & ~4095) == 0, let buf = raw else {
            return handler.runEnded(run, error: "out of memory", queue: queue)
        }
        let slot = nextSlot
        nextSlot = nextSlot == Queue.reservedData - 1 ? 1 : nextSlot + 1
        let done = Int(from - run.offset)
        slots[slot] = (run, buf, done)
        handler.context.stats.requests += 1
        queue.read(fd: fd, into: buf + done, length: UInt32(run.length - done), offset: from,
                   tag: Queue.internalTag, sub: CachingHandler.Sub.fetch.rawValue, data: slot)
    }

    var isIdle: Bool { slots.isEmpty }
    var pollFD: Int32? { nil }
    func perform() {}

    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue) {
        guard var s = slots[data] else { return }
        func end(_ error: String?) {
            slots[data] = nil
            free(s.buffer)
            handler.runEnded(s.run, error: error, queue: queue)
        }
        if cancelled { return end("cancelled") }
        if result < 0 { return end("reading the backing store: \(Errno(returned: result))") }
        if result == 0 { return end("the backing store ended early") }
        handler.context.stats.bytesFetched += UInt64(result)
        let chunk = UnsafeRawBufferPointer(start: s.buffer + s.done, count: Int(result))
        guard handler.received(s.run, offset: s.run.offset + UInt64(s.done), bytes: chunk, queue: queue) else {
            return end("cannot write the cache file")
        }
        s.done += Int(result)
        slots[data] = s
        if s.done >= s.run.length { return end(nil) }
        queue.read(fd: fd, into: s.buffer + s.done, length: UInt32(s.run.length - s.done),
                   offset: s.run.offset + UInt64(s.done), tag: Queue.internalTag, sub: CachingHandler.Sub.fetch.rawValue, data: data)
    }

    func cancelAll(handler: CachingHandler, queue: IOQueue) {
        // Reads in flight finish on their own (a local read ends soon); they end their runs as cancelled.
        cancelled = true
    }
}
