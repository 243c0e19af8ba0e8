// Test fixtures: a temp directory, a deterministic image file, and two real
// HTTP servers on 127.0.0.1 (Debian's nginx and the project's fault server),
// each started per test class and killed at the end.
import Foundation
import Glibc
import XCTest

final class TempDir {
    let path: String
    init() {
        var template = Array("/tmp/pagecache-test.XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: p!)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Deterministic pseudo-random bytes (xorshift), so expected data is known.
func makeImage(size: Int, seed: UInt64 = 0x9E37_79B9_7F4A_7C15) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: (size + 7) / 8 * 8)
    var x = seed
    out.withUnsafeMutableBytes { buf in
        let words = buf.bindMemory(to: UInt64.self)
        for i in 0..<words.count {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            words[i] = x.littleEndian
        }
    }
    out.removeLast(out.count - size)
    return out
}

func freePort() -> UInt16 {
    let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(s) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, len) }
    }
    _ = withUnsafeMutablePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) }
    }
    return UInt16(bigEndian: addr.sin_port)
}

func waitForPort(_ port: UInt16, timeout: Double = 5) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = port.bigEndian
        let r = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        close(s)
        if r == 0 { return true }
        usleep(20_000)
    }
    return false
}

struct LoggedRequest: Equatable {
    var method: String
    var path: String
    var range: String?
    var status: Int
    /// The Host, X-Secret and Authorization headers the request carried.
    var host: String? = nil
    var secret: String? = nil
    var auth: String? = nil
}

/// The project's fault-injecting server (Tests/tools/faultserver.py).
final class FaultServer {
    let process = Process()
    let port: UInt16
    let logPath: String
    let dir: TempDir
    /// Never written; when this process dies the server sees EOF and exits.
    let stdinPipe = Pipe()

    static var script: String {
        // Tests/PageCacheTests/TestServers.swift → Tests/tools/faultserver.py
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/faultserver.py").path
    }

    /// The loopback address it listens on (127.0.0.2 is another host than 127.0.0.1).
    let host: String
    /// With `tls`, HTTPS with a self-signed certificate for `host` (at `certificate`).
    let tls: Bool
    var certificate: String { dir.file("cert.pem") }

    init(image: [UInt8], host: String = "127.0.0.1", tls: Bool = false) throws {
        self.host = host
        self.tls = tls
        dir = TempDir()
        let imagePath = dir.file("image.bin")
        _ = FileManager.default.createFile(atPath: imagePath, contents: Data(image))
        logPath = dir.file("requests.jsonl")
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let python = FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") ? "/usr/bin/python3" : "/usr/bin/env"
        process.executableURL = URL(fileURLWithPath: python)
        var args = [FaultServer.script, "--file", imagePath, "--log", logPath, "--host", host]
        if tls {
            guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw missingTool("no /usr/bin/openssl") }
            let openssl = Process()
            openssl.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
            openssl.arguments = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                                 "-days", "2", "-subj", "/CN=\(host)", "-addext", "subjectAltName=IP:\(host)",
                                 "-keyout", dir.file("key.pem"), "-out", dir.file("cert.pem")]
            openssl.standardError = FileHandle.nullDevice
            openssl.standardOutput = FileHandle.nullDevice
            try openssl.run()
            openssl.waitUntilExit()
            guard openssl.terminationStatus == 0 else { throw missingTool("openssl could not make a certificate") }
            args += ["--tls-cert", dir.file("cert.pem"), "--tls-key", dir.file("key.pem")]
        }
        if python == "/usr/bin/env" { args.insert("python3", at: 0) }
        process.arguments = args
        let out = Pipe()
        process.standardOutput = out
        process.standardInput = stdinPipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        // First line: "PORT n".
        var line = Data()
        let handle = out.fileHandleForReading
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = handle.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self)
        guard text.hasPrefix("PORT "), let p = UInt16(text.dropFirst(5).trimmingCharacters(in: .whitespacesAndNewlines)) else {
            process.terminate()
            throw missingTool("fault server did not start: \(text)")
        }
        port = p
    }

    func url(_ query: String = "") -> String {
        "\(tls ? "https" : "http")://\(host):\(port)/image" + (query.isEmpty ? "" : "?" + query)
    }

    /// Requests logged whose path contains `id=<id>` (or all when nil).
    func requests(id: String? = nil) -> [LoggedRequest] {
        guard let data = FileManager.default.contents(atPath: logPath) else { return [] }
        var out: [LoggedRequest] = []
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { continue }
            let path = obj["path"] as? String ?? ""
            if let id, !path.contains("id=\(id)&") && !path.hasSuffix("id=\(id)") { continue }
            out.append(LoggedRequest(method: obj["method"] as? String ?? "", path: path,
                                     range: obj["range"] as? String, status: obj["status"] as? Int ?? 0,
                                     host: obj["host"] as? String, secret: obj["secret"] as? String,
                                     auth: obj["auth"] as? String))
        }
        return out
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit { stop() }
}

/// Debian's nginx serving one file, with an access log of "METHOD RANGE STATUS".
final class NginxServer {
    let process: Process
    let port: UInt16
    let dir: TempDir
    let accessLog: String
    static let binary = "/usr/sbin/nginx"

