// ControlChannel: a device's control socket, /run/ublk-http/ublkN.sock, served
// on queue 0's own ring (the state it asks about lives on that thread).
//
// Contract:
// - One connection carries one JSON request line (at most `maxRequest` bytes:
//   room for a `profile-replay` of a profile's most runs, BootProfile.maxRuns,
//   each of the largest numbers) and gets one JSON reply line, of any size,
//   then is closed. A longer request is answered with a one-line error (the
//   client checks first and says so itself, before sending).
// - Requests held while they arrive are bounded together by `maxBuffered`:
//   a request that would take more gets a one-line "busy" error.
// - Nothing here blocks the queue: sockets are non-blocking, and accepting,
//   reading and writing each wait for readiness through a one-shot poll on the
//   ring (`Next.poll`). A reply the socket does not take at once is kept, and
//   the rest goes out as the client reads; the connection closes once all is sent.
// - A client cannot hurt the server: writes use MSG_NOSIGNAL (no SIGPIPE), a
//   client that disconnects midway only ends its connection, at most
//   `maxConnections` are held (past that the oldest is shut down and closed),
//   so memory is bounded by `maxConnections` replies and `maxBuffered`
//   request bytes.
// - Each connection has a token (slot and generation) that its polls carry; a
//   poll that fires for a connection already closed (its fd number maybe reused)
//   is recognised and ignored. A closed connection is shut down first, which
//   completes the poll still armed on it, so the ring holds no dead socket.
// - Root only (0600). Requests go to the target's handler (`QueueHandler.control`).
import CUring
import FoundationEssentials
import Glibc

/// The operations of a device's control socket, typed on both ends (server and CLI).
public enum ControlOp: String, Codable, Sendable {
    /// List the dirty pages (`clear`: and clear them).
    case dirty
    /// Take a snapshot of the dirty pages for `sync`; nothing is cleared.
    case syncBegin = "sync-begin"
    /// Confirm (`ok`) or abandon a `sync-begin` snapshot (`token`).
    case syncEnd = "sync-end"
    /// Write-back: start copying, report what is left (`WritebackStatus`).
    case flush
    /// Boot profiles (ProfileControl.swift): start recording first reads (`pages`, `seconds`: bounds).
    case profileStart = "profile-start"
    /// End the recording (`ProfileStatus`).
    case profileStop = "profile-stop"
    /// The recording's state; once ended, its runs (`clear`: and forget it).
    case profileStatus = "profile-status"
    /// Replay `runs` ([first page, count] in the device's pages, in order) in
    /// the background, as `add --prefetch-profile` does at attach; replies `FillStatus`.
    case profileReplay = "profile-replay"
    /// Fetch every missing page in the background, at most `rate` bytes/s
    /// (CachingFill.swift); replies `FillStatus`. A hydration running already
    /// goes on (with the new `rate`, when given).
    case hydrate
    /// The background fill's progress (`FillStatus`).
    case fillStatus = "fill-status"
    /// Stop the background fill (`FillStatus`).
    case fillStop = "fill-stop"
    /// A verified image: check every present remote page against the hash tree
    /// again, in the background, dropping those that fail (`ScrubStatus`).
    case verify
    /// The check's progress (`ScrubStatus`).
    case verifyStatus = "verify-status"
}

/// The reply to `flush`.
public struct WritebackStatus: Codable, Sendable, Equatable {
    public var writebackPages: UInt64
    public var inFlight: Bool
    public var unpersisted: Bool
    public init(writebackPages: UInt64, inFlight: Bool, unpersisted: Bool) {
        self.writebackPages = writebackPages
        self.inFlight = inFlight
        self.unpersisted = unpersisted
    }
    /// Nothing left to copy, nothing in flight, every cleared bit on the disk.
    public var isDone: Bool { writebackPages == 0 && !inFlight && !unpersisted }
    enum CodingKeys: String, CodingKey {
        case writebackPages = "writeback_pages", inFlight = "in_flight", unpersisted
    }
}

