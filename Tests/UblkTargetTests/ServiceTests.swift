import ArgumentParser
import XCTest
@testable import UblkCLI
@testable import UblkService
@testable import UblkTarget

/// The host service without a kernel: the device table, the units the generator
/// writes, the metrics file, and the sd_notify datagram.
final class ServiceTests: XCTestCase {
    static let headerFile = NSTemporaryDirectory() + "/ublk-service-test-\(getpid()).headers"

    override func setUp() {
        unlink(ServiceTests.headerFile)
        let fd = open(ServiceTests.headerFile, O_WRONLY | O_CREAT, 0o600)
        _ = "X-Token: secret\n".withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    override func tearDown() { unlink(ServiceTests.headerFile) }

    let sample = """
        # NAME  TARGET   SOURCE                        OPTIONS
        root    http     https://img.example/root.img  cache-max-size=4G,connections=8,header-file=\(ServiceTests.headerFile),mirror=https://b.example/root.img

        vm1     overlay  root                          -
        data    cache    /dev/sdb                      cache=/srv/flash/data.cache,bitmap=/srv/flash/data.bitmap,write-mode=back
        scratch	null	-	size=10G
        """

    func testATableLineBecomesTheAddCommandWithNameAndRecovery() throws {
        let (t, errors) = DeviceTable.parse(sample, path: "tab")
        XCTAssertEqual(errors, [])
        XCTAssertEqual(t.entries.map(\.name), ["root", "vm1", "data", "scratch"])
        XCTAssertEqual(t.entries.map(\.line), [2, 4, 5, 6])
        XCTAssertEqual(DeviceTable.addArguments(t.entry(named: "root")!),
                       ["add", "-t", "http", "--name", "root", "--recovery", "--url", "https://img.example/root.img",
                        "--cache", "/var/cache/ublk-http/root.cache", "--bitmap", "/var/cache/ublk-http/root.bitmap",
                        "--cache-max-size", "4G", "--connections", "8", "--header-file", ServiceTests.headerFile,
                        "--url", "https://b.example/root.img"])
        XCTAssertEqual(DeviceTable.addArguments(t.entry(named: "vm1")!, lowerDevice: "/dev/ublkb3"),
                       ["add", "-t", "overlay", "--name", "vm1", "--recovery", "--lower", "/dev/ublkb3", "--overlay", "vm1"])
        XCTAssertEqual(DeviceTable.addArguments(t.entry(named: "data")!),
                       ["add", "-t", "cache", "--name", "data", "--recovery", "--backing", "/dev/sdb",
                        "--cache", "/srv/flash/data.cache", "--bitmap", "/srv/flash/data.bitmap", "--write-mode", "back"])
        // Every generated command parses as `add` does.
        for e in t.entries {
            let add = try Service.addCommand(DeviceTable.addArguments(e, lowerDevice: "/dev/ublkb3"))
            XCTAssertEqual(add.name, e.name)
            XCTAssertTrue(add.recovery)
            XCTAssertEqual(add.type, e.target)
        }
        // Bases come up before the overlays over them.
        XCTAssertEqual(t.upOrder.map(\.name), ["root", "data", "scratch", "vm1"])
    }

    func testEveryBadLineIsOneErrorWithItsNumberAndTheGoodLinesStay() {
        let text = """
            ok      null     -    size=1G
            two     http
            bad/name null    -
            x       tape     /dev/st0
            ok      null     -
            y       null     /dev/sda
            z       loop     -
            h       http     https://x/i.img  header=Authorization:secret
            p       http     https://x/i.img  --cache-max-size=1G
            u       http     https://x/i.img  url=https://y/
            e       http     https://x/i.img  a,,b
            s       http     https://x/i.img  a b
            o1      overlay  nothere
            o2      overlay  w
            w       http     https://x/w.img  writable
            """
        let (t, errors) = DeviceTable.parse(text, path: "/etc/ublk-http/ublktab")
        XCTAssertEqual(t.entries.map(\.name), ["ok", "o1", "o2", "w"])
        XCTAssertEqual(errors.map(\.line), Array(2...14))
        let messages = errors.map(\.description)
        XCTAssertEqual(messages[0], "/etc/ublk-http/ublktab:2: expected NAME TARGET SOURCE [OPTIONS], found 2 fields")
        XCTAssertTrue(messages[1].contains("bad name 'bad/name'"), messages[1])
        XCTAssertTrue(messages[2].contains("unknown target 'tape'"), messages[2])
        XCTAssertTrue(messages[3].contains("declared twice (first on line 1)"), messages[3])
        XCTAssertTrue(messages[4].contains("a null device has no source"), messages[4])
        XCTAssertTrue(messages[5].contains("a loop device needs a source"), messages[5])
        XCTAssertTrue(messages[6].contains("header-file=PATH"), messages[6])
        XCTAssertTrue(messages[7].contains("without dashes"), messages[7])
        XCTAssertTrue(messages[8].contains("'url' is set by SOURCE"), messages[8])
        XCTAssertTrue(messages[9].contains("empty option"), messages[9])
        XCTAssertTrue(messages[10].contains("found 5 fields"), messages[10])
        XCTAssertTrue(messages[11].contains("no device named 'nothere'"), messages[11])
        XCTAssertTrue(messages[12].contains("'w' (line 15) is not a read-only http device"), messages[12])
        for m in messages { XCTAssertFalse(m.contains("\n")) }
    }

    func testCheckRefusesWhatAddRefusesAndMissingFiles() throws {
        let (t, errors) = DeviceTable.parse("""
            a  null   -                 size=1Q
            b  http   https://x/i.img   connections=999
            c  loop   /nonexistent/img  -
            d  http   https://x/i.img   frobnicate=1
            e  cache  /dev/null         write-mode=back
            f  http   https://x/i.img   cacert=/nonexistent/ca.pem
            g  http   https://x/i.img   header-file=/nonexistent/h
            """, path: "tab")
        XCTAssertEqual(errors, [])
        let problems = t.entries.flatMap { Check.problems($0, path: "tab") }
        let text = problems.map(\.description).joined(separator: "\n")
        XCTAssertTrue(text.contains("tab:1: bad size '1Q'"), text)
        XCTAssertTrue(text.contains("tab:2: --connections must be between 1 and 64"), text)
        XCTAssertTrue(text.contains("tab:3: SOURCE /nonexistent/img: No such file or directory"), text)
        XCTAssertTrue(text.contains("tab:4: Unknown option '--frobnicate'"), text)
        XCTAssertTrue(text.contains("tab:5: the cache target needs --cache FILE and --bitmap FILE"), text)
        XCTAssertTrue(text.contains("tab:6: cannot read --cacert /nonexistent/ca.pem"), text)
        XCTAssertTrue(text.contains("tab:7: cannot read --header-file /nonexistent/h"), text)
        // One line per problem: a file add already refused is not reported twice.
        XCTAssertEqual(problems.map(\.line), [1, 2, 3, 4, 5, 6, 7], text)
    }

    func testTheGeneratorWantsEveryDeviceAndOrdersOverlaysAfterTheirBase() {
        let (t, _) = DeviceTable.parse(sample, path: "/etc/ublk-http/ublktab")
        let items = UnitGenerator.items(for: t)
        let links = items.compactMap { if case .symlink(let p, let target) = $0 { return "\(p) -> \(target)" } else { return nil } }
        XCTAssertEqual(links, ["root", "vm1", "data", "scratch"].map {
            "ublk-http.target.wants/ublk-http@\($0).service -> /usr/lib/systemd/system/ublk-http@.service"
        })
        func dropIn(_ name: String) -> String {
            for case .file(let p, let c) in items where p == "ublk-http@\(name).service.d/50-ublktab.conf" { return c }
            return ""
        }
        XCTAssertTrue(dropIn("root").contains("After=network-online.target\n"))
        XCTAssertTrue(dropIn("root").contains("RequiresMountsFor=/var/cache/ublk-http \(ServiceTests.headerFile)\n"), dropIn("root"))
        XCTAssertTrue(dropIn("vm1").contains("Requires=ublk-http@root.service\nAfter=ublk-http@root.service\n"))
        XCTAssertFalse(dropIn("vm1").contains("network-online"))
        XCTAssertTrue(dropIn("data").contains("RequiresMountsFor=/srv/flash/data.cache /srv/flash/data.bitmap\n"), dropIn("data"))
        XCTAssertTrue(dropIn("data").contains("[Service]\nReadWritePaths=-/srv/flash\n"), dropIn("data"))
        XCTAssertFalse(dropIn("scratch").contains("[Service]"))
    }

    func testMetricsHaveOneFamilyHeaderAndALabelledSamplePerDevice() {
        var stats = HTTPStats(hits: 7, misses: 2, bytesFetched: 4096, requests: 3, retries: 0, errors: 0,
                              missLatencyP50Ms: nil, missLatencyP99Ms: nil, pagesPresent: 1, pagesTotal: 4, pageSize: 4096)
        stats.writes = 5
        let text = Metrics.render([
            .init(id: 0, name: "root", target: "http", state: "LIVE", queues: 2, dataPath: "auto-zero-copy",
                  serverRunning: true, restarts: 1, hydratedPercent: 25, stats: stats),
            .init(id: 3, name: nil, target: "null", state: "QUIESCED", queues: 1, dataPath: nil,
                  serverRunning: false, restarts: 0, hydratedPercent: nil, stats: nil),
        ])
        let lines = text.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.filter { $0 == "# TYPE ublk_http_device_state gauge" }.count, 1)
        XCTAssertTrue(lines.contains("ublk_http_device_state{name=\"root\",device=\"ublkb0\",state=\"LIVE\"} 1"))
        XCTAssertTrue(lines.contains("ublk_http_device_state{name=\"\",device=\"ublkb3\",state=\"QUIESCED\"} 1"))
        XCTAssertTrue(lines.contains("ublk_http_device_state{name=\"\",device=\"ublkb3\",state=\"LIVE\"} 0"))
        XCTAssertTrue(lines.contains("ublk_http_device_info{name=\"root\",device=\"ublkb0\",target=\"http\",data_path=\"auto-zero-copy\"} 1"))
        XCTAssertTrue(lines.contains("ublk_http_server_restarts_total{name=\"root\",device=\"ublkb0\"} 1"))
        XCTAssertTrue(lines.contains("ublk_http_hydrated_ratio{name=\"root\",device=\"ublkb0\"} 0.25"))
        XCTAssertTrue(lines.contains("ublk_http_cache_hits_total{name=\"root\",device=\"ublkb0\"} 7"))
        XCTAssertTrue(lines.contains("ublk_http_writes_total{name=\"root\",device=\"ublkb0\"} 5"))
        XCTAssertTrue(lines.contains("ublk_http_device_queues{name=\"\",device=\"ublkb3\"} 1"))
        // Every sample's family was declared before it, once.
        var declared = Set<String>()
        for l in lines {
            if l.hasPrefix("# TYPE ") { XCTAssertTrue(declared.insert(String(l.split(separator: " ")[2])).inserted, l) }
            else if !l.hasPrefix("#") { XCTAssertTrue(declared.contains(String(l.prefix { $0 != "{" })), l) }
        }
        XCTAssertEqual(Metrics.escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd")
    }

    func testNotifySendsOneDatagramToThePathOrAbstractSocket() throws {
        for abstract in [false, true] {
            let name = "ublk-notify-test-\(getpid())-\(abstract)"
            let path = abstract ? "@" + name : NSTemporaryDirectory() + "/" + name
            unlink(path)
            defer { if !abstract { unlink(path) } }
            let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
            XCTAssertGreaterThanOrEqual(fd, 0)
            defer { close(fd) }
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            var bytes = Array(path.utf8)
            if abstract { bytes[0] = 0 }
            withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i] = b } }
            let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
            let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
            XCTAssertEqual(bound, 0, "bind \(path): \(errno)")
            XCTAssertTrue(SystemdNotify.send("READY=1\nSTATUS=serving /dev/ublkb0", socketPath: path))
            var buf = [UInt8](repeating: 0, count: 256)
            let n = recv(fd, &buf, buf.count, Int32(MSG_DONTWAIT))
            XCTAssertEqual(n > 0 ? String(decoding: buf[0..<n], as: UTF8.self) : "", "READY=1\nSTATUS=serving /dev/ublkb0")
        }
        XCTAssertFalse(SystemdNotify.send("READY=1", socketPath: "relative"))
        XCTAssertFalse(SystemdNotify.send("READY=1", socketPath: NSTemporaryDirectory() + "/ublk-no-such-socket"))
    }

    func testAddRefusesABadName() {
        XCTAssertTrue(failure(["add", "-t", "null", "--name", "a/b"]).contains("--name: bad name 'a/b'"))
        XCTAssertTrue(failure(["add", "-t", "null", "--name", ".x"]).contains("bad name"))
        XCTAssertEqual(failure(["add", "-t", "null", "--name", "ok-1.x_y"]), "parsed")
    }

    /// The example Grafana dashboard (dist/grafana) asks only for metrics `metrics` writes.
    func testTheDashboardQueriesOnlyMetricsThatExist() throws {
        let path = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("dist/grafana/ublk-http.json").path
        let data = try XCTUnwrap(FileManager.default.contents(atPath: path), path)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let panels = try XCTUnwrap(json["panels"] as? [[String: Any]])
        let exprs = panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
        XCTAssertGreaterThan(exprs.count, 5)
        var stats = HTTPStats(hits: 1, misses: 1, bytesFetched: 1, requests: 1, retries: 0, errors: 0,
                              missLatencyP50Ms: 1, missLatencyP99Ms: 2, pagesPresent: 1, pagesTotal: 2, pageSize: 4096)
        stats.writes = 1
        stats.writesHeldForIntent = 0
        let text = Metrics.render([.init(id: 0, name: "a", target: "http", state: "LIVE", queues: 1, dataPath: "user-copy",
                                         serverRunning: true, restarts: 0, hydratedPercent: 50, stats: stats)])
        let known = Set(text.split(separator: "\n").filter { !$0.hasPrefix("#") }.map { String($0.prefix { $0 != "{" }) })
        let regex = try NSRegularExpression(pattern: "ublk_http_[a-z0-9_]+")
        for e in exprs {
            for m in regex.matches(in: e, range: NSRange(e.startIndex..., in: e)) {
                let name = String(e[Range(m.range, in: e)!])
                XCTAssertTrue(known.contains(name), "the dashboard asks for \(name), which `metrics` does not write")
            }
        }
    }
}
