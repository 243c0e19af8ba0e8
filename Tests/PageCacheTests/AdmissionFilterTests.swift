// AdmissionFilter: a page is admitted on its second miss within the window,
// a stream read once is not, and the window forgets what it saw long ago.
import PageCache
import XCTest

final class AdmissionFilterTests: XCTestCase {
    func testAPageIsAdmittedOnItsSecondMiss() {
        var f = AdmissionFilter(window: 1000)
        XCTAssertFalse(f.admit(7..<8), "a first miss is read through")
        XCTAssertTrue(f.admit(7..<8), "the second is admitted")
        XCTAssertFalse(f.admit(100..<104))
        XCTAssertTrue(f.admit(103..<110), "a miss with one page seen before is admitted")
    }

    func testAScanReadOnceIsNeverAdmittedAndDoesNotAdmitTheHotPages() {
        var f = AdmissionFilter(window: 4096)
        // A hot set of 64 pages read twice: admitted on the second pass.
        for p in 0..<64 as Range<UInt64> { _ = f.admit(p..<p + 1) }
        XCTAssertTrue((0..<64 as Range<UInt64>).allSatisfy { f.admit($0..<$0 + 1) })
        // A scan of 16 times the window, 256 pages a request, each read once.
        var admitted = 0
        var p: UInt64 = 1 << 20
        for _ in 0..<256 {
            if f.admit(p..<p + 256) { admitted += 1 }
            p += 256
        }
        // Hash collisions may admit a few requests early; never most of them.
        XCTAssertLessThan(admitted, 26, "a scan read once stays out of the cache (\(admitted) of 256 requests admitted)")
    }

    func testTheWindowForgetsWhatWasSeenLongAgo() {
        var f = AdmissionFilter(window: 100)
        _ = f.admit(5..<6)
        // Two generations of other misses later, page 5 is a first miss again.
        for p in 1000..<1300 as Range<UInt64> { _ = f.admit(p..<p + 1) }
        XCTAssertFalse(f.seen(5))
        XCTAssertFalse(f.admit(5..<6))
    }

    func testRandomPagesSeenOnceAreRarelyTakenForSeen() {
        var f = AdmissionFilter(window: 1 << 14)
        var x: UInt64 = 0x2545_F491_4F6C_DD1D  // xorshift64: the same pages every run
        var early = 0
        for _ in 0..<(1 << 16) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            let p = x >> 24
            if f.admit(p..<p + 1) { early += 1 }
        }
        XCTAssertLessThan(early, (1 << 16) / 6, "false admissions of random first misses: \(early) of 65536")
    }

    func testMemoryIsBoundedWhateverTheWindow() {
        XCTAssertEqual(AdmissionFilter(window: 1).bitsPerGeneration, 1 << 16)
        XCTAssertEqual(AdmissionFilter(window: 1 << 20).bitsPerGeneration, 1 << 24)
        XCTAssertEqual(AdmissionFilter(window: 1 << 40).bitsPerGeneration, 1 << 28)
    }
}
