// The `sync` contract (SyncTracker, DirtyControl) and the control socket's
// buffering (ControlChannel), on the host: the channel is driven by a small
// poll(2) loop that does what Queue.controlEvent does with the ring.
import Dispatch
import FoundationEssentials
import Glibc
import PageCache
import XCTest
@testable import UblkTarget

final class SyncTrackerTests: XCTestCase {
    func testEndOkReturnsTheSnapshotWhenNothingWasWritten() {
        var t = SyncTracker(firstToken: 7)
        let token = t.begin([2..<5, 10..<20])
        XCTAssertEqual(token, 7)
        XCTAssertEqual(t.end(token, ok: true), [2..<5, 10..<20])
        XCTAssertNil(t.end(token, ok: true), "a token ends once")
    }

    func testWritesDuringTheSyncAreNotCleared() {
        var t = SyncTracker()
        let token = t.begin([10..<20, 30..<40])
        t.written(12..<14)
        t.written(0..<11)   // overlaps the first run's start
        t.written(25..<28)  // between runs: irrelevant
        t.written(39..<50)  // overlaps the last run's end
        t.written(100..<200)  // past the span
        XCTAssertEqual(t.end(token, ok: true), [11..<12, 14..<20, 30..<39])
    }

    func testWritesBeforeBeginDoNotCount() {
        var t = SyncTracker()
        t.written(0..<100)
        let token = t.begin([10..<20])
        XCTAssertEqual(t.end(token, ok: true), [10..<20])
    }

    func testFailedEndClearsNothing() {
        var t = SyncTracker()
        let token = t.begin([10..<20])
        XCTAssertEqual(t.end(token, ok: false), [])
        XCTAssertNil(t.end(token, ok: true), "a failed end also ends the snapshot")
    }

    func testNoEndKeepsTheSnapshotOnlyUntilTheBound() {
        var t = SyncTracker()
        let first = t.begin([1..<2])
        XCTAssertEqual(t.snapshots.count, 1, "a sync never ended is kept")
        var tokens = [first]
        for i in 0..<(SyncTracker.limit * 3) { tokens.append(t.begin([UInt64(i)..<UInt64(i + 1)])) }
        XCTAssertEqual(t.snapshots.count, SyncTracker.limit, "at most \(SyncTracker.limit) snapshots")
        XCTAssertEqual(Set(tokens).count, tokens.count, "tokens are unique")
        XCTAssertNil(t.end(first, ok: true), "the oldest was dropped: its end is refused")
        let last = tokens.last!
        XCTAssertEqual(t.end(last, ok: true), [UInt64(SyncTracker.limit * 3 - 1)..<UInt64(SyncTracker.limit * 3)])
        XCTAssertEqual(t.end(tokens[tokens.count - SyncTracker.limit], ok: true), [UInt64(SyncTracker.limit * 2)..<UInt64(SyncTracker.limit * 2 + 1)],
                       "the oldest kept one still ends")
    }

    func testTokensStartRandomly() {
        let a = SyncTracker(), b = SyncTracker()
        var x = a, y = b
        XCTAssertNotEqual(x.begin([]), y.begin([]), "two servers hand out different tokens (1 in 2^52 to fail)")
    }

    /// Many writes (past the fold threshold), several snapshots, against a set model.
    func testRandomAgainstAModel() {
        var rng = SplitMix(seed: 42)
        for round in 0..<200 {
            var t = SyncTracker()
            var dirty = Set<UInt64>()
            var model: [UInt64: (pages: Set<UInt64>, written: Set<UInt64>)] = [:]
            let pageCount = UInt64(1 + rng.next() % 2000)
            for _ in 0..<Int(rng.next() % 800) {
                switch rng.next() % 10 {
                case 0:
                    let runs = runsOf(dirty)
                    let token = t.begin(runs)
                    model[token] = (dirty, [])
                    if model.count > SyncTracker.limit {
                        let oldest = model.keys.min()!
                        model[oldest] = nil
                    }
                case 1:
                    guard let token = model.keys.randomElement(using: &rng) else { continue }
                    let ok = rng.next() % 4 != 0
                    let m = model.removeValue(forKey: token)!
                    guard let clear = t.end(token, ok: ok) else { XCTFail("round \(round): token lost"); continue }
                    let expected = ok ? m.pages.subtracting(m.written) : []
                    let got = Set(pagesOf(clear))
                    XCTAssertTrue(got == expected, "round \(round): \(got.subtracting(expected).count) pages cleared wrongly, \(expected.subtracting(got).count) left dirty")
                    XCTAssertEqual(clear, SyncTracker.merge(clear), "runs stay sorted and merged")
                    for p in expected { dirty.remove(p) }
                default:
                    let start = rng.next() % pageCount
                    let len = 1 + rng.next() % 8
                    let r = start..<min(pageCount, start + len)
                    t.written(r)
                    for p in r { dirty.insert(p) }
                    for k in model.keys { model[k]!.written.formUnion(r) }
                }
            }
            XCTAssertEqual(Set(t.snapshots.map(\.token)), Set(model.keys))
        }
    }

