import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

/// `add -t overlay` and `add -t http --overlay NAME`: a writable device that
/// keeps only its own pages over a shared, read-only base (OverlayTarget.swift).
struct OverlayOptions: ParsableArguments {
    @Option(name: .customLong("overlay"), help: "http, overlay: the named overlay that keeps this device's writes (letters, digits, . - _). Created on first use, reattached by the same name later. With http: the device is an overlay over the image's shared base (one read-only http device per URL, started when none runs), so every device of one image fetches and stores each page once.")
    var name: String?

    @Option(name: .customLong("overlay-dir"), help: "Where overlays live (default /var/lib/ublk-http/overlays): they hold data written nowhere else, so not under a cache directory.")
    var directory: String = OverlayOptions.defaultDirectory
    static let defaultDirectory = "/var/lib/ublk-http/overlays"

    @Option(name: .customLong("lower"), help: "overlay: the read-only device under the overlay (a base: /dev/ublkbN of a read-only http device).")
    var lower: String?

    var given: Bool { name != nil || lower != nil }
}

enum OverlayBase {
    /// What the lower device is: for /dev/ublkbN of an http device, its image
    /// (URL without secrets, ETag, Last-Modified); for anything else, what
    /// identifies the file or device. Recorded in the overlay's bitmaps.
    static func identity(lower: String) throws -> BitmapIdentity {
        let prefix = "/dev/ublkb"
        if lower.hasPrefix(prefix), let n = UInt32(lower.dropFirst(prefix.count)), let s = DeviceState.load(n) {
            guard s.target == "http" else {
                throw Failure("the lower device \(lower) is a \(s.target) device: an overlay goes over a read-only http device (its image's base)")
            }
            guard s.targetOptions["writable"] != "true" else {
                throw Failure("the lower device \(lower) is writable: an overlay needs a read-only base (add the http device without --writable)")
            }
            let o = s.targetOptions
            return BitmapIdentity(kind: .local, pageSize: OverlayStore.pageSize, imageSize: s.size,
                                  url: HTTPTarget.identityURL(o["url"] ?? ""),
                                  etag: o["etag"].flatMap { $0.isEmpty ? nil : $0 },
                                  lastModified: o["last_modified"].flatMap { $0.isEmpty ? nil : $0 })
        }
        let fd = open(lower, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure("cannot open the lower device \(lower): \(Errno.current)") }
        defer { close(fd) }
        return BitmapIdentity(kind: .local, pageSize: OverlayStore.pageSize, imageSize: 0,
                              url: "lower:" + BackingIdentity.describe(fd: fd))
    }

    /// The image's base as `add --overlay` finds it.
    enum Base {
        /// Its server runs.
        case running(DeviceState)
        /// Added with --recovery, its server died, and the device waits for
        /// `recover`: it still owns the cache files (a second base must never be
        /// started on them) and its overlays' reads wait in it.
        case awaitingRecovery(DeviceState)
    }

    /// The read-only http device of this URL (the image's base), if any: one
    /// whose server runs, else one that waits for `recover`. A base whose
    /// server died without --recovery is gone (the kernel stopped it).
    static func findBase(url: String, control: Control) -> Base? {
        let want = HTTPTarget.identityURL(url)
        var waiting: DeviceState?
        for id in DeviceState.knownIDs().sorted() {
            guard let s = DeviceState.load(id), s.target == "http", s.targetOptions["writable"] != "true",
                  HTTPTarget.identityURL(s.targetOptions["url"] ?? "") == want else { continue }
            if Devices.processAlive(s.pid) { return .running(s) }
            if waiting == nil, Devices.awaitsRecovery(id, control: control) { waiting = s }
        }
        return waiting.map { .awaitingRecovery($0) }
    }

    /// The id of an overlay device's lower device, when that is a ublk device.
    static func baseID(of state: DeviceState) -> UInt32? {
        guard state.target == "overlay", let lower = state.targetOptions["lower"], lower.hasPrefix("/dev/ublkb") else { return nil }
        return UInt32(lower.dropFirst("/dev/ublkb".count))
    }

    /// `id`, or for an overlay device the base it reads through (which fetches, records and replays for it).
    static func follow(_ id: UInt32) -> UInt32 {
        DeviceState.load(id).flatMap { baseID(of: $0) } ?? id
    }

    static func isOverlay(_ id: UInt32) -> Bool { DeviceState.load(id)?.target == "overlay" }

    /// The overlay devices that read through ublkb`id`: those whose server runs,
    /// and those whose server died and that wait for `recover` (`waiting`: a
    /// recovered server reads through the base again).
    static func overlays(over id: UInt32, control: Control) -> [(id: UInt32, waiting: Bool)] {
        DeviceState.knownIDs().compactMap { o in
            guard let s = DeviceState.load(o), s.target == "overlay", s.targetOptions["lower"] == "/dev/ublkb\(id)" else { return nil }
            if Devices.processAlive(s.pid) { return (o, false) }
            return Devices.awaitsRecovery(o, control: control) ? (o, true) : nil
        }
    }

    /// `args` without the options that make it an overlay (and its device id),
    /// nor those of how this process serves (--foreground: the base always
    /// runs in the background, as without it).
    static func baseArguments(_ args: [String]) -> [String] {
        let dropWithValue: Set<String> = ["--overlay", "--overlay-dir", "--lower", "-n", "--number", "--name",
                                          "--ready-fd", "--arguments-fd", "--recover-id"]
        let dropFlags: Set<String> = ["--writable", "--foreground"]
        var out: [String] = []
        var skip = false
        for a in args {
            if skip { skip = false; continue }
            if dropWithValue.contains(a) { skip = true; continue }
            if dropFlags.contains(a) || dropWithValue.contains(where: { a.hasPrefix($0 + "=") }) { continue }
            out.append(a)
        }
        return out
    }

