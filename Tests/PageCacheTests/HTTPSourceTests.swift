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
        guard let s = Self.server else { throw missingTool("the fault server (python3 Tests/tools/faultserver.py) did not start") }
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

/// A TCP listener on 127.0.0.1 that reads what a client sends first (a TLS
/// ClientHello) and answers with a reset: a TLS handshake reset by the peer.
final class ResettingListener {
    let fd: Int32
    let port: UInt16
    private final class Counter {
        let lock = NSLock()
        var value = 0
        func bump() { lock.lock(); value += 1; lock.unlock() }
        var current: Int { lock.lock(); defer { lock.unlock() }; return value }
    }
    private let counter = Counter()
    var accepted: Int { counter.current }

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        port = UInt16(bigEndian: addr.sin_port)
        guard bound, listen(fd, 16) == 0 else { close(fd); throw missingTool("cannot listen on 127.0.0.1") }
        let listener = fd
        let counter = self.counter
        Thread.detachNewThread {
            while true {
                let c = accept(listener, nil, nil)
                if c < 0 { if errno == EINTR { continue }; return }
                counter.bump()
                var buf = [UInt8](repeating: 0, count: 4096)
                _ = recv(c, &buf, buf.count, 0)
                var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
                setsockopt(c, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
                close(c)
            }
        }
    }

    func stop() { shutdown(fd, Int32(SHUT_RDWR)); close(fd) }
    deinit { stop() }
}

/// Transient network faults are retried like 5xx and resets.
final class TransientFaultTests: XCTestCase {
    func config(_ url: String, attempts: Int = 3) -> HTTPConfig {
        var c = HTTPConfig(url: url)
        c.retryBaseDelay = 0.01
        c.maxAttempts = attempts
        return c
    }

    /// `.invalid` never resolves (RFC 2606): CURLE_COULDNT_RESOLVE_HOST, at once.
    func testUnresolvableNameIsRetriedThenFails() throws {
        let src = try HTTPSource(config: config("http://nonexistent.invalid:8080/x"))
        let sink = src.fetchBlocking(offset: 0, length: 4096, timeout: 60)
        let e = try XCTUnwrap(failure(sink.result), "\(String(describing: sink.result))")
        XCTAssertEqual(e.reason, .connectFailed, "\(e)")
        XCTAssertEqual(e.attempts, 3, "\(e)")
        XCTAssertEqual(src.stats.retries, 2)
        XCTAssertEqual(src.stats.errors, 1)
        XCTAssertTrue(e.description.contains("nonexistent.invalid"), e.description)
        // The probe (at `add`) retries it too, then gives one error.
        let probe = try HTTPSource(config: config("http://nonexistent.invalid:8080/x"))
        XCTAssertThrowsError(try probe.probeBlocking(timeout: 60)) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .connectFailed)
            XCTAssertEqual((error as? HTTPError)?.attempts, 3)
        }
        XCTAssertEqual(probe.stats.retries, 2)
    }

    func testTLSHandshakeResetIsRetriedThenFails() throws {
        let listener = try ResettingListener()
        defer { listener.stop() }
        let src = try HTTPSource(config: config("https://127.0.0.1:\(listener.port)/image"))
        let sink = src.fetchBlocking(offset: 0, length: 4096, timeout: 60)
        let e = try XCTUnwrap(failure(sink.result), "\(String(describing: sink.result))")
        XCTAssertEqual(e.attempts, 3, "\(e)")
        XCTAssertEqual(src.stats.retries, 2)
        XCTAssertEqual(listener.accepted, 3, "one handshake per attempt")
        // A reset while waiting for the ServerHello is curl's SSL connect error.
        XCTAssertEqual(e.reason, .tls, "\(e)")
    }

    /// A refused connection is an answer at the probe (a prompt error at `add`),
    /// and a fault in passing mid-run (a server restarting): retried there.
    func testRefusedIsPromptAtProbeAndRetriedInAFetch() throws {
        let url = "http://127.0.0.1:\(freePort())/image"
        let probe = try HTTPSource(config: config(url))
        XCTAssertThrowsError(try probe.probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .connectFailed)
            XCTAssertEqual((error as? HTTPError)?.attempts, 1)
        }
        let src = try HTTPSource(config: config(url))
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertEqual(failure(sink.result)?.reason, .connectFailed)
        XCTAssertEqual(failure(sink.result)?.attempts, 3)
        XCTAssertEqual(src.stats.retries, 2)
    }

    /// A certificate that does not verify is not a fault in passing: one attempt.
    func testCertificateFailureIsNotRetried() throws {
        let nginx = try NginxServer(image: makeImage(size: 1 << 16, seed: 5), tls: true)
        defer { nginx.stop() }
        let src = try HTTPSource(config: config(nginx.url))
        XCTAssertThrowsError(try src.probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .tls, "\(error)")
            XCTAssertEqual((error as? HTTPError)?.attempts, 1, "\(error)")
        }
        XCTAssertEqual(src.stats.retries, 0)
    }
}