    func testFoldKeepsMemoryBounded() {
        var t = SyncTracker()
        let token = t.begin([0..<100])
        // The same two pages written over and over: recorded writes do not pile up.
        for _ in 0..<10_000 { t.written(10..<11); t.written(50..<51) }
        XCTAssertLessThanOrEqual(t.snapshots[0].written.count, SyncTracker.foldThreshold + 1)
        XCTAssertLessThanOrEqual(t.snapshots[0].runs.count, 3)
        XCTAssertEqual(t.end(token, ok: true), [0..<10, 11..<50, 51..<100])
    }

    func pagesOf(_ runs: [Range<UInt64>]) -> [UInt64] { runs.flatMap { Array($0) } }

    func runsOf(_ pages: Set<UInt64>) -> [Range<UInt64>] {
        SyncTracker.merge(pages.map { $0..<$0 + 1 })
    }
}

/// The dirty-tracking control operations on a real dirty bitmap.
final class DirtyControlTests: XCTestCase {
    var dir = ""
    var dirty: Bitmap!
    var syncs = SyncTracker()
    let size: UInt64 = 256 << 20
    let page: UInt64 = 4096

    override func setUpWithError() throws {
        dir = "/tmp/ublk-control-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        XCTAssertEqual(mkdir(dir, 0o700), 0)
        dirty = try Bitmap.open(path: dir + "/b.dirty",
                                identity: BitmapIdentity(kind: .dirty, pageSize: Int(page), imageSize: size, url: "test")).bitmap
    }

    override func tearDown() {
        dirty = nil
        unlink(dir + "/b.dirty")
        rmdir(dir)
    }

    /// Clears the handler was asked for (each a list of runs).
    var clears: [[Range<UInt64>]] = []

    func ask(_ r: ControlRequest) -> (reply: String, changed: Bool) {
        let before = clears.count
        let d = dirty!
        var asked: [[Range<UInt64>]] = []
        let reply = DirtyControl.answer(r, dirty: d, syncs: &syncs, pageSize: page, imageSize: size) { runs in
            asked.append(runs)
            for x in runs { _ = d.markAbsent(x) }
        }
        clears += asked
        return (reply, clears.count > before)
    }

    func begin() throws -> DirtyExtents {
        try JSONDecoder().decode(DirtyExtents.self, from: Data(ask(ControlRequest(op: .syncBegin)).reply.utf8))
    }

    func testSyncBeginClearsNothing() throws {
        _ = dirty.markPresent(10..<20)
        let taken = try begin()
        XCTAssertNotNil(taken.token)
        XCTAssertEqual(taken.extents, [DirtyExtents.Extent(offset: 10 * page, length: 10 * page)])
        // The client is killed here: no sync-end ever comes.
        XCTAssertEqual(dirty.count, 10, "the pages of a sync that never ended stay dirty")
        XCTAssertEqual(dirty.bits.nextSet(in: 0..<dirty.pageCount), 10)
    }

    func testSyncEndOkClearsAllButPagesWrittenMeanwhile() throws {
        _ = dirty.markPresent(10..<20)
        let taken = try begin()
        // A write completes during the copy (the handler marks it dirty and tells the tracker).
        _ = dirty.markPresent(15..<16)
        syncs.written(15..<16)
        _ = dirty.markPresent(100..<101)
        syncs.written(100..<101)
        let end = ask(ControlRequest(op: .syncEnd, token: taken.token, ok: true))
        XCTAssertTrue(end.changed, "the cleared bits are to be persisted")
        XCTAssertTrue(end.reply.contains("\"pages_cleared\":9"), end.reply)
        XCTAssertEqual(DirtyExtents.runs(dirty.bits), [15..<16, 100..<101])
    }

