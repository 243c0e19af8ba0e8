// CacheStore: the one place that opens, validates, binds and invalidates the
// files of a cache: the cache file (CacheFile), the present bitmap (BITMAP)
// and, as asked, its companions: the dirty bitmap (BITMAP.dirty: written
// since the last clear), the local bitmap (BITMAP.local: the page holds data
// written here, an http overlay's writes) and the write-back bitmap
// (BITMAP.writeback: the `cache` target's pages the backing lacks). Used by
// the `http` and `cache` targets, `prefetch`, `status`, and `dirty`/`sync`
// on a stopped device.
//
// What a page is (present: a copy of the source; local: data written here)
// is persisted apart from what was reported (dirty). A page's local or
// write-back data is "at stake": it exists nowhere else.
//
// Binding. The files of one cache share a set identity (16 random bytes made
// when the set is created) and a generation (advanced at every open for use),
// recorded in each bitmap's header and in the cache file's trailer (past the
// image). So the bitmap never vouches for a cache file it does not belong to:
//   cache file missing, truncated, without a trailer, of another set  → mismatch
//   cache file's generation older than the bitmap's (restored copy)   → mismatch
//   bitmap's generation older than the cache file's (restored bitmap) → mismatch
//   a companion bitmap of another set or generation (a mixed set)     → mismatch
// (During an open the trailer is advanced first, then the companions, then the
// present bitmap, so a crash midway leaves every file at the present bitmap's
// generation or one ahead: accepted.) Files from before binding (no set
// identity) are trusted once, as before, if the cache file has exactly the
// image's length, and bound there and then.
//
// Policy, one table (stake = local pages + write-back pages):
//   mismatch (above), source changed (URL, ETag, Last-Modified, the backing's
//   identity or content):
//     stake == 0 → start afresh: present bits zeroed on disk first, then the
//                  cache file made anew (holes, so never zeros served as data:
//                  no page is present), then bound; the state says why.
//     stake  > 0 → refuse with one line; nothing is changed.
//   Another image or page size is a typed BitmapError, as before (never reused).
//   A companion the caller does not open but whose pages forbid the use
//   (`.refuse`, e.g. local pages on a read-only http device) → one line.
// The dirty bitmap is reporting only: it never makes a refusal, and is kept
// when the set starts afresh (a listed page is copied again, never missed).
//
// The `cache` target's backing (class "backing replaced while down"): its
// identity (a file's file system id and inode; a block device's WWID, serial,
// dm UUID or loop backing file, as /sys offers) is recorded in the present
// bitmap's ETag field, and up to 32 pages that are present and not pending
// write-back are compared byte for byte with the backing: a clean page must
// be equal. A difference is a changed source (above). After a crash of a
// write-through device a page being written may differ: starting afresh is
// then the safe outcome (there are no write-back pages in that mode).
//
// Live words (LiveBits.swift): with `live`, every opened bitmap's words are
// mapped from a file on /run; a server of this boot that died left there the
// bits it set after their data reached the page cache, and they are adopted.
// Before the store is handed out, everything differing from the disk is
// persisted, in the crash order: cache file fdatasync, then the bitmaps.
import Glibc

public final class CacheStore {
    public let cache: CacheFile
    public let present: Bitmap
    public let dirty: Bitmap?
    public let local: Bitmap?
    public let writeback: Bitmap?
    public let unsettled: Bitmap?
    public let state: CacheState
    /// Lines worth logging (what was adopted, reset or bound).
    public let notes: [String]
    /// Pages whose live bits (from a server of this boot that died) were adopted.
    public let adoptedLive: Bool

    private init(cache: CacheFile, present: Bitmap, dirty: Bitmap?, local: Bitmap?, writeback: Bitmap?, unsettled: Bitmap?,
                 state: CacheState, notes: [String], adoptedLive: Bool) {
        self.unsettled = unsettled
        self.cache = cache
        self.present = present
        self.dirty = dirty
        self.local = local
        self.writeback = writeback
        self.state = state
        self.notes = notes
        self.adoptedLive = adoptedLive
    }

    // MARK: Open

    public static func open(_ spec: CacheStoreSpec) throws(CacheStoreError) -> CacheStore {
        try typed { try openThrowing(spec) }
    }

