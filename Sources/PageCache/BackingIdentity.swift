import Glibc

/// What identifies a backing store beyond its path and size: for a file its
/// file system id and inode; for a block device what /sys offers (WWID,
/// serial, dm UUID, loop backing file, partition number and start). Stable
/// across reboots where the kernel can make it so; recorded by the `cache`
/// target in the bitmap, compared at the next open.
public enum BackingIdentity {
    public static func describe(fd: Int32) -> String {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return "unknown" }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let dev = UInt64(st.st_rdev)
            let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
            let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
            let sys = "/sys/dev/block/\(major):\(minor)/"
            var parts: [String] = []
            for (key, rel) in [("wwid", "device/wwid"), ("wwid", "wwid"), ("serial", "device/serial"), ("serial", "serial"),
                               ("dm", "dm/uuid"), ("loop", "loop/backing_file"), ("part", "partition"), ("start", "start"),
                               ("disk-wwid", "../device/wwid"), ("disk-wwid", "../wwid"), ("disk-serial", "../device/serial"),
                               ("disk-serial", "../serial")] {
                if let v = readSmall(sys + rel), !v.isEmpty, !parts.contains(where: { $0.hasPrefix(key + "=") }) {
                    parts.append("\(key)=\(v)")
                }
            }
            return parts.isEmpty ? "block" : "block;" + parts.joined(separator: ";")
        }
        var fs = statvfs()
        let fsid = fstatvfs(fd, &fs) == 0 ? String(fs.f_fsid, radix: 16) : "?"
        return "file;fsid=\(fsid);ino=\(st.st_ino)"
    }

    private static func readSmall(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 256)
        guard let n = buf.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, 256, 0) }).value else { return nil }
        // One line, printable, no separators of ours.
        let s = String(decoding: buf[0..<n], as: UTF8.self).trimmingNewline
        return String(s.unicodeScalars.filter { $0.value > 32 && $0.value < 127 && $0 != ";" }.map(Character.init))
    }
}
