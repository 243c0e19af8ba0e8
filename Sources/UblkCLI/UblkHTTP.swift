// The `ublk-http` command line: verbs and flags in the shape of ublksrv's `ublk`.
import ArgumentParser
import FoundationEssentials
import Glibc
import UblkTarget

public struct UblkHTTP: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "ublk-http",
        abstract: "Userspace block devices through the kernel's ublk driver.",
        discussion: """
            Examples:
              ublk-http add -t null --size 1G          a 1 GiB device that reads zeros
              ublk-http add -t loop -f disk.img        disk.img as /dev/ublkbN
              ublk-http add -t http --url URL          a remote image, fetched on demand
              ublk-http stats -n 0                     cache statistics (Prometheus text)
              ublk-http list                           devices, as JSON
              ublk-http del -n 0                       stop and remove /dev/ublkb0
              ublk-http recover -n 0                   a new server for a --recovery device
              ublk-http add -t cache --backing /dev/sdb --cache /nvme/c --bitmap /nvme/b \\
                  --write-mode back                    /dev/sdb cached on flash
              ublk-http flush -n 0                     write every cached write back
              ublk-http dirty -n 0                     pages written since the last clear
              ublk-http sync -n 0 --to replica.img     copy just those to a replica
              ublk-http hydrate -n 0 [--rate 4M/s]     fetch every missing page (then the source may go)
              ublk-http profile record -n 0 --out F    record what a boot reads first (profile --help)
              ublk-http add -t http --url URL --verity-root HEX --verity-tree URL
                                                       a verified image: every page checked (dm-verity's tree)
              ublk-http verify -n 0                    check every cached page against the tree again
              ublk-http features                       what the kernel's driver supports
              ublk-http up [NAME...]                   bring up what /etc/ublk-http/ublktab declares (check --help)
              ublk-http metrics --textfile F           every device's counters for Prometheus

            `add` returns once /dev/ublkbN is live and prints one JSON object; the server
            keeps running in the background until `del`, SIGTERM or SIGINT.
            Needs root and the ublk_drv module (modprobe ublk_drv).
            """,
        subcommands: [Add.self, Del.self, List.self, Recover.self, Stats.self, Prefetch.self, Status.self, Dirty.self, Sync.self, Flush.self, Hydrate.self, Verify.self, Features.self, Profile.self,
                      Up.self, Down.self, Check.self, Serve.self, MetricsCommand.self, GenerateUnits.self]
    )
    public init() {}

    /// As ArgumentParser's `main()`, except that every error is one line on stderr
    /// (ArgumentParser adds "Help:" and "Usage:" lines to parse errors) and a
    /// non-zero exit. `--help` and the like print as usual.
    public static func main() {
        do {
            var command = try parseAsRoot(nil)
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success || error is ExitCode { exit(withError: error) }
            let message = oneLine(message(for: error))
            if message.isEmpty { exit(withError: error) }
            fputs("Error: \(message)\n", stderr)
            Glibc.exit(code.rawValue)
        }
    }

    /// Lines joined by "; ", blank ones dropped.
    static func oneLine(_ text: String) -> String {
        text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).map { $0.trimmed }.filter { !$0.isEmpty }
            .joined(separator: "; ")
    }
}

/// A failure the CLI reports as one line and exit status 1.
struct Failure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
    init(_ error: UblkError) { self.description = error.description }
}

/// A device id from `-n`: 0 up to the driver's limit, never a trap or a silent clamp.
func deviceID(_ n: Int) throws -> UInt32 {
    guard n >= 0 && n < 1 << 20 else { throw Failure("bad device id \(n): expected 0 to \((1 << 20) - 1)") }
    return UInt32(n)
}

func requireRoot() throws {
    if geteuid() != 0 {
        throw Failure("must be run as root: the ublk control device (/dev/ublk-control) is root-only")
    }
}

func openControl() throws -> Control {
    try requireRoot()
    do { return try Control() } catch { throw Failure(error) }
}

func jsonLine<T: Encodable>(_ value: T) -> String {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    let data = (try? enc.encode(value)) ?? Data("null".utf8)
    return String(decoding: data, as: UTF8.self)
}

struct Features: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print the kernel ublk driver's feature bits, by name, as JSON.")

    static let names: [(UInt64, String)] = [
        (1 << 0, "UBLK_F_SUPPORT_ZERO_COPY"), (1 << 1, "UBLK_F_URING_CMD_COMP_IN_TASK"),
        (1 << 2, "UBLK_F_NEED_GET_DATA"), (1 << 3, "UBLK_F_USER_RECOVERY"),
        (1 << 4, "UBLK_F_USER_RECOVERY_REISSUE"), (1 << 5, "UBLK_F_UNPRIVILEGED_DEV"),
        (1 << 6, "UBLK_F_CMD_IOCTL_ENCODE"), (1 << 7, "UBLK_F_USER_COPY"), (1 << 8, "UBLK_F_ZONED"),
        (1 << 9, "UBLK_F_USER_RECOVERY_FAIL_IO"), (1 << 10, "UBLK_F_UPDATE_SIZE"),
        (1 << 11, "UBLK_F_AUTO_BUF_REG"), (1 << 12, "UBLK_F_QUIESCE"), (1 << 13, "UBLK_F_PER_IO_DAEMON"),
        (1 << 14, "UBLK_F_BUF_REG_OFF_DAEMON"), (1 << 15, "UBLK_F_BATCH_IO"), (1 << 16, "UBLK_F_INTEGRITY"),
        (1 << 17, "UBLK_F_SAFE_STOP_DEV"), (1 << 18, "UBLK_F_NO_AUTO_PART_SCAN"),
        (1 << 19, "UBLK_F_SHMEM_ZC"), (1 << 20, "UBLK_F_IO_DESC_SIZE"),
    ]

    static func describe(_ bits: UInt64) -> [String] {
        var out: [String] = []
        for i in 0..<64 where bits & (1 << UInt64(i)) != 0 {
            out.append(names.first { $0.0 == 1 << UInt64(i) }?.1 ?? "bit \(i)")
        }
        return out
    }

    struct Output: Encodable { var raw: String; var features: [String] }

    func run() throws {
        let control = try openControl()
        let bits: UInt64
        do { bits = try control.features() } catch {
            throw Failure("GET_FEATURES failed: \(error) (the driver predates Linux 6.1?)")
        }
        print(jsonLine(Output(raw: "0x" + String(bits, radix: 16), features: Features.describe(bits))))
    }
}
