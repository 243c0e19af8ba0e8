// loop: a file or block device exposed as a ublk device, as the kernel's loop
// driver does. O_DIRECT by default (the page cache stays out of the way, as
// with `losetup --direct-io`); `buffered` opens it normally.
//
// FLUSH → fdatasync; FUA → the write carries RWF_DSYNC; DISCARD → punch a
// hole; WRITE_ZEROES → zero the range (punch unless NOUNMAP), falling back to
// writing zeros where the file system cannot. Short reads and writes are
// continued until done; a read past the end of the file reads zeros.
//
// A file in memory (tmpfs, ramfs) is read and written inline on the queue
// thread: io_uring cannot do those without punting each one to an io-wq
// worker thread, which costs more than the copy itself (the benchmark showed
// io-wq taking half the server's CPU). Such I/O never waits for a device.
// Those devices also use UBLK_F_USER_COPY with the file mapped (MAP_SHARED):
// a READ is one pwrite from the mapping into /dev/ublkcN and a WRITE one pread
// from it into the mapping, so data is copied once (page cache <-> request),
// not twice through a tag buffer. (splice would avoid the mapping, but the
// ublk char device has no splice_write.) Truncating the file under a live
// device is not supported in this mode.
//
// WHICH PATH A REQUEST TAKES (DataPath.swift; one per device, `list` shows it):
//   READ / WRITE, file on disk    auto-zero-copy / zero-copy: READ_FIXED / WRITE_FIXED
//                                 between the file and the request's registered pages;
//                                 user-copy: READ / WRITE of the tag's buffer, plus a
//                                 pwrite / pread of it on /dev/ublkcN; kernel-copy: READ /
//                                 WRITE of the tag's buffer (the driver copies).
//   READ / WRITE, file in memory  zero copy where the driver has it, through io_uring as
//                                 for a file on disk (measured faster, see `dataPaths`);
//                                 else inline-user-copy: one copy mapping <-> request,
//                                 inline; kernel-copy: pread / pwrite of the tag's buffer,
//                                 inline; a forced user-copy goes through io_uring.
//   FLUSH, DISCARD, WRITE_ZEROES  no request data: fdatasync / fallocate, through io_uring
//                                 (inline for a file in memory); WRITE_ZEROES where the
//                                 file system cannot punch writes zeros from the tag's buffer.
import CUring
import Glibc

public final class LoopTarget: Target {
    public let name = "loop"
    public let params: DeviceParams
    public let path: String
    public let direct: Bool
    /// The file lives in memory: copy inline instead of going through io_uring.
    public let inMemory: Bool
    let fd: Int32

    public var options: [String: String] {
        ["file": path, "direct_io": direct ? "true" : "false", "inline_io": inMemory ? "true" : "false",
         "logical_block_size": String(1 << params.logicalBlockShift)]
    }

    public init(path: String, buffered: Bool = false, readOnly: Bool = false) throws(UblkError) {
        self.path = path
        var st = stat()
        if stat(path, &st) != 0 {
            throw UblkError("cannot use \(path) as a backing file", errno: .current)
        }
        let isBlock = (st.st_mode & S_IFMT) == S_IFBLK
        guard isBlock || (st.st_mode & S_IFMT) == S_IFREG else {
            throw UblkError("\(path) is neither a regular file nor a block device")
        }
        let access = readOnly ? O_RDONLY : O_RDWR
        var fd = open(path, access | O_CLOEXEC | (buffered ? 0 : cu_o_direct))
        if fd < 0 && errno == EINVAL && !buffered {
            throw UblkError("\(path) does not support direct I/O (O_DIRECT); use --buffered")
        }
        if fd < 0 { throw UblkError("cannot open \(path)", errno: .current) }
        var size = UInt64(st.st_size)
        if isBlock {
            var s: UInt64 = 0
            let r = cu_blkgetsize64(fd, &s)
            if r < 0 {
                close(fd)
                throw UblkError("cannot get the size of \(path)", errno: Errno(returned: r))
            }
            size = s
        }
        self.direct = !buffered
        let memoryFS: [Int64] = [0x0102_1994 /* tmpfs */, 0x8584_58f6 /* ramfs */]
        inMemory = !isBlock && memoryFS.contains(cu_fs_type(fd))
        // Direct I/O: requests aligned as the file needs them (statx
        // STATX_DIOALIGN, else the disk's logical block size): the logical
        // block covers the offset alignment, dma_align the buffers'. The
        // device is the file rounded down to whole blocks (as before, to 512).
        var io = FileIO.buffered("--buffered")
        if direct && !inMemory {
            io = DirectIO.decide(fsType: 0, openErrno: 0, alignment: DirectIO.alignment(fd: fd), pageSize: 4096,
                                 size: size, padsTail: true)
        }
        let shift = DirectIO.logicalBlockShift([io])
        size &= ~((UInt64(1) << shift) - 1)
        if size == 0 {
            close(fd)
            fd = -1
            throw UblkError("\(path) is empty (a loop device needs at least 512 bytes)")
        }
        self.fd = fd
        var p = DeviceParams(size: size)
        p.logicalBlockShift = shift
        p.dmaAlignment = DirectIO.dmaAlignment([io])
        p.readOnly = readOnly
        p.writeCache = true
        p.discard = !readOnly
        // In memory: zero copy where the driver has it, else the inline copy through a
        // mapping. Measured on 7.3 (bench/datapath.sh 6 2: tmpfs, TCG, two reps in one
        // boot): READ_FIXED / WRITE_FIXED through io_uring beat the inline copy, 1 MiB
        // reads QD8 1.5-2.7x, 4k random reads QD32 1.4-2.3x, 1 MiB writes QD8 1.1-4.6x:
        // the copy on the queue thread costs more than io_uring's handling of tmpfs. Without zero copy (6.12) the inline copy stays the fastest (the
        // benchmarks of bench/README.md).
        p.dataPaths = inMemory ? [.autoZeroCopy, .zeroCopy, .inlineUserCopy, .userCopy, .kernelCopy]
                               : [.autoZeroCopy, .zeroCopy, .userCopy, .kernelCopy]
        params = p
    }

