// Which data files get O_DIRECT, what the device must then align, and that
// everything the caching handler writes into a direct cache file is aligned
// (fetched bytes arrive in chunks of any size; the image's last page is short).
import Foundation
import Glibc
import PageCache
import XCTest
import CUring
@testable import UblkTarget

final class DirectIOTests: XCTestCase {
    let tmpfs: Int64 = 0x0102_1994, ext4: Int64 = 0xEF53

    func testPolicy() {
        let known = DirectIO.Alignment.known(memory: 512, offset: 512)
        func d(fs: Int64 = 0xEF53, errno e: Int32 = 0, _ a: DirectIO.Alignment? = .known(memory: 512, offset: 512),
               page: Int = 4096, size: UInt64 = 1 << 20, pads: Bool = false) -> FileIO {
            DirectIO.decide(fsType: fs, openErrno: e, alignment: a, pageSize: page, size: size, padsTail: pads)
        }
        XCTAssertEqual(d(), .direct(memory: 512, offset: 512))
        XCTAssertEqual(d().description, "direct")
        // In memory: the inline / user-copy path stays, O_DIRECT is not even tried.
        XCTAssertEqual(d(fs: tmpfs).description, "inline (file in memory: tmpfs)")
        XCTAssertEqual(d(fs: 0x8584_58f6).description, "inline (file in memory: ramfs)")
        XCTAssertEqual(d(errno: EINVAL).description, "buffered (file system refused O_DIRECT)")
        XCTAssertEqual(d(.unsupported).description, "buffered (file system takes no direct I/O on this file)")
        XCTAssertEqual(d(.known(memory: 4, offset: 4096)), .direct(memory: 4, offset: 4096))
        XCTAssertEqual(d(.known(memory: 0, offset: 512)), .direct(memory: 1, offset: 512))
        XCTAssertFalse(d(.known(memory: 512, offset: 8192)).isDirect)
        // A page smaller than the alignment cannot be fetched and written alone.
        XCTAssertEqual(d(.known(memory: 512, offset: 4096), page: 512).description,
                       "buffered (page size 512 is below the direct I/O alignment 4096)")
        // A size that ends inside a block: buffered, unless the caller pads the tail (http's cache file).
        XCTAssertEqual(d(.known(memory: 512, offset: 4096), size: 4096 * 3 + 512).description,
                       "buffered (size 12800 is not a multiple of the direct I/O alignment 4096)")
        XCTAssertTrue(d(.known(memory: 512, offset: 4096), size: 4096 * 3 + 1000, pads: true).isDirect)
        XCTAssertTrue(d(known, size: 512 * 7).isDirect)
        // What the device gets.
        XCTAssertEqual(DirectIO.logicalBlockShift([.buffered("x")]), 9)
        XCTAssertEqual(DirectIO.logicalBlockShift([.direct(memory: 512, offset: 512), .buffered("x")]), 9)
        XCTAssertEqual(DirectIO.logicalBlockShift([.direct(memory: 512, offset: 512), .direct(memory: 4, offset: 4096)]), 12)
        XCTAssertEqual(DirectIO.dmaAlignment([.inline("tmpfs")]), 0)
        XCTAssertEqual(DirectIO.dmaAlignment([.direct(memory: 4, offset: 4096), .direct(memory: 512, offset: 512)]), 512)
    }

