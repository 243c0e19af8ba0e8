import Foundation
import XCTest
@testable import PageCache

/// The cache stack as the `http` target wires it (bitmap + cache file +
/// planner + source), driven by `runUntilIdle` instead of a ublk queue.
final class MiniTarget {
    let source: HTTPSource
    let planner: FetchPlanner
    let bitmap: Bitmap
    let cache: CacheFile
    var satisfied: [UInt64] = []
    var failed: [UInt64] = []
    var runsStarted: [FetchRun] = []
    let pageSize: Int

    init(source: HTTPSource, dir: TempDir, size: UInt64, pageSize: Int = 4096,
         maxRunBytes: Int = 4 << 20, initialReadahead: Int = 0, maxReadahead: Int = 0) throws {
        self.source = source
        self.pageSize = pageSize
        planner = FetchPlanner(imageSize: size, pageSize: pageSize, maxRunBytes: maxRunBytes,
                               initialReadaheadBytes: initialReadahead, maxReadaheadBytes: maxReadahead)
        let id = BitmapIdentity(pageSize: pageSize, imageSize: size, url: source.url,
                                etag: source.expected?.etag, lastModified: source.expected?.lastModified)
        bitmap = try Bitmap.open(path: dir.file("bitmap"), identity: id).bitmap
        cache = try CacheFile(path: dir.file("cache"), size: size)
    }

    /// Plans a read; returns true on a hit.
    @discardableResult
    func read(_ offset: UInt64, _ length: Int, tag: UInt64) -> Bool {
        let plan = planner.plan(offset: offset, length: length, context: tag, present: bitmap.bits)
        return plan.isHit
    }

    func startRuns() {
        for run in planner.startableRuns() {
            runsStarted.append(run)
            var written = 0
            source.fetch(offset: run.offset, length: run.length, onData: { [unowned self] offset, bytes in
                do { try cache.write(bytes, at: offset) } catch { return false }
                let before = written / pageSize
                written += bytes.count
                let after = written == run.length ? Int(run.pageCount) : written / pageSize
                if after > before {
                    bitmap.markPresent(run.firstPage + UInt64(before)..<run.firstPage + UInt64(after))
                    record(planner.progress(run: run.id, pagesDone: UInt64(after)))
                }
                return true
            }, completion: { [unowned self] result in
                if case .success = result {
                    bitmap.markPresent(run.firstPage..<run.firstPage + run.pageCount)
                }
                record(planner.complete(run: run.id, success: (try? result.get()) != nil))
                startRuns()
            })
        }
    }

    func record(_ o: RunOutcome) {
        satisfied += o.satisfied
        failed += o.failed
    }

    func drain() {
        startRuns()
        source.runUntilIdle(timeout: 20)
    }

    func bytes(_ offset: UInt64, _ length: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: length)
        _ = try out.withUnsafeMutableBytes { try cache.read(into: $0.baseAddress!, count: length, at: offset) }
        return out
    }
}

final class NginxIntegrationTests: XCTestCase {
    static let image = makeImage(size: 12 << 20, seed: 42)
    var nginx: NginxServer!
    var dir: TempDir!
    var image: [UInt8] { Self.image }

    override func setUpWithError() throws {
        nginx = try NginxServer(image: Self.image)
        dir = TempDir()
    }

    override func tearDown() {
        nginx?.stop()
        nginx = nil
        dir = nil
    }

    func gets() -> [String?] { nginx.requests().filter { $0.method == "GET" }.map(\.range) }

    func testProbeAndFetchFromNginx() throws {
        let src = try HTTPSource(config: HTTPConfig(url: nginx.url))
        let info = try src.probeBlocking()
        XCTAssertEqual(info.size, UInt64(image.count))
        XCTAssertTrue(info.fromHead)
        XCTAssertFalse(info.multiplexed, "plain http: HTTP/1.1, one request per connection")
        XCTAssertNotNil(info.etag)
        XCTAssertNotNil(info.lastModified)
        let sink = src.fetchBlocking(offset: 5 << 20, length: 3 << 20)
        XCTAssertNil(failure(sink.result))
        assertBytes(sink.data, image[(5 << 20)..<(8 << 20)])
        XCTAssertEqual(nginx.requests().map(\.method), ["HEAD", "GET"])
        XCTAssertEqual(gets(), ["bytes=5242880-8388607"])
        // The last partial range of the image.
        let tail = src.fetchBlocking(offset: UInt64(image.count - 1000), length: 1000)
        XCTAssertNil(failure(tail.result))
        assertBytes(tail.data, image[(image.count - 1000)...])
    }

