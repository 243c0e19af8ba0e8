// HTTPStats: the http target's counters as the server publishes them, once a
// second while they change, to /run/ublk-http/ublkN.stats.json (atomically),
// for `list` and `stats` to read from another process.
import FoundationEssentials
import Glibc
import PageCache

public struct HTTPStats: Codable, Sendable {
    public var hits: UInt64
    public var misses: UInt64
    public var bytesFetched: UInt64
    public var requests: UInt64
    public var retries: UInt64
    public var errors: UInt64
    public var missLatencyP50Ms: Double?
    public var missLatencyP99Ms: Double?
    public var pagesPresent: UInt64
    public var pagesTotal: UInt64
    public var pageSize: Int
    /// Writes and what they cost in persistence (caching targets; nil from older servers).
    public var writes: UInt64?
    public var writesHeldForIntent: UInt64?
    public var writesDeferred: UInt64?
    public var intentCycles: UInt64?
    public var fullCycles: UInt64?
    public var pagesSetAhead: UInt64?
    public var readsThrough: UInt64?
    public var cacheCopiesLost: UInt64?
    /// Verified images only (nil without `--verity-root`).
    public var verifyFailures: UInt64?
    public var pagesVerified: UInt64?
    /// Attempts moved to another mirror (nil from older servers).
    public var failovers: UInt64?

    enum CodingKeys: String, CodingKey {
        case hits, misses, bytesFetched = "bytes_fetched", requests, retries, errors
        case missLatencyP50Ms = "miss_latency_p50_ms", missLatencyP99Ms = "miss_latency_p99_ms"
        case pagesPresent = "pages_present", pagesTotal = "pages_total", pageSize = "page_size"
        case writes, writesHeldForIntent = "writes_held_for_intent", writesDeferred = "writes_deferred", intentCycles = "intent_cycles", fullCycles = "full_cycles"
        case pagesSetAhead = "pages_set_ahead", readsThrough = "reads_through"
        case cacheCopiesLost = "cache_copies_lost"
        case verifyFailures = "verify_failures", pagesVerified = "pages_verified"
        case failovers
    }

    public static func path(_ id: UInt32) -> String { "\(DeviceState.directory)/ublk\(id).stats.json" }

    /// Writes the file whole (a temporary file renamed over it). The server
    /// rewrites it in place through its ring while it runs (CachingHandler);
    /// this is for the last word, at shutdown.
    public func saveAtomically(device id: UInt32) {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        guard let data = try? enc.encode(self) else { return }
        let tmp = HTTPStats.path(id) + ".tmp"
        guard (try? data.write(to: URL(fileURLWithPath: tmp))) != nil else { return }
        rename(tmp, HTTPStats.path(id))
    }

    public static func load(_ id: UInt32) -> HTTPStats? {
        // Rewritten in place by the server: a read that met a write in progress is tried again.
        for _ in 0..<3 {
            guard let data = FileManager.default.contents(atPath: path(id)) else { return nil }
            if let s = try? JSONDecoder().decode(HTTPStats.self, from: data) { return s }
            usleep(2000)
        }
        return nil
    }

    /// Prometheus text exposition format.
    public func prometheus(device id: UInt32) -> String {
        let l = "{device=\"ublkb\(id)\"}"
        return samples().map { s in
            "# HELP ublk_http_\(s.name) \(s.help)\n# TYPE ublk_http_\(s.name) \(s.type)\nublk_http_\(s.name)\(l) \(s.value)\n"
        }.joined()
    }

    /// One counter or gauge: `name` without the ublk_http_ prefix.
    public struct Sample: Sendable {
        public var name: String
        public var type: String
        public var help: String
        public var value: String
    }

