// Queue: one ublk hardware queue = one pthread, one io_uring, one event loop.
//
// Contract:
// - Every FETCH and COMMIT_AND_FETCH of this queue is issued from its own
//   thread (6.12 rejects commands from any other task with -EINVAL and the
//   device then hangs until reboot). Nothing here may run inside a Swift Task.
// - The loop never blocks except in io_uring_enter: target I/O, ublk commands
//   and foreign readiness (polls) all complete on the same ring.
// - Reaping copies completions out first; callbacks run afterwards, so a
//   callback that queues more work never recurses into the reaper.
// - The loop ends when every tag has been aborted by the kernel (-ENODEV,
//   device stopped) or a stop was requested through `wake`, and no target I/O
//   is outstanding. Closing the ring then cancels whatever the kernel holds.
// - Request data moves the device's one way (DataPath.swift): the handler
//   calls readIntoRequest / writeFromRequest / zeroFill and the queue turns
//   them into READ_FIXED / WRITE_FIXED of the request's registered pages
//   (zero copy), READ / WRITE of the tag's buffer plus a pread / pwrite on
//   /dev/ublkcN (user copy), or READ / WRITE of the tag's buffer (kernel copy).
//   Explicit registration (zero-copy, or auto-zero-copy's fallback): the
//   REGISTER_IO_BUF completes before the handler sees the request, and the
//   UNREGISTER_IO_BUF is hard-linked before its COMMIT_AND_FETCH, so the
//   pages leave the table after the last I/O and before the request completes.
import CUring
import Dispatch
import Glibc

public final class Queue: IOQueue {
    public let id: UInt16
    public let depth: Int
    public let bufferSize: Int
    public let deviceID: UInt32

