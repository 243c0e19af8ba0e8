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
        XCTAssertNil(p.mismatch(url: p.url, imageSize: 8 << 20, etag: "\"abc\"", lastModified: "Mon, 01 Jan 2024 00:00:00 GMT"))
        // Another image's identity (another URL, or a query value that differs), whatever its validators.
        XCTAssertNotNil(p.mismatch(url: "http://other/img", imageSize: 8 << 20, etag: "\"abc\"", lastModified: "Mon, 01 Jan 2024 00:00:00 GMT"))
        XCTAssertNotNil(p.mismatch(url: ImageIdentity.of("http://h/download?id=b"), imageSize: 8 << 20, etag: p.etag, lastModified: p.lastModified))
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

    // MARK: Hostile numbers: each a thrown one-line error, never a trap

    /// A profile's JSON with these fields replaced (raw JSON values).
    func profileJSON(imageSize: String = "8388608", pageSize: String = "4096", pages: String = "1",
                     runs: String = "[[0,1]]") -> String {
        "{\"format\":\"ublk-http-profile\",\"version\":1,\"url\":\"u\",\"image_size\":\(imageSize),"
            + "\"page_size\":\(pageSize),\"pages\":\(pages),\"runs\":\(runs)}"
    }

    func expectOneLineError(_ json: String, _ pattern: String, line: UInt = #line) {
        XCTAssertThrowsError(try decode(json), line: line) { e in
            let text = "\(e)"
            XCTAssertFalse(text.contains("\n"), "one line: \(text)", line: line)
            XCTAssertTrue(text.range(of: pattern, options: .regularExpression) != nil, "'\(text)' !~ /\(pattern)/", line: line)
        }
    }

    func testOverflowingSizesAreOneLineErrors() {
        // image_size + page_size - 1 would overflow.
        expectOneLineError(profileJSON(imageSize: "18446744073709551615"), "bad image_size 18446744073709551615")
        expectOneLineError(profileJSON(imageSize: "18446744073709547521"), "bad image_size")
        expectOneLineError(profileJSON(imageSize: "9223372036854775808"), "larger than any image")
        // Past UInt64, negative, fractional: not numbers the format has.
        expectOneLineError(profileJSON(imageSize: "18446744073709551616"), "negative or too large")
        expectOneLineError(profileJSON(imageSize: "-1"), "negative or too large")
        expectOneLineError(profileJSON(imageSize: "1e300"), "negative or too large")
        expectOneLineError(profileJSON(pageSize: "-4096"), "bad page_size")
        expectOneLineError(profileJSON(pageSize: "9223372036854775807"), "bad page_size")
        expectOneLineError(profileJSON(pageSize: "4611686018427387904"), "bad page_size")
        expectOneLineError(profileJSON(pages: "-1"), "negative or too large")
        expectOneLineError(profileJSON(pages: "18446744073709551615"), "pages is 18446744073709551615 but the runs hold 1")
        expectOneLineError(profileJSON(runs: "[[-1,1]]"), "negative or too large")
        expectOneLineError(profileJSON(runs: "[[0,-1]]"), "negative or too large")
        // The largest image there is decodes, and its pages fit.
        let big = profileJSON(imageSize: "9223372036854775807", pageSize: "512", pages: "1", runs: "[[18014398509481983,1]]")
        XCTAssertEqual(try decode(big).runs, [18014398509481983..<18014398509481984])
    }

    func testOverflowingRunsAreOneLineErrors() {
        // The largest image in 512-byte pages: 2^54 pages.
        let size = "9223372036854775807", pages: UInt64 = 1 << 54
        func runs(_ rs: [(UInt64, UInt64)]) -> String { "[" + rs.map { "[\($0.0),\($0.1)]" }.joined(separator: ",") + "]" }
        // Start + count past the image, or wrapping around 2^64.
        expectOneLineError(profileJSON(imageSize: size, pageSize: "512", runs: runs([(pages - 1, UInt64.max)])), "run 0 is not")
        expectOneLineError(profileJSON(imageSize: size, pageSize: "512", runs: runs([(UInt64.max, 2)])), "run 0 is not")
        expectOneLineError(profileJSON(imageSize: size, pageSize: "512", runs: runs([(1, pages)])), "run 0 is not")
        // Counts whose sum overflows 2^64 (each run alone is valid): 1025 runs of the whole image.
        let whole = Array(repeating: (UInt64(0), pages), count: 1025)
        expectOneLineError(profileJSON(imageSize: size, pageSize: "512", pages: "0", runs: runs(whole)), "overlap")
        // Overlapping runs whose sum does not overflow.
        expectOneLineError(profileJSON(pages: "3", runs: runs([(0, 2), (5, 1), (1, 1)])), "runs 0 and 2 overlap")
        // More runs than a profile holds.
        let many = (0..<UInt64(BootProfile.maxRuns + 1)).map { ($0 * 2, UInt64(1)) }
        expectOneLineError(profileJSON(imageSize: "1073741824", pages: "\(many.count)", runs: runs(many)), "65537 runs: a profile holds at most 65536")
        // More pages than a recording holds (what replay would cut into ranges).
        expectOneLineError(profileJSON(imageSize: size, pageSize: "512", pages: "\(pages)", runs: runs([(0, pages)])),
                           "holds at most 1048576 pages")
        // As many as it holds: decoded.
        let most = Array(many.dropLast())
        XCTAssertEqual(try decode(profileJSON(imageSize: "1073741824", pages: "\(most.count)", runs: runs(most))).runs.count, BootProfile.maxRuns)
    }

    /// Profiles made in code (not decoded) with any numbers: replay and the
    /// page count never trap, and nothing past the image comes out.
    func testReplayOfExtremeNumbersNeverTraps() {
        let m = UInt64.max
        let runs: [Range<UInt64>] = [0..<1, m / 4096 - 1..<m / 4096 + 1, m - 5..<m, 0..<m, m / 512..<m]
        for size in [m, m - 1, UInt64(Int64.max), 1] {
            for ps in [512, 4096, 1 << 20, 0, -4096] {
                let p = BootProfile(url: "u", imageSize: size, etag: nil, lastModified: nil, pageSize: ps, runs: runs)
                XCTAssertEqual(p.pageCount, m, "saturates")
                for tps in [1, 512, 4096, 1 << 20, 0, -1] {
                    let t = UInt64(max(1, tps))
                    let targetPages = size / t + (size % t == 0 ? 0 : 1)
                    // Uncut (runs this long would be cut into 2^40 pieces and more).
                    for (gap, window) in [(UInt64(256 << 10), UInt64(32 << 20)), (m, m), (0, 0)] {
                        let out = p.replayRanges(targetPageSize: tps, gapBytes: gap, windowBytes: window, maxRunBytes: m)
                        XCTAssertFalse(out.isEmpty)
                        for r in out { XCTAssertTrue(r.lowerBound < r.upperBound && r.upperBound <= targetPages, "\(r) of \(targetPages)") }
                    }
                }
            }
        }
        // Cut at the end of the largest image, in its largest pages.
        let end = BootProfile(url: "u", imageSize: m, etag: nil, lastModified: nil, pageSize: 1 << 20,
                              runs: [m >> 20 - 2..<m >> 20 + 1])
        XCTAssertEqual(end.replayRanges(targetPageSize: 1 << 20, gapBytes: m, windowBytes: m, maxRunBytes: 1 << 20),
                       [m >> 20 - 2..<m >> 20 - 1, m >> 20 - 1..<m >> 20, m >> 20..<m >> 20 + 1])
        // Uncut ranges: at most one per run (what a profile-replay request carries).
        let q = BootProfile(url: "u", imageSize: 1 << 40, etag: nil, lastModified: nil, pageSize: 4096,
                            runs: [0..<(1 << 28), 5..<6])
        XCTAssertEqual(q.replayRanges(targetPageSize: 4096, maxRunBytes: .max), [0..<(1 << 28), 5..<6])
    }

    func testRecorderWithoutAPageBoundNeverTraps() {
        let r = ProfileRecorder(pageCount: 100, maxPages: .max)
        r.touch(10..<20, now: 0)
        r.touch(0..<200, now: 0)
        XCTAssertEqual(r.pages, 100)
        XCTAssertEqual(r.runs, [10..<20, 0..<10, 20..<100])
        let huge = ProfileRecorder(pageCount: .max, maxPages: .max)
        huge.touch(UInt64.max - 3..<UInt64.max, now: 0)
        XCTAssertEqual(huge.pages, 3)
    }
}
