// PersistenceCycle: one persistence cycle of a caching device, as a value
// that owns its I/O order (CachingHandler.swift's ORDER ON DISK) and answers
// with the I/O to issue next; the handler submits it on its ring and reports
// each completion back (CachingPersistence.swift). It does no I/O itself.
//
//   full cycle:    fdatasync the cache file (and the backing store)
//                  -> phase 1: write the staged words of the bitmaps of
//                     phase 1, then fdatasync each file
//                  -> phase 2, phase 3 (those that have words): the same
//                  -> over: each commit persisted, or abandoned if its write
//                     or fdatasync failed, or the data's fdatasync failed
//   intent cycle:  phase 1 only (the bitmaps a write sets before its data).
// The handler puts in phase 1 the bits a write sets (local, dirty,
// write-back, unsettled) and, unless it must follow them, the present
// bitmap; in phase 2 the present bitmap when a write this cycle covers
// issued its data before its bits were durable (`ordered`: write-ahead
// deferred, CachingRequests.swift); in phase 3 the dirty bitmap's words
// when they carry cleared bits (a clear may reach the disk only after the
// present bits it relies on: a page whose present bit did not land is
// dropped at open and reads the source again, so it must still be listed
// dirty). A failed data fdatasync writes no words at all; a failed word of a
// phase writes none of the later phases.
import PageCache

/// One I/O of a cycle. `write`/`run` index `PersistenceCycle.writes` and their runs.
enum CycleIO: Equatable {
    case syncData
    case syncBacking
    case writeWords(write: Int, run: Int)
    case syncBitmap(write: Int)
}

struct PersistenceCycle {
    let full: Bool
    var commits: [(bitmap: Bitmap, commit: BitmapCommit, write: Int?)] = []
    /// The non-empty commits, laid out for writing.
    var writes: [Bitmap.PendingWrite] = []
    /// Each write's phase, 1...3 (see the header).
    private(set) var phaseOf: [Int] = []
    private(set) var phase = 1
    private(set) var failedWrites: Set<Int> = []
    private(set) var outstanding = 0
    /// The first failure of the data's fdatasync (cache file or backing store), or 0.
    private(set) var dataFailure: Int32 = 0
    /// Every I/O of the cycle ended: `endCycle` may act on what it carried.
    private(set) var isOver = false

    // What rides on the cycle, acted on when it is over (CachingPersistence.endCycle).
    /// FLUSH (and FUA) tags completed when the cycle ends.
    var flushes: [UInt16] = []
    /// Writes whose intent bits this cycle persists (then issued, or acknowledged).
    var held: [UInt16] = []
    /// Present pages whose data this cycle's fdatasync covers.
    var unsynced: [Range<UInt64>] = []
    /// Evicted pages, punched once the cleared bits are durable.
    var punch: [Range<UInt64>] = []
    /// Write-back bits cleared by this cycle (set again if the backing's fdatasync fails).
    var writebackCleared: [Range<UInt64>] = []
    /// Pages written before this cycle's fdatasync.
    var writtenPages: [Range<UInt64>] = []
    /// Unsettled bits cleared by this cycle (set again if a data sync fails).
    var settledCleared: [Range<UInt64>] = []

    /// Present bits in phase 2, after the deferred intent bits (see the header).
    var ordered = false

    init(full: Bool) { self.full = full }

    /// Stages `bitmap`'s changes into the cycle, written in `phase` (its
    /// words go only after those of the phases before are durable).
    mutating func add(_ bitmap: Bitmap, phase: Int = 1) {
        precondition((1...3).contains(phase))
        let staged = bitmap.stage()
        if staged.isEmpty {
            commits.append((bitmap, staged, nil))
        } else {
            commits.append((bitmap, staged, writes.count))
            phaseOf.append(phase)
            writes.append(bitmap.pendingWrite(staged))
        }
    }

    /// Whether a commit of `bitmap` in this cycle covers `pages`' words.
    func carries(_ bitmap: Bitmap, _ pages: Range<UInt64>) -> Bool {
        commits.contains { $0.bitmap === bitmap && $0.commit.touches(pages) }
    }

    /// The cycle's first I/O (`backing`: a backing store to sync too, full cycles).
    mutating func begin(backing: Bool) -> [CycleIO] {
        guard full else { return startPhase() }
        outstanding = backing ? 2 : 1
        return backing ? [.syncData, .syncBacking] : [.syncData]
    }

    /// `io` ended with `result` (bytes or -errno): the I/O to issue next
    /// (none: wait for the others, or the cycle is over: `isOver`).
    mutating func completed(_ io: CycleIO, result: Int32) -> [CycleIO] {
        outstanding -= 1
        switch io {
        case .syncData, .syncBacking:
            if result < 0 && dataFailure == 0 { dataFailure = result }
            return outstanding == 0 ? startPhase() : []
        case .writeWords(let i, let k):
            if result != Int32(writes[i].runs[k].count) { failedWrites.insert(i) }
            guard outstanding == 0 else { return [] }
            // Every word of the phase is written: make each bitmap file durable.
            let syncs = phaseWrites.filter { !failedWrites.contains($0) }.map { CycleIO.syncBitmap(write: $0) }
            outstanding = syncs.count
            return syncs.isEmpty ? endPhase() : syncs
        case .syncBitmap(let i):
            if result < 0 { failedWrites.insert(i) }
            return outstanding == 0 ? endPhase() : []
        }
    }

    /// Whether commit `write` failed (its bits go out again in a later cycle).
    func failed(_ write: Int?) -> Bool { write.map { failedWrites.contains($0) } ?? false }

    private var phaseWrites: [Int] { writes.indices.filter { phaseOf[$0] == phase } }

    private mutating func startPhase() -> [CycleIO] {
        var ios: [CycleIO] = []
        for i in phaseWrites {
            // The data is not known to be durable: no bits of this cycle go to the disk.
            if dataFailure < 0 { continue }
            // A word of an earlier phase failed: these wait for a later cycle.
            if phase > 1 && !failedWrites.isEmpty { failedWrites.insert(i); continue }
            for k in writes[i].runs.indices { ios.append(.writeWords(write: i, run: k)) }
        }
        outstanding = ios.count
        return ios.isEmpty ? endPhase() : ios
    }

    private mutating func endPhase() -> [CycleIO] {
        if let next = phaseOf.filter({ $0 > phase }).min() {
            phase = next
            return startPhase()
        }
        isOver = true
        return []
    }
}