    /// Opens a file on the host's /tmp and on /dev/shm as the targets do.
    func testOpenOnHostFileSystems() throws {
        let path = NSTemporaryDirectory() + "dio-\(getpid())"
        defer { unlink(path) }
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        ftruncate(fd, 1 << 20)
        let r = DirectIO.open(path: path, flags: O_RDWR, existing: fd, pageSize: 4096, size: 1 << 20, padsTail: false)
        print("# \(path) on file system 0x\(String(cu_fs_type(fd), radix: 16)): \(r.io), alignment \(r.io.memoryAlignment)/\(r.io.offsetAlignment)")
        if DirectIO.memoryFS[cu_fs_type(fd)] != nil {
            XCTAssertEqual(r.fd, -1)
            XCTAssertTrue(r.io.description.hasPrefix("inline"))
        } else if r.io.isDirect {
            defer { close(r.fd) }
            XCTAssertNotEqual(fcntl(r.fd, F_GETFL) & cu_o_direct, 0, "the fd is really O_DIRECT")
            // An unaligned offset is refused: the fd does direct I/O, so the alignment rules are real.
            // (The memory alignment is what the disk promises; the kernel may accept less.)
            let buf = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
            defer { buf.deallocate() }
            let a = r.io.offsetAlignment
            XCTAssertEqual(pwrite(r.fd, buf, a, 0), a)
            XCTAssertEqual(pwrite(r.fd, buf, a, 1), -1)
            XCTAssertEqual(errno, EINVAL)
        } else {
            XCTAssertEqual(r.fd, -1)
            XCTAssertTrue(r.io.description.hasPrefix("buffered ("), r.io.description)
        }
        // tmpfs: the in-memory path, whatever it would say to O_DIRECT.
        let shm = "/dev/shm/dio-\(getpid())"
        let sfd = open(shm, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        if sfd >= 0 {
            defer { close(sfd); unlink(shm) }
            let s = DirectIO.open(path: shm, flags: O_RDWR, existing: sfd, pageSize: 4096, size: 1 << 20, padsTail: false)
            XCTAssertEqual(s.fd, -1)
            XCTAssertEqual(s.io.description, "inline (file in memory: tmpfs)")
        }
    }

    /// An http cache file opened with O_DIRECT where the host's /tmp takes it
    /// (else buffered writes with the same staging checked by a fake alignment
    /// rule): fetched bytes in chunks of random size, an image whose size is
    /// not a multiple of 4096 nor of 512, read back whole.
    func testFetchStagingIsAlignedAndPadsTheLastPage() throws {
        logMuted = true
        for align in [512, 4096] {
            for seed in UInt64(1)...6 { try stagingRun(align: align, seed: seed) }
        }
    }

    func stagingRun(align: Int, seed: UInt64) throws {
        let page = 4096
        let imageSize = 5 * page + 1000
        let dir = NSTemporaryDirectory() + "dio-stage-\(getpid())-\(align)-\(seed)"
        mkdir(dir, 0o700)
        defer {
            for f in ["c", "b"] { unlink(dir + "/" + f) }
            rmdir(dir)
        }
        var remote = [UInt8](repeating: 0, count: imageSize)
        var rng = SplitMix(seed: seed)
        for i in 0..<imageSize { remote[i] = UInt8(truncatingIfNeeded: rng.next()) | 1 }
        let id = BitmapIdentity(kind: .present, pageSize: page, imageSize: UInt64(imageSize), url: "test://staging", etag: "e")
        let store = try CacheStore.open(CacheStoreSpec(cachePath: dir + "/c", bitmapPath: dir + "/b", identity: id))
        let opened = DirectIO.open(path: dir + "/c", flags: O_RDWR, existing: store.cache.fd, pageSize: page,
                                   size: UInt64(imageSize), padsTail: true)
        defer { if opened.fd >= 0 { close(opened.fd) } }
        let context = CacheContext(cache: store.cache, bitmap: store.present, dirty: nil, imageSize: UInt64(imageSize),
                                   pageSize: page, stats: CacheStats()) {
            HTTPStats(hits: 0, misses: 0, bytesFetched: 0, requests: 0, retries: 0, errors: 0, missLatencyP50Ms: nil,
                      missLatencyP99Ms: nil, pagesPresent: 0, pagesTotal: 0, pageSize: page)
        }
        context.publishStats = false
        context.dataFD = opened.fd
        // Where the host cannot do direct I/O, the fake queue enforces the same rule.
        context.directAlignment = opened.io.isDirect ? max(opened.io.offsetAlignment, align) : align
        let queue = FakeQueue(depth: 4, files: FaultFiles())
        queue.requireAlignment = context.directAlignment
        let fetcher = FakeFetcher(remote: remote)
        let planner = FetchPlanner(imageSize: UInt64(imageSize), pageSize: page, maxRunBytes: 8 << 10,
                                   initialReadaheadBytes: 4 << 10, maxReadaheadBytes: 8 << 10, maxActiveRuns: 2)
        let handler = CachingHandler(context: context, fetcher: fetcher, planner: planner, depth: 4)
        queue.handler = handler
        queue.alignedFD = handler.cacheFD
        XCTAssertEqual(handler.cacheFD, opened.fd >= 0 ? opened.fd : store.cache.fd)
        // The device is the image rounded up to the block: read it in two requests (the second crosses the end).
        let deviceSize = (imageSize + context.directAlignment - 1) / context.directAlignment * context.directAlignment
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: deviceSize, alignment: 4096)
        defer { buffer.deallocate() }
        memset(buffer, 0xAA, deviceSize)
        let split = 2 * page
        handler.handle(Request(tag: 0, op: Op.read, flags: 0, offset: 0, length: UInt32(split), buffer: buffer), queue: queue)
        handler.handle(Request(tag: 1, op: Op.read, flags: 0, offset: UInt64(split), length: UInt32(deviceSize - split),
                               buffer: buffer + split), queue: queue)
        var steps = 0
        while (fetcher.step(&rng, handler: handler, queue: queue) || queue.runOne()) && steps < 10_000 { steps += 1 }
        XCTAssertEqual(queue.misaligned, [], "every I/O on the direct cache file aligned (align \(align), seed \(seed))")
        XCTAssertEqual(Set(queue.completed.map(\.tag)), [0, 1])
        for c in queue.completed {
            XCTAssertEqual(c.result, c.tag == 0 ? Int32(split) : Int32(deviceSize - split), "tag \(c.tag)")
        }
        XCTAssertTrue(memcmp(buffer, remote, imageSize) == 0, "the image reads back (align \(align), seed \(seed))")
        let tail = UnsafeRawBufferPointer(start: buffer + imageSize, count: deviceSize - imageSize)
        XCTAssertTrue(tail.allSatisfy { $0 == 0 }, "past the image: zeros")
        // The trailer past the image is intact (the padded block ends before it).
        switch try store.cache.readTrailer() {
        case .success(let t): XCTAssertEqual(t.binding, store.present.binding)
        case .failure(let p): XCTFail("trailer: \(p)")
        }
        XCTAssertEqual(store.present.count, store.present.pageCount)
    }
}
