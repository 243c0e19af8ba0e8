// OverlayStore: the files of one named overlay (the pages a writable device
// wrote over a read-only lower image, a shared base), opened through the one
// persistence engine of every caching target, CacheStore:
//
//   DIR/NAME.overlay                the data file (CacheFile): a written page at its
//                                   own offset, holes elsewhere, the set's trailer
//   DIR/NAME.overlay.bitmap         present: the data file holds the page
//   DIR/NAME.overlay.bitmap.local   local: data written here (never replaced by
//                                   the lower's bytes)
//   DIR/NAME.overlay.bitmap.dirty   dirty: written since the last `dirty --clear`/`sync`
//
// So an overlay has what `http --writable` has, by the same code: the files
// bound by one set identity (a data file deleted, truncated, replaced or
// restored from a backup while the bitmaps hold written pages is refused
// with one line), live words under /run that survive the server (kill -9),
// and the handler's intent and full cycles (CachingHandler.swift's ORDER ON
// DISK). What differs is the read path: the overlay reads through to the
// lower device and keeps nothing it read (CacheContext.readThroughFD).
//
// Every bitmap carries the lower image's identity (URL without secrets,
// ETag, Last-Modified, size): an overlay is data written over one image, and
// reattaching it to another would mix the two. That is refused with one line
// whatever the overlay holds (never started afresh: its pages exist nowhere
// else). A missing overlay is created only when asked (`create`): a typo in
// a name never hides a device's data behind an empty new overlay.
//
// Overlays written before this layout (DIR/NAME.overlay.local and .dirty,
// no present bitmap, no binding) are migrated at open: a present bitmap made
// from the local bits first, then the companions renamed; a crash midway is
// finished by the next open (see `migrate`).
import Glibc

public enum OverlayStoreError: Error, CustomStringConvertible, Equatable {
    case refused(String)

    public var description: String {
        switch self { case .refused(let s): return s }
    }
}

public enum OverlayStore {
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
    public static func bitmapPath(directory: String, name: String) -> String { dataPath(directory: directory, name: name) + ".bitmap" }

    /// Whether an overlay of this name exists in `directory` (in either layout).
    public static func exists(directory: String, name: String) -> Bool {
        let data = dataPath(directory: directory, name: name)
        return access(data + ".bitmap.local", F_OK) == 0 || access(data + ".local", F_OK) == 0
    }

    /// The CacheStore spec of overlay `name` over the image `lower` describes.
    public static func spec(directory: String, name: String, lower: BitmapIdentity, live: LiveConfig?) -> CacheStoreSpec {
        var id = lower
        id.kind = .present
        id.pageSize = pageSize
        var spec = CacheStoreSpec(cachePath: dataPath(directory: directory, name: name),
                                  bitmapPath: bitmapPath(directory: directory, name: name), identity: id)
        spec.local = .open
        spec.dirty = .open
        spec.live = live
        spec.sourceName = "the lower image"
        return spec
    }

    /// Opens overlay `name` in `directory` over the image `lower` describes.
    /// Creates it when absent and `create`. Returns the store and whether this open made it.
    public static func open(directory: String, name: String, lower: BitmapIdentity, create: Bool,
                            live: LiveConfig?) throws(OverlayStoreError) -> (store: CacheStore, created: Bool) {
        try validate(name: name)
        let existed = exists(directory: directory, name: name)
        if !existed && !create {
            throw .refused("no overlay named '\(name)' in \(directory) (add it once with --overlay \(name) to create it)")
        }
        let spec = spec(directory: directory, name: name, lower: lower, live: live)
        do {
            try migrate(spec)
            if existed { try checkImage(spec, name: name) }
            return (try CacheStore.open(spec), !existed)
        } catch let e as OverlayStoreError {
            throw e
        } catch let e as CacheStoreError {
            if case .bitmap(.locked) = e { throw .refused("overlay '\(name)' is in use by another device") }
            if case .bitmap(.imageSizeMismatch(_, let file, let expected)) = e {
                throw .refused("overlay '\(name)' was written over another image (of \(file) bytes, not \(expected)); it is kept as it is")
            }
            throw .refused("overlay '\(name)': \(e)")
        } catch {
            throw .refused("overlay '\(name)': \(error)")
        }
    }

    /// An overlay belongs to one image: another one (URL, ETag, Last-Modified,
    /// size) is refused whatever the overlay holds.
    static func checkImage(_ spec: CacheStoreSpec, name: String) throws {
        let path = access(spec.bitmapPath, F_OK) == 0 ? spec.bitmapPath : spec.localPath
        let info: BitmapInfo
        do { info = try Bitmap.inspect(path: path) } catch { throw CacheStoreError.bitmap(error) }
        let was = info.identity, want = spec.identity
        var why: String?
        if was.imageSize != want.imageSize { why = "of \(was.imageSize) bytes, not \(want.imageSize)" }
        else if was.url != want.url { why = "\(was.url), not \(want.url)" }
        else if was.etag != want.etag { why = "ETag \(was.etag ?? "none"), not \(want.etag ?? "none")" }
        else if was.lastModified != want.lastModified {
            why = "Last-Modified \(was.lastModified ?? "none"), not \(want.lastModified ?? "none")"
        }
        if let why { throw OverlayStoreError.refused("overlay '\(name)' was written over another image (\(why)); it is kept as it is") }
    }

    /// The layout before the overlay shared the caching engine: NAME.overlay
    /// (exactly the image's size, no trailer) with NAME.overlay.local and
    /// NAME.overlay.dirty, unbound. Order, each step durable before the next:
    /// the present bitmap is written under a temporary name from the local
    /// bits (a page was local only after its data was synced) and renamed into
    /// place, then the companions are renamed. An open that finds the old
    /// local bitmap and no new one carries on from where a crash left it; the
    /// unbound files are then bound by CacheStore (trusted once: the data
    /// file has exactly the image's length).
    static func migrate(_ spec: CacheStoreSpec) throws {
        let oldLocal = spec.cachePath + ".local", oldDirty = spec.cachePath + ".dirty"
        guard access(oldLocal, F_OK) == 0, access(spec.localPath, F_OK) != 0 else { return }
        if access(spec.bitmapPath, F_OK) != 0 {
            var localID = spec.identity
            localID.kind = .local
            let local = try Bitmap.open(path: oldLocal, identity: localID).bitmap
            let tmp = spec.bitmapPath + ".migrating"
            unlink(tmp)
            let present = try Bitmap.open(path: tmp, identity: spec.identity).bitmap
            var p: UInt64 = 0
            let n = local.pageCount
            while p < n, let s = local.bits.nextSet(in: p..<n) {
                let e = local.bits.nextClear(in: s..<n) ?? n
                _ = present.markPresent(s..<e)
                p = e
            }
            try present.persist(present.stage())
            try rename(tmp, spec.bitmapPath)
        }
        if access(oldDirty, F_OK) == 0 { try rename(oldDirty, spec.dirtyPath) }
        try rename(oldLocal, spec.localPath)
    }

    /// rename(2), then the directory made durable.
    static func rename(_ from: String, _ to: String) throws {
        if Glibc.rename(from, to) != 0 { throw FileError("rename", path: from, errno: errno) }
        let dir = String(to[..<(to.lastIndex(of: "/") ?? to.startIndex)])
        let fd = Glibc.open(dir.isEmpty ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 { _ = fsync(fd); close(fd) }
    }
}