    func testManyConcurrentFetchesShareBoundedConnections() throws {
        var config = HTTPConfig(url: nginx.url)
        config.maxConnections = 3
        let src = try HTTPSource(config: config)
        _ = try src.probeBlocking()
        var sinks: [Sink] = []
        for i in 0..<24 {
            let off = UInt64(i) * 500_000
            let sink = Sink(offset: off, length: 100_000 + i)
            src.fetch(offset: off, length: 100_000 + i, onData: sink.handler) { sink.result = $0 }
            sinks.append(sink)
        }
        XCTAssertTrue(src.runUntilIdle(timeout: 20))
        for (i, s) in sinks.enumerated() {
            XCTAssertNil(failure(s.result))
            assertBytes(s.data, image[(i * 500_000)..<(i * 500_000 + 100_000 + i)])
        }
        XCTAssertEqual(gets().count, 24)
        XCTAssertEqual(src.stats.requests, 25)
        let connections = Set(nginx.requests().map(\.connection))
        XCTAssertLessThanOrEqual(connections.count, 3, "at most maxConnections connections, kept alive")
        XCTAssertGreaterThanOrEqual(connections.count, 1)
    }

    /// Coalescing and dedup, proven by nginx's own access log.
    func testConcurrentReadsCoalesceAndDedup() throws {
        let src = try HTTPSource(config: HTTPConfig(url: nginx.url))
        _ = try src.probeBlocking()
        let t = try MiniTarget(source: src, dir: dir, size: UInt64(image.count))
        let k = 1024
        // All planned before any run starts (as one event-loop turn would).
        XCTAssertFalse(t.read(0, 64 * k, tag: 1))
        XCTAssertFalse(t.read(64 * 1024, 64 * k, tag: 2))          // adjacent: extends run 1
        XCTAssertFalse(t.read(32 * 1024, 64 * k, tag: 3))          // inside: dedup
        XCTAssertFalse(t.read(1 << 20, 4 * k, tag: 4))             // separate
        XCTAssertFalse(t.read((1 << 20) + 2048, 4 * k, tag: 5))    // unaligned, overlaps 4 and the next page
        t.drain()
        XCTAssertEqual(Set(t.satisfied), [1, 2, 3, 4, 5])
        XCTAssertEqual(t.failed, [])
        XCTAssertEqual(Set(gets()), ["bytes=0-131071", "bytes=1048576-1056767"])
        XCTAssertEqual(gets().count, 2)
        // While a run is in flight, a read inside it does not fetch again.
        XCTAssertFalse(t.read(4 << 20, 1 << 20, tag: 6))
        t.startRuns()
        XCTAssertFalse(t.read((4 << 20) + 4096, 4 * k, tag: 7))
        t.drain()
        XCTAssertEqual(Set(t.satisfied), [1, 2, 3, 4, 5, 6, 7])
        XCTAssertEqual(gets().count, 3)
        XCTAssertEqual(gets().last, "bytes=4194304-5242879")
        // Everything read is now a hit, with the right bytes, and costs no request.
        for (off, len) in [(0, 128 * k), (1 << 20, 8 * k), (4 << 20, 1 << 20)] {
            XCTAssertTrue(t.read(UInt64(off), len, tag: 99))
            assertBytes(try t.bytes(UInt64(off), len), image[off..<off + len])
        }
        XCTAssertEqual(gets().count, 3)
        // Persist and reopen: the same pages are present.
        try t.bitmap.commit(syncing: t.cache)
        let count = t.bitmap.count
        XCTAssertEqual(count, 32 + 2 + 256)
        let info = try Bitmap.inspect(path: dir.file("bitmap"))
        XCTAssertEqual(info.present, count)
        XCTAssertEqual(info.identity.etag, src.expected?.etag)
    }

    func testLargeReadIsSplitAtTheRunCap() throws {
        let src = try HTTPSource(config: HTTPConfig(url: nginx.url))
        _ = try src.probeBlocking()
        let t = try MiniTarget(source: src, dir: dir, size: UInt64(image.count))
        t.read(0, 10 << 20, tag: 1)
        t.drain()
        XCTAssertEqual(t.satisfied, [1])
        XCTAssertEqual(Set(gets()), ["bytes=0-4194303", "bytes=4194304-8388607", "bytes=8388608-10485759"])
        XCTAssertEqual(gets().count, 3)
        assertBytes(try t.bytes(0, 10 << 20), image[0..<(10 << 20)])
    }

    func testSequentialReadsTriggerReadahead() throws {
        let src = try HTTPSource(config: HTTPConfig(url: nginx.url))
        _ = try src.probeBlocking()
        let t = try MiniTarget(source: src, dir: dir, size: UInt64(image.count),
                               initialReadahead: 128 << 10, maxReadahead: 1 << 20)
        var hits = 0
        for i in 0..<16 {
            if t.read(UInt64(i) * (128 << 10), 128 << 10, tag: UInt64(i)) { hits += 1 }
            t.drain()
        }
        XCTAssertEqual(t.satisfied, [0, 1], "reads 2... are hits thanks to readahead")
        XCTAssertEqual(t.failed, [])
        // Worked out in FetchPlanner's terms (pages of 4 KiB): runs 0..<32, 32..<96,
        // 96..<160, 160..<256, 256..<416, then refills at reads 9 and 14.
        XCTAssertEqual(gets(), [
            "bytes=0-131071", "bytes=131072-393215", "bytes=393216-655359", "bytes=655360-1048575",
            "bytes=1048576-1703935", "bytes=1703936-2359295", "bytes=2359296-3014655",
        ])
        XCTAssertEqual(hits, 14)
        assertBytes(try t.bytes(0, 2 << 20), image[0..<(2 << 20)])
    }
}

