// DataPath: how a request's data moves between the kernel's request pages and
// the target's files. Chosen once per device, at ADD_DEV, from GET_FEATURES
// (or forced with `add --data-path`); every queue of the device uses it.
//
//   path               device flags                          what moves the bytes
//   auto-zero-copy     AUTO_BUF_REG (+ SUPPORT_ZERO_COPY,    the kernel registers the request's pages at
//                      USER_COPY where the driver has them)  buffer index = tag of the queue's ring before
//                                                            handing the request over, and unregisters them
//                                                            at COMMIT; READ_FIXED / WRITE_FIXED move data
//                                                            file <-> request, no copy in user space (6.16+).
//                                                            A failed automatic registration comes back with
//                                                            UBLK_IO_F_NEED_REG_BUF (the FALLBACK flag) and
//                                                            is registered explicitly, as below.
//   zero-copy          SUPPORT_ZERO_COPY (+ USER_COPY)       the queue registers the pages itself
//                                                            (UBLK_U_IO_REGISTER_IO_BUF) before the handler
//                                                            sees the request, and unregisters them after the
//                                                            last I/O, linked before the COMMIT (6.15+).
//   user-copy          USER_COPY                             file <-> tag buffer by io_uring; tag buffer <->
//                                                            request by pread/pwrite on /dev/ublkcN: at
//                                                            arrival (WRITE) and at completion (READ).
//   inline-user-copy   USER_COPY                             a file in memory (tmpfs), mapped MAP_SHARED:
//                                                            one pread/pwrite between the mapping and the
//                                                            request, on the queue thread (the target does it).
//   kernel-copy        none                                  the driver copies request <-> tag buffer.
//
// The handler never cares which: it asks its queue to read a file into the
// request's data at an offset, or to write the request's data to a file
// (IOQueue.readIntoRequest / writeFromRequest / zeroFill).
import CUring

public enum DataPath: String, Sendable, CaseIterable, Codable {
    case autoZeroCopy = "auto-zero-copy"
    case zeroCopy = "zero-copy"
    case userCopy = "user-copy"
    case inlineUserCopy = "inline-user-copy"
    case kernelCopy = "kernel-copy"

    /// `Request.buffer` is the request's data: the kernel copies it in (WRITE)
    /// and out (READ), so a handler may use plain syscalls on it.
    public var usesTagBuffer: Bool { self == .kernelCopy }

    /// The request's pages are in the ring's buffer table (READ_FIXED / WRITE_FIXED).
    public var isZeroCopy: Bool { self == .autoZeroCopy || self == .zeroCopy }

    /// The driver feature the path needs (0: none).
    public var requiredFeature: UInt64 {
        switch self {
        case .autoZeroCopy: return UBLK_F_AUTO_BUF_REG
        case .zeroCopy: return UBLK_F_SUPPORT_ZERO_COPY
        case .userCopy, .inlineUserCopy: return UBLK_F_USER_COPY
        case .kernelCopy: return 0
        }
    }

    /// What the driver must have, in words (for a refusal).
    var requirement: String {
        switch self {
        case .autoZeroCopy: return "UBLK_F_AUTO_BUF_REG (Linux 6.16 or newer)"
        case .zeroCopy: return "UBLK_F_SUPPORT_ZERO_COPY (Linux 6.15 or newer)"
        case .userCopy, .inlineUserCopy: return "UBLK_F_USER_COPY (Linux 6.5 or newer)"
        case .kernelCopy: return "nothing"
        }
    }

    /// The ADD_DEV flags for this path, given the driver's `features`. Zero copy
    /// also asks for USER_COPY (zero fill of a read past a file's end is a
    /// pwrite on /dev/ublkcN) and auto registration for SUPPORT_ZERO_COPY (its fallback).
    func deviceFlags(features: UInt64) -> UInt64 {
        let userCopy = features & UBLK_F_USER_COPY
        switch self {
        case .autoZeroCopy: return UBLK_F_AUTO_BUF_REG | (features & UBLK_F_SUPPORT_ZERO_COPY) | userCopy
        case .zeroCopy: return UBLK_F_SUPPORT_ZERO_COPY | userCopy
        case .userCopy, .inlineUserCopy: return UBLK_F_USER_COPY
        case .kernelCopy: return 0
        }
    }

    /// The path a device with these granted flags runs (`inline`: the target
    /// copies through a mapping when the device has user copy).
    static func granted(flags: UInt64, inline: Bool) -> DataPath {
        if flags & UBLK_F_AUTO_BUF_REG != 0 { return .autoZeroCopy }
        if flags & UBLK_F_SUPPORT_ZERO_COPY != 0 { return .zeroCopy }
        if flags & UBLK_F_USER_COPY != 0 { return inline ? .inlineUserCopy : .userCopy }
        return .kernelCopy
    }
}
