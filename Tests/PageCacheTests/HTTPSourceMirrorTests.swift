import Foundation
import XCTest
@testable import PageCache

/// Mirrors of one image (`HTTPConfig.mirrors`): a request leaves a mirror
/// that fails, resets, stalls or serves another object, and moves to one that
/// is up, asking only for what it has not received; a slow mirror is avoided;
/// `probeAll` refuses mirrors that disagree and names one that does not answer.
/// Two fault servers serve the same image (same size and validators); the
/// query string picks each one's behaviour.
final class HTTPSourceMirrorTests: XCTestCase {
    static let image = makeImage(size: 3 << 20, seed: 77)
    static var servers: [FaultServer] = []

    override class func setUp() {
        servers = [try? FaultServer(image: image), try? FaultServer(image: image, host: "127.0.0.2")].compactMap { $0 }
    }

    override class func tearDown() {
        for s in servers { s.stop() }
        servers = []
    }

    var image: [UInt8] { Self.image }
    var a: FaultServer { Self.servers[0] }
    var b: FaultServer { Self.servers[1] }

    override func setUpWithError() throws {
        guard Self.servers.count == 2 else { throw missingTool("the fault servers (python3 Tests/tools/faultserver.py) did not start") }
    }

    /// This test's log id on each server.
    var id: String { name.filter { $0.isLetter || $0.isNumber } }

    /// A source over `a` (with `first`'s query) and then `b` (with `second`'s).
    func mirrored(_ first: String, _ second: String = "mode=ok", configure: (inout HTTPConfig) -> Void = { _ in }) throws -> HTTPSource {
        var config = HTTPConfig(url: a.url("\(first)&id=\(id)"))
        config.mirrors = [b.url("\(second)&id=\(id)")]
        config.retryBaseDelay = 0.01
        config.maxAttempts = 4
        configure(&config)
        let s = try HTTPSource(config: config)
        s.expected = RemoteImage(effectiveURL: config.url, size: UInt64(image.count), etag: "\"fixed-1\"",
                                 lastModified: "Mon, 01 Jan 2024 00:00:00 GMT")
        return s
    }

    func gets(_ s: FaultServer) -> [LoggedRequest] { s.requests(id: id).filter { $0.method == "GET" } }

