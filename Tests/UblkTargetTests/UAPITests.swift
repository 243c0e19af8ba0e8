import CUring
import XCTest
@testable import UblkTarget

/// The kernel ABI as Swift sees it: sizes and offsets must match the C layout
/// the kernel reads (the C side checks itself with _Static_assert).
final class UAPITests: XCTestCase {
    func testStructSizes() {
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_cmd>.size, 32)
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_dev_info>.size, 64)
        XCTAssertEqual(MemoryLayout<ublksrv_io_desc>.size, 24)
        XCTAssertEqual(MemoryLayout<ublksrv_io_desc>.stride, 24)
        XCTAssertEqual(MemoryLayout<ublksrv_io_cmd>.size, 16)
        XCTAssertEqual(MemoryLayout<ublk_param_basic>.size, 32)
        XCTAssertEqual(MemoryLayout<ublk_params>.size, 120)
        XCTAssertEqual(MemoryLayout<ublk_params>.offset(of: \.dma), 108)
        XCTAssertEqual(MemoryLayout<ublk_param_dma_align>.size, 8)
        XCTAssertEqual(MemoryLayout<cu_cqe>.size, 16)
    }

    func testFieldOffsets() {
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.addr), 8)
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_cmd>.offset(of: \.data), 16)
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.max_io_buf_bytes), 8)
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.ublksrv_pid), 16)
        XCTAssertEqual(MemoryLayout<ublksrv_ctrl_dev_info>.offset(of: \.flags), 24)
        XCTAssertEqual(MemoryLayout<ublksrv_io_desc>.offset(of: \.start_sector), 8)
        XCTAssertEqual(MemoryLayout<ublk_params>.offset(of: \.basic), 8)
        XCTAssertEqual(MemoryLayout<ublk_params>.offset(of: \.discard), 40)
        XCTAssertEqual(MemoryLayout<ublk_params>.offset(of: \.devt), 60)
    }

    /// The opcodes the kernel's _IOR/_IOWR('u', nr, type) produce, computed independently here.
    func testOpcodeEncoding() {
        func ioc(_ dir: UInt32, _ nr: UInt32, _ size: UInt32) -> UInt32 {
            dir << 30 | size << 16 | UInt32(UInt8(ascii: "u")) << 8 | nr
        }
        let r: UInt32 = 2, wr: UInt32 = 3
        XCTAssertEqual(UBLK_U_CMD_GET_FEATURES, ioc(r, 0x13, 32))
        XCTAssertEqual(UBLK_U_CMD_GET_DEV_INFO, ioc(r, 0x02, 32))
        XCTAssertEqual(UBLK_U_CMD_ADD_DEV, ioc(wr, 0x04, 32))
        XCTAssertEqual(UBLK_U_CMD_DEL_DEV, ioc(wr, 0x05, 32))
        XCTAssertEqual(UBLK_U_CMD_START_DEV, ioc(wr, 0x06, 32))
        XCTAssertEqual(UBLK_U_CMD_STOP_DEV, ioc(wr, 0x07, 32))
        XCTAssertEqual(UBLK_U_CMD_SET_PARAMS, ioc(wr, 0x08, 32))
        XCTAssertEqual(UBLK_U_CMD_GET_PARAMS, ioc(r, 0x09, 32))
        XCTAssertEqual(UBLK_U_CMD_START_USER_RECOVERY, ioc(wr, 0x10, 32))
        XCTAssertEqual(UBLK_U_CMD_END_USER_RECOVERY, ioc(wr, 0x11, 32))
        XCTAssertEqual(UBLK_U_IO_FETCH_REQ, ioc(wr, 0x20, 16))
        XCTAssertEqual(UBLK_U_IO_COMMIT_AND_FETCH_REQ, ioc(wr, 0x21, 16))
        XCTAssertEqual(UBLK_U_IO_REGISTER_IO_BUF, ioc(wr, 0x23, 16))
        XCTAssertEqual(UBLK_U_IO_UNREGISTER_IO_BUF, ioc(wr, 0x24, 16))
    }

    /// UBLK_F_AUTO_BUF_REG's sqe->addr: index in bits 0-15, flags in 16-23, the rest zero.
    func testAutoBufRegEncoding() {
        XCTAssertEqual(MemoryLayout<ublk_auto_buf_reg>.size, 8)
        XCTAssertEqual(cu_auto_buf_reg_addr(0x1234, 0), 0x1234)
        XCTAssertEqual(cu_auto_buf_reg_addr(7, UInt8(UBLK_AUTO_BUF_REG_FALLBACK)), 0x1_0007)
        XCTAssertEqual(UBLK_IO_F_NEED_REG_BUF, 1 << 17)
        XCTAssertEqual(UBLK_F_SUPPORT_ZERO_COPY, 1 << 0)
        XCTAssertEqual(UBLK_F_AUTO_BUF_REG, 1 << 11)
    }

    /// The path a driver's features give a target, and what each asks of ADD_DEV.
    func testDataPathChoice() throws {
        let all: [DataPath] = [.autoZeroCopy, .zeroCopy, .userCopy, .kernelCopy]
        let v612 = UBLK_F_CMD_IOCTL_ENCODE | UBLK_F_USER_COPY | UBLK_F_USER_RECOVERY
        let v615 = v612 | UBLK_F_SUPPORT_ZERO_COPY
        let v7 = v615 | UBLK_F_AUTO_BUF_REG
        final class T: Target {
            let name = "loop"
            var params: DeviceParams
            var options: [String: String] { [:] }
            init(_ paths: [DataPath]) { params = DeviceParams(size: 1 << 20); params.dataPaths = paths }
            func makeHandler(for queue: Queue) throws(UblkError) -> QueueHandler { fatalError() }
        }
        XCTAssertEqual(try Server.choosePath(target: T(all), features: v7, forced: nil), .autoZeroCopy)
        XCTAssertEqual(try Server.choosePath(target: T(all), features: v615, forced: nil), .zeroCopy)
        XCTAssertEqual(try Server.choosePath(target: T(all), features: v612, forced: nil), .userCopy)
        XCTAssertEqual(try Server.choosePath(target: T(all), features: UBLK_F_CMD_IOCTL_ENCODE, forced: nil), .kernelCopy)
        let memory: [DataPath] = [.autoZeroCopy, .zeroCopy, .inlineUserCopy, .userCopy, .kernelCopy]
        XCTAssertEqual(try Server.choosePath(target: T(memory), features: v7, forced: nil), .autoZeroCopy)
        XCTAssertEqual(try Server.choosePath(target: T(memory), features: v612, forced: nil), .inlineUserCopy)
        XCTAssertEqual(try Server.choosePath(target: T(all), features: v7, forced: .kernelCopy), .kernelCopy)
        XCTAssertThrowsError(try Server.choosePath(target: T(all), features: v612, forced: .autoZeroCopy)) { e in
            XCTAssert("\(e)".contains("UBLK_F_AUTO_BUF_REG"), "\(e)")
        }
        XCTAssertThrowsError(try Server.choosePath(target: T(all), features: v612, forced: .zeroCopy))
        XCTAssertThrowsError(try Server.choosePath(target: T([.kernelCopy]), features: v7, forced: .zeroCopy))
        // Auto registration asks for its fallback (explicit registration) and user copy (zero fill).
        XCTAssertEqual(DataPath.autoZeroCopy.deviceFlags(features: v7), UBLK_F_AUTO_BUF_REG | UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY)
        XCTAssertEqual(DataPath.zeroCopy.deviceFlags(features: v615), UBLK_F_SUPPORT_ZERO_COPY | UBLK_F_USER_COPY)
        XCTAssertEqual(DataPath.kernelCopy.deviceFlags(features: v7), 0)
        XCTAssertEqual(DataPath.granted(flags: v7, inline: true), .autoZeroCopy)
        XCTAssertEqual(DataPath.granted(flags: UBLK_F_USER_COPY, inline: true), .inlineUserCopy)
        XCTAssertEqual(DataPath.granted(flags: UBLK_F_USER_COPY, inline: false), .userCopy)
    }

    func testFeatureBits() {
        XCTAssertEqual(UBLK_F_CMD_IOCTL_ENCODE, 1 << 6)
        XCTAssertEqual(UBLK_F_USER_RECOVERY, 1 << 3)
        XCTAssertEqual(UBLK_F_USER_COPY, 1 << 7)
        XCTAssertEqual(UBLK_F_BUF_REG_OFF_DAEMON, 1 << 14)
        XCTAssertEqual(cu_io_res_abort, -ENODEV)
    }

    func testUserDataRoundTrip() {
        let cases: [UserData] = [
            UserData(kind: .ublk, tag: 0),
            UserData(kind: .ublk, tag: 4095),
            UserData(kind: .target, tag: 17, sub: 3, data: 0xdead_beef),
            UserData(kind: .event, tag: 0xffff, sub: 0xff, data: .max),
        ]
        for c in cases {
            XCTAssertEqual(UserData(encoded: c.encoded), c)
        }
        XCTAssertEqual(UserData(kind: .ublk, tag: 5).encoded, 5)
        XCTAssertEqual(UserData(kind: .target).encoded >> 60, 1)
        // An unknown kind is not silently routed somewhere.
        XCTAssertNil(UserData(encoded: 0xF << 60))
    }

    func testSizeParsing() {
        XCTAssertEqual(Size.parse("512"), 512)
        XCTAssertEqual(Size.parse("4K"), 4096)
        XCTAssertEqual(Size.parse("4k"), 4096)
        XCTAssertEqual(Size.parse("1M"), 1 << 20)
        XCTAssertEqual(Size.parse("250G"), 250 << 30)
        XCTAssertEqual(Size.parse("2T"), 2 << 40)
        XCTAssertEqual(Size.parse("1.5G"), 3 << 29)
        XCTAssertEqual(Size.parse("64MiB"), 64 << 20)
        XCTAssertEqual(Size.parse("10MB"), 10 << 20)
        XCTAssertNil(Size.parse(""))
        XCTAssertNil(Size.parse("G"))
        XCTAssertNil(Size.parse("12Q"))
        XCTAssertNil(Size.parse("-1G"))
        XCTAssertNil(Size.parse("99999999999P"))
    }
}

final class RequestTests: XCTestCase {
    func testReadProgressContinuesShortReadsAndZeroFillsAtEOF() {
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { buf.deallocate() }
        memset(buf, 0xAB, 8192)
        let r = Request(tag: 1, op: Op.read, flags: 0, offset: 0, length: 8192, buffer: buf)
        var done: UInt32 = 0
        XCTAssertNil(r.readProgress(4096, done: &done))
        XCTAssertEqual(done, 4096)
        XCTAssertNil(r.readProgress(1000, done: &done))
        // End of file: the rest reads as zeros, and the request completes whole.
        XCTAssertEqual(r.readProgress(0, done: &done), 8192)
        XCTAssertEqual(buf.load(fromByteOffset: 5095, as: UInt8.self), 0xAB)
        XCTAssertEqual(buf.load(fromByteOffset: 5096, as: UInt8.self), 0)
        XCTAssertEqual(buf.load(fromByteOffset: 8191, as: UInt8.self), 0)
        var d2: UInt32 = 0
        XCTAssertEqual(r.readProgress(8192, done: &d2), 8192)
        var d3: UInt32 = 0
        XCTAssertEqual(r.readProgress(-5, done: &d3), -5)
    }
}
