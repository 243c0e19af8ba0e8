// CachingMesh: what the queues of one caching device (`-q N`, N > 1) share,
// and how they hand work to each other. CachingHandler.swift's header says
// how requests flow; this file holds the means:
//
// - Inboxes: one per queue, a briefly locked list of messages plus a
//   non-blocking eventfd the owning queue polls on its own ring. A queue
//   collects what it sends during a batch of completions and posts it in
//   `idle` (one lock, one eventfd write per destination and batch). Never
//   on the hit path.
// - The grace gate (SRCU-like), which makes a page's punch wait for every
//   cache-file read another queue may have started on it while its bit was
//   still set:
//     reader (queue q, before testing bits for a hit):
//       x = epoch; active[q][x & 1] += 1; if epoch != x { undo; retry }
//       test the bits; on a hit read the cache file, then active[q][x & 1] -= 1
//     home (after clearing bits, before punching those pages):
//       flip: epoch += 1 (only when no earlier flip is still waiting), then
//       wait until active[q][old & 1] == 0 for every q (polled, never blocked on).
//   Proof sketch. All gate operations are sequentially consistent, and the
//   home's bit clears come before its flip in program order (a plain store,
//   then a seq_cst store: no reordering past it). A reader registered
//   "during epoch x" (both epoch loads returned x, so no flip came between
//   them and its increment). If the flip x → x+1 comes after its increment,
//   the home's check of active[·][x & 1] sees it and waits for its read to
//   end. If the flip comes before its first load, the reader's bit test
//   comes after the clear and the page is no hit. Flips never overlap, so a
//   reader of epoch x is always in the counter the next flip waits for.
//   Hence: when a grace period ends, no read started on a page whose bit was
//   cleared before the flip is still running, and none can start (its bit
//   reads clear). Eviction then punches as before.
// - Bits set: the home sets a present bit only after the page's data is in
//   the cache file (a pwrite that returned, or an io_uring write whose
//   completion it reaped: a system call lies between the data and the plain
//   store of the bit, and the store cannot move above it), so a queue that
//   loads the bit set reads the data.
// - Per-queue hit counters (each written by its queue only, read by `stats`).
import CUring
import Glibc
import PageCache

/// What one queue asks of another.
enum MeshMessage {
    // To the home queue (0):
    /// A request the sending queue cannot serve by itself (a read miss, a
    /// write, discard, write-zeroes or FLUSH); `tag` is the sender's own.
    case request(Request, queue: UInt16)
    /// The sender moved a write's data (cache file, and backing store in
    /// write-through): the home's `slot`, 0 or the first -errno.
    case written(slot: UInt16, result: Int32)
    /// A reader of an old epoch ended: the home may check its grace period.
    case graceDrained
    /// A hit the sender served that continues its previous read: the home's
    /// planner grows and refills that queue's readahead window with it.
    case hint(offset: UInt64, length: UInt32, queue: UInt16)
    /// A hit the sender served while a boot profile records (`recordingProfile`): the home records its pages.
    case touched(offset: UInt64, length: UInt32)
    /// The sender's hit count changed (at most once a second): the home wakes to publish statistics.
    case hitsChanged
    /// The read the home handed over with `read` is done (the home kept its pages from eviction till now).
    case readDone(slot: UInt16)
    // To another queue, from the home queue:
    /// Every page of the tag's read is present and kept so (not evicted)
    /// until `readDone`: read it from the cache file, complete.
    case read(tag: UInt16)
    /// Read the tag's request through: present runs (kept until `readDone`,
    /// as for `read`) from the cache file, the rest from the backing store;
    /// complete. A miss the home did not admit (AdmissionFilter).
    case readThrough(tag: UInt16)
    /// The write's intent bits are durable: move its data, answer `written`.
    case write(tag: UInt16)
    /// Complete the tag's request with this result.
    case complete(tag: UInt16, result: Int32)
}

/// One queue's inbox: messages under a short lock, and an eventfd to poll.
final class MeshInbox {
    let fd: Int32
    private let lock: UnsafeMutablePointer<pthread_mutex_t>
    private var messages: [MeshMessage] = []

