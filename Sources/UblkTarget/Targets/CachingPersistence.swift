// CachingPersistence: what the caching handler's persistence cycles carry
// (ORDER ON DISK in CachingHandler.swift's header): intent cycles (a write's
// local/dirty/write-back/unsettled bits before its data) and full cycles (the
// data's fdatasync, then present bits, cleared bits, FLUSH completions,
// punches of evicted pages), and what their end means. The order of a
// cycle's I/O is PersistenceCycle's; here it is submitted on the queue's
// ring, one cycle at a time.
import CUring
import Glibc
import PageCache

extension CachingHandler {
    // MARK: Persistence cycles (ORDER ON DISK in the header)

    /// Starts a cycle unless one runs (the next starts when it ends). `full`:
    /// sync the data, carry the present bitmap and complete FLUSHes; a FLUSH
    /// or an eviction waiting makes any cycle full.
    func startCycle(_ queue: IOQueue, full wantFull: Bool = true) {
        guard cycle == nil else { return }
        let now = monotonicNanos()
        // A full cycle due (the interval passed) is not put off by a stream of intent cycles.
        let full = wantFull || !flushWaiters.isEmpty || !eviction.cleared.isEmpty || dirtyCleared
            || (presentNeedsCycle && now &- lastPersist >= persistInterval)
        let clears = full && dirtyCleared
        if full {
            dirtyCleared = false
            lastPersist = now
        }
        var c = PersistenceCycle(full: full)
        // Deferred intent bits (mayDeferIntent) are staged now: present bits follow them.
        let ordered = full && intentDeferred && !presentFrozen
        intentDeferred = false
        c.ordered = ordered
        if full { context.stats.fullCycles += 1 } else { context.stats.intentCycles += 1 }
        if full {
            // Copied pages: the backing's fdatasync below covers them, so their bits may go.
            if let wb = writeback {
                c.writebackCleared = writebackCopy.takeCopied()
                for r in c.writebackCleared { wb.markAbsent(r) }
            }
            // Written to both: the fdatasyncs below make both copies durable. Not
            // where another write is still in flight (it keeps its bit).
            if let u = unsettled, let st = settled, st.count > 0 {
                let busy = writesInFlight()
                for w in st.takeChanged() where st.word(w) != 0 {
                    let first = UInt64(w) << 6
                    var p = first
                    let end = min(first + 64, st.pageCount)
                    while p < end, let a = st.nextSet(in: p..<end) {
                        let b = st.nextClear(in: a..<end) ?? end
                        for r in subtract(busy, from: a..<b) {
                            u.markAbsent(r)
                            st.clear(r)
                            c.settledCleared.append(r)
                        }
                        p = b
                    }
                    // What stays (a write in flight there) is looked at again next time.
                    if st.word(w) != 0 { let keep = st.nextSet(in: first..<end)!; st.clear(keep..<keep + 1); st.set(keep..<keep + 1) }
                }
            }
            c.unsynced = unsyncedPresent
            unsyncedPresent = []
            c.writtenPages = unsyncedWrites
            unsyncedWrites = []
            c.punch = eviction.takeCleared()
            c.flushes = flushWaiters
            flushWaiters = []
        }
        if full && !presentFrozen { c.add(bitmap, phase: ordered ? 2 : 1) }
        for b in intentBitmaps {
            // Cleared dirty bits go after the present bits they rely on are durable.
            c.add(b, phase: clears && b === dirty ? 3 : 1)
        }
        c.held = heldWrites
        heldWrites = []
        cycle = c
        // The backing store too: a FLUSH covers written-through data, and a cleared
        // write-back bit may reach the disk only after the data it stood for.
        submit(cycle!.begin(backing: context.backingFD >= 0), queue)
    }

    /// Issues the cycle's next I/O on the ring; ends the cycle once it is over.
    func submit(_ ios: [CycleIO], _ queue: IOQueue) {
        for io in ios {
            switch io {
            case .syncData:
                queue.fsync(fd: cacheFD, tag: Queue.internalTag, sub: Sub.sync.rawValue)
            case .syncBacking:
                queue.fsync(fd: context.backingFD, tag: Queue.internalTag, sub: Sub.backingSync.rawValue)
            case .writeWords(let i, let k):
                let w = cycle!.writes[i], run = w.runs[k]
                queue.write(fd: w.fd, from: w.buffer + run.bufferOffset, length: UInt32(run.count), offset: run.fileOffset,
                            tag: Queue.internalTag, sub: Sub.metaWrite.rawValue,
                            data: UInt32(i) << CachingHandler.metaRunShift | UInt32(k))
            case .syncBitmap(let i):
                queue.fsync(fd: cycle!.writes[i].fd, tag: Queue.internalTag, sub: Sub.metaSync.rawValue, data: UInt32(i))
            }
        }
        if cycle!.isOver { endCycle(queue) }
    }

    /// A cycle's I/O completed (decoded from its sub and data).
    func cycleIO(_ sub: Sub, data: UInt32, result: Int32, queue: IOQueue) {
        guard cycle != nil else { return }
        let io: CycleIO
        switch sub {
        case .sync: io = .syncData
        case .backingSync: io = .syncBacking
        case .metaWrite:
            io = .writeWords(write: Int(data >> CachingHandler.metaRunShift), run: Int(data & (1 << CachingHandler.metaRunShift - 1)))
        default: io = .syncBitmap(write: Int(data))
        }
        submit(cycle!.completed(io, result: result), queue)
    }

