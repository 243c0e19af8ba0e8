// S3Config: where S3 requests go and the credentials they are signed with
// (from the environment or the AWS shared credentials file), and how an
// s3://BUCKET/KEY URL maps onto the endpoint. The secret key and session
// token live only in memory (see Redact.swift for what may be shown).
import Glibc

public struct S3Config: Equatable, Sendable {
    /// Where requests go, e.g. "https://s3.eu-west-1.amazonaws.com" or "http://127.0.0.1:9000".
    public var endpoint: String
    public var region: String
    public var accessKeyID: String
    public var secretAccessKey: String
    public var sessionToken: String?

    public init(endpoint: String, region: String, accessKeyID: String, secretAccessKey: String, sessionToken: String? = nil) {
        self.endpoint = endpoint
        self.region = region
        self.accessKeyID = accessKeyID
        self.secretAccessKey = secretAccessKey
        self.sessionToken = sessionToken
    }

    /// Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN;
    /// when that pair is absent, from the shared credentials file
    /// (`credentialsFilePath`) under the profile AWS_PROFILE (default "default"):
    /// aws_access_key_id, aws_secret_access_key, aws_session_token.
    /// Region from the argument, else AWS_REGION / AWS_DEFAULT_REGION, else us-east-1;
    /// endpoint from the argument, else AWS_ENDPOINT_URL, else the regional AWS endpoint.
    /// Nil when no key pair is found.
    public static func fromEnvironment(endpoint: String? = nil, region: String? = nil,
                                       environment: [String: String]? = nil) -> S3Config? {
        let env = environment ?? S3Config.processEnvironment()
        var key = env["AWS_ACCESS_KEY_ID"] ?? "", secret = env["AWS_SECRET_ACCESS_KEY"] ?? ""
        var token = env["AWS_SESSION_TOKEN"]
        if key.isEmpty || secret.isEmpty {
            guard let path = credentialsFilePath(environment: env, useAccountHome: environment == nil),
                  let text = readSmallFile(path) else { return nil }
            let profile = (env["AWS_PROFILE"].flatMap { $0.isEmpty ? nil : $0 }) ?? "default"
            guard let section = parseINI(text)[profile] else { return nil }
            key = section["aws_access_key_id"] ?? ""
            secret = section["aws_secret_access_key"] ?? ""
            token = section["aws_session_token"]
            guard !key.isEmpty, !secret.isEmpty else { return nil }
        }
        let region = region ?? env["AWS_REGION"] ?? env["AWS_DEFAULT_REGION"] ?? "us-east-1"
        let endpoint = endpoint ?? env["AWS_ENDPOINT_URL"] ?? "https://s3.\(region).amazonaws.com"
        return S3Config(endpoint: endpoint, region: region, accessKeyID: key, secretAccessKey: secret,
                        sessionToken: token.flatMap { $0.isEmpty ? nil : $0 })
    }

    /// AWS_SHARED_CREDENTIALS_FILE, else $HOME/.aws/credentials (the account's home
    /// directory when HOME is unset and `useAccountHome`).
    public static func credentialsFilePath(environment env: [String: String], useAccountHome: Bool = true) -> String? {
        if let f = env["AWS_SHARED_CREDENTIALS_FILE"], !f.isEmpty { return f }
        var home = env["HOME"] ?? ""
        if home.isEmpty && useAccountHome, let pw = getpwuid(geteuid()), let dir = pw.pointee.pw_dir {
            home = String(cString: dir)
        }
        return home.isEmpty ? nil : home + "/.aws/credentials"
    }

    /// An INI file as the AWS tools write it: `[section]`, `key = value`, comments
    /// starting with # or ;. Keys are lowercased; later keys win; lines outside a
    /// section and lines without '=' are ignored.
    public static func parseINI(_ text: String) -> [String: [String: String]] {
        var out: [String: [String: String]] = [:]
        var section: String?
        for raw in text.split(omittingEmptySubsequences: true, whereSeparator: { $0 == "\n" || $0 == "\r\n" || $0 == "\r" }) {
            let line = raw.trimmingWhitespace()
            if line.isEmpty || line.hasPrefix("#") || line.hasPrefix(";") { continue }
            if line.hasPrefix("[") && line.hasSuffix("]") {
                let name = String(line.dropFirst().dropLast()).trimmingWhitespace()
                section = name
                if out[name] == nil { out[name] = [:] }
                continue
            }
            guard let section, let eq = line.firstIndex(of: "=") else { continue }
            let k = line[..<eq].trimmingWhitespace().lowercased()
            let v = line[line.index(after: eq)...].trimmingWhitespace()
            out[section]?[k] = v
        }
        return out
    }

    /// A file's text, or nil (missing, unreadable, or larger than 1 MiB).
    static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var data = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 16384)
        while true {
            let n = read(fd, &buf, buf.count)
            if n > 0 { data += buf[0..<n]; if data.count > 1 << 20 { return nil } }
            else if n < 0 && errno == EINTR { continue }
            else if n < 0 { return nil }
            else { break }
        }
        return String(decoding: data, as: UTF8.self)
    }

    static func processEnvironment() -> [String: String] {
        var out: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { out[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        return out
    }

    /// `s3://BUCKET/KEY` → path-style `ENDPOINT/BUCKET/KEY`; nil if not an s3 URL.
    public func httpURL(for s3URL: String) -> String? {
        guard s3URL.hasPrefix("s3://") else { return nil }
        let rest = s3URL.dropFirst(5)
        guard let slash = rest.firstIndex(of: "/"), slash != rest.startIndex,
              rest.index(after: slash) != rest.endIndex else { return nil }
        var base = endpoint
        while base.hasSuffix("/") { base.removeLast() }
        return base + "/" + rest
    }
}
