// Target: what a block device target implements. The engine owns the kernel
// protocol (control commands, FETCH/COMMIT, threads, lifecycle); a target is
// only its own logic, in the shape of ublksrv's targets/:
//
//   - `params`: size and the block-layer parameters it wants.
//   - `makeHandler(for:)`: per-queue state, created on the queue's own thread.
//   - the handler's `handle(_:queue:)`: start a request; finish it with
//     `queue.complete(tag:result:)`, at once or from a later completion.
//
// Contract (every target): every request handed to `handle` is completed
// exactly once, with a byte count (READ/WRITE), 0, or a negative errno. A
// request that never completes hangs `del` and the kernel.
import CUring
import Glibc

/// The block-layer parameters a target asks for.
public struct DeviceParams: Sendable {
    public var size: UInt64
    public var readOnly = false
    public var logicalBlockShift: UInt8 = 9
    public var physicalBlockShift: UInt8 = 12
    /// FLUSH requests are sent (the target has a volatile write cache) and FUA honoured.
    public var writeCache = false
    public var discard = false
    public var rotational = false
    /// The data paths the target can run, best first (DataPath.swift); the
    /// server takes the first the driver has, or the one `add --data-path` forces.
    public var dataPaths: [DataPath] = [.kernelCopy]
    /// The alignment (bytes, a power of two up to 4096) request buffers must
    /// have for the target's files (their direct I/O memory alignment); 0 or 1:
    /// none. Sent as UBLK_PARAM_TYPE_DMA_ALIGN (kernels before 6.14 ignore it).
    public var dmaAlignment: UInt32 = 0

    public init(size: UInt64) { self.size = size }
}

/// One ublk I/O request, decoded from its descriptor.
public struct Request {
    public var tag: UInt16
    public var op: UInt8
    public var flags: UInt32
    /// Byte offset into the device.
    public var offset: UInt64
    /// Byte length (0 for FLUSH).
    public var length: UInt32
    /// The tag's buffer: data to write, or where read data goes.
    public var buffer: UnsafeMutableRawPointer

    public var fua: Bool { flags & UInt32(UBLK_IO_F_FUA) != 0 }
    public var noUnmap: Bool { flags & UInt32(UBLK_IO_F_NOUNMAP) != 0 }

    public init(tag: UInt16, op: UInt8, flags: UInt32, offset: UInt64, length: UInt32, buffer: UnsafeMutableRawPointer) {
        self.tag = tag
        self.op = op
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buffer = buffer
    }
}

extension Request {
    /// One completion of a read that must fill the whole buffer: the request's
    /// final result, or nil when the rest (from `done` on) must still be read.
    /// A read that reaches the end of its file (0 bytes) reads zeros for the rest.
    @inline(__always)
    public func readProgress(_ result: Int32, done: inout UInt32) -> Int32? {
        if result < 0 { return result }
        if result == 0 {
            memset(buffer + Int(done), 0, Int(length - done))
            return Int32(length)
        }
        done += UInt32(result)
        return done >= length ? Int32(length) : nil
    }
}

public enum Op {
    public static let read = UInt8(UBLK_IO_OP_READ)
    public static let write = UInt8(UBLK_IO_OP_WRITE)
    public static let flush = UInt8(UBLK_IO_OP_FLUSH)
    public static let discard = UInt8(UBLK_IO_OP_DISCARD)
    public static let writeSame = UInt8(UBLK_IO_OP_WRITE_SAME)
    public static let writeZeroes = UInt8(UBLK_IO_OP_WRITE_ZEROES)
}

public protocol Target: AnyObject {
    /// The target's type name (`null`, `loop`, ...).
    var name: String { get }
    var params: DeviceParams { get }
    /// The target's options, for `list` and the state file.
    var options: [String: String] { get }
    /// Per-queue request handling, created on the queue's thread before its first FETCH.
    func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler
}

