// CacheFile: the sparse local copy of the image, page for page at the image's
// own offsets.
//
// Contract:
// - Created 0600; always exactly `size` bytes long (ftruncate), so unfetched
//   pages are holes that cost nothing and read as zeros.
// - The file says nothing about which pages are valid: only the bitmap does.
//   A page's bytes are trusted only after its bit is set (see Bitmap).
// - `sync()` (fdatasync) is what makes written pages durable; callers run it
//   before persisting bits that describe those pages.
// - Errors are `FileError` values naming the call and the path.
import Glibc

public final class CacheFile {
    public let path: String
    public let size: UInt64
    public let fd: Int32

    /// Opens or creates `path` (0600) and sets its length to `size`.
    public init(path: String, size: UInt64) throws(FileError) {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { throw FileError("open", path: path, errno: errno) }
        var st = stat()
        if fstat(fd, &st) != 0 {
            let e = errno
            close(fd)
            throw FileError("fstat", path: path, errno: e)
        }
        if UInt64(st.st_size) != size {
            if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(size)) }) {
                close(fd)
                throw FileError("ftruncate", path: path, errno: e)
            }
        }
        self.path = path
        self.size = size
        self.fd = fd
    }

    deinit { close(fd) }

    /// Reads up to `count` bytes at `offset`; fewer only past the end.
    public func read(into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws(FileError) -> Int {
        switch preadFully(fd, buffer, count, offset) {
        case .success(let n): return n
        case .failure(let e): throw FileError("pread", path: path, errno: e)
        }
    }

    /// Writes all `count` bytes at `offset`.
    public func write(_ buffer: UnsafeRawPointer, count: Int, at offset: UInt64) throws(FileError) {
        if offset + UInt64(count) > size { throw FileError("pwrite", path: path, errno: EINVAL) }
        if case .failure(let e) = pwriteFully(fd, buffer, count, offset) {
            throw FileError("pwrite", path: path, errno: e)
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(FileError) {
        guard let base = bytes.baseAddress else { return }
        try write(base, count: bytes.count, at: offset)
    }

    /// fdatasync: every page written so far is durable when this returns.
    public func sync() throws(FileError) {
        if case .failure(let e) = retryingEINTR({ fdatasync(fd) }) {
            throw FileError("fdatasync", path: path, errno: e)
        }
    }

    /// Drops every byte (the file becomes one hole of `size` bytes). Used when
    /// the bitmap starts afresh; call it before the zeroed bitmap is persisted.
    public func discardAll() throws(FileError) {
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, 0) }) {
            throw FileError("ftruncate", path: path, errno: e)
        }
        if case .failure(let e) = retryingEINTR({ ftruncate(fd, off_t(size)) }) {
            throw FileError("ftruncate", path: path, errno: e)
        }
    }
}
