// The host service's commands: `up`, `down`, `check` and `serve` over the
// device table (UblkService.DeviceTable), `metrics` for Prometheus, and the
// systemd generator's `generate-units`.
import ArgumentParser
import FoundationEssentials
import Glibc
import UblkService
import UblkTarget

struct TableOption: ParsableArguments {
    @Option(name: .customLong("table"), help: "The device table (default /etc/ublk-http/ublktab; `ublk-http check --help` shows its format).")
    var path: String = DeviceTable.defaultPath

    /// The table's good lines; each bad one is a warning on stderr (`check`
    /// says the same), so that one broken line keeps no other device down.
    func load() throws -> DeviceTable {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw Failure("cannot read the device table \(path): \(Errno(rawValue: errno == 0 ? ENOENT : errno))")
        }
        let (table, errors) = DeviceTable.parse(text, path: path)
        for e in errors { fputs("warning: \(e) (line skipped)\n", stderr) }
        return table
    }

    /// The entries named (all when `names` is empty), in the order they come up.
    func select(_ names: [String], from table: DeviceTable) throws -> [TableEntry] {
        let unknown = names.filter { table.entry(named: $0) == nil }
        if !unknown.isEmpty { throw Failure("not declared in \(path): \(unknown.joined(separator: ", "))") }
        var want = Set(names.isEmpty ? table.entries.map(\.name) : names)
        // An overlay comes up with the device it reads through.
        for n in names { if let lower = table.entry(named: n)?.lowerName { want.insert(lower) } }
        return table.upOrder.filter { want.contains($0.name) }
    }
}

enum Service {
    /// Under a running systemd with the package's units installed, `up` and `down`
    /// go through systemctl, so that the units know their devices.
    static var systemdManages: Bool {
        guard access("/run/systemd/system", F_OK) == 0 else { return false }
        return ["/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"]
            .contains { access("\($0)/\(UnitGenerator.template)", F_OK) == 0 }
    }

    static func systemctl(_ args: [String]) throws {
        var pid: pid_t = 0
        let argv = ["systemctl"] + args
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        let r = posix_spawnp(&pid, "systemctl", nil, nil, &cargs, environ)
        guard r == 0 else { throw Failure("cannot run systemctl: \(Errno(rawValue: r))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        if status != 0 { throw Failure("systemctl \(args.joined(separator: " ")) failed (status \(status >> 8))") }
    }

    /// The running device of an overlay's lower table entry.
    static func lowerDevice(_ entry: TableEntry) throws -> String? {
        guard let lower = entry.lowerName else { return nil }
        guard let id = Devices.holding(name: lower), let s = DeviceState.load(id) else {
            throw Failure("'\(entry.name)' reads through '\(lower)', which is not up")
        }
        return s.blockDevice
    }

    /// The `add` command of `entry`, parsed: the same checks as `add`.
    static func addCommand(_ args: [String]) throws -> Add {
        guard let add = try UblkHTTP.parseAsRoot(args) as? Add else { throw Failure("not an add command") }
        return add
    }
}

struct Up: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Bring up the devices declared in the device table that are not running.",
        discussion: """
            Each NAME (default: every declared device) is brought up as `add` would, with
            --recovery and --name NAME. A device whose server died is recovered instead (its
            waiting I/O completes); one that runs is left alone. An overlay brings up the
            device it reads through first. Prints one JSON object per device brought up.
            Under systemd, with the package's units installed, this is
            `systemctl start ublk-http@NAME.service` (--no-systemd: serve them directly).
            """)

    @Argument(help: "Names declared in the table (default: all).")
    var names: [String] = []

    @OptionGroup var table: TableOption

    @Flag(name: .customLong("no-systemd"), help: "Start the servers directly even where systemd manages the units.")
    var noSystemd = false

