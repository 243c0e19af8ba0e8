import ArgumentParser
import XCTest
@testable import PageCache
@testable import UblkCLI
@testable import UblkTarget

/// Command-line parsing and validation, without a kernel.
final class CLITests: XCTestCase {
    func parseAdd(_ args: [String]) throws -> Add {
        let cmd = try UblkHTTP.parseAsRoot(["add"] + args)
        return try XCTUnwrap(cmd as? Add)
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
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(count: 1 << 20 + 100)), "cannot create \(path)")
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
            (["add", "-t", "http", "--url", "http://h/x", "-q", "64", "-d", "4096"], "at most 65534 requests in flight"),
            (["add", "-t", "http", "--url", "http://h/x", "--insecure", "--cacert", "/etc/hosts"], "contradict"),
            (["add", "-t", "http", "--url", "http://h/x", "--user", "u"], "--user and --password-file go together"),
            (["add", "-t", "http", "--url", "http://h/x", "--header", "nocolon"], "bad --header"),
            (["add", "-t", "http", "--url", "http://h/x", "--readahead", "lots"], "bad --readahead"),
            (["add", "-t", "null", "--url", "http://h/x"], "apply to the http target only"),
            (["add", "-t", "http", "--url", "http://h/x", "--url", "s3://b/k"], "mirrors (--url given more than once) are http:// or https:// URLs"),
            (["add", "-t", "http", "--url", "s3://b/k", "--url", "http://h/x"], "mirrors (--url given more than once) are http:// or https:// URLs"),
            (["add", "-t", "http", "--url", "http://h/x", "--url", "http://h/x"], "a --url is given twice"),
            (["add", "-t", "http", "--url", "http://h/x", "--url", "http://h/y z"], "bad --url: it contains a space"),
            (["add", "-t", "http", "--url", "http://h/x", "--mirror-stall", "0"], "--mirror-stall must be between 0.05 and 3600"),
            (["add", "-t", "http", "--url", "http://h/x", "--mirror-stall", "nan"], "--mirror-stall must be between"),
            (["add", "-t", "null", "--mirror-stall", "2"], "apply to the http target only"),
            (["prefetch", "--url", "http://h/x", "--connections", "0"], "--connections must be"),
            (["add", "-t", "cache", "--cache", "/c", "--bitmap", "/b"], "needs --backing"),
            (["add", "-t", "cache", "--backing", "/x"], "needs --cache FILE and --bitmap FILE"),
            (["add", "-t", "cache", "--backing", "/x", "--cache", "/c", "--bitmap", "/b", "--write-mode", "x"], "--write-mode must be through or back"),
            (["add", "-t", "cache", "--backing", "/x", "--cache", "/c", "--bitmap", "/b", "--admit", "some"], "--admit must be reuse or all"),
            (["add", "-t", "http", "--url", "http://h/x", "--admit", "all"], "--admit applies to the cache target only"),
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
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data("s3cret\n".utf8)), "cannot create \(path)")
        chmod(path, 0o600)  // a file of secrets must not be readable by others
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

    // MARK: Every numeric option is bounded, with one line

    func testBadNumbersAreOneLineErrors() {
        let http = ["add", "-t", "http", "--url", "http://h/x"]
        var cases: [[String]] = []
        for t in ["inf", "nan", "1e300", "0.0001", "-1", "0", "-inf"] { cases.append(http + ["--timeout", t]) }
        for r in ["9000P", "16E", "2G", "0x10", "1e3", "-1", "nan"] { cases.append(http + ["--readahead", r]) }
        for c in ["0", "65", "-1", "99999999999999999999"] { cases.append(http + ["--connections", c]) }
        for p in ["0", "-4096", "3000", "256", "2097152", "8388608", "99999999999999999999"] {
            cases.append(http + ["--page-size", p])
            cases.append(["add", "-t", "cache", "--backing", "/x", "--cache", "/c", "--bitmap", "/b", "--page-size", p])
            cases.append(["prefetch", "--url", "http://h/x", "--page-size", p])
        }
        for m in ["99999999999999999999G", "16E", "9000P", "8E", "1.5", "inf", "-1G", "0x100000"] {
            cases.append(http + ["--cache-max-size", m])
        }
        for z in ["16E", "99999999999999999999G", "0x1000", "-1", "1e9", "nan", "8E", ".", "1..5G"] {
            cases.append(["add", "-t", "null", "--size", z])
        }
        for q in ["0", "65", "-1", "99999999999999999999"] { cases.append(["add", "-t", "null", "-q", q]) }
        for d in ["0", "4097", "-1", "99999999999999999999"] { cases.append(["add", "-t", "null", "-d", d]) }
        for n in ["-1", "1048576", "4294967296", "99999999999999999999"] {
            cases.append(["add", "-t", "null", "-n", n])
            cases.append(["add", "-t", "null", "--recover-id", n])
            cases.append(["del", "-n", n])
        }
        for fd in ["-1", "0", "2"] { cases.append(["add", "-t", "null", "--foreground", "--ready-fd", fd]) }
        for args in cases {
            let msg = failure(args)
            XCTAssertNotEqual(msg, "parsed", "\(args) was accepted")
            XCTAssertFalse(msg.isEmpty, "\(args)")
            XCTAssertFalse(msg.contains("\n"), "\(args): not one line: \(msg)")
        }
    }

    /// Device ids given to list, stats and recover are checked where they are used (run()).
    func testDeviceIDsNeverTrap() {
        XCTAssertThrowsError(try deviceID(-1))
        XCTAssertThrowsError(try deviceID(1 << 20))
        XCTAssertThrowsError(try deviceID(Int.max))
        XCTAssertEqual(try deviceID(0), 0)
        XCTAssertEqual(try deviceID((1 << 20) - 1), (1 << 20) - 1)
        for args in [["list", "-n", "-1"], ["stats", "-n", "-1"], ["recover", "-n", "4294967296"]] {
            do {
                var cmd = try UblkHTTP.parseAsRoot(args)
                try cmd.run()
                XCTFail("\(args) ran")
            } catch {
                XCTAssertTrue("\(error)".contains("bad device id"), "\(args): \(error)")
            }
        }
    }

    func testGoodNumbersStillParse() throws {
        let a = try parseAdd(["-t", "http", "--url", "http://h/x", "--timeout", "0.5", "--page-size", "1048576",
                              "--readahead", "1G", "--connections", "64", "--cache-max-size", "7E"])
        XCTAssertEqual(a.http.timeout, 0.5)
        XCTAssertEqual(try a.http.targetOptions().readaheadBytes, 1 << 30)
        XCTAssertEqual(try a.http.targetOptions().http.maxImageSize, UInt64(1 << 20) << 32)
        XCTAssertEqual(try parseAdd(["-t", "null", "--size", "1.5G"]).makeTarget().params.size, 3 << 29)
        XCTAssertEqual(try parseAdd(["-t", "null", "--size", "4E"]).makeTarget().params.size, 4 << 60)
        XCTAssertEqual(Size.parse("1E"), 1 << 60)
        XCTAssertEqual(Size.parse(".5K"), 512)
        XCTAssertEqual(Size.parse("8191P"), 8191 << 50)
        XCTAssertEqual(Size.parse(String(Int64.max)), UInt64(Int64.max))
        XCTAssertNil(Size.parse(String(UInt64(Int64.max) + 1)))
        XCTAssertNil(Size.parse("18446744073709551615"))
    }

    // MARK: CR/LF in headers and URLs

    func testHeaderAndURLLineBreaksAreRefusedWithoutEchoingTheValue() {
        let http = ["add", "-t", "http", "--url", "http://h/x"]
        let cases: [([String], String)] = [
            (http + ["--header", "Authorization: Bearer SECRET\r\nX-Injected: 1"], "line break"),
            (http + ["--header", "Authorization: Bearer SECRET\nX-Injected: 1"], "line break"),
            (http + ["--header", "Authorization: Bearer SECRET\r"], "line break"),
            (http + ["--header", "Authorization: SECRET\u{0}x"], "control character"),
            (http + ["--header", "Bad Name: SECRET"], "not allowed in a name"),
            (http + ["--header", ": SECRET"], "name is empty"),
            (["add", "-t", "http", "--url", "http://h/x?sig=SECRET\r\nX-Injected: 1"], "line break"),
            (["add", "-t", "http", "--url", "http://h/x?sig=SECRET\nX"], "line break"),
            (["add", "-t", "http", "--url", "http://h/x y?sig=SECRET"], "space or a control"),
            (["prefetch", "--url", "http://h/x", "--header", "A: SECRET\r\nB: c"], "line break"),
            (["add", "-t", "http", "--url", "s3://b/k", "--s3-endpoint", "http://h\r\n"], "line break"),
        ]
        for (args, expected) in cases {
            let msg = failure(args)
            XCTAssertTrue(msg.contains(expected), "\(args): \(msg)")
            XCTAssertFalse(msg.contains("SECRET"), "\(args): the value is echoed: \(msg)")
            XCTAssertFalse(msg.contains("\n"), "\(args): not one line: \(msg)")
        }
    }

    // MARK: --header-file, credentials file, redaction

    func secretFile(_ text: String, mode: mode_t = 0o600) -> String {
        let path = NSTemporaryDirectory() + "/ublk-secret-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(text.utf8)), "cannot create \(path)")
        chmod(path, mode)
        addTeardownBlock { unlink(path) }
        return path
    }

    func testHeaderFileIsParsed() throws {
        let path = secretFile("# tokens\nAuthorization: Bearer SECRETTOKEN\n\n  \nX-Trace:   abc  \nX-Empty:\n")
        let a = try parseAdd(["-t", "http", "--url", "http://h/x", "--header", "X-A:b", "--header-file", path])
        let o = try a.http.targetOptions()
        XCTAssertEqual(o.http.headers, ["X-A: b", "Authorization: Bearer SECRETTOKEN", "X-Trace: abc", "X-Empty: "])
        XCTAssertTrue(a.http.given && a.http.httpOnlyGiven)
        XCTAssertEqual(try HTTPHeader.parseFile(""), [])
    }

    func testBadHeaderFilesAreOneLineErrorsWithoutValues() {
        let http = ["add", "-t", "http", "--url", "http://h/x", "--header-file"]
        let cases: [(String, String)] = [
            (secretFile("Authorization: Bearer SECRETTOKEN\r\n"), "line 1: the value of 'Authorization' contains a line break"),
            (secretFile("X-Ok: 1\nAuthorization SECRETTOKEN\n"), "line 2: expected 'Name: value'"),
            (secretFile("X-Ok: 1\nAuth: SECRET\u{1}TOKEN\n"), "line 2: the value of 'Auth' contains a control character"),
            (secretFile("Authorization: Bearer SECRETTOKEN\n", mode: 0o644), "readable by every user"),
            (secretFile("Authorization: Bearer SECRETTOKEN\n", mode: 0o604), "chmod 600"),
            ("/nonexistent/headers", "cannot read --header-file /nonexistent/headers"),
            (NSTemporaryDirectory(), "not a regular file"),
            (secretFile(String(repeating: "X-Big: " + String(repeating: "a", count: 1000) + "\n", count: 80)), "larger than 64K"),
        ]
        for (path, expected) in cases {
            let msg = failure(http + [path])
            XCTAssertTrue(msg.contains(expected), "\(path): \(msg)")
            XCTAssertFalse(msg.contains("SECRET"), "the value is echoed: \(msg)")
            XCTAssertFalse(msg.contains("\n"), "not one line: \(msg)")
        }
        XCTAssertTrue(failure(["add", "-t", "null", "--header-file", "/x"]).contains("apply to the http target only"))
    }

    func testPasswordFileMustBePrivate() {
        let path = secretFile("s3cret\n", mode: 0o644)
        let msg = failure(["add", "-t", "http", "--url", "http://h/x", "--user", "me", "--password-file", path])
        XCTAssertTrue(msg.contains("readable by every user"), msg)
    }

    func testCredentialsFileProfiles() throws {
        let path = secretFile("""
            # comment
            [default]
            aws_access_key_id = AKIDDEFAULT
            aws_secret_access_key=secretdefault

            [work]
            ; another comment
            AWS_ACCESS_KEY_ID = AKIDWORK
            aws_secret_access_key = secret/work=
            aws_session_token = tokenwork
            [empty]
            aws_access_key_id =
            """)
        let d = try XCTUnwrap(S3Config.fromEnvironment(region: "eu-west-1", environment: ["AWS_SHARED_CREDENTIALS_FILE": path]))
        XCTAssertEqual(d.accessKeyID, "AKIDDEFAULT")
        XCTAssertEqual(d.secretAccessKey, "secretdefault")
        XCTAssertNil(d.sessionToken)
        XCTAssertEqual(d.endpoint, "https://s3.eu-west-1.amazonaws.com")
        let w = try XCTUnwrap(S3Config.fromEnvironment(environment: ["AWS_SHARED_CREDENTIALS_FILE": path, "AWS_PROFILE": "work"]))
        XCTAssertEqual(w.accessKeyID, "AKIDWORK")
        XCTAssertEqual(w.secretAccessKey, "secret/work=")
        XCTAssertEqual(w.sessionToken, "tokenwork")
        XCTAssertNil(S3Config.fromEnvironment(environment: ["AWS_SHARED_CREDENTIALS_FILE": path, "AWS_PROFILE": "empty"]))
        XCTAssertNil(S3Config.fromEnvironment(environment: ["AWS_SHARED_CREDENTIALS_FILE": path, "AWS_PROFILE": "none"]))
        XCTAssertNil(S3Config.fromEnvironment(environment: ["AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials"]))
        // The environment's key pair wins over the file.
        let e = try XCTUnwrap(S3Config.fromEnvironment(environment: ["AWS_SHARED_CREDENTIALS_FILE": path,
                                                                     "AWS_ACCESS_KEY_ID": "AKIDENV", "AWS_SECRET_ACCESS_KEY": "s"]))
        XCTAssertEqual(e.accessKeyID, "AKIDENV")
        // Without AWS_SHARED_CREDENTIALS_FILE: $HOME/.aws/credentials.
        let home = NSTemporaryDirectory() + "/ublk-home-\(getpid())"
        try FileManager.default.createDirectory(atPath: home + "/.aws", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: home) }
        try FileManager.default.copyItem(atPath: path, toPath: home + "/.aws/credentials")
        XCTAssertEqual(S3Config.credentialsFilePath(environment: ["HOME": home]), home + "/.aws/credentials")
        XCTAssertEqual(S3Config.fromEnvironment(environment: ["HOME": home])?.accessKeyID, "AKIDDEFAULT")
        XCTAssertNil(S3Config.fromEnvironment(environment: [:]))
    }

    func testURLRedaction() {
        let cases: [(String, String)] = [
            ("http://127.0.0.1:8080/disk.img?X-Amz-Signature=SECRETSIG", "http://127.0.0.1:8080/disk.img?X-Amz-Signature=REDACTED"),
            ("https://b.s3.amazonaws.com/k.img?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKID%2F2024&X-Amz-Signature=abc#frag",
             "https://b.s3.amazonaws.com/k.img?X-Amz-Algorithm=REDACTED&X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED#frag"),
            ("https://user:pass@host/p?tok", "https://user:REDACTED@host/p?REDACTED"),
            ("https://user@host/p", "https://user@host/p"),
            ("http://host/p?a=1&&b", "http://host/p?a=REDACTED&&REDACTED"),
            ("http://host/p", "http://host/p"),
            ("s3://bucket/key", "s3://bucket/key"),
            ("/var/cache/x.cache", "/var/cache/x.cache"),
        ]
        for (url, want) in cases { XCTAssertEqual(Redact.url(url), want) }
        XCTAssertEqual(Redact.text("started afresh: URL http://h/a?sig=OLD is now http://h/a?sig=NEW."),
                       "started afresh: URL http://h/a?sig=REDACTED is now http://h/a?sig=REDACTED.")
        XCTAssertEqual(Redact.text("no url here"), "no url here")
        XCTAssertEqual(Redact.header("Authorization: Bearer SECRETTOKEN"), "Authorization: REDACTED")
        let args = ["add", "-t", "http", "--url", "http://h/d.img?X-Amz-Signature=SECRETSIG", "--header", "Authorization: Bearer SECRETTOKEN",
                    "--header=X-Key: SECRETKEY", "--url=http://u:SECRETPW@h/x", "--header-file", "/etc/h", "--timeout", "5"]
        let shown = Redact.arguments(args)
        for secret in ["SECRETSIG", "SECRETTOKEN", "SECRETKEY", "SECRETPW"] {
            XCTAssertFalse(shown.joined(separator: " ").contains(secret), "\(secret) in \(shown)")
        }
        XCTAssertEqual(shown, ["add", "-t", "http", "--url", "http://h/d.img?X-Amz-Signature=REDACTED", "--header", "Authorization: REDACTED",
                               "--header=X-Key: REDACTED", "--url=http://u:REDACTED@h/x", "--header-file", "/etc/h", "--timeout", "5"])
        // The redacted copy still parses (the server's argv is parsed before it reads the real one).
        XCTAssertNoThrow(try UblkHTTP.parseAsRoot(Redact.arguments(["add", "-t", "http", "--url", "http://h/x?s=1", "--header", "A: b"])))
    }

    func testStateFileIsRedactedAndArgumentsArePrivate() throws {
        let dir = NSTemporaryDirectory() + "/ublk-run-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let saved = DeviceState.directory
        DeviceState.directory = dir
        defer { DeviceState.directory = saved; try? FileManager.default.removeItem(atPath: dir) }
        let url = "http://127.0.0.1:8080/disk.img?X-Amz-Signature=SECRETSIG"
        var state = DeviceState(id: 7, pid: 1, target: "http", options: ["url": url, "cache_state": "started afresh: URL \(url) is now x"],
                                queues: 1, depth: 1, bufferSize: 4096, size: 1 << 20, readOnly: true, recovery: true)
        state.arguments = ["add", "-t", "http", "--url", url, "--header", "Authorization: Bearer SECRETTOKEN"]
        let umaskWas = umask(0)
        defer { umask(umaskWas) }
        try state.save()
        let json = try String(contentsOfFile: DeviceState.path(7), encoding: .utf8)
        XCTAssertFalse(json.contains("SECRET"), json)
        XCTAssertTrue(json.contains("X-Amz-Signature=REDACTED"), json)
        var st = stat()
        XCTAssertEqual(stat(DeviceState.argumentsPath(7), &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o600)
        XCTAssertEqual(stat(DeviceState.path(7), &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o644)
        XCTAssertEqual(DeviceState.loadArguments(7), state.arguments, "recover gets the real arguments")
        XCTAssertNil(DeviceState.load(7)?.arguments)
        XCTAssertEqual(DeviceState.load(7)?.targetOptions["url"], "http://127.0.0.1:8080/disk.img?X-Amz-Signature=REDACTED")
        DeviceState.remove(7)
        XCTAssertNil(DeviceState.loadArguments(7))
    }

    func testArgumentsTravelThroughAPipe() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&fds), 0)
        let args = ["add", "-t", "http", "--url", "http://h/x?sig=S", "--header", "A: b c", "", "--x=é"]
        let payload = Array(args.map { $0 + "\0" }.joined().utf8)
        XCTAssertEqual(payload.withUnsafeBytes { write(fds[1], $0.baseAddress, $0.count) }, payload.count)
        close(fds[1])
        XCTAssertEqual(try Daemon.receiveArguments(fd: fds[0]), args)
        XCTAssertEqual(Add.savedArguments(["add", "-t", "null", "--foreground", "--ready-fd", "3", "--arguments-fd", "4", "--arguments-fd=5"]),
                       ["add", "-t", "null"])
    }
}

