// FakeQueue: an IOQueue for host tests. Target I/O is queued and completed
// one at a time in an order the test chooses (a seeded random one), on real
// files, through `FaultFiles`, which knows what a power loss would keep.
import CUring
import Glibc
import PageCache
@testable import UblkTarget

/// Real files plus a model of their durability: what a power loss keeps of
/// each is its content at its last successful fdatasync. An fdatasync can be
/// made to fail (EIO) the way Linux fails it: the pages changed since the
/// last good one may be lost, and a later fdatasync that succeeds does not
/// bring them back unless they are written again. Writes can fail (ENOSPC).
final class FaultFiles {
    static let page = 4096
    struct File {
        let path: String
        /// What the page cache holds (every write goes through this layer).
        var current: [UInt8]
        var durable: [UInt8]
        /// Pages lost by a failed fdatasync and not written since.
        var lost: Set<Int> = []
    }
    var files: [Int32: File] = [:]
    var fsyncFailures = 0
    var writeFailures = 0

    static func contents(_ path: String) -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        var got = 0
        while got < out.count {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + got, $0.count - got, off_t(got)) }
            if n <= 0 { break }
            got += n
        }
        return out
    }

    /// Files of a process that died: the page cache keeps them as they are, durable or not.
    var orphans: [String: File] = [:]

    /// `fd` (of `path`) as it is now counts as durable: a file just opened or
    /// created. A file the dead process had open keeps what was durable then.
    func track(_ fd: Int32, path: String) {
        let now = FaultFiles.contents(path)
        if var f = orphans.removeValue(forKey: path) {
            f.current = now
            files[fd] = f
        } else {
            files[fd] = File(path: path, current: now, durable: now)
        }
    }

    /// The server process died (kill -9): nothing is lost, the files stay as they are.
    func processDied() {
        for f in files.values { orphans[f.path] = f }
        files = [:]
    }

    /// `length` bytes at `offset` were written (from `bytes`; nil: punched to zeros).
    func wrote(_ fd: Int32, offset: UInt64, length: Int, bytes: UnsafeRawPointer?) {
        guard length > 0, var f = files[fd] else { return }
        files[fd] = nil  // no copy on write of the arrays below
        let o = Int(offset)
        if let bytes {
            if f.current.count < o + length { f.current += [UInt8](repeating: 0, count: o + length - f.current.count) }
            f.current.withUnsafeMutableBytes { _ = memcpy($0.baseAddress! + o, bytes, length) }
        } else if o < f.current.count {
            let e = min(o + length, f.current.count)
            f.current.withUnsafeMutableBytes { _ = memset($0.baseAddress! + o, 0, e - o) }
        }
        if !f.lost.isEmpty {
            for p in o / FaultFiles.page...(o + length - 1) / FaultFiles.page { f.lost.remove(p) }
        }
        files[fd] = f
    }

    func fdatasync(_ fd: Int32, fail: Bool) -> Int32 {
        guard var f = files[fd] else { return Glibc.fdatasync(fd) == 0 ? 0 : -errno }
        files[fd] = nil
        defer { files[fd] = f }
        let now = f.current
        if fail {
            fsyncFailures += 1
            let n = max(now.count, f.durable.count)
            for p in 0..<(n + FaultFiles.page - 1) / FaultFiles.page {
                let r = p * FaultFiles.page..<min((p + 1) * FaultFiles.page, n)
                let a = r.clamped(to: 0..<now.count), b = r.clamped(to: 0..<f.durable.count)
                if now[a] != f.durable[b] { f.lost.insert(p) }
            }
            return -EIO
        }
        var next = now
        for p in f.lost {
            let r = (p * FaultFiles.page..<min((p + 1) * FaultFiles.page, next.count)).clamped(to: 0..<f.durable.count)
            if !r.isEmpty { next.replaceSubrange(r, with: f.durable[r]) }
        }
        f.durable = next
        f.lost = []
        return 0
    }

    /// Power loss: every file goes back to what its last good fdatasync kept.
    func powerLoss() {
        for f in Array(files.values) + Array(orphans.values) {
            let fd = open(f.path, O_WRONLY | O_TRUNC)
            precondition(fd >= 0)
            var w = 0
            while w < f.durable.count {
                let n = f.durable.withUnsafeBytes { pwrite(fd, $0.baseAddress! + w, $0.count - w, off_t(w)) }
                precondition(n > 0)
                w += n
            }
            close(fd)
        }
        files = [:]
        orphans = [:]
    }
}

final class FakeQueue: IOQueue {
    let id: UInt16
    let depth: Int
    let deviceID: UInt32 = 0
    let charFD: Int32 = -1
    let userCopy = false
    func userCopyOffset(_ tag: UInt16) -> Int64 { 0 }
    func copyRequest(_ r: Request, at: UInt32, _ buf: UnsafeMutableRawPointer, length: Int, toRequest: Bool) -> Int32 {
        if toRequest { memcpy(r.buffer + Int(at), buf, length) } else { memcpy(buf, r.buffer + Int(at), length) }
        return 0
    }
    /// Request data lives in the request's plain buffer (the tag's buffer of kernel copy).
    let dataPath = DataPath.kernelCopy

