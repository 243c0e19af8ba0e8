import ArgumentParser
import FoundationEssentials
import Glibc
import PageCache
import UblkService
import UblkTarget

struct Add: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a ublk block device served by this program.",
        discussion: """
            Targets:
              null   reads zeros, accepts and drops writes.  --size (default 250G)
              loop   a file or block device.                  -f FILE [--buffered]
              cache  a slow file or block device cached on fast storage, page
                     by page.  --backing PATH --cache FILE --bitmap FILE
                     [--write-mode through|back] [--no-dirty-tracking]
              http   a disk image on an HTTP(S) server or in S3, fetched on
                     demand into a persistent page cache; read-only unless
                     --writable.  --url URL [--cache FILE --bitmap FILE]
                     [--header-file F] [--user NAME --password-file F]
                     [--cacert FILE | --insecure] [--timeout S]
                     [--connections N] [--readahead SIZE] [--page-size 4096]
                     [--s3-endpoint URL --region R]
                     [--overlay NAME]: a writable device over the image's
                     shared base (below)
              overlay  a writable device over a read-only lower device,
                     keeping only the pages written here.  --lower DEV
                     --overlay NAME [--overlay-dir DIR]

            http: the cache and bitmap default to
            /var/cache/ublk-http/NAME-HASH.{cache,bitmap}, keyed by the URL;
            the next `add` of the same URL reuses what was fetched, unless the
            remote changed (ETag, Last-Modified, size): then the cache starts
            afresh. A cache whose every page is present (`hydrate`) serves when
            the remote cannot be reached: `list` says "remote": "unreachable,
            serving the complete cache". S3 credentials come from AWS_ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, else from the
            shared credentials file ($AWS_SHARED_CREDENTIALS_FILE, default
            ~/.aws/credentials), profile $AWS_PROFILE (default "default").

            Many devices from one image: `add -t http --url URL --overlay NAME`
            attaches a writable device whose writes go to the overlay NAME
            (in --overlay-dir, default /var/lib/ublk-http/overlays) and whose
            other pages come from the image's base: one read-only http device
            per URL, started by the first such add (with this add's cache
            options) and shared by every later one. Each page is fetched once
            and stored once, in the base's cache, under its --cache-max-size.
            The same NAME later reattaches the overlay; an overlay written over
            another image is refused. `del` of an overlay device keeps its
            overlay and leaves the base running (`del` it when none is left).
            A base added with --recovery whose server died is recovered by the
            next such add. With --foreground the base runs in the background
            and the overlay device's server in the foreground.

            Secrets: the server is started without them on its command line
            (they travel through a pipe), and --header values, passwords and
            the query string of the URL (a presigned X-Amz-Signature=...) are
            shown as REDACTED in `list`, the state files and the logs under
            /run/ublk-http/. `add`'s own command line is visible to every user
            while it runs: put secret headers in a --header-file (mode 0600).

            Prints one JSON object (dev_id, block_device, char_device, pid,
            target, ...) once /dev/ublkbN is live. Without --foreground the
            server detaches and runs until `ublk-http del -n ID`, SIGTERM or
            SIGINT.
            """)

    @Option(name: [.short, .customLong("type")], help: "Target type: null, loop, http, cache or overlay.")
    var type: String

    @Option(name: [.short, .customLong("number")], parsing: .unconditional, help: "Device id N for /dev/ublkbN (default: the first free one).")
    var number: Int?

    @Option(name: [.short, .customLong("queues")], parsing: .unconditional, help: "Number of hardware queues, each with its own thread and io_uring (1-64). http, cache, overlay: every queue serves cache hits itself; misses, writes and FLUSH go through queue 0, which fetches, persists and evicts.")
    var queues: Int = 1

    @Option(name: [.short, .customLong("depth")], parsing: .unconditional, help: "Queue depth (1-4096).")
    var depth: Int = 128

    @Option(name: .customLong("size"), help: "null: device size, with K/M/G/T suffixes (default 250G).")
    var size: String?

    @Option(name: [.short, .customLong("file")], help: "loop: the backing file or block device.")
    var file: String?

    @Flag(name: .customLong("buffered"), help: "loop: use the page cache instead of O_DIRECT.")
    var buffered = false

    @Option(name: .customLong("backing"), help: "cache: the slow file or block device to cache.")
    var backing: String?

    @Option(name: .customLong("write-mode"), help: "cache: through (writes reach both before completing) or back (cache first, written back in the background).")
    var writeMode: String = "through"

    @Option(name: .customLong("admit"), help: "cache, with --cache-max-size: which read misses are copied into the cache. reuse (the default): a page that missed before, within about the cache's size of misses; a first miss is read from the backing store straight into the request and not kept, so a scan or a backup read once leaves the cache's hot pages where they are. all: every miss. Writes are always cached.")
    var admit: String?

    @Flag(name: .customLong("no-dirty-tracking"), help: "cache: do not track written pages (no `dirty`/`sync`). Writes of pages the cache does not hold then go to the flash at once, without waiting for their bits to be synced first (their bits go before the pages' present bits).")
    var noDirtyTracking = false

    @Option(name: .customLong("cache-max-size"), help: "http, cache: keep the cache file under SIZE (K/M/G/T) by evicting clean pages, least recently used first. Pages written here (an overlay's, or not yet written back) are never evicted, and fetches in flight (up to the readahead window and 4 MiB per connection) come on top: leave the file system that much room.")
    var cacheMaxSize: String?

    @OptionGroup(title: "http target (--cache, --bitmap and --page-size also for cache)")
    var http: HTTPOptions

    @OptionGroup(title: "overlays (many devices from one image)")
    var overlay: OverlayOptions
    @Option(name: .customLong("prefetch-profile"), help: "http: replay a boot profile (`ublk-http profile --help`) in the background: its pages in recorded order, coalesced into large ranges, after the device's own misses. `ublk-http profile status -n ID --wait` returns once it is done. Refused in one line for another image or a malformed file.")
    var prefetchProfile: String?

    @Flag(name: .customLong("read-only"), help: "Expose the device read-only.")
    var readOnly = false

    @Option(name: .customLong("data-path"), help: "How request data moves: auto-zero-copy (Linux 6.16+), zero-copy (6.15+), user-copy, inline-user-copy (a file in memory), kernel-copy. Default: the best the driver has; refused with one line when it lacks the one asked for.")
    var dataPath: String?

    @Flag(name: .customLong("recovery"), help: "If the server dies, keep the device and hold its I/O until `ublk-http recover -n ID`.")
    var recovery = false

    @Option(name: .customLong("name"), help: "A name for the device (letters, digits, . - _): udev links /dev/ublk-http/NAME to it whatever its number (with the rule the package installs), `list` shows it, and `up`/`down` and the device table find it by it. Refused while another device has it.")
    var name: String?

    @Flag(name: .customLong("foreground"), help: "Serve in this process; print the JSON and block until stopped. Under systemd (Type=notify) the server tells systemd when the device is live.")
    var foreground = false

    @Option(name: .customLong("recover-id"), parsing: .unconditional, help: .hidden)
    var recoverID: Int?

    @Option(name: .customLong("ready-fd"), help: .hidden)
    var readyFD: Int32?

    /// The server's real arguments (NUL-separated, starting with "add"), read from
    /// this fd: its own argv is the redacted copy, see Daemon.
    @Option(name: .customLong("arguments-fd"), help: .hidden)
    var argumentsFD: Int32?

    func validate() throws {
        guard ["null", "loop", "http", "cache", "overlay"].contains(type) else {
            throw Failure("unknown target type '\(type)' (known: null, loop, http, cache, overlay)")
        }
        if let name, let problem = DeviceTable.nameProblem(name) { throw Failure("--name: \(problem)") }
        if type == "overlay" {
            guard overlay.lower != nil else { throw Failure("the overlay target needs --lower DEVICE (a read-only base)") }
        } else if overlay.lower != nil {
            throw Failure("--lower applies to the overlay target only")
        }
        if type == "overlay" || (type == "http" && overlay.name != nil) {
            guard let n = overlay.name else { throw Failure("the overlay target needs --overlay NAME") }
            do { try OverlayStore.validate(name: n) } catch { throw Failure(error.description) }
            if readOnly { throw Failure("an overlay device is writable: drop --read-only") }
        } else if overlay.name != nil {
            throw Failure("--overlay applies to the http and overlay targets only")
        }
        if let n = number { _ = try deviceID(n) }
        if let p = dataPath, DataPath(rawValue: p) == nil {
            throw Failure("unknown --data-path '\(p)' (known: \(DataPath.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        if let n = recoverID { _ = try deviceID(n) }
        if let fd = readyFD, fd < 3 { throw Failure("bad --ready-fd \(fd)") }
        if let fd = argumentsFD, fd < 3 || !foreground { throw Failure("bad --arguments-fd \(fd)") }
        guard (1...64).contains(queues) else { throw Failure("--queues must be between 1 and 64, not \(queues)") }
        guard (1...4096).contains(depth) else { throw Failure("--depth must be between 1 and 4096, not \(depth)") }
        if type != "null" && size != nil { throw Failure("--size applies to the null target only") }
        if let s = size { _ = try Add.nullSize(s) }
        if type != "loop" && (file != nil || buffered) { throw Failure("-f/--file and --buffered apply to the loop target only") }
        if admit != nil && type != "cache" { throw Failure("--admit applies to the cache target only") }
        if type == "loop" && file == nil { throw Failure("the loop target needs a backing file: -f FILE") }
        if type == "http" {
            try http.check()
        } else if type == "cache" {
            guard backing != nil else { throw Failure("the cache target needs --backing FILE_OR_DEVICE") }
            guard http.cache != nil, http.bitmap != nil else { throw Failure("the cache target needs --cache FILE and --bitmap FILE") }
            guard ["through", "back"].contains(writeMode) else { throw Failure("--write-mode must be through or back, not '\(writeMode)'") }
            if let a = admit, !["reuse", "all"].contains(a) { throw Failure("--admit must be reuse or all, not '\(a)'") }
            try http.checkPageSize()
            if http.httpOnlyGiven { throw Failure("--url and the other http options apply to the http target only") }
        } else if http.given {
            throw Failure("--url and the other http options apply to the http target only")
        }
        if (type == "http" || type == "cache" || type == "overlay") && queues * depth >= 65535 {
            throw Failure("the \(type) target takes at most 65534 requests in flight in all: lower -q or -d")
        }
        if prefetchProfile != nil && type != "http" { throw Failure("--prefetch-profile applies to the http target only") }
        if type != "cache" && (backing != nil || noDirtyTracking) { throw Failure("--backing and --no-dirty-tracking apply to the cache target only") }
        if let m = cacheMaxSize {
            guard type == "http" || type == "cache" else { throw Failure("--cache-max-size applies to the http and cache targets only") }
            guard let v = Size.parse(m), v >= 1 << 20 else {
                throw Failure("bad --cache-max-size '\(m)': expected a size of at least 1M and below 8E, with an optional K, M, G, T, P or E suffix")
            }
        }
    }

    func makeTarget() throws -> Target {
        switch type {
        case "null":
            return NullTarget(size: try size.map(Add.nullSize) ?? NullTarget.defaultSize, readOnly: readOnly)
        case "loop":
            do { return try LoopTarget(path: file!, buffered: buffered, readOnly: readOnly) } catch { throw Failure(error) }
        case "http":
            // With --overlay the device is an overlay over the image's base
            // (OverlayBase), never an http device on the base's cache files.
            guard overlay.name == nil else {
                throw Failure("an http device with --overlay is an overlay device over the image's base: `add` starts both, it is not one target")
            }
            var options = try http.targetOptions()
            options.maxCacheBytes = cacheMaxSize.flatMap { Size.parse($0) } ?? 0
            options.queues = queues
            if let path = prefetchProfile { options.prefetchProfile = (path, try loadProfile(path)) }
            do { return try HTTPTarget(options) } catch { throw Failure(error) }
        case "cache":
            var o = CacheTargetOptions(backing: backing!, cachePath: http.cache!, bitmapPath: http.bitmap!)
            o.writeBack = writeMode == "back"
            o.pageSize = http.pageSize
            o.readOnly = readOnly
            o.maxCacheBytes = cacheMaxSize.flatMap { Size.parse($0) } ?? 0
            o.trackDirty = !noDirtyTracking
            o.admitOnReuse = (admit ?? "reuse") == "reuse"
            o.queues = queues
            do { return try CacheTarget(o) } catch { throw Failure(error) }
        case "overlay":
            let lower = overlay.lower!
            let id = try OverlayBase.identity(lower: lower)
            if overlay.directory == OverlayOptions.defaultDirectory {
                mkdir("/var/lib/ublk-http", 0o755)
                mkdir(overlay.directory, 0o700)  // overlays hold data: root's only
            }
            var st = stat()
            guard stat(overlay.directory, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else {
                throw Failure("--overlay-dir \(overlay.directory) is not a directory")
            }
            var o = OverlayTargetOptions(lower: lower, directory: overlay.directory, name: overlay.name!, identity: id)
            o.queues = queues
            do { return try OverlayTarget(o) } catch { throw Failure(error) }
        default:
            throw Failure("unknown target type '\(type)'")
        }
    }

    var serverOptions: ServerOptions { serverOptions(arguments: Array(CommandLine.arguments.dropFirst())) }

    /// `arguments`: this server's `add` command line, saved (root-only) so that `recover` can repeat it.
    func serverOptions(arguments: [String]) -> ServerOptions {
        var o = ServerOptions()
        o.deviceID = number.map { UInt32(clamping: $0) }  // checked by validate()
        o.queues = queues
        o.depth = depth
        o.recovery = recovery
        o.dataPath = dataPath.flatMap(DataPath.init(rawValue:))
        o.recoverID = recoverID.map { UInt32(clamping: $0) }
        o.arguments = Add.savedArguments(arguments)
        o.name = name
        return o
    }

    /// The null target's --size: 512 bytes up to 8E, rounded down to 512.
    static func nullSize(_ s: String) throws -> UInt64 {
        guard let v = Size.parse(s), v >= 512 else {
            throw Failure("bad size '\(s)': expected a number of bytes of at least 512 and below 8E, with an optional K, M, G, T, P or E suffix")
        }
        return v & ~511
    }

    /// The arguments that recreate this server: without the daemon plumbing.
    static func savedArguments(_ args: [String]) -> [String] {
        var out: [String] = []
        var skip = false
        for a in args {
            if skip { skip = false; continue }
            // A profile replay is for the attach: `recover` needs neither it nor its file.
            if a == "--ready-fd" || a == "--recover-id" || a == "--arguments-fd" || a == "--prefetch-profile" { skip = true; continue }
            if a == "--foreground" || a.hasPrefix("--ready-fd=") || a.hasPrefix("--recover-id=")
                || a.hasPrefix("--arguments-fd=") || a.hasPrefix("--prefetch-profile=") { continue }
            out.append(a)
        }
        return out
    }

    func run() throws {
        if foreground {
            guard let fd = argumentsFD else {
                if type == "http" && overlay.name != nil {
                    // The same devices as without --foreground: the base in the
                    // background, the overlay device served here.
                    return try OverlayBase.serveInForeground(self, arguments: Array(CommandLine.arguments.dropFirst()),
                                                             report: readyFD.map { ReadyPipe(fd: $0) })
                }
                return try serve(report: readyFD.map { ReadyPipe(fd: $0) }, arguments: Array(CommandLine.arguments.dropFirst()))
            }
            // Started by Daemon: argv is the redacted copy, the real arguments come through `fd`.
            let report = readyFD.map { ReadyPipe(fd: $0) }
            let real: Add
            let arguments: [String]
            do {
                arguments = try Daemon.receiveArguments(fd: fd)
                guard arguments.first == "add", let parsed = try UblkHTTP.parseAsRoot(arguments) as? Add else {
                    throw Failure("the server's arguments are not an `add` command")
                }
                real = parsed
            } catch {
                let message = UblkHTTP.oneLine(UblkHTTP.message(for: error))
                if let report { report.send("error: \(message)"); throw ExitCode.failure }
                throw Failure(message)
            }
            try real.serve(report: report, arguments: arguments)
        } else {
            // Check what can be checked here, so that errors need no round trip
            // (http probes the network and locks its bitmap: the server does that).
            if type != "http" && type != "cache" && type != "overlay" { _ = try makeTarget() }
            // A malformed profile is refused here; whether it fits the image, the server says.
            if let path = prefetchProfile { _ = try loadProfile(path) }
            try requireRoot()
            _ = try openControl()
            if type == "http" && overlay.name != nil {
                return print(try OverlayBase.attach(self, arguments: Array(CommandLine.arguments.dropFirst())))
            }
            let line = try Daemon.spawnServer(arguments: Array(CommandLine.arguments.dropFirst()))
            print(line)
        }
    }

    /// The server: bring the device up, report, serve until stopped.
    func serve(report: ReadyPipe?, arguments: [String]) throws {
        do {
            if let name, recoverID == nil, let other = Devices.holding(name: name) {
                throw Failure("the name '\(name)' is taken by ublk\(other)")
            }
            let target = try makeTarget()
            try requireRoot()
            let server: Server
            do { server = try Server(target: target, options: serverOptions(arguments: arguments)) } catch { throw Failure(error) }
            let state: DeviceState
            do { state = try server.start() } catch { throw Failure(error) }
            if let r = report {
                r.send(jsonLine(state.redacted))
                Daemon.redirectOutput(toLogFor: state.devID)
            } else {
                print(jsonLine(state.redacted))
                fflush(stdout)
            }
            SystemdNotify.send("READY=1\nSTATUS=serving \(state.blockDevice)\(name.map { " as /dev/ublk-http/\($0)" } ?? "")")
            server.wait()
            SystemdNotify.send("STOPPING=1")
            server.shutdown()
        } catch {
            if let r = report {
                r.send("error: \(Redact.text(UblkHTTP.oneLine("\(error)")))")
                throw ExitCode.failure
            }
            throw error
        }
    }
}
