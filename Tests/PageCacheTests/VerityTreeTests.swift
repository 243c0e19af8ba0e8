import Foundation
import Glibc
import XCTest
@testable import PageCache

/// Hash trees made by Debian's `veritysetup format` (cryptsetup-bin), read
/// and checked by VerityTree: every block of the image verifies, a changed
/// byte anywhere (data, hash block, superblock, root) fails, and the tree's
/// variants (block sizes, algorithms, format 0, an appended tree, a one-block
/// image) agree with the tool that made them.
final class VerityTreeTests: XCTestCase {
    var dir = ""

    override func setUp() {
        dir = NSTemporaryDirectory() + "/verity-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    static let veritysetup = "/usr/sbin/veritysetup"

    /// Runs veritysetup (scripts/deps.sh installs it; a missing tool fails the test); its stdout.
    func veritysetup(_ args: [String]) throws -> String {
        guard access(VerityTreeTests.veritysetup, X_OK) == 0 else {
            XCTFail("\(VerityTreeTests.veritysetup) is missing: install cryptsetup-bin (scripts/deps.sh does)")
            throw VerityError("no veritysetup")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: VerityTreeTests.veritysetup)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0 else { throw VerityError("veritysetup \(args) failed: \(text)") }
        return text
    }

    /// Writes `bytes` of seeded pseudo-random data to `name`.
    @discardableResult
    func image(_ name: String, bytes: Int, seed: UInt64 = 1) -> [UInt8] {
        var s = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        let data = (0..<bytes).map { _ -> UInt8 in
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            return UInt8(truncatingIfNeeded: s)
        }
        FileManager.default.createFile(atPath: dir + "/" + name, contents: Data(data))
        return data
    }

    /// `veritysetup format` of `data` into `tree`: the root hash it printed.
    func format(_ data: String, _ tree: String, _ extra: [String] = []) throws -> String {
        let out = try veritysetup(["format"] + extra + [dir + "/" + data, dir + "/" + tree])
        guard let line = out.split(separator: "\n").first(where: { $0.hasPrefix("Root hash:") }) else {
            throw VerityError("no root hash in: \(out)")
        }
        return line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)
    }