public struct ControlRequest: Codable, Sendable, Equatable {
    public var op: ControlOp
    public var clear: Bool?
    public var token: UInt64?
    public var ok: Bool?
    /// profile-start: at most this many pages, for at most this many seconds.
    public var pages: UInt64?
    public var seconds: UInt64?
    /// `hydrate`: bytes per second (nil: unbounded).
    public var rate: UInt64?
    /// `profile-replay`: the runs to fill, [first page, page count] each.
    public var runs: [[UInt64]]?
    public init(op: ControlOp, clear: Bool? = nil, token: UInt64? = nil, ok: Bool? = nil,
                pages: UInt64? = nil, seconds: UInt64? = nil) {
        self.op = op
        self.clear = clear
        self.token = token
        self.ok = ok
        self.pages = pages
        self.seconds = seconds
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

/// One connection's bytes: the request line coming in, the reply going out.
/// Only non-blocking calls on its (non-blocking) socket; no ring here.
struct ControlConnection {
    /// 64Ki runs of `[20 digits,20 digits],` are 2.8 MiB.
    static let maxRequest = 4 << 20

    let fd: Int32
    private(set) var input: [UInt8] = []
    private(set) var output: [UInt8] = []
    private(set) var sent = 0

    init(fd: Int32) { self.fd = fd }

    enum Received: Equatable {
        /// Nothing complete yet: wait until readable.
        case more
        case request(ControlRequest)
        /// Malformed, too long or cut off: answer with this error.
        case bad(String)
        /// The client went away before sending anything, or the socket failed: close.
        case gone
    }

    /// Reads what has arrived, up to the end of the request line; at most
    /// `limit` bytes are held (the request's bound, or less when the channel's
    /// buffers are taken by other requests).
    mutating func receive(limit: Int = ControlConnection.maxRequest) -> Received {
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT))
            if n > 0 {
                let had = input.count
                input += buf[0..<n]
                if let end = input[had...].firstIndex(of: 10), end - input.startIndex <= ControlConnection.maxRequest {
                    return decode(input[..<end])
                }
                if input.count > ControlConnection.maxRequest { return .bad(ControlConnection.tooLong) }
                if input.count > limit { return .bad("the control socket is busy reading other large requests: try again") }
                continue
            }
            if n == 0 { return input.isEmpty ? .gone : .bad("incomplete request") }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return .more }
            return .gone
        }
    }

    private func decode(_ line: ArraySlice<UInt8>) -> Received {
        guard let req = try? JSONDecoder().decode(ControlRequest.self, from: Data(line)) else {
            return .bad("malformed request")
        }
        return .request(req)
    }

    /// Sets the reply line (a newline is added); `send` moves it out.
    mutating func setReply(_ text: String) {
        output = Array(text.utf8)
        output.append(10)
        sent = 0
        input = []
    }

    enum Sent: Equatable {
        /// The socket is full: wait until writable.
        case more
        /// All sent.
        case done
        /// The client went away (EPIPE, ECONNRESET...): close.
        case gone
    }

    /// Sends as much of the reply as the socket takes now.
    mutating func send() -> Sent {
        while sent < output.count {
            let n = output.withUnsafeBytes { p in
                Glibc.send(fd, p.baseAddress! + sent, p.count - sent, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            }
            if n > 0 { sent += n; continue }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) { return .more }
            return .gone
        }
        output = []
        sent = 0
        return .done
    }

    /// Bytes of the reply not sent yet.
    var unsent: Int { output.count - sent }

    /// Bytes of a request held (while it arrives).
    var buffered: Int { input.count }

    static let tooLong = "request too long (more than \(maxRequest >> 20) MiB)"
}

final class ControlChannel {
    static let maxConnections = 64
    /// Request bytes held at once, all connections together.
    static let maxBuffered = 4 * ControlConnection.maxRequest
    static let slotBits: UInt32 = 6
    static let generationBits: UInt32 = 20
    /// Tokens are below this (the queue carries them in its reserved event data).
    static let tokenLimit: UInt32 = 1 << (slotBits + generationBits)

    let path: String
    let listenFD: Int32

    /// What the loop does next for a connection.
    enum Next: Equatable {
        /// Arm a one-shot poll on `fd` (writability when `out`, else readability)
        /// that carries `token`; `ready(token)` when it fires.
        case poll(fd: Int32, out: Bool, token: UInt32)
        /// A request to answer: `respond(token, reply)`.
        case request(token: UInt32, ControlRequest)
        /// Nothing: the connection is closed, or the token was stale.
        case none
    }

    private struct Slot {
        var connection: ControlConnection
        var generation: UInt32
        var serial: UInt64
        var replying = false
    }
    private var slots: [Slot?] = Array(repeating: nil, count: ControlChannel.maxConnections)
    private var generation: UInt32 = 0
    private var serial: UInt64 = 0

    static func path(_ id: UInt32) -> String { "\(DeviceState.directory)/ublk\(id).sock" }

    convenience init(device id: UInt32) throws(UblkError) {
        mkdir(DeviceState.directory, 0o755)
        try self.init(path: ControlChannel.path(id))
    }

    init(path: String) throws(UblkError) {
        precondition(ControlChannel.maxConnections <= 1 << ControlChannel.slotBits)
        self.path = path
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
        for i in slots.indices where slots[i] != nil { drop(i) }
        close(listenFD)
        unlink(path)
    }

    /// Connections held now.
    var connectionCount: Int { slots.reduce(0) { $0 + ($1 == nil ? 0 : 1) } }

