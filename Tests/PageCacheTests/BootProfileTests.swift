import PageCache
import XCTest

final class BootProfileTests: XCTestCase {
    func sample(_ runs: [Range<UInt64>] = [8..<9, 0..<2, 520..<536]) -> BootProfile {
        BootProfile(url: "http://h/img?sig=REDACTED", imageSize: 8 << 20, etag: "\"abc\"", lastModified: "Mon, 01 Jan 2024 00:00:00 GMT",
                    pageSize: 4096, runs: runs)
    }

    func text(_ p: BootProfile) -> String { String(decoding: p.encoded(), as: UTF8.self) }

    func decode(_ s: String) throws -> BootProfile { try BootProfile.decode(Array(s.utf8)) }

    func testRoundTripKeepsOrderAndIdentity() throws {
        let p = sample()
        let back = try BootProfile.decode(p.encoded())
        XCTAssertEqual(back, p)
        XCTAssertEqual(back.runs, [8..<9, 0..<2, 520..<536])
        XCTAssertEqual(back.pageCount, 19)
        XCTAssertTrue(text(p).contains("\"format\":\"ublk-http-profile\""))
        XCTAssertTrue(text(p).contains("\"runs\":[[8,1],[0,2],[520,16]]"))
        XCTAssertTrue(text(p).hasSuffix("\n"))
    }

    func testMalformedProfilesAreRefused() {
        let good = text(sample())
        let bad = [
            "",
            "not json",
            "{}",
            good.replacingOccurrences(of: "\"version\":1", with: "\"version\":2"),
            good.replacingOccurrences(of: "ublk-http-profile", with: "something-else"),
            good.replacingOccurrences(of: "\"page_size\":4096", with: "\"page_size\":3000"),
            good.replacingOccurrences(of: "\"pages\":19", with: "\"pages\":20"),
            good.replacingOccurrences(of: "[520,16]", with: "[2047,2]"),   // past the image's 2048 pages
            good.replacingOccurrences(of: "[520,16]", with: "[520,0]"),
            good.replacingOccurrences(of: "[520,16]", with: "[520]"),
            good.replacingOccurrences(of: "[520,16]", with: "[-1,16]"),
        ]
        for s in bad {
            XCTAssertThrowsError(try decode(s), s) { e in
                XCTAssertFalse("\(e)".contains("\n"))
                XCTAssertFalse("\(e)".isEmpty)
            }
        }
        XCTAssertThrowsError(try BootProfile.decode([UInt8](repeating: 32, count: BootProfile.maxFileBytes + 1)))
    }

    func testAnotherImageIsRefused() {
        let p = sample()
        XCTAssertNil(p.mismatch(url: "http://other/img", imageSize: 8 << 20, etag: "\"abc\"", lastModified: "Mon, 01 Jan 2024 00:00:00 GMT"))
        XCTAssertNotNil(p.mismatch(url: p.url, imageSize: 8 << 20, etag: "\"abd\"", lastModified: p.lastModified))
        XCTAssertNotNil(p.mismatch(url: p.url, imageSize: 8 << 20, etag: "\"abc\"", lastModified: "Tue, 02 Jan 2024 00:00:00 GMT"))
        XCTAssertNotNil(p.mismatch(url: p.url, imageSize: 4 << 20, etag: p.etag, lastModified: p.lastModified))
        XCTAssertNotNil(p.mismatch(url: p.url, imageSize: 8 << 20, etag: nil, lastModified: p.lastModified))
        // No validators on either side: only the URL can tell.
        let bare = BootProfile(url: "http://h/a", imageSize: 8 << 20, etag: "", lastModified: nil, pageSize: 4096, runs: [0..<1])
        XCTAssertNil(bare.mismatch(url: "http://h/a", imageSize: 8 << 20, etag: "", lastModified: ""))
        XCTAssertNotNil(bare.mismatch(url: "http://h/b", imageSize: 8 << 20, etag: nil, lastModified: nil))
        XCTAssertTrue(p.mismatch(url: p.url, imageSize: 8 << 20, etag: "x", lastModified: nil)!.contains("another image"))
    }

    func testRecorderKeepsFirstTouchesInOrderCoalesced() {
        let r = ProfileRecorder(pageCount: 100)
        r.touch(10..<12, now: 0)
        r.touch(12..<14, now: 0)   // continues the last run
        r.touch(0..<1, now: 0)
        r.touch(10..<20, now: 0)   // 10..<14 seen: only 14..<20, which does not continue 0..<1
        r.touch(0..<1, now: 0)     // seen
        r.touch(95..<120, now: 0)  // clamped to the image
        XCTAssertEqual(r.runs, [10..<14, 0..<1, 14..<20, 95..<100])
        XCTAssertEqual(r.pages, 16)
        XCTAssertTrue(r.isRecording)
        r.stop()
        r.touch(50..<60, now: 0)
        XCTAssertEqual(r.pages, 16)
        XCTAssertEqual(r.ended, .stopped)
    }