    func testSyncEndFailedClearsNothing() throws {
        _ = dirty.markPresent(10..<20)
        let taken = try begin()
        let end = ask(ControlRequest(op: .syncEnd, token: taken.token, ok: false))
        XCTAssertFalse(end.changed)
        XCTAssertEqual(dirty.count, 10)
    }

    func testDroppedTokenIsRefusedAndItsPagesStayDirty() throws {
        _ = dirty.markPresent(10..<20)
        let first = try begin()
        for _ in 0..<SyncTracker.limit { _ = try begin() }
        let end = ask(ControlRequest(op: .syncEnd, token: first.token, ok: true))
        XCTAssertTrue(end.reply.contains("unknown sync token"), end.reply)
        XCTAssertFalse(end.changed)
        XCTAssertEqual(dirty.count, 10)
        XCTAssertTrue(ask(ControlRequest(op: .syncEnd, token: nil, ok: true)).reply.contains("unknown sync token"))
    }

    func testDirtyClearStillClearsEverything() throws {
        _ = dirty.markPresent(10..<20)
        let taken = try begin()
        let r = ask(ControlRequest(op: .dirty, clear: true))
        XCTAssertTrue(r.changed)
        XCTAssertEqual(dirty.count, 0)
        _ = dirty.markPresent(12..<13)
        syncs.written(12..<13)
        _ = ask(ControlRequest(op: .syncEnd, token: taken.token, ok: true))
        XCTAssertEqual(DirtyExtents.runs(dirty.bits), [12..<13], "a page written after the clear stays dirty")
    }

    func testTwentyThousandExtentsInOneReply() throws {
        for i in 0..<UInt64(20_000) { _ = dirty.markPresent(2 * i..<2 * i + 1) }
        let reply = ask(ControlRequest(op: .dirty)).reply
        let parsed = try JSONDecoder().decode(DirtyExtents.self, from: Data(reply.utf8))
        XCTAssertEqual(parsed.extents.count, 20_000)
        XCTAssertEqual(parsed.pages, 20_000)
        XCTAssertGreaterThan(reply.utf8.count, 500_000)
    }
}

/// Drives a ControlChannel as Queue.controlEvent does, with poll(2) standing in
/// for the ring's one-shot polls.
final class ChannelDriver {
    let channel: ControlChannel
    let answer: (ControlRequest) -> String
    var armed: [UInt32: (fd: Int32, out: Bool)] = [:]
    var writablePolls = 0
    var requests = 0
    var slowestCall = 0.0

    init(path: String, answer: @escaping (ControlRequest) -> String) throws {
        channel = try ControlChannel(path: path)
        self.answer = answer
    }

    func apply(_ next: ControlChannel.Next) {
        switch next {
        case .poll(let fd, let out, let token):
            armed[token] = (fd, out)
            if out { writablePolls += 1 }
        case .request(let token, let r):
            requests += 1
            apply(timed { channel.respond(token, answer(r)) })
        case .none:
            break
        }
    }

    func timed<T>(_ f: () -> T) -> T {
        let t0 = monotonic()
        defer { slowestCall = max(slowestCall, monotonic() - t0) }
        return f()
    }

    func step(timeoutMs: Int32 = 20) {
        var fds = [pollfd(fd: channel.listenFD, events: Int16(POLLIN), revents: 0)]
        let tokens = Array(armed.keys)
        for t in tokens { fds.append(pollfd(fd: armed[t]!.fd, events: Int16(armed[t]!.out ? POLLOUT : POLLIN), revents: 0)) }
        _ = poll(&fds, nfds_t(fds.count), timeoutMs)
        if fds[0].revents != 0 { for n in timed({ channel.acceptAll() }) { apply(n) } }
        for (i, t) in tokens.enumerated() where fds[i + 1].revents != 0 {
            armed[t] = nil
            apply(timed { channel.ready(t) })
        }
    }

    /// Steps until `done` is signalled (at most `seconds`).
    func run(until done: DispatchSemaphore, seconds: Double = 60) -> Bool {
        let deadline = monotonic() + seconds
        while done.wait(timeout: .now()) == .timedOut {
            if monotonic() > deadline { return false }
            step()
        }
        return true
    }
}

func monotonic() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// A blocking client socket connected to `path`.
func connectUnix(_ path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    var addr = sockaddr_un()
    addr.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
    let r = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    precondition(r == 0, "connect \(path): \(errno)")
    return fd
}

func sendAll(_ fd: Int32, _ text: String) {
    let bytes = Array(text.utf8)
    var off = 0
    while off < bytes.count {
        let n = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if n <= 0 { return }
        off += n
    }
}