    /// With `tls`, a self-signed certificate for 127.0.0.1 (at `certificate`) and HTTP/2.
    let tls: Bool
    var certificate: String { dir.file("cert.pem") }

    init(image: [UInt8], tls: Bool = false) throws {
        self.tls = tls
        guard FileManager.default.isExecutableFile(atPath: NginxServer.binary) else {
            throw missingTool("\(NginxServer.binary) is absent (apt-get install nginx-light)")
        }
        dir = TempDir()
        try FileManager.default.createDirectory(atPath: dir.file("www"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir.file("tmp"), withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: dir.file("www/image.bin"), contents: Data(image))
        accessLog = dir.file("access.log")
        if tls {
            let openssl = Process()
            openssl.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
            openssl.arguments = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                                 "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                                 "-keyout", dir.file("key.pem"), "-out", dir.file("cert.pem")]
            openssl.standardError = FileHandle.nullDevice
            openssl.standardOutput = FileHandle.nullDevice
            guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw missingTool("no /usr/bin/openssl") }
            try openssl.run()
            openssl.waitUntilExit()
            guard openssl.terminationStatus == 0 else { throw missingTool("openssl could not make a certificate") }
        }
        let listenSuffix = tls ? " ssl http2" : ""
        let tlsLines = tls ? "ssl_certificate \(dir.file("cert.pem"));\n ssl_certificate_key \(dir.file("key.pem"));" : ""
        var lastError = ""
        for _ in 0..<5 {
            let port = freePort()
            let conf = """
            \(geteuid() == 0 ? "user root;" : "")
            daemon off;
            master_process off;
            worker_processes 1;
            pid \(dir.file("nginx.pid"));
            error_log \(dir.file("error.log")) warn;
            events { worker_connections 64; }
            http {
                log_format counts '$request_method "$http_range" $status $connection $server_protocol';
                access_log \(accessLog) counts;
                client_body_temp_path \(dir.file("tmp"));
                proxy_temp_path \(dir.file("tmp"));
                fastcgi_temp_path \(dir.file("tmp"));
                uwsgi_temp_path \(dir.file("tmp"));
                scgi_temp_path \(dir.file("tmp"));
                keepalive_requests 10000;
                server {
                    listen 127.0.0.1:\(port)\(listenSuffix);
                    \(tlsLines)
                    root \(dir.file("www"));
                    location / { }
                }
            }
            """
            try conf.write(toFile: dir.file("nginx.conf"), atomically: true, encoding: .utf8)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: NginxServer.binary)
            p.arguments = ["-p", dir.path, "-c", dir.file("nginx.conf"), "-e", dir.file("error.log")]
            p.standardError = FileHandle.nullDevice
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            if waitForPort(port), p.isRunning {
                self.port = port
                process = p
                return
            }
            if p.isRunning { kill(p.processIdentifier, SIGKILL) }
            p.waitUntilExit()
            lastError = (try? String(contentsOfFile: dir.file("error.log"), encoding: .utf8)) ?? ""
        }
        XCTFail("nginx did not start: \(lastError)")
        throw missingTool("nginx did not start")
    }

    var url: String { "\(tls ? "https" : "http")://127.0.0.1:\(port)/image.bin" }

    struct Request {
        var method: String
        var range: String?
        var status: Int
        /// nginx's connection serial number.
        var connection: Int
        var proto: String
    }

    /// Requests in the order nginx finished them. nginx logs a request after
    /// its last byte left, so a client can see the whole body before the line
    /// is written: the log is read once it has not grown for 50 ms (2 s at most).
    func requests() -> [Request] {
        var text = (try? String(contentsOfFile: accessLog, encoding: .utf8)) ?? ""
        for _ in 0..<40 {
            usleep(50_000)
            let again = (try? String(contentsOfFile: accessLog, encoding: .utf8)) ?? ""
            if again == text { break }
            text = again
        }
        return text.split(separator: "\n").compactMap { line in
            // GET "bytes=0-4095" 206 3 HTTP/1.1
            let parts = line.split(separator: "\"")
            guard parts.count == 3 else { return nil }
            let method = parts[0].trimmingCharacters(in: .whitespaces)
            let range = parts[1] == "-" ? nil : String(parts[1])
            let rest = parts[2].split(separator: " ")
            guard rest.count == 3 else { return nil }
            return Request(method: method, range: range, status: Int(rest[0]) ?? 0,
                           connection: Int(rest[1]) ?? -1, proto: String(rest[2]))
        }
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
        }
    }

    deinit { stop() }
}

/// A test server or tool is missing. Where CI is set the test command has
/// installed them, so a missing one is a broken setup: the test fails rather
/// than skips (a skip there would hide it). Elsewhere it is skipped.
struct MissingTool: Error, CustomStringConvertible {
    let description: String
}

func missingTool(_ what: String) -> Error {
    if let ci = ProcessInfo.processInfo.environment["CI"], !ci.isEmpty, ci != "0", ci != "false" {
        return MissingTool(description: "CI is set, so this must not be skipped: \(what)")
    }
    return XCTSkip(what)
}