    func open(_ name: String, root: String, offset: UInt64 = 0) throws -> VerityTree {
        let fd = Glibc.open(dir + "/" + name, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        return try VerityTree(fd: fd, owns: true, hashOffset: offset, rootHex: root)
    }

    /// The first block of `data` that fails, nil when all pass.
    func firstBad(_ tree: VerityTree, _ data: [UInt8]) -> UInt64? {
        data.withUnsafeBytes { tree.firstBad(offset: 0, bytes: $0) }
    }

    func error(_ body: () throws -> Void) -> String {
        do { try body(); return "no error" } catch { return "\(error)" }
    }

    func testEveryBlockOfAnImageVerifiesAgainstTheRootVeritysetupPrinted() throws {
        let data = image("a.img", bytes: 600 * 4096)  // 600 blocks: two levels of 4 KiB hash blocks
        let root = try format("a.img", "a.tree")
        let tree = try open("a.tree", root: root)
        XCTAssertEqual(tree.levels, 2)
        XCTAssertEqual(tree.params.dataBlocks, 600)
        XCTAssertEqual(tree.params.algorithm, "sha256")
        XCTAssertEqual(tree.params.salt.count, 32, "veritysetup's default salt")
        XCTAssertNil(firstBad(tree, data))
        // Streamed in uneven pieces, as a body arrives: the same answer.
        let s = tree.stream(from: 0)
        var o = 0, n = 1
        while o < data.count {
            let e = min(o + n, data.count)
            XCTAssertTrue(data.withUnsafeBytes { s.feed(UnsafeRawBufferPointer(rebasing: $0[o..<e])) })
            o = e
            n = n * 3 + 7
        }
        XCTAssertEqual(s.checkedUpTo, UInt64(data.count))
    }

    func testAFlippedByteFailsItsBlockOnly() throws {
        var data = image("a.img", bytes: 300 * 4096)
        let root = try format("a.img", "a.tree")
        let tree = try open("a.tree", root: root)
        data[137 * 4096 + 4000] ^= 0x01
        XCTAssertEqual(firstBad(tree, data), 137)
        for b in [0, 136, 138, 299] {
            XCTAssertTrue(data.withUnsafeBytes { tree.check(block: UInt64(b), data: UnsafeRawBufferPointer(rebasing: $0[b * 4096..<(b + 1) * 4096])) }, "block \(b)")
        }
        let s = tree.stream(from: 136 * 4096)
        XCTAssertFalse(data.withUnsafeBytes { s.feed(UnsafeRawBufferPointer(rebasing: $0[136 * 4096..<140 * 4096])) })
        XCTAssertEqual(s.failed, 137)
        XCTAssertEqual(s.goodBytes, 4096, "block 136, before it in the same chunk, is good")
        // A block is the data of its own number only.
        XCTAssertFalse(data.withUnsafeBytes { tree.check(block: 1, data: UnsafeRawBufferPointer(rebasing: $0[0..<4096])) })
    }

    func testARootOfAnotherImageIsRefused() throws {
        image("a.img", bytes: 64 * 4096, seed: 1)
        image("b.img", bytes: 64 * 4096, seed: 2)
        _ = try format("a.img", "a.tree")
        let other = try format("b.img", "b.tree")
        let e = error { _ = try open("a.tree", root: other) }
        XCTAssertTrue(e.contains("does not match --verity-root"), e)
    }

    func testAWrongButWellFormedTreeIsRefused() throws {
        // b's tree, a's root: every block of the tree is well formed, none is a's.
        image("a.img", bytes: 64 * 4096, seed: 1)
        image("b.img", bytes: 64 * 4096, seed: 2)
        let root = try format("a.img", "a.tree")
        _ = try format("b.img", "b.tree")
        let e = error { _ = try open("b.tree", root: root) }
        XCTAssertTrue(e.contains("does not match --verity-root"), e)
    }

    func testATruncatedTreeIsRefused() throws {
        image("a.img", bytes: 600 * 4096)
        let root = try format("a.img", "a.tree")
        XCTAssertEqual(truncate(dir + "/a.tree", 3 * 4096), 0)
        let e = error { _ = try open("a.tree", root: root) }
        XCTAssertTrue(e.contains("truncated"), e)
        XCTAssertEqual(truncate(dir + "/a.tree", 100), 0)
        let e2 = error { _ = try open("a.tree", root: root) }
        XCTAssertTrue(e2.contains("superblock"), e2)
    }

    func testAChangedHashBlockFailsTheBlocksUnderIt() throws {
        let data = image("a.img", bytes: 600 * 4096)
        let root = try format("a.img", "a.tree")
        // The tree: superblock, then the top level (1 block), then level 0 (5 blocks).
        // Change the second level-0 block: data blocks 128-255 lose their proof.
        let fd = Glibc.open(dir + "/a.tree", O_RDWR)
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, 4096 * 3 + 10), 1)
        b ^= 0x80
        XCTAssertEqual(pwrite(fd, &b, 1, 4096 * 3 + 10), 1)
        close(fd)
        let tree = try open("a.tree", root: root)
        XCTAssertEqual(firstBad(tree, data), 128)
        XCTAssertNil(data.withUnsafeBytes { tree.firstBad(offset: 0, bytes: UnsafeRawBufferPointer(rebasing: $0[0..<128 * 4096])) })
        XCTAssertNil(data.withUnsafeBytes { tree.firstBad(offset: 256 * 4096, bytes: UnsafeRawBufferPointer(rebasing: $0[256 * 4096..<600 * 4096])) })
        XCTAssertGreaterThan(tree.hashBlockFailures, 0)
    }

    func testALyingSuperblockFailsAtTheRoot() throws {
        image("a.img", bytes: 64 * 4096)
        let root = try format("a.img", "a.tree")
        // Another salt in the superblock: the top block hashes to another digest.
        let fd = Glibc.open(dir + "/a.tree", O_RDWR)
        var b: UInt8 = 0
        XCTAssertEqual(pread(fd, &b, 1, 88), 1)
        b ^= 1
        XCTAssertEqual(pwrite(fd, &b, 1, 88), 1)
        close(fd)
        let e = error { _ = try open("a.tree", root: root) }
        XCTAssertTrue(e.contains("does not match --verity-root"), e)
    }

    func testOtherBlockSizesAlgorithmsAndFormat0() throws {
        let data = image("a.img", bytes: 200 * 4096)
        for extra in [["--data-block-size=1024", "--hash-block-size=1024"], ["--hash-block-size=512"],
                      ["--hash=sha1"], ["--hash=sha512"], ["--format=0"], ["--salt=-"]] {
            let root = try format("a.img", "x.tree", extra)
            let tree = try open("x.tree", root: root)
            XCTAssertNil(firstBad(tree, data), "\(extra)")
            var bad = data
            bad[50 * 4096 + 1] ^= 4
            XCTAssertEqual(firstBad(tree, bad), 50 * 4096 / UInt64(tree.dataBlockSize), "\(extra)")
            unlink(dir + "/x.tree")
        }
    }

    func testATreeAppendedToTheImage() throws {
        let data = image("a.img", bytes: 100 * 4096)
        let root = try format("a.img", "a.img", ["--data-blocks=100", "--hash-offset=\(100 * 4096)"])
        let tree = try open("a.img", root: root, offset: 100 * 4096)
        XCTAssertEqual(tree.params.dataBytes, 100 * 4096)
        XCTAssertNil(firstBad(tree, data))
    }

    func testAOneBlockImageIsItsOwnRoot() throws {
        let data = image("a.img", bytes: 4096)
        let root = try format("a.img", "a.tree")
        let tree = try open("a.tree", root: root)
        XCTAssertEqual(tree.levels, 0)
        XCTAssertNil(firstBad(tree, data))
        var bad = data
        bad[7] ^= 1
        XCTAssertEqual(firstBad(tree, bad), 0)
    }

    func testTheHashBlockMemoryIsBounded() throws {
        let data = image("a.img", bytes: 2000 * 4096)  // 16 level-0 blocks
        let root = try format("a.img", "a.tree")
        let fd = Glibc.open(dir + "/a.tree", O_RDONLY)
        let tree = try VerityTree(fd: fd, owns: true, hashOffset: 0, rootHex: root, cacheBlocks: 4)
        XCTAssertNil(firstBad(tree, data), "blocks dropped from memory are read and verified again")
        XCTAssertEqual(tree.memoryBytes, 4 * 4096)
        XCTAssertGreaterThan(tree.hashBlocksRead, 16)
    }

    func testBadRootsAreRefused() throws {
        image("a.img", bytes: 8 * 4096)
        let root = try format("a.img", "a.tree")
        for bad in ["", "xyz", String(root.dropLast(2)), root + "00"] {
            let e = error { _ = try open("a.tree", root: bad) }
            XCTAssertTrue(e.contains("--verity-root"), "\(bad): \(e)")
        }
        XCTAssertNoThrow(try open("a.tree", root: root.uppercased()))
    }
}
