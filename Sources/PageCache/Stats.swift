// CacheStats: counters for one cache (hits, misses, fetch traffic, errors)
// plus bounded latency samples for percentiles.
//
// Contract: single-threaded, like its owner (one queue thread). Counters only
// grow. Latency samples are a ring of the most recent `capacity` values, so
// memory is bounded and percentiles describe recent behaviour.
import Glibc

public struct LatencySamples: Sendable {
    public let capacity: Int
    private var ring: [UInt64] = []
    private var next = 0
    public private(set) var total: UInt64 = 0

    public init(capacity: Int = 4096) { self.capacity = max(1, capacity) }

    public mutating func record(nanoseconds: UInt64) {
        total += 1
        if ring.count < capacity {
            ring.append(nanoseconds)
        } else {
            ring[next] = nanoseconds
            next = (next + 1) % capacity
        }
    }

    /// The p-th percentile (0...100) of the retained samples, in nanoseconds; nil if none.
    public func percentile(_ p: Double) -> UInt64? {
        guard !ring.isEmpty else { return nil }
        let sorted = ring.sorted()
        let rank = Int((p / 100 * Double(sorted.count - 1)).rounded())
        return sorted[min(max(rank, 0), sorted.count - 1)]
    }

    public var count: Int { ring.count }
}

public final class CacheStats {
    /// Reads served entirely from the cache file.
    public var hits: UInt64 = 0
    /// Reads that waited for at least one fetch.
    public var misses: UInt64 = 0
    /// Body bytes received from the source (all attempts).
    public var bytesFetched: UInt64 = 0
    /// HTTP requests sent (every attempt, probes included).
    public var requests: UInt64 = 0
    /// Attempts that were retried.
    public var retries: UInt64 = 0
    /// Attempts sent to another mirror (the one they went to failed, was
    /// refused or went silent).
    public var failovers: UInt64 = 0
    /// Fetches or probes that finally failed.
    public var errors: UInt64 = 0
    /// Writes, discards and write-zeroes (caching targets with writes).
    public var writes: UInt64 = 0
    /// Writes whose data waited for an intent cycle (their pages' local/dirty
    /// bits written and fdatasynced first: the write-ahead rule).
    public var writesHeldForIntent: UInt64 = 0
    /// Writes of absent pages issued before their intent bits were durable
    /// (write-ahead deferred: CachingRequests.mayDeferIntent).
    public var writesDeferred: UInt64 = 0
    /// Persistence cycles: intent ones (bitmap words + their fdatasync) and
    /// full ones (the cache file's fdatasync, then every bitmap's).
    public var intentCycles: UInt64 = 0
    public var fullCycles: UInt64 = 0
    /// Pages whose write-back or unsettled bits a waiting write set ahead of
    /// any write to them (write-ahead by region: CachingRequests.setAhead).
    public var pagesSetAhead: UInt64 = 0
    /// Read misses served from the source without a place in the cache
    /// (admission by reuse turned them away; counted in `misses` too).
    public var readsThrough: UInt64 = 0
    /// Write-through writes that stood on the backing store alone: the cache
    /// file's copy failed (full, or failing), the cache dropped the pages.
    public var cacheCopiesLost: UInt64 = 0
    /// Verified images (`--verity-root`): data blocks that did not match the
    /// hash tree (at every fetch, every first read of a reused page, every
    /// scrub), and pages checked good (fetched or reused).
    public var verifyFailures: UInt64 = 0
    public var pagesVerified: UInt64 = 0
    /// From a read's miss to its pages being present.
    public var missLatency = LatencySamples()
    /// From a fetch's first request to its completion.
    public var fetchLatency = LatencySamples()

    public init() {}
}

/// CLOCK_MONOTONIC in nanoseconds.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
