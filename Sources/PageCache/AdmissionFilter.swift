// AdmissionFilter: which read misses of the `cache` target earn a place in
// the cache (CachingRequests.swift asks it; the `http` target admits every
// miss, the remote being the slow part).
//
// Contract:
// - A miss is admitted when one of its pages missed before within the
//   window: the pages of about the last `window` misses (two generations of
//   a hashed bitset; a generation is retired once `window` pages went into
//   the newer one). A page read once is not admitted: the read goes from the
//   backing store straight into the request and leaves the cache as it was,
//   so a scan of any length keeps the hot pages (2Q's and smq's rule: promote
//   what proves hot). A false positive of the hash admits a page early,
//   never loses one.
// - Fixed memory, chosen at start: two generations of 2^k bits with
//   2^k ≥ 16 × window (so at most 1 in 16 bits is set per generation, and a
//   random page is taken for seen about 1 time in 8 at worst; sequential
//   pages never collide: Fibonacci hashing spreads consecutive keys), between
//   2^16 and 2^28 bits each: 4 bytes per page of the window, 16 KiB to 64 MiB.
// - Pure state, one owner (the home queue's handler); no I/O.
public struct AdmissionFilter {
    private var current: [UInt64]
    private var previous: [UInt64]
    private let mask: UInt64
    private let shift: UInt64
    private let window: UInt64
    private var inserted: UInt64 = 0

    /// A filter that remembers about `window` missed pages (at least 1).
    public init(window: UInt64) {
        self.window = max(window, 1)
        var bits: UInt64 = 1 << 16
        while bits < 16 * self.window && bits < 1 << 28 { bits <<= 1 }
        mask = bits - 1
        shift = UInt64(64 - bits.trailingZeroBitCount)
        current = Array(repeating: 0, count: Int(bits / 64))
        previous = current
    }

    /// The bits each generation has.
    public var bitsPerGeneration: Int { current.count * 64 }

    @inline(__always)
    private func slot(_ page: UInt64) -> (Int, UInt64) {
        // Fibonacci hashing: the top bits of the product spread neighbouring pages.
        let h = (page &* 0x9E37_79B9_7F4A_7C15) >> shift & mask
        return (Int(h >> 6), 1 &<< (h & 63))
    }

    /// Whether `page` missed within the window.
    public func seen(_ page: UInt64) -> Bool {
        let (w, b) = slot(page)
        return current[w] & b != 0 || previous[w] & b != 0
    }

    /// A miss of `pages`: whether to admit them (one of them was seen
    /// before); records them as seen either way.
    public mutating func admit(_ pages: Range<UInt64>) -> Bool {
        var hot = false
        for p in pages {
            if seen(p) { hot = true }
            let (w, b) = slot(p)
            if current[w] & b == 0 {
                current[w] |= b
                inserted += 1
            }
        }
        if inserted >= window {
            swap(&current, &previous)
            for i in current.indices { current[i] = 0 }
            inserted = 0
        }
        return hot
    }
}
