import ArgumentParser
import XCTest
@testable import PageCache
@testable import UblkCLI
@testable import UblkTarget

/// Files of secrets must be private to their owner.
final class HTTPCredentialOptionTests: XCTestCase {
    func failure(_ args: [String]) -> String {
        do {
            _ = try UblkHTTP.parseAsRoot(args)
            return "parsed"
        } catch {
            return UblkHTTP.message(for: error)
        }
    }

    func secretFile(_ text: String, mode: mode_t) -> String {
        let path = NSTemporaryDirectory() + "/ublk-secret-mode-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
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
}
