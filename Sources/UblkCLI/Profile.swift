// `ublk-http profile record|stop`: boot profiles of a live http device (the
// server records, UblkTarget/Targets/ProfileControl.swift; the file format is
// PageCache/BootProfile.swift). The profile file is written here, by the
// caller and in the caller's working directory, never by the server (whose
// queue thread does no blocking file I/O).
import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

struct Profile: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Record the pages a device reads first (a boot profile), to fetch them ahead next time.",
        discussion: """
            ublk-http profile record -n ID --out FILE [--seconds S] [--max-pages N]
                records the pages the http device reads for the first time, in
                order, until `ublk-http profile stop -n ID`, Ctrl-C, S seconds or
                N pages; then writes FILE (atomically) and prints one JSON line.
            ublk-http add -t http --url URL --prefetch-profile FILE
                fetches them in the background on attach, in recorded order
                (coalesced into large ranges, after the device's own misses).
            ublk-http profile status -n ID [--wait]
                the replay's progress (JSON: state running, done, stopped or
                failed; fill_pages, fill_pages_present, requests); --wait
                returns once it ended, non-zero unless it is done.
            ublk-http prefetch --url URL --profile FILE
                fetches them into the cache without a device.

            The file (version 1) is one JSON object:
              {"format":"ublk-http-profile","version":1,"url":URL,"image_size":BYTES,
               "etag":ETAG,"last_modified":DATE,"page_size":4096,"pages":N,
               "runs":[[FIRST_PAGE,COUNT],...]}
            runs in the order first read, disjoint; url as the cache records it
            (query values and passwords REDACTED). It holds offsets, no secrets.
            A profile is refused, in one line, for an image of another size or
            with other validators (ETag, Last-Modified), and when malformed.
            """,
        subcommands: [ProfileRecord.self, ProfileStop.self, ProfileStatusCommand.self])
}

/// What the profile of a live device is recorded against (its state file, which the server wrote).
struct ProfileImage {
    let url: String, imageSize: UInt64, etag: String?, lastModified: String?

    static func of(device id: UInt32) throws -> ProfileImage {
        guard let state = DeviceState.load(id) else { throw Failure("no such device: ublk\(id)") }
        guard state.target == "http" else {
            throw Failure("ublk\(id) is a \(state.target) device: profiles are recorded on http devices")
        }
        let o = state.redacted.targetOptions
        guard let url = o["url"], let size = o["image_size"].flatMap({ UInt64($0) }) else {
            throw Failure("ublk\(id)'s state file names no image (url, image_size)")
        }
        return ProfileImage(url: HTTPTarget.identityURL(url), imageSize: size, etag: o["etag"], lastModified: o["last_modified"])
    }
}

/// Ctrl-C while recording: end the recording and still write the profile.
nonisolated(unsafe) private var interrupted: sig_atomic_t = 0

struct ProfileRecord: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "record",
        abstract: "Record a live http device's first reads until `profile stop`, Ctrl-C or a bound, then write FILE.",
        discussion: "See `ublk-http profile --help` for the file format.")

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    @Option(name: .customLong("out"), help: "The profile file to write (replaced atomically, mode 0644).")
    var out: String

    @Option(name: .customLong("seconds"), parsing: .unconditional, help: "End the recording after S seconds (1-86400).")
    var seconds: Int?

    @Option(name: .customLong("max-pages"), parsing: .unconditional, help: "End the recording once N pages are recorded (default and most: \(ProfileRecorder.defaultMaxPages)).")
    var maxPages: Int?

    func validate() throws {
        _ = try deviceID(number)
        if let s = seconds, !(1...86400).contains(s) { throw Failure("--seconds must be between 1 and 86400, not \(s)") }
        if let p = maxPages, p < 1 || UInt64(p) > ProfileRecorder.defaultMaxPages {
            throw Failure("--max-pages must be between 1 and \(ProfileRecorder.defaultMaxPages), not \(p)")
        }
        if out.isEmpty { throw Failure("--out needs a file name") }
    }

    func run() throws {
        try requireRoot()
        let id = OverlayBase.follow(try deviceID(number))  // an overlay device: its base
        let image = try ProfileImage.of(device: id)
        // The file is created before recording starts, so that an unwritable
        // path fails now, not after the boot it was meant to record.
        let writer = try AtomicFile(path: out)
        var ok = false
        defer { if !ok { writer.abandon() } }
        do {
            _ = try ControlClient.send(ControlRequest(op: .profileStart, pages: maxPages.map { UInt64($0) },
                                                      seconds: seconds.map { UInt64($0) }), device: id)
        } catch { throw Failure(error) }
        // On stderr, so that a script can wait for it before the reads it records.
        printError("profile: recording ublk\(id)'s first reads until `ublk-http profile stop -n \(id)`, Ctrl-C or a bound\n")
        signal(SIGINT) { _ in interrupted = 1 }
        signal(SIGTERM) { _ in interrupted = 1 }
        var stopSent = false
        var status: ProfileStatus
        while true {
            if interrupted != 0 && !stopSent {
                stopSent = true
                do { _ = try ControlClient.send(ControlRequest(op: .profileStop), device: id) } catch { throw Failure(error) }
            }
            do {
                let data = try ControlClient.send(ControlRequest(op: .profileStatus, clear: true), device: id)
                status = try JSONDecoder().decode(ProfileStatus.self, from: data)
            } catch let e as UblkError {
                throw Failure(e)
            } catch {
                throw Failure("ublk\(id): unexpected reply to profile-status")
            }
            if !status.recording { break }
            usleep(100_000)
        }
        let runs = (status.runs ?? []).compactMap { r -> Range<UInt64>? in r.count == 2 ? r[0]..<r[0] + r[1] : nil }
        let profile = BootProfile(url: image.url, imageSize: image.imageSize, etag: image.etag, lastModified: image.lastModified,
                                  pageSize: status.pageSize, runs: runs)
        try writer.commit(profile.encoded())
        ok = true
        struct Output: Encodable {
            var out: String, pages: UInt64, runs: Int, ended: String?
        }
        print(jsonLine(Output(out: out, pages: profile.pageCount, runs: runs.count, ended: status.ended)))
    }
}

