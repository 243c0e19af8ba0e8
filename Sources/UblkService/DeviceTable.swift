// The device table (/etc/ublk-http/ublktab): devices declared once, brought up
// by `ublk-http up` or by systemd (`ublk-http@NAME.service`), found again by
// NAME. One line per device, fstab-like:
//
//     NAME  TARGET  SOURCE  [OPTIONS]
//
// NAME     letters, digits, '.', '-', '_' (at most 64, not starting with '.' or '-'):
//          the device's udev name (/dev/ublk-http/NAME) and, for http, its cache.
// TARGET   null, loop, http, cache or overlay.
// SOURCE   http: the URL; loop: the file; cache: the slow disk; overlay: the
//          NAME of a read-only http device in this table, or a device path;
//          null: '-'.
// OPTIONS  '-' or comma-separated `add` long options without their dashes:
//          `key=value` or a flag `key` (cache-max-size=4G,write-mode=back).
//          http: `mirror=URL` (repeatable) adds a mirror of the image (--url).
//
// '#' starts a comment line. Secrets only by file reference: `header=` is
// refused (header-file= and password-file= are the way), so the table may be
// world-readable. Every device is added with --recovery: a server that dies
// leaves its device waiting, and the next `up` or the unit's restart recovers it.
//
// This file knows the format only; whether the options make a valid `add` is
// the command line's to say (`ublk-http check` parses each line's `add`).

/// One declared device.
public struct TableEntry: Equatable, Sendable {
    public var name: String
    public var target: String
    public var source: String
    /// `key` → value, in the order written; a flag's value is nil.
    public var options: [(key: String, value: String?)]
    /// 1-based line number in the table.
    public var line: Int

    public static func == (a: TableEntry, b: TableEntry) -> Bool {
        a.name == b.name && a.target == b.target && a.source == b.source && a.line == b.line
            && a.options.map { $0.key } == b.options.map { $0.key } && a.options.map { $0.value } == b.options.map { $0.value }
    }

    public func option(_ key: String) -> String? { options.first { $0.key == key }?.value ?? nil }
    public func has(_ key: String) -> Bool { options.contains { $0.key == key } }

    /// A read-only device others may lay an overlay over.
    public var isBase: Bool { target == "http" && !has("writable") }

    /// For an overlay: the table entry it reads through, when SOURCE names one.
    public var lowerName: String? { target == "overlay" && !source.hasPrefix("/") ? source : nil }
}

/// A table line that could not be read, as `check` prints it.
public struct TableError: Error, Equatable, CustomStringConvertible, Sendable {
    public var path: String
    public var line: Int
    public var message: String
    public init(path: String, line: Int, message: String) {
        self.path = path
        self.line = line
        self.message = message
    }
    public var description: String { line > 0 ? "\(path):\(line): \(message)" : "\(path): \(message)" }
}

public struct DeviceTable: Sendable {
    public static let defaultPath = "/etc/ublk-http/ublktab"
    /// Where an http device's cache goes when the table does not say.
    public static let cacheDirectory = "/var/cache/ublk-http"
    public static let targets = ["null", "loop", "http", "cache", "overlay"]

    /// Options the table sets itself (from NAME, TARGET and SOURCE) or that make
    /// no sense for a declared device.
    static let reserved: [String: String] = [
        "type": "TARGET", "t": "TARGET", "url": "SOURCE", "file": "SOURCE", "f": "SOURCE", "backing": "SOURCE",
        "lower": "SOURCE", "overlay": "NAME", "name": "NAME", "foreground": "the service",
        "ready-fd": "the service", "arguments-fd": "the service", "recover-id": "the service",
        "recovery": "the service (every declared device has it)",
    ]

    public var path: String
    public var entries: [TableEntry]

    public init(path: String, entries: [TableEntry]) {
        self.path = path
        self.entries = entries
    }

    public func entry(named name: String) -> TableEntry? { entries.first { $0.name == name } }

