// Ring: one io_uring, one owner thread. A thin wrapper: get an SQE (submitting
// first when the SQ is full), submit-and-wait with an optional timeout
// (IORING_ENTER_EXT_ARG through liburing), and reap completions in batches
// into a caller-owned buffer so that callbacks run after the CQ is released.
import CUring
import Glibc

public final class Ring {
    let ring: UnsafeMutablePointer<io_uring>
    public let entries: UInt32

    public init(entries: UInt32, flags: UInt32 = 0) throws(Errno) {
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        self.entries = entries
        let r = cu_queue_init(entries, ring, flags)
        if r < 0 {
            ring.deallocate()
            throw Errno(returned: r)
        }
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
    }

    public var fd: Int32 { ring.pointee.ring_fd }

    /// An SQE; when the SQ is full, submits what is queued and tries again.
    @inline(__always)
    public func sqe() -> UnsafeMutablePointer<io_uring_sqe> {
        if let s = cu_get_sqe(ring) { return s }
        _ = io_uring_submit(ring)
        while true {
            if let s = cu_get_sqe(ring) { return s }
            // The kernel has not consumed the SQ yet (it always does on submit
            // unless the CQ overflowed); wait for one completion to make room.
            _ = cu_submit_and_wait(ring, 1, 0)
        }
    }

    /// Makes room for `count` SQEs in a row (submitting what is queued when
    /// there is less), so that a linked pair is never split across submissions.
    public func reserve(_ count: UInt32) {
        if cu_sq_space_left(ring) < count { _ = io_uring_submit(ring) }
    }

    @discardableResult
    public func submit() -> Int32 { io_uring_submit(ring) }

    /// Submits queued SQEs and waits for `count` completions, at most `timeoutNanos` (0: forever).
    @discardableResult
    public func submitAndWait(_ count: UInt32 = 1, timeoutNanos: Int64 = 0) -> Int32 {
        cu_submit_and_wait(ring, count, timeoutNanos)
    }

    /// Copies up to `max` completions into `buffer`, releases their slots, returns how many.
    @inline(__always)
    public func reap(into buffer: UnsafeMutablePointer<cu_cqe>, max: UInt32) -> Int {
        Int(cu_reap(ring, buffer, max))
    }

    /// A sparse table of `count` empty fixed-buffer slots (ublk zero copy registers into it).
    public func registerSparseBuffers(_ count: UInt32) throws(Errno) {
        let r = cu_register_buffers_sparse(ring, count)
        if r < 0 { throw Errno(returned: r) }
    }

    public func registerFiles(_ fds: [Int32]) throws(Errno) {
        let r = fds.withUnsafeBufferPointer { io_uring_register_files(ring, $0.baseAddress, UInt32($0.count)) }
        if r < 0 { throw Errno(returned: r) }
    }
}