/// Numbers and strings a source is given are bounded.
final class HTTPConfigBoundsTests: XCTestCase {
    func testTimeoutsThatWouldTrapAreRefused() {
        for t in [Double.infinity, -.infinity, .nan, 1e300, -1, 0.0000001] {
            var c = HTTPConfig(url: "http://h/x")
            c.requestTimeout = t
            XCTAssertThrowsError(try HTTPSource(config: c), "\(t)") { error in
                guard case .invalidConfig = (error as? HTTPError)?.reason else { return XCTFail("\(error)") }
            }
        }
        var c = HTTPConfig(url: "http://h/x")
        c.requestTimeout = 0 // no limit: allowed
        XCTAssertNoThrow(try HTTPSource(config: c))
    }

    func testLineBreaksInHeadersAndURLAreRefused() {
        for (url, headers) in [("http://h/x", ["X-A: b\r\nInjected: 1"]), ("http://h/x", ["X-A: b\nc"]),
                               ("http://h/x\r\nInjected: 1", []), ("http://h/x y", []), ("http://h/x", ["Bad Name: v"])] {
            var c = HTTPConfig(url: url)
            c.headers = headers
            XCTAssertThrowsError(try HTTPSource(config: c), "\(url) \(headers)") { error in
                guard case .invalidConfig(let why) = (error as? HTTPError)?.reason else { return XCTFail("\(error)") }
                XCTAssertFalse(why.contains("Injected"), why)
            }
        }
    }

    func testImageLargerThanTheLimitIsRefusedAtProbe() throws {
        let server = try FaultServer(image: makeImage(size: 1 << 20))
        defer { server.stop() }
        var c = HTTPConfig(url: server.url("mode=ok&id=toolarge"))
        c.maxImageSize = 1 << 19
        XCTAssertThrowsError(try HTTPSource(config: c).probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .imageTooLarge(size: 1 << 20, limit: 1 << 19), "\(error)")
        }
        var n = HTTPConfig(url: server.url("mode=nohead&id=toolarge2"))
        n.maxImageSize = 1 << 19
        XCTAssertThrowsError(try HTTPSource(config: n).probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .imageTooLarge(size: 1 << 20, limit: 1 << 19), "\(error)")
        }
        c.maxImageSize = 1 << 20
        XCTAssertEqual(try HTTPSource(config: c).probeBlocking().size, 1 << 20)
    }

    func testErrorsShowURLsRedacted() {
        let e = HTTPError(.status(403), url: "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKID&X-Amz-Signature=SECRETSIG",
                          status: 403, detail: "see http://u:pw@h/p?token=SECRETTOKEN.")
        XCTAssertFalse(e.description.contains("SECRETSIG"), e.description)
        XCTAssertFalse(e.description.contains("AKID"), e.description)
        XCTAssertFalse(e.description.contains("SECRETTOKEN"), e.description)
        XCTAssertFalse(e.description.contains("pw@"), e.description)
        XCTAssertTrue(e.description.hasPrefix("https://b.s3.amazonaws.com/k?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED: HTTP 403"),
                      e.description)
    }
}

/// Credentials (headers, a user and password) go only to the scheme, host and
/// port of the URL, whatever a redirect names; 127.0.0.2 is another host.
final class RedirectCredentialTests: XCTestCase {
    static let image = makeImage(size: 1 << 20, seed: 7)
    var named: FaultServer!
    var other: FaultServer!

    override func setUpWithError() throws {
        named = try FaultServer(image: Self.image)
        other = try FaultServer(image: Self.image, host: "127.0.0.2")
    }

    override func tearDown() {
        named?.stop()
        other?.stop()
    }

