// The overlay device (OverlayTarget.swift: a writable device over a read-only
// lower image) under the same seeded crash model as the caching targets
// (PageStateModelTests' World in its `layered` mode: the overlay's files
// opened by OverlayStore, reads through to the lower file, copy-ups for
// partial writes), and its files' rules:
// - kill -9 (the server dies; the page cache and the live words on /run
//   outlive it), then the overlay opened again as `recover` or `add` does:
//   every acknowledged write reads back, FLUSHed or not;
// - power loss: every FLUSHed write reads back; nothing reads as zeros or
//   another page; `dirty` lists every page that may differ from the last
//   `sync`, so `sync` afterwards yields an exact replica;
// - the data file deleted, truncated, replaced or restored from a backup
//   while the bitmaps hold written pages: refused with one line, nothing
//   changed;
// - reattached by name only over the image it was written over;
// - an overlay of the layout before the shared engine is migrated, pages kept.
// A failing seed prints itself: `OVERLAY_SEED=N swift test --filter OverlayModel`; a long run:
// `OVERLAY_SEEDS=5000 MODEL_SECONDS=600 swift test --filter OverlayModel`.
import Foundation
import Glibc
import PageCache
import XCTest
@testable import UblkTarget

final class OverlayModelTests: XCTestCase {
    func testRandomSequencesWithCrashes() throws {
        let env = ProcessInfo.processInfo.environment
        let seeds: [UInt64] = env["OVERLAY_SEED"].flatMap(UInt64.init).map { [$0] }
            ?? Array(1...UInt64(env["OVERLAY_SEEDS"].flatMap { Int($0) } ?? 60))
        let steps = env["MODEL_STEPS"].flatMap { Int($0) } ?? 800
        var crashes = 0, ran = 0, syncs = 0, writes = 0
        // Bounded in time (MODEL_SECONDS), never below 20 seeds: a loaded machine runs longer instead of testing less.
        let deadline = Date().addingTimeInterval(Double(env["MODEL_SECONDS"].flatMap { Int($0) } ?? 40))
        for seed in seeds {
            if Date() > deadline && ran >= 20 { break }
            let w = try PageStateModelTests.World(seed: seed, mode: .layered)
            var at = 0
            do {
                while at < steps { try w.step(); at += 1 }
                try w.quiesce()
                try w.powerLoss(processOnly: true)
                try w.powerLoss()
            } catch {
                return XCTFail("""
                    seed \(seed) failed at step \(at): \(error)
                    queues: \(w.queueCount), faulty \(w.faulty)
                    replay: OVERLAY_SEED=\(seed) MODEL_STEPS=\(at + 1) swift test --filter OverlayModelTests
                    last actions:
                      \(w.trace.joined(separator: "\n  "))
                    """)
            }
            crashes += w.crashes
            syncs += w.syncs
            writes += w.writes
            ran += 1
        }
        if seeds.count > 1 {
            XCTAssertGreaterThan(crashes, 2 * ran, "crashes were exercised")
            XCTAssertGreaterThan(syncs, ran)
            XCTAssertGreaterThan(writes, 50 * ran)
        }
        print("overlay model: \(ran) seeds of \(steps) steps passed: \(crashes) crashes, \(syncs) syncs, \(writes) writes")
    }

    /// Seeds that once found a bug, run every time with the steps that found it.
    /// 180: a full cycle carried new present bits and cleared dirty bits; a power
    /// loss left the clears without the present bits, so a page dropped at open
    /// (read from the image again) was no longer listed dirty and `sync` left the
    /// replica stale. Cleared dirty words now go only after the others are durable.
    func testSeedsThatFoundBugs() throws {
        for (seed, steps) in [(UInt64(180), 381)] {
            let w = try PageStateModelTests.World(seed: seed, mode: .layered)
            do {
                for _ in 0..<steps { try w.step() }
                try w.quiesce()
                try w.powerLoss()
            } catch {
                XCTFail("seed \(seed): \(error)\n  \(w.trace.suffix(20).joined(separator: "\n  "))")
            }
        }
    }

    // MARK: The overlay's files

    static let size: UInt64 = 1 << 20
    let a = BitmapIdentity(kind: .present, pageSize: 4096, imageSize: OverlayModelTests.size, url: "http://h/a.img", etag: "\"1\"")

    func scratch(_ name: String) -> String {
        let dir = NSTemporaryDirectory() + "overlay-\(name)-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        mkdir(dir, 0o700)
        return dir
    }

    /// Writes `byte` over page `page` of the overlay as the handler would (data, its sync, then the bits).
    func write(_ s: CacheStore, page: UInt64, byte: UInt8) throws {
        let buf = [UInt8](repeating: byte, count: 4096)
        XCTAssertEqual(buf.withUnsafeBytes { pwrite(s.cache.fd, $0.baseAddress!, 4096, off_t(page * 4096)) }, 4096)
        try s.cache.sync()
        for b in [s.present, s.local!, s.dirty!] {
            _ = b.markPresent(page..<page + 1)
            try b.persist(b.stage())
        }
    }

    func open(_ dir: String, _ id: BitmapIdentity? = nil, create: Bool = true) throws -> CacheStore {
        try OverlayStore.open(directory: dir, name: "vm1", lower: id ?? a, create: create, live: nil).store
    }