    enum Op {
        case read(Int32, UnsafeMutableRawPointer, UInt32, UInt64)
        case write(Int32, UnsafeRawPointer, UInt32, UInt64)
        case fsync(Int32)
        case fallocate(Int32, Int32, UInt64, UInt64)
    }
    struct Pending {
        let op: Op
        let tag: UInt16, sub: UInt8, data: UInt32
    }
    var pending: [Pending] = []
    /// Completions in the order they happened, not yet looked at by the test.
    var completed: [(tag: UInt16, result: Int32)] = []
    var open: Set<UInt16> = []
    var lastResults: [UInt16: Int32] = [:]
    var doubleCompletions: [UInt16] = []
    let files: FaultFiles
    weak var handler: QueueHandler?
    /// What owns the handler as a real Queue does (strongly), for tests of what keeps a queue alive.
    var owned: AnyObject?
    /// Fault rates, in 1/1000: fdatasync fails; a cache file write fails with ENOSPC.
    var fsyncFailPermille = 0
    var writeFailPermille = 0
    /// The cache file (the only one whose writes fail).
    var cacheFD: Int32 = -1
    /// The direct I/O rule (DirectIOTests): every read and write on
    /// `alignedFD` (-1: any fd) must have its offset, length and buffer aligned
    /// to this; what breaks it is listed in `misaligned`.
    var requireAlignment = 0
    var alignedFD: Int32 = -1
    var misaligned: [String] = []

    func checkAligned(_ what: String, _ fd: Int32, _ buf: UnsafeRawPointer, _ length: Int, _ offset: UInt64) {
        let a = requireAlignment
        guard a > 1, alignedFD < 0 || fd == alignedFD else { return }
        if Int(bitPattern: buf) % a != 0 || length % a != 0 || offset % UInt64(a) != 0 {
            misaligned.append("\(what) \(length) bytes at \(offset) from \(buf)")
        }
    }

    init(depth: Int, files: FaultFiles, id: UInt16 = 0) {
        self.depth = depth
        self.files = files
        self.id = id
    }

    /// Polls armed on fds the test lets fire (the inboxes of a device's
    /// queues, -q N): they fire, in `runOne`'s random order, once readable.
    var fireable: Set<Int32> = []
    var armed: [(fd: Int32, data: UInt32)] = []
    /// Whether an fd is readable, without a syscall (nil: poll(2) it).
    var isReadable: ((Int32) -> Bool)?

    /// Indices into `armed` of the polls whose fd is readable now.
    func readyPolls() -> [Int] {
        armed.indices.filter { i in
            if let r = isReadable { return r(armed[i].fd) }
            var p = pollfd(fd: armed[i].fd, events: Int16(POLLIN), revents: 0)
            return Glibc.poll(&p, 1, 0) == 1
        }
    }

    func complete(tag: UInt16, result: Int32) {
        if open.remove(tag) == nil { doubleCompletions.append(tag) }
        completed.append((tag, result))
        lastResults[tag] = result
    }