/// A presigned URL's signature is no part of a cache's
/// identity: not in the bitmap header (`status` prints it), and a URL signed
/// again finds the same default cache files.
final class PresignedURLTests: XCTestCase {
    func testSignatureStaysOutOfTheCacheIdentity() {
        let a = "https://bucket.s3.amazonaws.com/disk.img?X-Amz-Credential=AKIAX&X-Amz-Signature=SECRET1"
        let b = "https://bucket.s3.amazonaws.com/disk.img?X-Amz-Credential=AKIAX&X-Amz-Signature=SECRET2"
        XCTAssertFalse(HTTPTarget.identityURL(a).contains("SECRET"))
        XCTAssertFalse(HTTPTarget.identityURL(a).contains("AKIAX"))
        XCTAssertEqual(HTTPTarget.identityURL(a), HTTPTarget.identityURL(b))
        XCTAssertEqual(HTTPOptions.defaultPaths(for: a).bitmap, HTTPOptions.defaultPaths(for: b).bitmap)
        XCTAssertNotEqual(HTTPOptions.defaultPaths(for: a).bitmap,
                          HTTPOptions.defaultPaths(for: "https://bucket.s3.amazonaws.com/other.img").bitmap)
    }

    func testURLsThatDifferInAQueryValueGetTheirOwnCacheFiles() {
        let a = HTTPOptions.defaultPaths(for: "http://h/download?id=a")
        let b = HTTPOptions.defaultPaths(for: "http://h/download?id=b")
        XCTAssertNotEqual(a.cache, b.cache)
        XCTAssertNotEqual(a.bitmap, b.bitmap)
        XCTAssertNotEqual(HTTPTarget.identityURL("http://h/download?id=a"), HTTPTarget.identityURL("http://h/download?id=b"))
        XCTAssertEqual(HTTPOptions.defaultPaths(for: "http://h/download?id=a&X-Amz-Signature=S1&X-Amz-Date=D1").cache,
                       HTTPOptions.defaultPaths(for: "http://h/download?id=a&X-Amz-Signature=S2&X-Amz-Date=D2").cache)
    }

