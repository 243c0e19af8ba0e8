import ArgumentParser
import XCTest
@testable import PageCache
@testable import UblkCLI
@testable import UblkTarget

/// Files of secrets must be private to their owner; where credentials may go on a redirect.
final class HTTPCredentialOptionTests: XCTestCase {
    func secretFile(_ text: String, mode: mode_t) -> String {
        let path = NSTemporaryDirectory() + "/ublk-secret-mode-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(text.utf8)), "cannot create \(path)")
        chmod(path, mode)
        addTeardownBlock { unlink(path) }
        return path
    }

    func testGroupReadableSecretFilesAreRefusedInOneLine() {
        for option in ["--header-file", "--password-file"] {
            for mode: mode_t in [0o640, 0o440, 0o660] {
                let path = secretFile(option == "--header-file" ? "X-Secret: SECRETVALUE\n" : "SECRETVALUE\n", mode: mode)
                let user = option == "--password-file" ? ["--user", "me"] : []
                let msg = failure(["add", "-t", "http", "--url", "http://h/x", option, path] + user)
                XCTAssertTrue(msg.contains("\(option) \(path) is readable by its group"), "\(option) \(String(mode, radix: 8)): \(msg)")
                XCTAssertTrue(msg.contains("chmod 600"), msg)
                XCTAssertFalse(msg.contains("SECRETVALUE"), msg)
                XCTAssertFalse(msg.contains("\n"), msg)
            }
        }
        let world = secretFile("X-Secret: SECRETVALUE\n", mode: 0o644)
        XCTAssertTrue(failure(["add", "-t", "http", "--url", "http://h/x", "--header-file", world]).contains("readable by every user"))
        let own = secretFile("X-Secret: SECRETVALUE\n", mode: 0o600)
        XCTAssertEqual(failure(["add", "-t", "http", "--url", "http://h/x", "--header-file", own]), "parsed")
    }

    func testRedirectCredentialsOption() throws {
        let parse = { (args: [String]) throws -> HTTPTargetOptions in
            let cmd = try XCTUnwrap(try UblkHTTP.parseAsRoot(["add", "-t", "http", "--url", "http://h/x"] + args) as? Add)
            return try cmd.http.targetOptions()
        }
        XCTAssertEqual(try parse([]).http.redirectCredentials, .drop)
        XCTAssertEqual(try parse(["--redirect-credentials", "refuse"]).http.redirectCredentials, .refuse)
        let msg = failure(["add", "-t", "http", "--url", "http://h/x", "--redirect-credentials", "maybe"])
        XCTAssertTrue(msg.contains("drop") && msg.contains("refuse"), msg)
        XCTAssertFalse(msg.contains("\n"), msg)
    }
}
