import ArgumentParser
import CUring
import FoundationEssentials
import Glibc
import UblkTarget

struct Del: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop and remove ublk devices; returns once the block device is gone.",
        discussion: """
            Works for devices whose server still runs (it is told to stop and exits) and for
            stale ones left by a server that crashed or was killed.
            """)

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int?

    @Flag(name: [.short, .customLong("all")], help: "Remove every ublk device.")
    var all = false

    func validate() throws {
        if all == (number != nil) { throw Failure("give either -n ID or -a") }
        if let n = number { _ = try deviceID(n) }
    }

    func run() throws {
        let control = try openControl()
        // Overlays before their bases: a base goes only when nothing reads through it.
        let ids = all ? Devices.existing().sorted { a, b in OverlayBase.isOverlay(a) && !OverlayBase.isOverlay(b) }
                      : [try deviceID(number!)]
        if !all, let id = ids.first {
            // An overlay device whose server died and that waits for `recover`
            // counts too: recovered, it reads through this base again.
            let users = OverlayBase.overlays(over: id, control: control)
            if !users.isEmpty {
                let names = users.map { "ublk\($0.id)" + ($0.waiting ? " (its server died; it waits for `ublk-http recover -n \($0.id)`)" : "") }
                throw Failure("ublk\(id) is the base of \(names.joined(separator: ", ")): del \(users.count == 1 ? "that overlay device" : "those overlay devices") first (`del -a` removes overlay devices before their bases)")
            }
        }
        var failures: [String] = []
        for id in ids {
            do { try Devices.remove(id, control: control, mustExist: !all) } catch let f as Failure {
                failures.append(f.description)
            }
        }
        if !failures.isEmpty { throw Failure(failures.joined(separator: "; ")) }
    }
}

enum Devices {
    /// Ids the kernel knows (char devices) plus those with a state file.
    static func existing() -> [UInt32] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/dev")) ?? []
        var ids = Set(names.compactMap { n -> UInt32? in n.hasPrefix("ublkc") ? UInt32(n.dropFirst(5)) : nil })
        ids.formUnion(DeviceState.knownIDs())
        return ids.sorted()
    }

    static func processAlive(_ pid: Int32) -> Bool {
        guard pid > 0 else { return false }
        if kill(pid, 0) != 0 && errno == ESRCH { return false }
        // A zombie is as good as gone.
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")") {
            let rest = stat[stat.index(after: close)...].trimmed
            if rest.hasPrefix("Z") || rest.hasPrefix("X") { return false }
        }
        return true
    }

    /// Device `id` was added with --recovery, its server died, and it waits
    /// for `recover` (its block device and the I/O sent to it are kept).
    static func awaitsRecovery(_ id: UInt32, control: Control) -> Bool {
        guard var info = try? control.info(id), info.flags & UBLK_F_USER_RECOVERY != 0,
              !processAlive(info.ublksrv_pid) else { return false }
        // Just after its server died the driver may not have quiesced it yet.
        let deadline = Date().addingTimeInterval(5)
        while info.state == UInt16(UBLK_S_DEV_LIVE) && Date() < deadline {
            usleep(20_000)
            guard let i = try? control.info(id) else { return false }
            info = i
        }
        return info.state == UInt16(UBLK_S_DEV_QUIESCED) || info.state == UInt16(UBLK_S_DEV_FAIL_IO)
    }

    /// The device that holds `name`: its server runs, or it waits for `recover`.
    static func holding(name: String) -> UInt32? {
        guard let control = try? Control() else { return nil }
        return DeviceState.ids(named: name).first { id in
            guard let info = try? control.info(id) else { return false }
            return processAlive(info.ublksrv_pid) || awaitsRecovery(id, control: control)
        }
    }

    static func waitGone(_ pid: Int32, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while processAlive(pid) {
            if Date() > deadline { return false }
            usleep(20_000)
        }
        return true
    }

    static func remove(_ id: UInt32, control: Control, mustExist: Bool) throws {
        let info: ublksrv_ctrl_dev_info
        do { info = try control.info(id) } catch {
            DeviceState.remove(id)
            if error == .noDevice {
                if mustExist { throw Failure("no such device: ublk\(id)") }
                return
            }
            throw Failure("ublk\(id): GET_DEV_INFO failed: \(error)")
        }
        let pid = info.ublksrv_pid
        let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? ""
        let ours = processAlive(pid) && comm.hasPrefix("ublk-http")
        if ours {
            // Our server stops cleanly on SIGTERM: it fails what waits on slow
            // sources, persists its cache state, stops and deletes the device.
            kill(pid, SIGTERM)
            _ = waitGone(pid, seconds: 20)
        }
        // Whoever serves it (or nobody, after a crash): STOP_DEV ends its queues.
        try? control.stop(id)
        if processAlive(pid) && !waitGone(pid, seconds: 15) && ours {
            kill(pid, SIGKILL)
            _ = waitGone(pid, seconds: 5)
        }
        do { try control.delete(id) } catch where error != .noDevice {
            throw Failure("ublk\(id): DEL_DEV failed: \(error)")
        } catch {}
        DeviceState.remove(id)
        let deadline = Date().addingTimeInterval(10)
        while access("/dev/ublkb\(id)", F_OK) == 0 || access("/dev/ublkc\(id)", F_OK) == 0 {
            if Date() > deadline { throw Failure("ublk\(id) was deleted but its device nodes remain") }
            usleep(20_000)
        }
    }
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a new server for a device added with --recovery whose server died.",
        discussion: """
            The device kept its I/O waiting; the new server is started with the arguments
            saved at `add` (in /run/ublk-http/ublkN.args, mode 0600; a --header-file or
            --password-file is read again) and the waiting I/O completes.
            Prints the device's JSON, like `add`.
            """)

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    func run() throws {
        let id = try deviceID(number)
        print(try Recover.start(id, control: try openControl()))
    }

    /// Starts the new server of device `id`; returns its JSON line.
    static func start(_ id: UInt32, control: Control) throws -> String {
        let info: ublksrv_ctrl_dev_info
        do { info = try control.info(id) } catch {
            throw Failure(error == .noDevice ? "no such device: ublk\(id)" : "ublk\(id): GET_DEV_INFO failed: \(error)")
        }
        if Devices.processAlive(info.ublksrv_pid) && info.state == UInt16(UBLK_S_DEV_LIVE) {
            throw Failure("ublk\(id) is live: its server (pid \(info.ublksrv_pid)) is running")
        }
        guard let args = DeviceState.loadArguments(id), args.first == "add" else {
            throw Failure("ublk\(id) has no saved arguments in \(DeviceState.argumentsPath(id)): cannot tell how to serve it")
        }
        return try Daemon.spawnServer(arguments: args + ["--recover-id", String(id)])
    }
}
