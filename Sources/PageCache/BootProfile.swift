// BootProfile: the pages a device read first after attach, in the order it
// read them, so that a later cold start can fetch them ahead (`add
// --prefetch-profile`, `prefetch --profile`): what Nydus and stargz call a
// prefetch list.
//
// THE FILE (version 1): one JSON object, UTF-8, at most `maxFileBytes`:
//   {"format":"ublk-http-profile","version":1,
//    "url":"https://host/img.ext4?v=REDACTED#sha256=…",   the image's identity as the
//                                     cache records it (`ImageIdentity`: no secret in clear)
//    "image_size":1073741824,"etag":"\"65a-...\"","last_modified":"Mon, ...",  validators;
//                                     absent (or null) when the server sent none
//    "page_size":4096,                the unit of `runs`
//    "pages":1234,                    the sum of the runs' lengths
//    "runs":[[8,1],[0,2],[520,16],…]} [first page, page count], in the order first read
// Runs are disjoint: a page is in the profile once, where it was first read.
// It holds offsets only, no secrets, so it may be world-readable.
//
// HOSTILE NUMBERS. A profile is input: `decode` refuses, in one line, any
// number that would make later arithmetic overflow (Swift traps on it):
// image_size above `maxImageSize` (what the http target serves at most, so
// that every byte offset of a page fits an off_t), more than `maxRuns` runs
// (what a recording holds at most, and so what a `profile-replay` control
// request carries), more than `maxPages` pages (what a recording holds at
// most: it bounds the ranges replay makes), runs that overlap or leave the
// image, and counts whose sum is not `pages`. Every sum and product below is computed so that it
// cannot overflow even for a profile made in code (`init`) with any numbers.
//
// IDENTITY. A profile is for one image: it is refused (one line) when the
// size differs, or when either side has validators and they differ (an
// image rebuilt under the same URL has other blocks where its files are). A
// server with no validators at all leaves only the image's identity to compare.
//
// RECORDING (`ProfileRecorder`): first touches only (the pages seen, kept as
// sorted ranges), appended to the last run when they continue it; bounded in
// memory by `maxRuns` (whatever the image's size), in size by `maxPages`, and
// in time by a deadline: whichever comes first ends the recording.
//
// REPLAY (`replayRanges`): the recorded order matters (what a boot reads
// first should arrive first), but one request per small run would cost a
// round trip each. So the runs are taken in windows of consecutive runs
// (`windowBytes` of pages each, in recorded order); within a window they are
// sorted and merged across gaps of at most `gapBytes` (fetching a few pages
// nobody read is cheaper than another request), and cut at `maxRunBytes`.
import FoundationEssentials

public struct BootProfile: Equatable, Sendable {
    public static let formatName = "ublk-http-profile"
    public static let version = 1
    /// A profile file larger than this is refused unread: `maxRuns` runs of
    /// the largest numbers take under 3 MiB, the rest is the URL and validators.
    public static let maxFileBytes = 8 << 20
    /// Runs a profile holds at most (a recording ends at this many).
    public static let maxRuns = 1 << 16
    /// Pages a profile holds at most (a recording ends at this many): what
    /// bounds the ranges replay makes (at most 1 TiB of 1 MiB pages, cut
    /// into runs of 4 MiB: 2^18 ranges).
    public static let maxPages: UInt64 = 1 << 20
    /// The largest image_size (bytes) a profile may name: the largest image the http target serves.
    public static let maxImageSize = UInt64(Int64.max)

    public var url: String
    public var imageSize: UInt64
    public var etag: String?
    public var lastModified: String?
    public var pageSize: Int
    /// Page ranges (in `pageSize` units), in the order they were first read.
    public var runs: [Range<UInt64>]

    public init(url: String, imageSize: UInt64, etag: String?, lastModified: String?, pageSize: Int, runs: [Range<UInt64>]) {
        self.url = url
        self.imageSize = imageSize
        self.etag = etag.flatMap { $0.isEmpty ? nil : $0 }
        self.lastModified = lastModified.flatMap { $0.isEmpty ? nil : $0 }
        self.pageSize = pageSize
        self.runs = runs
    }

