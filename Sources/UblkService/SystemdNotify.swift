// sd_notify(3) without libsystemd: one datagram to the AF_UNIX socket named
// by $NOTIFY_SOCKET (a path, or '@' for the abstract namespace). A unit of
// Type=notify learns that the device is live (READY=1) and that it stops
// (STOPPING=1). Without $NOTIFY_SOCKET (not started by systemd) nothing is sent.
import Glibc

public enum SystemdNotify {
    /// Sends `state` ("READY=1\nSTATUS=..."); false when there is no socket or
    /// the send failed (systemd then times the unit out, which says enough).
    @discardableResult
    public static func send(_ state: String, socketPath: String? = nil) -> Bool {
        guard let path = socketPath ?? getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), path.count > 1,
              path.hasPrefix("/") || path.hasPrefix("@") else { return false }
        var bytes = Array(path.utf8)
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }  // abstract namespace
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        let sent = state.withCString { text in
            withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, text, strlen(text), Int32(MSG_NOSIGNAL), $0, length)
                }
            }
        }
        return sent == state.utf8.count
    }
}
