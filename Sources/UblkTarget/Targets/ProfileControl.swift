// ProfileControl: recording a boot profile on a live caching device (the
// format and the recorder are PageCache/BootProfile.swift; the CLI side is
// UblkCLI/Profile.swift).
//
// Contract:
// - `profile-start` begins recording the pages reads touch for the first
//   time, in order, on the home queue (where every read is planned: misses
//   and, with -q N, the other queues' hits, which they tell the home of
//   (`touched`) only while a recording runs: a relaxed load per hit otherwise).
//   Bounded by `pages`, `seconds` and ProfileRecorder.defaultMaxRuns.
// - `profile-stop` ends it; so does a bound. An ended recording stays until
//   a `profile-status` with `clear` takes it (its runs are in that reply), or
//   until the next `profile-start`. One recording per device at a time.
// - Nothing here does file I/O: the CLI writes the profile, as its caller,
//   in its own working directory. Recording costs a bit test per read.
// Replay (`add --prefetch-profile`) is a fill job of kind `profile`
// (CachingFill.swift: in order, coalesced, yielding to the device's misses),
// set up when the home handler is made and started by its first `idle`;
// `fill-status` (`ublk-http profile status`) says when it is done.
import CUring
import PageCache

/// The reply to the profile operations.
public struct ProfileStatus: Codable, Sendable, Equatable {
    public var recording: Bool
    /// Why it ended: stopped, seconds, pages or runs (nil while recording).
    public var ended: String?
    public var pages: UInt64
    public var runCount: Int
    public var pageSize: Int
    public var imageSize: UInt64
    /// [first page, page count] in recorded order: only once ended, in `profile-status`.
    public var runs: [[UInt64]]?
    enum CodingKeys: String, CodingKey {
        case recording, ended, pages, runCount = "run_count", pageSize = "page_size", imageSize = "image_size", runs
    }
}

extension CachingHandler {
    /// The reply to a profile operation; nil for any other operation.
    func profileControl(_ request: ControlRequest, queue: IOQueue) -> String? {
        let name = "ublk\(queue.deviceID)"
        switch request.op {
        case .profileStart:
            if let p = profile, p.isRecording {
                return controlError("\(name) is already recording a profile (end it with `ublk-http profile stop -n \(queue.deviceID)`)")
            }
            // No more than a profile may hold (BootProfile.decode refuses more).
            let maxPages = min(request.pages ?? ProfileRecorder.defaultMaxPages, BootProfile.maxPages)
            guard maxPages > 0 else { return controlError("a profile needs room for at least one page") }
            let deadline = request.seconds.map { monotonicNanos() &+ min($0, 1 << 32) * 1_000_000_000 } ?? 0
            let p = ProfileRecorder(pageCount: bitmap.pageCount, maxPages: maxPages, deadline: deadline)
            profile = p
            mesh?.recordingProfile = true
            return profileStatus(p, runs: false)
        case .profileStop:
            guard let p = profile else { return controlError("\(name) is not recording a profile") }
            p.stop()
            mesh?.recordingProfile = false
            return profileStatus(p, runs: false)
        case .profileStatus:
            guard let p = profile else { return controlError("\(name) has no profile recording (start one with `ublk-http profile record`)") }
            p.check(now: monotonicNanos())
            if p.isRecording { return profileStatus(p, runs: false) }
            mesh?.recordingProfile = false
            if request.clear == true { profile = nil }
            return profileStatus(p, runs: true)
        case .profileReplay:
            // A running base of several overlay devices: the profile comes with a later device's add.
            guard let runs = request.runs, !runs.isEmpty else { return controlError("profile-replay needs runs") }
            // The CLI sends a profile's replay ranges, one per run at most (BootProfile.maxRuns).
            guard runs.count <= BootProfile.maxRuns else {
                return controlError("profile-replay: \(runs.count) runs, at most \(BootProfile.maxRuns)")
            }
            let pages = bitmap.pageCount
            var ranges: [Range<UInt64>] = []
            ranges.reserveCapacity(runs.count)
            for r in runs {
                // Within the device's pages, checked without a sum that could overflow.
                guard r.count == 2, r[1] > 0, r[0] < pages, r[1] <= pages - r[0] else {
                    return controlError("profile-replay: run \(r) is not [first page, page count] within the device's \(pages) pages")
                }
                ranges.append(r[0]..<r[0] + r[1])
            }
            var spec = FillJobSpec(kind: .profile, ranges: ranges)
            spec.maxInFlight = max(1, min(2, planner.maxActiveRuns - 1))
            spec.maxPasses = 3
            startFill(spec, queue: queue)
            return controlJSON(fillStatus())
        default:
            return nil
        }
    }

    func profileStatus(_ p: ProfileRecorder, runs: Bool) -> String {
        controlJSON(ProfileStatus(recording: p.isRecording, ended: p.ended?.rawValue, pages: p.pages, runCount: p.runs.count,
                                  pageSize: Int(pageSize), imageSize: imageSize,
                                  runs: runs ? p.runs.map { [$0.lowerBound, UInt64($0.count)] } : nil))
    }

    /// Sets `spec` up as the fill job before the queue serves: `idle` (the
    /// fill's driver) takes its first step, which a one-shot timer makes come
    /// even if the device reads nothing.
    func scheduleFill(_ spec: FillJobSpec, queue: IOQueue) {
        let job = FillJob(spec, pageCount: bitmap.pageCount, now: monotonicNanos())
        job.size(pageSize: pageSize, plannerMax: fillRunLimit)
        job.presentAtPassStart = fillPresent(job)
        filling.job = job
        if !timerArmed, timerFD >= 0, cu_timerfd_arm(timerFD, 1_000_000) == 0 {
            timerArmed = true
            queue.poll(fd: timerFD, data: CachingHandler.Event.timer.rawValue)
        }
    }

    /// A read of these bytes reached the home (recorded while a profile records).
    @inline(__always)
    func recordRead(offset: UInt64, length: UInt32) {
        guard let p = profile, p.isRecording else { return }
        p.touch(planner.pages(offset: offset, length: Int(length)), now: monotonicNanos())
        if !p.isRecording { mesh?.recordingProfile = false }
    }
}
