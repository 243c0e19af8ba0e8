// The values a bitmap file is described by (Bitmap.swift has the format):
// its kind, its image's identity, the set it is bound to, what an open found,
// and its errors.
import Glibc

public enum BitmapKind: UInt32, Sendable {
    case present = 1
    case dirty = 2
    /// Pages holding data written here (an overlay's own), never replaced by remote bytes.
    case local = 3
    /// Write-through: pages a write may have reached in only one of cache and backing store.
    case unsettled = 4
}

/// The identity binding the files of one cache together (see CacheStore):
/// random bytes made when the set is created, and a generation advanced at
/// every open for use, so an older copy of one file is told apart.
public struct SetBinding: Equatable, Sendable {
    public var setID: [UInt8]
    public var generation: UInt64

    public init(setID: [UInt8], generation: UInt64) {
        precondition(setID.count == 16)
        self.setID = setID
        self.generation = generation
    }

    /// A new set: 16 bytes from /dev/urandom (the clock and pid if it cannot be read).
    public static func random() -> SetBinding {
        var id = [UInt8](repeating: 0, count: 16)
        let fd = Glibc.open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        var got = 0
        if fd >= 0 {
            got = id.withUnsafeMutableBytes { preadFully(fd, $0.baseAddress!, 16, 0) }.map { $0 }.value ?? 0
            close(fd)
        }
        if got < 16 {
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            var mix = UInt64(UInt(bitPattern: ts.tv_nsec)) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(getpid()) ^ UInt64(ts.tv_sec) << 20
            for i in 0..<16 { mix = mix &* 6364136223846793005 &+ 1442695040888963407; id[i] ^= UInt8(truncatingIfNeeded: mix >> 33) }
        }
        return SetBinding(setID: id, generation: 1)
    }

    /// The set identity as 32 hex digits (for messages and file names).
    public var hex: String { setID.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() }
}

extension Result where Failure == SysErrno {
    var value: Success? { if case .success(let v) = self { return v }; return nil }
}

/// What a bitmap describes: checked on open.
public struct BitmapIdentity: Equatable, Sendable {
    public var kind: BitmapKind
    public var pageSize: Int
    public var imageSize: UInt64
    public var url: String
    public var etag: String?
    public var lastModified: String?

    public init(kind: BitmapKind = .present, pageSize: Int, imageSize: UInt64, url: String,
                etag: String? = nil, lastModified: String? = nil) {
        self.kind = kind
        self.pageSize = pageSize
        self.imageSize = imageSize
        self.url = url
        self.etag = etag
        self.lastModified = lastModified
    }

    public var pageCount: UInt64 {
        let ps = UInt64(max(pageSize, 1))
        return imageSize / ps + (imageSize % ps != 0 ? 1 : 0)  // no overflow near 2^64
    }

    /// The most pages a bitmap may describe (16 TiB at 4 KiB pages; its words
    /// take 512 MiB of memory): a header that claims more is refused.
    public static let maxPageCount: UInt64 = 1 << 32

    /// Page size a power of two from 512 to 1 MiB, a non-empty image of at most `maxPageCount` pages.
    public var hasValidGeometry: Bool {
        pageSize >= 512 && pageSize <= 1 << 20 && pageSize & (pageSize - 1) == 0
            && imageSize > 0 && pageCount <= BitmapIdentity.maxPageCount
    }
}

public enum BitmapError: Error, Equatable, CustomStringConvertible, Sendable {
    case io(FileError)
    case locked(path: String)
    case tooShort(path: String, size: UInt64, expected: UInt64)
    case badMagic(path: String)
    case unsupportedVersion(path: String, version: UInt32)
    case corruptHeader(path: String)
    case kindMismatch(path: String, file: UInt32, expected: UInt32)
    case pageSizeMismatch(path: String, file: Int, expected: Int)
    case imageSizeMismatch(path: String, file: UInt64, expected: UInt64)
    case headerTooLong(length: Int)
    case invalidPageSize(Int)

    public var description: String {
        switch self {
        case .io(let e): return e.description
        case .locked(let p): return "\(p): in use by another process"
        case .tooShort(let p, let s, let x): return "\(p): bitmap file is \(s) bytes, expected \(x)"
        case .badMagic(let p): return "\(p): not a ublk-http bitmap"
        case .unsupportedVersion(let p, let v): return "\(p): unsupported bitmap version \(v)"
        case .corruptHeader(let p): return "\(p): bitmap header checksum mismatch"
        case .kindMismatch(let p, let f, let x): return "\(p): bitmap kind \(f), expected \(x)"
        case .pageSizeMismatch(let p, let f, let x): return "\(p): page size \(f), expected \(x)"
        case .imageSizeMismatch(let p, let f, let x): return "\(p): image size \(f), expected \(x)"
        case .headerTooLong(let n): return "URL and validators too long for the bitmap header (\(n) bytes)"
        case .invalidPageSize(let n): return "invalid page size \(n)"
        }
    }
}

public enum BitmapOutcome: Equatable, Sendable {
    /// A new file (all pages absent).
    case fresh
    /// The file matched: its bits are trusted.
    case reused
    /// The file is of this image's geometry, but the source may differ.
    case invalidated(InvalidationReason)
}

public enum InvalidationReason: Equatable, Sendable {
    case urlChanged(old: String, new: String)
    case etagChanged(old: String?, new: String?)
    case lastModifiedChanged(old: String?, new: String?)
}

/// Dirty words snapshotted by `stage()`, to be persisted after the data sync.
public struct BitmapCommit: Sendable {
    let sequence: UInt64
    let indices: [Int]
    let values: [UInt64]
    public var isEmpty: Bool { indices.isEmpty }
    public var wordCount: Int { indices.count }

    /// Whether this commit carries a word that holds one of `pages`.
    public func touches(_ pages: Range<UInt64>) -> Bool {
        guard !pages.isEmpty, !indices.isEmpty else { return false }
        let lo = Int(pages.lowerBound >> 6), hi = Int((pages.upperBound - 1) >> 6)
        // First index >= lo (indices are sorted).
        var a = 0, b = indices.count
        while a < b {
            let m = (a + b) / 2
            if indices[m] < lo { a = m + 1 } else { b = m }
        }
        return a < indices.count && indices[a] <= hi
    }
}

/// A bitmap file's header and how many pages it marks (`Bitmap.inspect`).
public struct BitmapInfo: Equatable, Sendable {
    public var identity: BitmapIdentity
    public var present: UInt64
    /// The set this file belongs to (nil: unbound, from before binding).
    public var binding: SetBinding? = nil
}
