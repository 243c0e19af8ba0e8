// The randomised crash model test of the overlay handler (OverlayTarget.swift):
// a writable device over a read-only lower image, keeping only its own pages.
//
// Each seed runs random reads, writes (partial pages included, FUA some of
// the time) and FLUSHes on a FakeQueue, I/O completing in random order, with
// crashes at random points: the server dies (the kernel carries out some of
// what was submitted), and half the time the power goes too (every file back
// to its last good fdatasync). The overlay is then opened again from its
// files, as `add --overlay NAME` does, and checked page by page:
// - every read returns, sector for sector, the latest completed write's
//   bytes or the image's (reads never overlap a write in flight);
// - after a crash every page reads as a state a FLUSH (or FUA) vouched for
//   or a later completed write left: never zeros, never a torn copy-up;
// - the lower image is never written; every request completes exactly once.
// A failing seed prints itself: `OVERLAY_SEED=N swift test --filter OverlayModel`.
import Foundation
import CUring
import Glibc
import PageCache
import XCTest
@testable import UblkTarget

final class OverlayModelTests: XCTestCase {
    static let page = 4096, sector = 512, pages = 24, depth = 6

    func testRandomSeeds() throws {
        let env = ProcessInfo.processInfo.environment
        let seeds: [UInt64] = env["OVERLAY_SEED"].flatMap(UInt64.init).map { [$0] } ?? Array(1...40)
        for seed in seeds { try run(seed: seed) }
    }

    /// Reattaching: by name, only over the image it was written over; never a new one by mistake.
    func testReattachRules() throws {
        let dir = NSTemporaryDirectory() + "overlay-store-\(getpid())"
        mkdir(dir, 0o700)
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        let a = BitmapIdentity(kind: .local, pageSize: 4096, imageSize: 1 << 20, url: "http://h/a.img", etag: "\"1\"")
        XCTAssertThrowsError(try OverlayStore(directory: dir, name: "vm1", lower: a, create: false)) { e in
            XCTAssertTrue("\(e)".contains("no overlay named 'vm1'"), "\(e)")
        }
        XCTAssertThrowsError(try OverlayStore(directory: dir, name: "../x", lower: a, create: true)) { e in
            XCTAssertTrue("\(e)".contains("invalid overlay name"), "\(e)")
        }
        do {
            let s = try OverlayStore(directory: dir, name: "vm1", lower: a, create: true)
            XCTAssertTrue(s.created)
            s.local.markPresent(3..<4)
            XCTAssertTrue(s.persistAll())
            XCTAssertThrowsError(try OverlayStore(directory: dir, name: "vm1", lower: a, create: true)) { e in
                XCTAssertTrue("\(e)".contains("in use by another device"), "\(e)")
            }
        }
        do {
            let again = try OverlayStore(directory: dir, name: "vm1", lower: a, create: false)
            XCTAssertFalse(again.created)
            XCTAssertTrue(again.local.test(3))
        }
        var b = a
        b.etag = "\"2\""
        XCTAssertThrowsError(try OverlayStore(directory: dir, name: "vm1", lower: b, create: true)) { e in
            XCTAssertTrue("\(e)".contains("written over another image (ETag \"1\", not \"2\")"), "\(e)")
        }
        // Refused, and kept: the page written is still there.
        XCTAssertTrue(try OverlayStore(directory: dir, name: "vm1", lower: a, create: false).local.test(3))
    }

    struct Failure: Error, CustomStringConvertible { let description: String }

