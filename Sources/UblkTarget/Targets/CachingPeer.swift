// CachingPeer: the handler of every queue of a caching device but the home
// (queue 0), with `-q N`. CachingHandler.swift's header says how requests
// flow between the queues; this is the peer's side of it, and all of it:
//   - a READ whose pages are all present is a hit, served here: the bits are
//     tested with atomic loads inside the grace gate (CachingMesh.swift), the
//     cache file is read into the request on this queue's ring, and this
//     queue completes it. Read-through targets (an overlay) read whatever is
//     absent from the source the same way. No lock, no message.
//   - anything else goes to the home as `request`; the home answers `read`
//     (the pages are pinned there until `readDone`), `write` (the intent
//     bits are durable: move the data, answer `written`) or `complete`.
// It owns no page state and never fetches, persists or evicts.
import CUring
import Glibc
import PageCache

final class CachingPeer: QueueHandler {
    let context: CacheContext
    let io: CacheIO
    let mesh: CachingMesh
    let queueID: UInt16
    let depth: Int

    /// What a tag's request is doing here.
    struct Slot {
        var request: Request?
        /// A read under way here, inside the grace gate.
        var reading = false
        var transfer = Transfer()
        /// The grace parity its read registered with.
        var hitParity: UInt64 = 0
        /// The home handed the read over (it awaits `readDone`).
        var viaHome = false
    }
    var slots: [Slot]

    var outbox: [MeshMessage] = []
    var outboxPending: Bool { !outbox.isEmpty }
    /// Hits served here, and the count last published.
    var peerHits: UInt64 = 0
    var publishedHits: UInt64 = 0
    var lastWake: UInt64 = 0
    /// How often, at most, the home is woken to publish this queue's hits.
    var wakeInterval: UInt64 = 1_000_000_000
    /// This queue's last read (hit or not), to tell the home of sequential hits (readahead).
    var lastReadStart: UInt64 = .max
    var lastReadEnd: UInt64 = .max

    init(context: CacheContext, mesh: CachingMesh, queueID: UInt16, depth: Int) {
        precondition(queueID != 0, "queue 0 is the home")
        self.context = context
        self.io = CacheIO(context: context)
        self.mesh = mesh
        self.queueID = queueID
        self.depth = depth
        slots = Array(repeating: Slot(), count: depth)
    }

    /// The handler of `queue`; maps the cache file when the queue copies data itself.
    static func make(context: CacheContext, queue: IOQueue, deviceSize: UInt64, mesh: CachingMesh) throws(UblkError) -> CachingPeer {
        try mesh.check(depth: queue.depth)
        let p = CachingPeer(context: context, mesh: mesh, queueID: queue.id, depth: queue.depth)
        if queue.dataPath == .inlineUserCopy { try p.io.map(context.cache, deviceSize: deviceSize) }
        queue.poll(fd: mesh.inboxes[Int(queue.id)].fd, data: CachingHandler.Event.mesh.rawValue)
        return p
    }

    // MARK: Requests

    func handle(_ r: Request, queue: IOQueue) {
        switch r.op {
        case Op.read:
            if let c = context.chunks { c.touch(offset: r.offset, length: r.length) }
            let sequential = r.offset >= lastReadStart && r.offset <= lastReadEnd
            lastReadStart = r.offset
            lastReadEnd = r.offset + UInt64(r.length)
            let parity = mesh.enter(queueID)
            let pages = io.pages(offset: r.offset, length: Int(r.length))
            // A verified image: a page not checked yet in this run is the home's to check.
            let all = CachingMesh.allSet(io.presentWords, pages)
                && (context.verified.map { CachingMesh.allSet($0.sharedWords, pages) } ?? true)
            guard all || io.alwaysThrough else {
                if mesh.exit(queueID, parity) { send(.graceDrained) }
                return forward(r)
            }
            if all { peerHits &+= 1 }
            if mesh.recordingProfile { send(.touched(offset: r.offset, length: r.length)) }
            if all && sequential { send(.hint(offset: r.offset, length: r.length, queue: queueID)) }
            read(r, parity: parity, queue: queue)
        case Op.write, Op.discard, Op.writeZeroes:
            if !context.writable { return queue.complete(tag: r.tag, result: -EROFS) }
            forward(r)
        case Op.flush:
            if !context.writable { return queue.complete(tag: r.tag, result: 0) }
            forward(r)
        default:
            queue.complete(tag: r.tag, result: -EOPNOTSUPP)
        }
    }

