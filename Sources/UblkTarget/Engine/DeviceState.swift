// DeviceState: what `add` reports and `list` shows, persisted by the server
// under /run/ublk-http/ublkN.json (written atomically, removed on shutdown).
//
// Secrets: ublkN.json is readable by everyone (`stats` needs no root) and so
// holds only the redacted state: URLs in target options lose their query
// values and passwords (`Redact.text`), and the `add` arguments are not in it.
// Those, which `recover` repeats and which may hold a presigned URL or a
// header, go to ublkN.args, mode 0600.
import FoundationEssentials
import Glibc
import PageCache

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
    /// How request data moves (DataPath's names); nil in state files of older versions.
    public var dataPath: String?
    /// The `add` arguments that started the server (for `recover`). Never written to
    /// ublkN.json (see `save`); read from there only as left by older versions.
    public var arguments: [String]?
    /// `add --name` (the device table's NAME); nil when none was given.
    public var name: String?
    /// How many times a new server recovered this device after its server died.
    public var restarts: Int?

    enum CodingKeys: String, CodingKey {
        case devID = "dev_id", pid, target, targetOptions = "target_options", queues, depth
        case bufferSize = "buffer_size", size, readOnly = "read_only", recovery
        case blockDevice = "block_device", charDevice = "char_device", arguments, dataPath = "data_path"
        case name, restarts
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

    /// Where the `add` arguments are kept, 0600.
    public static func argumentsPath(_ id: UInt32) -> String { "\(directory)/ublk\(id).args" }

    /// What may be shown to anyone: URLs in the options redacted, no arguments.
    public var redacted: DeviceState {
        var s = self
        s.targetOptions = targetOptions.mapValues { Redact.text($0) }
        s.arguments = nil
        return s
    }

    /// ublkN.json (redacted, 0644) and, with arguments, ublkN.args (0600).
    public func save() throws(Errno) {
        mkdir(DeviceState.directory, 0o755)
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        if let arguments {
            guard let data = try? enc.encode(arguments) else { throw Errno.invalid }
            try DeviceState.writeAtomically(Array(data), to: DeviceState.argumentsPath(devID), mode: 0o600)
        }
        guard let data = try? enc.encode(redacted) else { throw Errno.invalid }
        try DeviceState.writeAtomically(Array(data), to: DeviceState.path(devID), mode: 0o644)
    }

    /// A temporary file of exactly `mode` (whatever the umask), renamed over `path`.
    public static func writeAtomically(_ bytes: [UInt8], to path: String, mode: mode_t) throws(Errno) {
        let tmp = path + ".tmp"
        unlink(tmp)
        let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        if fd < 0 { throw Errno.current }
        var failure: Errno?
        if fchmod(fd, mode) != 0 { failure = Errno.current }
        var done = 0
        while failure == nil && done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n > 0 { done += n } else if n < 0 && errno == EINTR { continue } else { failure = n < 0 ? Errno.current : Errno.io }
        }
        close(fd)
        if failure == nil && rename(tmp, path) != 0 { failure = Errno.current }
        if let failure {
            unlink(tmp)
            throw failure
        }
    }

    public static func load(_ id: UInt32) -> DeviceState? {
        guard let data = FileManager.default.contents(atPath: path(id)) else { return nil }
        return try? JSONDecoder().decode(DeviceState.self, from: data)
    }

    /// The arguments `add` was given for device `id` (for `recover`): ublkN.args, or
    /// the state file of an older version.
    public static func loadArguments(_ id: UInt32) -> [String]? {
        if let data = FileManager.default.contents(atPath: argumentsPath(id)),
           let args = try? JSONDecoder().decode([String].self, from: data) { return args }
        return load(id)?.arguments
    }

    /// `UBLK_HTTP_NAME=NAME` for the udev rule (IMPORT{file}), named after the
    /// block device's kernel name. Written before the block device appears.
    public static func udevPath(_ id: UInt32) -> String { "\(directory)/ublkb\(id).udev" }

    public static func saveUdevName(_ name: String, id: UInt32) throws(Errno) {
        mkdir(directory, 0o755)
        try writeAtomically(Array("UBLK_HTTP_NAME=\(name)\n".utf8), to: udevPath(id), mode: 0o644)
    }

    /// The devices with a state file whose name is `name`.
    public static func ids(named name: String) -> [UInt32] {
        knownIDs().filter { load($0)?.name == name }
    }

    public static func remove(_ id: UInt32) {
        unlink(udevPath(id))
        unlink(argumentsPath(id))
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