    func run(seed: UInt64) throws {
        let dir = NSTemporaryDirectory() + "overlay-model-\(getpid())-\(seed)"
        mkdir(dir, 0o700)
        defer { _ = try? FileManager.default.removeItem(atPath: dir) }
        let size = OverlayModelTests.pages * OverlayModelTests.page
        var rng = SplitMix(seed: seed)
        // The lower image: every byte from the seed, so a page in the wrong place shows.
        var image = [UInt8](repeating: 0, count: size)
        for i in 0..<size { image[i] = UInt8(truncatingIfNeeded: rng.next() | 1) }
        let lowerPath = dir + "/lower"
        FileManager.default.createFile(atPath: lowerPath, contents: Data(image))
        let lowerFD = open(lowerPath, O_RDONLY)
        defer { close(lowerFD) }
        let identity = BitmapIdentity(kind: .local, pageSize: 4096, imageSize: UInt64(size), url: "lower:model")

        // What each page may read as after a crash: the versions since the last one vouched for.
        var model = image
        var history: [[[UInt8]]] = (0..<OverlayModelTests.pages).map { p in
            [Array(image[p * OverlayModelTests.page..<(p + 1) * OverlayModelTests.page])]
        }
        let buffers = (0..<OverlayModelTests.depth).map { _ in
            UnsafeMutableRawPointer.allocate(byteCount: 4 * OverlayModelTests.page, alignment: 4096)
        }
        defer { for b in buffers { b.deallocate() } }

        for round in 0..<4 {
            let files = FaultFiles()
            let store: OverlayStore
            do { store = try OverlayStore(directory: dir, name: "dev", lower: identity, create: true) } catch {
                throw Failure(description: "seed \(seed) round \(round): reopen: \(error)")
            }
            files.track(store.data.fd, path: store.data.path)
            files.track(store.local.fd, path: store.local.path)
            files.track(store.dirty.fd, path: store.dirty.path)
            let queue = FakeQueue(depth: OverlayModelTests.depth, files: files)
            queue.rng = SplitMix(seed: seed &* 31 &+ UInt64(round))
            let handler = OverlayHandler(store: store, lowerFD: lowerFD, size: UInt64(size), depth: OverlayModelTests.depth)
            queue.handler = handler

            // After a crash: every page is one of its allowed versions; then it is the model.
            for p in 0..<OverlayModelTests.pages {
                let got = try readNow(handler, queue, buffers[0], page: p)
                guard let k = history[p].firstIndex(of: got) else {
                    let img = Array(image[p * OverlayModelTests.page..<(p + 1) * OverlayModelTests.page])
                    let what = got == img ? "the image's page" : got.allSatisfy { $0 == 0 } ? "zeros" : "other bytes"
                    let local = store.local.test(UInt64(p))
                    throw Failure(description: "seed \(seed) round \(round): page \(p) reads as \(what) (local \(local)), none of its \(history[p].count) allowed versions")
                }
                history[p] = [got]  // what it is now; later crashes start from here
                model.replaceSubrange(p * OverlayModelTests.page..<(p + 1) * OverlayModelTests.page, with: got)
                _ = k
            }

            // In flight: tag -> (op, byte range, write bytes, issue time); completed flushes vouch.
            var inFlight: [UInt16: (op: UInt8, range: Range<Int>, data: [UInt8], issued: Int, fua: Bool)] = [:]
            var time = 0
            /// Per page: the history index current at each time a write completed (for FLUSH issue times).
            var versionAt: [[(time: Int, index: Int)]] = (0..<OverlayModelTests.pages).map { p in [(0, history[p].count - 1)] }
            /// A FLUSH issued at `issued` completed: every write completed before then is durable.
            func vouch(before issued: Int) {
                for p in 0..<OverlayModelTests.pages {
                    guard let k = versionAt[p].lastIndex(where: { $0.time < issued }) else { continue }
                    let drop = versionAt[p][k].index
                    if drop > 0 {
                        history[p].removeFirst(drop)
                        versionAt[p] = versionAt[p][k...].map { ($0.time, $0.index - drop) }
                    }
                }
            }
            let steps = 60 + Int(rng.next() % 120)
            for _ in 0..<steps {
                time += 1
                let free = (0..<UInt16(OverlayModelTests.depth)).filter { inFlight[$0] == nil }
                if let tag = free.first, rng.next() % 3 != 0 {
                    let kind = rng.next() % 10
                    let sector = Int(rng.next() % UInt64(size / OverlayModelTests.sector))
                    let count = min(1 + Int(rng.next() % 16), size / OverlayModelTests.sector - sector)
                    let range = sector * OverlayModelTests.sector..<(sector + count) * OverlayModelTests.sector
                    let busy = inFlight.values.contains { $0.op != Op.flush && $0.range.overlaps(range) }
                    let buf = buffers[Int(tag)]
                    if kind < 4 && !busy {
                        inFlight[tag] = (Op.read, range, [], time, false)
                        queue.open.insert(tag)
                        handler.handle(Request(tag: tag, op: Op.read, flags: 0, offset: UInt64(range.lowerBound),
                                               length: UInt32(range.count), buffer: buf), queue: queue)
                    } else if kind < 8 && !busy {
                        var data = [UInt8](repeating: 0, count: range.count)
                        for i in 0..<data.count { data[i] = UInt8(truncatingIfNeeded: rng.next()) }
                        data.withUnsafeBytes { _ = memcpy(buf, $0.baseAddress!, $0.count) }
                        let fua = rng.next() % 5 == 0
                        inFlight[tag] = (Op.write, range, data, time, fua)
                        queue.open.insert(tag)
                        handler.handle(Request(tag: tag, op: Op.write, flags: fua ? UInt32(UBLK_IO_F_FUA) : 0,
                                               offset: UInt64(range.lowerBound), length: UInt32(range.count), buffer: buf),
                                       queue: queue)
                    } else if kind >= 8 {
                        inFlight[tag] = (Op.flush, 0..<0, [], time, false)
                        queue.open.insert(tag)
                        handler.handle(Request(tag: tag, op: Op.flush, flags: 0, offset: 0, length: 0, buffer: buf), queue: queue)
                    }
                } else {
                    queue.runOne()
                }
                if !queue.doubleCompletions.isEmpty { throw Failure(description: "seed \(seed): a request completed twice") }
                for (tag, result) in queue.completed {
                    guard let f = inFlight.removeValue(forKey: tag) else { throw Failure(description: "seed \(seed): tag \(tag) completed, not in flight") }
                    switch f.op {
                    case Op.read:
                        guard result == Int32(f.range.count) else { throw Failure(description: "seed \(seed): read \(f.range) -> \(result)") }
                        let got = [UInt8](UnsafeRawBufferPointer(start: buffers[Int(tag)], count: f.range.count))
                        if got != Array(model[f.range]) {
                            throw Failure(description: "seed \(seed) round \(round): read of bytes \(f.range) differs from the model")
                        }
                    case Op.write:
                        guard result == Int32(f.range.count) else { throw Failure(description: "seed \(seed): write \(f.range) -> \(result)") }
                        model.replaceSubrange(f.range, with: f.data)
                        let ps = OverlayModelTests.page
                        for p in f.range.lowerBound / ps...(f.range.upperBound - 1) / ps {
                            history[p].append(Array(model[p * ps..<(p + 1) * ps]))
                            versionAt[p].append((time, history[p].count - 1))
                        }
                        // FUA: its data is durable, and (the overlay's cycle) every write completed before it was issued.
                        if f.fua { vouch(before: f.issued) }
                    default:
                        guard result == 0 else { throw Failure(description: "seed \(seed): FLUSH -> \(result)") }
                        vouch(before: f.issued)
                    }
                }
                queue.completed = []
            }

            // Crash: a write still in flight may have landed (its one write op) on any version a page may be in.
            for f in inFlight.values where f.op == Op.write {
                let ps = OverlayModelTests.page
                for p in f.range.lowerBound / ps...(f.range.upperBound - 1) / ps {
                    let a = max(f.range.lowerBound, p * ps), b = min(f.range.upperBound, (p + 1) * ps)
                    history[p] += history[p].map { v in
                        var w = v
                        w.replaceSubrange(a - p * ps..<b - p * ps, with: f.data[a - f.range.lowerBound..<b - f.range.lowerBound])
                        return w
                    }
                }
            }
            queue.processDied()
            files.processDied()
            if rng.next() % 2 == 0 { files.powerLoss() }
            _ = handler
        }
        // The lower image was never written.
        let lower = [UInt8](FileManager.default.contents(atPath: lowerPath)!)
        if lower != image { throw Failure(description: "seed \(seed): the lower image was written") }
    }

    /// One page read through the handler, run to completion.
    func readNow(_ h: OverlayHandler, _ q: FakeQueue, _ buf: UnsafeMutableRawPointer, page: Int) throws -> [UInt8] {
        let ps = OverlayModelTests.page
        q.open.insert(0)
        h.handle(Request(tag: 0, op: Op.read, flags: 0, offset: UInt64(page * ps), length: UInt32(ps), buffer: buf), queue: q)
        while q.completed.isEmpty { guard q.runOne() else { throw Failure(description: "read of page \(page) never completed") } }
        let r = q.completed.removeFirst()
        guard r.result == Int32(ps) else { throw Failure(description: "read of page \(page) -> \(r.result)") }
        return [UInt8](UnsafeRawBufferPointer(start: buf, count: ps))
    }
}