    /// The `add` arguments of the overlay device over `lower`, for an
    /// `add -t http --url URL --overlay NAME`: the same with or without --foreground.
    static func overlayArguments(_ add: Add, lower: String) -> [String] {
        var args = ["add", "-t", "overlay", "--lower", lower, "--overlay", add.overlay.name!,
                    "--overlay-dir", add.overlay.directory, "-q", String(add.queues), "-d", String(add.depth)]
        if let n = add.number { args += ["-n", String(n)] }
        if let name = add.name { args += ["--name", name] }
        if add.recovery { args.append("--recovery") }
        return args
    }

    /// The base of the add's URL, serving: the running one (a --prefetch-profile
    /// is replayed there), the one waiting for `recover` (recovered), or a new
    /// one started in the background. `started`: this call started it.
    static func base(for add: Add, arguments: [String], control: Control) throws -> (state: DeviceState, started: Bool) {
        let url = add.http.url!
        let found = findBase(url: url, control: control)
        if let want = add.http.verityRoot?.lowercased() {
            // A verified overlay reads through a base that verifies with this root, never through one that does not.
            switch found {
            case .running(let b)?, .awaitingRecovery(let b)?:
                guard b.targetOptions["verity_root"] == want else {
                    throw Failure("the base ublk\(b.devID) of \(Redact.url(url)) serves " + (b.targetOptions["verity_root"] == nil
                        ? "unverified" : "with another --verity-root") + ": `del` it first, or add the overlay as that base is")
                }
            case nil: break
            }
        }
        switch found {
        case .running(let b)?:
            try replayProfile(add, on: b)
            return (b, false)
        case .awaitingRecovery(let b)?:
            // Recovered here rather than refused: its saved arguments say
            // exactly how to serve it (as `recover -n ID` would), its
            // overlays' waiting reads complete too, and the add the user
            // asked for goes on. Starting another base instead would put two
            // servers on one cache; waiting for it would hang.
            let line: String
            do { line = try Recover.start(b.devID, control: control) } catch {
                throw Failure("the base ublk\(b.devID) of \(Redact.url(url)) waits for `ublk-http recover -n \(b.devID)` and could not be recovered: \(error)")
            }
            let s = try decodeState(line, what: "the recovered base ublk\(b.devID)")
            try replayProfile(add, on: s)
            return (s, false)
        case nil:
            let line = try Daemon.spawnServer(arguments: baseArguments(arguments))
            return (try decodeState(line, what: "the base device"), true)
        }
    }

    static func decodeState(_ line: String, what: String) throws -> DeviceState {
        guard let s = try? JSONDecoder().decode(DeviceState.self, from: Data(line.utf8)) else {
            throw Failure("\(what) did not start: \(line)")
        }
        return s
    }

    /// A base that runs already replays the add's profile (a base the add
    /// starts replays it itself, from its own --prefetch-profile).
    static func replayProfile(_ add: Add, on b: DeviceState) throws {
        guard let path = add.prefetchProfile else { return }
        let p = try loadProfile(path)
        let o = b.targetOptions
        if let why = p.mismatch(url: HTTPTarget.identityURL(o["url"] ?? ""), imageSize: UInt64(o["image_size"] ?? "") ?? 0,
                                etag: o["etag"], lastModified: o["last_modified"]) {
            throw Failure("the profile \(path) does not fit \(Redact.url(add.http.url!)): \(why)")
        }
        var request = ControlRequest(op: .profileReplay)
        // Not cut into runs (the fill cuts its own): at most one range per
        // profile run, so the request stays within the control socket's bound.
        request.runs = p.replayRanges(targetPageSize: Int(o["page_size"] ?? "") ?? 4096, maxRunBytes: .max)
            .map { [$0.lowerBound, $0.upperBound - $0.lowerBound] }
        _ = try Hydrate.send(request, b.devID)
    }

    /// `add -t http --url URL --overlay NAME`: the base of URL (started when
    /// none runs), then the overlay device over it. Returns the overlay's line.
    static func attach(_ add: Add, arguments: [String]) throws -> String {
        let control = try openControl()
        let (base, started) = try base(for: add, arguments: arguments, control: control)
        do { return try Daemon.spawnServer(arguments: overlayArguments(add, lower: base.blockDevice)) } catch {
            // Nothing is left behind by a failed add: a base it started goes again.
            if started { try? Devices.remove(base.devID, control: control, mustExist: false) }
            throw error
        }
    }

    /// `add --foreground -t http --url URL --overlay NAME`: the same devices as
    /// `attach`, the base in the background as always, the overlay device's
    /// server in this process (until SIGTERM, SIGINT or `del`).
    static func serveInForeground(_ add: Add, arguments: [String], report: ReadyPipe?) throws {
        do {
            if let path = add.prefetchProfile { _ = try loadProfile(path) }
            let control = try openControl()
            let (base, started) = try base(for: add, arguments: arguments, control: control)
            let args = overlayArguments(add, lower: base.blockDevice)
            do {
                guard let device = try UblkHTTP.parseAsRoot(args) as? Add else { throw Failure("the overlay device's arguments do not parse") }
                try device.serve(report: report, arguments: args)
            } catch {
                // The overlay device did not come up: a base this add started goes again.
                if started { try? Devices.remove(base.devID, control: control, mustExist: false) }
                throw error
            }
        } catch {
            // ExitCode: the overlay device's server reported its failure itself.
            if let r = report, !(error is ExitCode) {
                r.send("error: \(Redact.text(UblkHTTP.oneLine(UblkHTTP.message(for: error))))")
                throw ExitCode.failure
            }
            throw error
        }
    }
}