    func testRecorderAgainstABitsetModel() {
        // Random reads: the runs must be exactly the first touches, in order.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            let n = UInt64.random(in: 50...400, using: &rng)
            let r = ProfileRecorder(pageCount: n)
            var seen = [Bool](repeating: false, count: Int(n))
            var expected: [UInt64] = []
            for _ in 0..<200 {
                let a = UInt64.random(in: 0..<n, using: &rng)
                let b = min(n + 5, a + UInt64.random(in: 1...20, using: &rng))
                r.touch(a..<b, now: 0)
                for p in a..<min(b, n) where !seen[Int(p)] { seen[Int(p)] = true; expected.append(p) }
            }
            XCTAssertEqual(r.runs.flatMap { Array($0) }, expected)
            XCTAssertEqual(r.pages, UInt64(expected.count))
            for (x, y) in zip(r.runs, r.runs.dropFirst()) { XCTAssertNotEqual(x.upperBound, y.lowerBound, "unmerged runs") }
        }
    }

    func testRecorderMemoryDoesNotGrowWithTheImage() {
        // 2^32 pages (16 TiB at 4 KiB): nothing proportional to it is allocated.
        let r = ProfileRecorder(pageCount: 1 << 32)
        r.touch((1 << 32) - 2..<(1 << 32), now: 0)
        r.touch(0..<1, now: 0)
        XCTAssertEqual(r.runs, [(1 << 32) - 2..<(1 << 32), 0..<1])
    }

    func testRecorderBounds() {
        let pages = ProfileRecorder(pageCount: 100, maxPages: 5)
        pages.touch(0..<3, now: 0)
        pages.touch(10..<20, now: 0)
        XCTAssertEqual(pages.runs, [0..<3, 10..<12])
        XCTAssertEqual(pages.ended, .pages)

        let runs = ProfileRecorder(pageCount: 100, maxRuns: 2)
        runs.touch(0..<1, now: 0)
        runs.touch(5..<6, now: 0)
        runs.touch(9..<10, now: 0)
        XCTAssertEqual(runs.runs, [0..<1, 5..<6])
        XCTAssertEqual(runs.ended, .runs)

        let time = ProfileRecorder(pageCount: 100, deadline: 1000)
        time.touch(0..<1, now: 999)
        time.touch(5..<6, now: 1000)
        XCTAssertEqual(time.runs, [0..<1])
        XCTAssertEqual(time.ended, .seconds)
        let idle = ProfileRecorder(pageCount: 100, deadline: 1000)
        idle.check(now: 2000)
        XCTAssertEqual(idle.ended, .seconds)
    }

    func testReplayCoalescesManySmallRunsIntoFewRanges() {
        // A boot-like profile: 400 scattered single pages, every third page of 0..<1200, read backwards.
        let runs = stride(from: 1197, through: 0, by: -3).map { UInt64($0)..<UInt64($0) + 1 }
        let p = BootProfile(url: "u", imageSize: 64 << 20, etag: "e", lastModified: nil, pageSize: 4096, runs: runs)
        let ranges = p.replayRanges(targetPageSize: 4096)
        // 1200 pages = 4.7 MiB: two ranges of at most 4 MiB (1024 pages).
        XCTAssertEqual(ranges, [0..<1024, 1024..<1198])
        // Nothing of the profile is left out.
        for r in runs { XCTAssertTrue(ranges.contains { $0.contains(r.lowerBound) }) }
    }

    func testReplayKeepsRecordedOrderAcrossWindows() {
        // Far apart runs (no gap merge), windows of 2 pages: each window in recorded order.
        let runs: [Range<UInt64>] = [1000..<1001, 10..<11, 5000..<5001, 20..<21]
        let p = BootProfile(url: "u", imageSize: 64 << 20, etag: "e", lastModified: nil, pageSize: 4096, runs: runs)
        let ranges = p.replayRanges(targetPageSize: 4096, gapBytes: 0, windowBytes: 2 * 4096)
        XCTAssertEqual(ranges, [10..<11, 1000..<1001, 20..<21, 5000..<5001])
    }

    func testReplayInAnotherPageSize() {
        // 512-byte pages 9..<10 = bytes 4608..<5120: the 4096-byte page 1.
        let p = BootProfile(url: "u", imageSize: 10_000, etag: "e", lastModified: nil, pageSize: 512, runs: [9..<10, 18..<20])
        XCTAssertEqual(p.replayRanges(targetPageSize: 4096, gapBytes: 0), [1..<3])
        // The image's last partial page.
        let q = BootProfile(url: "u", imageSize: 10_000, etag: "e", lastModified: nil, pageSize: 4096, runs: [2..<3])
        XCTAssertEqual(q.replayRanges(targetPageSize: 512, gapBytes: 0), [16..<20])
    }
}
