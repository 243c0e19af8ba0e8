// TreeFetcher: a verified image's hash tree fetched on demand (HTTPVerity.swift
// makes its local copy: a sparse file laid out as the tree's object, holding
// the superblock and the top block from `add` on). The home queue asks for the
// hash blocks a run or a reused page needs (VerityTree.missing) before it uses
// them; their bytes go into the copy at their own offsets, and the caller
// looks again once a transfer ends. Nothing here is trusted: a block is used
// only once it verifies up to the root (a block not fetched yet reads as
// zeros and does not). Range GETs through libcurl multi, on the home's ring
// (its epoll fd polled as `CachingHandler.Event.tree`).
import Glibc
import PageCache

final class TreeFetcher {
    let source: HTTPSource
    /// The local copy, read-write (VerityTree reads it through its own fd).
    let fd: Int32
    let tree: VerityTree
    /// Hash blocks asked for and not arrived yet.
    private(set) var inFlight: Set<UInt64> = []
    /// Why the last transfer failed, if it did.
    private(set) var lastError: String?
    /// A transfer ended (true: it delivered every byte it asked for).
    var arrived: ((Bool) -> Void)?
    var pollArmed = false

    init(source: HTTPSource, path: String, tree: VerityTree) throws(UblkError) {
        let f = open(path, O_RDWR | O_CLOEXEC)
        guard f >= 0 else { throw UblkError("cannot open the verity tree's copy \(path): \(Errno.current)") }
        self.source = source
        self.fd = f
        self.tree = tree
    }
    deinit { close(fd) }

    var isIdle: Bool { source.isIdle }
    var pollFD: Int32 { source.fd }
    func perform() { source.perform() }
    func cancelAll() { source.cancelAll() }

    /// Every block of `blocks` (ascending) arrives, or is being fetched: one
    /// Range GET per contiguous stretch of those not in flight yet.
    func request(_ blocks: [UInt64]) {
        let want = blocks.filter { !inFlight.contains($0) }
        let hbs = tree.params.hashBlockSize
        var i = 0
        while i < want.count {
            var j = i + 1
            while j < want.count && want[j] == want[j - 1] + 1 && j - i < 1024 { j += 1 }
            let stretch = want[i]..<want[j - 1] + 1
            for b in stretch { inFlight.insert(b) }
            let fd = self.fd
            var writeFailed = false
            source.fetch(offset: tree.offset(ofHashBlock: stretch.lowerBound), length: stretch.count * hbs, onData: { offset, bytes in
                if pwriteAll(fd, bytes.baseAddress!, bytes.count, offset) < 0 { writeFailed = true; return false }
                return true
            }, completion: { [weak self] result in
                guard let self else { return }
                for b in stretch { self.inFlight.remove(b) }
                var ok = true
                if case .failure(let e) = result {
                    ok = false
                    self.lastError = writeFailed ? "writing the verity tree's copy failed" : e.description
                    log("ublk-http: fetching hash blocks \(stretch.lowerBound)-\(stretch.upperBound - 1) of the verity tree failed: \(self.lastError!)")
                }
                self.arrived?(ok)
            })
            i = j
        }
    }
}
