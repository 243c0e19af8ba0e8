import Foundation
import XCTest
@testable import PageCache

/// Collects a fetch's bytes at their offsets and its result.
final class Sink {
    var data: [UInt8]
    let base: UInt64
    var result: Result<Void, HTTPError>?
    var calls = 0
    init(offset: UInt64, length: Int) {
        base = offset
        data = [UInt8](repeating: 0, count: length)
    }
    func handler(_ offset: UInt64, _ bytes: UnsafeRawBufferPointer) -> Bool {
        calls += 1
        let at = Int(offset - base)
        precondition(at >= 0 && at + bytes.count <= data.count, "data outside the asked range")
        data.withUnsafeMutableBytes { dst in
            if let src = bytes.baseAddress { (dst.baseAddress! + at).copyMemory(from: src, byteCount: bytes.count) }
        }
        return true
    }
}

extension HTTPSource {
    func fetchBlocking(offset: UInt64, length: Int, timeout: Double = 20) -> Sink {
        let sink = Sink(offset: offset, length: length)
        fetch(offset: offset, length: length, onData: sink.handler) { sink.result = $0 }
        runUntilIdle(timeout: timeout)
        return sink
    }
}

/// Equality of byte arrays without printing megabytes on failure.
func assertBytes(_ got: [UInt8], _ want: ArraySlice<UInt8>, file: StaticString = #filePath, line: UInt = #line) {
    if got.count != want.count {
        return XCTFail("\(got.count) bytes, expected \(want.count)", file: file, line: line)
    }
    let same = got.withUnsafeBytes { g in want.withUnsafeBytes { w in memcmp(g.baseAddress!, w.baseAddress!, g.count) == 0 } }
    if !same, let i = zip(got, want).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset {
        XCTFail("bytes differ first at \(i)", file: file, line: line)
    }
}

func failure(_ result: Result<Void, HTTPError>?) -> HTTPError? {
    if case .failure(let e) = result { return e }
    return nil
}

final class FaultServerTests: XCTestCase {
    static let image = makeImage(size: 3 << 20)
    static var server: FaultServer?

    override class func setUp() {
        server = try? FaultServer(image: image)
    }

    override class func tearDown() {
        server?.stop()
        server = nil
    }

    var server: FaultServer!
    var image: [UInt8] { Self.image }

    override func setUpWithError() throws {
        guard let s = Self.server else { throw XCTSkip("the fault server (python3 Tests/tools/faultserver.py) did not start") }
        server = s
    }

    /// A source for `mode`, with its own request-log id (the test name).
    func source(_ mode: String = "ok", extra: String = "", configure: (inout HTTPConfig) -> Void = { _ in }) throws -> (HTTPSource, String) {
        let id = "\(name.filter { $0.isLetter || $0.isNumber })-\(mode)"
        var config = HTTPConfig(url: server.url("mode=\(mode)\(extra)&id=\(id)"))
        config.retryBaseDelay = 0.01
        config.maxAttempts = 4
        configure(&config)
        return (try HTTPSource(config: config), id)
    }

    func testProbeAndExactRangeFetch() throws {
        let (src, id) = try source()
        let info = try src.probeBlocking()
        XCTAssertEqual(info.size, UInt64(image.count))
        XCTAssertEqual(info.etag, "\"fixed-1\"")
        XCTAssertEqual(info.lastModified, "Mon, 01 Jan 2024 00:00:00 GMT")
        XCTAssertTrue(info.fromHead)
        let sink = src.fetchBlocking(offset: 12345, length: 100_000)
        XCTAssertNotNil(sink.result)
        XCTAssertNil(failure(sink.result))
        assertBytes(sink.data, image[12345..<112_345])
        let log = server.requests(id: id)
        XCTAssertEqual(log.map(\.method), ["HEAD", "GET"])
        XCTAssertEqual(log[1].range, "bytes=12345-112344")
        XCTAssertEqual(src.stats.requests, 2)
        XCTAssertEqual(src.stats.bytesFetched, 100_000)
        XCTAssertEqual(src.stats.retries, 0)
    }

    func testServerErrorsAreRetriedThenSucceed() throws {
        let (src, id) = try source("5xx", extra: "&n=2")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertNil(failure(sink.result))
        assertBytes(sink.data, image[0..<4096])
        XCTAssertEqual(server.requests(id: id).map(\.status), [503, 503, 206])
        XCTAssertEqual(src.stats.retries, 2)
    }

    func testPersistentServerErrorsGiveUpAfterMaxAttempts() throws {
        let (src, id) = try source("5xx", extra: "&n=100")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        let e = try XCTUnwrap(failure(sink.result))
        XCTAssertEqual(e.reason, .status(503))
        XCTAssertEqual(e.status, 503)
        XCTAssertEqual(e.attempts, 4)
        XCTAssertTrue(e.url.contains("mode=5xx"))
        XCTAssertEqual(server.requests(id: id).count, 4)
        XCTAssertEqual(sink.calls, 0, "an error page is never delivered as data")
        XCTAssertEqual(src.stats.errors, 1)
    }

