// PageBits: one bit per page, in memory, with word-at-a-time range operations.
//
// Contract:
// - `test` is one word load and one mask: the warm-read path.
// - Range operations (`set`, `clear`, `allSet`, `nextSet`, `nextClear`) work a
//   64-page word at a time and never allocate.
// - Every word whose value changes is recorded once in a list of changed
//   words (those a persistent owner must write next: not "dirty", which
//   names a page written since the last sync); `takeChanged()` hands the list
//   over and starts a new one. Bits past `pageCount` are never set.
// - Single-threaded: one owner (a queue's thread) changes an instance; other
//   threads may only load words through `sharedWords` (atomically).
// - The words live in private memory, or in a caller's mapping
//   (`init(pageCount:mapping:release:)`, e.g. a MAP_SHARED file on /run that
//   outlives the process: see LiveBits.swift); the API is the same.

public final class PageBits {
    public let pageCount: UInt64
    public let wordCount: Int
    /// Bit `p % 64` of word `p / 64` is page `p`.
    let words: UnsafeMutablePointer<UInt64>
    /// One bit per word: already in `changedList`.
    private let changedMarks: UnsafeMutablePointer<UInt64>
    private let changedMarkCount: Int
    private var changedList: [Int] = []
    /// Pages set.
    public private(set) var count: UInt64 = 0
    /// Set when the words are a caller's mapping: called once, at deinit.
    private let release: (() -> Void)?

    public init(pageCount: UInt64) {
        self.pageCount = pageCount
        wordCount = Int((pageCount + 63) / 64)
        words = .allocate(capacity: max(wordCount, 1))
        words.initialize(repeating: 0, count: max(wordCount, 1))
        changedMarkCount = max((wordCount + 63) / 64, 1)
        changedMarks = .allocate(capacity: changedMarkCount)
        changedMarks.initialize(repeating: 0, count: changedMarkCount)
        release = nil
    }

    /// Bits whose words are `mapping` (at least `(pageCount + 63) / 64` words,
    /// kept as they are: call `recount()` after filling them). `release` runs
    /// at deinit (unmap). No word is marked changed.
    public init(pageCount: UInt64, mapping: UnsafeMutablePointer<UInt64>, release: @escaping () -> Void) {
        self.pageCount = pageCount
        wordCount = Int((pageCount + 63) / 64)
        words = mapping
        changedMarkCount = max((wordCount + 63) / 64, 1)
        changedMarks = .allocate(capacity: changedMarkCount)
        changedMarks.initialize(repeating: 0, count: changedMarkCount)
        self.release = release
        recount()
    }

    deinit {
        if let release { release() } else { words.deallocate() }
        changedMarks.deallocate()
    }

    /// Drops bits past `pageCount` and counts the set pages again (after the
    /// words were changed behind the API, e.g. by another process).
    public func recount() { load { _ in } }

    @inline(__always)
    public func test(_ page: UInt64) -> Bool {
        words[Int(page >> 6)] & (1 &<< (page & 63)) != 0
    }

    /// Sets `pages` (clamped to the bitmap); returns how many were newly set.
    @discardableResult
    public func set(_ pages: Range<UInt64>) -> UInt64 {
        var added: UInt64 = 0
        forEachWord(pages) { w, mask in
            let old = words[w]
            let new = old | mask
            if new != old {
                words[w] = new
                added &+= UInt64((new ^ old).nonzeroBitCount)
                markChanged(w)
            }
        }
        count &+= added
        return added
    }

    @inline(__always)
    public func set(page: UInt64) { set(page..<page + 1) }

    /// Clears `pages`; returns how many were set before.
    @discardableResult
    public func clear(_ pages: Range<UInt64>) -> UInt64 {
        var removed: UInt64 = 0
        forEachWord(pages) { w, mask in
            let old = words[w]
            let new = old & ~mask
            if new != old {
                words[w] = new
                removed &+= UInt64((new ^ old).nonzeroBitCount)
                markChanged(w)
            }
        }
        count &-= removed
        return removed
    }

    /// Clears every page.
    public func clearAll() {
        clear(0..<pageCount)
    }

