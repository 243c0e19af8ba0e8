// CachingRequests: the caching handler's request path (CachingHandler.swift's
// header states it): reads, hits and read-through; writes with their intent
// bits, parts and acknowledgement; DISCARD and WRITE_ZEROES; FLUSH; the
// completions of the request I/O it issued.
import CUring
import Glibc
import PageCache

extension CachingHandler {
    var through: Bool { io.through }

    // MARK: Requests

    func handle(_ r: Request, queue: IOQueue) {
        switch r.op {
        case Op.read, Op.write, Op.discard, Op.writeZeroes:
            if r.op == Op.read && profile != nil { recordRead(offset: r.offset, length: r.length) }
            if r.op != Op.read && !context.writable { return completeSlot(r.tag, -EROFS, queue) }
            if draining { return completeSlot(r.tag, -EIO, queue) }
            // Evicted pages are being punched: nothing may touch the cache file's holes meanwhile.
            if eviction.isPunching { return eviction.wait(r) }
            if let c = context.chunks { c.touch(offset: r.offset, length: r.length) }
            // A verified image: pages present from before this run are checked on first use.
            if verifier != nil && !verifyReused(planner.pages(offset: r.offset, length: Int(r.length)), queue: queue) {
                verifier!.requestsWaiting.append(r)
                return
            }
            if r.op == Op.read && context.readThroughFD >= 0 {
                // Nothing is fetched for a read: present runs come from the cache file, the rest from the source.
                if CachingMesh.allSet(presentWords, planner.pages(offset: r.offset, length: Int(r.length))) {
                    context.stats.hits += 1
                } else {
                    context.stats.misses += 1
                }
                return readFromCache(r, queue: queue)
            }
            // A miss not admitted (reused too little, AdmissionFilter) reads through and is not kept.
            if r.op == Op.read && admission != nil {
                let pages = planner.pages(offset: r.offset, length: Int(r.length))
                if !CachingMesh.allSet(presentWords, pages) && !admission!.admit(pages) {
                    context.stats.misses += 1
                    context.stats.readsThrough += 1
                    return readFromCache(r, through: true, queue: queue)
                }
            }
            // A write needs every page it touches present first (see the header),
            // except pages it covers whole: those it claims (reads of them wait).
            if r.op != Op.read,
               let claims = planner.claimForWrite(offset: r.offset, length: Int(r.length), present: bitmap.bits) {
                slots[Int(r.tag)].claimed = claims
                return startWrite(r, queue: queue)
            }
            // Sequential reads are told apart per queue (each CPU's arrive on one).
            let plan = planner.plan(offset: r.offset, length: Int(r.length), context: UInt64(r.tag), present: bitmap.bits,
                                    stream: mesh == nil ? 0 : Int(r.tag) / depth)
            if plan.isHit {
                if r.op == Op.read { context.stats.hits += 1 }
                proceed(r, queue: queue)
            } else {
                if r.op == Op.read { context.stats.misses += 1 }
                slots[Int(r.tag)].request = r
                slots[Int(r.tag)].stage = .waitingFetch
                slots[Int(r.tag)].missStart = monotonicNanos()
            }
            if planner.plannedRunCount > 0 { startRuns(queue) }
        case Op.flush:
            if !context.writable { return completeSlot(r.tag, 0, queue) }
            slots[Int(r.tag)].durableResult = 0
            flushWaiters.append(r.tag)
            startCycle(queue, full: true)
        default:
            completeSlot(r.tag, -EOPNOTSUPP, queue)
        }
    }

    /// Every page of `r` is present: read it, or write it.
    func proceed(_ r: Request, queue: IOQueue) {
        if r.op == Op.read { readFromCache(r, queue: queue) } else { startWrite(r, queue: queue) }
    }