    /// Runs `body`, its errors as CacheStoreError (the one mapping both entry points use).
    static func typed<T>(_ body: () throws -> T) throws(CacheStoreError) -> T {
        do {
            return try body()
        } catch let e as CacheStoreError {
            throw e
        } catch let e as BitmapError {
            throw .bitmap(e)
        } catch let e as FileError {
            throw .file(e)
        } catch {
            throw .refused("\(error)")
        }
    }

    private static func openThrowing(_ spec: CacheStoreSpec) throws -> CacheStore {
        var notes: [String] = []
        let id = spec.identity
        let size = id.imageSize
        guard id.pageSize >= 512, id.pageSize & (id.pageSize - 1) == 0 else { throw BitmapError.invalidPageSize(id.pageSize) }
        _ = try Bitmap.encodeHeader(id) // too long: an error before any file is touched

        var reasons: [String] = []

        // The present bitmap.
        let opened = try Bitmap.open(path: spec.bitmapPath, identity: id, binding: .random())
        let p = opened.bitmap
        let created = opened.outcome == .fresh
        var adopted = false
        if let live = spec.live, p.binding != nil, try p.attachLive(live, role: "present") {
            adopted = true
        }
        let pBinding = p.binding

        // Companions.
        struct Companion {
            let bitmap: Bitmap
            let outcome: BitmapOutcome
            let belongs: Bool
            let created: Bool
        }
        func companionIdentity(_ kind: BitmapKind) -> BitmapIdentity {
            var c = id
            c.kind = kind
            if !spec.companionValidators { c.etag = nil; c.lastModified = nil }
            return c
        }
        func openCompanion(_ kind: BitmapKind, _ path: String, role: String) throws -> Companion {
            let o = try Bitmap.open(path: path, identity: companionIdentity(kind), binding: pBinding)
            let c = o.bitmap
            var belongs = c.binding?.setID == pBinding?.setID
            if belongs, let cb = c.binding, let pb = pBinding {
                belongs = cb.generation == pb.generation || cb.generation == pb.generation &+ 1
            }
            if belongs, let live = spec.live, c.binding != nil, try c.attachLive(live, role: role) {
                adopted = true
            }
            return Companion(bitmap: c, outcome: o.outcome, belongs: belongs, created: o.outcome == .fresh)
        }
        func pagesIn(_ path: String, role: String) throws -> UInt64 {
            try CacheStore.pages(path: path, role: role, live: spec.live)
        }

        let dirty: Companion? = if case .open = spec.dirty { try openCompanion(.dirty, spec.dirtyPath, role: "dirty") } else { nil }
        var local: Companion?
        var localOutside: UInt64 = 0
        switch spec.local {
        case .open:
            let c = try openCompanion(.local, spec.localPath, role: "local")
            local = c
            // A page dirty and present holds data written here: it is local
            // (a cache made before the local bitmap; or a handler that has not
            // marked it yet). Folded in at every open, never taken out.
            var source: PageBits?
            if let d = dirty, d.belongs { source = d.bitmap.bits }
            else if dirty == nil, exists(spec.dirtyPath), let b = try? CacheStore.bits(path: spec.dirtyPath, role: "dirty", live: spec.live),
                    b.info.binding?.setID == pBinding?.setID, b.bits.pageCount == p.pageCount {
                source = b.bits
            }
            if let src = source, c.belongs || c.created {
                let n = copyIntersection(src, p.bits, into: c.bitmap)
                if n > 0 { notes.append("\(spec.localPath): \(n) written pages of the dirty bitmap are local") }
            }
        case .refuse(let message):
            let n = try localOutsidePages(spec)
            if n > 0 { throw CacheStoreError.refused(message(n)) }
        case .protect:
            localOutside = try localOutsidePages(spec)
        case .none:
            break
        }
        var writeback: Companion?
        var writebackOutside: UInt64 = 0
        switch spec.writeback {
        case .open:
            writeback = try openCompanion(.dirty, spec.writebackPath, role: "writeback")
        case .refuse(let message):
            let n = exists(spec.writebackPath) ? try pagesIn(spec.writebackPath, role: "writeback") : 0
            if n > 0 { throw CacheStoreError.refused(message(n)) }
        case .protect:
            writebackOutside = exists(spec.writebackPath) ? try pagesIn(spec.writebackPath, role: "writeback") : 0
        case .none:
            break
        }
        let unsettled: Companion? = spec.unsettled ? try openCompanion(.unsettled, spec.unsettledPath, role: "unsettled") : nil
        let localPages = (local?.bitmap.count ?? 0) + localOutside
        let writebackPages = (writeback?.bitmap.count ?? 0) + writebackOutside
        let stake = localPages + writebackPages
        func stakeWords() -> String {
            var parts: [String] = []
            if localPages > 0 { parts.append("\(localPages) locally written pages") }
            if writebackPages > 0 { parts.append("\(writebackPages) pages not written back to \(spec.backing?.path ?? "the backing store")") }
            return parts.joined(separator: " and ")
        }

        // A mixed set: companions of another set or generation.
        for (c, name) in [(local, "local"), (writeback, "write-back")] {
            guard let c, !c.belongs else { continue }
            if c.bitmap.count > 0 {
                throw CacheStoreError.refused("the \(name) bitmap \(c.bitmap.path) belongs to another cache than \(spec.bitmapPath) and holds \(c.bitmap.count) pages; refusing (move the files of one cache back together)")
            }
        }

        // The cache file.
        var cache = try CacheFile.openExisting(path: spec.cachePath, size: size)
        var cacheProblem: String?
        if !created {
            if let c = cache {
                if let b = pBinding {
                    switch try c.readTrailer() {
                    case .failure(.missing): cacheProblem = "it has no trailer naming its bitmap (another file)"
                    case .failure(.shorter(let l, let e)): cacheProblem = "it is truncated (\(l) bytes, expected \(e))"
                    case .failure(.otherSize(let s)): cacheProblem = "it belongs to an image of \(s) bytes"
                    case .success(let t):
                        if t.binding.setID != b.setID { cacheProblem = "it belongs to another cache" }
                        else if t.binding.generation < b.generation { cacheProblem = "it is an older copy (generation \(t.binding.generation), the bitmap's is \(b.generation))" }
                        else if t.binding.generation > b.generation &+ 1 { cacheProblem = "its bitmap is an older copy (generation \(b.generation), the cache file's is \(t.binding.generation))" }
                        else if t.pageSize != id.pageSize { cacheProblem = "it was made with page size \(t.pageSize)" }
                    }
                } else {
                    let l = try c.currentLength()
                    if l != size { cacheProblem = "it is \(l) bytes, expected \(size)" }
                }
            } else {
                cacheProblem = "it is missing"
            }
        }
        if let problem = cacheProblem { reasons.append("the cache file \(spec.cachePath) does not match its bitmap: \(problem)") }

        // The source.
        var adoptSourceIdentity = false
        if case .invalidated(let why) = opened.outcome {
            if spec.backing != nil, case .etagChanged(nil, _) = why {
                adoptSourceIdentity = true // a cache from before the backing's identity was recorded
            } else {
                reasons.append(describe(why, source: spec.sourceName, backing: spec.backing != nil))
            }
        }
        if reasons.isEmpty, let backing = spec.backing, let c = cache, p.count > 0,
           let page = try firstDifference(backing: backing, cache: c, present: p.bits, skip: writeback?.bitmap.bits,
                                          pageSize: id.pageSize, imageSize: size) {
            reasons.append("\(spec.sourceName) \(backing.path) differs from the cache at page \(page)")
        }

        if !reasons.isEmpty && stake > 0 {
            throw CacheStoreError.refused("\(reasons.joined(separator: "; ")), but the cache holds \(stakeWords()); refusing to drop them (remove \(spec.cachePath) and \(spec.bitmapPath)* to start afresh)")
        }

        // Nothing is at stake, or nothing changed: act.
        let state: CacheState
        if created || !reasons.isEmpty {
            if !created { try p.startAfresh() } // zero bits on disk before the data goes
            for c in [local, writeback].compactMap({ $0 }) where c.bitmap.count == 0 || !c.belongs {
                if case .invalidated = c.outcome { try c.bitmap.startAfresh() } else if !c.belongs { try c.bitmap.startAfresh() }
            }
            // A fresh cache holds nothing: nothing is unsettled.
            if let u = unsettled, u.bitmap.count > 0 || !u.belongs || u.outcome != .reused { try u.bitmap.startAfresh() }
            cache = nil
            state = created && reasons.isEmpty ? .fresh : .startedAfresh(reasons.joined(separator: "; "))
        } else {
            if adoptSourceIdentity { try p.adoptIdentity() }
            state = .reused
        }
        if let d = dirty {
            if !d.belongs {
                if d.bitmap.count > 0 { notes.append("\(spec.dirtyPath) belonged to another cache: its \(d.bitmap.count) pages are no longer listed") }
                try d.bitmap.startAfresh()
            } else if case .invalidated = d.outcome {
                // Kept: a listed page is copied again, never missed.
                if d.bitmap.count == 0 { try d.bitmap.startAfresh() } else { try d.bitmap.adoptIdentity() }
            }
        }
        for c in [local, writeback].compactMap({ $0 }) where c.belongs {
            if case .invalidated = c.outcome { try c.bitmap.adoptIdentity() } // pages kept only when the source is unchanged
        }
        if let u = unsettled, state == .reused {
            // Of another set: which pages may differ is unknown, so none is trusted.
            if !u.belongs { throw CacheStoreError.refused("the unsettled bitmap \(u.bitmap.path) belongs to another cache than \(spec.bitmapPath); remove \(spec.cachePath) and \(spec.bitmapPath)* to start afresh") }
            if case .invalidated = u.outcome { try u.bitmap.adoptIdentity() }
        }

        // Bind: a new generation (a new set for files from before binding),
        // trailer first, then the companions, the present bitmap last.
        var next = pBinding ?? .random()
        if pBinding != nil { next.generation &+= 1 }
        let file: CacheFile
        if let c = cache {
            try c.writeTrailer(next, pageSize: id.pageSize)
            file = c
        } else {
            file = try CacheFile.create(path: spec.cachePath, size: size, pageSize: id.pageSize, binding: next)
        }
        for c in [dirty, local, writeback, unsettled].compactMap({ $0 }) { try c.bitmap.bind(next) }
        try p.bind(next)
        if pBinding == nil { notes.append("\(spec.bitmapPath): bound to its cache file (set \(next.hex))") }
        if let live = spec.live {
            // Files that had no binding before get their live words now (nothing to adopt).
            try p.attachLive(live, role: "present")
            try dirty?.bitmap.attachLive(live, role: "dirty")
            try local?.bitmap.attachLive(live, role: "local")
            try writeback?.bitmap.attachLive(live, role: "writeback")
            try unsettled?.bitmap.attachLive(live, role: "unsettled")
        }
        if adopted { notes.append("\(spec.bitmapPath): took over the page states a server of this boot left in \(spec.live?.directory ?? "")") }

        // Bring the disk up to date (adopted live words, local pages taken
        // over): the cache file's data first, then the bits in the handler's
        // order (its ORDER ON DISK): what a write sets before present bits (a
        // write may have issued its data before them, without dirty
        // tracking), cleared dirty bits after them.
        let all = [p, dirty?.bitmap, local?.bitmap, writeback?.bitmap, unsettled?.bitmap].compactMap { $0 }
        if all.contains(where: { $0.bits.hasChanged }) {
            try file.sync()
            for b in [local?.bitmap, writeback?.bitmap, unsettled?.bitmap, p, dirty?.bitmap].compactMap({ $0 }) where b.bits.hasChanged {
                try b.persist(b.stage())
            }
        }
        return CacheStore(cache: file, present: p, dirty: dirty?.bitmap, local: local?.bitmap, writeback: writeback?.bitmap,
                          unsettled: unsettled?.bitmap, state: state, notes: notes, adoptedLive: adopted)
    }

