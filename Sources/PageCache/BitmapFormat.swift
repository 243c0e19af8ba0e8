// Bitmap, file format: the header's layout, encoded and checked, creating a
// file, and reading one without opening it for use (status commands).
//
// File format (little-endian; the header is one 4096-byte block, so the bits
// start block-aligned):
//
//   offset size  field
//        0    8  magic "UBLKBMP\0"
//        8    4  version (1)
//       12    4  kind: 1 = present (page fetched), 2 = dirty (page written
//                since the last clear; also the `cache` target's write-back
//                bitmap), 3 = local (the page holds data written here).
//       16    4  page size in bytes
//       20    4  header size = offset of the bits (4096)
//       24    8  image size in bytes
//       32    8  page count = ceil(image size / page size)
//       40    8  checksum: FNV-1a 64 of the 4096 header bytes with this field 0
//       48    2  URL length        (UTF-8 bytes)
//       50    2  ETag length       (0: none)
//       52    2  Last-Modified length (0: none)
//       54    2  flags: bit 0 = bound (the set identity below is valid)
//       56    8  generation of the set (bound only; see CacheStore)
//       64    …  URL, ETag, Last-Modified bytes, back to back (≤ 4016 in all)
//     4080   16  set identity (bound only): random bytes shared by the files
//                of one cache (bitmaps and cache file), see CacheStore
//     4096    …  bits: ceil(page count / 64) 64-bit words; bit p%64 of word
//                p/64 is page p. Bits past the page count are ignored.
import Glibc

extension Bitmap {
    /// Reads a bitmap file without opening it for use (no lock, no
    /// validation against an expected identity): for status commands.
    public static func inspect(path: String) throws(BitmapError) -> BitmapInfo {
        try read(path: path).info
    }

