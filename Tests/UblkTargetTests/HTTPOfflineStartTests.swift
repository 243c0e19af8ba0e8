import FoundationEssentials
import Glibc
import XCTest
@testable import PageCache
@testable import UblkTarget

/// An http device whose remote cannot be reached starts from a complete cache
/// (every page present, the bitmap this URL's) and from nothing less.
final class HTTPOfflineStartTests: XCTestCase {
    /// Nothing listens on port 1: the probe's connection is refused.
    let url = "http://127.0.0.1:1/disk.img"
    let imageSize = 5 * 4096 + 1000
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "/http-offline-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// A cache of `cacheURL`'s image holding `present` of its pages; returns the image.
    @discardableResult
    func makeCache(present: Range<UInt64>, cacheURL: String? = nil) throws -> [UInt8] {
        let image = (0..<imageSize).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let id = BitmapIdentity(kind: .present, pageSize: 4096, imageSize: UInt64(imageSize),
                                url: HTTPTarget.identityURL(cacheURL ?? url), etag: "\"v1\"",
                                lastModified: "Mon, 07 Dec 2026 04:00:00 GMT")
        let store = try CacheStore.open(CacheStoreSpec(cachePath: dir + "/c", bitmapPath: dir + "/b", identity: id))
        for p in present {
            let from = Int(p) * 4096, to = min(from + 4096, imageSize)
            try image[from..<to].withUnsafeBytes { try store.cache.write($0, at: UInt64(from)) }
        }
        store.present.markPresent(present)
        try store.present.commit(syncing: store.cache)
        return image
    }

    func options() -> HTTPTargetOptions {
        var o = HTTPTargetOptions(http: HTTPConfig(url: url), cachePath: dir + "/c", bitmapPath: dir + "/b")
        o.liveState = nil
        return o
    }

    func probeError(_ body: () throws -> Void) -> String {
        do { try body(); return "started" } catch { return "\(error)" }
    }

    func testACompleteCacheServesWhenTheRemoteIsUnreachable() throws {
        let image = try makeCache(present: 0..<6)
        let t = try HTTPTarget(options())
        XCTAssertEqual(t.remote.size, UInt64(imageSize), "the image size the bitmap records")
        XCTAssertEqual(t.remote.etag, "\"v1\"")
        XCTAssertEqual(t.remote.lastModified, "Mon, 07 Dec 2026 04:00:00 GMT")
        XCTAssertEqual(t.options["cache_state"], "reused")
        XCTAssertEqual(t.options["etag"], "\"v1\"")
        XCTAssertEqual(t.options["remote"], "unreachable, serving the complete cache")
        XCTAssertEqual(t.params.size, UInt64(imageSize + 512 - imageSize % 512))
        var page = [UInt8](repeating: 0, count: 4096)
        _ = page.withUnsafeMutableBytes { pread(t.device.store.cache.fd, $0.baseAddress, 4096, 4096) }
        XCTAssertEqual(page, Array(image[4096..<8192]), "the cache was kept, not started afresh")
    }

    func testAMissingPageKeepsTheProbeError() throws {
        try makeCache(present: 0..<5)
        let e = probeError { _ = try HTTPTarget(options()) }
        XCTAssertTrue(e.contains("cannot connect"), e)
        XCTAssertFalse(e.contains("\n"), e)
        let info = try Bitmap.inspect(path: dir + "/b")
        XCTAssertEqual(info.present, 5, "the cache is left as it was")
    }

    func testACompleteCacheOfAnotherURLIsNotServed() throws {
        try makeCache(present: 0..<6, cacheURL: "http://127.0.0.1:1/other.img")
        let e = probeError { _ = try HTTPTarget(options()) }
        XCTAssertTrue(e.contains("cannot connect"), e)
    }

    func testACompleteCacheOfAnotherPageSizeIsNotServed() throws {
        try makeCache(present: 0..<6)
        var o = options()
        o.pageSize = 8192
        let e = probeError { _ = try HTTPTarget(o) }
        XCTAssertTrue(e.contains("cannot connect"), e)
    }

    func testAReachableRemoteIsStillProbed() {
        // An answer that is not a connection failure is never replaced by the cache.
        XCTAssertTrue(HTTPTarget.isUnreachable(HTTPError(.connectFailed, url: url)))
        XCTAssertTrue(HTTPTarget.isUnreachable(HTTPError(.timedOut, url: url)))
        XCTAssertTrue(HTTPTarget.isUnreachable(HTTPError(.status(503), url: url)))
        XCTAssertFalse(HTTPTarget.isUnreachable(HTTPError(.status(404), url: url)))
        XCTAssertFalse(HTTPTarget.isUnreachable(HTTPError(.status(403), url: url)))
        XCTAssertFalse(HTTPTarget.isUnreachable(HTTPError(.validatorChanged(expected: "a", got: "b"), url: url)))
        XCTAssertFalse(HTTPTarget.isUnreachable(HTTPError(.sizeChanged(expected: 1, got: 2), url: url)))
    }
}