    /// A URL on `server` that redirects to `target`.
    func redirecting(_ server: FaultServer, to target: String, id: String, status: Int = 302) -> String {
        server.url("mode=redirect&status=\(status)&to=\(target.addingPercentEncoding(withAllowedCharacters: .alphanumerics)!)&id=\(id)")
    }

    func config(_ url: String) -> HTTPConfig {
        var c = HTTPConfig(url: url)
        c.headers = ["X-Secret: SECRETVALUE"]
        c.username = "me"
        c.password = "SECRETPW"
        c.retryBaseDelay = 0.01
        c.maxAttempts = 2
        return c
    }

    func testRedirectToAnotherHostIsFollowedWithoutCredentials() throws {
        let src = try HTTPSource(config: config(redirecting(named, to: other.url("mode=ok&id=dropB"), id: "dropA", status: 307)))
        XCTAssertEqual(try src.probeBlocking().size, UInt64(Self.image.count))
        let sink = src.fetchBlocking(offset: 4096, length: 8192)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, Self.image[4096..<12288])
        let asked = named.requests(id: "dropA")
        XCTAssertEqual(asked.map(\.method), ["HEAD", "GET"], "every request starts at the URL")
        XCTAssertTrue(asked.allSatisfy { $0.secret == "SECRETVALUE" && $0.auth != nil }, "\(asked)")
        let redirected = other.requests(id: "dropB")
        XCTAssertEqual(redirected.map(\.method), ["HEAD", "GET"])
        XCTAssertTrue(redirected.allSatisfy { $0.secret == nil && $0.auth == nil }, "credentials reached another host: \(redirected)")
    }

    func testRedirectToAnotherHostIsRefusedWhenAsked() throws {
        var c = config(redirecting(named, to: other.url("mode=ok&id=refB"), id: "refA"))
        c.redirectCredentials = .refuse
        let src = try HTTPSource(config: c)
        XCTAssertThrowsError(try src.probeBlocking()) { error in
            guard case .redirectRefused = (error as? HTTPError)?.reason else { return XCTFail("\(error)") }
            XCTAssertTrue("\(error)".contains("127.0.0.2"), "\(error)")
            XCTAssertFalse("\(error)".contains("SECRET"), "\(error)")
        }
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        guard case .redirectRefused = failure(sink.result)?.reason else { return XCTFail("\(String(describing: sink.result))") }
        XCTAssertEqual(sink.calls, 0)
        XCTAssertEqual(named.requests(id: "refA").count, 2, "a refused redirect is not retried")
        XCTAssertEqual(other.requests(id: "refB").count, 0)
    }

    func testSameOriginRedirectKeepsCredentials() throws {
        // A relative Location, resolved by curl against the URL.
        let src = try HTTPSource(config: config(redirecting(named, to: "/image?mode=ok&id=sameB", id: "sameA")))
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, Self.image[0..<4096])
        let hop = named.requests(id: "sameB")
        XCTAssertEqual(hop.map(\.range), ["bytes=0-4095"])
        XCTAssertEqual(hop.first?.secret, "SECRETVALUE")
        XCTAssertNotNil(hop.first?.auth)
    }

    func testHTTPSToHTTPRedirectOnTheSameHostGetsNoCredentials() throws {
        let tls = try FaultServer(image: Self.image, tls: true)
        defer { tls.stop() }
        var c = config(redirecting(tls, to: named.url("mode=ok&id=downB"), id: "downA"))
        c.caCertPath = tls.certificate
        let src = try HTTPSource(config: c)
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, Self.image[0..<4096])
        XCTAssertEqual(tls.requests(id: "downA").first?.secret, "SECRETVALUE")
        let clear = named.requests(id: "downB")
        XCTAssertEqual(clear.count, 1)
        XCTAssertNil(clear.first?.secret, "a header went out in clear text")
        XCTAssertNil(clear.first?.auth, "a password went out in clear text")
        c.redirectCredentials = .refuse
        let strict = try HTTPSource(config: c).fetchBlocking(offset: 0, length: 4096)
        guard case .redirectRefused = failure(strict.result)?.reason else { return XCTFail("\(String(describing: strict.result))") }
        XCTAssertEqual(named.requests(id: "downB").count, 1)
    }

    func testRedirectToAnotherSchemeIsRefused() throws {
        var c = HTTPConfig(url: redirecting(named, to: "ftp://127.0.0.1/image", id: "ftpA"))
        c.maxAttempts = 1
        let sink = try HTTPSource(config: c).fetchBlocking(offset: 0, length: 4096)
        guard case .redirectRefused = failure(sink.result)?.reason else { return XCTFail("\(String(describing: sink.result))") }
    }

    func testOriginIsSchemeHostAndPort() {
        XCTAssertEqual(HTTPSource.origin("https://Example.COM/x"), HTTPSource.origin("https://example.com:443/y?z=1"))
        XCTAssertEqual(HTTPSource.origin("http://u:p@h/x"), HTTPSource.origin("http://h:80/"))
        XCTAssertNotEqual(HTTPSource.origin("https://h/x"), HTTPSource.origin("http://h/x"))
        XCTAssertNotEqual(HTTPSource.origin("http://h:8080/x"), HTTPSource.origin("http://h/x"))
        XCTAssertNotEqual(HTTPSource.origin("http://127.0.0.1/x"), HTTPSource.origin("http://127.0.0.2/x"))
        XCTAssertNil(HTTPSource.origin("no scheme"))
        XCTAssertTrue(HTTPSource.hasUserInfo("http://u:p@h/x"))
        XCTAssertFalse(HTTPSource.hasUserInfo("http://h/x?a=b@c"))
    }
}