    func run() throws {
        let entries = try table.select(names, from: try table.load())
        if !noSystemd && Service.systemdManages {
            // The generator's units follow the table as it is now.
            try Service.systemctl(["daemon-reload"])
            try Service.systemctl(["start"] + entries.map { UnitGenerator.unitName($0.name) })
            let control = try openControl()
            for e in entries {
                if let id = Devices.holding(name: e.name), let entry = List.entries([id], control: control).first {
                    print(jsonLine(entry))
                }
            }
            return
        }
        try requireRoot()
        var failures: [String] = []
        for e in entries {
            do {
                if let id = Devices.holding(name: e.name), let s = DeviceState.load(id) {
                    if Devices.processAlive(s.pid) {
                        fputs("\(e.name): up as \(s.blockDevice)\n", stderr)
                    } else {
                        print(try Recover.start(id, control: try openControl()))
                    }
                    continue
                }
                print(try Daemon.spawnServer(arguments: DeviceTable.addArguments(e, lowerDevice: try Service.lowerDevice(e))))
            } catch {
                failures.append("\(e.name): \(UblkHTTP.oneLine(UblkHTTP.message(for: error)))")
            }
            fflush(stdout)
        }
        if !failures.isEmpty { throw Failure(failures.joined(separator: "; ")) }
    }
}

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop and remove the devices declared in the device table.",
        discussion: """
            Each NAME (default: every declared device) is removed as `del` removes it, overlays
            before the devices they read through. Their caches and overlays are kept. Under
            systemd, with the package's units installed, this is
            `systemctl stop ublk-http@NAME.service` first.
            """)

    @Argument(help: "Names declared in the table (default: all).")
    var names: [String] = []

    @OptionGroup var table: TableOption

    @Flag(name: .customLong("no-systemd"), help: "Remove the devices directly, without systemctl.")
    var noSystemd = false

    func run() throws {
        let t = try table.load()
        let unknown = names.filter { t.entry(named: $0) == nil }
        if !unknown.isEmpty { throw Failure("not declared in \(table.path): \(unknown.joined(separator: ", "))") }
        // Overlays first; a base named alone takes its overlays with it only under systemd (Requires=).
        let entries = t.upOrder.reversed().filter { names.isEmpty || names.contains($0.name) }
        if !noSystemd && Service.systemdManages {
            try Service.systemctl(["stop"] + entries.map { UnitGenerator.unitName($0.name) })
        }
        let control = try openControl()
        var failures: [String] = []
        for e in entries {
            for id in DeviceState.ids(named: e.name) {
                let users = OverlayBase.overlays(over: id, control: control)
                if !users.isEmpty {
                    failures.append("\(e.name): ublk\(id) is the base of \(users.map { "ublk\($0.id)" }.joined(separator: ", ")): take those down first")
                    continue
                }
                do { try Devices.remove(id, control: control, mustExist: false) } catch {
                    failures.append("\(e.name): \(error)")
                }
            }
        }
        if !failures.isEmpty { throw Failure(failures.joined(separator: "; ")) }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check the device table: one line per error, with its line number.",
        discussion: """
            The table (/etc/ublk-http/ublktab) has one line per device:

              NAME  TARGET  SOURCE  [OPTIONS]

              NAME     letters, digits, . - _ (at most 64): /dev/ublk-http/NAME, the
                       unit ublk-http@NAME.service, and an http device's cache
                       (/var/cache/ublk-http/NAME.cache and .bitmap unless given)
              TARGET   null, loop, http, cache or overlay
              SOURCE   http: the URL; loop: the file; cache: the slow disk;
                       overlay: a read-only http device's NAME in this table (or a
                       device path); null: -
              OPTIONS  - or `add`'s long options without dashes, comma-separated:
                       key=value or a flag (cache-max-size=4G,connections=8);
                       http: mirror=URL, once per mirror of the image (--url)

            Example:
              # NAME  TARGET   SOURCE                           OPTIONS
              root    http     https://images.example/root.img  cache-max-size=4G,header-file=/etc/ublk-http/root.headers
              vm1     overlay  root                             -
              data    cache    /dev/sdb                         cache=/nvme/data.cache,bitmap=/nvme/data.bitmap,write-mode=back
              scratch null     -                                size=10G

            Secrets go in files only root reads (header-file=, password-file=), never in the
            table. Each line is checked as `add` checks its command line, and the files it
            names must exist. Exit status 1 when there is any error.
            """)

    @OptionGroup var table: TableOption

    func run() throws {
        let text: String
        do { text = try String(contentsOfFile: table.path, encoding: .utf8) } catch {
            throw Failure("cannot read the device table \(table.path): \(Errno(rawValue: errno == 0 ? ENOENT : errno))")
        }
        let (t, errors) = DeviceTable.parse(text, path: table.path)
        var all = errors
        all += t.entries.flatMap { Check.problems($0, path: table.path) }
        all.sort { $0.line < $1.line }
        for e in all { print(e.description) }
        if !all.isEmpty { throw ExitCode.failure }
        print("\(table.path): \(t.entries.count) device\(t.entries.count == 1 ? "" : "s"), no errors")
    }

    static func problems(_ e: TableEntry, path: String) -> [TableError] {
        func problem(_ message: String) -> TableError { TableError(path: path, line: e.line, message: message) }
        var out: [TableError] = []
        let args = DeviceTable.addArguments(e, lowerDevice: e.lowerName.map { "/dev/ublk-http/\($0)" })
        do { _ = try Service.addCommand(args) } catch {
            out.append(problem(UblkHTTP.oneLine(UblkHTTP.message(for: error))))
        }
        var files: [(String, String)] = []
        if e.target == "loop" || e.target == "cache" { files.append(("SOURCE", e.source)) }
        if e.target == "overlay" && e.lowerName == nil { files.append(("SOURCE", e.source)) }
        for key in ["header-file", "password-file", "cacert", "prefetch-profile"] {
            if let v = e.option(key) { files.append((key, v)) }
        }
        // A file `add` already refused is not reported twice.
        for (what, file) in files where access(file, F_OK) != 0 && !out.contains(where: { $0.message.contains(file) }) {
            out.append(problem("\(what) \(file): \(Errno.current)"))
        }
        return out
    }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve one declared device in this process (what ublk-http@NAME.service runs).",
        discussion: """
            Adds the device NAME of the table with --recovery, or, when its server died and it
            waits, recovers it: a unit restarted after a crash brings the same device back and
            its held I/O completes. Tells systemd READY=1 once /dev/ublkbN is live (Type=notify)
            and serves until SIGTERM, which drains and removes the device.
            """)

    @Argument(help: "The device's NAME in the table.")
    var name: String

    @OptionGroup var table: TableOption

    func run() throws {
        guard let entry = try table.load().entry(named: name) else {
            throw Failure("'\(name)' is not declared in \(table.path)")
        }
        try requireRoot()
        let args: [String]
        if let id = Devices.holding(name: name), let s = DeviceState.load(id) {
            if Devices.processAlive(s.pid) {
                throw Failure("'\(name)' is up as \(s.blockDevice), served by pid \(s.pid)")
            }
            guard let saved = DeviceState.loadArguments(id), saved.first == "add" else {
                throw Failure("ublk\(id) ('\(name)') waits for its server but has no saved arguments in \(DeviceState.argumentsPath(id))")
            }
            args = saved + ["--recover-id", String(id)]
        } else {
            args = DeviceTable.addArguments(entry, lowerDevice: try Service.lowerDevice(entry))
        }
        let add = try Service.addCommand(args)
        try add.serve(report: nil, arguments: args)
    }
}

