// DirectIO: how a target's data files are opened, and what that asks of the
// device. A cache file, a `cache` target's backing store and a `loop` file
// are opened with O_DIRECT wherever the file system takes it: the page cache
// stays out of the way, and io_uring reads and writes on a disk file system
// complete asynchronously instead of being punted to io-wq workers.
//
// Contract:
// - `decide` is the whole policy, a pure function (host-tested): a file in
//   memory (tmpfs, ramfs) keeps its inline/user-copy path; a file system that
//   refuses O_DIRECT, reports no direct I/O alignment, or needs more than
//   4096 bytes (or more than a cache page) gets buffered I/O, and the reason
//   is what `list` and the state file report ("cache_io", "backing_io").
// - A direct file's alignment comes from statx(STATX_DIOALIGN)
//   (dio_mem_align, dio_offset_align); where the kernel does not report it, a
//   block device's logical block size (BLKSSZGET; for a regular file, that of
//   the disk holding it, from /sys), else 4096, which every device takes.
// - The device then gets a logical block size of at least the offset
//   alignment (so every request's offset and length are aligned) and a
//   dma_align of the memory alignment (so a request's own pages, used in
//   place by zero copy, are aligned; tag buffers are page aligned anyway).
//   Every other I/O the server does on a direct fd uses page-aligned buffers
//   and aligned offsets and lengths (CachingHandler's fetch staging pads the
//   image's last page).
// - Durability is unchanged: O_DIRECT does not empty a device's write cache,
//   so fdatasync still comes before any bit that vouches for the data.
import CUring
import Glibc

/// How a target does its I/O on one file (reported as "cache_io" / "backing_io").
public enum FileIO: Equatable, CustomStringConvertible, Sendable {
    /// O_DIRECT, with the file's memory and offset alignment.
    case direct(memory: Int, offset: Int)
    /// Through the page cache, and why.
    case buffered(String)
    /// A file in memory: read and written inline on the queue thread (and mapped for user copy).
    case inline(String)

    public var description: String {
        switch self {
        case .direct: return "direct"
        case .buffered(let why): return "buffered (\(why))"
        case .inline(let why): return "inline (\(why))"
        }
    }

    public var isDirect: Bool { if case .direct = self { return true } else { return false } }
    /// The offset (and length) alignment a direct file needs; 1 otherwise.
    public var offsetAlignment: Int { if case .direct(_, let o) = self { return o } else { return 1 } }
    /// The buffer alignment a direct file needs; 1 otherwise.
    public var memoryAlignment: Int { if case .direct(let m, _) = self { return m } else { return 1 } }
}

public enum DirectIO {
    /// What statx / the fallbacks say of a file opened with O_DIRECT.
    public enum Alignment: Equatable, Sendable {
        /// dio_mem_align, dio_offset_align (statx), or the logical block size twice.
        case known(memory: Int, offset: Int)
        /// statx reports that this file takes no direct I/O (alignments 0).
        case unsupported
    }

    static let memoryFS: [Int64: String] = [0x0102_1994: "tmpfs", 0x8584_58f6: "ramfs"]

    /// The policy. `openErrno`: why opening with O_DIRECT failed (0: it did not).
    /// `padsTail`: the caller writes the image's last partial block padded (the
    /// cache file of `http`, whose trailer lies past it); otherwise a size that
    /// is not a multiple of the alignment is served buffered.
    public static func decide(fsType: Int64, openErrno: Int32, alignment: Alignment?, pageSize: Int,
                              size: UInt64, padsTail: Bool, inMemory: (String) -> FileIO = { .inline("file in memory: \($0)") }) -> FileIO {
        if let fs = memoryFS[fsType] { return inMemory(fs) }
        if openErrno == EINVAL { return .buffered("file system refused O_DIRECT") }
        if openErrno != 0 { return .buffered("O_DIRECT open failed: \(Errno(rawValue: openErrno))") }
        guard let alignment, case .known(let mem, let off) = alignment else {
            return .buffered("file system takes no direct I/O on this file")
        }
        let m = max(mem, 1), o = max(off, 512)
        guard m.nonzeroBitCount == 1, o.nonzeroBitCount == 1 else { return .buffered("odd direct I/O alignment \(m)/\(o)") }
        if o > 4096 || m > 4096 { return .buffered("direct I/O alignment \(max(m, o)) is above 4096") }
        if o > pageSize { return .buffered("page size \(pageSize) is below the direct I/O alignment \(o)") }
        if !padsTail && size % UInt64(o) != 0 { return .buffered("size \(size) is not a multiple of the direct I/O alignment \(o)") }
        return .direct(memory: m, offset: o)
    }