    /// The counters as Prometheus samples, in a fixed order (absent ones left out).
    public func samples() -> [Sample] {
        var out: [Sample] = []
        func metric(_ name: String, _ type: String, _ help: String, _ value: String) {
            out.append(Sample(name: name, type: type, help: help, value: value))
        }
        metric("cache_hits_total", "counter", "Reads served entirely from the cache file.", "\(hits)")
        metric("cache_misses_total", "counter", "Reads that waited for a fetch.", "\(misses)")
        metric("fetched_bytes_total", "counter", "Body bytes received from the remote.", "\(bytesFetched)")
        metric("requests_total", "counter", "HTTP requests sent, retries included.", "\(requests)")
        metric("retries_total", "counter", "Requests retried.", "\(retries)")
        metric("errors_total", "counter", "Fetches that finally failed.", "\(errors)")
        if let f = failovers { metric("failovers_total", "counter", "Requests moved to another mirror (theirs failed, went silent, was slow or served another object).", "\(f)") }
        metric("cache_pages_present", "gauge", "Pages held by the cache file.", "\(pagesPresent)")
        metric("cache_pages_total", "gauge", "Pages in the image.", "\(pagesTotal)")
        if let w = writes { metric("writes_total", "counter", "Writes, discards and write-zeroes.", "\(w)") }
        if let w = writesHeldForIntent {
            metric("writes_held_for_intent_total", "counter", "Writes whose data waited for their pages' bits to be persisted first.", "\(w)")
        }
        if let w = writesDeferred {
            metric("writes_deferred_total", "counter", "Writes of absent pages issued before their pages' bits were persisted (the bits then go before the present bits).", "\(w)")
        }
        if let c = intentCycles { metric("intent_cycles_total", "counter", "Persistence cycles for write intent bits (bitmap words, fdatasync).", "\(c)") }
        if let c = fullCycles { metric("full_cycles_total", "counter", "Full persistence cycles (cache file fdatasync, then the bitmaps).", "\(c)") }
        if let c = cacheCopiesLost { metric("cache_copies_lost_total", "counter", "Write-through writes whose cache file copy failed: they stand on the backing store.", "\(c)") }
        if let r = readsThrough { metric("reads_through_total", "counter", "Read misses served from the backing store without being cached (not reused enough to be admitted, or the cache file could not take them).", "\(r)") }
        if let v = verifyFailures {
            metric("verify_failures_total", "counter", "Data blocks that did not match the image's hash tree (fetched, reused or scrubbed); never served.", "\(v)")
        }
        if let v = pagesVerified { metric("pages_verified_total", "counter", "Pages checked good against the image's hash tree.", "\(v)") }
        if let p = pagesSetAhead { metric("pages_set_ahead_total", "counter", "Pages whose write-back or unsettled bits were set ahead of a write, with a neighbour's.", "\(p)") }
        if let p = missLatencyP50Ms { metric("miss_latency_p50_seconds", "gauge", "Median miss latency.", "\(p / 1000)") }
        if let p = missLatencyP99Ms { metric("miss_latency_p99_seconds", "gauge", "99th percentile miss latency.", "\(p / 1000)") }
        return out
    }
}

extension CacheStats {
    /// What a caching target reports (`list`, `stats`): these counters, the
    /// other queues' hits (`mesh`), and what the present bitmap holds.
    func snapshot(mesh: CachingMesh?, present: Bitmap, pageSize: Int, verified: Bool = false) -> HTTPStats {
        var s = HTTPStats(hits: hits &+ (mesh?.peerHits ?? 0), misses: misses, bytesFetched: bytesFetched, requests: requests,
                  retries: retries, errors: errors,
                  missLatencyP50Ms: missLatency.percentile(50).map { Double($0) / 1e6 },
                  missLatencyP99Ms: missLatency.percentile(99).map { Double($0) / 1e6 },
                  pagesPresent: present.count, pagesTotal: present.pageCount, pageSize: pageSize,
                  writes: writes, writesHeldForIntent: writesHeldForIntent, writesDeferred: writesDeferred,
                  intentCycles: intentCycles, fullCycles: fullCycles, pagesSetAhead: pagesSetAhead, readsThrough: readsThrough, cacheCopiesLost: cacheCopiesLost)
        s.failovers = failovers
        if verified {
            s.verifyFailures = verifyFailures
            s.pagesVerified = pagesVerified
        }
        return s
    }
}
