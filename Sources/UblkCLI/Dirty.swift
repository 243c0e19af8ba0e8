import ArgumentParser
import CUring
import FoundationEssentials
import Glibc
import PageCache
import UblkTarget

/// Where dirty pages are read from: a live device (its server), or the files of a stopped one.
struct DirtySource: ParsableArguments {
    @Option(name: [.short, .customLong("number")], help: "A live device: id N (/dev/ublkbN).")
    var number: Int?

    @Option(name: .customLong("dirty-bitmap"), help: "A stopped device: its dirty bitmap file (the --bitmap file + .dirty).")
    var dirtyBitmap: String?

    func check() throws {
        if (number == nil) == (dirtyBitmap == nil) { throw Failure("give either -n ID (a live device) or --dirty-bitmap FILE (a stopped one)") }
    }

    /// A stopped device's dirty bitmap, opened for update (CacheStore: it must
    /// belong to its cache, and the bits a dead server of this boot left count),
    /// with its cache file when `cache` is given (checked to belong too).
    func openFile(cache: String? = nil) throws -> (bitmap: Bitmap, cache: CacheFile?) {
        guard let path = dirtyBitmap else { throw Failure("no --dirty-bitmap") }
        do {
            return try CacheStore.openDirty(path: path, cachePath: cache, live: LiveConfig.system(required: false))
        } catch {
            throw Failure("\(error)")
        }
    }
}

struct Dirty: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the pages written since the last clear, as merged extents (JSON).",
        discussion: """
            Output: {"extents":[{"offset":…,"length":…}], "pages":…, "bytes":…,
            "page_size":…}. --clear empties the list (atomically: a page written
            after it is listed again). Works on a live writable device (-n) or
            on a stopped one's files (--dirty-bitmap).
            """)

    @OptionGroup var source: DirtySource

    @Flag(name: .customLong("clear"), help: "Clear the list after printing it.")
    var clear = false

    func validate() throws { try source.check() }

    func run() throws {
        if let n = source.number {
            try requireRoot()
            let id = try deviceID(n)
            do {
                let data = try ControlClient.send(ControlRequest(op: .dirty, clear: clear), device: id)
                print(String(decoding: data, as: UTF8.self))
            } catch { throw Failure(error) }
            return
        }
        let bitmap = try source.openFile().bitmap
        let out = DirtyExtents(runs: DirtyExtents.runs(bitmap.bits), pageSize: UInt64(bitmap.pageSize),
                               imageSize: bitmap.identity.imageSize, token: nil)
        if clear {
            bitmap.markAbsent(0..<bitmap.pageCount)
            do { try bitmap.persist(bitmap.stage()) } catch { throw Failure("\(error)") }
        }
        print(jsonLine(out))
    }
}

struct Sync: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy exactly the dirty extents into a replica image, then clear them.",
        discussion: """
            Live device (-n): the server lists the dirty pages (clearing
            nothing), they are read from /dev/ublkbN and written to REPLICA,
            which is then fdatasync'ed (a file's directory too); only then
            does the server clear them, except the pages written during the
            copy, which stay dirty. A sync that fails, is
            interrupted (Ctrl-C, kill -9, a crash of either side, a power
            loss) clears nothing: run it again and the replica is exact.
            Stopped device: --dirty-bitmap FILE --cache FILE copies from the
            cache file, and clears the bits after the replica's fdatasync.
            The replica is created (0600) or grown to the device size when
            needed.
            """)

    @OptionGroup var source: DirtySource

    @Option(name: .customLong("to"), help: "The replica image to bring up to date.")
    var to: String

    @Option(name: .customLong("cache"), help: "A stopped device: its cache file (the data to copy).")
    var cache: String?

    func validate() throws {
        try source.check()
        if source.dirtyBitmap != nil && cache == nil { throw Failure("a stopped device needs --cache FILE too") }
    }

    struct Output: Encodable {
        var extents: Int
        var bytes: UInt64
        var replica: String
    }

    func run() throws {
        if let n = source.number {
            try requireRoot()
            let id = try deviceID(n)
            // Writes still in the kernel's page cache of /dev/ublkbN reach the
            // server first (they are not the device's content, nor dirty, before).
            let dev = open("/dev/ublkb\(id)", O_RDONLY | O_CLOEXEC)
            if dev >= 0 {
                let r = fsync(dev)
                let e = Errno.current
                close(dev)
                if r != 0 { throw Failure("fsync of /dev/ublkb\(id): \(e)") }
            }
            let taken: DirtyExtents
            do {
                let data = try ControlClient.send(ControlRequest(op: .syncBegin), device: id)
                taken = try JSONDecoder().decode(DirtyExtents.self, from: data)
            } catch let e as UblkError { throw Failure(e) }
            guard let token = taken.token else { throw Failure("ublk\(id): the server gave no sync token") }
            var size = UInt64(0)
            if let st = DeviceState.load(id) { size = st.size }
            // Nothing is cleared yet: a sync killed from here on leaves every page dirty.
            do {
                try copy(taken.extents, from: "/dev/ublkb\(id)", direct: true, size: size)
            } catch {
                _ = try? ControlClient.send(ControlRequest(op: .syncEnd, token: token, ok: false), device: id)
                throw error
            }
            do { _ = try ControlClient.send(ControlRequest(op: .syncEnd, token: token, ok: true), device: id) } catch {
                throw Failure(error)
            }
            print(jsonLine(Output(extents: taken.extents.count, bytes: taken.bytes, replica: to)))
            return
        }
        let (bitmap, _) = try source.openFile(cache: cache)
        let runs = DirtyExtents.runs(bitmap.bits)
        let out = DirtyExtents(runs: runs, pageSize: UInt64(bitmap.pageSize), imageSize: bitmap.identity.imageSize, token: nil)
        // copy() returns only once the replica is durable: the bits go after it.
        try copy(out.extents, from: cache!, direct: false, size: bitmap.identity.imageSize)
        for r in runs { bitmap.markAbsent(r) }
        do { try bitmap.persist(bitmap.stage()) } catch { throw Failure("\(error)") }
        print(jsonLine(Output(extents: out.extents.count, bytes: out.bytes, replica: to)))
    }

    func copy(_ extents: [DirtyExtents.Extent], from path: String, direct: Bool, size: UInt64) throws {
        do { try Replica.copy(extents, from: path, direct: direct, to: to, size: size) } catch { throw Failure(error) }
    }
}

struct Flush: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write every write-back page of a cache device to its backing store; returns when none is left.",
        discussion: "For `add -t cache --write-mode back`. The backing store is fdatasync'ed before this returns.")

    @Option(name: [.short, .customLong("number")], help: "Device id N (/dev/ublkbN).")
    var number: Int

    func run() throws {
        try requireRoot()
        let id = try deviceID(number)
        var last = UInt64.max
        while true {
            let status: WritebackStatus
            do {
                let data = try ControlClient.send(ControlRequest(op: .flush), device: id)
                status = try JSONDecoder().decode(WritebackStatus.self, from: data)
            } catch let e as UblkError { throw Failure(e) } catch { throw Failure("ublk\(id): bad reply: \(error)") }
            if status.isDone { break }
            if isatty(2) != 0 && status.writebackPages != last {
                printError("\rwriting back: \(status.writebackPages) pages left\u{1b}[K")
                last = status.writebackPages
            }
            usleep(100_000)
        }
        if isatty(2) != 0 && last != .max { printError("\n") }
        print(jsonLine(["writeback_pages": 0]))
    }
}