    /// The direct I/O alignment of `fd` (opened with O_DIRECT).
    static func alignment(fd: Int32) -> Alignment {
        var mem: UInt32 = 0, off: UInt32 = 0
        if cu_dio_align(fd, &mem, &off) == 0 {
            return off == 0 ? .unsupported : .known(memory: Int(mem), offset: Int(off))
        }
        // The kernel does not say: the logical block size of the disk.
        var st = stat()
        guard fstat(fd, &st) == 0 else { return .known(memory: 4096, offset: 4096) }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let lbs = cu_logical_block_size(fd)
            return lbs > 0 ? .known(memory: Int(lbs), offset: Int(lbs)) : .known(memory: 4096, offset: 4096)
        }
        let dev = UInt64(st.st_dev)
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
        let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
        for rel in ["queue/logical_block_size", "../queue/logical_block_size"] {
            if let v = readInt("/sys/dev/block/\(major):\(minor)/\(rel)"), v >= 512 { return .known(memory: v, offset: v) }
        }
        return .known(memory: 4096, offset: 4096)
    }

    /// Opens `path` with O_DIRECT (plus `flags`) if the policy allows. `existing`:
    /// an fd of the same file already open (its file system type is asked
    /// first; the new fd must be the same inode). Returns the direct fd (-1 when
    /// not direct) and what was decided.
    public static func open(path: String, flags: Int32, existing: Int32, pageSize: Int, size: UInt64,
                            padsTail: Bool, inMemory: (String) -> FileIO = { .inline("file in memory: \($0)") }) -> (fd: Int32, io: FileIO) {
        let fsType = cu_fs_type(existing)
        if memoryFS[fsType] != nil {
            return (-1, decide(fsType: fsType, openErrno: 0, alignment: nil, pageSize: pageSize, size: size,
                               padsTail: padsTail, inMemory: inMemory))
        }
        let fd = Glibc.open(path, flags | O_CLOEXEC | cu_o_direct)
        let err: Int32 = fd < 0 ? errno : 0
        if fd >= 0 {
            var a = stat(), b = stat()
            if fstat(fd, &a) != 0 || fstat(existing, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev {
                close(fd)
                return (-1, .buffered("the file was replaced while opening it"))
            }
        }
        let io = decide(fsType: fsType, openErrno: err, alignment: fd >= 0 ? alignment(fd: fd) : nil,
                        pageSize: pageSize, size: size, padsTail: padsTail, inMemory: inMemory)
        if !io.isDirect && fd >= 0 { close(fd); return (-1, io) }
        // Clean pages the buffered fd cached (validation reads) are dropped, so
        // nothing of the data pages stays in the page cache beside the direct
        // fd. (The kernel keeps the two coherent anyway: a direct read writes
        // back dirty cached pages of its range first, a direct write
        // invalidates them; the buffered fd touches no data page afterwards.)
        if io.isDirect { _ = posix_fadvise(existing, 0, 0, POSIX_FADV_DONTNEED) }
        return (fd, io)
    }

    /// The device's logical block shift for files with these alignments (512 at least).
    public static func logicalBlockShift(_ ios: [FileIO]) -> UInt8 {
        // The memory alignment too: in user-copy mode a write-through reaches a
        // direct backing store from the mapped cache file at the request's offset.
        let a = ios.map { max($0.offsetAlignment, $0.memoryAlignment) }.reduce(512, max)
        return UInt8(a.trailingZeroBitCount)
    }

    /// The device's dma alignment for files with these alignments (0: none needed).
    public static func dmaAlignment(_ ios: [FileIO]) -> UInt32 {
        let a = ios.map(\.memoryAlignment).reduce(1, max)
        return a > 1 ? UInt32(a) : 0
    }

    private static func readInt(_ path: String) -> Int? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, 32) }
        guard n > 0 else { return nil }
        return Int(String(decoding: buf[0..<n], as: UTF8.self).filter(\.isNumber))
    }
}