    func testAddHelpSaysWhatIsLeftOutOfTheIdentity() {
        // Wrapped lines and their indent joined: one space between words.
        let help = Add.helpMessage(columns: 200).split(whereSeparator: { $0 == " " || $0 == "\n" }).joined(separator: " ")
        for word in ["X-Amz-*", "X-Goog-*", "Expires and Signature", "AWSAccessKeyId", "Azure SAS", "skoid",
                     "URLs that differ in a query value are different images", "signed again finds its cache", "REDACTED"] {
            XCTAssertTrue(help.contains(word), "add --help does not mention \(word)")
        }
    }

    func testAPlainURLKeepsItsCacheFileNames() {
        // FNV-1a 64 of the URL itself, as before: existing caches stay found.
        let p = HTTPOptions.defaultPaths(for: "http://127.0.0.1:8080/disk.img")
        XCTAssertEqual(p.cache, "/var/cache/ublk-http/disk.img-3e20fe1502bb6067.cache")
        XCTAssertEqual(p.bitmap, "/var/cache/ublk-http/disk.img-3e20fe1502bb6067.bitmap")
    }
}

/// `add -t http --url URL --overlay NAME` makes the same devices with and
/// without --foreground: the image's base in the background, and an overlay
/// device over it (served in the foreground with --foreground), never an
/// http device on the base's cache files.
final class OverlayAddTests: XCTestCase {
    let url = "http://127.0.0.1:1/disk.img"