struct ProfileStop: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop",
        abstract: "End a device's profile recording (the waiting `profile record` then writes its file).")

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    func run() throws {
        try requireRoot()
        let id = OverlayBase.follow(try deviceID(number))  // an overlay device: its base
        do {
            let data = try ControlClient.send(ControlRequest(op: .profileStop), device: id)
            print(String(decoding: data, as: UTF8.self))
        } catch { throw Failure(error) }
    }
}

struct ProfileStatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Print the progress of a device's profile replay (add --prefetch-profile) as JSON.",
        discussion: """
            The device's background fill (a profile replay, or `hydrate`):
            {"kind":"profile","state":"running|done|stopped|failed",
             "fill_pages":N,"fill_pages_present":N,"requests":N,...}.
            --wait polls until it is no longer running; the exit status is
            then 0 only if it is done.
            """)

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N (/dev/ublkbN).")
    var number: Int

    @Flag(name: .customLong("wait"), help: "Return once the replay has ended (done, stopped or failed).")
    var wait = false

    func run() throws {
        try requireRoot()
        let id = OverlayBase.follow(try deviceID(number))  // an overlay device: its base
        while true {
            let data: Data
            let status: FillStatus
            do {
                data = try ControlClient.send(ControlRequest(op: .fillStatus), device: id)
                status = try JSONDecoder().decode(FillStatus.self, from: data)
            } catch let e as UblkError {
                throw Failure(e)
            } catch {
                throw Failure("ublk\(id): unexpected reply to fill-status")
            }
            if status.state == .idle {
                throw Failure("ublk\(id) has no profile replay (add --prefetch-profile) nor hydration running or ended")
            }
            if wait && status.state == .running {
                usleep(100_000)
                continue
            }
            print(String(decoding: data, as: UTF8.self))
            if wait && status.state != .done {
                throw Failure("ublk\(id): the replay \(status.state.rawValue)\(status.reason.map { ": \($0)" } ?? "")")
            }
            return
        }
    }
}

/// A profile file, read and checked (the format's rules); errors name the file, in one line.
func loadProfile(_ path: String) throws -> BootProfile {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw Failure("cannot read the profile \(path): \(Errno.current)") }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = read(fd, &buf, buf.count)
        if n < 0 && errno == EINTR { continue }
        if n < 0 { throw Failure("cannot read the profile \(path): \(Errno.current)") }
        if n == 0 { break }
        bytes += buf[0..<n]
        if bytes.count > BootProfile.maxFileBytes { break }
    }
    do { return try BootProfile.decode(bytes) } catch { throw Failure("the profile \(path): \(error)") }
}

/// A file replaced atomically: written to a temporary beside it, fsync'ed,
/// renamed over the name, and the directory fsync'ed.
final class AtomicFile {
    let path: String
    let temp: String
    let fd: Int32
    private var closed = false

    init(path: String) throws {
        self.path = path
        temp = path + ".tmp.\(getpid())"
        fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw Failure("cannot write \(path): \(Errno.current)") }
        fchmod(fd, 0o644)  // whatever the umask: a profile holds no secrets
    }

    func commit(_ bytes: [UInt8]) throws {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw Failure("cannot write \(path): \(Errno.current)") }
            off += n
        }
        guard fsync(fd) == 0 else { throw Failure("cannot write \(path): \(Errno.current)") }
        close(fd)
        closed = true
        guard rename(temp, path) == 0 else { throw Failure("cannot write \(path): \(Errno.current)") }
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let d = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if d >= 0 { fsync(d); close(d) }
    }

    func abandon() {
        if !closed { close(fd) }
        closed = true
        unlink(temp)
    }
}
