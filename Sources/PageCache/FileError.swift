// FileError: a failed system call on a named file, as a value. PageCache sits
// below the engine and does not import its `Errno`; `errno` here is the raw
// positive code, and `description` is one human line for the CLI.
import Glibc

public struct FileError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The call that failed ("pwrite", "fdatasync", ...).
    public var operation: String
    public var path: String
    /// Positive errno.
    public var errno: Int32

    public init(_ operation: String, path: String, errno: Int32) {
        self.operation = operation
        self.path = path
        self.errno = errno
    }

    public var description: String {
        "\(operation) \(path): \(String(cString: strerror(errno)))"
    }
}

/// A raw errno as an `Error`, for the internal `Result` cores.
struct SysErrno: Error { var code: Int32 }

extension FileError {
    init(_ operation: String, path: String, errno: SysErrno) {
        self.init(operation, path: path, errno: errno.code)
    }
}

/// Runs a syscall that returns -1 and sets errno, retrying on EINTR.
@inline(__always)
func retryingEINTR<T: BinaryInteger>(_ body: () -> T) -> Result<T, SysErrno> {
    while true {
        let r = body()
        if r >= 0 { return .success(r) }
        let e = Glibc.errno
        if e == EINTR { continue }
        return .failure(SysErrno(code: e))
    }
}

/// Writes all of `count` bytes at `offset`, looping over short writes.
func pwriteFully(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int, _ offset: UInt64) -> Result<Void, SysErrno> {
    var done = 0
    while done < count {
        switch retryingEINTR({ pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done)) }) {
        case .success(let n):
            if n == 0 { return .failure(SysErrno(code: EIO)) }
            done += n
        case .failure(let e):
            return .failure(e)
        }
    }
    return .success(())
}

/// Reads up to `count` bytes at `offset`, looping over short reads; returns
/// fewer only at end of file.
func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) -> Result<Int, SysErrno> {
    var done = 0
    while done < count {
        switch retryingEINTR({ pread(fd, buffer + done, count - done, off_t(offset) + off_t(done)) }) {
        case .success(let n):
            if n == 0 { return .success(done) }
            done += n
        case .failure(let e):
            return .failure(e)
        }
    }
    return .success(done)
}

/// fsync of the directory holding `path`, so a create or rename is durable.
func syncDirectory(of path: String) {
    var dir = path
    if let slash = dir.lastIndex(of: "/") {
        dir = slash == dir.startIndex ? "/" : String(dir[..<slash])
    } else {
        dir = "."
    }
    let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd >= 0 {
        _ = fsync(fd)
        close(fd)
    }
}
