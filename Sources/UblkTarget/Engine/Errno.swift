// Errno: a named system error, as swift-system's `Errno`. Engine calls return
// `Result<T, Errno>` internally and throw `Errno` publicly; only the CLI turns
// errors into a human line.
import Glibc

public struct Errno: Error, RawRepresentable, Hashable, CustomStringConvertible, Sendable {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    /// From a kernel-style negative return (`-EINVAL`) or a positive errno.
    public init(returned value: Int32) { self.rawValue = value < 0 ? -value : value }
    /// The calling thread's current `errno`.
    public static var current: Errno { Errno(rawValue: errno) }

    public var description: String { String(cString: strerror(rawValue)) }

    public static let notPermitted = Errno(rawValue: EPERM)
    public static let noEntry = Errno(rawValue: ENOENT)
    public static let interrupted = Errno(rawValue: EINTR)
    public static let io = Errno(rawValue: EIO)
    public static let busy = Errno(rawValue: EBUSY)
    public static let exists = Errno(rawValue: EEXIST)
    public static let noDevice = Errno(rawValue: ENODEV)
    public static let invalid = Errno(rawValue: EINVAL)
    public static let accessDenied = Errno(rawValue: EACCES)
    public static let notSupported = Errno(rawValue: EOPNOTSUPP)
    public static let timedOut = Errno(rawValue: ETIME)
}

/// Runs a syscall that returns -1 and sets errno, retrying on EINTR.
@inline(__always)
func syscallRetrying<T: BinaryInteger>(_ body: () -> T) -> Result<T, Errno> {
    while true {
        let r = body()
        if r >= 0 { return .success(r) }
        if errno == EINTR { continue }
        return .failure(.current)
    }
}

/// An error with the context a person needs: what was being done, to what.
public struct UblkError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public var errno: Errno?
    public init(_ message: String, errno: Errno? = nil) {
        self.message = message
        self.errno = errno
    }
    public var description: String {
        if let e = errno { return "\(message): \(e)" }
        return message
    }
}
