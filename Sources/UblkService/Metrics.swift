// Every device's counters as one Prometheus text file, labelled by NAME, for
// node_exporter's textfile collector (Debian's prometheus-node-exporter reads
// /var/lib/prometheus/node-exporter/*.prom). `ublk-http metrics --textfile`
// writes it atomically; ublk-http-metrics.timer refreshes it.
import Glibc
import UblkTarget

public enum Metrics {
    public static let defaultTextfile = "/var/lib/prometheus/node-exporter/ublk-http.prom"

    /// What is known of one device, beyond its cache counters.
    public struct Device: Sendable {
        public var id: UInt32
        public var name: String?
        public var target: String?
        public var state: String
        public var queues: Int
        public var dataPath: String?
        public var serverRunning: Bool
        public var restarts: Int
        public var hydratedPercent: Double?
        public var stats: HTTPStats?
        public init(id: UInt32, name: String?, target: String?, state: String, queues: Int, dataPath: String?,
                    serverRunning: Bool, restarts: Int, hydratedPercent: Double?, stats: HTTPStats?) {
            self.id = id
            self.name = name
            self.target = target
            self.state = state
            self.queues = queues
            self.dataPath = dataPath
            self.serverRunning = serverRunning
            self.restarts = restarts
            self.hydratedPercent = hydratedPercent
            self.stats = stats
        }
    }

    static let states = ["LIVE", "QUIESCED", "FAIL_IO", "DEAD"]

    /// A label value with `\`, `"` and newlines escaped.
    static func escape(_ s: String) -> String {
        var out = ""
        for c in s {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    /// The exposition text: each family's HELP and TYPE once, then one sample per device.
    public static func render(_ devices: [Device]) -> String {
        var order: [String] = []
        var families: [String: (type: String, help: String, lines: [String])] = [:]
        func add(_ name: String, _ type: String, _ help: String, _ labels: String, _ value: String) {
            if families[name] == nil {
                order.append(name)
                families[name] = (type, help, [])
            }
            families[name]!.lines.append("ublk_http_\(name){\(labels)} \(value)")
        }
        for d in devices {
            let base = "name=\"\(escape(d.name ?? ""))\",device=\"ublkb\(d.id)\""
            add("device_info", "gauge", "Always 1: the device's target and data path as labels.",
                base + ",target=\"\(escape(d.target ?? "unknown"))\",data_path=\"\(escape(d.dataPath ?? "unknown"))\"", "1")
            for s in states {
                add("device_state", "gauge", "1 for the device's state in the driver (LIVE, QUIESCED: its server died and I/O waits, FAIL_IO, DEAD).",
                    base + ",state=\"\(s)\"", d.state == s ? "1" : "0")
            }
            add("device_queues", "gauge", "Hardware queues (one server thread each).", base, "\(d.queues)")
            add("server_running", "gauge", "1 while the device's server process runs.", base, d.serverRunning ? "1" : "0")
            add("server_restarts_total", "counter", "Servers that died under the device and were replaced (recovered).", base, "\(d.restarts)")
            if let h = d.hydratedPercent {
                add("hydrated_ratio", "gauge", "Pages present in the cache, as a fraction of the image (1: hydrated).", base, "\(h / 100)")
            }
            for s in d.stats?.samples() ?? [] { add(s.name, s.type, s.help, base, s.value) }
        }
        var out = ""
        for name in order {
            let f = families[name]!
            out += "# HELP ublk_http_\(name) \(f.help)\n# TYPE ublk_http_\(name) \(f.type)\n"
            out += f.lines.map { $0 + "\n" }.joined()
        }
        return out
    }

    /// Writes `text` to `path` through a temporary file renamed over it
    /// (node_exporter never reads half a file), mode 0644.
    public static func write(_ text: String, to path: String) throws(Errno) {
        try DeviceState.writeAtomically(Array(text.utf8), to: path, mode: 0o644)
    }
}
