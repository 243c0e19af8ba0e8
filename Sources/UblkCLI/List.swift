import ArgumentParser
import CUring
import FoundationEssentials
import PageCache
import UblkTarget

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List ublk devices as a JSON array (state, queues, depth, size, target, pid).")

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Only device id N.")
    var number: Int?

    struct Entry: Encodable {
        var devID: UInt32
        var state: String
        var queues: Int
        var depth: Int
        var size: UInt64
        var target: String?
        var targetOptions: [String: String]?
        var pid: Int32
        var serverRunning: Bool
        var blockDevice: String
        var charDevice: String
        var readOnly: Bool?
        var stats: HTTPStats?
        var dataPath: String?
        /// Caching targets: the pages present, in percent (`hydrate` brings it to 100).
        var hydratedPercent: Double?
        /// `add --name` / the device table's NAME.
        var name: String?
        /// Servers that died under the device and were replaced by `recover`.
        var restarts: Int?
        enum CodingKeys: String, CodingKey {
            case devID = "dev_id", state, queues, depth, size, target, targetOptions = "target_options", pid
            case serverRunning = "server_running", blockDevice = "block_device", charDevice = "char_device"
            case readOnly = "read_only", stats, dataPath = "data_path", hydratedPercent = "hydrated_percent"
            case name, restarts
        }
    }

    static func stateName(_ s: UInt16) -> String {
        switch Int32(s) {
        case UBLK_S_DEV_DEAD: return "DEAD"
        case UBLK_S_DEV_LIVE: return "LIVE"
        case UBLK_S_DEV_QUIESCED: return "QUIESCED"
        case UBLK_S_DEV_FAIL_IO: return "FAIL_IO"
        default: return "UNKNOWN(\(s))"
        }
    }

    func run() throws {
        let only = try number.map(deviceID)
        let control = try openControl()
        if let id = only, (try? control.info(id)) == nil { throw Failure("no such device: ublk\(id)") }
        print(jsonLine(List.entries(only.map { [$0] } ?? Devices.existing(), control: control)))
    }

    /// What `list` shows of the devices `ids` the kernel knows (others are left out).
    static func entries(_ ids: [UInt32], control: Control) -> [Entry] {
        var out: [Entry] = []
        for id in ids {
            guard let info = try? control.info(id) else { continue }
            let saved = DeviceState.load(id)
            let stats = HTTPStats.load(id)
            let size = (try? control.params(id)).map { $0.basic.dev_sectors << 9 } ?? saved?.size ?? 0
            out.append(Entry(devID: id, state: List.stateName(info.state), queues: Int(info.nr_hw_queues),
                             depth: Int(info.queue_depth), size: size, target: saved?.target,
                             targetOptions: saved?.redacted.targetOptions, pid: info.ublksrv_pid,
                             serverRunning: Devices.processAlive(info.ublksrv_pid),
                             blockDevice: "/dev/ublkb\(id)", charDevice: "/dev/ublkc\(id)", readOnly: saved?.readOnly,
                             stats: stats, dataPath: saved?.dataPath,
                             // An overlay holds only its written pages: its base is what hydrates.
                             hydratedPercent: saved?.target == "overlay" ? nil
                                 : stats.map { FillStatus.percent($0.pagesPresent, of: $0.pagesTotal) },
                             name: saved?.name, restarts: saved?.restarts))
        }
        return out
    }
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a device's cache statistics in Prometheus text format (--json: as JSON).",
        discussion: "The server publishes them once a second while they change.")

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    @Flag(name: .customLong("json"), help: "JSON instead of Prometheus text.")
    var json = false

    func run() throws {
        let id = try deviceID(number)
        guard let stats = HTTPStats.load(id) else {
            if DeviceState.load(id) == nil { throw Failure("no such device: ublk\(id)") }
            throw Failure("ublk\(id) has no cache statistics (only the http target keeps them)")
        }
        print(json ? jsonLine(stats) : stats.prometheus(device: id), terminator: json ? "\n" : "")
    }
}
