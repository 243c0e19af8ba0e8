// Detaching `add`: the parent re-executes this binary as the server in a new
// session (`add ... --foreground --ready-fd 3 --arguments-fd 4`), with a pipe
// on fd 3. The server writes one line when the device is live (its JSON) or
// failed ("error: ..."); the parent prints it and exits. No fork() of a Swift
// process: posix_spawn of /proc/self/exe.
//
// Secrets: /proc/PID/cmdline is world-readable for as long as the server runs,
// so its argv is a redacted copy of the arguments (header values, URL query
// values and passwords replaced by REDACTED, see `Redact`); the real ones
// travel NUL-separated through a pipe on fd 4, written in full before the
// spawn. The server's logs are created 0600.
import CUring
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

struct ReadyPipe {
    let fd: Int32
    func send(_ line: String) {
        let text = line + "\n"
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }
}

enum Daemon {
    static var logDirectory: String { DeviceState.directory }

    static func spawnServer(arguments: [String]) throws -> String {
        var fds: [Int32] = [0, 0]
        guard cu_pipe_cloexec(&fds) == 0 else { throw Failure("pipe: \(Errno.current)") }
        var argFDs: [Int32] = [0, 0]
        guard cu_pipe_cloexec(&argFDs) == 0 else {
            close(fds[0]); close(fds[1])
            throw Failure("pipe: \(Errno.current)")
        }
        defer { close(argFDs[0]) }
        // The real arguments, whole, before the server exists: no blocking, no SIGPIPE.
        let payload = Array(arguments.map { $0 + "\0" }.joined().utf8)
        if payload.count > 60 << 10 { close(argFDs[1]); close(fds[0]); close(fds[1]); throw Failure("the arguments are too long (\(payload.count) bytes)") }
        let written = payload.withUnsafeBytes { write(argFDs[1], $0.baseAddress, $0.count) }
        close(argFDs[1])
        if written != payload.count { close(fds[0]); close(fds[1]); throw Failure("cannot hand the arguments to the server: \(Errno.current)") }

        mkdir(logDirectory, 0o755)
        let serverLog = "\(logDirectory)/server.log"
        chmod(serverLog, 0o600)  // made 0644 by older versions

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, serverLog, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        // Sources above 4, so that neither dup2 overwrites the other's source.
        let readySource = fcntl(fds[1], F_DUPFD_CLOEXEC, 10)
        let argumentsSource = fcntl(argFDs[0], F_DUPFD_CLOEXEC, 10)
        posix_spawn_file_actions_adddup2(&actions, readySource, 3)
        posix_spawn_file_actions_adddup2(&actions, argumentsSource, 4)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, cu_posix_spawn_setsid)

        // The binary's real path (not /proc/self/exe, which would name the process "exe").
        var pathBuf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &pathBuf, pathBuf.count - 1)
        let exe = n > 0 ? String(decoding: pathBuf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "/proc/self/exe"
        let argv = ["ublk-http"] + Redact.arguments(arguments) + ["--foreground", "--ready-fd", "3", "--arguments-fd", "4"]
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let r = readySource < 0 || argumentsSource < 0 ? errno : posix_spawn(&pid, exe, &actions, &attr, &cargs, environ)
        // Every copy of the write end closed here: EOF if the server dies before reporting.
        close(fds[1])
        if readySource >= 0 { close(readySource) }
        if argumentsSource >= 0 { close(argumentsSource) }
        if r != 0 {
            close(fds[0])
            throw Failure("cannot start the server process: \(Errno(rawValue: r))")
        }
        // One line, or EOF if the server died first.
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fds[0], &buf, buf.count)
            if n > 0 { data += buf[0..<n]; if data.contains(10) { break } }
            else if n < 0 && errno == EINTR { continue }
            else { break }
        }
        close(fds[0])
        let line = String(decoding: data, as: UTF8.self).trimmed
        if line.hasPrefix("{") { return line }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        if line.hasPrefix("error: ") { throw Failure(String(line.dropFirst(7))) }
        throw Failure("the server process exited before the device was ready (status \(status)); see \(logDirectory)/server.log")
    }

    /// After reporting: stdout/stderr go to the device's log, nothing to the terminal.
    static func redirectOutput(toLogFor id: UInt32) {
        let fd = open("\(logDirectory)/ublk\(id).log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        if fd >= 0 {
            fchmod(fd, 0o600)  // made 0644 by older versions
            dup2(fd, 1)
            dup2(fd, 2)
            close(fd)
        }
    }

    /// The server's side of the arguments pipe: NUL-terminated arguments up to EOF.
    static func receiveArguments(fd: Int32) throws -> [String] {
        defer { close(fd) }
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { data += buf[0..<n]; if data.count > 1 << 20 { throw Failure("the server's arguments are too long") } }
            else if n < 0 && errno == EINTR { continue }
            else if n < 0 { throw Failure("cannot read the server's arguments: \(Errno.current)") }
            else { break }
        }
        guard data.last == 0 else { throw Failure("the server's arguments arrived incomplete") }
        return data.dropLast().split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
    }
}

extension Redact {
    /// `add` arguments as the server's argv and the logs may show them: header values,
    /// and the query values and passwords of URLs, replaced by REDACTED.
    static func arguments(_ args: [String]) -> [String] {
        var out: [String] = []
        var headerNext = false
        for a in args {
            if headerNext {
                out.append(header(a))
                headerNext = false
            } else if a == "--header" {
                out.append(a)
                headerNext = true
            } else if a.hasPrefix("--header=") {
                out.append("--header=" + header(String(a.dropFirst(9))))
            } else {
                out.append(text(a))
            }
        }
        return out
    }
}