    func read(fd: Int32, into buf: UnsafeMutableRawPointer, length: UInt32, offset: UInt64, tag: UInt16, sub: UInt8, data: UInt32) {
        checkAligned("read", fd, buf, Int(length), offset)
        pending.append(Pending(op: .read(fd, buf, length, offset), tag: tag, sub: sub, data: data))
    }
    func write(fd: Int32, from buf: UnsafeRawPointer, length: UInt32, offset: UInt64, flags: Int32, tag: UInt16, sub: UInt8, data: UInt32) {
        checkAligned("write", fd, buf, Int(length), offset)
        pending.append(Pending(op: .write(fd, buf, length, offset), tag: tag, sub: sub, data: data))
    }
    func readIntoRequest(_ r: Request, at: UInt32, length: UInt32, fd: Int32, offset: UInt64,
                         tag: UInt16, sub: UInt8, data: UInt32) {
        read(fd: fd, into: r.buffer + Int(at), length: length, offset: offset, tag: tag, sub: sub, data: data)
    }
    func writeFromRequest(_ r: Request, at: UInt32, length: UInt32, fd: Int32, offset: UInt64, flags: Int32,
                          tag: UInt16, sub: UInt8, data: UInt32) {
        write(fd: fd, from: r.buffer + Int(at), length: length, offset: offset, flags: flags, tag: tag, sub: sub, data: data)
    }
    func zeroFill(_ r: Request, at: UInt32, length: UInt32) -> Int32 {
        memset(r.buffer + Int(at), 0, Int(length))
        return 0
    }
    func fsync(fd: Int32, dataOnly: Bool, tag: UInt16, sub: UInt8, data: UInt32) {
        pending.append(Pending(op: .fsync(fd), tag: tag, sub: sub, data: data))
    }
    func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, tag: UInt16, sub: UInt8, data: UInt32) {
        pending.append(Pending(op: .fallocate(fd, mode, offset, length), tag: tag, sub: sub, data: data))
    }
    func poll(fd: Int32, data: UInt32) {
        if fireable.contains(fd) { armed.append((fd, data)) }
    }

    func writeNow(fd: Int32, from buf: UnsafeRawPointer, length: Int, offset: UInt64) -> Int32 {
        checkAligned("writeNow", fd, buf, length, offset)
        if fd == cacheFD && roll(writeFailPermille) { files.writeFailures += 1; return -ENOSPC }
        let n = pwrite(fd, buf, length, off_t(offset))
        if n != length { return -EIO }
        files.wrote(fd, offset: offset, length: length, bytes: buf)
        return 0
    }

    var rng = SplitMix(seed: 0)
    func roll(_ permille: Int) -> Bool { permille > 0 && Int(rng.next() % 1000) < permille }

    /// Completes one pending I/O or fires one ready poll, chosen at random; false when there is none.
    @discardableResult
    func runOne() -> Bool {
        let ready = armed.isEmpty ? [] : readyPolls()
        guard !pending.isEmpty || !ready.isEmpty else { return false }
        let i = Int(rng.next() % UInt64(pending.count + ready.count))
        if i >= pending.count {
            let a = armed.remove(at: ready[i - pending.count])
            handler?.eventFired(data: a.data, result: Int32(POLLIN), queue: self)
            return true
        }
        let p = pending.remove(at: i)
        let result = perform(p)
        handler?.ioCompleted(tag: p.tag, sub: p.sub, data: p.data, result: result, queue: self)
        return true
    }

    /// The server died: the kernel still carries out what was submitted, in any order, or some of it.
    func processDied() {
        while !pending.isEmpty {
            let p = pending.remove(at: Int(rng.next() % UInt64(pending.count)))
            if rng.next() % 2 == 0 { _ = perform(p) }
        }
        armed = []
        handler = nil
    }

    func perform(_ p: Pending) -> Int32 {
        let result: Int32
        switch p.op {
        case .read(let fd, let buf, let len, let off):
            let n = pread(fd, buf, Int(len), off_t(off))
            result = n < 0 ? -errno : Int32(n)
        case .write(let fd, let buf, let len, let off):
            if fd == cacheFD && roll(writeFailPermille) {
                files.writeFailures += 1
                result = -ENOSPC
            } else {
                let n = pwrite(fd, buf, Int(len), off_t(off))
                result = n < 0 ? -errno : Int32(n)
                if n > 0 { files.wrote(fd, offset: off, length: n, bytes: buf) }
            }
        case .fsync(let fd):
            result = files.fdatasync(fd, fail: fd == cacheFD && roll(fsyncFailPermille))
        case .fallocate(let fd, let mode, let off, let len):
            let r = cu_fallocate(fd, mode, Int64(off), Int64(len))
            result = r < 0 ? r : 0
            if r >= 0 { files.wrote(fd, offset: off, length: Int(len), bytes: nil) }
        }
        return result
    }
}

/// A small, fast, seeded generator (SplitMix64): the same seed replays the same run.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A fetcher that hands a fixed remote image to the handler in chunks of
/// random size, or fails a run, when the test says so.
final class FakeFetcher: RunFetcher {
    var remote: [UInt8]
    var active: [(run: FetchRun, done: Int)] = []
    var failPermille = 0
    var failures = 0

    init(remote: [UInt8]) { self.remote = remote }

    func start(_ run: FetchRun, handler: CachingHandler, queue: IOQueue) { active.append((run, 0)) }
    func resume(_ run: FetchRun, from: UInt64, handler: CachingHandler, queue: IOQueue) {
        active.append((run, Int(from - run.offset)))
    }
    var isIdle: Bool { active.isEmpty }
    var pollFD: Int32? { nil }
    func perform() {}
    func ioCompleted(data: UInt32, result: Int32, handler: CachingHandler, queue: IOQueue) {}
    func cancelAll(handler: CachingHandler, queue: IOQueue) {
        let runs = active
        active = []
        for a in runs { handler.runEnded(a.run, error: "cancelled", queue: queue) }
    }

    /// Moves one active run along; false when none is active.
    @discardableResult
    func step(_ rng: inout SplitMix, handler: CachingHandler, queue: IOQueue) -> Bool {
        guard !active.isEmpty else { return false }
        let i = Int(rng.next() % UInt64(active.count))
        var a = active[i]
        if failPermille > 0 && Int(rng.next() % 1000) < failPermille {
            active.remove(at: i)
            failures += 1
            handler.runEnded(a.run, error: "injected failure", queue: queue)
            return true
        }
        let left = a.run.length - a.done
        let n = 1 + Int(rng.next() % UInt64(left))
        let off = Int(a.run.offset) + a.done
        let ok = remote.withUnsafeBytes {
            handler.received(a.run, offset: UInt64(off), bytes: UnsafeRawBufferPointer(rebasing: $0[off..<off + n]), queue: queue)
        }
        a.done += n
        if !ok || a.done == a.run.length {
            active.remove(at: i)
            handler.runEnded(a.run, error: ok ? nil : "cache write failed", queue: queue)
        } else {
            active[i] = a
        }
        return true
    }
}