final class NginxTLSTests: XCTestCase {
    func testVerificationHTTP2AndTheTwoWaysAround() throws {
        let image = makeImage(size: 1 << 20, seed: 3)
        let nginx = try NginxServer(image: image, tls: true)
        defer { nginx.stop() }
        // Verification is on by default: a self-signed certificate is refused, typed.
        let strict = try HTTPSource(config: HTTPConfig(url: nginx.url))
        XCTAssertThrowsError(try strict.probeBlocking()) { error in
            XCTAssertEqual((error as? HTTPError)?.reason, .tls, "\(error)")
        }
        XCTAssertEqual(nginx.requests().count, 0)
        // Trusting the certificate (--cacert): HTTP/2, exact bytes.
        var config = HTTPConfig(url: nginx.url)
        config.caCertPath = nginx.certificate
        let trusted = try HTTPSource(config: config)
        let probed = try trusted.probeBlocking()
        XCTAssertEqual(probed.size, 1 << 20)
        XCTAssertTrue(probed.multiplexed, "h2 offered over TLS: requests are streams")
        let sink = trusted.fetchBlocking(offset: 1000, length: 300_000)
        XCTAssertNil(failure(sink.result))
        assertBytes(sink.data, image[1000..<301_000])
        XCTAssertEqual(nginx.requests().map(\.proto), ["HTTP/2.0", "HTTP/2.0"])
        // --insecure.
        var loose = HTTPConfig(url: nginx.url)
        loose.insecure = true
        XCTAssertEqual(try HTTPSource(config: loose).probeBlocking().size, 1 << 20)
    }

    /// Over HTTP/2, many fetches in flight share few connections as streams.
    func testFetchesInFlightOverHTTP2AreStreamsOnOneConnection() throws {
        let image = makeImage(size: 4 << 20, seed: 5)
        let nginx = try NginxServer(image: image, tls: true)
        defer { nginx.stop() }
        var config = HTTPConfig(url: nginx.url)
        config.caCertPath = nginx.certificate
        config.maxConnections = 2
        let src = try HTTPSource(config: config)
        XCTAssertTrue(try src.probeBlocking().multiplexed)
        var sinks: [Sink] = []
        for i in 0..<32 {
            let sink = Sink(offset: UInt64(i) * 100_000, length: 4096)
            src.fetch(offset: UInt64(i) * 100_000, length: 4096, onData: sink.handler) { sink.result = $0 }
            sinks.append(sink)
        }
        XCTAssertTrue(src.runUntilIdle(timeout: 20))
        for (i, s) in sinks.enumerated() {
            XCTAssertNil(failure(s.result))
            assertBytes(s.data, image[(i * 100_000)..<(i * 100_000 + 4096)])
        }
        let gets = nginx.requests().filter { $0.method == "GET" }
        XCTAssertEqual(gets.count, 32)
        XCTAssertTrue(gets.allSatisfy { $0.proto == "HTTP/2.0" })
        XCTAssertLessThanOrEqual(Set(gets.map(\.connection)).count, 2, "32 in flight over at most 2 connections")
    }
}

final class FaultIntegrationTests: XCTestCase {
    func testFailedRunFailsItsReadersAndRetriedRunSatisfiesThem() throws {
        let image = makeImage(size: 1 << 20, seed: 7)
        let server = try FaultServer(image: image)
        defer { server.stop() }
        let dir = TempDir()
        // 503 twice, then fine: readers are satisfied, three GETs in all.
        var config = HTTPConfig(url: server.url("mode=5xx&n=2&id=integration"))
        config.retryBaseDelay = 0.01
        let src = try HTTPSource(config: config)
        src.expected = RemoteImage(effectiveURL: src.url, size: UInt64(image.count), etag: "\"fixed-1\"")
        let t = try MiniTarget(source: src, dir: dir, size: UInt64(image.count))
        t.read(0, 8192, tag: 1)
        t.read(8192, 8192, tag: 2)
        t.drain()
        XCTAssertEqual(t.satisfied, [1, 2])
        XCTAssertEqual(server.requests(id: "integration").map(\.status), [503, 503, 206])
        assertBytes(try t.bytes(0, 16384), image[0..<16384])

        // A source that always fails: each reader fails exactly once, no page is marked.
        var bad = HTTPConfig(url: server.url("mode=missing&id=integration-missing"))
        bad.retryBaseDelay = 0.01
        let src2 = try HTTPSource(config: bad)
        let dir2 = TempDir()
        let t2 = try MiniTarget(source: src2, dir: dir2, size: UInt64(image.count))
        t2.read(0, 4096, tag: 1)
        t2.read(0, 8192, tag: 2)
        t2.drain()
        XCTAssertEqual(t2.satisfied, [])
        XCTAssertEqual(Set(t2.failed), [1, 2])
        XCTAssertEqual(t2.failed.count, 2)
        XCTAssertEqual(t2.bitmap.count, 0)
        XCTAssertEqual(server.requests(id: "integration-missing").count, 1)
    }
}