    // MARK: Helpers

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    /// A bitmap file's bits, the live ones when they are valid.
    static func bits(path: String, role: String, live: LiveConfig?) throws(BitmapError) -> (info: BitmapInfo, bits: PageBits) {
        let r = try Bitmap.read(path: path)
        if let live, let b = r.info.binding,
           let l = LiveFile.peek(config: live, bitmapPath: path, role: role, kind: r.info.identity.kind, binding: b,
                                 pageCount: r.info.identity.pageCount) {
            return (r.info, l)
        }
        return r
    }

    static func pages(path: String, role: String, live: LiveConfig?) throws(BitmapError) -> UInt64 {
        try bits(path: path, role: role, live: live).bits.count
    }

    /// Local pages of a set whose local bitmap is not opened: those of the
    /// local bitmap and the dirty ones (a cache from before the local bitmap).
    private static func localOutsidePages(_ spec: CacheStoreSpec) throws -> UInt64 {
        let l = exists(spec.localPath) ? try bits(path: spec.localPath, role: "local", live: spec.live).bits : nil
        let d = exists(spec.dirtyPath) ? try bits(path: spec.dirtyPath, role: "dirty", live: spec.live).bits : nil
        guard let l else { return d?.count ?? 0 }
        guard let d, d.pageCount == l.pageCount else { return l.count }
        var n: UInt64 = 0
        for w in 0..<l.wordCount { n += UInt64((l.word(w) | d.word(w)).nonzeroBitCount) }
        return n
    }

