// Server: one ublk device's lifecycle in the server process.
//
//   start():  GET_FEATURES → ADD_DEV → SET_PARAMS → open /dev/ublkcN →
//             one thread per queue (ring, descriptor mmap, FETCH every tag) →
//             START_DEV from this thread → wait for /dev/ublkbN → state file.
//             Recovering a device whose server died (UBLK_F_USER_RECOVERY):
//             GET_DEV_INFO → START_USER_RECOVERY → open /dev/ublkcN → queues →
//             END_USER_RECOVERY; the kernel then reissues the waiting I/O.
//   wait():   SIGINT, SIGTERM, SIGHUP, or SIGUSR1 (a queue loop ended because
//             the device was stopped from outside).
//   shutdown(): STOP_DEV → wake and join the queues → unmap and close the char
//             device → DEL_DEV → remove the state file.
//
// Contract: start() either returns a live device or throws with nothing left
// behind (the half-made device is deleted). The calling thread must be the
// process's main thread; start() blocks the stop signals in it before any
// queue thread exists, so only wait() ever receives them.
import CUring
import Dispatch
import FoundationEssentials
import Glibc

public struct ServerOptions: Sendable {
    public var deviceID: UInt32?
    public var queues = 1
    public var depth = 128
    public var bufferSize = 512 * 1024
    public var recovery = false
    /// Force this data path (`add --data-path`); nil: the best the driver and the target have.
    public var dataPath: DataPath?
    /// Recover this device (its server died) instead of adding one.
    public var recoverID: UInt32?
    /// The `add` arguments, saved in the state file so that `recover` can start the same server.
    public var arguments: [String] = []
    /// The device's name (`add --name`, the device table): udev links
    /// /dev/ublk-http/NAME to it, `list` shows it.
    public var name: String?
    public init() {}
}

public final class Server {
    public let target: Target
    public let options: ServerOptions
    let control: Control
    public private(set) var deviceID: UInt32 = Control.anyDevice
    private var added = false
    private var charFD: Int32 = -1
    private var flags: UInt64 = 0
    public private(set) var dataPath: DataPath = .kernelCopy
    private var queues: [Queue] = []
    private var threads: [pthread_t] = []

    public init(target: Target, options: ServerOptions) throws(UblkError) {
        self.target = target
        self.options = options
        self.control = try Control()
    }