    /// Takes every pending connection; returns the polls to arm for their requests.
    /// Past `maxConnections`, the oldest connection is closed to make room.
    func acceptAll() -> [Next] {
        var accepted: [UInt32] = []
        while true {
            let c = cu_accept_nonblock(listenFD)
            if c < 0 { break }
            let i = slots.firstIndex(where: { $0 == nil }) ?? oldest()
            if slots[i] != nil { drop(i) }
            generation = (generation + 1) & ((1 << ControlChannel.generationBits) - 1)
            serial += 1
            slots[i] = Slot(connection: ControlConnection(fd: c), generation: generation, serial: serial)
            accepted.append(generation << ControlChannel.slotBits | UInt32(i))
        }
        // A connection accepted and closed again in this batch gets no poll.
        return accepted.compactMap { t in slot(t).map { .poll(fd: slots[$0]!.connection.fd, out: false, token: t) } }
    }

    /// A poll carrying `token` fired.
    func ready(_ token: UInt32) -> Next {
        guard let i = slot(token) else { return .none }
        if slots[i]!.replying { return sendMore(i, token) }
        let others = slots.indices.reduce(0) { $0 + ($1 == i ? 0 : (slots[$1]?.connection.buffered ?? 0)) }
        switch slots[i]!.connection.receive(limit: max(0, ControlChannel.maxBuffered - others)) {
        case .more: return .poll(fd: slots[i]!.connection.fd, out: false, token: token)
        case .request(let r): return .request(token: token, r)
        case .bad(let message): return respond(token, controlError(message))
        case .gone:
            drop(i)
            return .none
        }
    }

    /// The reply to the request `token` carried; sent now as far as the socket takes it.
    func respond(_ token: UInt32, _ text: String) -> Next {
        guard let i = slot(token) else { return .none }
        slots[i]!.connection.setReply(text)
        slots[i]!.replying = true
        return sendMore(i, token)
    }

    private func sendMore(_ i: Int, _ token: UInt32) -> Next {
        switch slots[i]!.connection.send() {
        case .more: return .poll(fd: slots[i]!.connection.fd, out: true, token: token)
        case .done, .gone:
            drop(i)
            return .none
        }
    }

    /// The live slot `token` names, or nil (stale: that connection was closed).
    private func slot(_ token: UInt32) -> Int? {
        guard token < ControlChannel.tokenLimit else { return nil }
        let i = Int(token & ((1 << ControlChannel.slotBits) - 1))
        guard i < slots.count, let s = slots[i], s.generation == token >> ControlChannel.slotBits else { return nil }
        return i
    }

    private func oldest() -> Int {
        var best = 0
        for i in slots.indices where slots[i]!.serial < slots[best]!.serial { best = i }
        return best
    }

    /// Shut down (which completes a poll still armed on it) and closed.
    private func drop(_ i: Int) {
        guard let s = slots[i] else { return }
        shutdown(s.connection.fd, Int32(SHUT_RDWR))
        close(s.connection.fd)
        slots[i] = nil
    }
}

/// The CLI side: one request, one reply line (JSON) of any size, read to the end.
public enum ControlClient {
    struct ErrorReply: Decodable { var error: String? }

    public static func send(_ request: ControlRequest, device id: UInt32, timeoutSeconds: Int = 600) throws(UblkError) -> Data {
        try send(request, path: ControlChannel.path(id), name: "ublk\(id)", timeoutSeconds: timeoutSeconds)
    }

    static func send(_ request: ControlRequest, path: String, name: String, timeoutSeconds: Int = 600) throws(UblkError) -> Data {
        var line = Array((try? JSONEncoder().encode(request)) ?? Data())
        line.append(10)
        // The server would refuse it: say so before sending megabytes.
        guard line.count - 1 <= ControlConnection.maxRequest else {
            throw UblkError("\(name): the \(request.op.rawValue) request is \(line.count - 1) bytes, \(ControlConnection.tooLong)")
        }
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
                throw UblkError("\(name) has no running server that takes commands (\(path))")
            }
            throw UblkError("cannot connect to \(path)", errno: e)
        }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var off = 0
        while off < line.count {
            // MSG_NOSIGNAL: a server gone meanwhile is an error line, not SIGPIPE.
            let n = line[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw UblkError("cannot send to \(path)", errno: .current) }
            off += n
        }
        // The reply may be megabytes (tens of thousands of extents): read to EOF.
        var reply = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { reply += buf[0..<n]; continue }
            if n < 0 && errno == EINTR { continue }
            // A reset after the whole line (the server closed with bytes of ours unread) is no failure.
            if n < 0 && !reply.contains(10) { throw UblkError("no reply from \(name)'s server", errno: .current) }
            break
        }
        guard let end = reply.firstIndex(of: 10) else { throw UblkError("\(name)'s server closed the connection without a whole reply") }
        let data = Data(reply[..<end])
        if let e = try? JSONDecoder().decode(ErrorReply.self, from: data), let message = e.error {
            throw UblkError("\(name): \(message)")
        }
        return data
    }
}