    /// Marks in `into` the pages set in both `a` and `b`; returns how many were newly set.
    private static func copyIntersection(_ a: PageBits, _ b: PageBits, into: Bitmap) -> UInt64 {
        var n: UInt64 = 0
        var q: UInt64 = 0
        let end = min(a.pageCount, b.pageCount)
        while q < end, let s = a.nextSet(in: q..<end) {
            let e = a.nextClear(in: s..<end) ?? end
            var r = s
            while r < e, let t = b.nextSet(in: r..<e) {
                let u = b.nextClear(in: t..<e) ?? e
                n += into.markPresent(t..<u)
                r = u
            }
            q = e
        }
        return n
    }

    /// Compares up to `samplePages` present pages (not pending write-back)
    /// of the cache file with the backing; the first that differs, or nil.
    private static func firstDifference(backing: BackingCheck, cache: CacheFile, present: PageBits, skip: PageBits?,
                                        pageSize: Int, imageSize: UInt64) throws -> UInt64? {
        let n = present.pageCount
        let samples = UInt64(max(1, backing.samplePages))
        // Page-aligned buffers: the backing store may be open with O_DIRECT.
        let a = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 4096)
        let b = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 4096)
        defer { a.deallocate(); b.deallocate() }
        var last: UInt64?
        for i in 0..<samples {
            var from = i * n / samples
            if let l = last, from <= l { from = l + 1 }
            var page: UInt64?
            while from < n, let s = present.nextSet(in: from..<n) {
                if let skip, skip.test(s) { from = s + 1; continue }
                page = s
                break
            }
            guard let pg = page else { break }
            last = pg
            let offset = pg * UInt64(pageSize)
            let len = Int(min(UInt64(pageSize), imageSize - offset))
            let ra = preadFully(cache.fd, a, len, offset)
            let rb = preadFully(backing.fd, b, len, offset)
            if case .failure(let e) = ra { throw FileError("pread", path: cache.path, errno: e) }
            if case .failure(let e) = rb { throw FileError("pread", path: backing.path, errno: e) }
            if ra.value != len || rb.value != len || memcmp(a, b, len) != 0 { return pg }
        }
        return nil
    }

    static func describe(_ why: InvalidationReason, source: String, backing: Bool) -> String {
        switch why {
        case .urlChanged(let old, let new) where ImageIdentity.isEarlierForm(old, of: new):
            return "\(source) is named differently now: by its URL minus what signs it, where every query value used to be redacted (\(old) is now \(new))"
        case .urlChanged(let old, let new): return "\(source) changed: \(old) is now \(new)"
        case .etagChanged(let old, let new):
            return backing ? "\(source) was replaced (\(old ?? "none") is now \(new ?? "none"))"
                : "\(source) changed (ETag \(old ?? "none") is now \(new ?? "none"))"
        case .lastModifiedChanged(let old, let new): return "\(source) changed (Last-Modified \(old ?? "none") is now \(new ?? "none"))"
        }
    }
}