    deinit { if fd >= 0 { close(fd) } }

    public func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler {
        // Inline for a file in memory, unless a forced path needs io_uring for request data.
        let path = queue.dataPath
        let h = Handler(fd: fd, depth: queue.depth, inline: inMemory && (path == .inlineUserCopy || path == .kernelCopy))
        if inMemory && path == .inlineUserCopy {
            let prot = params.readOnly ? PROT_READ : PROT_READ | PROT_WRITE
            guard let m = mmap(nil, Int(params.size), prot, MAP_SHARED, fd, 0), m != MAP_FAILED else {
                throw UblkError("cannot map \(path)", errno: .current)
            }
            h.mapping = m
            h.mappingSize = Int(params.size)
            h.queue = queue
        }
        return h
    }

    final class Handler: QueueHandler {
        let fd: Int32
        let inline: Bool
        /// User-copy mode: the file mapped, and the queue (for the char device).
        var mapping: UnsafeMutableRawPointer?
        var mappingSize = 0
        unowned(unsafe) var queue: IOQueue?
        /// The request each tag is working on, and how many bytes of it are done.
        var requests: [Request?]
        var done: [UInt32]

        // Sub-operations, carried in user_data.
        static let subRead: UInt8 = 0, subWrite: UInt8 = 1, subSync: UInt8 = 2
        static let subFallocate: UInt8 = 3, subZeroWrite: UInt8 = 4

        init(fd: Int32, depth: Int, inline: Bool) {
            self.fd = fd
            self.inline = inline
            requests = Array(repeating: nil, count: depth)
            done = Array(repeating: 0, count: depth)
        }

        func handle(_ r: Request, queue: IOQueue) {
            if inline { return queue.complete(tag: r.tag, result: handleInline(r)) }
            let t = Int(r.tag)
            requests[t] = r
            done[t] = 0
            switch r.op {
            case Op.read:
                queue.readIntoRequest(r, at: 0, length: r.length, fd: fd, offset: r.offset, tag: r.tag, sub: Handler.subRead, data: 0)
            case Op.write:
                queue.writeFromRequest(r, at: 0, length: r.length, fd: fd, offset: r.offset,
                                       flags: r.fua ? cu_rwf_dsync : 0, tag: r.tag, sub: Handler.subWrite, data: 0)
            case Op.flush:
                queue.fsync(fd: fd, tag: r.tag, sub: Handler.subSync)
            case Op.discard:
                queue.fallocate(fd: fd, mode: cu_falloc_punch, offset: r.offset, length: UInt64(r.length),
                                tag: r.tag, sub: Handler.subFallocate)
            case Op.writeZeroes:
                queue.fallocate(fd: fd, mode: r.noUnmap ? cu_falloc_zero : cu_falloc_punch, offset: r.offset,
                                length: UInt64(r.length), tag: r.tag, sub: Handler.subFallocate)
            default:
                finish(r.tag, -EOPNOTSUPP, queue)
            }
        }

