// `ublk-http hydrate`: make a live caching device independent of its source.
// The device's server (its home queue) fetches every page not present, in
// the background (UblkTarget/Targets/CachingFill.swift: coalesced runs, a
// bounded number in flight, yielding to the device's own misses, --rate as
// a token bucket on the ring); this command starts it and watches.
//
// Decided: the hydration belongs to the device, not to this command. Ctrl-C
// (or a lost terminal) stops only the watching; the server goes on. Running
// `hydrate -n ID` again watches it again (a new --rate applies), and
// `hydrate --stop -n ID` stops it. A server restart ends it (run it again:
// only what is still missing is fetched). As dm-clone's hydration, which
// goes on in the kernel whoever started it.
import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

struct Hydrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Fetch every missing page of a live http or cache device in the background.",
        discussion: """
            The device's server fetches what its cache lacks, in large runs, never
            before the device's own reads; pages written locally (http --writable)
            are never fetched over. This command waits and prints progress: JSON
            lines ({"pages_present":…,"pages_total":…,"percent":…,"bytes_fetched":…,
            "state":…}) once a second, or a progress bar when stdout is a terminal;
            it exits 0 once every page is present and its bit is on the disk (the
            device then serves with the source gone). Ctrl-C stops the watching
            only: the hydration goes on in the server until done, `hydrate --stop`,
            or the device stops. `list` shows each device's hydration percentage.
            An overlay device (`add --overlay`) hydrates its base, which every
            device of that image reads through.
            """)

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    @Option(name: .customLong("rate"), help: "At most this many bytes per second (e.g. 4M/s, 500K).")
    var rate: String?

    @Flag(name: .customLong("stop"), help: "Stop the device's hydration (pages fetched so far stay).")
    var stop = false

    @Flag(name: .customLong("detach"), help: "Start it and return at once (one JSON line), without waiting.")
    var detach = false

    /// Bytes per second from "4M/s", "4MiB/s", "4M", "4194304": a size (Size.parse) per second, above 0.
    static func parseRate(_ text: String) -> UInt64? {
        var s = text.trimmed
        if s.lowercased().hasSuffix("/s") { s.removeLast(2) }
        guard let v = Size.parse(s), v > 0 else { return nil }
        return v
    }

    func validate() throws {
        if let r = rate, Hydrate.parseRate(r) == nil {
            throw Failure("bad --rate '\(r)': expected bytes per second above 0, such as 4M/s")
        }
        if stop && (rate != nil || detach) { throw Failure("--stop takes no --rate or --detach") }
    }

    func run() throws {
        try requireRoot()
        var id = try deviceID(number)
        guard var state = DeviceState.load(id) else { throw Failure("no such device: ublk\(id)") }
        // An overlay device's other pages come from its base: hydrating it is hydrating the base.
        if state.target == "overlay", let b = OverlayBase.baseID(of: state), let s = DeviceState.load(b) {
            id = b
            state = s
        }
        guard state.target == "http" || state.target == "cache" else {
            throw Failure("ublk\(id) is a \(state.target) device: only http and cache devices have a cache to hydrate")
        }
        if stop {
            print(jsonLine(try Hydrate.send(ControlRequest(op: .fillStop), id)))
            return
        }
        var start = ControlRequest(op: .hydrate)
        start.rate = rate.flatMap(Hydrate.parseRate)
        var status = try Hydrate.send(start, id)
        if detach {
            print(jsonLine(status))
            return
        }
        let tty = isatty(1) != 0
        if tty {
            // Ctrl-C ends the bar's line; the hydration goes on in the server.
            signal(SIGINT) { _ in
                _ = write(1, "\n", 1)
                _exit(130)
            }
        }
        var lastLine = UInt64(0)
        var doneSince: UInt64?
        while true {
            let now = monotonicNanos()
            if tty {
                Hydrate.bar(status)
            } else if lastLine == 0 || now &- lastLine >= 1_000_000_000
                        || (status.state != .running && !(status.state == .done && !status.persisted)) {
                print(jsonLine(status))
                fflush(stdout)
                lastLine = now
            }
            switch status.state {
            case .done where status.persisted:
                if tty { print("") }
                return
            case .done:
                // Every page is here; its bit reaches the disk with the next full cycle (about a second).
                if doneSince == nil { doneSince = now }
                if now &- doneSince! > 30_000_000_000 {
                    if tty { print("") }
                    throw Failure("ublk\(id): every page is present but the bitmap was not persisted in 30 s (see the server's log)")
                }
            case .failed, .stopped, .idle:
                if tty { print("") }
                throw Failure("ublk\(id): hydration \(status.state.rawValue)" + (status.reason.map { ": \($0)" } ?? ""))
            case .running:
                if status.kind != .hydrate {
                    if tty { print("") }
                    throw Failure("ublk\(id): another fill replaced the hydration")
                }
            }
            usleep(tty ? 200_000 : 250_000)
            status = try Hydrate.send(ControlRequest(op: .fillStatus), id)
        }
    }

    static func send(_ request: ControlRequest, _ id: UInt32) throws -> FillStatus {
        do {
            let data = try ControlClient.send(request, device: id, timeoutSeconds: 30)
            return try JSONDecoder().decode(FillStatus.self, from: data)
        } catch let e as UblkError {
            throw Failure(e)
        } catch {
            throw Failure("ublk\(id): bad reply to \(request.op.rawValue): \(error)")
        }
    }

    static func bar(_ s: FillStatus) {
        print("\r" + barLine(s) + "\u{1b}[K", terminator: "")
        fflush(stdout)
    }

    /// The bar, rewritten in place on a terminal: [#####.....]  42.0%  12.3 MiB fetched  3.1 MiB/s
    static func barLine(_ s: FillStatus) -> String {
        let width = 30
        let filled = min(width, Int(s.percent / 100 * Double(width)))
        let speed = s.elapsedSeconds > 0 ? UInt64(Double(s.bytesFetched) / s.elapsedSeconds) : 0
        var line = "[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "] "
        line += String(repeating: " ", count: max(0, 5 - "\(s.percent)".count)) + "\(s.percent)%  "
        line += "\(Size.format(s.bytesFetched)) fetched  \(Size.format(speed))/s"
        if s.rate > 0 { line += " (at most \(Size.format(s.rate))/s)" }
        return line
    }
}