    /// Clears dirty bits (`dirty --clear`, `sync`); a full cycle persists the clear.
    func clearDirty(_ ranges: [Range<UInt64>], queue: IOQueue) {
        // After a failed data sync nothing written is known to be on the disk
        // (present bits no longer go out): every listed page stays listed.
        guard let d = dirty, !presentFrozen else { return }
        // Pages whose data a failed fdatasync may have lost stay listed.
        for r in ranges { for keep in subtract(lostPages, from: r) { d.markAbsent(keep) } }
        dirtyCleared = true
        startCycle(queue, full: true)
    }

    func endCycle(_ queue: IOQueue) {
        guard let c = cycle else { return }
        cycle = nil
        var metaFailed = false
        for (b, staged, i) in c.commits {
            let failed = c.failed(i)
            if failed { metaFailed = true }
            // A failed data sync: nothing of this cycle may go (a cleared dirty bit
            // would claim a copy of data that may be lost).
            if failed || c.dataFailure < 0 {
                b.abandon(staged)
            } else {
                b.persisted(staged)
            }
        }
        if metaFailed || c.dataFailure < 0 {
            // The deferred writes' bits are not known to be durable: the next full cycle is ordered too.
            intentDeferred = true
        }
        if metaFailed {
            log("ublk-http: cannot persist the bitmaps (write or fdatasync failed); will retry")
            retryAfter = monotonicNanos() &+ min(persistInterval, 1_000_000_000)
        }
        if c.dataFailure < 0 {
            dataSyncFailed(c, queue: queue)
        } else {
            // Written again and synced: no longer lost.
            if !lostPages.isEmpty { for r in c.writtenPages { lostPages = lostPages.flatMap { $0.subtracting(r) } } }
            if !c.punch.isEmpty { punchAfterGrace(c.punch, queue: queue) }
        }
        let flushStatus: Int32 = (c.dataFailure < 0 || metaFailed || durabilityLost) ? -EIO : 0
        for tag in c.flushes { completeSlot(tag, flushStatus < 0 ? flushStatus : slots[Int(tag)].durableResult, queue) }
        if c.dataFailure < 0 {
            // Their intent bits did not go out: they wait for the next cycle.
            heldWrites = c.held + heldWrites
        }
        for tag in c.held where c.dataFailure >= 0 {
            guard let r = slots[Int(tag)].request else { continue }
            // Bits not durable: the write must not go ahead (or be acknowledged).
            if metaFailed { finish(tag, -EIO, queue); continue }
            if slots[Int(tag)].stage == .waitingIntent { issueWrite(r, queue: queue) } else { acknowledge(r, queue: queue) }
        }
        if !flushWaiters.isEmpty || !heldWrites.isEmpty { startCycle(queue, full: !flushWaiters.isEmpty) }
    }

    /// The cache file's (or backing store's) fdatasync failed: the pages
    /// written since the last good one may never reach the disk, and the next
    /// fdatasync will not say so. Fetched pages among them are dropped
    /// (fetched again); written ones cannot be: they are lost until written
    /// again, stay dirty (a `sync` meanwhile copies them again), and FLUSH fails.
    func dataSyncFailed(_ c: PersistenceCycle, queue: IOQueue) {
        log("ublk-http: fdatasync failed: \(Errno(returned: c.dataFailure)); pages written since the last good one may be lost")
        var lost = c.writtenPages + unsyncedWrites
        for (t, s) in slots.map(\.stage).enumerated() where s == .writing || s == .waitingAck {
            if let r = slots[t].request { lost.append(planner.pages(offset: r.offset, length: Int(r.length))) }
        }
        unsyncedWrites = []
        for r in lost { dirty?.markPresent(r) }
        lostPages += lost
        if let wb = writeback { for r in c.writebackCleared { wb.markPresent(r) } }
        if let u = unsettled { for r in c.settledCleared { u.markPresent(r) } }
        // Evicted pages stay in the file, unpunched: their cleared bits will not reach the disk now.
        if !presentFrozen {
            presentFrozen = true
            log("ublk-http: the cache file's present bits are no longer persisted, and FLUSH fails, until the device is restarted")
        }
        // Fetched pages whose copy may be gone from the disk are fetched again
        // (unless a request in flight holds them: those stay, and a power loss
        // finds them absent, since present bits no longer go out).
        let pinned = pinnedRanges()
        for range in c.unsynced + unsyncedPresent {
            for p in range where bitmap.test(p) {
                if (local?.test(p) ?? false) || (writeback?.test(p) ?? false) { continue }
                if planner.run(covering: p) != nil || pinned.contains(where: { $0.contains(p) }) { continue }
                trace?("unsynced, absent again: \(p)")
                bitmap.markAbsent(p..<p + 1)
            }
        }
        unsyncedPresent = []
    }

    /// `range` without any of `ranges`.
    func subtract(_ ranges: [Range<UInt64>], from range: Range<UInt64>) -> [Range<UInt64>] {
        var out = [range]
        for r in ranges { out = out.flatMap { $0.subtracting(r) } }
        return out
    }

    /// What the published statistics depend on, folded (StatsFile rewrites its record when it changes).
    var statsSignature: UInt64 {
        let s = context.stats
        return s.hits &+ (mesh?.peerHits ?? 0) &+ s.misses &* 3 &+ s.requests &* 7 &+ s.errors &* 11 &+ bitmap.count &* 13 &+ s.writes &* 17
    }
}
