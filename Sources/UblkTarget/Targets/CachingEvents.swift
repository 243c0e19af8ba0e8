// CachingEvents: the caching handler's ring events and idle work (polls,
// timers, the other queues' inboxes; persistence and eviction due; statistics),
// and the end of a device: drain, then shutdown.
import CUring
import Glibc
import PageCache

extension CachingHandler {
    // MARK: Events

    func armPoll(_ queue: IOQueue) {
        if !pollArmed, let fd = fetcher.pollFD {
            pollArmed = true
            queue.poll(fd: fd, data: Event.source.rawValue)
        }
    }

    func eventFired(data: UInt32, result: Int32, queue: IOQueue) {
        guard let event = Event(rawValue: data) else { preconditionFailure("an unknown event \(data)") }
        switch event {
        case .source:
            pollArmed = false
            fetcher.perform()
            if !fetcher.isIdle { armPoll(queue) }
        case .timer:
            timerArmed = false
            var v: UInt64 = 0
            _ = read(timerFD, &v, 8)
        case .fillTimer:
            fillTimerFired()
        case .tree:
            treePollFired(queue)
        case .mesh:
            received(mesh!.inboxes[0].take(), queue: queue)
            queue.poll(fd: mesh!.inboxes[0].fd, data: Event.mesh.rawValue)
        }
    }

    func idle(queue: IOQueue) {
        defer { if mesh != nil { flushOutbox() } }
        if let m = mesh, eviction.graceWaiting(m) { advanceGrace(queue) }
        if !fetcher.isIdle { armPoll(queue) }
        let statsDirty = statsFile?.changed(statsSignature) ?? false
        if writeback != nil && !draining { startWriteback(queue) }
        if filling.job != nil { fillStep(queue) }
        if scrubRunning {
            scrubStep(queue)
            // The loop comes back for the next batch, whether or not I/O arrives.
            if scrubRunning && !timerArmed {
                _ = cu_timerfd_arm(timerFD, 1_000_000)
                timerArmed = true
                queue.poll(fd: timerFD, data: Event.timer.rawValue)
            }
        }
        if context.maxCacheBytes > 0 && cycle == nil && !eviction.isPunching && !presentFrozen { evictIfNeeded(queue) }
        let now = monotonicNanos()
        if statsDirty && now &- lastStats >= persistInterval {
            lastStats = now
            statsFile?.publish(context.snapshot(), signature: statsSignature, queue: queue, sub: Sub.stats.rawValue)
        }
        // Present bits (and what rides with them) go out once per interval,
        // in a full cycle; intent bits left over go out at once, but for
        // those of deferred writes: those ride the next full cycle (ordered).
        let presentDirty = presentNeedsCycle
        let fullDue = presentDirty && now &- lastPersist >= persistInterval
        let intentLeft = intentBitmaps.contains(where: { $0.bits.hasChanged })
        if cycle == nil {
            if fullDue {
                startCycle(queue, full: true)
            } else if intentLeft && now >= retryAfter && !intentDeferred {
                startCycle(queue, full: false)
            }
        }
        let statsWait = statsDirty && now &- lastStats < persistInterval
        if (presentDirty && !fullDue) || statsWait || (intentLeft && now < retryAfter), !timerArmed {
            let untilFull = persistInterval &- min(now &- lastPersist, persistInterval)
            let untilStats = persistInterval &- min(now &- lastStats, persistInterval)
            _ = cu_timerfd_arm(timerFD, max(1, min(presentDirty ? untilFull : .max, statsWait ? untilStats : .max)))
            timerArmed = true
            queue.poll(fd: timerFD, data: Event.timer.rawValue)
        }
    }

    /// Something only a full cycle persists is waiting.
    var presentNeedsCycle: Bool {
        bitmap.bits.hasChanged || writebackCopy.hasCopied || !eviction.cleared.isEmpty || (settled?.count ?? 0) > 0
    }

    func drain(queue: IOQueue) {
        // Another queue's requests are the home's to end too (it answers each).
        if !flushWaiters.isEmpty { startCycle(queue, full: true) }
        draining = true
        fillDrain()
        verifyDrain()
        fetcher.cancelAll(handler: self, queue: queue)
        for t in slots.indices where slots[t].stage == .waitingFetch {
            finish(UInt16(t), -EIO, queue)
        }
        for r in eviction.takeWaiting() { completeSlot(r.tag, -EIO, queue) }
    }

    func shutdown(queue: IOQueue) {
        if context.publishStats { context.snapshot().saveAtomically(device: queue.deviceID) }
        // The loop ended with no target I/O outstanding: no cycle is in flight. Blocking is allowed here.
        do {
            if let wb = writeback, writebackCopy.hasCopied, context.backingFD >= 0, fdatasync(context.backingFD) == 0 {
                for r in writebackCopy.takeCopied() { wb.markAbsent(r) }
            }
            if let u = unsettled, let st = settled, st.count > 0, context.backingFD >= 0, fdatasync(context.backingFD) == 0 {
                try context.cache.sync()
                for r in DirtyExtents.runs(st) { u.markAbsent(r) }
            }
            // ORDER ON DISK: the bits writes set (deferred ones before their present
            // bits), then present bits, then the dirty bits (their clears after those).
            try context.cache.sync()
            for b in intentBitmaps where b !== dirty { try b.commit(syncing: context.cache) }
            if !durabilityLost { try bitmap.commit(syncing: context.cache) }
            try dirty?.commit(syncing: context.cache)
        } catch {
            log("ublk-http: cannot persist the bitmaps at shutdown: \(error)")
        }
    }
}