struct MetricsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "metrics",
        abstract: "Every device's counters and state in Prometheus text format, labelled by name.",
        discussion: """
            The counters of `stats`, and per device: its state in the driver, queue count, data
            path, whether its server runs, how many servers were recovered under it, and the
            pages present (hydrated_ratio). With --textfile the text goes to a file that is
            replaced atomically, for node_exporter's textfile collector
            (ublk-http-metrics.timer refreshes /var/lib/prometheus/node-exporter/ublk-http.prom).
            """)

    @Option(name: .customLong("textfile"), help: "Write to this file (atomically) instead of standard output.")
    var textfile: String?

    func run() throws {
        let control = try openControl()
        let devices = List.entries(Devices.existing(), control: control).map { e in
            Metrics.Device(id: e.devID, name: e.name, target: e.target, state: e.state, queues: e.queues,
                           dataPath: e.dataPath, serverRunning: e.serverRunning, restarts: e.restarts ?? 0,
                           hydratedPercent: e.hydratedPercent, stats: e.stats)
        }
        let text = Metrics.render(devices)
        guard let path = textfile else { return print(text, terminator: "") }
        do { try Metrics.write(text, to: path) } catch {
            throw Failure("cannot write \(path): \(error)")
        }
    }
}

struct GenerateUnits: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate-units",
        abstract: "The systemd generator: a unit per device of the table, under DIR.",
        shouldDisplay: false)

    @Argument(help: "The generator's output directories (systemd passes normal, early and late).")
    var directories: [String]

    @OptionGroup var table: TableOption

    @Option(name: .customLong("template"), help: "Where the template unit is installed.")
    var template = "/usr/lib/systemd/system/\(UnitGenerator.template)"

    func run() throws {
        guard let dir = directories.first else { throw Failure("give the output directory") }
        guard access(table.path, F_OK) == 0 else { return }  // nothing declared
        // The good lines still come up; the bad ones are logged (the journal has the generator's stderr).
        let t = try table.load()
        for item in UnitGenerator.items(for: t, templatePath: template) {
            switch item {
            case .file(let path, let contents):
                let full = "\(dir)/\(path)"
                mkdirs(String(full[..<full.lastIndex(of: "/")!]))
                do { try DeviceState.writeAtomically(Array(contents.utf8), to: full, mode: 0o644) } catch {
                    throw Failure("cannot write \(full): \(error)")
                }
            case .symlink(let path, let target):
                let full = "\(dir)/\(path)"
                mkdirs(String(full[..<full.lastIndex(of: "/")!]))
                unlink(full)
                guard symlink(target, full) == 0 else { throw Failure("cannot link \(full): \(Errno.current)") }
            }
        }
    }

    func mkdirs(_ path: String) {
        var p = ""
        for part in path.split(separator: "/") {
            p += "/" + part
            mkdir(p, 0o755)
        }
    }
}