    /// `inspect`, with the bits.
    static func read(path: String) throws(BitmapError) -> (info: BitmapInfo, bits: PageBits) {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw .io(FileError("open", path: path, errno: errno)) }
        defer { close(fd) }
        var h = [UInt8](repeating: 0, count: headerSize)
        switch h.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, headerSize, 0) }) {
        case .success(let n) where n >= 8 && Array(h[0..<8]) != magic: throw .badMagic(path: path)
        case .success(let n) where n < headerSize: throw .tooShort(path: path, size: UInt64(n), expected: UInt64(headerSize))
        case .success: break
        case .failure(let e): throw .io(FileError("pread", path: path, errno: e))
        }
        let kind = BitmapKind(rawValue: UInt32(h[12]) | UInt32(h[13]) << 8 | UInt32(h[14]) << 16 | UInt32(h[15]) << 24) ?? .present
        let pageSize = Int(UInt32(h[16]) | UInt32(h[17]) << 8 | UInt32(h[18]) << 16 | UInt32(h[19]) << 24)
        var imageSize: UInt64 = 0
        for i in (24..<32).reversed() { imageSize = imageSize << 8 | UInt64(h[i]) }
        let probe = BitmapIdentity(kind: kind, pageSize: pageSize, imageSize: imageSize, url: "")
        // A crafted header must not make us divide by zero, overflow or allocate without bound.
        guard probe.hasValidGeometry else { throw .corruptHeader(path: path) }
        let identity = try readHeader(fd: fd, path: path, expected: probe)
        let bits = PageBits(pageCount: identity.pageCount)
        try readWords(fd: fd, path: path, into: bits)
        return (BitmapInfo(identity: identity, present: bits.count, binding: try readBinding(fd: fd, path: path)), bits)
    }

    /// Reads the words after the header into `bits` (which counts them); a
    /// short file is an I/O error.
    static func readWords(fd: Int32, path: String, into bits: PageBits) throws(BitmapError) {
        var failure: FileError?
        let count = bits.wordCount * 8
        bits.load { buf in
            guard count > 0 else { return }
            switch preadFully(fd, buf.baseAddress!, count, UInt64(headerSize)) {
            case .success(let n) where n == count: break
            case .success: failure = FileError("pread", path: path, errno: EIO)
            case .failure(let e): failure = FileError("pread", path: path, errno: e)
            }
            let words = buf.bindMemory(to: UInt64.self)
            for i in words.indices { words[i] = UInt64(littleEndian: words[i]) }
        }
        if let failure { throw .io(failure) }
    }

    static func create(path: String, identity: BitmapIdentity, binding: SetBinding?) throws(BitmapError) {
        let tmp = path + ".tmp.\(getpid())"
        let fd = Glibc.open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd < 0 { throw .io(FileError("open", path: tmp, errno: errno)) }
        defer { close(fd) }
        let header = try encodeHeader(identity, binding: binding)
        let r = header.withUnsafeBytes { pwriteFully(fd, $0.baseAddress!, $0.count, 0) }
        if case .failure(let e) = r { unlink(tmp); throw .io(FileError("pwrite", path: tmp, errno: e)) }
        if ftruncate(fd, off_t(fileSize(pageCount: identity.pageCount))) != 0 {
            let e = errno; unlink(tmp); throw .io(FileError("ftruncate", path: tmp, errno: e))
        }
        if fsync(fd) != 0 { let e = errno; unlink(tmp); throw .io(FileError("fsync", path: tmp, errno: e)) }
        if rename(tmp, path) != 0 { let e = errno; unlink(tmp); throw .io(FileError("rename", path: path, errno: e)) }
        syncDirectory(of: path)
    }

    static func encodeHeader(_ id: BitmapIdentity, binding: SetBinding? = nil) throws(BitmapError) -> [UInt8] {
        let url = Array(id.url.utf8), etag = Array((id.etag ?? "").utf8), lm = Array((id.lastModified ?? "").utf8)
        let strings = url.count + etag.count + lm.count
        guard strings <= headerSize - 80, url.count <= 0xFFFF, etag.count <= 0xFFFF, lm.count <= 0xFFFF else {
            throw .headerTooLong(length: strings)
        }
        var h = [UInt8](repeating: 0, count: headerSize)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { h[at + i] = b } }
        }
        h.replaceSubrange(0..<8, with: magic)
        put(version, 8)
        put(id.kind.rawValue, 12)
        put(UInt32(id.pageSize), 16)
        put(UInt32(headerSize), 20)
        put(id.imageSize, 24)
        put(id.pageCount, 32)
        put(UInt16(url.count), 48)
        put(UInt16(etag.count), 50)
        put(UInt16(lm.count), 52)
        h.replaceSubrange(64..<64 + url.count, with: url)
        h.replaceSubrange(64 + url.count..<64 + url.count + etag.count, with: etag)
        h.replaceSubrange(64 + url.count + etag.count..<64 + strings, with: lm)
        if let b = binding {
            put(UInt16(1), 54)
            put(b.generation, 56)
            h.replaceSubrange(headerSize - 16..<headerSize, with: b.setID)
        }
        put(fnv1a(h), 40)
        return h
    }

    static func fnv1a(_ bytes: [UInt8]) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for (i, b) in bytes.enumerated() {
            let v: UInt8 = (40..<48).contains(i) ? 0 : b
            hash = (hash ^ UInt64(v)) &* 0x0000_0100_0000_01b3
        }
        return hash
    }

    static func readHeader(fd: Int32, path: String, expected: BitmapIdentity) throws(BitmapError) -> BitmapIdentity {
        var st = stat()
        if fstat(fd, &st) != 0 { throw .io(FileError("fstat", path: path, errno: errno)) }
        var h = [UInt8](repeating: 0, count: headerSize)
        let r = h.withUnsafeMutableBytes { preadFully(fd, $0.baseAddress!, headerSize, 0) }
        let got: Int
        switch r {
        case .success(let n): got = n
        case .failure(let e): throw .io(FileError("pread", path: path, errno: e))
        }
        if got >= 8, Array(h[0..<8]) != magic { throw .badMagic(path: path) }
        if got < headerSize { throw .tooShort(path: path, size: UInt64(st.st_size), expected: UInt64(headerSize)) }
        func get<T: FixedWidthInteger>(_ at: Int, _: T.Type) -> T {
            var v: T = 0
            withUnsafeMutableBytes(of: &v) { for i in 0..<$0.count { $0[i] = h[at + i] } }
            return T(littleEndian: v)
        }
        let version = get(8, UInt32.self)
        if version != Bitmap.version { throw .unsupportedVersion(path: path, version: version) }
        if get(40, UInt64.self) != fnv1a(h) { throw .corruptHeader(path: path) }
        let kind = get(12, UInt32.self)
        if kind != expected.kind.rawValue { throw .kindMismatch(path: path, file: kind, expected: expected.kind.rawValue) }
        let pageSize = Int(get(16, UInt32.self))
        if pageSize != expected.pageSize { throw .pageSizeMismatch(path: path, file: pageSize, expected: expected.pageSize) }
        let imageSize = get(24, UInt64.self)
        if imageSize != expected.imageSize { throw .imageSizeMismatch(path: path, file: imageSize, expected: expected.imageSize) }
        if get(20, UInt32.self) != UInt32(headerSize) || get(32, UInt64.self) != expected.pageCount {
            throw .corruptHeader(path: path)
        }
        let needed = fileSize(pageCount: expected.pageCount)
        if UInt64(st.st_size) < needed { throw .tooShort(path: path, size: UInt64(st.st_size), expected: needed) }
        let ul = Int(get(48, UInt16.self)), el = Int(get(50, UInt16.self)), ll = Int(get(52, UInt16.self))
        guard 64 + ul + el + ll <= headerSize else { throw .corruptHeader(path: path) }
        let url = String(decoding: h[64..<64 + ul], as: UTF8.self)
        let etag = String(decoding: h[64 + ul..<64 + ul + el], as: UTF8.self)
        let lm = String(decoding: h[64 + ul + el..<64 + ul + el + ll], as: UTF8.self)
        return BitmapIdentity(kind: expected.kind, pageSize: pageSize, imageSize: imageSize, url: url,
                              etag: etag.isEmpty ? nil : etag, lastModified: lm.isEmpty ? nil : lm)
    }

    static func readBinding(fd: Int32, path: String) throws(BitmapError) -> SetBinding? {
        var h = [UInt8](repeating: 0, count: headerSize)
        switch h.withUnsafeMutableBytes({ preadFully(fd, $0.baseAddress!, headerSize, 0) }) {
        case .success(let n) where n == headerSize: break
        case .success: throw .corruptHeader(path: path)
        case .failure(let e): throw .io(FileError("pread", path: path, errno: e))
        }
        guard h[54] & 1 != 0 else { return nil }
        var gen: UInt64 = 0
        for i in (56..<64).reversed() { gen = gen << 8 | UInt64(h[i]) }
        return SetBinding(setID: Array(h[headerSize - 16..<headerSize]), generation: gen)
    }
}
