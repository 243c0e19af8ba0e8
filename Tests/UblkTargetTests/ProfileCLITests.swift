import ArgumentParser
import XCTest
@testable import PageCache
@testable import UblkCLI
@testable import UblkTarget

/// Boot profiles on the command line: what is refused before any device or network.
final class ProfileCLITests: XCTestCase {
    func testPrefetchProfileIsForHTTPOnly() {
        XCTAssertTrue(failure(["add", "-t", "null", "--prefetch-profile", "/tmp/p"]).contains("http target only"))
        XCTAssertEqual(failure(["add", "-t", "http", "--url", "http://h/x", "--prefetch-profile", "/tmp/p"]), "parsed")
    }

    func testRecordBoundsAreChecked() {
        XCTAssertTrue(failure(["profile", "record", "-n", "0", "--out", "/tmp/p", "--max-pages", "0"]).contains("--max-pages"))
        XCTAssertTrue(failure(["profile", "record", "-n", "0", "--out", "/tmp/p", "--seconds", "0"]).contains("--seconds"))
        XCTAssertTrue(failure(["profile", "record", "-n", "0"]).contains("--out"))
        XCTAssertEqual(failure(["profile", "record", "-n", "0", "--out", "/tmp/p", "--seconds", "5", "--max-pages", "100"]), "parsed")
        XCTAssertTrue(failure(["prefetch", "--url", "http://h/x", "--range", "0-1M", "--profile", "/tmp/p"]).contains("not both"))
    }

    func testRecoverDoesNotNeedTheProfile() {
        // A replay is for the attach; a profile file removed since must not stop `recover`.
        XCTAssertEqual(Add.savedArguments(["add", "-t", "http", "--url", "u", "--prefetch-profile", "/tmp/p", "--prefetch-profile=/tmp/q", "-q", "2"]),
                       ["add", "-t", "http", "--url", "u", "-q", "2"])
    }

    func testLoadProfileErrorsAreOneLineAndNameTheFile() throws {
        let path = "/tmp/ublk-http-profile-test-\(getpid())"
        defer { unlink(path) }
        XCTAssertThrowsError(try loadProfile(path)) { XCTAssertTrue("\($0)".contains("cannot read the profile \(path)")) }
        let p = BootProfile(url: "http://h/x", imageSize: 1 << 20, etag: "e", lastModified: nil, pageSize: 4096, runs: [3..<5, 0..<1])
        let f = try AtomicFile(path: path)
        try f.commit(p.encoded())
        XCTAssertEqual(try loadProfile(path), p)
        var st = stat()
        XCTAssertEqual(stat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o644)
        let bad = try AtomicFile(path: path)
        try bad.commit(Array("{\"format\":\"ublk-http-profile\",\"version\":1}\n".utf8))
        XCTAssertThrowsError(try loadProfile(path)) {
            XCTAssertTrue("\($0)".contains("the profile \(path): not a ublk-http profile"))
            XCTAssertFalse("\($0)".contains("\n"))
        }
    }
}
