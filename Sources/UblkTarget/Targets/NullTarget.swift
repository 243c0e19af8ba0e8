// null: reads return zeros, writes are accepted and dropped. The baseline for
// the engine's own overhead.
import Glibc

public final class NullTarget: Target {
    public let name = "null"
    public let params: DeviceParams
    public var options: [String: String] { ["size": String(params.size)] }

    public static let defaultSize: UInt64 = 250 << 30

    public init(size: UInt64 = NullTarget.defaultSize, readOnly: Bool = false) {
        var p = DeviceParams(size: size)
        p.readOnly = readOnly
        params = p
    }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        Handler(depth: queue.depth)
    }

    final class Handler: QueueHandler {
        /// Bytes of each tag's buffer that a WRITE may have left non-zero.
        var dirty: [UInt32]
        init(depth: Int) { dirty = Array(repeating: 0, count: depth) }

        func handle(_ r: Request, queue: IOQueue) {
            switch r.op {
            case Op.read:
                let t = Int(r.tag)
                if dirty[t] > 0 {
                    memset(r.buffer, 0, Int(dirty[t]))
                    dirty[t] = 0
                }
                queue.complete(tag: r.tag, result: Int32(r.length))
            case Op.write:
                dirty[Int(r.tag)] = max(dirty[Int(r.tag)], r.length)
                queue.complete(tag: r.tag, result: Int32(r.length))
            case Op.flush, Op.discard, Op.writeZeroes:
                queue.complete(tag: r.tag, result: 0)
            default:
                queue.complete(tag: r.tag, result: -EOPNOTSUPP)
            }
        }
    }
}
