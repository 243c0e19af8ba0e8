import ArgumentParser
import XCTest
@testable import UblkCLI
@testable import UblkTarget

/// Command-line parsing and validation, without a kernel.
final class CLITests: XCTestCase {
    func parseAdd(_ args: [String]) throws -> Add {
        let cmd = try UblkHTTP.parseAsRoot(["add"] + args)
        return try XCTUnwrap(cmd as? Add)
    }

    func failure(_ args: [String]) -> String {
        do {
            _ = try UblkHTTP.parseAsRoot(args)
            return "parsed"
        } catch {
            return UblkHTTP.message(for: error)
        }
    }

    func testAddDefaults() throws {
        let a = try parseAdd(["-t", "null"])
        XCTAssertEqual(a.type, "null")
        XCTAssertEqual(a.queues, 1)
        XCTAssertEqual(a.depth, 128)
        XCTAssertNil(a.number)
        XCTAssertFalse(a.foreground)
        let t = try a.makeTarget()
        XCTAssertEqual(t.params.size, 250 << 30)
        XCTAssertEqual(t.name, "null")
    }

    func testAddShortAndLongFlags() throws {
        let a = try parseAdd(["-t", "null", "-n", "3", "-q", "2", "-d", "64", "--size", "1G", "--read-only"])
        XCTAssertEqual(a.number, 3)
        XCTAssertEqual(a.queues, 2)
        XCTAssertEqual(a.depth, 64)
        XCTAssertEqual(a.serverOptions.deviceID, 3)
        let t = try a.makeTarget()
        XCTAssertEqual(t.params.size, 1 << 30)
        XCTAssertTrue(t.params.readOnly)
    }

    func testLoopTargetOpensFileAndSizesIt() throws {
        let path = NSTemporaryDirectory() + "/ublk-cli-test-\(getpid()).img"
        FileManager.default.createFile(atPath: path, contents: Data(count: 1 << 20 + 100))
        defer { unlink(path) }
        let a = try parseAdd(["-t", "loop", "-f", path, "--buffered"])
        let t = try a.makeTarget()
        XCTAssertEqual(t.name, "loop")
        XCTAssertEqual(t.params.size, 1 << 20)  // rounded down to 512
        XCTAssertTrue(t.params.writeCache)
        XCTAssertEqual(t.options["file"], path)
        XCTAssertEqual(t.options["direct_io"], "false")
    }

    func testBadInputsAreOneLine() {
        let cases: [([String], String)] = [
            (["add", "-t", "foo"], "unknown target type 'foo'"),
            (["add", "-t", "null", "-q", "0"], "--queues must be between 1 and 64"),
            (["add", "-t", "null", "-d", "5000"], "--depth must be between 1 and 4096"),
            (["add", "-t", "loop"], "needs a backing file"),
            (["add", "-t", "null", "-f", "/x"], "apply to the loop target only"),
            (["add", "-t", "loop", "-f", "/x", "--size", "1G"], "applies to the null target only"),
            (["del"], "give either -n ID or -a"),
            (["del", "-n", "1", "-a"], "give either -n ID or -a"),
            (["add", "-t", "http"], "needs --url URL"),
            (["add", "-t", "http", "--url", "ftp://h/x"], "bad --url 'ftp://h/x'"),
            (["add", "-t", "http", "--url", "http://h/x", "-q", "2"], "serves one queue"),
            (["add", "-t", "http", "--url", "http://h/x", "--insecure", "--cacert", "/etc/hosts"], "contradict"),
            (["add", "-t", "http", "--url", "http://h/x", "--user", "u"], "--user and --password-file go together"),
            (["add", "-t", "http", "--url", "http://h/x", "--header", "nocolon"], "bad --header"),
            (["add", "-t", "http", "--url", "http://h/x", "--readahead", "lots"], "bad --readahead"),
            (["add", "-t", "null", "--url", "http://h/x"], "apply to the http target only"),
            (["prefetch", "--url", "http://h/x", "--connections", "0"], "--connections must be"),
            (["add", "-t", "cache", "--cache", "/c", "--bitmap", "/b"], "needs --backing"),
            (["add", "-t", "cache", "--backing", "/x"], "needs --cache FILE and --bitmap FILE"),
            (["add", "-t", "cache", "--backing", "/x", "--cache", "/c", "--bitmap", "/b", "--write-mode", "x"], "--write-mode must be through or back"),
            (["add", "-t", "cache", "--backing", "/x", "--cache", "/c", "--bitmap", "/b", "--url", "http://h/x"], "apply to the http target only"),
            (["add", "-t", "loop", "-f", "/x", "--backing", "/y"], "apply to the cache target only"),
            (["add", "-t", "loop", "-f", "/x", "--cache-max-size", "1G"], "--cache-max-size applies to the http and cache targets only"),
            (["add", "-t", "http", "--url", "http://h/x", "--cache-max-size", "10K"], "bad --cache-max-size"),
            (["dirty"], "give either -n ID"),
            (["sync", "--to", "/r", "--dirty-bitmap", "/d"], "needs --cache FILE too"),
        ]
        for (args, expected) in cases {
            let msg = failure(args)
            XCTAssertTrue(msg.contains(expected), "\(args): \(msg)")
            XCTAssertFalse(msg.contains("\n"), "\(args): not one line: \(msg)")
        }
    }