    /// Reads `r` here, inside the grace gate entered with `parity` (`finish` leaves it).
    func read(_ r: Request, parity: UInt64, queue: IOQueue) {
        let t = Int(r.tag)
        slots[t].request = r
        slots[t].hitParity = parity
        slots[t].reading = true
        if let final = io.startRead(r, &slots[t].transfer, queue: queue) { finish(r.tag, final, queue) }
    }

    /// Hands `r` to the home queue; it answers with `read`, `write` or `complete`.
    func forward(_ r: Request) {
        slots[Int(r.tag)] = Slot(request: r, viaHome: true)
        send(.request(r, queue: queueID))
    }

    /// The home's slot for this queue's tag.
    func homeSlot(_ tag: UInt16) -> UInt16 { UInt16(Int(queueID) * depth + Int(tag)) }

    func finish(_ tag: UInt16, _ result: Int32, _ queue: IOQueue) {
        let t = Int(tag)
        if slots[t].reading {
            if mesh.exit(queueID, slots[t].hitParity) { send(.graceDrained) }
            if slots[t].viaHome { send(.readDone(slot: homeSlot(tag))) }
        }
        slots[t] = Slot()
        queue.complete(tag: tag, result: result)
    }

    func ioCompleted(tag: UInt16, sub raw: UInt8, data: UInt32, result: Int32, queue: IOQueue) {
        guard let sub = CachingHandler.Sub(rawValue: raw) else { preconditionFailure("a target I/O with an unknown sub-operation \(raw)") }
        let t = Int(tag)
        guard let r = slots[t].request else { return }
        switch sub {
        case .read:
            if let final = io.readCompleted(r, result, &slots[t].transfer, queue: queue) { finish(tag, final, queue) }
        case .write, .backingWrite:
            if let final = io.writeCompleted(r, sub, result, &slots[t].transfer, queue: queue) { wrote(tag, final) }
        default:
            preconditionFailure("\(sub) is not an I/O of a queue other than the home")
        }
    }

    /// A write's data moved (or failed): the home's state machine completes the request.
    func wrote(_ tag: UInt16, _ result: Int32) {
        send(.written(slot: homeSlot(tag), result: result))
    }

    // MARK: Events

    func eventFired(data: UInt32, result: Int32, queue: IOQueue) {
        guard CachingHandler.Event(rawValue: data) == .mesh else { preconditionFailure("an unknown event \(data)") }
        received(mesh.inboxes[Int(queueID)].take(), queue: queue)
        queue.poll(fd: mesh.inboxes[Int(queueID)].fd, data: CachingHandler.Event.mesh.rawValue)
    }

    /// The home's answers, in the order they were posted.
    func received(_ messages: [MeshMessage], queue: IOQueue) {
        for message in messages {
            switch message {
            case .read(let tag), .readThrough(let tag):
                guard let r = slots[Int(tag)].request else { continue }
                if case .readThrough = message { slots[Int(tag)].transfer.through = true }
                // The home keeps the pages till `readDone`; the gate is entered all the same (`finish` leaves it).
                read(r, parity: mesh.enter(queueID), queue: queue)
            case .write(let tag):
                guard let r = slots[Int(tag)].request else { continue }
                if let final = io.startWrite(r, &slots[Int(tag)].transfer, queue: queue) { wrote(tag, final) }
            case .complete(let tag, let result):
                finish(tag, result, queue)
            default:
                preconditionFailure("\(message) is a message to the home")
            }
        }
    }

    @inline(__always)
    func send(_ message: MeshMessage) { outbox.append(message) }

    /// Posts what this batch produced to the home: one lock and one eventfd write.
    func flushOutbox() {
        guard !outbox.isEmpty else { return }
        mesh.inboxes[0].post(outbox)
        outbox.removeAll(keepingCapacity: true)
    }

    func idle(queue: IOQueue) {
        if peerHits != publishedHits {
            publishedHits = peerHits
            mesh.publishHits(queueID, peerHits)
            // The home may sleep while only this queue works: wake it now and then to publish.
            let now = monotonicNanos()
            if now &- lastWake >= wakeInterval {
                lastWake = now
                send(.hitsChanged)
            }
        }
        flushOutbox()
    }
}
