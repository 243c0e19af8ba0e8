// Control: the ublk control device (/dev/ublk-control) over its own
// IORING_SETUP_SQE128 ring (a control command is 32 bytes, more than the 16 a
// plain SQE carries).
//
// Contract: one command in flight at a time, issued from the calling thread,
// which blocks until the kernel answers. START_DEV blocks until every tag of
// every queue has a FETCH outstanding, so it must be sent from a thread other
// than the queues'. Errors come back as `Errno`; callers add the context.
import CUring
import Glibc

public final class Control {
    public static let path = "/dev/ublk-control"
    public static let anyDevice = UInt32.max

    let fd: Int32
    let ring: Ring

    public init() throws(UblkError) {
        let fd = open(Control.path, O_RDWR | O_CLOEXEC)
        if fd < 0 {
            let e = Errno.current
            switch e {
            case .noEntry:
                throw UblkError("the ublk driver is not loaded (\(Control.path) is missing); load it with: modprobe ublk_drv")
            case .accessDenied, .notPermitted:
                throw UblkError("cannot open \(Control.path): permission denied (run as root)")
            default:
                throw UblkError("cannot open \(Control.path)", errno: e)
            }
        }
        self.fd = fd
        do {
            ring = try Ring(entries: 8, flags: cu_setup_sqe128)
        } catch {
            close(fd)
            throw UblkError("cannot create an io_uring for \(Control.path)", errno: error)
        }
    }

    deinit { close(fd) }

    /// Sends one control command and waits for its result (>= 0) or error.
    func command(_ op: UInt32, device: UInt32, queue: UInt16 = .max,
                 buffer: UnsafeMutableRawPointer? = nil, length: Int = 0, data: UInt64 = 0) -> Result<Int32, Errno> {
        var cmd = ublksrv_ctrl_cmd()
        cmd.dev_id = device
        cmd.queue_id = queue
        cmd.len = UInt16(length)
        cmd.addr = UInt64(UInt(bitPattern: buffer))
        cmd.data = data
        let sqe = ring.sqe()
        withUnsafePointer(to: &cmd) { cu_prep_uring_cmd(sqe, fd, op, $0, MemoryLayout<ublksrv_ctrl_cmd>.size, 1) }
        var cqe = cu_cqe()
        while true {
            let r = ring.submitAndWait(1)
            if r < 0 && r != -EINTR { return .failure(Errno(returned: r)) }
            if ring.reap(into: &cqe, max: 1) == 1 { break }
        }
        return cqe.res < 0 ? .failure(Errno(returned: cqe.res)) : .success(cqe.res)
    }

    /// The driver's feature bits (UBLK_F_*).
    public func features() throws(Errno) -> UInt64 {
        var f: UInt64 = 0
        _ = try command(UBLK_U_CMD_GET_FEATURES, device: 0, buffer: &f, length: 8).get()
        return f
    }

    /// ADD_DEV: `info.dev_id` is the wanted id or `anyDevice`; the kernel fills in the rest.
    public func add(_ info: inout ublksrv_ctrl_dev_info) throws(Errno) {
        let id = info.dev_id
        _ = try command(UBLK_U_CMD_ADD_DEV, device: id, buffer: &info,
                        length: MemoryLayout<ublksrv_ctrl_dev_info>.size).get()
    }

    public func info(_ id: UInt32) throws(Errno) -> ublksrv_ctrl_dev_info {
        var info = ublksrv_ctrl_dev_info()
        _ = try command(UBLK_U_CMD_GET_DEV_INFO, device: id, buffer: &info,
                        length: MemoryLayout<ublksrv_ctrl_dev_info>.size).get()
        return info
    }

    public func setParams(_ id: UInt32, _ params: ublk_params) throws(Errno) {
        var p = params
        p.len = UInt32(MemoryLayout<ublk_params>.size)
        _ = try command(UBLK_U_CMD_SET_PARAMS, device: id, buffer: &p, length: MemoryLayout<ublk_params>.size).get()
    }

    public func params(_ id: UInt32) throws(Errno) -> ublk_params {
        var p = ublk_params()
        p.len = UInt32(MemoryLayout<ublk_params>.size)
        _ = try command(UBLK_U_CMD_GET_PARAMS, device: id, buffer: &p, length: MemoryLayout<ublk_params>.size).get()
        return p
    }

    /// START_DEV: blocks until every queue has fetched; `pid` is the server's.
    public func start(_ id: UInt32, pid: Int32) throws(Errno) {
        _ = try command(UBLK_U_CMD_START_DEV, device: id, data: UInt64(pid)).get()
    }

    public func stop(_ id: UInt32) throws(Errno) {
        _ = try command(UBLK_U_CMD_STOP_DEV, device: id).get()
    }

    /// DEL_DEV: returns once the char device is closed by every user.
    public func delete(_ id: UInt32) throws(Errno) {
        _ = try command(UBLK_U_CMD_DEL_DEV, device: id).get()
    }

    public func startRecovery(_ id: UInt32) throws(Errno) {
        _ = try command(UBLK_U_CMD_START_USER_RECOVERY, device: id).get()
    }

    public func endRecovery(_ id: UInt32, pid: Int32) throws(Errno) {
        _ = try command(UBLK_U_CMD_END_USER_RECOVERY, device: id, data: UInt64(pid)).get()
    }
}