    /// /dev/ublkcN, for targets in user-copy mode.
    public let charFD: Int32
    /// UBLK_F_USER_COPY: FETCH/COMMIT carry no buffer; data moves through `charFD`.
    public var userCopy: Bool { flags & UBLK_F_USER_COPY != 0 }
    /// How request data moves (DataPath.swift).
    public let dataPath: DataPath
    /// The device's granted UBLK_F_* flags.
    let flags: UInt64
    /// Auto registration asks for the fallback (the device also has SUPPORT_ZERO_COPY).
    private let autoFallback: Bool
    /// Tags whose pages this queue registered itself (unregistered before their COMMIT).
    private var registered: [Bool] = []
    /// Requests waiting for their REGISTER_IO_BUF to complete.
    private var registering: [Request?] = []
    /// User copy: bytes [0, n) of the tag's buffer already hold the request's data,
    /// and where the one request read in flight per tag lands.
    private var copiedIn: [UInt32] = []
    private var readAt: [UInt32] = []
    /// Target I/O that failed before reaching the ring, delivered after the current batch.
    private var failed: [(UserData, Int32)] = []
    /// Zeros for zeroFill through /dev/ublkcN.
    private static let zeros: UnsafeMutableRawPointer = {
        let p = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: 65536)
        return p
    }()
    private(set) var ring: Ring!
    private var descriptors: UnsafePointer<ublksrv_io_desc>!
    private var descriptorsLength = 0
    private var buffers: UnsafeMutableRawPointer!
    private var handler: QueueHandler!

    /// Eventfds other threads write to: drain (device about to stop), then stop.
    let drainFD: Int32
    let wakeFD: Int32
    private static let wakeData = UInt32.max
    private static let drainData = UInt32.max - 1
    private static let listenData = UInt32.max - 2
    /// Event data from here up is the engine's own; `poll(fd:data:)` takes less.
    public static let reservedData: UInt32 = 0xF000_0000
    /// The control socket, on queue 0 only.
    var control: ControlChannel?

    private var liveTags = 0
    private var targetInflight = 0
    private var stopRequested = false

    init(device: UInt32, id: UInt16, depth: Int, bufferSize: Int, charFD: Int32, flags: UInt64, dataPath: DataPath) {
        self.flags = flags
        self.dataPath = dataPath
        self.autoFallback = dataPath == .autoZeroCopy && flags & UBLK_F_SUPPORT_ZERO_COPY != 0
        self.deviceID = device
        self.id = id
        self.depth = depth
        self.bufferSize = bufferSize
        self.charFD = charFD
        self.wakeFD = cu_eventfd(0, cu_efd_cloexec)
        self.drainFD = cu_eventfd(0, cu_efd_cloexec)
    }

    deinit {
        if let d = descriptors { munmap(UnsafeMutableRawPointer(mutating: d), descriptorsLength) }
        if let b = buffers { munmap(b, depth * bufferSize) }
        close(wakeFD)
        close(drainFD)
    }

    /// Where `tag`'s request data starts in /dev/ublkcN (user-copy mode).
    @inline(__always)
    public func userCopyOffset(_ tag: UInt16) -> Int64 {
        cu_user_copy_pos(id, tag, 0)
    }

    /// The tag's I/O buffer (page aligned, `bufferSize` bytes).
    @inline(__always)
    public func buffer(_ tag: UInt16) -> UnsafeMutableRawPointer {
        buffers + Int(tag) * bufferSize
    }

    // MARK: Setup (on the queue's thread)

    func setUp(target: Target) throws(UblkError) {
        if wakeFD < 0 || drainFD < 0 { throw UblkError("eventfd", errno: .current) }
        // Try the cheapest completion mode first; older kernels lack DEFER_TASKRUN.
        let entries = UInt32(max(64, depth * 2))
        let preferred = cu_setup_coop | cu_setup_single_issuer | cu_setup_defer_taskrun
        if let r = try? Ring(entries: entries, flags: preferred) {
            ring = r
        } else {
            do { ring = try Ring(entries: entries, flags: 0) } catch {
                throw UblkError("queue \(id): cannot create io_uring", errno: error)
            }
        }
        if dataPath.isZeroCopy {
            // Buffer index = tag: where the request's pages are registered.
            do { try ring.registerSparseBuffers(UInt32(depth)) } catch {
                throw UblkError("queue \(id): cannot register a buffer table for zero copy", errno: error)
            }
        }
        registered = Array(repeating: false, count: depth)
        registering = Array(repeating: nil, count: depth)
        copiedIn = Array(repeating: 0, count: depth)
        readAt = Array(repeating: 0, count: depth)
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let stride = MemoryLayout<ublksrv_io_desc>.stride
        descriptorsLength = (depth * stride + page - 1) / page * page
        let offset = off_t(UBLKSRV_CMD_BUF_OFFSET) + off_t(id) * off_t(UBLK_MAX_QUEUE_DEPTH * Int32(stride))
        let d = mmap(nil, descriptorsLength, PROT_READ, MAP_SHARED | MAP_POPULATE, charFD, offset)
        if d == MAP_FAILED { throw UblkError("queue \(id): cannot map the I/O descriptors", errno: .current) }
        descriptors = UnsafePointer(d!.assumingMemoryBound(to: ublksrv_io_desc.self))
        let b = mmap(nil, depth * bufferSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if b == MAP_FAILED { throw UblkError("queue \(id): cannot allocate I/O buffers", errno: .current) }
        buffers = b
        handler = try target.makeHandler(for: self)
    }

    // MARK: The loop

    func run() {
        for t in 0..<depth { issue(UBLK_U_IO_FETCH_REQ, tag: UInt16(t), result: -1) }
        liveTags = depth
        armWake()
        if let c = control { cu_prep_poll_add(ring.sqe(), c.listenFD, cu_poll_in, UserData(kind: .event, data: Queue.listenData).encoded) }
        let batch = 256
        let cqes = UnsafeMutablePointer<cu_cqe>.allocate(capacity: batch)
        defer { cqes.deallocate() }
        while (liveTags > 0 && !stopRequested) || targetInflight > 0 {
            // A failure reported without the ring (failed) must not wait for a completion.
            let r = failed.isEmpty ? ring.submitAndWait(1) : ring.submit()
            if r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ETIME {
                log("queue \(id): io_uring_enter failed: \(Errno(returned: r)); stopping")
                break
            }
            while true {
                let n = ring.reap(into: cqes, max: UInt32(batch))
                if n == 0 { break }
                for i in 0..<n { dispatch(cqes[i]) }
            }
            while !failed.isEmpty {
                let now = failed
                failed = []
                for (ud, res) in now {
                    targetInflight -= 1
                    handler.ioCompleted(tag: ud.tag, sub: ud.sub, data: ud.data, result: res, queue: self)
                }
            }
            handler.idle(queue: self)
        }
        ring.submit()
        handler.shutdown(queue: self)
    }

    /// The tag a target uses for its own I/O that belongs to no request (flushes, timers).
    public static let internalTag = UInt16.max

    @inline(__always)
    private func dispatch(_ cqe: cu_cqe) {
        guard let ud = UserData(encoded: cqe.user_data) else { return }
        switch ud.kind {
        case .ublk where ud.sub == Queue.subRegister:
            targetInflight -= 1
            let t = Int(ud.tag)
            guard let req = registering[t] else { return }
            registering[t] = nil
            if cqe.res < 0 {
                log("queue \(id) tag \(ud.tag): cannot register the request's buffer: \(Errno(returned: cqe.res))")
                return issue(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag: ud.tag, result: -EIO)
            }
            registered[t] = true
            handler.handle(req, queue: self)
        case .ublk where ud.sub == Queue.subUnregister:
            // Only a failure posts a completion (CQE_SKIP_SUCCESS); the COMMIT ran anyway (hard link).
            log("queue \(id) tag \(ud.tag): cannot unregister the request's buffer: \(Errno(returned: cqe.res))")
        case .ublk:
            if cqe.res == UBLK_IO_RES_OK {
                let d = descriptors[Int(ud.tag)]
                let op = UInt8(truncatingIfNeeded: d.op_flags)
                let req = Request(tag: ud.tag, op: op, flags: d.op_flags & ~0xff,
                                  offset: d.start_sector << 9, length: d.nr_sectors << 9,
                                  buffer: buffer(ud.tag))
                arrived(req)
            } else {
                // -ENODEV: the device is stopping and the kernel gave the tag back.
                if cqe.res != cu_io_res_abort {
                    log("queue \(id) tag \(ud.tag): ublk command failed: \(Errno(returned: cqe.res))")
                }
                liveTags -= 1
            }
        case .target:
            targetInflight -= 1
            handler.ioCompleted(tag: ud.tag, sub: ud.sub, data: ud.data, result: cqe.res, queue: self)
        case .requestRead:
            targetInflight -= 1
            var result = cqe.res
            if result > 0 {
                // User copy: the bytes just read into the tag's buffer go on into the request.
                let at = Int(readAt[Int(ud.tag)])
                let r = copyRequest(tag: ud.tag, out: true, buffer(ud.tag) + at, length: Int(result), at: at)
                if r < 0 { result = r }
            }
            handler.ioCompleted(tag: ud.tag, sub: ud.sub, data: ud.data, result: result, queue: self)
        case .event:
            if ud.data == Queue.wakeData {
                var v: UInt64 = 0
                _ = Glibc.read(wakeFD, &v, 8)
                stopRequested = true
            } else if ud.data == Queue.drainData {
                var v: UInt64 = 0
                _ = Glibc.read(drainFD, &v, 8)
                handler.drain(queue: self)
            } else if ud.data >= Queue.reservedData {
                controlEvent(ud.data)
            } else {
                handler.eventFired(data: ud.data, result: cqe.res, queue: self)
            }
        }
    }

    private func armWake() {
        cu_prep_poll_add(ring.sqe(), wakeFD, cu_poll_in, UserData(kind: .event, data: Queue.wakeData).encoded)
        cu_prep_poll_add(ring.sqe(), drainFD, cu_poll_in, UserData(kind: .event, data: Queue.drainData).encoded)
    }

    /// The control socket (ControlChannel.swift): accepting, reading and
    /// writing each wait on a one-shot poll here; the channel says what to arm next.
    private func controlEvent(_ data: UInt32) {
        guard let c = control, !stopRequested else { return }
        if data == Queue.listenData {
            for next in c.acceptAll() { armControl(next) }
            cu_prep_poll_add(ring.sqe(), c.listenFD, cu_poll_in, UserData(kind: .event, data: Queue.listenData).encoded)
            return
        }
        var next = c.ready(data - Queue.reservedData)
        if case .request(let token, let request) = next {
            next = c.respond(token, handler.control(request, queue: self))
        }
        armControl(next)
    }

    private func armControl(_ next: ControlChannel.Next) {
        guard case .poll(let fd, let out, let token) = next else { return }
        cu_prep_poll_add(ring.sqe(), fd, out ? cu_poll_out : cu_poll_in, UserData(kind: .event, data: Queue.reservedData + token).encoded)
    }

    /// Asks the handler to finish what waits on slow sources (from any thread).
    func requestDrain() {
        var one: UInt64 = 1
        _ = Glibc.write(drainFD, &one, 8)
    }

    /// Asks the loop to end (from any thread).
    func wake() {
        var one: UInt64 = 1
        _ = Glibc.write(wakeFD, &one, 8)
    }

    static let subRegister: UInt8 = 1, subUnregister: UInt8 = 2

    @inline(__always)
    private func issue(_ op: UInt32, tag: UInt16, result: Int32) {
        let ud = UserData(kind: .ublk, tag: tag).encoded
        switch dataPath {
        case .kernelCopy:
            cu_prep_io_cmd(ring.sqe(), charFD, 0, op, id, tag, result, UInt64(UInt(bitPattern: buffer(tag))), ud)
        case .autoZeroCopy:
            // The next request's pages go to buffer index `tag` (this one's leave it at the COMMIT).
            let reg = cu_auto_buf_reg_addr(tag, UInt8(autoFallback ? UBLK_AUTO_BUF_REG_FALLBACK : 0))
            cu_prep_io_cmd_auto_reg(ring.sqe(), charFD, op, id, tag, result, reg, ud)
        default:
            cu_prep_io_cmd(ring.sqe(), charFD, 0, op, id, tag, result, 0, ud)
        }
    }

    /// A request from the kernel: register its pages first where this queue must.
    private func arrived(_ r: Request) {
        let t = Int(r.tag)
        let hasData = (r.op == Op.read || r.op == Op.write) && r.length > 0
        let mustRegister = hasData && (dataPath == .zeroCopy
            || (dataPath == .autoZeroCopy && r.flags & UInt32(UBLK_IO_F_NEED_REG_BUF) != 0))
        copiedIn[t] = 0
        if mustRegister {
            registering[t] = r
            targetInflight += 1
            cu_prep_io_cmd(ring.sqe(), charFD, 0, UBLK_U_IO_REGISTER_IO_BUF, id, r.tag, 0, UInt64(r.tag),
                           UserData(kind: .ublk, tag: r.tag, sub: Queue.subRegister).encoded)
            return
        }
        handler.handle(r, queue: self)
    }

    /// pread / pwrite of `length` bytes of `r`'s request data at `at` on /dev/ublkcN
    /// (`toRequest`: into the request). A CPU copy of pinned pages, never a wait. 0 or -errno.
    public func copyRequest(_ r: Request, at: UInt32, _ buf: UnsafeMutableRawPointer, length: Int, toRequest: Bool) -> Int32 {
        copyRequest(tag: r.tag, out: toRequest, buf, length: length, at: Int(at))
    }

    private func copyRequest(tag: UInt16, out: Bool, _ buf: UnsafeMutableRawPointer, length: Int, at: Int) -> Int32 {
        let pos = off_t(userCopyOffset(tag)) + off_t(at)
        var done = 0
        while done < length {
            let n = out ? pwrite(charFD, buf + done, length - done, pos + off_t(done))
                        : pread(charFD, buf + done, length - done, pos + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return n < 0 ? -errno : -EIO }
            done += n
        }
        return 0
    }

    // MARK: What handlers call

    /// Completes `tag`'s request with `result` (bytes transferred, 0, or -errno) and fetches its next one.
    @inline(__always)
    public func complete(tag: UInt16, result: Int32) {
        if registered[Int(tag)] {
            // After the last I/O, before the COMMIT (hard-linked: the COMMIT runs even if this fails).
            registered[Int(tag)] = false
            ring.reserve(2)
            let sqe = ring.sqe()
            cu_prep_io_cmd(sqe, charFD, cu_iosqe_io_hardlink | cu_iosqe_cqe_skip_success, UBLK_U_IO_UNREGISTER_IO_BUF,
                           id, tag, 0, UInt64(tag), UserData(kind: .ublk, tag: tag, sub: Queue.subUnregister).encoded)
        }
        issue(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag: tag, result: result)
    }

    /// Reads `length` bytes of `fd` at `offset` into `r`'s data at `at`.
    public func readIntoRequest(_ r: Request, at: UInt32, length: UInt32, fd: Int32, offset: UInt64,
                                tag: UInt16, sub: UInt8, data: UInt32) {
        targetInflight += 1
        switch dataPath {
        case .autoZeroCopy, .zeroCopy:
            cu_prep_read_fixed(ring.sqe(), fd, UInt64(at), length, offset, r.tag,
                               UserData(kind: .target, tag: tag, sub: sub, data: data).encoded)
        case .userCopy, .inlineUserCopy:
            precondition(tag == r.tag, "a request read is issued under its own tag")
            readAt[Int(r.tag)] = at
            cu_prep_read(ring.sqe(), fd, 0, r.buffer + Int(at), length, offset,
                         UserData(kind: .requestRead, tag: tag, sub: sub, data: data).encoded)
        case .kernelCopy:
            cu_prep_read(ring.sqe(), fd, 0, r.buffer + Int(at), length, offset,
                         UserData(kind: .target, tag: tag, sub: sub, data: data).encoded)
        }
    }

    /// Writes `length` bytes of `r`'s data at `at` to `fd` at `offset`.
    public func writeFromRequest(_ r: Request, at: UInt32, length: UInt32, fd: Int32, offset: UInt64, flags: Int32,
                                 tag: UInt16, sub: UInt8, data: UInt32) {
        let ud = UserData(kind: .target, tag: tag, sub: sub, data: data).encoded
        switch dataPath {
        case .autoZeroCopy, .zeroCopy:
            targetInflight += 1
            cu_prep_write_fixed(ring.sqe(), fd, UInt64(at), length, offset, r.tag, flags, ud)
        case .userCopy, .inlineUserCopy:
            // The request's bytes come into the tag's buffer once (a write-through writes them twice).
            let t = Int(r.tag)
            if at + length > copiedIn[t] {
                let from = at <= copiedIn[t] ? copiedIn[t] : at
                let c = copyRequest(tag: r.tag, out: false, r.buffer + Int(from), length: Int(at + length - from), at: Int(from))
                if c < 0 {
                    // Reported like any I/O result, after the current callback (no recursion).
                    targetInflight += 1
                    failed.append((UserData(kind: .target, tag: tag, sub: sub, data: data), c))
                    return
                }
                if at <= copiedIn[t] { copiedIn[t] = at + length }
            }
            targetInflight += 1
            cu_prep_write(ring.sqe(), fd, 0, r.buffer + Int(at), length, offset, flags, ud)
        case .kernelCopy:
            targetInflight += 1
            cu_prep_write(ring.sqe(), fd, 0, r.buffer + Int(at), length, offset, flags, ud)
        }
    }

    /// Zeros `length` bytes of `r`'s data at `at` (a read past a file's end), now. 0 or -errno.
    public func zeroFill(_ r: Request, at: UInt32, length: UInt32) -> Int32 {
        if dataPath == .kernelCopy {
            memset(r.buffer + Int(at), 0, Int(length))
            return 0
        }
        var done = 0
        while done < Int(length) {
            let n = min(Int(length) - done, 65536)
            let c = copyRequest(tag: r.tag, out: true, Queue.zeros, length: n, at: Int(at) + done)
            if c < 0 { return c }
            done += n
        }
        return 0
    }

    @inline(__always)
    public func read(fd: Int32, into buf: UnsafeMutableRawPointer, length: UInt32, offset: UInt64,
                     tag: UInt16, sub: UInt8, data: UInt32) {
        targetInflight += 1
        cu_prep_read(ring.sqe(), fd, 0, buf, length, offset, UserData(kind: .target, tag: tag, sub: sub, data: data).encoded)
    }

    @inline(__always)
    public func write(fd: Int32, from buf: UnsafeRawPointer, length: UInt32, offset: UInt64, flags: Int32,
                      tag: UInt16, sub: UInt8, data: UInt32) {
        targetInflight += 1
        cu_prep_write(ring.sqe(), fd, 0, buf, length, offset, flags, UserData(kind: .target, tag: tag, sub: sub, data: data).encoded)
    }

    public func fsync(fd: Int32, dataOnly: Bool, tag: UInt16, sub: UInt8, data: UInt32) {
        targetInflight += 1
        cu_prep_fsync(ring.sqe(), fd, 0, dataOnly ? cu_fsync_datasync : 0, UserData(kind: .target, tag: tag, sub: sub, data: data).encoded)
    }

    public func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64,
                          tag: UInt16, sub: UInt8, data: UInt32) {
        targetInflight += 1
        cu_prep_fallocate(ring.sqe(), fd, 0, mode, offset, length, UserData(kind: .target, tag: tag, sub: sub, data: data).encoded)
    }

    public func writeNow(fd: Int32, from buf: UnsafeRawPointer, length: Int, offset: UInt64) -> Int32 {
        pwriteAll(fd, buf, length, offset)
    }

    /// Arms a one-shot poll for readability of `fd`; `eventFired(data:)` follows.
    public func poll(fd: Int32, data: UInt32) {
        precondition(data < Queue.reservedData)
        cu_prep_poll_add(ring.sqe(), fd, cu_poll_in, UserData(kind: .event, data: data).encoded)
    }
}

/// Host tests that inject faults by the thousand turn the server's log off.
nonisolated(unsafe) var logMuted = false

/// Log lines from the server go to stderr (a log file once daemonized).
public func log(_ message: String) {
    if logMuted { return }
    var line = message
    line += "\n"
    _ = line.withCString { Glibc.write(2, $0, strlen($0)) }
}

/// `length` bytes at `buf` written at `offset` of `fd`, whole (short writes
/// continued, EINTR retried): 0, or -errno (-EIO when the file takes nothing).
func pwriteAll(_ fd: Int32, _ buf: UnsafeRawPointer, _ length: Int, _ offset: UInt64) -> Int32 {
    var written = 0
    while written < length {
        let n = pwrite(fd, buf + written, length - written, off_t(offset) + off_t(written))
        if n < 0 {
            if errno == EINTR { continue }
            return -errno
        }
        if n == 0 { return -EIO }
        written += n
    }
    return 0
}