    func testBadSizeAndMissingFileAreReportedByTargetCreation() throws {
        XCTAssertThrowsError(try parseAdd(["-t", "null", "--size", "12Q"]).makeTarget()) {
            XCTAssertTrue("\($0)".contains("bad size '12Q'"))
        }
        XCTAssertThrowsError(try parseAdd(["-t", "null", "--size", "100"]).makeTarget())
        XCTAssertThrowsError(try parseAdd(["-t", "loop", "-f", "/nonexistent/x.img"]).makeTarget()) {
            XCTAssertTrue("\($0)".contains("/nonexistent/x.img"))
            XCTAssertTrue("\($0)".contains("No such file"))
        }
    }

    func testHTTPDefaultsAndPaths() throws {
        let a = try parseAdd(["-t", "http", "--url", "https://example.org/images/disk.img?sig=1", "--header", "X-A: b",
                              "--timeout", "5", "--connections", "4", "--readahead", "2M"])
        let o = try a.http.targetOptions()
        XCTAssertEqual(o.http.url, "https://example.org/images/disk.img?sig=1")
        XCTAssertEqual(o.http.headers, ["X-A: b"])
        XCTAssertEqual(o.http.requestTimeout, 5)
        XCTAssertEqual(o.http.maxConnections, 4)
        XCTAssertEqual(o.readaheadBytes, 2 << 20)
        XCTAssertEqual(o.pageSize, 4096)
        XCTAssertTrue(o.cachePath.hasPrefix("/var/cache/ublk-http/disk.img-"), o.cachePath)
        XCTAssertTrue(o.cachePath.hasSuffix(".cache"))
        XCTAssertEqual(o.bitmapPath, String(o.cachePath.dropLast(6)) + ".bitmap")
        // Another URL, another cache.
        let b = try parseAdd(["-t", "http", "--url", "https://example.org/other/disk.img"])
        XCTAssertNotEqual(try b.http.targetOptions().cachePath, o.cachePath)
        // An explicit cache puts the bitmap beside it.
        let c = try parseAdd(["-t", "http", "--url", "http://h/x", "--cache", "/tmp/x.cache"])
        XCTAssertEqual(try c.http.targetOptions().bitmapPath, "/tmp/x.cache.bitmap")
    }

    func testPasswordComesFromAFile() throws {
        let path = NSTemporaryDirectory() + "/ublk-pw-\(getpid())"
        FileManager.default.createFile(atPath: path, contents: Data("s3cret\n".utf8))
        defer { unlink(path) }
        let a = try parseAdd(["-t", "http", "--url", "http://h/x", "--user", "me", "--password-file", path])
        let o = try a.http.targetOptions()
        XCTAssertEqual(o.http.username, "me")
        XCTAssertEqual(o.http.password, "s3cret")
    }

    func testFeatureNames() {
        let names = Features.describe(1 << 6 | 1 << 3 | 1 << 40)
        XCTAssertEqual(names, ["UBLK_F_USER_RECOVERY", "UBLK_F_CMD_IOCTL_ENCODE", "bit 40"])
    }
}
