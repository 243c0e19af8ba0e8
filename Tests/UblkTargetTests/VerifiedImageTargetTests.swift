import Foundation
import Glibc
import XCTest
@testable import PageCache
@testable import UblkTarget

/// A verified http device's tree as `add` finds it (HTTPVerity.swift), over
/// the fault server (Tests/tools/faultserver.py): a tree URL downloaded once
/// and reused, a tree appended to the image, a local tree file; refused in
/// one line: a root of another image, a truncated tree, a tree of another
/// image's size; the root is part of the cache's identity; and a body with a
/// flipped byte, as the server sends it, fails the check where it was flipped.
final class VerifiedImageTargetTests: XCTestCase {
    let page = 4096
    let pages = 48
    var dir = ""
    var image: [UInt8] = []
    var server: Process?
    var port: UInt16 = 0
    let stdinPipe = Pipe()

    func path(_ name: String) -> String { dir + "/" + name }

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "/verified-target-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        var s: UInt64 = 0x0DDB_A11C_AFE5_1234
        image = (0..<pages * page).map { _ -> UInt8 in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return UInt8(truncatingIfNeeded: s)
        }
        FileManager.default.createFile(atPath: path("img"), contents: Data(image))
        FileManager.default.createFile(atPath: path("other"), contents: Data(image.reversed()))
    }

    override func tearDown() {
        if let p = server, p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// veritysetup format; the root hash it printed.
    func format(_ args: [String]) throws -> String {
        guard access("/usr/sbin/veritysetup", X_OK) == 0 else {
            XCTFail("/usr/sbin/veritysetup is missing: install cryptsetup-bin (scripts/deps.sh does)")
            throw VerityError("no veritysetup")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/veritysetup")
        p.arguments = ["format"] + args
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Root hash:") }) else {
            throw VerityError("veritysetup \(args): \(text)")
        }
        return line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)
    }

    /// The fault server over the image, serving the other files by name.
    func serve(_ names: [String]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/faultserver.py").path
        p.arguments = [script, "--file", path("img"), "--log", path("log")] + names.flatMap { ["--serve", "\($0)=\(path($0))"] }
        let out = Pipe()
        p.standardOutput = out
        p.standardInput = stdinPipe
        try p.run()
        server = p
        var line = Data()
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self)
        port = UInt16(text.dropFirst(5).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        XCTAssertGreaterThan(port, 0, text)
    }

    func url(_ name: String) -> String { "http://127.0.0.1:\(port)/\(name)" }

    /// GETs the server logged for `name`.
    func gets(_ name: String) -> Int {
        let log = (try? String(contentsOfFile: path("log"), encoding: .utf8)) ?? ""
        return log.split(separator: "\n").filter { $0.contains("\"GET\"") && $0.contains("\"/\(name)") }.count
    }

    func options(_ image: String, _ verity: VeritySpec, cache: String = "c") -> HTTPTargetOptions {
        var o = HTTPTargetOptions(http: HTTPConfig(url: url(image)), cachePath: path(cache), bitmapPath: path(cache + ".bitmap"))
        o.liveState = nil
        o.verity = verity
        return o
    }

    func refusal(_ o: HTTPTargetOptions) -> String {
        do { _ = try HTTPTarget(o); return "started" } catch { return "\(error)" }
    }

    func testATreeURLIsDownloadedOnceAndKeptBesideTheCache() throws {
        let root = try format([path("img"), path("tree")])
        try serve(["tree"])
        do {
            let t = try HTTPTarget(options("img", VeritySpec(rootHex: root, tree: url("tree"), offset: nil)))
            XCTAssertEqual(t.remote.size, UInt64(pages * page))
            XCTAssertEqual(t.options["verity_root"], root)
            XCTAssertNotNil(t.verity)
        }
        XCTAssertEqual(FaultFiles.contents(path("c.verity")), FaultFiles.contents(path("tree")), "the copy beside the cache")
        let fetched = gets("tree")
        XCTAssertGreaterThan(fetched, 0)
        _ = try HTTPTarget(options("img", VeritySpec(rootHex: root, tree: url("tree"), offset: nil)))
        XCTAssertEqual(gets("tree"), fetched, "a copy that verifies is used again")
        // A copy that does not verify (edited) is fetched anew.
        let fd = open(path("c.verity"), O_RDWR)
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, 4096 + 5), 1)
        b ^= 0xFF  // flipped, never written as it was (a fixed value matched 1 time in 256)
        XCTAssertEqual(pwrite(fd, &b, 1, 4096 + 5), 1)
        close(fd)
        _ = try HTTPTarget(options("img", VeritySpec(rootHex: root, tree: url("tree"), offset: nil)))
        XCTAssertGreaterThan(gets("tree"), fetched)
    }

    func testATreeAppendedToTheImageLeavesTheDataAsTheDevice() throws {
        FileManager.default.createFile(atPath: path("both"), contents: Data(image))
        let root = try format(["--data-blocks=\(pages)", "--hash-offset=\(pages * page)", path("both"), path("both")])
        try serve(["both"])
        let t = try HTTPTarget(options("both", VeritySpec(rootHex: root, tree: nil, offset: UInt64(pages * page))))
        XCTAssertEqual(t.remote.size, UInt64(pages * page), "the device is the data, not the tree after it")
        XCTAssertEqual(t.params.size, UInt64(pages * page))
    }

    func testALocalTreeFile() throws {
        let root = try format([path("img"), path("tree")])
        try serve([])
        let t = try HTTPTarget(options("img", VeritySpec(rootHex: root, tree: path("tree"), offset: nil)))
        XCTAssertEqual(t.options["verity_tree"], path("tree"))
        XCTAssertEqual(access(path("c.verity"), F_OK), -1, "a local tree is read in place")
    }

    func testWrongTreesAreRefusedInOneLine() throws {
        let root = try format([path("img"), path("tree")])
        let otherRoot = try format([path("other"), path("othertree")])
        FileManager.default.createFile(atPath: path("short"), contents: Data(FaultFiles.contents(path("tree")).prefix(4096 + 100)))
        FileManager.default.createFile(atPath: path("half"), contents: Data(image.prefix(pages * page / 2)))
        let halfRoot = try format([path("half"), path("halftree")])
        try serve(["tree", "short", "othertree", "halftree"])
        let cases: [(VeritySpec, String)] = [
            (VeritySpec(rootHex: otherRoot, tree: url("tree"), offset: nil), "does not match --verity-root"),
            (VeritySpec(rootHex: root, tree: url("short"), offset: nil), "truncated"),
            (VeritySpec(rootHex: root, tree: url("missing-tree-\(port)"), offset: nil), "verity"),
            (VeritySpec(rootHex: root, tree: path("nothere"), offset: nil), "cannot open --verity-tree"),
            (VeritySpec(rootHex: root, tree: nil, offset: nil), "--verity-tree"),
            (VeritySpec(rootHex: "abc", tree: url("tree"), offset: nil), "--verity-root"),
        ]
        for (i, (spec, want)) in cases.enumerated() {
            let e = refusal(options("img", spec, cache: "c\(i)"))
            XCTAssertTrue(e.contains(want), "\(spec): \(e)")
            XCTAssertFalse(e.contains("\n"), e)
        }
        // A tree of another image's size (half of it): refused even with its own root.
        // (A tree of another image of the same size, with its root, is consistent:
        // its blocks fail when fetched; VerifiedFetchTests shows what that does.)
        let e = refusal(options("img", VeritySpec(rootHex: halfRoot, tree: url("halftree"), offset: nil), cache: "ch"))
        XCTAssertTrue(e.contains("covers \(pages * page / 2) bytes"), e)
    }

    func testTheRootIsPartOfTheCachesIdentity() throws {
        // Two trees of the same image (other salts): both valid, each its own cache.
        let r1 = try format(["--salt=01", path("img"), path("tree")])
        let r2 = try format(["--salt=02", path("img"), path("tree2")])
        XCTAssertNotEqual(r1, r2)
        try serve(["tree", "tree2"])
        do {
            let first = try HTTPTarget(options("img", VeritySpec(rootHex: r1, tree: path("tree"), offset: nil)))
            first.device.store.present.markPresent(0..<4)
            try first.device.store.present.commit(syncing: first.device.store.cache)
        }
        do {
            let again = try HTTPTarget(options("img", VeritySpec(rootHex: r1, tree: path("tree"), offset: nil)))
            XCTAssertEqual(again.cacheState, "reused")
            XCTAssertEqual(again.device.store.present.count, 4)
        }
        do {
            let other = try HTTPTarget(options("img", VeritySpec(rootHex: r2, tree: path("tree2"), offset: nil)))
            XCTAssertTrue(other.cacheState.contains("afresh"), other.cacheState)
            XCTAssertEqual(other.device.store.present.count, 0)
        }
        var plain = options("img", VeritySpec(rootHex: r2, tree: nil, offset: nil))
        plain.verity = nil
        XCTAssertTrue(try HTTPTarget(plain).cacheState.contains("afresh"), "unverified is another cache too")
    }

    /// A handler over a fresh cache whose tree comes on demand from the fault
    /// server (`treeQuery` on the tree's URL), the data from a fake fetcher.
    func onDemand(_ root: String, treeQuery: String = "") throws -> (CachingHandler, FakeQueue, FakeFetcher, CacheContext, CacheStore) {
        let size = UInt64(image.count)
        let spec = VeritySpec(rootHex: root, tree: url("tree") + treeQuery, offset: nil)
        let tree = try HTTPVerity.downloaded(spec, http: HTTPConfig(url: url("img")), remote: nil, cachePath: path("c"))
        let id = BitmapIdentity(kind: .present, pageSize: page, imageSize: size, url: "test://on-demand", etag: "e")
        let store = try CacheStore.open(CacheStoreSpec(cachePath: path("c"), bitmapPath: path("c.bitmap"), identity: id))
        let context = CacheContext(cache: store.cache, bitmap: store.present, dirty: nil, imageSize: size, pageSize: page,
                                   stats: CacheStats()) {
            HTTPStats(hits: 0, misses: 0, bytesFetched: 0, requests: 0, retries: 0, errors: 0, missLatencyP50Ms: nil,
                      missLatencyP99Ms: nil, pagesPresent: 0, pagesTotal: 0, pageSize: 4096)
        }
        context.publishStats = false
        context.verity = tree
        context.verified = PageBits(pageCount: store.present.pageCount)
        context.treeFetcher = try XCTUnwrap(HTTPVerity.fetcher(spec, http: HTTPConfig(url: url("img")), cachePath: path("c"),
                                                               tree: tree, stats: context.stats))
        let queue = FakeQueue(depth: 8, files: FaultFiles())
        queue.fireable = [context.treeFetcher!.pollFD]
        let fetcher = FakeFetcher(remote: image)
        let planner = FetchPlanner(imageSize: size, pageSize: page, maxRunBytes: 64 << 10,
                                   initialReadaheadBytes: 0, maxReadaheadBytes: 0, maxActiveRuns: 2)
        let handler = try CachingHandler.make(context: context, fetcher: fetcher, planner: planner, queue: queue, deviceSize: size)
        queue.handler = handler
        return (handler, queue, fetcher, context, store)
    }

    /// Reads `pages` in one request, driving the fake fetcher and the tree's real transfers; its result.
    func read(_ pages: Range<Int>, _ h: CachingHandler, _ q: FakeQueue, _ f: FakeFetcher, into buffer: UnsafeMutableRawPointer) -> Int32? {
        var rng = SplitMix(seed: 3)
        q.completed = []
        h.handle(Request(tag: 0, op: Op.read, flags: 0, offset: UInt64(pages.lowerBound * page), length: UInt32(pages.count * page),
                         buffer: buffer + pages.lowerBound * page), queue: q)
        let deadline = monotonicNanos() + 20_000_000_000
        while q.completed.isEmpty && monotonicNanos() < deadline {
            if !(f.step(&rng, handler: h, queue: q) || q.runOne()) { usleep(1000) }
            h.idle(queue: q)
        }
        return q.completed.first?.result
    }

    func testATreeURLIsFetchedOnDemandOneHashBlockAtATime() throws {
        let root = try format([path("img"), path("tree")])   // 48 blocks: one hash block, the top
        // A bigger image: 600 blocks, two levels (the top and 5 blocks under it).
        var s: UInt64 = 77
        image = (0..<600 * page).map { _ -> UInt8 in s ^= s << 13; s ^= s >> 7; s ^= s << 17; return UInt8(truncatingIfNeeded: s) }
        FileManager.default.createFile(atPath: path("img"), contents: Data(image))
        let root600 = try format([path("img"), path("tree")])
        XCTAssertNotEqual(root, root600)
        try serve(["tree"])
        let (h, q, f, context, store) = try onDemand(root600)
        let copy = path("c.verity")
        XCTAssertEqual(FaultFiles.contents(copy).count, FaultFiles.contents(path("tree")).count, "as large as the tree")
        let getsAfterAdd = gets("tree")
        XCTAssertEqual(getsAfterAdd, 2, "add fetched the superblock and the top block")
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: image.count, alignment: 4096)
        defer { buffer.deallocate() }
        // The last pages: their hash block alone (nothing after it to read ahead).
        XCTAssertEqual(read(598..<600, h, q, f, into: buffer), Int32(2 * page))
        XCTAssertTrue(memcmp(buffer + 598 * page, Array(image[598 * page..<600 * page]), 2 * page) == 0)
        XCTAssertEqual(gets("tree"), getsAfterAdd + 1, "one hash block fetched for the first read")
        XCTAssertEqual(FaultFiles.contents(copy).filter { $0 != 0 }.count > 3 * 4096, false, "the copy holds 3 blocks at most")
        // The first pages: their hash block, and those after it read ahead (blocks 1-3), in one more request.
        XCTAssertEqual(read(0..<4, h, q, f, into: buffer), Int32(4 * page))
        XCTAssertTrue(memcmp(buffer, image, 4 * page) == 0)
        XCTAssertLessThanOrEqual(gets("tree"), getsAfterAdd + 3)
        let getsBefore = gets("tree")
        XCTAssertEqual(read(300..<302, h, q, f, into: buffer), Int32(2 * page))
        XCTAssertEqual(gets("tree"), getsBefore, "read ahead: nothing more to fetch for the middle")
        XCTAssertEqual(read(0..<600, h, q, f, into: buffer), Int32(600 * page))
        XCTAssertTrue(memcmp(buffer, image, image.count) == 0)
        XCTAssertEqual(FaultFiles.contents(copy), FaultFiles.contents(path("tree")), "every hash block now in the copy")
        XCTAssertEqual(context.stats.verifyFailures, 0)
        XCTAssertEqual(store.present.count, 600)
        h.shutdown(queue: q)
    }

    func testAHandlerThatFetchesATreeIsFreedWithItsQueue() throws {
        // On the driver, DEL_DEV waits until the queue's mapping of /dev/ublkcN
        // is gone: nothing may keep a stopped queue alive.
        let root = try format([path("img"), path("tree")])
        try serve(["tree"])
        weak var queue: FakeQueue?
        weak var handler: CachingHandler?
        do {
            let (h, q, f, _, _) = try onDemand(root)
            q.owned = h  // as a real Queue holds its handler
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: image.count, alignment: 4096)
            defer { buffer.deallocate() }
            XCTAssertEqual(read(0..<8, h, q, f, into: buffer), Int32(8 * page))
            h.drain(queue: q)
            h.shutdown(queue: q)
            queue = q
            handler = h
        }
        XCTAssertNil(queue, "the queue is freed")
        XCTAssertNil(handler, "and its handler")
    }

    func testAHashBlockThatDoesNotVerifyFailsOnlyThePagesUnderIt() throws {
        var s: UInt64 = 77
        image = (0..<600 * page).map { _ -> UInt8 in s ^= s << 13; s ^= s >> 7; s ^= s << 17; return UInt8(truncatingIfNeeded: s) }
        FileManager.default.createFile(atPath: path("img"), contents: Data(image))
        let root = try format([path("img"), path("tree")])
        try serve(["tree"])
        // The tree: superblock (4096), top (4096), then level 0: block 1 covers data blocks 128-255.
        let (h, q, f, context, store) = try onDemand(root, treeQuery: "?mode=flip&id=h1&at=\(4096 * 3 + 100)")
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: image.count, alignment: 4096)
        defer { buffer.deallocate() }
        XCTAssertEqual(read(130..<131, h, q, f, into: buffer), -EIO, "its hash block does not verify")
        XCTAssertEqual(read(10..<12, h, q, f, into: buffer), Int32(2 * page))
        XCTAssertEqual(read(300..<301, h, q, f, into: buffer), Int32(page))
        XCTAssertTrue(memcmp(buffer + 300 * page, Array(image[300 * page..<301 * page]), page) == 0)
        XCTAssertFalse(store.present.test(130), "nothing fetched for a page whose hash block does not verify")
        _ = context
        h.shutdown(queue: q)
    }

    func testAFlippedByteInTheBodyFailsItsBlock() throws {
        let root = try format([path("img"), path("tree")])
        try serve([])
        let fd = open(path("tree"), O_RDONLY)
        let tree = try VerityTree(fd: fd, owns: true, hashOffset: 0, rootHex: root)
        let at = 29 * page + 1234
        for (query, bad) in [("mode=flip&n=1&id=f1&at=\(at)", UInt64?(29)), ("mode=ok&id=f2", nil)] {
            let source = try HTTPSource(config: HTTPConfig(url: url("img") + "?" + query))
            let stream = tree.stream(from: 0)
            var done = false
            source.fetch(offset: 0, length: image.count, onData: { _, bytes in stream.feed(bytes) },
                         completion: { _ in done = true })
            while !done { _ = source.runUntilIdle(timeout: 30) }
            XCTAssertEqual(stream.failed, bad, query)
        }
    }
}
