import PageCache
import XCTest
@testable import UblkTarget

/// The http target's planner settings against the bound: a cold 64 MiB
/// sequential read needs at most 64 MiB / 4 MiB + 4 range requests.
final class HTTPPlanningTests: XCTestCase {
    func runsForSequentialRead(total: Int, readSize: Int) -> Int {
        let o = HTTPTargetOptions(http: .init(url: "http://x/y"), cachePath: "/c", bitmapPath: "/b")
        let planner = HTTPTarget.makePlanner(o, imageSize: 1 << 30)
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
}