/// What a handler may ask of its queue. `Queue` is the real one (one io_uring);
/// the host tests drive handlers through a fake one with fault-injecting file
/// I/O (Tests/UblkTargetTests/FakeQueue.swift), so every state machine of a
/// target runs without a kernel.
///
/// Contract: target I/O (`read`, `write`, `fsync`, `fallocate`) completes later,
/// exactly once, through `QueueHandler.ioCompleted` with the same tag/sub/data;
/// `poll` fires `QueueHandler.eventFired` once; `complete` ends a request.
public protocol IOQueue: AnyObject {
    var id: UInt16 { get }
    var depth: Int { get }
    var deviceID: UInt32 { get }
    /// /dev/ublkcN, for targets in user-copy mode (-1 in a fake queue).
    var charFD: Int32 { get }
    var userCopy: Bool { get }
    func userCopyOffset(_ tag: UInt16) -> Int64
    /// How request data moves (DataPath.swift). Request data is reached only
    /// through the three calls below, unless the path is kernel copy
    /// (`Request.buffer` is the data) or inline user copy (the target copies
    /// between its own mapping and /dev/ublkcN).
    var dataPath: DataPath { get }
    /// Completes `tag`'s request with `result` (bytes transferred, 0, or -errno).
    func complete(tag: UInt16, result: Int32)
    /// Reads `length` bytes of `fd` at `offset` into `r`'s data at byte `at`;
    /// completes like `read` (bytes, 0 at the end of the file, or -errno). At
    /// most one per request at a time, under the request's own tag.
    func readIntoRequest(_ r: Request, at: UInt32, length: UInt32, fd: Int32, offset: UInt64,
                         tag: UInt16, sub: UInt8, data: UInt32)
    /// Writes `length` bytes of `r`'s data from byte `at` to `fd` at `offset`; completes like `write`.
    func writeFromRequest(_ r: Request, at: UInt32, length: UInt32, fd: Int32, offset: UInt64, flags: Int32,
                          tag: UInt16, sub: UInt8, data: UInt32)
    /// Zeros `length` bytes of `r`'s data from byte `at`, now (a read past a file's end). 0 or -errno.
    func zeroFill(_ r: Request, at: UInt32, length: UInt32) -> Int32
    /// Inline user copy: copies `length` bytes between `buf` and `r`'s data from
    /// byte `at`, now (`toRequest`: into the request). The one routine that
    /// moves request data through /dev/ublkcN. 0 or -errno.
    func copyRequest(_ r: Request, at: UInt32, _ buf: UnsafeMutableRawPointer, length: Int, toRequest: Bool) -> Int32
    func read(fd: Int32, into buf: UnsafeMutableRawPointer, length: UInt32, offset: UInt64,
              tag: UInt16, sub: UInt8, data: UInt32)
    func write(fd: Int32, from buf: UnsafeRawPointer, length: UInt32, offset: UInt64, flags: Int32,
               tag: UInt16, sub: UInt8, data: UInt32)
    func fsync(fd: Int32, dataOnly: Bool, tag: UInt16, sub: UInt8, data: UInt32)
    func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, tag: UInt16, sub: UInt8, data: UInt32)
    /// Arms a one-shot poll for readability of `fd`; `eventFired(data:)` follows.
    func poll(fd: Int32, data: UInt32)
    /// Writes all of `buf` at `offset` now (pwrite into the page cache: bytes a
    /// fetch hands over, which are not kept for a later completion). 0 or -errno.
    func writeNow(fd: Int32, from buf: UnsafeRawPointer, length: Int, offset: UInt64) -> Int32
}

extension IOQueue {
    /// One completion of a request read that must fill the request: its final
    /// result, or nil when the rest (from `done` on) must still be read. The end
    /// of the file (0 bytes) reads as zeros for the rest.
    @inline(__always)
    public func readProgress(_ r: Request, _ result: Int32, done: inout UInt32) -> Int32? {
        if result < 0 { return result }
        if result == 0 {
            let z = zeroFill(r, at: done, length: r.length - done)
            return z < 0 ? z : Int32(r.length)
        }
        done += UInt32(result)
        return done >= r.length ? Int32(r.length) : nil
    }

    @inline(__always)
    public func read(fd: Int32, into buf: UnsafeMutableRawPointer, length: UInt32, offset: UInt64,
                     tag: UInt16, sub: UInt8 = 0) {
        read(fd: fd, into: buf, length: length, offset: offset, tag: tag, sub: sub, data: 0)
    }
    @inline(__always)
    public func write(fd: Int32, from buf: UnsafeRawPointer, length: UInt32, offset: UInt64, flags: Int32 = 0,
                      tag: UInt16, sub: UInt8 = 0, data: UInt32 = 0) {
        write(fd: fd, from: buf, length: length, offset: offset, flags: flags, tag: tag, sub: sub, data: data)
    }
    @inline(__always)
    public func fsync(fd: Int32, tag: UInt16, sub: UInt8 = 0, data: UInt32 = 0) {
        fsync(fd: fd, dataOnly: true, tag: tag, sub: sub, data: data)
    }
    @inline(__always)
    public func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, tag: UInt16, sub: UInt8 = 0) {
        fallocate(fd: fd, mode: mode, offset: offset, length: length, tag: tag, sub: sub, data: 0)
    }
}

public protocol QueueHandler: AnyObject {
    /// A new request. Complete it with `queue.complete(tag:result:)`, now or later.
    func handle(_ request: Request, queue: IOQueue)
    /// A target I/O submitted through the queue for `tag` finished with `result` (bytes or -errno).
    func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: IOQueue)
    /// A poll armed with `queue.poll(fd:data:)` fired.
    func eventFired(data: UInt32, result: Int32, queue: IOQueue)
    /// After each batch of completions, before the queue sleeps: the place to flush batched work.
    func idle(queue: IOQueue)
    /// A request from the control socket (queue 0): returns one JSON object.
    func control(_ request: ControlRequest, queue: IOQueue) -> String
    /// The device is about to stop: fail or finish what waits on slow sources, promptly.
    func drain(queue: IOQueue)
    /// The loop has ended (device stopping); last chance to persist state. Blocking is allowed here.
    func shutdown(queue: IOQueue)
}

extension QueueHandler {
    public func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: IOQueue) {}
    public func eventFired(data: UInt32, result: Int32, queue: IOQueue) {}
    public func idle(queue: IOQueue) {}
    public func control(_ request: ControlRequest, queue: IOQueue) -> String {
        controlError("the \(request.op) command is not supported by this target")
    }
    public func drain(queue: IOQueue) {}
    public func shutdown(queue: IOQueue) {}
}
