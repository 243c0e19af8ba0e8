// Detaching `add`: the parent re-executes this binary as the server in a new
// session (`add ... --foreground --ready-fd 3`), with a pipe on fd 3. The
// server writes one line when the device is live (its JSON) or failed
// ("error: ..."); the parent prints it and exits. No fork() of a Swift
// process: posix_spawn of /proc/self/exe.
import CUring
import FoundationEssentials
import Glibc
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
        mkdir(logDirectory, 0o755)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, "\(logDirectory)/server.log", O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, cu_posix_spawn_setsid)

        // The binary's real path (not /proc/self/exe, which would name the process "exe").
        var pathBuf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &pathBuf, pathBuf.count - 1)
        let exe = n > 0 ? String(decoding: pathBuf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : "/proc/self/exe"
        let argv = ["ublk-http"] + arguments + ["--foreground", "--ready-fd", "3"]
        var cargs = argv.map { strdup($0) } + [nil]
        defer { cargs.forEach { free($0) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, exe, &actions, &attr, &cargs, environ)
        close(fds[1])
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
        let fd = open("\(logDirectory)/ublk\(id).log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if fd >= 0 {
            dup2(fd, 1)
            dup2(fd, 2)
            close(fd)
        }
    }
}
