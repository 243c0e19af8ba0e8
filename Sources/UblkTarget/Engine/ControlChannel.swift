// ControlChannel: a device's control socket, /run/ublk-http/ublkN.sock, served
// on queue 0's own ring (the state it asks about lives on that thread).
//
// Contract: one connection carries one JSON request line and gets one JSON
// reply line, then is closed. Accepting and reading are polled on the ring and
// never block the queue; the reply is small and written at once. Root only
// (0600). Requests go to the target's handler (`QueueHandler.control`).
import CUring
import FoundationEssentials
import Glibc

public struct ControlRequest: Codable, Sendable {
    public var op: String
    public var clear: Bool?
    public var token: UInt64?
    public var ok: Bool?
    public init(op: String, clear: Bool? = nil, token: UInt64? = nil, ok: Bool? = nil) {
        self.op = op
        self.clear = clear
        self.token = token
        self.ok = ok
    }
}

/// A reply: `{"error": "..."}` or the handler's own JSON object.
public func controlError(_ message: String) -> String {
    let enc = JSONEncoder()
    return String(decoding: (try? enc.encode(["error": message])) ?? Data(), as: UTF8.self)
}

public func controlJSON<T: Encodable>(_ value: T) -> String {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: (try? enc.encode(value)) ?? Data("{}".utf8), as: UTF8.self)
}

final class ControlChannel {
    let path: String
    let listenFD: Int32
    private var pending: [Int32: [UInt8]] = [:]

    static func path(_ id: UInt32) -> String { "\(DeviceState.directory)/ublk\(id).sock" }

    init(device id: UInt32) throws(UblkError) {
        path = ControlChannel.path(id)
        mkdir(DeviceState.directory, 0o755)
        unlink(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw UblkError("control socket", errno: .current) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
            close(fd)
            throw UblkError("control socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if bound != 0 || listen(fd, 16) != 0 {
            let e = Errno.current
            close(fd)
            throw UblkError("cannot listen on \(path)", errno: e)
        }
        chmod(path, 0o600)
        listenFD = fd
    }

    deinit {
        for fd in pending.keys { close(fd) }
        close(listenFD)
        unlink(path)
    }

    /// New connections, to be polled for their request.
    func acceptAll() -> [Int32] {
        var out: [Int32] = []
        while true {
            let c = cu_accept_nonblock(listenFD)
            if c < 0 { break }
            pending[c] = []
            out.append(c)
        }
        return out
    }

    /// Reads what arrived on `fd`; returns the request once its line is complete
    /// (nil: poll again). A malformed or cut-off request gets an error reply here.
    func receive(_ fd: Int32) -> ControlRequest?? {
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 {
                pending[fd, default: []] += buf[0..<n]
                if (pending[fd]?.count ?? 0) > 65536 { reply(fd, controlError("request too long")); return .some(nil) }
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == EAGAIN && !(pending[fd]?.contains(10) ?? false) { return nil }
            break
        }
        let bytes = pending[fd] ?? []
        guard let end = bytes.firstIndex(of: 10) else {
            reply(fd, controlError("incomplete request"))
            return .some(nil)
        }
        guard let req = try? JSONDecoder().decode(ControlRequest.self, from: Data(bytes[..<end])) else {
            reply(fd, controlError("malformed request"))
            return .some(nil)
        }
        return .some(req)
    }

    func reply(_ fd: Int32, _ text: String) {
        let line = Array((text + "\n").utf8)
        var off = 0
        while off < line.count {
            let n = line[off...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            off += n
        }
        pending[fd] = nil
        close(fd)
    }
}

/// The CLI side: one request, one reply line (JSON).
public enum ControlClient {
    struct ErrorReply: Decodable { var error: String? }

    public static func send(_ request: ControlRequest, device id: UInt32, timeoutSeconds: Int = 600) throws(UblkError) -> Data {
        let path = ControlChannel.path(id)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw UblkError("socket", errno: .current) }
        defer { close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in bytes.enumerated() where i < p.count - 1 { p[i] = b }
        }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 {
            let e = Errno.current
            if e == .noEntry || e == Errno(rawValue: ECONNREFUSED) {
                throw UblkError("ublk\(id) has no running server that takes commands (\(path))")
            }
            throw UblkError("cannot connect to \(path)", errno: e)
        }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let enc = JSONEncoder()
        var line = (try? enc.encode(request)) ?? Data()
        line.append(10)
        let sent = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if sent != line.count { throw UblkError("cannot send to \(path)", errno: .current) }
        var reply = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { reply += buf[0..<n]; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw UblkError("no reply from ublk\(id)'s server", errno: .current) }
            break
        }
        guard let end = reply.firstIndex(of: 10) else { throw UblkError("ublk\(id)'s server closed the connection without a reply") }
        let data = Data(reply[..<end])
        if let e = try? JSONDecoder().decode(ErrorReply.self, from: data), let message = e.error {
            throw UblkError("ublk\(id): \(message)")
        }
        return data
    }
}
