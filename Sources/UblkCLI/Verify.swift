// `ublk-http verify`: check every page a verified http device's cache holds
// from the remote against the image's hash tree again, in its server (the
// scrub: UblkTarget/Targets/CachingVerify.swift), and drop those that fail.
import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check every cached page of a verified http device against its hash tree.",
        discussion: """
            For a device added with --verity-root. Its server reads each page its cache
            holds from the remote (verified or not, local writes excepted) from the cache
            file again and checks it against the image's dm-verity hash tree; a page that
            does not match is dropped and fetched again on its next read. Reads go on
            meanwhile. A progress bar on a terminal, else (or with --json) JSON lines
            ({"state":…,"pages_checked":…,"pages_total":…,"pages_dropped":…}), the last
            one with state "done". Exit status 0 when every page matched, 1 when pages
            were dropped (the server's log names them), 2 on other errors.
            """)

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    @Flag(name: .customLong("json"), help: "JSON lines even on a terminal.")
    var json = false

    func run() throws {
        // Exit 1 says what a scrub found: every other failure is 2.
        let id: UInt32
        do {
            try requireRoot()
            id = try deviceID(number)
            guard let state = DeviceState.load(id) else { throw Failure("no such device: ublk\(id)") }
            guard state.target == "http" else {
                throw Failure("ublk\(id) is a \(state.target) device: only http devices added with --verity-root are verified")
            }
        } catch let f as Failure {
            fputs("Error: \(f.description)\n", stderr)
            throw ExitCode(2)
        }
        var status = try Verify.send(ControlRequest(op: .verify), id)
        let tty = isatty(1) != 0 && !json
        var lastLine = UInt64(0)
        while true {
            let now = monotonicNanos()
            if tty {
                print("\r" + Verify.barLine(status) + "\u{1b}[K", terminator: "")
                fflush(stdout)
            } else if lastLine == 0 || now &- lastLine >= 1_000_000_000 || status.state != "running" {
                print(jsonLine(status))
                fflush(stdout)
                lastLine = now
            }
            if status.state != "running" { break }
            usleep(200_000)
            status = try Verify.send(ControlRequest(op: .verifyStatus), id)
        }
        if tty { print("") }
        if status.state != "done" { throw ExitCode(2) }
        if status.pagesDropped > 0 {
            fputs("ublk\(id): \(status.pagesDropped) of \(status.pagesChecked) pages did not match the hash tree and were dropped (fetched again when read)\n", stderr)
            throw ExitCode(1)
        }
    }

    static func send(_ request: ControlRequest, _ id: UInt32) throws -> ScrubStatus {
        do {
            let data = try ControlClient.send(request, device: id, timeoutSeconds: 30)
            return try JSONDecoder().decode(ScrubStatus.self, from: data)
        } catch let e as UblkError {
            fputs("Error: \(e.description)\n", stderr)
            throw ExitCode(2)
        } catch {
            fputs("Error: ublk\(id): bad reply to \(request.op.rawValue): \(error)\n", stderr)
            throw ExitCode(2)
        }
    }

    /// [#####.....]  42.0%  1234/2938 pages checked  0 dropped
    static func barLine(_ s: ScrubStatus) -> String {
        let width = 30
        let pct = s.pagesTotal == 0 ? 100.0 : min(100.0, Double(s.pagesChecked) * 100 / Double(s.pagesTotal))
        let filled = min(width, Int(pct / 100 * Double(width)))
        let bar: String = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        let tenths = Int((pct * 10).rounded())
        let percent: String = "\(tenths / 10).\(tenths % 10)%"
        return "[\(bar)] \(percent)  \(s.pagesChecked)/\(s.pagesTotal) pages checked  \(s.pagesDropped) dropped"
    }
}