    func refusal(_ body: () throws -> Any) -> String? {
        do { _ = try body() } catch { return "\(error)" }
        return nil
    }

    /// Reattaching: by name, only over the image it was written over; never a new one by mistake.
    func testReattachRules() throws {
        let dir = scratch("reattach")
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        XCTAssertEqual(refusal { try self.open(dir, create: false) }.map { $0.contains("no overlay named 'vm1'") }, true)
        XCTAssertEqual(refusal { try OverlayStore.open(directory: dir, name: "../x", lower: self.a, create: true, live: nil) }
                        .map { $0.contains("invalid overlay name") }, true)
        do {
            let (s, created) = try OverlayStore.open(directory: dir, name: "vm1", lower: a, create: true, live: nil)
            XCTAssertTrue(created)
            try write(s, page: 3, byte: 0x33)
            XCTAssertEqual(refusal { try self.open(dir) }.map { $0.contains("overlay 'vm1' is in use by another device") }, true)
        }
        do {
            let (again, created) = try OverlayStore.open(directory: dir, name: "vm1", lower: a, create: false, live: nil)
            XCTAssertFalse(created)
            XCTAssertTrue(again.local!.test(3))
        }
        var b = a
        b.etag = "\"2\""
        let why = refusal { try self.open(dir, b) }
        XCTAssertEqual(why.map { $0.contains("written over another image (ETag \"1\", not \"2\")") }, true, why ?? "opened")
        b = a
        b.url = "http://h/b.img"
        XCTAssertNotNil(refusal { try self.open(dir, b) })
        // Refused, and kept: the page written is still there.
        XCTAssertTrue(try open(dir, create: false).local!.test(3))
    }

    /// The data file lost, truncated, replaced or restored from a backup while
    /// the bitmaps say pages were written there: one line, and nothing changed.
    func testFilesBoundTogether() throws {
        let dir = scratch("bound")
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        let data = OverlayStore.dataPath(directory: dir, name: "vm1")
        do { try write(try open(dir), page: 5, byte: 0x55) }
        let good = try Data(contentsOf: URL(fileURLWithPath: data))
        do { _ = try open(dir) }  // a new generation: `good` is a backup now
        func refusedWith(_ damage: () throws -> Void, _ what: String) throws {
            let now = try Data(contentsOf: URL(fileURLWithPath: data))
            try damage()
            let why = refusal { try self.open(dir) }
            XCTAssertNotNil(why, "\(what): opened")
            if let why {
                XCTAssertTrue(why.contains("locally written pages"), "\(what): \(why)")
                XCTAssertFalse(why.contains("\n"), "\(what): not one line: \(why)")
            }
            try now.write(to: URL(fileURLWithPath: data))
            let s = try open(dir)
            XCTAssertTrue(s.local!.test(5), "\(what): the written page is still local")
            var byte: UInt8 = 0
            XCTAssertEqual(pread(s.cache.fd, &byte, 1, 5 * 4096), 1)
            XCTAssertEqual(byte, 0x55, "\(what): the written page still reads back")
        }
        try refusedWith({ unlink(data) }, "deleted")
        try refusedWith({ truncate(data, 4096) }, "truncated")
        try refusedWith({ let n = try Data(contentsOf: URL(fileURLWithPath: data)).count; try Data(count: n).write(to: URL(fileURLWithPath: data)) }, "replaced")
        try refusedWith({ try good.write(to: URL(fileURLWithPath: data)) }, "restored from a backup")
    }

    /// An overlay of the layout before the shared engine (NAME.overlay.local
    /// and .dirty, no present bitmap, unbound) keeps its pages.
    func testOldLayoutIsMigrated() throws {
        let dir = scratch("migrate")
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        let data = OverlayStore.dataPath(directory: dir, name: "vm1")
        do {
            let file = try CacheFile(path: data, size: OverlayModelTests.size)
            let buf = [UInt8](repeating: 0x77, count: 4096)
            _ = buf.withUnsafeBytes { pwrite(file.fd, $0.baseAddress!, 4096, 7 * 4096) }
            try file.sync()
            for (suffix, kind) in [(".local", BitmapKind.local), (".dirty", .dirty)] {
                var id = a
                id.kind = kind
                let b = try Bitmap.open(path: data + suffix, identity: id).bitmap
                _ = b.markPresent(7..<8)
                try b.persist(b.stage())
            }
        }
        XCTAssertTrue(OverlayStore.exists(directory: dir, name: "vm1"))
        for _ in 0..<2 {
            let (s, created) = try OverlayStore.open(directory: dir, name: "vm1", lower: a, create: false, live: nil)
            XCTAssertFalse(created)
            XCTAssertEqual(s.state, .reused)
            XCTAssertTrue(s.present.test(7) && s.local!.test(7) && s.dirty!.test(7))
            XCTAssertEqual(s.local!.count, 1)
            var byte: UInt8 = 0
            XCTAssertEqual(pread(s.cache.fd, &byte, 1, 7 * 4096), 1)
            XCTAssertEqual(byte, 0x77)
        }
        XCTAssertNotEqual(access(data + ".local", F_OK), 0, "the old names are gone")
        XCTAssertEqual(access(data + ".bitmap.dirty", F_OK), 0)
    }
}