    /// Pages of the runs (saturating: a profile made in code may hold any ranges).
    public var pageCount: UInt64 {
        runs.reduce(0) { sum, r in
            let (s, o) = sum.addingReportingOverflow(r.upperBound - r.lowerBound)
            return o ? .max : s
        }
    }

    public struct FormatError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { description = d }
    }

    private struct File: Codable {
        var format: String
        var version: Int
        var url: String
        var imageSize: UInt64
        var etag: String?
        var lastModified: String?
        var pageSize: Int
        var pages: UInt64
        var runs: [[UInt64]]
        enum CodingKeys: String, CodingKey {
            case format, version, url, imageSize = "image_size", etag, lastModified = "last_modified"
            case pageSize = "page_size", pages, runs
        }
    }

    /// The file's bytes (one line, newline-terminated).
    public func encoded() -> [UInt8] {
        let f = File(format: BootProfile.formatName, version: BootProfile.version, url: url, imageSize: imageSize,
                     etag: etag, lastModified: lastModified, pageSize: pageSize, pages: pageCount,
                     runs: runs.map { [$0.lowerBound, UInt64($0.count)] })
        let enc = JSONEncoder()
        // Sorted keys: the same recording always makes the same file.
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var out = Array((try? enc.encode(f)) ?? Data())
        out.append(10)
        return out
    }

    /// Parses and checks a profile file's bytes: every rule of the format
    /// above, so that replay never sees a run outside the image and no
    /// number in the file can make arithmetic overflow (HOSTILE NUMBERS).
    public static func decode(_ bytes: [UInt8]) throws(FormatError) -> BootProfile {
        guard bytes.count <= maxFileBytes else { throw FormatError("larger than \(maxFileBytes >> 20) MiB: not a profile") }
        let f: File
        do { f = try JSONDecoder().decode(File.self, from: Data(bytes)) } catch {
            throw FormatError("not a ublk-http profile (malformed JSON, missing fields, or a number that is negative or too large)")
        }
        guard f.format == formatName else { throw FormatError("not a ublk-http profile (format \"\(f.format)\")") }
        guard f.version == version else { throw FormatError("profile version \(f.version) is not supported (this program reads version \(version))") }
        guard f.pageSize >= 512, f.pageSize <= 1 << 20, f.pageSize.nonzeroBitCount == 1 else {
            throw FormatError("bad page_size \(f.pageSize): expected a power of two from 512 to 1M")
        }
        guard f.imageSize > 0 else { throw FormatError("bad image_size 0") }
        guard f.imageSize <= maxImageSize else {
            throw FormatError("bad image_size \(f.imageSize): larger than any image (at most \(maxImageSize) bytes)")
        }
        guard f.runs.count <= maxRuns else {
            throw FormatError("\(f.runs.count) runs: a profile holds at most \(maxRuns)")
        }
        let ps = UInt64(f.pageSize)
        // No overflow: imageSize <= Int64.max.
        let pageCount = (f.imageSize + ps - 1) / ps
        var runs: [Range<UInt64>] = []
        runs.reserveCapacity(f.runs.count)
        var total: UInt64 = 0
        for (i, r) in f.runs.enumerated() {
            guard r.count == 2, r[1] > 0, r[0] < pageCount, r[1] <= pageCount - r[0] else {
                throw FormatError("run \(i) is not [first page, page count] within the image's \(pageCount) pages")
            }
            runs.append(r[0]..<r[0] + r[1])
            // Bounded by pageCount once the runs are known disjoint (below); checked meanwhile.
            let (t, overflow) = total.addingReportingOverflow(r[1])
            guard !overflow, t <= pageCount else { throw FormatError("the runs hold more pages than the image's \(pageCount): they overlap") }
            total = t
        }
        let order = runs.indices.sorted { runs[$0].lowerBound < runs[$1].lowerBound }
        for k in order.indices.dropFirst() where runs[order[k]].lowerBound < runs[order[k - 1]].upperBound {
            let (a, b) = (min(order[k - 1], order[k]), max(order[k - 1], order[k]))
            throw FormatError("runs \(a) and \(b) overlap (a page is in a profile once)")
        }
        guard total <= maxPages else { throw FormatError("the runs hold \(total) pages: a profile holds at most \(maxPages) pages") }
        guard total == f.pages else { throw FormatError("pages is \(f.pages) but the runs hold \(total)") }
        return BootProfile(url: f.url, imageSize: f.imageSize, etag: f.etag, lastModified: f.lastModified,
                           pageSize: f.pageSize, runs: runs)
    }

    /// Why this profile is not for the image described (nil: it is).
    public func mismatch(url: String, imageSize: UInt64, etag: String?, lastModified: String?) -> String? {
        let etag = etag.flatMap { $0.isEmpty ? nil : $0 }
        let lastModified = lastModified.flatMap { $0.isEmpty ? nil : $0 }
        // The identity first: two URLs that differ in more than their signature
        // are two images, even when sizes and validators agree (ImageIdentity).
        if self.url != url { return "it was recorded against another image (\(self.url), not \(url))" }
        if imageSize != self.imageSize {
            return "it was recorded against another image (size \(self.imageSize), the image is \(imageSize) bytes)"
        }
        if self.etag != etag {
            return "it was recorded against another image (ETag \(self.etag ?? "none"), the image has \(etag ?? "none"))"
        }
        if self.lastModified != lastModified {
            return "it was recorded against another image (Last-Modified \(self.lastModified ?? "none"), the image has \(lastModified ?? "none"))"
        }
        return nil
    }

    /// The ranges to fetch, in units of `targetPageSize` pages, in replay
    /// order (the header's REPLAY). Pages past the image are never included.
    /// `maxRunBytes` .max: ranges are not cut (at most one per run: what a
    /// `profile-replay` request carries; the fill cuts its own runs). Never
    /// traps, whatever the profile's numbers (a run past the image is dropped
    /// or clamped; sums saturate).
    public func replayRanges(targetPageSize: Int, gapBytes: UInt64 = 256 << 10, windowBytes: UInt64 = 32 << 20,
                             maxRunBytes: UInt64 = 4 << 20) -> [Range<UInt64>] {
        let ps = UInt64(max(1, pageSize)), tps = UInt64(max(1, targetPageSize))
        // Ceilings by division: imageSize + tps - 1 may overflow.
        let targetPages = imageSize / tps + (imageSize % tps == 0 ? 0 : 1)
        let profilePages = imageSize / ps + (imageSize % ps == 0 ? 0 : 1)
        let gap = gapBytes / tps
        let window = max(1, windowBytes / tps)
        let maxRun = max(1, maxRunBytes / tps)
        var out: [Range<UInt64>] = []
        var batch: [Range<UInt64>] = []
        var batchPages: UInt64 = 0
        func flush() {
            batch.sort { $0.lowerBound < $1.lowerBound }
            var merged: [Range<UInt64>] = []
            for r in batch {
                // r.lowerBound <= last.upperBound + gap, without the sum.
                if let last = merged.last, r.lowerBound <= last.upperBound || r.lowerBound - last.upperBound <= gap {
                    merged[merged.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
                } else {
                    merged.append(r)
                }
            }
            for r in merged {
                var s = r.lowerBound
                while s < r.upperBound {
                    let e = r.upperBound - s > maxRun ? s + maxRun : r.upperBound
                    out.append(s..<e)
                    s = e
                }
            }
            batch = []
            batchPages = 0
        }
        for r in runs {
            // Bytes to the target's pages: any page the run touches. A page
            // below profilePages starts below imageSize, so the products fit.
            guard r.lowerBound < profilePages, r.lowerBound < r.upperBound else { continue }
            let loByte = r.lowerBound * ps
            let hiByte = r.upperBound >= profilePages ? imageSize : min(r.upperBound * ps, imageSize)
            let lo = loByte / tps
            let hi = min(hiByte / tps + (hiByte % tps == 0 ? 0 : 1), targetPages)
            guard lo < hi else { continue }
            batch.append(lo..<hi)
            let (sum, overflow) = batchPages.addingReportingOverflow(hi - lo)
            batchPages = overflow ? .max : sum
            if batchPages >= window { flush() }
        }
        flush()
        return out
    }
}