    /// Sets a write's intent bits (local, dirty, write-back); true when some of
    /// them are not durable yet, so its data must wait for an intent cycle.
    /// A write that waits sets its region's bits ahead in the same cycle; a
    /// write of absent pages need not wait (`mayDeferIntent`).
    func setIntent(_ pages: Range<UInt64>) -> Bool {
        writebackCopy.written(pages)
        if let st = settled, st.count > 0 { st.clear(pages) }
        var wait = false
        for b in intentBitmaps {
            b.markPresent(pages)
            if b.hasUnstaged(pages) { wait = true }
            if let c = cycle, c.carries(b, pages) { wait = true }
        }
        if wait && mayDeferIntent(pages) {
            intentDeferred = true
            context.stats.writesDeferred += 1
            return false
        }
        if wait { setAhead(around: pages) }
        return wait
    }

    /// Write-ahead deferred: a write whose pages are absent, in memory and on
    /// the disk (`Bitmap.mayBeSetOnDisk`: not even in a commit in flight), issues its
    /// data at once. Their intent bits then only have to reach the disk
    /// before their present bits: the next full cycle is `ordered` (present
    /// bits in a phase after the others, PersistenceCycle.swift), and until a
    /// present bit lands a crash finds the page absent, reading the source's
    /// bytes as before the write (which no FLUSH covered).
    /// Only without dirty tracking: anyone may read the new bytes (a `sync`
    /// copying them to a replica) before the dirty bit is durable, and a
    /// power loss that then undoes the write would leave the page unlisted
    /// though it differs from the replica. (A write-back copy of such a page
    /// may reach the backing store first: a crash then finds the page absent
    /// and reads the new bytes from there, as a write that survived.)
    func mayDeferIntent(_ pages: Range<UInt64>) -> Bool {
        guard dirty == nil, !presentFrozen else { return false }
        return bitmap.bits.nextSet(in: pages) == nil && !bitmap.mayBeSetOnDisk(pages)
    }

    /// Write-ahead by region (`CacheContext.intentRegionPages`): the write-back
    /// or unsettled bits of the present pages in the regions around `pages`
    /// that lack them are set too, and those pages are recorded as holding the
    /// backing store's data (`WritebackCopy.setAhead`, `settled`): they are not
    /// copied, and the next full cycle clears their bits unless a write comes
    /// first. Such a write finds its bit durable and does not wait. A bit set
    /// ahead is only ever more than needed: after a crash it costs a copy to
    /// the backing store (write-back) or a page read again from it
    /// (write-through), never data.
    func setAhead(around pages: Range<UInt64>) {
        let r = context.intentRegionPages
        guard r > 1, !pages.isEmpty else { return }
        let region = pages.lowerBound / r * r..<min((pages.upperBound + r - 1) / r * r, bitmap.pageCount)
        func ahead(_ b: Bitmap, _ record: (Range<UInt64>) -> Void) {
            var p = region.lowerBound
            while p < region.upperBound, let a = bitmap.bits.nextSet(in: p..<region.upperBound) {
                let e = bitmap.bits.nextClear(in: a..<region.upperBound) ?? region.upperBound
                var q = a
                while q < e, let s = b.bits.nextClear(in: q..<e) {
                    let t = b.bits.nextSet(in: s..<e) ?? e
                    b.markPresent(s..<t)
                    record(s..<t)
                    context.stats.pagesSetAhead += t - s
                    q = t
                }
                p = e
            }
        }
        if let wb = writeback { ahead(wb) { writebackCopy.setAhead($0) } }
        if let u = unsettled, let st = settled { ahead(u) { _ = st.set($0) } }
    }

    func startWrite(_ r: Request, queue: IOQueue) {
        let t = Int(r.tag)
        slots[t].request = r
        context.stats.writes += 1
        if setIntent(planner.pages(offset: r.offset, length: Int(r.length))) {
            context.stats.writesHeldForIntent += 1
            slots[t].stage = .waitingIntent
            heldWrites.append(r.tag)
            return startCycle(queue, full: false)
        }
        issueWrite(r, queue: queue)
    }

