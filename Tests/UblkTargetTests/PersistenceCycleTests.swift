// PersistenceCycle's I/O order (ORDER ON DISK), without a queue: the data's
// fdatasync first in a full cycle, then the words of phase 1 and their
// fdatasyncs, then those of phase 2 (present bits after deferred intent bits)
// and phase 3 (cleared dirty bits), each after the phase before is durable;
// a failure keeps later words from going out and makes the commits
// abandoned, never persisted.
import Foundation
import Glibc
import PageCache
import XCTest
@testable import UblkTarget

final class PersistenceCycleTests: XCTestCase {
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "cycle-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func bitmap(_ name: String, _ kind: BitmapKind, marked: Bool = true) throws -> Bitmap {
        let id = BitmapIdentity(kind: kind, pageSize: 4096, imageSize: 1 << 20, url: "http://h/a.img", etag: "\"1\"")
        let b = try Bitmap.open(path: dir + "/" + name, identity: id).0
        if marked { _ = b.markPresent(3..<9) }
        return b
    }

    /// Runs the cycle to its end, every I/O answered as `answer` says; returns the I/O in the order issued.
    func run(_ c: inout PersistenceCycle, backing: Bool = false, answer: (CycleIO) -> Int32) -> [[CycleIO]] {
        var batches: [[CycleIO]] = []
        var next = c.begin(backing: backing)
        while !next.isEmpty {
            batches.append(next)
            var following: [CycleIO] = []
            for io in next {
                var result = answer(io)
                if case .writeWords(let i, let k) = io, result == 0 { result = Int32(c.writes[i].runs[k].count) }
                following += c.completed(io, result: result)
            }
            next = following
        }
        XCTAssertTrue(c.isOver)
        return batches
    }

    func testFullCycleSyncsDataThenPhaseOneThenTheHeldWords() throws {
        let present = try bitmap("present", .present), dirty = try bitmap("dirty", .dirty)
        var c = PersistenceCycle(full: true)
        c.add(present)
        c.add(dirty, phase: 3)
        let batches = run(&c, backing: true) { _ in 0 }
        XCTAssertEqual(batches, [[.syncData, .syncBacking],
                                 [.writeWords(write: 0, run: 0)], [.syncBitmap(write: 0)],
                                 [.writeWords(write: 1, run: 0)], [.syncBitmap(write: 1)]])
        XCTAssertFalse(c.failed(0))
        XCTAssertFalse(c.failed(1))
    }

    func testOrderedCycleWritesIntentBitsThenPresentThenDirtyClears() throws {
        let present = try bitmap("present", .present), local = try bitmap("local", .local)
        let dirty = try bitmap("dirty", .dirty)
        var c = PersistenceCycle(full: true)
        c.add(present, phase: 2)
        c.add(local)
        c.add(dirty, phase: 3)
        let batches = run(&c) { _ in 0 }
        XCTAssertEqual(c.phaseOf, [2, 1, 3])
        XCTAssertEqual(batches, [[.syncData],
                                 [.writeWords(write: 1, run: 0)], [.syncBitmap(write: 1)],
                                 [.writeWords(write: 0, run: 0)], [.syncBitmap(write: 0)],
                                 [.writeWords(write: 2, run: 0)], [.syncBitmap(write: 2)]])
        XCTAssertFalse(c.failed(2))
    }

    func testAFailedIntentWriteHoldsBackPresentAndTheClears() throws {
        let present = try bitmap("present", .present), local = try bitmap("local", .local)
        let dirty = try bitmap("dirty", .dirty)
        var c = PersistenceCycle(full: true)
        c.add(present, phase: 2)
        c.add(local)
        c.add(dirty, phase: 3)
        let batches = run(&c) { io in io == .writeWords(write: 1, run: 0) ? -EIO : 0 }
        XCTAssertEqual(batches, [[.syncData], [.writeWords(write: 1, run: 0)]])
        XCTAssertTrue(c.failed(0), "present bits do not go before the intent bits they follow")
        XCTAssertTrue(c.failed(2), "nor the clears")
    }

    func testIntentCycleWritesAtOnce() throws {
        let local = try bitmap("local", .local), dirty = try bitmap("dirty", .dirty)
        var c = PersistenceCycle(full: false)
        c.add(local)
        c.add(dirty)
        let batches = run(&c) { _ in 0 }
        XCTAssertEqual(batches, [[.writeWords(write: 0, run: 0), .writeWords(write: 1, run: 0)],
                                 [.syncBitmap(write: 0), .syncBitmap(write: 1)]])
    }

    func testAFailedPhaseOneWriteHoldsBackPhaseTwo() throws {
        let present = try bitmap("present", .present), dirty = try bitmap("dirty", .dirty)
        var c = PersistenceCycle(full: true)
        c.add(present)
        c.add(dirty, phase: 3)
        let batches = run(&c) { io in io == .syncBitmap(write: 0) ? -EIO : 0 }
        XCTAssertEqual(batches, [[.syncData], [.writeWords(write: 0, run: 0)], [.syncBitmap(write: 0)]])
        XCTAssertTrue(c.failed(0))
        XCTAssertTrue(c.failed(1), "the held words are abandoned with the failed ones")
    }

    func testAFailedDataSyncWritesNoWords() throws {
        let present = try bitmap("present", .present)
        var c = PersistenceCycle(full: true)
        c.add(present)
        let batches = run(&c, backing: true) { io in io == .syncBacking ? -EIO : 0 }
        XCTAssertEqual(batches, [[.syncData, .syncBacking]])
        XCTAssertEqual(c.dataFailure, -EIO)
    }

    func testNothingStagedEndsAtOnce() throws {
        let local = try bitmap("local", .local, marked: false)
        var c = PersistenceCycle(full: false)
        c.add(local)
        XCTAssertEqual(c.begin(backing: false), [])
        XCTAssertTrue(c.isOver, "an intent cycle with nothing staged is over at once")
    }
}