    public func allSet(_ pages: Range<UInt64>) -> Bool {
        nextClear(in: pages) == nil
    }

    /// The first page in `pages` that is clear, or nil.
    public func nextClear(in pages: Range<UInt64>) -> UInt64? {
        scan(pages, invert: true)
    }

    /// The first page in `pages` that is set, or nil.
    public func nextSet(in pages: Range<UInt64>) -> UInt64? {
        scan(pages, invert: false)
    }

    /// How many pages of `pages` are set.
    public func count(in pages: Range<UInt64>) -> UInt64 {
        var n: UInt64 = 0
        forEachWord(pages) { w, mask in n &+= UInt64((words[w] & mask).nonzeroBitCount) }
        return n
    }

    /// The words changed since the last call, in the order they first changed.
    public func takeChanged() -> [Int] {
        let list = changedList
        changedList = []
        changedList.reserveCapacity(list.count)
        for w in list { changedMarks[w >> 6] &= ~(1 &<< UInt64(w & 63)) }
        return list
    }

    public var hasChanged: Bool { !changedList.isEmpty }

    /// Whether a word overlapping `pages` is in the changed list (not taken yet).
    public func hasPendingWords(_ pages: Range<UInt64>) -> Bool {
        var found = false
        forEachWord(pages) { w, _ in
            if changedMarks[w >> 6] & (1 &<< UInt64(w & 63)) != 0 { found = true }
        }
        return found
    }

    /// The words themselves, for readers on other threads (a device's other
    /// queues test page bits with atomic loads: UblkTarget's CachingMesh).
    /// Valid as long as this instance lives.
    public var sharedWords: UnsafePointer<UInt64> { UnsafePointer(words) }

    /// A word's value (for persistence).
    @inline(__always)
    public func word(_ index: Int) -> UInt64 { words[index] }

    // MARK: Internals

    /// Replaces all words (loading from disk); recounts; marks nothing changed.
    func load(_ body: (UnsafeMutableRawBufferPointer) -> Void) {
        body(UnsafeMutableRawBufferPointer(start: words, count: wordCount * 8))
        // Bits past pageCount are invalid on disk; drop them.
        if pageCount % 64 != 0, wordCount > 0 {
            words[wordCount - 1] &= (1 &<< (pageCount % 64)) &- 1
        }
        var n: UInt64 = 0
        for w in 0..<wordCount { n &+= UInt64(words[w].nonzeroBitCount) }
        count = n
    }

    @inline(__always)
    func markChanged(_ w: Int) {
        let bit: UInt64 = 1 &<< UInt64(w & 63)
        if changedMarks[w >> 6] & bit == 0 {
            changedMarks[w >> 6] |= bit
            changedList.append(w)
        }
    }

    /// Calls `body(wordIndex, mask)` for each word overlapping `pages` ∩ [0, pageCount).
    @inline(__always)
    private func forEachWord(_ pages: Range<UInt64>, _ body: (Int, UInt64) -> Void) {
        let lo = pages.lowerBound, hi = min(pages.upperBound, pageCount)
        guard lo < hi else { return }
        let first = Int(lo >> 6), last = Int((hi - 1) >> 6)
        for w in first...last {
            var mask = UInt64.max
            if w == first { mask &= UInt64.max &<< (lo & 63) }
            if w == last, hi & 63 != 0 { mask &= (1 &<< (hi & 63)) &- 1 }
            body(w, mask)
        }
    }

    private func scan(_ pages: Range<UInt64>, invert: Bool) -> UInt64? {
        let lo = pages.lowerBound, hi = min(pages.upperBound, pageCount)
        guard lo < hi else { return nil }
        let first = Int(lo >> 6), last = Int((hi - 1) >> 6)
        for w in first...last {
            var v = invert ? ~words[w] : words[w]
            if w == first { v &= UInt64.max &<< (lo & 63) }
            if w == last, hi & 63 != 0 { v &= (1 &<< (hi & 63)) &- 1 }
            if v != 0 { return UInt64(w) << 6 + UInt64(v.trailingZeroBitCount) }
        }
        return nil
    }
}
