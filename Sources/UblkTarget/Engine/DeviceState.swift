// DeviceState: what `add` reports and `list` shows, persisted by the server
// under /run/ublk-http/ublkN.json (written atomically, removed on shutdown).
import FoundationEssentials
import Glibc

public struct DeviceState: Codable, Sendable {
    public var devID: UInt32
    public var pid: Int32
    public var target: String
    public var targetOptions: [String: String]
    public var queues: Int
    public var depth: Int
    public var bufferSize: Int
    public var size: UInt64
    public var readOnly: Bool
    public var recovery: Bool
    public var blockDevice: String
    public var charDevice: String
    /// The `add` arguments that started the server (for `recover`).
    public var arguments: [String]?

    enum CodingKeys: String, CodingKey {
        case devID = "dev_id", pid, target, targetOptions = "target_options", queues, depth
        case bufferSize = "buffer_size", size, readOnly = "read_only", recovery
        case blockDevice = "block_device", charDevice = "char_device", arguments
    }

    public init(id: UInt32, pid: Int32, target: String, options: [String: String], queues: Int, depth: Int,
                bufferSize: Int, size: UInt64, readOnly: Bool, recovery: Bool) {
        self.devID = id
        self.pid = pid
        self.target = target
        self.targetOptions = options
        self.queues = queues
        self.depth = depth
        self.bufferSize = bufferSize
        self.size = size
        self.readOnly = readOnly
        self.recovery = recovery
        self.blockDevice = "/dev/ublkb\(id)"
        self.charDevice = "/dev/ublkc\(id)"
    }

    public static var directory = ProcessInfo.processInfo.environment["UBLK_HTTP_RUN_DIR"] ?? "/run/ublk-http"

    public static func path(_ id: UInt32) -> String { "\(directory)/ublk\(id).json" }

    public func save() throws(Errno) {
        mkdir(DeviceState.directory, 0o755)
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? enc.encode(self) else { throw Errno.invalid }
        let tmp = DeviceState.path(devID) + ".tmp"
        do {
            try data.write(to: URL(fileURLWithPath: tmp))
        } catch {
            throw Errno.current
        }
        if rename(tmp, DeviceState.path(devID)) != 0 { throw Errno.current }
    }

    public static func load(_ id: UInt32) -> DeviceState? {
        guard let data = FileManager.default.contents(atPath: path(id)) else { return nil }
        return try? JSONDecoder().decode(DeviceState.self, from: data)
    }

    public static func remove(_ id: UInt32) {
        unlink(path(id))
        unlink("\(directory)/ublk\(id).stats.json")
        unlink("\(directory)/ublk\(id).sock")
    }

    /// Ids with a state file.
    public static func knownIDs() -> [UInt32] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.compactMap { n -> UInt32? in
            guard n.hasPrefix("ublk"), n.hasSuffix(".json") else { return nil }
            return UInt32(n.dropFirst(4).dropLast(5))
        }.sorted()
    }
}