/// Records first touches (the header's RECORDING). Single-threaded, like its
/// owner (the home queue).
public final class ProfileRecorder {
    public enum End: String, Sendable {
        case stopped, seconds, pages, runs
    }

    public let pageCount: UInt64
    public let maxPages: UInt64
    public let maxRuns: Int
    /// Monotonic nanoseconds at which the recording ends (0: none).
    public let deadline: UInt64
    /// The pages seen so far: sorted, disjoint, adjacent ones merged. Never
    /// more entries than `runs` (each new run adds at most one), so memory is
    /// bounded by `maxRuns` whatever the image's size (a bitset of a 16 TiB
    /// image's pages would be 512 MiB).
    private var seen: [Range<UInt64>] = []
    public private(set) var runs: [Range<UInt64>] = []
    public private(set) var pages: UInt64 = 0
    /// Why the recording ended; nil while it runs.
    public private(set) var ended: End?

    /// Memory: at most twice `maxRuns` ranges (16 bytes each).
    public static let defaultMaxRuns = BootProfile.maxRuns
    public static let defaultMaxPages: UInt64 = BootProfile.maxPages

    public init(pageCount: UInt64, maxPages: UInt64 = ProfileRecorder.defaultMaxPages,
                maxRuns: Int = ProfileRecorder.defaultMaxRuns, deadline: UInt64 = 0) {
        self.pageCount = pageCount
        self.maxPages = max(1, maxPages)
        self.maxRuns = max(1, maxRuns)
        self.deadline = deadline
    }

