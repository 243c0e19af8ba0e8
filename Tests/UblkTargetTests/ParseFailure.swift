import XCTest
@testable import UblkCLI

extension XCTestCase {
    /// The one line a command line is refused with, or "parsed".
    func failure(_ args: [String]) -> String {
        do {
            _ = try UblkHTTP.parseAsRoot(args)
            return "parsed"
        } catch {
            return UblkHTTP.message(for: error)
        }
    }
}
