import PageCache
import XCTest
@testable import UblkTarget

/// The http target's planner settings against the bound: a cold 64 MiB
/// sequential read needs at most 64 MiB / 4 MiB + 4 range requests.
final class HTTPPlanningTests: XCTestCase {
    func runsForSequentialRead(total: Int, readSize: Int) -> Int {
        let o = HTTPTargetOptions(http: .init(url: "http://x/y"), cachePath: "/c", bitmapPath: "/b")
        let planner = HTTPTarget.makePlanner(o, remote: RemoteImage(effectiveURL: "http://x/y", size: 1 << 30))
        let bits = PageBits(pageCount: (1 << 30) / 4096)
        var runs = 0
        var offset = 0
        while offset < total {
            _ = planner.plan(offset: UInt64(offset), length: readSize, context: 1, present: bits)
            // A reader at queue depth 1: every started run completes before the next read.
            for run in planner.startableRuns() {
                runs += 1
                XCTAssertLessThanOrEqual(run.length, 4 << 20)
                bits.set(run.firstPage..<run.firstPage + run.pageCount)
                _ = planner.complete(run: run.id, success: true)
            }
            offset += readSize
        }
        return runs
    }

    func testColdSequentialReadUsesFewRequests() {
        // The kernel splits 1 MiB reads into 512 KiB requests (max_sectors).
        let n = runsForSequentialRead(total: 64 << 20, readSize: 512 << 10)
        XCTAssertLessThanOrEqual(n, 64 / 4 + 4, "runs: \(n)")
        XCTAssertGreaterThanOrEqual(n, 16)
    }

    func testSmallSequentialReadsAlsoCoalesce() {
        let n = runsForSequentialRead(total: 64 << 20, readSize: 128 << 10)
        XCTAssertLessThanOrEqual(n, 64 / 4 + 6, "runs: \(n)")
    }

    /// Fetches in flight: --streams where the server multiplexes (HTTP/2), else one per connection.
    func testRunsInFlightAreStreamsOverHTTP2AndConnectionsOverHTTP1() {
        var o = HTTPTargetOptions(http: .init(url: "https://x/y"), cachePath: "/c", bitmapPath: "/b")
        o.http.maxConnections = 4
        o.http.maxStreams = 48
        var remote = RemoteImage(effectiveURL: "https://x/y", size: 1 << 30)
        XCTAssertEqual(HTTPTarget.makePlanner(o, remote: remote).maxActiveRuns, 4)
        remote.multiplexed = true
        XCTAssertEqual(HTTPTarget.makePlanner(o, remote: remote).maxActiveRuns, 48)
        XCTAssertEqual(RemoteImage(effectiveURL: "u", size: 1), remote.withSize(1), "multiplexing is not part of the image")
    }
}

private extension RemoteImage {
    func withSize(_ s: UInt64) -> RemoteImage {
        var r = self
        r.size = s
        r.effectiveURL = "u"
        return r
    }
}
