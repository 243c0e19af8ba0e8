// CacheStore on a stopped device: its dirty bitmap opened for `dirty` and
// `sync` without a server, and what a cache holds (`status`). The same
// binding rules as an open for use (CacheStore.swift): never another set's
// file, live words a dead server of this boot left adopted.
import Glibc

extension CacheStore {
    /// A stopped device's dirty bitmap, opened for update (`dirty`, `sync`):
    /// it must belong to the set of its present bitmap (the path without
    /// `.dirty`) and, when `cachePath` is given, so must the cache file (its
    /// pages are about to be copied: never another file's bytes or zeros).
    /// Live words a dead server of this boot left are adopted.
    public static func openDirty(path: String, cachePath: String?, live: LiveConfig?) throws(CacheStoreError) -> (bitmap: Bitmap, cache: CacheFile?) {
        try typed {
            let info = try Bitmap.inspect(path: path)
            guard info.identity.kind == .dirty else { throw CacheStoreError.refused("\(path) is not a dirty bitmap") }
            var presentBinding: SetBinding?
            var presentFound = false
            if path.hasSuffix(".dirty") {
                let presentPath = String(path.dropLast(6))
                if exists(presentPath) {
                    let pi = try Bitmap.inspect(path: presentPath)
                    presentFound = true
                    presentBinding = pi.binding
                    if pi.binding?.setID != info.binding?.setID {
                        throw CacheStoreError.refused("\(path) belongs to another cache than \(presentPath)")
                    }
                }
            }
            if info.binding != nil && !presentFound {
                throw CacheStoreError.refused("\(path): its page bitmap \(path.hasSuffix(".dirty") ? String(path.dropLast(6)) : "?") is missing")
            }
            var cache: CacheFile?
            if let cachePath {
                guard let c = try CacheFile.openExisting(path: cachePath, size: info.identity.imageSize) else {
                    throw CacheStoreError.refused("the cache file \(cachePath) is missing")
                }
                if let b = presentBinding ?? info.binding {
                    switch try c.readTrailer() {
                    case .success(let t) where t.binding.setID == b.setID && t.binding.generation >= b.generation: break
                    default: throw CacheStoreError.refused("the cache file \(cachePath) does not belong to \(path)")
                    }
                } else if try c.currentLength() != info.identity.imageSize {
                    throw CacheStoreError.refused("the cache file \(cachePath) does not belong to \(path)")
                }
                cache = c
            }
            let bitmap = try Bitmap.open(path: path, identity: info.identity).bitmap
            if let live, bitmap.binding != nil { try bitmap.attachLive(live, role: "dirty") }
            return (bitmap, cache)
        }
    }

    /// What `status` reports: the present bitmap's header and pages, and the
    /// companions' and cache file's state. Reads only; live words count.
    public struct Info {
        public var present: BitmapInfo
        public var dirty: UInt64?
        public var local: UInt64?
        public var writeback: UInt64?
        /// nil: not asked; "ok", or why the cache file does not match.
        public var cacheFile: String?
    }

    public static func inspect(bitmapPath: String, cachePath: String?, live: LiveConfig?) throws(CacheStoreError) -> Info {
        try typed {
            let main = try bits(path: bitmapPath, role: "present", live: live)
            var info = main.info
            info.present = main.bits.count
            var out = Info(present: info)
            func count(_ suffix: String, _ role: String) -> UInt64? {
                guard exists(bitmapPath + suffix) else { return nil }
                return (try? bits(path: bitmapPath + suffix, role: role, live: live))?.bits.count
            }
            out.dirty = count(".dirty", "dirty")
            out.local = count(".local", "local")
            out.writeback = count(".writeback", "writeback")
            if let cachePath {
                let size = info.identity.imageSize
                if let c = try CacheFile.openExisting(path: cachePath, size: size) {
                    if let b = info.binding {
                        switch try c.readTrailer() {
                        case .success(let t) where t.binding.setID == b.setID:
                            out.cacheFile = t.binding.generation >= b.generation ? "ok" : "older copy"
                        case .success: out.cacheFile = "another cache's"
                        case .failure(.shorter): out.cacheFile = "truncated"
                        case .failure: out.cacheFile = "no trailer"
                        }
                    } else {
                        out.cacheFile = try c.currentLength() == size ? "ok (unbound)" : "wrong size"
                    }
                } else {
                    out.cacheFile = "missing"
                }
            }
            return out
        }
    }
}
