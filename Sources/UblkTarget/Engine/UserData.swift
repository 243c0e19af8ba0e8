// UserData: the one place that defines how a completion finds its owner.
//
// Layout of the 64-bit io_uring `user_data` (as ublksrv's build_user_data):
//   bits 60..63  kind  — routed on first (ublk command, target I/O, event)
//   bits 24..55  data  — 32 bits for the target (a run id, an offset index)
//   bits 16..23  sub   — the target's own sub-operation
//   bits  0..15  tag   — the ublk tag (< UBLK_MAX_QUEUE_DEPTH)

public struct UserData: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        /// FETCH / COMMIT_AND_FETCH on the ublk char device.
        case ublk = 0
        /// Target I/O (read/write/fsync/fallocate) issued for a tag.
        case target = 1
        /// Readiness of a foreign fd (eventfd, epoll fd, timerfd) the target polls.
        case event = 2
        /// Target I/O that read a file into the tag's buffer for a request in
        /// user-copy mode: the queue copies it into the request, then routes it as `target`.
        case requestRead = 3
    }

    public var kind: Kind
    public var tag: UInt16
    public var sub: UInt8
    public var data: UInt32

    public init(kind: Kind, tag: UInt16 = 0, sub: UInt8 = 0, data: UInt32 = 0) {
        self.kind = kind
        self.tag = tag
        self.sub = sub
        self.data = data
    }

    @inline(__always)
    public var encoded: UInt64 {
        UInt64(kind.rawValue) << 60 | UInt64(data) << 24 | UInt64(sub) << 16 | UInt64(tag)
    }

    @inline(__always)
    public init?(encoded v: UInt64) {
        guard let k = Kind(rawValue: UInt8(truncatingIfNeeded: v >> 60)) else { return nil }
        self.kind = k
        self.tag = UInt16(truncatingIfNeeded: v)
        self.sub = UInt8(truncatingIfNeeded: v >> 16)
        self.data = UInt32(truncatingIfNeeded: v >> 24)
    }
}