    func parseAdd(_ args: [String]) throws -> Add {
        try XCTUnwrap(try UblkHTTP.parseAsRoot(["add"] + args) as? Add)
    }

    func testAnHTTPAddWithAnOverlayIsNeverBuiltAsOneHTTPTarget() throws {
        let dir = NSTemporaryDirectory() + "/overlay-add-\(getpid())"
        mkdir(dir, 0o700)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for extra in [[], ["--writable"]] {
            let a = try parseAdd(["--foreground", "-t", "http", "--url", url, "--cache", dir + "/c", "--bitmap", dir + "/b",
                                  "--overlay", "fg"] + extra)
            do {
                _ = try a.makeTarget()
                XCTFail("an http target was made for an overlay add \(extra)")
            } catch {
                let m = UblkHTTP.message(for: error)
                XCTAssertTrue(m.contains("overlay device over the image's base"), m)
            }
            XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/b"), "the base's cache files are not touched")
        }
    }

    func testTheBaseOfAForegroundAddIsStartedInTheBackground() {
        let args = ["add", "--foreground", "-t", "http", "--url", url, "--readahead", "1M", "--overlay", "x", "--writable",
                    "--overlay-dir=/o", "-n", "5", "--ready-fd", "3", "--recovery"]
        XCTAssertEqual(OverlayBase.baseArguments(args), ["add", "-t", "http", "--url", url, "--readahead", "1M", "--recovery"])
        XCTAssertEqual(OverlayBase.baseArguments(["add", "--ready-fd=3", "--arguments-fd=4", "--recover-id", "2", "-t", "http"]),
                       ["add", "-t", "http"])
    }

    func testTheOverlayDeviceIsTheSameWithAndWithoutForeground() throws {
        let common = ["-t", "http", "--url", url, "--overlay", "vm1", "--overlay-dir", "/o", "-n", "7", "-q", "2", "-d", "64", "--recovery"]
        let background = try parseAdd(common)
        let foreground = try parseAdd(common + ["--foreground"])
        // -q applies to the overlay device as to its base: both serve from every queue.
        let expected = ["add", "-t", "overlay", "--lower", "/dev/ublkb3", "--overlay", "vm1", "--overlay-dir", "/o",
                        "-q", "2", "-d", "64", "-n", "7", "--recovery"]
        XCTAssertEqual(OverlayBase.overlayArguments(background, lower: "/dev/ublkb3"), expected)
        XCTAssertEqual(OverlayBase.overlayArguments(foreground, lower: "/dev/ublkb3"), expected)
        // They parse as the overlay device they name.
        let device = try XCTUnwrap(try UblkHTTP.parseAsRoot(expected) as? Add)
        XCTAssertEqual(device.type, "overlay")
        XCTAssertEqual(device.overlay.lower, "/dev/ublkb3")
        XCTAssertTrue(device.recovery)
    }
}