    /// The write's intent bits are durable: its data goes to the cache file (and the backing store).
    func issueWrite(_ r: Request, queue: IOQueue) {
        trace?("issue tag \(r.tag) op \(r.op) at \(r.offset)+\(r.length)")
        let t = Int(r.tag)
        slots[t].request = r
        slots[t].stage = .writing
        switch r.op {
        case Op.write:
            if mesh != nil && t >= depth {
                // Another queue's request: its data moves there (the request's
                // buffer is that queue's), which answers `written` when done.
                return send(.write(tag: r.tag % UInt16(depth)), to: r.tag / UInt16(depth))
            }
            if let result = io.startWrite(r, &slots[t].transfer, queue: queue) { writeDone(r, result, queue: queue) }
        default:
            // DISCARD / WRITE_ZEROES: a hole reads as zeros; partial pages are zeroed by the punch.
            let end = min(r.offset + UInt64(r.length), imageSize)
            if r.offset >= end { return writeDone(r, 0, queue: queue) }
            slots[t].transfer = Transfer(parts: through ? 2 : 1)
            queue.fallocate(fd: cacheFD, mode: cu_falloc_punch, offset: r.offset, length: end - r.offset,
                            tag: r.tag, sub: Sub.punch.rawValue)
            if through {
                queue.fallocate(fd: context.backingFD, mode: r.op == Op.writeZeroes && r.noUnmap ? cu_falloc_zero : cu_falloc_punch,
                                offset: r.offset, length: end - r.offset, tag: r.tag, sub: Sub.backingPunch.rawValue)
            }
        }
    }

    /// Every part of a write is done: `result` is 0, the failure, or
    /// `CacheIO.cacheCopyLost` (write-through: the backing store has the data,
    /// the cache file's copy failed: the write stands, the cache drops the pages).
    func writeDone(_ r: Request, _ result: Int32, queue: IOQueue) {
        let t = Int(r.tag)
        let cacheLost = result == CacheIO.cacheCopyLost
        let failed = result < 0 && !cacheLost
        let pages = planner.pages(offset: r.offset, length: Int(r.length))
        if !slots[t].claimed.isEmpty {
            // Pages the write covered whole: present now that their data is in the cache.
            let claims = slots[t].claimed
            slots[t].claimed = []
            if !failed && !cacheLost {
                markPresent(pages)
            } else {
                // Never present, and no data of it counts: the page is still the remote's.
                for b in [local, writeback].compactMap({ $0 }) {
                    for p in pages where !bitmap.test(p) { b.markAbsent(p..<p + 1) }
                }
            }
            for id in claims { serve(planner.complete(run: id, success: !failed && !cacheLost), queue) }
        }
        if cacheLost {
            // The cache file is full or failing, the backing store has the data:
            // the pages are read from it from now on; their unsettled bits stay
            // (a crash drops them from the cache) until a write of them succeeds.
            context.stats.cacheCopiesLost += 1
            if context.stats.cacheCopiesLost == 1 {
                log("ublk-http: a write to the cache file failed; write-through writes stand on the backing store, and the cache drops their pages (stats: cache_copies_lost)")
            }
            for p in pages where bitmap.test(p) { bitmap.markAbsent(p..<p + 1); eviction.clearedBits(p..<p + 1) }
            return written(r, pages, cacheCopy: false, queue: queue)
        }
        if failed {
            // Write-through: one copy may have it and the other not. The cache's
            // goes (the page is read from the backing store again); the
            // unsettled bit stays until a write of the page succeeds.
            if through { for p in pages where bitmap.test(p) { bitmap.markAbsent(p..<p + 1); eviction.clearedBits(p..<p + 1) } }
            // Some of it may have landed: a `sync` under way must not clear these pages.
            syncs.written(pages)
            return finish(r.tag, result, queue)
        }
        written(r, pages, queue: queue)
    }

    /// A write's data is in the cache file. Its intent bits were set before it
    /// was issued; a `dirty --clear` meanwhile may have cleared them, so they
    /// are set again, and the write is acknowledged once they are durable.
    /// `cacheCopy` false: write-through whose cache file part failed (its pages stay unsettled).
    func written(_ r: Request, _ pages: Range<UInt64>, cacheCopy: Bool = true, queue: IOQueue) {
        syncs.written(pages)
        unsyncedWrites.append(pages)
        if cacheCopy { settled?.set(pages) }
        var newly = false
        for b in intentBitmaps where b.markPresent(pages) > 0 { newly = true }
        let t = Int(r.tag)
        if newly {
            slots[t].stage = .waitingAck
            heldWrites.append(r.tag)
            return startCycle(queue, full: false)
        }
        acknowledge(r, queue: queue)
    }