    init() {
        fd = cu_eventfd(0, cu_efd_cloexec | cu_efd_nonblock)
        lock = .allocate(capacity: 1)
        pthread_mutex_init(lock, nil)
    }

    deinit {
        pthread_mutex_destroy(lock)
        lock.deallocate()
        if fd >= 0 { close(fd) }
    }

    /// Appends `batch` and wakes the owner (from any thread; never blocks but for the short lock).
    func post(_ batch: [MeshMessage]) {
        guard !batch.isEmpty else { return }
        pthread_mutex_lock(lock)
        messages.append(contentsOf: batch)
        pthread_mutex_unlock(lock)
        var one: UInt64 = 1
        _ = Glibc.write(fd, &one, 8)
    }

    /// Everything posted so far, oldest first (the owner's thread).
    func take() -> [MeshMessage] {
        var v: UInt64 = 0
        _ = Glibc.read(fd, &v, 8)
        pthread_mutex_lock(lock)
        let out = messages
        messages = []
        pthread_mutex_unlock(lock)
        return out
    }

    var isEmpty: Bool {
        pthread_mutex_lock(lock)
        defer { pthread_mutex_unlock(lock) }
        return messages.isEmpty
    }
}

/// The queues of one caching device.
final class CachingMesh {
    let queueCount: Int
    let inboxes: [MeshInbox]
    /// [0]: epoch; queue q's counters at [(q + 1) * 8] and [(q + 1) * 8 + 1]
    /// (a 64-byte line each); hit counters at [(queueCount + 1 + q) * 8].
    private let words: UnsafeMutablePointer<UInt64>
    /// Home only: the counter parity a grace period waits for, if one runs.
    private var graceParity: UInt64?
    /// Non-zero while the home records a boot profile: the other queues then
    /// tell it of their hits (ProfileControl.swift). A relaxed load per hit.
    private let recordingWord = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)

    init(queues: Int) {
        precondition(queues >= 2)
        queueCount = queues
        inboxes = (0..<queues).map { _ in MeshInbox() }
        let n = (2 * queues + 2) * 8
        words = .allocate(capacity: n)
        words.initialize(repeating: 0, count: n)
        recordingWord.initialize(to: 0)
    }

    deinit {
        words.deallocate()
        recordingWord.deallocate()
    }

    var recordingProfile: Bool {
        get { cu_atomic_load_relaxed_u64(recordingWord) != 0 }
        set { cu_atomic_store_relaxed_u64(recordingWord, newValue ? 1 : 0) }
    }

    /// The home addresses every queue's requests by slot (queue × depth + tag), in a 16-bit tag.
    func check(depth: Int) throws(UblkError) {
        guard queueCount * depth < Int(Queue.internalTag) else {
            throw UblkError("queues × depth must stay below \(Queue.internalTag) for the caching targets")
        }
    }

    @inline(__always) private func active(_ q: UInt16, _ parity: UInt64) -> UnsafeMutablePointer<UInt64> {
        words + (Int(q) + 1) * 8 + Int(parity)
    }

    @inline(__always) private func hitWord(_ q: UInt16) -> UnsafeMutablePointer<UInt64> {
        words + (queueCount + 1 + Int(q)) * 8
    }

    // MARK: Readers (any queue but the home)

    /// Registers a cache-file read about to test page bits; returns the parity to `exit` with.
    @inline(__always)
    func enter(_ q: UInt16) -> UInt64 {
        while true {
            let x = cu_atomic_load_u64(words)
            _ = cu_atomic_add_u64(active(q, x & 1), 1)
            if cu_atomic_load_u64(words) == x { return x & 1 }
            _ = cu_atomic_add_u64(active(q, x & 1), UInt64.max)
        }
    }

    /// The read registered with `parity` ended. True when the home may be
    /// waiting for exactly this (a flip came since, and the counter is empty).
    @inline(__always)
    func exit(_ q: UInt16, _ parity: UInt64) -> Bool {
        let left = cu_atomic_add_u64(active(q, parity), UInt64.max)
        return left == 0 && cu_atomic_load_u64(words) & 1 != parity
    }

    /// Whether every page of `pages` is present, read with atomic loads (after `enter`).
    @inline(__always)
    static func allSet(_ words: UnsafePointer<UInt64>, _ pages: Range<UInt64>) -> Bool {
        let lo = pages.lowerBound, hi = pages.upperBound
        guard lo < hi else { return true }
        let first = Int(lo >> 6), last = Int((hi - 1) >> 6)
        for w in first...last {
            var mask = UInt64.max
            if w == first { mask &= UInt64.max &<< (lo & 63) }
            if w == last, hi & 63 != 0 { mask &= (1 &<< (hi & 63)) &- 1 }
            if cu_atomic_load_relaxed_u64(words + w) & mask != mask { return false }
        }
        return true
    }

    func publishHits(_ q: UInt16, _ n: UInt64) { cu_atomic_store_relaxed_u64(hitWord(q), n) }

    /// Hits served by the queues other than the home.
    var peerHits: UInt64 {
        var n: UInt64 = 0
        for q in 1..<queueCount { n &+= cu_atomic_load_relaxed_u64(hitWord(UInt16(q))) }
        return n
    }

    // MARK: The home queue

    /// Starts a grace period (the caller cleared bits before): false when one
    /// is still running (start another once it ended).
    func flip() -> Bool {
        guard graceParity == nil else { return false }
        let old = cu_atomic_load_u64(words)
        cu_atomic_store_u64(words, old &+ 1)
        graceParity = old & 1
        return true
    }

    var gracePending: Bool { graceParity != nil }

    /// Whether the running grace period is over (then it is ended); false if none runs.
    func graceEnded() -> Bool {
        guard let p = graceParity else { return false }
        for q in 1..<queueCount where cu_atomic_load_u64(active(UInt16(q), p)) != 0 { return false }
        graceParity = nil
        return true
    }

    /// Messages waiting in any inbox (host tests).
    var hasMessages: Bool { inboxes.contains { !$0.isEmpty } }
}