        deinit {
            if let m = mapping { munmap(m, mappingSize) }
        }

        /// User copy through the mapping: one copy between the file's pages and the request.
        func copyMapped(_ r: Request, queue: IOQueue, mapping: UnsafeMutableRawPointer) -> Int32 {
            let len = Int(r.length)
            guard Int(r.offset) + len <= mappingSize else { return -EIO }
            let e = queue.copyRequest(r, at: 0, mapping + Int(r.offset), length: len, toRequest: r.op == Op.read)
            return e < 0 ? e : Int32(len)
        }

        /// The same semantics, done with plain syscalls (memory-backed files only).
        func handleInline(_ r: Request) -> Int32 {
            if let q = queue, let m = mapping, r.op == Op.read || r.op == Op.write {
                return copyMapped(r, queue: q, mapping: m)
            }
            func transfer(_ write: Bool) -> Int32 {
                var done = 0
                let len = Int(r.length)
                while done < len {
                    let n = write
                        ? cu_pwrite_flags(fd, r.buffer + done, len - done, Int64(r.offset) + Int64(done), r.fua ? cu_rwf_dsync : 0)
                        : pread(fd, r.buffer + done, len - done, off_t(r.offset) + off_t(done))
                    if n < 0 {
                        if errno == EINTR { continue }
                        return -errno
                    }
                    if n == 0 {
                        if write { return -EIO }
                        memset(r.buffer + done, 0, len - done)
                        break
                    }
                    done += n
                }
                return Int32(len)
            }
            switch r.op {
            case Op.read: return transfer(false)
            case Op.write: return transfer(true)
            case Op.flush: return fdatasync(fd) == 0 ? 0 : -errno
            case Op.discard, Op.writeZeroes:
                let mode = r.op == Op.writeZeroes && r.noUnmap ? cu_falloc_zero : cu_falloc_punch
                if cu_fallocate(fd, mode, Int64(r.offset), Int64(r.length)) == 0 { return 0 }
                if r.op == Op.discard { return 0 }
                memset(r.buffer, 0, Int(r.length))
                return transfer(true) < 0 ? -EIO : 0
            default:
                return -EOPNOTSUPP
            }
        }

        @inline(__always)
        func finish(_ tag: UInt16, _ result: Int32, _ queue: IOQueue) {
            requests[Int(tag)] = nil
            queue.complete(tag: tag, result: result)
        }

        func ioCompleted(tag: UInt16, sub: UInt8, data: UInt32, result: Int32, queue: IOQueue) {
            let t = Int(tag)
            guard let r = requests[t] else { return }
            switch sub {
            case Handler.subRead:
                // End of file: the rest of the device reads as zeros.
                if let final = queue.readProgress(r, result, done: &done[t]) { return finish(tag, final, queue) }
                queue.readIntoRequest(r, at: done[t], length: r.length - done[t], fd: fd,
                                      offset: r.offset + UInt64(done[t]), tag: tag, sub: sub, data: 0)
            case Handler.subWrite, Handler.subZeroWrite:
                if result < 0 { return finish(tag, result, queue) }
                if result == 0 { return finish(tag, -EIO, queue) }
                done[t] += UInt32(result)
                if done[t] >= r.length { return finish(tag, sub == Handler.subWrite ? Int32(r.length) : 0, queue) }
                if sub == Handler.subWrite {
                    queue.writeFromRequest(r, at: done[t], length: r.length - done[t], fd: fd, offset: r.offset + UInt64(done[t]),
                                           flags: r.fua ? cu_rwf_dsync : 0, tag: tag, sub: sub, data: 0)
                } else {
                    // Zeros from the tag's buffer (no request data).
                    queue.write(fd: fd, from: r.buffer + Int(done[t]), length: r.length - done[t],
                                offset: r.offset + UInt64(done[t]), flags: r.fua ? cu_rwf_dsync : 0, tag: tag, sub: sub)
                }
            case Handler.subFallocate:
                if result == -EOPNOTSUPP || result == -EINVAL {
                    if r.op == Op.discard { return finish(tag, 0, queue) }  // advisory
                    // WRITE_ZEROES where the file system cannot: write zeros from the tag's buffer.
                    memset(r.buffer, 0, Int(r.length))
                    return queue.write(fd: fd, from: r.buffer, length: r.length, offset: r.offset,
                                       flags: r.fua ? cu_rwf_dsync : 0, tag: tag, sub: Handler.subZeroWrite)
                }
                finish(tag, result < 0 ? result : 0, queue)
            default:
                finish(tag, result < 0 ? result : 0, queue)
            }
        }
    }
}