    public var isRecording: Bool { ended == nil }

    /// Ends the recording now (if it runs).
    public func stop(_ why: End = .stopped) { if ended == nil { ended = why } }

    /// Ends it if its deadline passed.
    public func check(now: UInt64) {
        if ended == nil && deadline != 0 && now >= deadline { ended = .seconds }
    }

    /// A read of `touched`: the pages in it not seen before, in order.
    public func touch(_ touched: Range<UInt64>, now: UInt64) {
        check(now: now)
        guard ended == nil else { return }
        let range = touched.clamped(to: 0..<pageCount)
        var p = range.lowerBound
        while p < range.upperBound {
            let i = firstSeen(endingAfter: p)
            if i < seen.count && seen[i].lowerBound <= p {
                p = seen[i].upperBound
                continue
            }
            // Not seen from p up to the next seen range (or the read's end).
            var e = i < seen.count ? min(range.upperBound, seen[i].lowerBound) : range.upperBound
            // At most the pages left (maxPages may be .max: no sum that overflows).
            if e - p > maxPages - pages { e = p + (maxPages - pages) }
            insertSeen(p..<e, at: i)
            pages += e - p
            if let last = runs.last, last.upperBound == p {
                runs[runs.count - 1] = last.lowerBound..<e
            } else {
                runs.append(p..<e)
            }
            if pages >= maxPages { return stop(.pages) }
            if runs.count >= maxRuns { return stop(.runs) }
            p = e
        }
    }

    /// The index of the first seen range that ends after `page` (binary search).
    private func firstSeen(endingAfter page: UInt64) -> Int {
        var lo = 0, hi = seen.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if seen[mid].upperBound <= page { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// Adds `r` (unseen, between seen[i - 1] and seen[i]), merged with the neighbours it touches.
    private func insertSeen(_ r: Range<UInt64>, at i: Int) {
        let joinsPrevious = i > 0 && seen[i - 1].upperBound == r.lowerBound
        let joinsNext = i < seen.count && seen[i].lowerBound == r.upperBound
        switch (joinsPrevious, joinsNext) {
        case (true, true):
            seen[i - 1] = seen[i - 1].lowerBound..<seen[i].upperBound
            seen.remove(at: i)
        case (true, false):
            seen[i - 1] = seen[i - 1].lowerBound..<r.upperBound
        case (false, true):
            seen[i] = r.lowerBound..<seen[i].upperBound
        case (false, false):
            seen.insert(r, at: i)
        }
    }
}
