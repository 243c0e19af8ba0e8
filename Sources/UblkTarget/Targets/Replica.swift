// Replica: copies extents of a device or cache file into a replica image
// (`ublk-http sync`). The replica is durable (its data and its directory
// entry) when `copy` returns; only then may the caller clear the dirty bits.
import CUring
import Glibc

public enum Replica {
    public static func copy(_ extents: [DirtyExtents.Extent], from path: String, direct: Bool, to: String, size: UInt64) throws(UblkError) {
        let src = open(path, O_RDONLY | O_CLOEXEC | (direct ? cu_o_direct : 0))
        if src < 0 { throw UblkError("cannot open \(path): \(Errno.current)") }
        defer { close(src) }
        let dst = open(to, O_WRONLY | O_CREAT | O_CLOEXEC, 0o600)
        if dst < 0 { throw UblkError("cannot open the replica \(to): \(Errno.current)") }
        defer { close(dst) }
        var st = stat()
        if fstat(dst, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG && UInt64(st.st_size) < size {
            if ftruncate(dst, off_t(size)) != 0 { throw UblkError("cannot grow the replica \(to): \(Errno.current)") }
        }
        let chunk = 1 << 20
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 4096, chunk) == 0, let buf = raw else { throw UblkError("out of memory") }
        defer { free(buf) }
        for e in extents {
            var off = e.offset
            let end = e.offset + e.length
            while off < end {
                // O_DIRECT wants whole logical blocks (up to 4096 bytes): the tail of
                // an odd-sized image is read as a full one (the read stops at the end).
                let want = Int(min(UInt64(chunk), end - off))
                let readLen = direct ? (want + 4095) & ~4095 : want
                let n = pread(src, buf, readLen, off_t(off))
                if n < want { throw UblkError("reading \(path) at \(off): \(n < 0 ? "\(Errno.current)" : "short read")") }
                var w = 0
                while w < want {
                    let m = pwrite(dst, buf + w, want - w, off_t(off) + off_t(w))
                    if m < 0 && errno == EINTR { continue }
                    if m <= 0 { throw UblkError("writing the replica \(to) at \(off): \(Errno.current)") }
                    w += m
                }
                off += UInt64(want)
            }
        }
        // The caller clears the dirty bits only after this returns.
        if fdatasync(dst) != 0 { throw UblkError("fdatasync of the replica \(to): \(Errno.current)") }
        // A replica file's directory entry must be as durable as its data (this
        // run or a killed one may have created it), or a power loss could leave
        // a replica missing that the cleared bits vouch for.
        if fstat(dst, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG { try syncDirectory(of: to) }
    }

    static func syncDirectory(of path: String) throws(UblkError) {
        let dir: String
        if let slash = path.lastIndex(of: "/") {
            dir = slash == path.startIndex ? "/" : String(path[..<slash])
        } else {
            dir = "."
        }
        let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd < 0 { throw UblkError("cannot open \(dir) to sync the replica's entry: \(Errno.current)") }
        defer { close(fd) }
        if fsync(fd) != 0 { throw UblkError("fsync of \(dir): \(Errno.current)") }
    }
}
