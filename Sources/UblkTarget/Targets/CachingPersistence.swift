// CachingPersistence: the caching handler's persistence cycles, which carry
// out the ORDER ON DISK stated in CachingHandler.swift's header: intent
// cycles (a write's local/dirty/write-back/unsettled bits before its data)
// and full cycles (the data's fdatasync, then present bits, cleared bits,
// FLUSH completions, punches of evicted pages). One at a time; every write
// and fdatasync goes through the queue's ring.
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
        let full = wantFull || !flushWaiters.isEmpty || !evicting.isEmpty || dirtyCleared
            || (presentNeedsCycle && now &- lastPersist >= persistInterval)
        let clears = full && dirtyCleared
        if full {
            dirtyCleared = false
            lastPersist = now
        }
        var c = Cycle(full: full)
        if full { context.stats.fullCycles += 1 } else { context.stats.intentCycles += 1 }
        if full {
            // Copied pages: the backing's fdatasync below covers them, so their bits may go.
            if let wb = writeback {
                for r in writebackCopied { wb.markAbsent(r) }
                c.writebackCleared = writebackCopied
                writebackCopied = []
            }
            // Written to both: the fdatasyncs below make both copies durable. Not
            // where another write is still in flight (it keeps its bit).
            if let u = unsettled, let st = settled, st.count > 0 {
                let busy = writesInFlight()
                for w in st.takeDirty() where st.word(w) != 0 {
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
            c.punch = evicting
            evicting = []
            c.flushes = flushWaiters
            flushWaiters = []
        }
        for b in (full && !presentFrozen ? [bitmap] : []) + intentBitmaps {
            let staged = b.stage()
            if staged.isEmpty {
                c.commits.append((b, staged, nil))
            } else {
                if clears && b === dirty { c.later.insert(c.writes.count) }
                c.commits.append((b, staged, c.writes.count))
                c.writes.append(b.pendingWrite(staged))
            }
        }
        c.held = heldWrites
        heldWrites = []
        cycle = c
        if full {
            cycle!.outstanding = 1
            queue.fsync(fd: cacheFD, tag: Queue.internalTag, sub: Sub.sync.rawValue)
            // The backing store too: a FLUSH covers written-through data, and a cleared
            // write-back bit may reach the disk only after the data it stood for.
            if context.backingFD >= 0 {
                cycle!.outstanding += 1
                queue.fsync(fd: context.backingFD, tag: Queue.internalTag, sub: Sub.backingSync.rawValue)
            }
        } else {
            writeBitmaps(queue)
        }
    }

    /// Writes the staged commits' words of the cycle's current phase; their
    /// fdatasyncs follow, then the next phase's.
    func writeBitmaps(_ queue: IOQueue) {
        guard var c = cycle else { return }
        c.outstanding = 0
        for (i, w) in c.writes.enumerated() where c.later.contains(i) == (c.phase == 2) {
            // The data is not known to be durable: no bits of this cycle go to the disk.
            if c.dataFailure < 0 { continue }
            // A word of the first phase failed: the held ones wait for a later cycle.
            if c.phase == 2 && !c.failedWrites.isEmpty { c.failedWrites.insert(i); continue }
            for (k, run) in w.runs.enumerated() {
                c.outstanding += 1
                queue.write(fd: w.fd, from: w.buffer + run.bufferOffset, length: UInt32(run.count), offset: run.fileOffset,
                            tag: Queue.internalTag, sub: Sub.metaWrite.rawValue,
                            data: UInt32(i) << CachingHandler.metaRunShift | UInt32(k))
            }
        }
        cycle = c
        if c.outstanding == 0 { endPhase(queue) }
    }

    func cycleIO(_ sub: Sub, data: UInt32, result: Int32, queue: IOQueue) {
        guard cycle != nil else { return }
        cycle!.outstanding -= 1
        switch sub {
        case .sync, .backingSync:
            if result < 0 && cycle!.dataFailure == 0 { cycle!.dataFailure = result }
            if cycle!.outstanding == 0 { writeBitmaps(queue) }
        case .metaWrite:
            let i = Int(data >> CachingHandler.metaRunShift), k = Int(data & (1 << CachingHandler.metaRunShift - 1))
            if result != Int32(cycle!.writes[i].runs[k].count) { cycle!.failedWrites.insert(i) }
            if cycle!.outstanding == 0 {
                // Every word of the phase is written: make each bitmap file durable.
                for (j, w) in cycle!.writes.enumerated()
                    where !cycle!.failedWrites.contains(j) && cycle!.later.contains(j) == (cycle!.phase == 2) {
                    if cycle!.dataFailure < 0 { continue }
                    cycle!.outstanding += 1
                    queue.fsync(fd: w.fd, tag: Queue.internalTag, sub: Sub.metaSync.rawValue, data: UInt32(j))
                }
                if cycle!.outstanding == 0 { endPhase(queue) }
            }
        default:  // .metaSync
            if result < 0 { cycle!.failedWrites.insert(Int(data)) }
            if cycle!.outstanding == 0 { endPhase(queue) }
        }
    }

    /// The phase's words are durable (or failed): the held words follow, or the cycle ends.
    func endPhase(_ queue: IOQueue) {
        if cycle!.phase == 1 && !cycle!.later.isEmpty {
            cycle!.phase = 2
            writeBitmaps(queue)
        } else {
            endCycle(queue)
        }
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
            let failed = i.map { c.failedWrites.contains($0) } ?? false
            if failed { metaFailed = true }
            // A failed data sync: nothing of this cycle may go (a cleared dirty bit
            // would claim a copy of data that may be lost).
            if failed || c.dataFailure < 0 {
                b.abandon(staged)
            } else {
                b.persisted(staged)
            }
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
    func dataSyncFailed(_ c: Cycle, queue: IOQueue) {
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
