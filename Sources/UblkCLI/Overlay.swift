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

    /// The running read-only http device of this URL (the image's base), if any.
    static func findBase(url: String) -> DeviceState? {
        let want = HTTPTarget.identityURL(url)
        for id in DeviceState.knownIDs().sorted() {
            guard let s = DeviceState.load(id), s.target == "http", s.targetOptions["writable"] != "true",
                  HTTPTarget.identityURL(s.targetOptions["url"] ?? "") == want, kill(s.pid, 0) == 0 else { continue }
            return s
        }
        return nil
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

    /// The running overlay devices whose lower device is ublkb`id`.
    static func overlays(over id: UInt32) -> [UInt32] {
        DeviceState.knownIDs().filter { o in
            guard let s = DeviceState.load(o), s.target == "overlay", Devices.processAlive(s.pid) else { return false }
            return s.targetOptions["lower"] == "/dev/ublkb\(id)"
        }
    }

    /// `args` without the options that make it an overlay (and its device id).
    static func baseArguments(_ args: [String]) -> [String] {
        let dropWithValue: Set<String> = ["--overlay", "--overlay-dir", "--lower", "-n", "--number"]
        var out: [String] = []
        var skip = false
        for a in args {
            if skip { skip = false; continue }
            if dropWithValue.contains(a) { skip = true; continue }
            if a == "--writable" || dropWithValue.contains(where: { a.hasPrefix($0 + "=") }) { continue }
            out.append(a)
        }
        return out
    }

    /// `add -t http --url URL --overlay NAME`: the base of URL (started when
    /// none runs), then the overlay device over it. Returns the overlay's line.
    static func attach(_ add: Add, arguments: [String]) throws -> String {
        let url = add.http.url!
        var base = findBase(url: url)
        var started = false
        if let b = base, let path = add.prefetchProfile {
            // The base runs already: the profile is replayed there (a base this
            // add starts replays it itself, from its own --prefetch-profile).
            let p = try loadProfile(path)
            let o = b.targetOptions
            if let why = p.mismatch(url: HTTPTarget.identityURL(o["url"] ?? ""), imageSize: UInt64(o["image_size"] ?? "") ?? 0,
                                    etag: o["etag"], lastModified: o["last_modified"]) {
                throw Failure("the profile \(path) does not fit \(Redact.url(url)): \(why)")
            }
            var request = ControlRequest(op: .profileReplay)
            // Not cut into runs (the fill cuts its own): at most one range per
            // profile run, so the request stays within the control socket's bound.
            request.runs = p.replayRanges(targetPageSize: Int(o["page_size"] ?? "") ?? 4096, maxRunBytes: .max)
                .map { [$0.lowerBound, $0.upperBound - $0.lowerBound] }
            _ = try Hydrate.send(request, b.devID)
        }
        if base == nil {
            let line = try Daemon.spawnServer(arguments: baseArguments(arguments))
            guard let s = try? JSONDecoder().decode(DeviceState.self, from: Data(line.utf8)) else {
                throw Failure("the base device did not start: \(line)")
            }
            base = s
            started = true
        }
        var args = ["add", "-t", "overlay", "--lower", base!.blockDevice, "--overlay", add.overlay.name!,
                    "--overlay-dir", add.overlay.directory, "-q", String(add.queues), "-d", String(add.depth)]
        if let n = add.number { args += ["-n", String(n)] }
        if add.recovery { args.append("--recovery") }
        do { return try Daemon.spawnServer(arguments: args) } catch {
            // Nothing is left behind by a failed add: a base it started goes again.
            if started, let control = try? openControl() { try? Devices.remove(base!.devID, control: control, mustExist: false) }
            throw error
        }
    }
}
