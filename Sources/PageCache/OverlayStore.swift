// OverlayStore: the files of one named overlay: the pages a writable device
// wrote over a read-only lower image (a shared base), and nothing else.
//
//   DIR/NAME.overlay        sparse data file, the image's size: a written
//                           page at its own offset, holes elsewhere (0600)
//   DIR/NAME.overlay.local  bitmap (kind local): the data file holds the page
//   DIR/NAME.overlay.dirty  bitmap (kind dirty): written since the last clear
//
// Both bitmaps carry the lower image's identity (its URL without secrets,
// ETag, Last-Modified, size): an overlay is data written over one image, and
// reattaching it to another would mix the two. That is refused with one line
// (never started afresh: an overlay's pages exist nowhere else). A missing
// overlay is created only when asked (`create`); reattaching by name to one
// that does not exist is a one-line error, so a typo never hides a device's
// data behind an empty new overlay.
//
// CRASH RULE (the overlay handler issues it, OverlayTarget.swift): a page's
// local bit reaches the disk only after its data (fdatasync of the data file,
// then the bitmap words), so after a crash a local page always holds what was
// written; a page whose bit did not make it reads the lower image again,
// which is what a write not yet covered by a FLUSH may become. The dirty bit
// rides on the same cycle, before the FLUSH that covers its write completes.
import Glibc

public enum OverlayStoreError: Error, CustomStringConvertible, Equatable {
    case refused(String)

    public var description: String {
        switch self { case .refused(let s): return s }
    }
}

public final class OverlayStore {
    public let name: String
    public let data: CacheFile
    public let local: Bitmap
    public let dirty: Bitmap
    /// The overlay was made by this open.
    public let created: Bool

    public static let pageSize = 4096

    /// A name is a file name: letters, digits, `.`, `-`, `_`; not starting with `.`.
    public static func validate(name: String) throws(OverlayStoreError) {
        let ok = !name.isEmpty && name.count <= 100 && !name.hasPrefix(".")
            && name.utf8.allSatisfy { c in
                (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a)
                    || c == 0x2d || c == 0x2e || c == 0x5f
            }
        if !ok {
            throw .refused("invalid overlay name '\(name)': use letters, digits, '.', '-' and '_' (at most 100, not starting with '.')")
        }
    }

    public static func dataPath(directory: String, name: String) -> String { directory + "/" + name + ".overlay" }

    /// Whether an overlay of this name exists in `directory`.
    public static func exists(directory: String, name: String) -> Bool {
        access(dataPath(directory: directory, name: name) + ".local", F_OK) == 0
    }

    /// Opens overlay `name` in `directory` over the image `lower` describes
    /// (kind and page size are set here). Creates it when absent and `create`.
    public init(directory: String, name: String, lower: BitmapIdentity, create: Bool) throws(OverlayStoreError) {
        try OverlayStore.validate(name: name)
        let path = OverlayStore.dataPath(directory: directory, name: name)
        let exists = OverlayStore.exists(directory: directory, name: name)
        if !exists && !create {
            throw .refused("no overlay named '\(name)' in \(directory) (add it once with --overlay \(name) to create it)")
        }
        var id = lower
        id.pageSize = OverlayStore.pageSize
        func open(_ kind: BitmapKind, _ suffix: String) throws(OverlayStoreError) -> Bitmap {
            id.kind = kind
            let r: (bitmap: Bitmap, outcome: BitmapOutcome)
            do { r = try Bitmap.open(path: path + suffix, identity: id) } catch {
                if case .locked = error { throw .refused("overlay '\(name)' is in use by another device") }
                if case .imageSizeMismatch(_, let file, let expected) = error {
                    throw .refused("overlay '\(name)' was written over another image (of \(file) bytes, not \(expected)); it is kept as it is")
                }
                throw .refused("overlay '\(name)': \(error)")
            }
            if case .invalidated(let why) = r.outcome {
                throw .refused("overlay '\(name)' was written over another image (\(OverlayStore.describe(why))); it is kept as it is")
            }
            return r.bitmap
        }
        local = try open(.local, ".local")
        dirty = try open(.dirty, ".dirty")
        do { data = try CacheFile(path: path, size: lower.imageSize) } catch {
            throw .refused("overlay '\(name)': \(error)")
        }
        self.name = name
        created = !exists
    }

    static func describe(_ why: InvalidationReason) -> String {
        switch why {
        case .urlChanged(let old, let new): return "\(old), not \(new)"
        case .etagChanged(let old, let new): return "ETag \(old ?? "none"), not \(new ?? "none")"
        case .lastModifiedChanged(let old, let new): return "Last-Modified \(old ?? "none"), not \(new ?? "none")"
        }
    }

    /// Makes every bit set in memory durable, in the crash order (blocking:
    /// at shutdown). False when the data sync or a bitmap write failed.
    @discardableResult
    public func persistAll() -> Bool {
        let l = local.stage(), d = dirty.stage()
        do { try data.sync() } catch {
            local.abandon(l)
            dirty.abandon(d)
            return false
        }
        do {
            try local.persist(l)
            try dirty.persist(d)
        } catch { return false }
        return true
    }
}