/// A 206 lacking the validator the image had at the probe proves nothing: its
/// bytes reach the caller only after a HEAD sees the same image.
final class PartialResponseValidatorTests: XCTestCase {
    static let image = makeImage(size: 1 << 20, seed: 11)
    var server: FaultServer!

    override func setUpWithError() throws { server = try FaultServer(image: Self.image) }
    override func tearDown() { server?.stop() }

    func source(_ query: String) throws -> HTTPSource {
        var c = HTTPConfig(url: server.url(query))
        c.retryBaseDelay = 0.01
        c.maxAttempts = 3
        return try HTTPSource(config: c)
    }

    func testBytesOfA206WithoutTheETagWaitForAHEADOfTheSameImage() throws {
        let src = try source("mode=novalidators&id=nv1")
        XCTAssertEqual(try src.probeBlocking().etag, "\"fixed-1\"")
        let sink = Sink(offset: 8192, length: 65536)
        var askedBeforeData: [String]?
        src.fetch(offset: 8192, length: 65536, onData: { [server] offset, bytes in
            if askedBeforeData == nil { askedBeforeData = server!.requests(id: "nv1").map(\.method) }
            return sink.handler(offset, bytes)
        }) { sink.result = $0 }
        src.runUntilIdle(timeout: 20)
        XCTAssertNil(failure(sink.result), "\(String(describing: sink.result))")
        assertBytes(sink.data, Self.image[8192..<73728])
        XCTAssertEqual(askedBeforeData, ["HEAD", "GET", "HEAD"], "bytes handed over before the image was checked again")
    }

    func testA206WithoutTheETagOfAChangedImageFailsAsAChangedImage() throws {
        let src = try source("mode=novalidators&changeafter=1&id=nv2")
        XCTAssertEqual(try src.probeBlocking().etag, "\"fixed-1\"")
        let sink = src.fetchBlocking(offset: 0, length: 4096)
        XCTAssertEqual(failure(sink.result)?.reason, .validatorChanged(expected: "\"fixed-1\"", got: "\"fixed-2\""))
        XCTAssertEqual(sink.calls, 0, "bytes of a changed image were delivered")
    }

    func testConcurrent206sWithoutTheETagAreAllCheckedAndDelivered() throws {
        let src = try source("mode=novalidators&id=nv3")
        _ = try src.probeBlocking()
        let n = 131_072
        let sinks = (0..<4).map { Sink(offset: UInt64($0 * n), length: n) }
        for s in sinks { src.fetch(offset: s.base, length: n, onData: s.handler) { s.result = $0 } }
        src.runUntilIdle(timeout: 20)
        for (i, s) in sinks.enumerated() {
            XCTAssertNil(failure(s.result), "\(String(describing: s.result))")
            assertBytes(s.data, Self.image[i * n..<(i + 1) * n])
        }
        let checks = server.requests(id: "nv3").filter { $0.method == "HEAD" }.count - 1
        XCTAssertTrue((1...4).contains(checks), "\(checks) HEADs after the probe")
        XCTAssertTrue(src.isIdle)
    }
}