    func acknowledge(_ r: Request, queue: IOQueue) {
        if r.fua {
            slots[Int(r.tag)].request = nil
            slots[Int(r.tag)].stage = .idle
            // A write completes with its byte count, FUA or not: a shorter count
            // makes the kernel send the rest again (6.12 requeues it, forever).
            slots[Int(r.tag)].durableResult = r.op == Op.write ? Int32(r.length) : 0
            flushWaiters.append(r.tag)
            startCycle(queue, full: true)
        } else {
            finish(r.tag, r.op == Op.write ? Int32(r.length) : 0, queue)
        }
    }

    /// `through`: a miss read through (absent runs from the backing store), not admitted.
    func readFromCache(_ r: Request, through: Bool = false, queue: IOQueue) {
        if mesh != nil && Int(r.tag) >= depth {
            // Another queue's read: its pages are present, that queue reads them;
            // they stay pinned here (`requests`: not evicted) until it says `readDone`.
            slots[Int(r.tag)].request = r
            slots[Int(r.tag)].stage = .reading
            let tag = r.tag % UInt16(depth)
            return send(through ? .readThrough(tag: tag) : .read(tag: tag), to: r.tag / UInt16(depth))
        }
        slots[Int(r.tag)].request = r
        slots[Int(r.tag)].stage = .reading
        slots[Int(r.tag)].transfer.through = through
        // Read-through: the pages under the read stay pinned (`requests`) while it runs, as for a hit.
        if let final = io.startRead(r, &slots[Int(r.tag)].transfer, queue: queue) { finish(r.tag, final, queue) }
    }

    @inline(__always)
    func finish(_ tag: UInt16, _ result: Int32, _ queue: IOQueue) {
        slots[Int(tag)].request = nil
        slots[Int(tag)].stage = .idle
        completeSlot(tag, result, queue)
    }

    /// Completes the request in `slot`: on this queue, or (another queue's
    /// request) by that queue, from its own thread.
    @inline(__always)
    func completeSlot(_ slot: UInt16, _ result: Int32, _ queue: IOQueue) {
        slots[Int(slot)].replans = 0
        if mesh != nil && Int(slot) >= depth {
            return send(.complete(tag: slot % UInt16(depth), result: result), to: slot / UInt16(depth))
        }
        queue.complete(tag: slot, result: result)
    }

    func ioCompleted(tag: UInt16, sub raw: UInt8, data: UInt32, result: Int32, queue: IOQueue) {
        guard let sub = Sub(rawValue: raw) else { preconditionFailure("a target I/O with an unknown sub-operation \(raw)") }
        switch sub {
        case .sync, .backingSync, .metaWrite, .metaSync:
            return cycleIO(sub, data: data, result: result, queue: queue)
        case .writebackRead, .writebackWrite:
            return writebackProgress(sub, result, queue: queue)
        case .fetch:
            return fetcher.ioCompleted(data: data, result: result, handler: self, queue: queue)
        case .evictPunch:
            return punched(result, queue: queue)
        case .stats:
            statsFile?.written()
            return
        case .read, .write, .punch, .backingWrite, .backingPunch:
            break  // the request's own I/O, below
        }
        let t = Int(tag)
        guard let r = slots[t].request else { return }
        switch sub {
        case .punch, .backingPunch:
            let part = result == -EOPNOTSUPP && r.op == Op.discard ? 0 : min(result, 0)
            if let final = io.partDone(part, &slots[t].transfer, backing: sub == .backingPunch) { writeDone(r, final, queue: queue) }
        case .write, .backingWrite:
            if let final = io.writeCompleted(r, sub, result, &slots[t].transfer, queue: queue) { writeDone(r, final, queue: queue) }
        case .read:
            if let final = io.readCompleted(r, result, &slots[t].transfer, queue: queue) { finish(tag, final, queue) }
        default:
            preconditionFailure("\(sub) is not a request's I/O")
        }
    }
}
