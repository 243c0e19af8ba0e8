// LiveBits: a live directory with no room for the words is an error when the
// bitmap is opened (one line naming the directory and the bytes), never a
// SIGBUS at a later store into the mapping.
import Foundation
import Glibc
import XCTest
@testable import PageCache

final class LiveBitsTests: XCTestCase {
    var dir: TempDir!
    override func setUp() { dir = TempDir() }
    override func tearDown() { dir = nil }

    /// An http overlay's spec for an image of `size` bytes, live words under `liveDir`.
    func spec(size: UInt64, liveDir: String, writable: Bool = true) -> CacheStoreSpec {
        let id = BitmapIdentity(pageSize: 4096, imageSize: size, url: "http://example/image", etag: "\"one\"")
        var s = CacheStoreSpec(cachePath: dir.file("c"), bitmapPath: dir.file("b"), identity: id)
        s.dirty = writable ? .open : .none
        s.local = writable ? .open : .refuse { "holds \($0) locally written pages" }
        s.live = LiveConfig(directory: liveDir, bootID: "boot-A", required: true)
        return s
    }

    func files(_ d: String) -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: d)) ?? []).sorted() }

    /// The reservation's failure, injected: an error naming the directory and
    /// the bytes, the file made for it removed; without `required`, private memory.
    func testNoRoomToReserveIsAnErrorNamingTheDirectoryAndTheBytes() throws {
        let live = dir.file("live")
        let config = LiveConfig(directory: live, bootID: "boot-A", required: true)
        close(open(dir.file("b"), O_CREAT | O_WRONLY, 0o600))
        let noRoom: (Int32, Int) -> Int32 = { _, _ in ENOSPC }
        XCTAssertThrowsError(try LiveFile.open(config: config, bitmapPath: dir.file("b"), role: "present", pageCount: 1 << 20,
                                               reserve: noRoom)) { e in
            let text = "\(e)"
            XCTAssertFalse(text.contains("\n"), text)
            XCTAssertTrue(text.contains(live) && text.contains("\(4096 + (1 << 20) / 8) bytes") && text.contains("No space left on device"), text)
        }
        XCTAssertEqual(files(live), [], "no half-made live file left")
        var optional = config
        optional.required = false
        XCTAssertNil(try LiveFile.open(config: optional, bitmapPath: dir.file("b"), role: "present", pageCount: 1 << 20, reserve: noRoom))
        XCTAssertEqual(files(live), [])
        // A live file already there (a dead server's words) is never removed: an error, required or not.
        let made = try XCTUnwrap(LiveFile.open(config: config, bitmapPath: dir.file("b"), role: "present", pageCount: 1 << 20))
        made.unmap()
        XCTAssertEqual(files(live).count, 1)
        XCTAssertThrowsError(try LiveFile.open(config: optional, bitmapPath: dir.file("b"), role: "present", pageCount: 1 << 20,
                                               reserve: noRoom))
        XCTAssertEqual(files(live).count, 1)
    }

    /// The real thing: a tmpfs of 8 KiB under the live directory, an image
    /// whose words need more. Opening the store is a one-line error; nothing
    /// is left in the directory; a store in private memory still works.
    func testAFullTmpfsIsAnErrorAtOpenNotSIGBUS() throws {
        let live = dir.file("live")
        XCTAssertEqual(mkdir(live, 0o700), 0)
        guard run("/bin/mount", "-t", "tmpfs", "-o", "size=8k,mode=0700", "tmpfs", live) == 0 else {
            throw XCTSkip("cannot mount a tmpfs here (needs root): the full-/run case is checked by tests/vm/input.sh")
        }
        defer { _ = run("/bin/umount", live) }
        // 1 GiB: 262144 pages, 32 KiB of words per bitmap.
        do {
            _ = try CacheStore.open(spec(size: 1 << 30, liveDir: live))
            XCTFail("opened with live words the tmpfs cannot hold")
        } catch {
            let text = error.description
            XCTAssertFalse(text.contains("\n"), text)
            XCTAssertTrue(text.contains(live) && text.contains("\(4096 + (1 << 30) / 4096 / 8) bytes"), text)
        }
        XCTAssertEqual(files(live), [], "no live file left behind")
        // A small read-only image fits (one live file of two tmpfs pages): its words are stored into the mapping.
        for f in files(dir.path) where f.hasPrefix("b") || f == "c" { unlink(dir.file(f)) }
        let small = try CacheStore.open(spec(size: 64 << 10, liveDir: live, writable: false))
        small.present.markPresent(0..<16)
        XCTAssertEqual(small.present.count, 16)
    }

    @discardableResult
    func run(_ args: String...) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: args[0])
        p.arguments = Array(args.dropFirst())
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return -1 }
        p.waitUntilExit()
        return p.terminationStatus
    }
}