    func testAMirrorThatFailsIsLeftAtOnceAndStaysDown() throws {
        let src = try mirrored("mode=5xx&n=1000")
        var events: [String] = []
        src.onMirrorEvent = { events.append($0) }
        let sink = src.fetchBlocking(offset: 4096, length: 1 << 20)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, image[4096..<4096 + (1 << 20)])
        XCTAssertEqual(gets(a).map(\.status), [503])
        XCTAssertEqual(gets(b).map(\.status), [206])
        XCTAssertEqual(src.stats.failovers, 1)
        XCTAssertEqual(src.stats.retries, 0, "no backoff: the other mirror is up")
        XCTAssertEqual(events.count, 1)
        XCTAssertTrue(events.first.map { $0.contains("is down") && $0.contains("503") } ?? false, "\(events)")
        // While it is down, requests go straight to the other.
        let again = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertNil(failure(again.result))
        XCTAssertEqual(gets(a).count, 1)
        XCTAssertEqual(gets(b).count, 2)
    }

    func testAResetMidBodyResumesOnTheOtherMirrorWhereItStopped() throws {
        let src = try mirrored("mode=reset&n=1000")
        let sink = src.fetchBlocking(offset: 4096, length: 2 << 20)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, image[4096..<4096 + (2 << 20)])
        let last = 4096 + (2 << 20) - 1
        XCTAssertEqual(gets(a).map(\.range), ["bytes=4096-\(last)"])
        let resumed = try XCTUnwrap(gets(b).first?.range)
        XCTAssertTrue(resumed.hasSuffix("-\(last)") && resumed != "bytes=4096-\(last)",
                      "the other mirror is asked for the rest only: \(resumed)")
    }

    func testAStalledMirrorIsLeftWithinTheStallTime() throws {
        // The first mirror sends half the body, then nothing for 20 s.
        let src = try mirrored("mode=slow&n=1000&delay=20") { $0.stallTimeout = 0.3 }
        let start = Date()
        let sink = src.fetchBlocking(offset: 0, length: 1 << 20, timeout: 30)
        let took = Date().timeIntervalSince(start)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, image[0..<(1 << 20)])
        XCTAssertLessThan(took, 10, "moved on long before the stall ended")
        XCTAssertEqual(src.stats.failovers, 1)
        XCTAssertEqual(gets(b).count, 1)
        XCTAssertTrue(gets(b)[0].range.map { !$0.hasPrefix("bytes=0-") } ?? false, "only what the stalled one did not send")
    }

    func testAMirrorServingAnotherObjectIsNoLongerUsed() throws {
        // ETag "v1", "v2"...: never the image's "fixed-1".
        let src = try mirrored("mode=etag")
        var events: [String] = []
        src.onMirrorEvent = { events.append($0) }
        for i in 0..<3 {
            let sink = src.fetchBlocking(offset: UInt64(i) << 20, length: 65536)
            XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
            assertBytes(sink.data, image[(i << 20)..<(i << 20) + 65536])
        }
        XCTAssertEqual(gets(a).count, 1, "asked once, then never again")
        XCTAssertEqual(gets(b).count, 3)
        XCTAssertTrue(events.contains { $0.contains("no longer used") && $0.contains("changed") }, "\(events)")
    }

    func testEveryMirrorFailingEndsAfterTheAttempts() throws {
        let src = try mirrored("mode=5xx&n=1000", "mode=5xx&n=1000")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        let e = try XCTUnwrap(failure(sink.result))
        XCTAssertEqual(e.reason, .status(503))
        XCTAssertEqual(sink.calls, 0)
        XCTAssertEqual(gets(a).count + gets(b).count, 4, "the attempts, between the mirrors")
        XCTAssertEqual(gets(b).count, 2, "the second mirror at once, then whichever is back first")
    }

    func testEveryMirrorServingAnotherObjectFailsAsAChangedImage() throws {
        let src = try mirrored("mode=etag", "mode=etag")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        let e = try XCTUnwrap(failure(sink.result))
        guard case .validatorChanged = e.reason else { return XCTFail("\(e)") }
        XCTAssertEqual(sink.calls, 0)
        XCTAssertEqual(gets(a).count, 1)
        XCTAssertEqual(gets(b).count, 1)
    }

    func testASlowMirrorIsAvoided() throws {
        let src = try mirrored("lag=0.3")
        for i in 0..<12 {
            let sink = src.fetchBlocking(offset: UInt64(i) * 8192, length: 8192)
            XCTAssertNil(failure(sink.result))
        }
        XCTAssertEqual(gets(a).count, 1, "measured once, then left for the faster one")
        XCTAssertEqual(gets(b).count, 11)
    }

    /// A burst sent before any mirror was measured mostly goes to the first,
    /// slow one; once the other answered, the waiting attempts move to it.
    func testABurstOnASlowMirrorMovesToTheFastOne() throws {
        let src = try mirrored("lag=1.5")
        var sinks: [Sink] = []
        let start = Date()
        for i in 0..<32 {
            let sink = Sink(offset: UInt64(i) * 65536, length: 4096)
            src.fetch(offset: UInt64(i) * 65536, length: 4096, onData: sink.handler) { sink.result = $0 }
            sinks.append(sink)
        }
        XCTAssertTrue(src.runUntilIdle(timeout: 10))
        let took = Date().timeIntervalSince(start)
        for (i, s) in sinks.enumerated() {
            XCTAssertNil(failure(s.result))
            assertBytes(s.data, image[(i * 65536)..<(i * 65536 + 4096)])
        }
        XCTAssertLessThan(took, 1.0, "not the slow mirror's 1.5 s")
        XCTAssertGreaterThanOrEqual(src.stats.failovers, 20)
        XCTAssertEqual(gets(b).count, 32, "every request ends on the fast one")
    }

    /// Each request moves for speed once: two slow mirrors do not bounce it.
    func testARequestMovesForSpeedOnce() throws {
        let src = try mirrored("lag=0.4", "lag=0.4")
        var sinks: [Sink] = []
        for i in 0..<8 {
            let sink = Sink(offset: UInt64(i) * 65536, length: 4096)
            src.fetch(offset: UInt64(i) * 65536, length: 4096, onData: sink.handler) { sink.result = $0 }
            sinks.append(sink)
        }
        XCTAssertTrue(src.runUntilIdle(timeout: 10))
        for s in sinks { XCTAssertNil(failure(s.result)) }
        XCTAssertLessThanOrEqual(gets(a).count + gets(b).count, 16)
    }

    func testMirrorsThatDisagreeAreRefusedAtProbeInOneLine() throws {
        let other = try FaultServer(image: makeImage(size: (3 << 20) + 4096, seed: 77))
        defer { other.stop() }
        var config = HTTPConfig(url: a.url("id=\(id)"))
        config.mirrors = [other.url("id=\(id)")]
        XCTAssertThrowsError(try HTTPSource.probeAll(config)) { error in
            let e = error as! HTTPError
            guard case .mirrorDisagrees = e.reason else { return XCTFail("\(e)") }
            XCTAssertFalse(e.description.contains("\n"))
            XCTAssertTrue(e.description.hasPrefix(Redact.url(other.url("id=\(id)"))), e.description)
            XCTAssertTrue(e.description.contains("\(image.count + 4096) bytes") && e.description.contains("\(image.count) bytes"), e.description)
        }
    }

    func testAMirrorDownAtProbeIsNamedAndTheOthersAnswer() throws {
        var config = HTTPConfig(url: "http://127.0.0.1:\(freePort())/image")
        config.mirrors = [b.url("id=\(id)")]
        let (found, notes) = try HTTPSource.probeAll(config)
        XCTAssertEqual(found.size, UInt64(image.count))
        XCTAssertEqual(found.etag, "\"fixed-1\"")
        XCTAssertEqual(notes.count, 1)
        XCTAssertTrue(notes[0].contains("cannot connect") && notes[0].contains("used once it answers"), notes[0])
        // One URL: its error, as always.
        XCTAssertThrowsError(try HTTPSource.probeAll(HTTPConfig(url: config.url)))
    }

    func testMirrorsMustBeHTTPAndWithoutLineBreaks() {
        var c = HTTPConfig(url: a.url())
        c.mirrors = ["ftp://x/image"]
        XCTAssertNotNil(c.problem)
        c.mirrors = ["http://x/im\nage"]
        XCTAssertEqual(c.problem, "the mirror URL contains a line break (CR or LF)")
        c.mirrors = [b.url()]
        c.stallTimeout = 0
        XCTAssertNotNil(c.problem)
    }
}
