import Foundation
import Glibc
import XCTest
@testable import PageCache
@testable import UblkTarget

/// A verified image's pages through the caching handler (CachingVerify.swift),
/// on the fake queue with a tree made by veritysetup: a body with a wrong byte
/// is fetched once more, then fails its reads with EIO and is never kept; a
/// server that mends itself is believed on the second fetch; pages a cache
/// held before are checked on their first read and refetched when edited;
/// the scrub finds a page edited behind the device's back; local writes are
/// never checked.
final class VerifiedFetchTests: XCTestCase {
    let page = 4096
    let pages = 40
    var dir = ""
    var image: [UInt8] = []
    var root = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "/verified-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        var s: UInt64 = 0x1234_5678_9abc_def1
        image = (0..<pages * page).map { _ -> UInt8 in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return UInt8(truncatingIfNeeded: s)
        }
        FileManager.default.createFile(atPath: dir + "/img", contents: Data(image))
        guard access("/usr/sbin/veritysetup", X_OK) == 0 else {
            XCTFail("/usr/sbin/veritysetup is missing: install cryptsetup-bin (scripts/deps.sh does)")
            return
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/veritysetup")
        p.arguments = ["format", dir + "/img", dir + "/tree"]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        let line = text.split(separator: "\n").first { $0.hasPrefix("Root hash:") }
        root = line.map { $0.split(separator: ":")[1].trimmingCharacters(in: .whitespaces) } ?? ""
        XCTAssertEqual(root.count, 64, text)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// One server's handler over the cache in `dir` (a new one reuses what the last left).
    final class Server {
        let store: CacheStore
        let context: CacheContext
        let queue: FakeQueue
        let fetcher: FakeFetcher
        let handler: CachingHandler
        var rng = SplitMix(seed: 5)
        let buffer: UnsafeMutableRawPointer
        var nextTag: UInt16 = 0

        init(dir: String, remote: [UInt8], root: String, writable: Bool = false) throws {
            let size = UInt64(remote.count)
            let id = BitmapIdentity(kind: .present, pageSize: 4096, imageSize: size, url: "test://verified", etag: "e")
            var spec = CacheStoreSpec(cachePath: dir + "/c", bitmapPath: dir + "/b", identity: id)
            spec.dirty = writable ? .open : .none
            spec.local = writable ? .open : .none
            store = try CacheStore.open(spec)
            context = CacheContext(cache: store.cache, bitmap: store.present, dirty: store.dirty, imageSize: size,
                                   pageSize: 4096, stats: CacheStats()) {
                HTTPStats(hits: 0, misses: 0, bytesFetched: 0, requests: 0, retries: 0, errors: 0, missLatencyP50Ms: nil,
                          missLatencyP99Ms: nil, pagesPresent: 0, pagesTotal: 0, pageSize: 4096)
            }
            context.publishStats = false
            context.writable = writable
            context.local = store.local
            let fd = open(dir + "/tree", O_RDONLY)
            context.verity = try VerityTree(fd: fd, owns: true, hashOffset: 0, rootHex: root)
            context.verified = PageBits(pageCount: store.present.pageCount)
            queue = FakeQueue(depth: 8, files: FaultFiles())
            fetcher = FakeFetcher(remote: remote)
            let planner = FetchPlanner(imageSize: size, pageSize: 4096, maxRunBytes: 16 << 10,
                                       initialReadaheadBytes: 0, maxReadaheadBytes: 0, maxActiveRuns: 2)
            handler = CachingHandler(context: context, fetcher: fetcher, planner: planner, depth: 8)
            queue.handler = handler
            buffer = UnsafeMutableRawPointer.allocate(byteCount: remote.count, alignment: 4096)
        }
        deinit { buffer.deallocate() }

        /// Runs until nothing is left to do (`each`: after every step).
        func settle(_ each: () -> Void = {}) {
            var steps = 0
            while (fetcher.step(&rng, handler: handler, queue: queue) || queue.runOne()) && steps < 100_000 {
                handler.idle(queue: queue)
                each()
                steps += 1
            }
            handler.idle(queue: queue)
        }

        /// Reads pages `pages` in one request; its result, and the bytes into `buffer` at their offset.
        func read(_ pages: Range<Int>, each: () -> Void = {}) -> Int32 {
            let tag = nextTag
            nextTag = (nextTag + 1) % 8
            queue.completed = []
            handler.handle(Request(tag: tag, op: Op.read, flags: 0, offset: UInt64(pages.lowerBound * 4096),
                                   length: UInt32(pages.count * 4096), buffer: buffer + pages.lowerBound * 4096), queue: queue)
            settle(each)
            return queue.completed.first { $0.tag == tag }?.result ?? -99999
        }

        func bytes(_ pages: Range<Int>) -> [UInt8] {
            Array(UnsafeRawBufferPointer(start: buffer + pages.lowerBound * 4096, count: pages.count * 4096))
        }

        var stats: CacheStats { context.stats }
    }

    func editCache(page p: Int, _ dir: String) {
        let fd = open(dir + "/c", O_RDWR)
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, off_t(p * page + 100)), 1)
        b ^= 0xFF
        XCTAssertEqual(pwrite(fd, &b, 1, off_t(p * page + 100)), 1)
        close(fd)
    }

    func testEveryFetchedPageIsCheckedAndTheImageReadsWhole() throws {
        let s = try Server(dir: dir, remote: image, root: root)
        XCTAssertEqual(s.read(0..<pages), Int32(pages * page))
        XCTAssertTrue(s.bytes(0..<pages) == image)
        XCTAssertEqual(s.stats.pagesVerified, UInt64(pages))
        XCTAssertEqual(s.stats.verifyFailures, 0)
        XCTAssertEqual(s.store.present.count, UInt64(pages))
    }

    func testAWrongByteInTheBodyFailsTheReadOfItsPageAndIsNeverKept() throws {
        var bad = image
        bad[17 * page + 9] ^= 0x40
        let s = try Server(dir: dir, remote: bad, root: root)
        XCTAssertEqual(s.read(16..<19), -EIO, "the read of the page that does not match fails")
        XCTAssertEqual(s.stats.verifyFailures, 2, "fetched twice, failed twice")
        XCTAssertFalse(s.store.present.test(17), "the bad page is not present")
        XCTAssertEqual(s.read(17..<18), -EIO, "and is not served later either")
        for p in [0..<17, 18..<pages] {
            XCTAssertEqual(s.read(p), Int32(p.count * page), "\(p)")
            XCTAssertTrue(s.bytes(p) == Array(image[p.lowerBound * page..<p.upperBound * page]), "\(p)")
        }
        XCTAssertEqual(s.store.present.count, UInt64(pages - 1))
    }

    func testOnlyTheReadsOfThePageThatFailedFail() throws {
        // Three reads wait on one run (16-19); page 17 does not match: the read of
        // 16-19 fails; the read of 16 is served (the bytes before the bad block
        // are kept, whatever chunks they came in); the read of 18-19 is planned
        // again and succeeds.
        var bad = image
        bad[17 * page + 9] ^= 0x40
        for seed: UInt64 in 1...24 {
            try? FileManager.default.removeItem(atPath: dir + "/c")
            try? FileManager.default.removeItem(atPath: dir + "/b")
            let s = try Server(dir: dir, remote: bad, root: root)
            s.rng = SplitMix(seed: seed)
            s.queue.completed = []
            s.handler.handle(Request(tag: 0, op: Op.read, flags: 0, offset: UInt64(16 * page), length: UInt32(4 * page),
                                     buffer: s.buffer + 16 * page), queue: s.queue)
            s.handler.handle(Request(tag: 1, op: Op.read, flags: 0, offset: UInt64(18 * page), length: UInt32(2 * page),
                                     buffer: s.buffer + 18 * page), queue: s.queue)
            s.handler.handle(Request(tag: 2, op: Op.read, flags: 0, offset: UInt64(16 * page), length: UInt32(page),
                                     buffer: s.buffer + 16 * page), queue: s.queue)
            XCTAssertEqual(s.handler.slots[1].stage, .waitingFetch)
            XCTAssertEqual(s.handler.slots[2].stage, .waitingFetch)
            s.settle()
            XCTAssertEqual(s.queue.completed.first { $0.tag == 0 }?.result, -EIO, "seed \(seed)")
            XCTAssertEqual(s.queue.completed.first { $0.tag == 1 }?.result, Int32(2 * page), "seed \(seed)")
            XCTAssertEqual(s.queue.completed.first { $0.tag == 2 }?.result, Int32(page), "seed \(seed)")
            XCTAssertTrue(s.bytes(18..<20) == Array(image[18 * page..<20 * page]), "seed \(seed)")
            XCTAssertTrue(s.bytes(16..<17) == Array(image[16 * page..<17 * page]), "seed \(seed)")
            XCTAssertEqual(s.queue.completed.count, 3, "each completed once (seed \(seed))")
            s.handler.shutdown(queue: s.queue)
        }
    }

    /// Seeded: bad bytes on the server (a few pages, for good), edits of the
    /// cache file between server runs, reads of random ranges four at a time
    /// (chunks of random sizes), scrubs. A read that touches a bad page fails
    /// with EIO; every other read completes once, with the image's bytes.
    func testSeededRandomReadsNeverReturnAByteThatIsNotTheImages() throws {
        let seeds = UInt64(ProcessInfo.processInfo.environment["VERIFY_SEEDS"] ?? "") ?? 12
        for seed in 1...seeds {
            try? FileManager.default.removeItem(atPath: dir + "/c")
            try? FileManager.default.removeItem(atPath: dir + "/b")
            var rng = SplitMix(seed: seed &* 7919)
            var remote = image
            var bad: Set<Int> = []
            for _ in 0..<(1 + Int(rng.next() % 3)) {
                let p = Int(rng.next() % UInt64(pages))
                bad.insert(p)
                remote[p * page + Int(rng.next() % UInt64(page))] ^= UInt8(1 + rng.next() % 255)
            }
            for run in 0..<3 {
                let s = try Server(dir: dir, remote: remote, root: root)
                s.rng = SplitMix(seed: seed &* 31 &+ UInt64(run))
                for _ in 0..<12 {
                    var asked: [UInt16: Range<Int>] = [:]
                    s.queue.completed = []
                    for tag in UInt16(0)..<UInt16(1 + rng.next() % 4) {
                        let first = Int(rng.next() % UInt64(pages))
                        let r = first..<min(pages, first + 1 + Int(rng.next() % 6))
                        asked[tag] = r
                        s.handler.handle(Request(tag: tag, op: Op.read, flags: 0, offset: UInt64(r.lowerBound * page),
                                                 length: UInt32(r.count * page), buffer: s.buffer + Int(tag) * 8 * page), queue: s.queue)
                    }
                    s.settle()
                    XCTAssertEqual(s.queue.completed.count, asked.count, "seed \(seed): each read completed once")
                    for (tag, r) in asked {
                        let result = s.queue.completed.first { $0.tag == tag }?.result
                        if r.contains(where: bad.contains) {
                            XCTAssertEqual(result, -EIO, "seed \(seed): a read of a bad page fails")
                        } else {
                            XCTAssertEqual(result, Int32(r.count * page), "seed \(seed): \(r)")
                            let got = Array(UnsafeRawBufferPointer(start: s.buffer + Int(tag) * 8 * page, count: r.count * page))
                            XCTAssertTrue(got == Array(image[r.lowerBound * page..<r.upperBound * page]), "seed \(seed): \(r) reads the image")
                        }
                    }
                    if rng.next() % 5 == 0 {
                        _ = s.handler.control(ControlRequest(op: .verify), queue: s.queue)
                        for _ in 0..<1000 where s.handler.scrubRunning { s.handler.idle(queue: s.queue) }
                        s.settle()
                    }
                }
                XCTAssertFalse(bad.contains { s.store.present.test(UInt64($0)) }, "seed \(seed): a bad page is never kept")
                s.handler.shutdown(queue: s.queue)
                // Between runs: a few present pages edited behind the server's back.
                for _ in 0..<Int(rng.next() % 3) {
                    editCache(page: Int(rng.next() % UInt64(pages)), dir)
                }
            }
        }
    }

    func testAServerThatMendsItselfIsBelievedOnTheSecondFetch() throws {
        var bad = image
        bad[5 * page] ^= 1
        let s = try Server(dir: dir, remote: bad, root: root)
        let result = s.read(0..<8) {
            if s.stats.verifyFailures == 1 { s.fetcher.remote = self.image }
        }
        XCTAssertEqual(result, Int32(8 * page))
        XCTAssertEqual(s.stats.verifyFailures, 1)
        XCTAssertTrue(s.bytes(0..<8) == Array(image[0..<8 * page]))
    }

    func testReusedPagesAreCheckedOnTheirFirstReadAndAnEditedOneIsFetchedAgain() throws {
        do {
            let s = try Server(dir: dir, remote: image, root: root)
            XCTAssertEqual(s.read(0..<pages), Int32(pages * page))
            s.handler.shutdown(queue: s.queue)
        }
        editCache(page: 9, dir)
        editCache(page: 30, dir)
        let s = try Server(dir: dir, remote: image, root: root)
        XCTAssertEqual(s.store.present.count, UInt64(pages), "the cache was reused")
        XCTAssertEqual(s.read(0..<pages), Int32(pages * page))
        XCTAssertTrue(s.bytes(0..<pages) == image, "the edited pages were fetched again, never served")
        XCTAssertEqual(s.stats.verifyFailures, 2)
        XCTAssertEqual(s.stats.pagesVerified, UInt64(pages), "38 reused and checked, 2 fetched again")
        // Checked once per run: a second read reads the file only.
        let before = s.fetcher.active.count
        XCTAssertEqual(s.read(0..<pages), Int32(pages * page))
        XCTAssertEqual(before, 0)
        XCTAssertEqual(s.stats.verifyFailures, 2)
    }

    func testTheScrubDropsAPageEditedBehindTheDevicesBack() throws {
        let s = try Server(dir: dir, remote: image, root: root)
        XCTAssertEqual(s.read(0..<pages), Int32(pages * page))
        editCache(page: 12, dir)
        let reply = s.handler.control(ControlRequest(op: .verify), queue: s.queue)
        XCTAssertTrue(reply.contains("\"state\":\"running\""), reply)
        XCTAssertTrue(reply.contains("\"pages_total\":\(pages)"), reply)
        var status = ""
        for _ in 0..<1000 {
            s.handler.idle(queue: s.queue)
            status = s.handler.control(ControlRequest(op: .verifyStatus), queue: s.queue)
            if !status.contains("running") { break }
        }
        XCTAssertTrue(status.contains("\"state\":\"done\""), status)
        XCTAssertTrue(status.contains("\"pages_dropped\":1"), status)
        XCTAssertTrue(status.contains("\"pages_checked\":\(pages)"), status)
        XCTAssertFalse(s.store.present.test(12))
        XCTAssertEqual(s.read(10..<14), Int32(4 * page))
        XCTAssertTrue(s.bytes(10..<14) == Array(image[10 * page..<14 * page]))
        // Nothing else to find now.
        _ = s.handler.control(ControlRequest(op: .verify), queue: s.queue)
        for _ in 0..<1000 where s.handler.scrubRunning { s.handler.idle(queue: s.queue) }
        XCTAssertTrue(s.handler.control(ControlRequest(op: .verifyStatus), queue: s.queue).contains("\"pages_dropped\":0"))
    }

    func testLocalWritesAreTheUsersAndAreNeverChecked() throws {
        let written = [UInt8](repeating: 0x5A, count: page)
        do {
            let s = try Server(dir: dir, remote: image, root: root, writable: true)
            memcpy(s.buffer + 3 * page, written, page)
            s.queue.completed = []
            s.handler.handle(Request(tag: 0, op: Op.write, flags: 0, offset: UInt64(3 * page), length: UInt32(page),
                                     buffer: s.buffer + 3 * page), queue: s.queue)
            s.settle()
            XCTAssertEqual(s.queue.completed.first?.result, Int32(page))
            s.handler.shutdown(queue: s.queue)
        }
        let s = try Server(dir: dir, remote: image, root: root, writable: true)
        XCTAssertEqual(s.read(0..<6), Int32(6 * page))
        XCTAssertTrue(s.bytes(3..<4) == written, "the local page reads as written")
        XCTAssertTrue(s.bytes(0..<3) == Array(image[0..<3 * page]))
        XCTAssertEqual(s.stats.verifyFailures, 0)
    }
}