/// Reads to EOF, `chunk` bytes at a time, sleeping `pauseMicros` between reads.
func readAll(_ fd: Int32, chunk: Int = 1 << 16, pauseMicros: UInt32 = 0, limit: Int = .max) -> [UInt8] {
    var out = [UInt8]()
    var buf = [UInt8](repeating: 0, count: chunk)
    while out.count < limit {
        let n = read(fd, &buf, min(chunk, limit - out.count))
        if n <= 0 { break }
        out += buf[0..<n]
        if pauseMicros > 0 { usleep(pauseMicros) }
    }
    return out
}

final class ControlChannelTests: XCTestCase {
    var path = ""

    override func setUp() {
        path = "/tmp/ublk-ctl-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
    }

    /// A reply of `size` bytes: a JSON string, distinct content throughout.
    static func bigReply(_ size: Int) -> String {
        var s = "{\"x\":\""
        s.reserveCapacity(size + 16)
        var i = 0
        while s.utf8.count < size - 2 { s += String(i, radix: 36) + "."; i += 1 }
        return s + "\"}"
    }

    func testBigReplyReadSlowlyArrivesWhole() throws {
        let reply = ControlChannelTests.bigReply(6 << 20)
        let driver = try ChannelDriver(path: path) { r in
            XCTAssertEqual(r.op, .dirty)
            return reply
        }
        let done = DispatchSemaphore(value: 0)
        let got = Box([UInt8]())
        let p = path
        DispatchQueue.global().async {
            let fd = connectUnix(p)
            sendAll(fd, "{\"op\":\"dirty\"}\n")
            usleep(200_000)  // the server's socket buffer fills meanwhile
            got.value = readAll(fd, chunk: 32 << 10, pauseMicros: 200)
            close(fd)
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        XCTAssertEqual(got.value.count, reply.utf8.count + 1, "the whole reply and its newline")
        XCTAssertTrue(got.value.elementsEqual(Array(reply.utf8) + [10]), "byte for byte")
        XCTAssertGreaterThan(driver.writablePolls, 3, "the reply went out as the client read, not at once")
        XCTAssertLessThan(driver.slowestCall, 0.5, "no call waited for the client")
        for _ in 0..<5 { driver.step(timeoutMs: 1) }
        XCTAssertEqual(driver.channel.connectionCount, 0, "closed once all was sent")
    }

    func testControlClientReadsABigReplyWhole() throws {
        let reply = "{\"n\":\"" + String(repeating: "y", count: 3 << 20) + "\"}"
        let driver = try ChannelDriver(path: path) { _ in reply }
        let done = DispatchSemaphore(value: 0)
        let data = Box(Data())
        let failure = Box<String?>(nil)
        let p = path
        DispatchQueue.global().async {
            do { data.value = try ControlClient.send(ControlRequest(op: .dirty), path: p, name: "test") } catch { failure.value = "\(error)" }
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        XCTAssertNil(failure.value)
        XCTAssertEqual(data.value.count, reply.utf8.count)
    }

    func testClientThatClosesBeforeReadingDoesNotHurt() throws {
        let driver = try ChannelDriver(path: path) { _ in ControlChannelTests.bigReply(4 << 20) }
        let done = DispatchSemaphore(value: 0)
        let p = path
        DispatchQueue.global().async {
            let fd = connectUnix(p)
            sendAll(fd, "{\"op\":\"dirty\"}\n")
            close(fd)  // gone before the reply: the server's send gets EPIPE, never SIGPIPE
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        for _ in 0..<50 where driver.requests == 0 || driver.channel.connectionCount > 0 { driver.step() }
        XCTAssertEqual(driver.requests, 1)
        XCTAssertEqual(driver.channel.connectionCount, 0, "the connection was dropped")
        XCTAssertTrue(try answersNormally(driver), "still serving")
    }

    func testClientThatDisconnectsMidwayDoesNotHurt() throws {
        let driver = try ChannelDriver(path: path) { _ in ControlChannelTests.bigReply(4 << 20) }
        let done = DispatchSemaphore(value: 0)
        let got = Box(0)
        let p = path
        DispatchQueue.global().async {
            let fd = connectUnix(p)
            sendAll(fd, "{\"op\":\"dirty\"}\n")
            got.value = readAll(fd, limit: 300_000).count
            close(fd)  // unread data: the server sees ECONNRESET or EPIPE
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        for _ in 0..<50 where driver.channel.connectionCount > 0 { driver.step() }
        XCTAssertEqual(got.value, 300_000)
        XCTAssertEqual(driver.channel.connectionCount, 0)
    }

    func testClientsThatNeverReadAreBounded() throws {
        let driver = try ChannelDriver(path: path) { _ in ControlChannelTests.bigReply(1 << 20) }
        // More clients than the bound, each sends a request and never reads.
        var stuck: [Int32] = []
        for _ in 0..<(ControlChannel.maxConnections + 10) {
            let fd = connectUnix(path)
            sendAll(fd, "{\"op\":\"dirty\"}\n")
            stuck.append(fd)
            for _ in 0..<3 { driver.step(timeoutMs: 1) }
        }
        XCTAssertLessThanOrEqual(driver.channel.connectionCount, ControlChannel.maxConnections)
        XCTAssertTrue(try answersNormally(driver), "a new client is still answered in full")
        // The first ones were closed to make room: they read part of a reply, then EOF.
        let first = readAll(stuck[0])
        XCTAssertFalse(first.contains(10), "an evicted client gets no whole reply")
        for fd in stuck { close(fd) }
        for _ in 0..<20 { driver.step(timeoutMs: 5) }
        XCTAssertEqual(driver.channel.connectionCount, 0)
    }

    func testRequestTooLongOrMalformedGetsAnError() throws {
        let driver = try ChannelDriver(path: path) { _ in "{}" }
        for (request, expected) in [(String(repeating: "a", count: ControlConnection.maxRequest + 100), "request too long"),
                                    ("not json\n", "malformed request"), ("{\"op\":\"x\"", "incomplete request")] {
            let done = DispatchSemaphore(value: 0)
            let got = Box("")
            let p = path
            DispatchQueue.global().async {
                let fd = connectUnix(p)
                sendAll(fd, request)
                shutdown(fd, Int32(SHUT_WR))
                got.value = String(decoding: readAll(fd), as: UTF8.self)
                close(fd)
                done.signal()
            }
            XCTAssertTrue(driver.run(until: done))
            XCTAssertTrue(got.value.contains(expected) && got.value.hasSuffix("\n"), "\(expected): \(got.value)")
        }
        XCTAssertEqual(driver.requests, 0)
    }

    /// A server that answers and closes with bytes of the request unread resets
    /// the connection after the reply: the client keeps the whole line it got.
    func testClientKeepsAReplyFollowedByAReset() throws {
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in for (i, b) in bytes.enumerated() { p[i] = b } }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        XCTAssertEqual(bound, 0)
        XCTAssertEqual(listen(listener, 1), 0)
        defer { close(listener); unlink(path) }
        let served = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            let c = accept(listener, nil, nil)
            var buf = [UInt8](repeating: 0, count: 4)
            _ = read(c, &buf, 4)  // most of the request stays unread
            sendAll(c, "{\"ok\":true}\n")
            close(c)
            served.signal()
        }
        let reply = try ControlClient.send(ControlRequest(op: .dirty, clear: false, token: 1, ok: true), path: path, name: "test")
        XCTAssertEqual(String(decoding: reply, as: UTF8.self), "{\"ok\":true}")
        served.wait()
    }

    func testRequestLineMayEndInCRLF() throws {
        let driver = try ChannelDriver(path: path) { r in controlJSON(["op": r.op]) }
        let done = DispatchSemaphore(value: 0)
        let got = Box("")
        let p = path
        DispatchQueue.global().async {
            let fd = connectUnix(p)
            sendAll(fd, "{\"op\":\"dirty\"}")
            usleep(50_000)
            sendAll(fd, "\r\n")
            got.value = String(decoding: readAll(fd), as: UTF8.self)
            close(fd)
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        XCTAssertEqual(got.value, "{\"op\":\"dirty\"}\n")
    }

    func testAPollForAClosedConnectionIsIgnored() throws {
        let driver = try ChannelDriver(path: path) { _ in "{}" }
        var clients: [Int32] = []
        var tokens: [UInt32] = []
        for _ in 0..<(ControlChannel.maxConnections + 1) {
            clients.append(connectUnix(path))
            for case .poll(_, _, let t) in driver.channel.acceptAll() { tokens.append(t) }
        }
        XCTAssertEqual(tokens.count, ControlChannel.maxConnections + 1)
        XCTAssertEqual(driver.channel.connectionCount, ControlChannel.maxConnections)
        // The first was evicted; its fd number may be someone else's now.
        XCTAssertEqual(driver.channel.ready(tokens[0]), .none)
        XCTAssertEqual(driver.channel.respond(tokens[0], "{}"), .none)
        XCTAssertEqual(driver.channel.connectionCount, ControlChannel.maxConnections)
        XCTAssertEqual(readAll(clients[0]).count, 0, "the evicted client sees EOF")
        for fd in clients { close(fd) }
    }

    /// A profile-replay of a profile's most runs, each of the largest numbers:
    /// megabytes in one line, read and answered in full.
    func testARequestOfAProfilesMostRunsIsServed() throws {
        var request = ControlRequest(op: .profileReplay)
        request.runs = (0..<UInt64(BootProfile.maxRuns)).map { [UInt64.max - $0, UInt64.max - $0] }
        let size = try JSONEncoder().encode(request).count
        XCTAssertGreaterThan(size, 2 << 20)
        let got = Box<ControlRequest?>(nil)
        let driver = try ChannelDriver(path: path) { r in
            got.value = r
            return "{\"runs\":\(r.runs?.count ?? 0)}"
        }
        let done = DispatchSemaphore(value: 0)
        let reply = Box("")
        let p = path, sent = request
        DispatchQueue.global().async {
            do { reply.value = String(decoding: try ControlClient.send(sent, path: p, name: "test"), as: UTF8.self) } catch {
                reply.value = "\(error)"
            }
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        XCTAssertEqual(reply.value, "{\"runs\":\(BootProfile.maxRuns)}")
        XCTAssertEqual(got.value, request, "every run arrived")
        XCTAssertLessThan(driver.slowestCall, 2, "no call waited for the client")
    }

    /// Over the bound: the client says so in one line before sending; the
    /// server, sent one anyway, answers with one line and serves on.
    func testARequestOverTheBoundIsOneLine() throws {
        var request = ControlRequest(op: .profileReplay)
        request.runs = Array(repeating: [UInt64.max, UInt64.max], count: ControlConnection.maxRequest / 40)
        let driver = try ChannelDriver(path: path) { _ in "{}" }
        let done = DispatchSemaphore(value: 0)
        let failure = Box("")
        let p = path, sent = request
        DispatchQueue.global().async {
            do { _ = try ControlClient.send(sent, path: p, name: "test") } catch { failure.value = "\(error)" }
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        XCTAssertTrue(failure.value.contains("request too long (more than 4 MiB)"), failure.value)
        XCTAssertFalse(failure.value.contains("\n"))
        XCTAssertEqual(driver.requests, 0)
    }

    /// Requests held together are bounded: one that would take more is told the socket is busy.
    func testRequestsHeldTogetherAreBounded() throws {
        let driver = try ChannelDriver(path: path) { _ in "{}" }
        let chunk = String(repeating: " ", count: ControlConnection.maxRequest - 1000)
        var held: [Int32] = []
        for _ in 0..<(ControlChannel.maxBuffered / ControlConnection.maxRequest) {
            let fd = connectUnix(path)
            let sent = DispatchSemaphore(value: 0)
            DispatchQueue.global().async { sendAll(fd, chunk); sent.signal() }
            XCTAssertTrue(driver.run(until: sent))
            for _ in 0..<20 { driver.step(timeoutMs: 2) }
            held.append(fd)
        }
        let fd = connectUnix(path)
        let done = DispatchSemaphore(value: 0)
        let got = Box("")
        DispatchQueue.global().async {
            sendAll(fd, chunk)
            got.value = String(decoding: readAll(fd), as: UTF8.self)
            done.signal()
        }
        XCTAssertTrue(driver.run(until: done))
        XCTAssertTrue(got.value.contains("busy") && got.value.hasSuffix("\n"), got.value)
        for h in held { close(h) }
        close(fd)
    }

    /// One more client, read normally, gets its whole reply.
    func answersNormally(_ driver: ChannelDriver) throws -> Bool {
        let done = DispatchSemaphore(value: 0)
        let got = Box([UInt8]())
        let p = path
        DispatchQueue.global().async {
            let fd = connectUnix(p)
            sendAll(fd, "{\"op\":\"dirty\"}\n")
            got.value = readAll(fd)
            close(fd)
            done.signal()
        }
        guard driver.run(until: done) else { return false }
        return got.value.count > 1 << 20 && got.value.last == 10 && got.value.firstIndex(of: 10) == got.value.count - 1
    }
}

/// A result handed from a client thread to the test thread (after a semaphore).
final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ value: T) { self.value = value }
}
