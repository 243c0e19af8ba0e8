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
    /// UBLK_F_USER_COPY: the target moves request data itself with pread/pwrite/splice
    /// on /dev/ublkcN at `Queue.userCopyOffset` (the tag buffers stay unused by the
    /// kernel). Used only where the kernel supports it.
    public var userCopy = false

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

public protocol QueueHandler: AnyObject {
    /// A new request. Complete it with `queue.complete(tag:result:)`, now or later.
    func handle(_ request: Request, queue: Queue)
    /// A target I/O submitted through the queue for `tag` finished with `result` (bytes or -errno).
    func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: Queue)
    /// A poll armed with `queue.poll(fd:data:)` fired.
    func eventFired(data: UInt32, result: Int32, queue: Queue)
    /// After each batch of completions, before the queue sleeps: the place to flush batched work.
    func idle(queue: Queue)
    /// A request from the control socket (queue 0): returns one JSON object.
    func control(_ request: ControlRequest, queue: Queue) -> String
    /// The device is about to stop: fail or finish what waits on slow sources, promptly.
    func drain(queue: Queue)
    /// The loop has ended (device stopping); last chance to persist state. Blocking is allowed here.
    func shutdown(queue: Queue)
}

extension QueueHandler {
    public func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: Queue) {}
    public func eventFired(data: UInt32, result: Int32, queue: Queue) {}
    public func idle(queue: Queue) {}
    public func control(_ request: ControlRequest, queue: Queue) -> String {
        controlError("the \(request.op) command is not supported by this target")
    }
    public func drain(queue: Queue) {}
    public func shutdown(queue: Queue) {}
}