    func testConnectionResetIsRetriedAndResumes() throws {
        let (src, id) = try source("reset", extra: "&n=1")
        let sink = src.fetchBlocking(offset: 4096, length: 1 << 20)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, image[4096..<4096 + (1 << 20)])
        let log = server.requests(id: id)
        XCTAssertEqual(log.count, 2)
        XCTAssertEqual(log[0].range, "bytes=4096-1052671")
        // The retry asks for what was not delivered yet (it ends where the range ends).
        XCTAssertTrue(log[1].range!.hasSuffix("-1052671"))
    }

    func testTruncatedBodyIsRetriedFromWhereItStopped() throws {
        let (src, id) = try source("truncate", extra: "&n=1")
        let sink = src.fetchBlocking(offset: 0, length: 200_000)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, image[0..<200_000])
        let log = server.requests(id: id)
        XCTAssertEqual(log.map(\.range), ["bytes=0-199999", "bytes=100000-199999"])
    }

    func testSlowBodyTimesOutAndIsRetried() throws {
        let (src, id) = try source("slow", extra: "&n=1&delay=3") { $0.requestTimeout = 0.5 }
        let start = Date()
        let sink = src.fetchBlocking(offset: 0, length: 100_000)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, image[0..<100_000])
        XCTAssertEqual(server.requests(id: id).count, 2)
        XCTAssertLessThan(Date().timeIntervalSince(start), 2.5)
        XCTAssertEqual(src.stats.retries, 1)
    }

    func testRangeIgnoredIsRefused() throws {
        let (src, id) = try source("norange")
        XCTAssertThrowsError(try src.probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .rangeIgnored)
        }
        XCTAssertEqual(server.requests(id: id).map(\.method), ["HEAD", "GET"])
        XCTAssertEqual(server.requests(id: id).last?.range, "bytes=0-0")
        let sink = src.fetchBlocking(offset: 4096, length: 4096)
        XCTAssertEqual(failure(sink.result)?.reason, .rangeIgnored)
        XCTAssertEqual(sink.calls, 0, "a 200 body is never delivered")
        XCTAssertEqual(server.requests(id: id).count, 3, "not retried")
    }

    func testChangedETagIsATypedErrorNotData() throws {
        let (src, _) = try source("etag")
        let info = try src.probeBlocking()
        XCTAssertEqual(info.etag, "\"v1\"")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertEqual(failure(sink.result)?.reason, .validatorChanged(expected: "\"v1\"", got: "\"v2\""))
        XCTAssertEqual(sink.calls, 0)
    }

    func testHeadRefusedFallsBackToRangeGet() throws {
        let (src, id) = try source("nohead")
        let info = try src.probeBlocking()
        XCTAssertEqual(info.size, UInt64(image.count))
        XCTAssertFalse(info.fromHead)
        XCTAssertEqual(info.etag, "\"fixed-1\"")
        let log = server.requests(id: id)
        XCTAssertEqual(log.map(\.method), ["HEAD", "GET"])
        XCTAssertEqual(log.map(\.status), [405, 206])
        XCTAssertEqual(log[1].range, "bytes=0-0")
    }

    func testWrongContentRangeIsRefused() throws {
        let (src, _) = try source("badrange")
        let sink = src.fetchBlocking(offset: 8192, length: 4096)
        XCTAssertEqual(failure(sink.result)?.reason,
                       .rangeMismatch(expected: "bytes 8192-12287", got: "bytes 8193-12288/\(image.count)"))
        XCTAssertEqual(sink.calls, 0)
    }

    func testNotFoundAndRefusedAreTypedWithTheURL() throws {
        let (src, id) = try source("missing")
        XCTAssertThrowsError(try src.probeBlocking()) { error in
            let e = error as? HTTPError
            XCTAssertEqual(e?.reason, .status(404))
            XCTAssertEqual(e?.status, 404)
            XCTAssertTrue(e?.url.contains("mode=missing") ?? false)
        }
        XCTAssertEqual(server.requests(id: id).count, 1, "a 404 is not retried")
        let dead = try HTTPSource(config: HTTPConfig(url: "http://127.0.0.1:\(freePort())/image"))
        XCTAssertThrowsError(try dead.probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .connectFailed)
            XCTAssertTrue((error as? HTTPError)?.description.contains("127.0.0.1") ?? false)
        }
    }

    func testSizeChangeIsDetected() throws {
        let (src, _) = try source()
        src.expected = RemoteImage(effectiveURL: src.url, size: 1 << 20, etag: "\"fixed-1\"")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertEqual(failure(sink.result)?.reason, .sizeChanged(expected: 1 << 20, got: UInt64(image.count)))
    }

    func testHandlerAbortStopsTheTransfer() throws {
        let (src, _) = try source()
        var result: Result<Void, HTTPError>?
        src.fetch(offset: 0, length: 1 << 20, onData: { _, _ in false }) { result = $0 }
        src.runUntilIdle(timeout: 10)
        XCTAssertEqual(failure(result)?.reason, .aborted)
    }

    func testS3RequestsAreSignedPathStyle() throws {
        let s3 = S3Config.fromEnvironment(endpoint: "http://127.0.0.1:\(server.port)", region: "eu-west-1",
                                          environment: ["AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "secret",
                                                        "AWS_SESSION_TOKEN": "tok"])
        let s3c = try XCTUnwrap(s3)
        XCTAssertEqual(s3c.httpURL(for: "s3://bucket/dir/key.img"), "http://127.0.0.1:\(server.port)/bucket/dir/key.img")
        XCTAssertNil(s3c.httpURL(for: "s3://bucket"))
        XCTAssertNil(S3Config.fromEnvironment(environment: [:]))
        // The fault server serves any path; the signature itself is checked by curl's own tests.
        var config = HTTPConfig(url: "s3://bucket/image?mode=ok&id=s3test")
        config.s3 = s3c
        let src = try HTTPSource(config: config)
        XCTAssertEqual(src.url, "http://127.0.0.1:\(server.port)/bucket/image?mode=ok&id=s3test")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertNil(failure(sink.result))
        assertBytes(sink.data, image[0..<4096])
    }

    func testZeroLengthFetchCompletes() throws {
        let (src, id) = try source()
        let sink = src.fetchBlocking(offset: 0, length: 0)
        XCTAssertNotNil(sink.result)
        XCTAssertNil(failure(sink.result))
        XCTAssertEqual(server.requests(id: id).count, 0)
    }
}
