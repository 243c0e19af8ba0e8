// CachingControl: the control operations of the caching targets (`dirty`,
// `sync`, `flush`), answered on queue 0's ring through the control socket.
import Glibc
import PageCache

/// `sync` snapshots handed out and not yet confirmed: token → page runs.
struct SyncTracker {
    var snapshots: [UInt64: [Range<UInt64>]] = [:]
    var nextToken: UInt64 = 1

    /// A write made `pages` dirty (called by the handler for every completed write).
    mutating func written(_ pages: Range<UInt64>) {}
}

extension CachingHandler {
    struct WritebackStatus: Encodable {
        var writebackPages: UInt64
        var inFlight: Bool
        var unpersisted: Bool
        enum CodingKeys: String, CodingKey {
            case writebackPages = "writeback_pages", inFlight = "in_flight", unpersisted
        }
    }

    // MARK: Control (dirty tracking)

    func control(_ request: ControlRequest, queue: IOQueue) -> String {
        if request.op == "flush" {
            guard let wb = context.writeback else { return controlJSON(WritebackStatus(writebackPages: 0, inFlight: false, unpersisted: false)) }
            startWriteback(queue)
            if wb.bits.hasDirty { startCycle(queue) }
            return controlJSON(WritebackStatus(writebackPages: wb.count, inFlight: writebackRun != nil || cycle != nil,
                                               unpersisted: wb.bits.hasDirty))
        }
        guard let dirty else { return controlError("ublk\(queue.deviceID) does not track written pages") }
        switch request.op {
        case "dirty":
            let runs = DirtyExtents.runs(dirty.bits)
            let reply = DirtyExtents(runs: runs, pageSize: pageSize, imageSize: imageSize, token: nil)
            if request.clear == true {
                clearDirty([0..<dirty.pageCount], queue: queue)
            }
            return controlJSON(reply)
        case "sync-begin":
            // Hand out the dirty pages and clear them: a page written from now on is dirty again.
            let runs = DirtyExtents.runs(dirty.bits)
            clearDirty(runs, queue: queue)
            let token = syncs.nextToken
            syncs.nextToken += 1
            syncs.snapshots[token] = runs
            return controlJSON(DirtyExtents(runs: runs, pageSize: pageSize, imageSize: imageSize, token: token))
        case "sync-end":
            guard let token = request.token, let runs = syncs.snapshots.removeValue(forKey: token) else {
                return controlError("unknown sync token")
            }
            // Copied: the cleared bits may reach the disk. Failed: they are dirty again.
            if request.ok != true { for r in runs { dirty.markPresent(r) } }
            startCycle(queue)
            return controlJSON(["ok": true])
        default:
            return controlError("unknown command \(request.op)")
        }
    }

}
