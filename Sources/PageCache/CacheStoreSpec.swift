// CacheStore's terms: what an open is asked for (`CacheStoreSpec`: the files,
// the source's identity, how each companion bitmap is used, the `cache`
// target's backing) and what it reports (`CacheState`, `CacheStoreError`).
// The rules they stand for are in CacheStore.swift's header.

/// How a store treats a companion bitmap.
public enum CompanionUse {
    /// Not used (not looked at).
    case none
    /// Opened (created when absent), bound, handed out.
    case open
    /// Not opened; if it holds pages the open fails with this line (given the count).
    case refuse((UInt64) -> String)
    /// Not opened; its pages are at stake: never dropped (refuse instead of starting afresh).
    case protect
}

/// The backing store of a `cache` target, checked against the cache.
public struct BackingCheck {
    public var fd: Int32
    public var path: String
    /// Pages compared at open (present, not pending write-back).
    public var samplePages = 32

    public init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }
}

public struct CacheStoreSpec {
    public var cachePath: String
    public var bitmapPath: String
    /// The present bitmap's identity (the source as it is now).
    public var identity: BitmapIdentity
    /// The companions carry the ETag and Last-Modified too (http); else only the URL (cache).
    public var companionValidators = true
    public var dirty: CompanionUse = .none
    public var local: CompanionUse = .none
    public var writeback: CompanionUse = .none
    /// The cache target: pages a write-through may have reached in only one of
    /// cache and backing store (the handler drops the cache's copy of them).
    public var unsettled = false
    public var backing: BackingCheck?
    public var live: LiveConfig?
    /// How messages name the source.
    public var sourceName = "the remote image"

    public var dirtyPath: String { bitmapPath + ".dirty" }
    public var localPath: String { bitmapPath + ".local" }
    public var writebackPath: String { bitmapPath + ".writeback" }
    public var unsettledPath: String { bitmapPath + ".unsettled" }

    public init(cachePath: String, bitmapPath: String, identity: BitmapIdentity) {
        self.cachePath = cachePath
        self.bitmapPath = bitmapPath
        self.identity = identity
    }
}

public enum CacheStoreError: Error, CustomStringConvertible, Equatable {
    /// Opening would lose data (or is not allowed): one line for the user.
    case refused(String)
    case bitmap(BitmapError)
    case file(FileError)

    public var description: String {
        switch self {
        case .refused(let s): return s
        case .bitmap(let e): return e.description
        case .file(let e): return e.description
        }
    }
}

/// What happened to the cache at open.
public enum CacheState: Equatable, Sendable {
    case fresh
    case reused
    case startedAfresh(String)

    public var description: String {
        switch self {
        case .fresh: return "fresh"
        case .reused: return "reused"
        case .startedAfresh(let why): return "started afresh: \(why)"
        }
    }
}
