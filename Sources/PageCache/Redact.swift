// Redact and HTTPHeader: what may be shown of secrets, and which header
// lines may be sent.
//
// Secrets (header values, passwords, a presigned URL's query string) live only
// in memory: `HTTPError.description` shows URLs through `Redact.url`, and
// `Redact` is what every log line, state file and listing goes through.
// Header lines are checked by `HTTPHeader.problem` (no CR, LF or other control
// characters: a line break in a value would inject headers).

/// Header lines as the command line and header files give them.
public enum HTTPHeader {
    /// Why `line` cannot be sent as a request header, or nil when it can. Never
    /// quotes the value (it may be a secret).
    public static func problem(_ line: String) -> String? {
        guard let colon = line.firstIndex(of: ":") else { return "expected 'Name: value'" }
        let name = line[..<colon]
        guard !name.isEmpty else { return "the header name is empty" }
        let tchar = Set("!#$%&'*+-.^_`|~".utf8)
        for b in name.utf8 where !(tchar.contains(b) || (b >= 0x30 && b <= 0x39) || (b | 0x20 >= 0x61 && b | 0x20 <= 0x7A)) {
            return "the header name '\(Redact.printable(String(name)))' has a character not allowed in a name"
        }
        for b in line[line.index(after: colon)...].utf8 {
            if b == 0x0D || b == 0x0A { return "the value of '\(name)' contains a line break (CR or LF)" }
            if (b < 0x20 && b != 0x09) || b == 0x7F { return "the value of '\(name)' contains a control character" }
        }
        return nil
    }

    /// The name of a header line (for messages that must not show its value).
    public static func name(_ line: String) -> String {
        Redact.printable(String(line.prefix { $0 != ":" }.prefix(64)))
    }

    /// A header file: one `Name: value` per line; empty lines and lines starting
    /// with '#' are skipped. Throws a message naming the line, never its value.
    public static func parseFile(_ text: String) throws(HeaderFileError) -> [String] {
        var out: [String] = []
        var number = 0
        // Split on LF only: a CR left in a line is refused below, not taken as a line end.
        for raw in text.utf8.split(separator: 0x0A, omittingEmptySubsequences: false) {
            number += 1
            let line = String(decoding: raw, as: UTF8.self)
            if line.allSatisfy({ $0 == " " || $0 == "\t" }) || line.hasPrefix("#") { continue }
            if let why = problem(line) {
                let hint = line.hasSuffix("\r") ? " (Windows line endings? one header per LF-terminated line)" : ""
                throw HeaderFileError(line: number, message: why + hint)
            }
            let colon = line.firstIndex(of: ":")!
            out.append(String(line[..<colon]) + ": " + line[line.index(after: colon)...].trimmingWhitespace())
        }
        return out
    }
}

public struct HeaderFileError: Error, CustomStringConvertible, Sendable {
    public var line: Int
    public var message: String
    public var description: String { "line \(line): \(message)" }
}

/// What may be shown of secrets: URLs without their query values or password,
/// header lines without their values.
public enum Redact {
    public static let placeholder = "REDACTED"

    /// `scheme://user:REDACTED@host/path?key=REDACTED&flag=REDACTED#fragment`.
    public static func url(_ u: String) -> String {
        var rest = Substring(u)
        var out = ""
        if let colon = rest.firstIndex(of: ":"), rest[colon...].hasPrefix("://"),
           !rest[..<colon].contains(where: { $0 == "/" || $0 == "?" }) {
            let hostStart = rest.index(colon, offsetBy: 3)
            out += rest[..<hostStart]
            rest = rest[hostStart...]
            let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
            let authority = rest[..<authorityEnd]
            if let at = authority.lastIndex(of: "@") {
                let user = authority[..<at]
                if let colon = user.firstIndex(of: ":") {
                    out += user[..<colon] + ":" + placeholder
                } else {
                    out += user
                }
                out += authority[at...]
            } else {
                out += authority
            }
            rest = rest[authorityEnd...]
        }
        guard let q = rest.firstIndex(of: "?") else { return out + rest }
        out += rest[...q]
        let afterQ = rest[rest.index(after: q)...]
        let fragmentStart = afterQ.firstIndex(of: "#") ?? afterQ.endIndex
        let pairs = afterQ[..<fragmentStart].split(separator: "&", omittingEmptySubsequences: false).map { pair -> String in
            if pair.isEmpty { return "" }
            if let eq = pair.firstIndex(of: "=") { return pair[..<eq] + "=" + placeholder }
            return placeholder
        }
        return out + pairs.joined(separator: "&") + afterQ[fragmentStart...]
    }

    /// `text` with every URL in it (scheme://... up to white space or a quote) redacted.
    public static func text(_ text: String) -> String {
        guard text.contains("://") else { return text }
        let chars = Array(text)
        var out = ""
        var i = 0
        while i < chars.count {
            // A URL starts at a scheme ([A-Za-z][A-Za-z0-9+.-]*) followed by "://".
            if chars[i].isASCII && chars[i].isLetter && (i == 0 || !isSchemeChar(chars[i - 1])) {
                var j = i
                while j < chars.count && isSchemeChar(chars[j]) { j += 1 }
                if j + 2 < chars.count && chars[j] == ":" && chars[j + 1] == "/" && chars[j + 2] == "/" {
                    var end = j + 3
                    while end < chars.count && !ends(chars[end]) { end += 1 }
                    // Sentence punctuation after a URL is not part of it.
                    while end > j + 3 && ".,:;)!".contains(chars[end - 1]) { end -= 1 }
                    out += url(String(chars[i..<end]))
                    i = end
                    continue
                }
                out += String(chars[i..<j])
                i = j
                continue
            }
            out.append(chars[i])
            i += 1
        }
        return out
    }

    /// A header line with its value replaced: `Name: REDACTED`.
    public static func header(_ line: String) -> String {
        guard let colon = line.firstIndex(of: ":") else { return placeholder }
        return line[..<colon] + ": " + placeholder
    }

    /// Control characters shown as '?': a message stays one line.
    public static func printable(_ s: String) -> String {
        String(s.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7F ? "?" : Character($0) })
    }

    private static func isSchemeChar(_ c: Character) -> Bool {
        c.isASCII && (c.isLetter || c.isNumber || c == "+" || c == "." || c == "-")
    }

    private static func ends(_ c: Character) -> Bool {
        c.isWhitespace || c == "\"" || c == "'" || c == "<" || c == ">" || c == "`"
    }
}
