// StatsFile: a caching device's statistics file, /run/ublk-http/ublkN.stats.json
// (what `list` and `stats` read while the server runs). The home queue owns
// it: one 4 KiB record of JSON padded with spaces, rewritten in place through
// the queue's ring (never a blocking write on the queue's thread), one write
// in flight at most, and only when the counters changed; at shutdown the
// handler saves the last one atomically (HTTPStats.saveAtomically).
import CUring
import Glibc
import PageCache

final class StatsFile {
    private let fd: Int32
    private let buffer: UnsafeMutableRawPointer
    /// A write is in flight (its completion: `written()`).
    private(set) var inFlight = false
    /// The signature of the counters last written.
    private var writtenSignature: UInt64 = .max

    /// Opens (truncates) device `device`'s file; nil when it cannot be opened (nothing is published).
    init?(device: UInt32) {
        fd = open(HTTPStats.path(device), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { return nil }
        buffer = .allocate(byteCount: 4096, alignment: 4096)
    }

    deinit {
        close(fd)
        buffer.deallocate()
    }

    /// The counters differ from what was last written.
    func changed(_ signature: UInt64) -> Bool { signature != writtenSignature }

    /// Writes `stats` (whose counters have `signature`) through `queue`'s ring, unless a write is in flight.
    func publish(_ stats: HTTPStats, signature: UInt64, queue: IOQueue, sub: UInt8) {
        guard !inFlight else { return }
        writtenSignature = signature
        let json = Array(controlJSON(stats).utf8)
        guard json.count < 4096 else { return }
        memset(buffer, 0x20, 4096)
        json.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: json.count) }
        buffer.storeBytes(of: 0x0A, toByteOffset: 4095, as: UInt8.self)
        inFlight = true
        queue.write(fd: fd, from: buffer, length: 4096, offset: 0, tag: Queue.internalTag, sub: sub)
    }

    /// The write in flight completed.
    func written() { inFlight = false }
}
