// DirtyExtents: written pages as merged byte extents, for `dirty` and `sync`.
import PageCache

public struct DirtyExtents: Codable, Sendable {
    public struct Extent: Codable, Sendable, Equatable {
        public var offset: UInt64
        public var length: UInt64
        public init(offset: UInt64, length: UInt64) {
            self.offset = offset
            self.length = length
        }
    }
    public var extents: [Extent]
    public var pages: UInt64
    public var pageSize: UInt64
    public var bytes: UInt64
    /// For `sync`: the snapshot to confirm with sync-end.
    public var token: UInt64?

    enum CodingKeys: String, CodingKey {
        case extents, pages, pageSize = "page_size", bytes, token
    }

    /// Runs of set bits, merged.
    public static func runs(_ bits: PageBits) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var p: UInt64 = 0
        let all = 0..<bits.pageCount
        while p < all.upperBound, let s = bits.nextSet(in: p..<all.upperBound) {
            let e = bits.nextClear(in: s..<all.upperBound) ?? all.upperBound
            out.append(s..<e)
            p = e
        }
        return out
    }

    public init(runs: [Range<UInt64>], pageSize: UInt64, imageSize: UInt64, token: UInt64?) {
        extents = runs.map { r in
            let start = r.lowerBound * pageSize
            return Extent(offset: start, length: min(r.upperBound * pageSize, imageSize) - start)
        }
        pages = runs.reduce(0) { $0 + UInt64($1.count) }
        self.pageSize = pageSize
        bytes = extents.reduce(0) { $0 + $1.length }
        self.token = token
    }
}