    /// Parses `text`; every malformed line is one error, and the good lines are kept.
    public static func parse(_ text: String, path: String = defaultPath) -> (table: DeviceTable, errors: [TableError]) {
        var entries: [TableEntry] = []
        var errors: [TableError] = []
        var lineNumber = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let fields = raw.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" }).map(String.init)
            guard let first = fields.first, !first.hasPrefix("#") else { continue }
            func fail(_ message: String) { errors.append(TableError(path: path, line: lineNumber, message: message)) }
            guard fields.count >= 3 else {
                fail("expected NAME TARGET SOURCE [OPTIONS], found \(fields.count) field\(fields.count == 1 ? "" : "s")")
                continue
            }
            guard fields.count <= 4 else {
                fail("expected NAME TARGET SOURCE [OPTIONS], found \(fields.count) fields (options are separated by commas, not spaces)")
                continue
            }
            let (name, target, source) = (fields[0], fields[1], fields[2])
            if let problem = nameProblem(name) { fail(problem); continue }
            guard targets.contains(target) else {
                fail("unknown target '\(target)' (known: \(targets.joined(separator: ", ")))")
                continue
            }
            if let earlier = entries.first(where: { $0.name == name }) {
                fail("'\(name)' is declared twice (first on line \(earlier.line))")
                continue
            }
            if target == "null" && source != "-" { fail("a null device has no source: write '-' (and size=... in the options)"); continue }
            if target != "null" && source == "-" { fail("a\(target == "http" || target == "overlay" ? "n" : "") \(target) device needs a source"); continue }
            var options: [(key: String, value: String?)] = []
            var bad = false
            if fields.count == 4 && fields[3] != "-" {
                for item in fields[3].split(separator: ",", omittingEmptySubsequences: false) {
                    let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                    let key = String(parts[0])
                    let value = parts.count == 2 ? String(parts[1]) : nil
                    if key.isEmpty { fail("an empty option (two commas, or a comma at the end)"); bad = true; break }
                    if key.hasPrefix("-") { fail("option '\(key)': write it without dashes (\(key.drop { $0 == "-" })=...)"); bad = true; break }
                    if let owner = reserved[key] { fail("option '\(key)' is set by \(owner), not in the options"); bad = true; break }
                    if key == "header" {
                        fail("option 'header': secrets go in a file that only root reads, not in the table: header-file=PATH"); bad = true; break
                    }
                    if key == "password" { fail("option 'password': use password-file=PATH"); bad = true; break }
                    if value == "" { fail("option '\(key)' has an empty value"); bad = true; break }
                    options.append((key, value))
                }
            }
            if bad { continue }
            entries.append(TableEntry(name: name, target: target, source: source, options: options, line: lineNumber))
        }
        // Overlays name their base in this table: it must be there and be a read-only http device.
        for e in entries {
            guard let lower = e.lowerName else { continue }
            guard let base = entries.first(where: { $0.name == lower }) else {
                errors.append(TableError(path: path, line: e.line, message: "overlay '\(e.name)': no device named '\(lower)' in the table (SOURCE is a NAME declared here or a device path)"))
                continue
            }
            if !base.isBase {
                errors.append(TableError(path: path, line: e.line, message: "overlay '\(e.name)': '\(lower)' (line \(base.line)) is not a read-only http device"))
            }
        }
        errors.sort { $0.line < $1.line }
        return (DeviceTable(path: path, entries: entries), errors)
    }

    /// Why `name` cannot be a device's name, or nil.
    public static func nameProblem(_ name: String) -> String? {
        let allowed = name.unicodeScalars.allSatisfy {
            ("a"..."z").contains($0) || ("A"..."Z").contains($0) || ("0"..."9").contains($0) || $0 == "." || $0 == "-" || $0 == "_"
        }
        if name.isEmpty || name.count > 64 || !allowed || name.hasPrefix(".") || name.hasPrefix("-") {
            return "bad name '\(name)': use letters, digits, '.', '-' and '_' (at most 64, not starting with '.' or '-')"
        }
        return nil
    }

    /// The `add` arguments that bring `entry` up. `lowerDevice`: for an
    /// overlay over a table entry, that entry's block device now.
    public static func addArguments(_ entry: TableEntry, lowerDevice: String? = nil) -> [String] {
        var args = ["add", "-t", entry.target, "--name", entry.name, "--recovery"]
        switch entry.target {
        case "http":
            args += ["--url", entry.source]
            if !entry.has("cache") { args += ["--cache", "\(cacheDirectory)/\(entry.name).cache"] }
            if !entry.has("bitmap") { args += ["--bitmap", "\(cacheDirectory)/\(entry.name).bitmap"] }
        case "loop": args += ["--file", entry.source]
        case "cache": args += ["--backing", entry.source]
        case "overlay": args += ["--lower", lowerDevice ?? entry.source, "--overlay", entry.name]
        default: break
        }
        for (key, value) in entry.options {
            args.append(key == "mirror" ? "--url" : "--" + key)
            if let value { args.append(value) }
        }
        return args
    }

    /// Entries in the order they can come up: bases before the overlays over them.
    public var upOrder: [TableEntry] { entries.filter { $0.lowerName == nil } + entries.filter { $0.lowerName != nil } }
}