extension CachingHandler {
    // MARK: Between queues (-q N): the home's side (CachingPeer.swift has the others')

    @inline(__always)
    func send(_ message: MeshMessage, to queue: UInt16) {
        outbox[Int(queue)].append(message)
        outboxPending = true
    }

    /// Posts what this batch produced: one lock and one eventfd write per destination.
    func flushOutbox() {
        guard outboxPending, let m = mesh else { return }
        outboxPending = false
        for q in outbox.indices where !outbox[q].isEmpty {
            m.inboxes[q].post(outbox[q])
            outbox[q].removeAll(keepingCapacity: true)
        }
    }

    /// Messages from other queues, in the order they were posted.
    func received(_ messages: [MeshMessage], queue: IOQueue) {
        for message in messages {
            switch message {
            case .request(var r, let q):
                r.tag = UInt16(Int(q) * depth + Int(r.tag))
                handle(r, queue: queue)
            case .written(let slot, let result):
                guard let r = slots[Int(slot)].request, slots[Int(slot)].stage == .writing else { continue }
                writeDone(r, result, queue: queue)
            case .graceDrained:
                advanceGrace(queue)
            case .touched(let offset, let length):
                if profile != nil { recordRead(offset: offset, length: length) }
            case .hitsChanged:
                break  // `idle` follows, and publishes
            case .hint(let offset, let length, let q):
                // Only readahead: dropped while evicted pages are being punched
                // (a run planned now could land before a punch of its pages).
                if draining || eviction.isPunching { continue }
                _ = planner.hint(offset: offset, length: Int(length), stream: Int(q), present: bitmap.bits)
                if planner.plannedRunCount > 0 { startRuns(queue) }
            case .readDone(let slot):
                if slots[Int(slot)].stage == .reading {
                    slots[Int(slot)].request = nil
                    slots[Int(slot)].stage = .idle
                }
            case .read, .readThrough, .write, .complete:
                preconditionFailure("\(message) is a message to another queue")
            }
        }
    }
}