    static var stopSignals: sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP, SIGUSR1] { sigaddset(&set, s) }
        return set
    }

    public func start() throws(UblkError) -> DeviceState {
        var set = Server.stopSignals
        pthread_sigmask(SIG_BLOCK, &set, nil)
        // A peer that goes away (a control client, a server's socket) is an
        // EPIPE to handle, never a signal that kills the device's server.
        signal(SIGPIPE, SIG_IGN)
        do {
            return try bringUp()
        } catch {
            shutdown()
            throw error
        }
    }

    private func bringUp() throws(UblkError) -> DeviceState {
        let features: UInt64
        do { features = try control.features() } catch {
            throw UblkError("the kernel's ublk driver does not answer GET_FEATURES (Linux 6.1 or older?)", errno: error)
        }
        guard features & UBLK_F_CMD_IOCTL_ENCODE != 0 else {
            throw UblkError("the kernel's ublk driver lacks UBLK_F_CMD_IOCTL_ENCODE; Linux 6.1 or newer with ioctl-encoded commands is required")
        }
        if options.recovery && features & UBLK_F_USER_RECOVERY == 0 {
            throw UblkError("the kernel's ublk driver does not support user recovery")
        }
        let params = target.params
        guard params.size >= 512 else { throw UblkError("device size must be at least 512 bytes") }

        let info: ublksrv_ctrl_dev_info
        if let id = options.recoverID {
            info = try reattach(id, params: params)
        } else {
            info = try create(params, features: features)
        }
        flags = info.flags
        // Before START_DEV: the block device's udev event reads the name from here.
        if let name = options.name {
            do { try DeviceState.saveUdevName(name, id: deviceID) } catch {
                throw UblkError("cannot write \(DeviceState.udevPath(deviceID))", errno: error)
            }
        }
        // User copy with a target that prefers the inline copy to plain user copy.
        let inline = params.dataPaths.firstIndex(of: .inlineUserCopy).map { i in
            params.dataPaths.firstIndex(of: .userCopy).map { i < $0 } ?? true } ?? false
        dataPath = DataPath.granted(flags: info.flags, inline: inline && options.dataPath != .userCopy)

        let charPath = "/dev/ublkc\(deviceID)"
        for attempt in 0..<200 {
            charFD = open(charPath, O_RDWR | O_CLOEXEC)
            if charFD >= 0 || errno != ENOENT || attempt == 199 { break }
            usleep(10_000)
        }
        if charFD < 0 { throw UblkError("cannot open \(charPath)", errno: .current) }

        try startQueues(count: Int(info.nr_hw_queues), depth: Int(info.queue_depth), bufferSize: Int(info.max_io_buf_bytes))

        if options.recoverID != nil {
            do { try control.endRecovery(deviceID, pid: getpid()) } catch {
                throw UblkError("END_USER_RECOVERY failed for ublk\(deviceID)", errno: error)
            }
            added = true
        } else {
            do { try control.start(deviceID, pid: getpid()) } catch {
                throw UblkError("START_DEV failed for ublk\(deviceID)", errno: error)
            }
        }
        let blockPath = "/dev/ublkb\(deviceID)"
        var st = stat()
        for _ in 0..<500 where stat(blockPath, &st) != 0 { usleep(10_000) }
        if stat(blockPath, &st) != 0 { throw UblkError("\(blockPath) did not appear after START_DEV") }

        var state = DeviceState(id: deviceID, pid: getpid(), target: target.name, options: target.options,
                                queues: Int(info.nr_hw_queues), depth: Int(info.queue_depth),
                                bufferSize: Int(info.max_io_buf_bytes), size: params.size,
                                readOnly: params.readOnly, recovery: info.flags & UBLK_F_USER_RECOVERY != 0)
        state.dataPath = dataPath.rawValue
        state.arguments = options.arguments
        state.name = options.name
        // A recovered device keeps its count of servers that died under it.
        if options.recoverID != nil { state.restarts = (DeviceState.load(deviceID)?.restarts ?? 0) + 1 }
        do { try state.save() } catch {
            throw UblkError("cannot write \(DeviceState.path(deviceID))", errno: error)
        }
        return state
    }

    /// ADD_DEV and SET_PARAMS.
    private func create(_ params: DeviceParams, features: UInt64) throws(UblkError) -> ublksrv_ctrl_dev_info {
        var info = ublksrv_ctrl_dev_info()
        info.nr_hw_queues = UInt16(options.queues)
        info.queue_depth = UInt16(options.depth)
        info.max_io_buf_bytes = UInt32(options.bufferSize)
        info.dev_id = options.deviceID ?? Control.anyDevice
        info.flags = UBLK_F_CMD_IOCTL_ENCODE | (options.recovery ? UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE : 0)
        info.flags |= try Server.choosePath(target: target, features: features, forced: options.dataPath).deviceFlags(features: features)
        do { try control.add(&info) } catch {
            if error == .exists, let id = options.deviceID {
                throw UblkError("device id \(id) is taken: /dev/ublkc\(id) already exists")
            }
            throw UblkError("ADD_DEV failed", errno: error)
        }
        added = true
        deviceID = info.dev_id

        var p = ublk_params()
        p.types = UInt32(UBLK_PARAM_TYPE_BASIC)
        p.basic.attrs = UInt32(params.readOnly ? UBLK_ATTR_READ_ONLY : 0)
            | UInt32(params.writeCache ? UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA : 0)
            | UInt32(params.rotational ? UBLK_ATTR_ROTATIONAL : 0)
        p.basic.logical_bs_shift = params.logicalBlockShift
        p.basic.physical_bs_shift = params.physicalBlockShift
        p.basic.io_opt_shift = params.physicalBlockShift
        p.basic.io_min_shift = params.logicalBlockShift
        p.basic.max_sectors = UInt32(info.max_io_buf_bytes >> 9)
        p.basic.dev_sectors = params.size >> 9
        if params.discard {
            p.types |= UInt32(UBLK_PARAM_TYPE_DISCARD)
            p.discard.discard_granularity = 4096
            p.discard.max_discard_sectors = UInt32.max >> 9
            p.discard.max_write_zeroes_sectors = p.basic.max_sectors
            p.discard.max_discard_segments = 1
        }
        if params.dmaAlignment > 1 {
            p.types |= UInt32(UBLK_PARAM_TYPE_DMA_ALIGN)
            p.dma.alignment = params.dmaAlignment - 1
        }
        do { try control.setParams(deviceID, p) } catch {
            throw UblkError("SET_PARAMS failed for ublk\(deviceID)", errno: error)
        }
        return info
    }

    /// The data path for `target` on a driver with `features`: the forced one
    /// (refused when the driver or the target lacks it), else the target's best.
    static func choosePath(target: Target, features: UInt64, forced: DataPath?) throws(UblkError) -> DataPath {
        let supported = target.params.dataPaths
        if let f = forced {
            guard supported.contains(f) else {
                throw UblkError("--data-path \(f.rawValue) does not apply to this \(target.name) target (it can use: \(supported.map(\.rawValue).joined(separator: ", ")))")
            }
            guard features & f.requiredFeature == f.requiredFeature else {
                throw UblkError("--data-path \(f.rawValue) needs \(f.requirement); this kernel's ublk driver lacks it")
            }
            return f
        }
        return supported.first { features & $0.requiredFeature == $0.requiredFeature } ?? .kernelCopy
    }

    /// START_USER_RECOVERY of a device whose server died. The device is not
    /// ours to delete until recovery completes: a failure leaves it waiting.
    private func reattach(_ id: UInt32, params: DeviceParams) throws(UblkError) -> ublksrv_ctrl_dev_info {
        let info: ublksrv_ctrl_dev_info
        do { info = try control.info(id) } catch {
            throw UblkError(error == .noDevice ? "no such device: ublk\(id)" : "GET_DEV_INFO failed for ublk\(id)",
                            errno: error == .noDevice ? nil : error)
        }
        guard info.flags & UBLK_F_USER_RECOVERY != 0 else {
            throw UblkError("ublk\(id) was not added with --recovery: it cannot be recovered")
        }
        let size = (try? control.params(id)).map { $0.basic.dev_sectors << 9 } ?? 0
        guard size == params.size else {
            throw UblkError("ublk\(id) has \(size) bytes but the target now has \(params.size): not recovering")
        }
        deviceID = id
        do { try control.startRecovery(id) } catch {
            if error == .busy {
                throw UblkError("ublk\(id) cannot be recovered now: its server is still running (state \(info.state))")
            }
            throw UblkError("START_USER_RECOVERY failed for ublk\(id)", errno: error)
        }
        return info
    }

    private final class QueueStart {
        let queue: Queue
        let target: Target
        let ready = DispatchSemaphore(value: 0)
        var error: UblkError?
        init(queue: Queue, target: Target) { self.queue = queue; self.target = target }
    }

    private func startQueues(count: Int, depth: Int, bufferSize: Int) throws(UblkError) {
        var starts: [QueueStart] = []
        for q in 0..<count {
            let queue = Queue(device: deviceID, id: UInt16(q), depth: depth, bufferSize: bufferSize, charFD: charFD,
                              flags: flags, dataPath: dataPath)
            if q == 0 { queue.control = try ControlChannel(device: deviceID) }
            let s = QueueStart(queue: queue, target: target)
            queues.append(queue)
            starts.append(s)
            var thread = pthread_t()
            let arg = Unmanaged.passRetained(s).toOpaque()
            let r = pthread_create(&thread, nil, { raw in
                let s = Unmanaged<QueueStart>.fromOpaque(raw!).takeRetainedValue()
                do { try s.queue.setUp(target: s.target) } catch let e as UblkError {
                    s.error = e
                    s.ready.signal()
                    return nil
                } catch {
                    s.error = UblkError("queue setup: \(error)")
                    s.ready.signal()
                    return nil
                }
                s.ready.signal()
                s.queue.run()
                // The loop ended: tell the main thread (it may be the device stopping by itself).
                kill(getpid(), SIGUSR1)
                return nil
            }, arg)
            if r != 0 {
                Unmanaged<QueueStart>.fromOpaque(arg).release()
                queues.removeLast()
                throw UblkError("cannot start queue thread \(q)", errno: Errno(rawValue: r))
            }
            threads.append(thread)
        }
        for s in starts {
            s.ready.wait()
            if let e = s.error { throw e }
        }
    }

    /// Blocks until a stop signal arrives or a queue ends; returns the signal.
    @discardableResult
    public func wait() -> Int32 {
        var set = Server.stopSignals
        var sig: Int32 = 0
        while sigwait(&set, &sig) != 0 {}
        return sig
    }

    /// Stops and deletes the device; idempotent, never throws (best effort, logged).
    public func shutdown() {
        for q in queues { q.requestDrain() }
        if added { try? control.stop(deviceID) }
        for q in queues { q.wake() }
        for t in threads { pthread_join(t, nil) }
        threads.removeAll()
        queues.removeAll()
        if charFD >= 0 { close(charFD); charFD = -1 }
        if added {
            do { try control.delete(deviceID) } catch where error != .noDevice {
                log("ublk\(deviceID): DEL_DEV failed: \(error)")
            } catch {}
            added = false
            DeviceState.remove(deviceID)
        }
    }
}
