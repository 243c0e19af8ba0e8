// HTTPVerity: where a verified http device's hash tree comes from
// (`--verity-root` with `--verity-tree URL|FILE` and/or `--verity-offset`),
// and the checks that the tree fits the image. What is checked against it,
// and when: CachingVerify.swift; the tree's format: PageCache/VerityTree.swift.
//
// SOURCES.
//   - a local FILE: read in place, the superblock at --verity-offset (0);
//   - a URL: fetched on demand into `<cache>.verity`, beside the cache: a
//     sparse file laid out as the tree's object. `add` fetches its superblock
//     and top hash block; the home queue fetches the other hash blocks when a
//     run, a reused page or the scrub first needs them (TreeFetcher.swift).
//     A copy whose superblock and top block verify against the root is used
//     again, with what it holds;
//   - neither: the tree is appended to the image at --verity-offset
//     (`veritysetup format IMG IMG --hash-offset N --data-blocks K`): fetched
//     on demand from the image's URL as above, and the device is the data
//     part only (K blocks).
// Whatever the source, nothing of it is trusted but through the root.
import Glibc
import PageCache

/// `--verity-*`: what turns verification on and where the tree is.
public struct VeritySpec: Sendable, Equatable {
    /// The root digest, hex (the one trusted value).
    public var rootHex: String
    /// A URL (http, https, s3) or a local path; nil: appended to the image at `offset`.
    public var tree: String?
    /// Where the superblock is in the tree's file or object (or in the image).
    public var offset: UInt64?

    public init(rootHex: String, tree: String?, offset: UInt64?) {
        self.rootHex = rootHex
        self.tree = tree
        self.offset = offset
    }

    public var treeIsURL: Bool {
        guard let t = tree?.lowercased() else { return false }
        return t.hasPrefix("http://") || t.hasPrefix("https://") || t.hasPrefix("s3://")
    }

    /// What a cache's identity records of it: the root, lowercase.
    public var identitySuffix: String { "#verity-root=" + rootHex.lowercased() }

    /// Where a downloaded tree is kept, beside the cache file.
    public static func localCopy(cachePath: String) -> String { cachePath + ".verity" }
}

enum HTTPVerity {
    /// The tree for `spec` over the image at `http` (its probe: `remote`).
    /// Returns the tree and the size of the device (the tree's data).
    static func load(_ spec: VeritySpec, http: HTTPConfig, remote: RemoteImage?, cachePath: String,
                     pageSize: Int) throws(UblkError) -> (VerityTree, UInt64) {
        if spec.tree == nil && spec.offset == nil {
            throw UblkError("--verity-root needs --verity-tree (a URL or a file), or --verity-offset for a tree appended to the image")
        }
        // (Its exact length, the tree's digest's, is VerityTree's to check.)
        guard let root = VerityTree.hex(spec.rootHex), root.count >= 16 else {
            throw UblkError("--verity-root must be the root hash veritysetup printed (hex digits), not '\(Redact.printable(spec.rootHex))'")
        }
        let tree: VerityTree
        if let path = spec.tree, !spec.treeIsURL {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw UblkError("cannot open --verity-tree \(path): \(Errno.current)") }
            do { tree = try VerityTree(fd: fd, owns: true, hashOffset: spec.offset ?? 0, rootHex: spec.rootHex) } catch {
                close(fd)
                throw UblkError("--verity-tree \(path): \(error.description)")
            }
        } else {
            tree = try downloaded(spec, http: http, remote: remote, cachePath: cachePath)
        }
        let p = tree.params
        guard p.dataBlockSize <= pageSize, pageSize % p.dataBlockSize == 0 else {
            throw UblkError("the verity tree's data blocks are \(p.dataBlockSize) bytes: they must divide the cache's \(pageSize)-byte pages (--page-size)")
        }
        if let r = remote {
            if spec.tree == nil {
                guard p.dataBytes <= spec.offset! else {
                    throw UblkError("the verity tree covers \(p.dataBytes) bytes, past its own offset \(spec.offset!) in the image")
                }
            } else if p.dataBytes != r.size {
                throw UblkError("the verity tree covers \(p.dataBytes) bytes (\(p.dataBlocks) blocks of \(p.dataBlockSize)); the image has \(r.size)")
            }
        }
        return (tree, p.dataBytes)
    }

    /// The local copy of a remote tree (a URL, or the image's own bytes from
    /// --verity-offset): the copy beside the cache when its superblock and top
    /// block verify, else a new one, sparse, as large as the tree's object,
    /// holding the superblock and the top block (fetched now); the other hash
    /// blocks are fetched when first needed (TreeFetcher). Returns the tree
    /// and how to fetch the rest.
    static func downloaded(_ spec: VeritySpec, http: HTTPConfig, remote: RemoteImage?, cachePath: String) throws(UblkError) -> VerityTree {
        let copy = VeritySpec.localCopy(cachePath: cachePath)
        let base = spec.offset ?? 0
        let fd = open(copy, O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            if let t = try? VerityTree(fd: fd, owns: true, hashOffset: base, rootHex: spec.rootHex) { return t }
            close(fd)
        }
        let config = treeConfig(spec, http: http)
        let what = spec.tree.map { "--verity-tree \(Redact.url($0))" } ?? "the verity tree in the image at \(base)"
        let size: UInt64
        if spec.tree != nil {
            do { size = try HTTPSource(config: config).probeBlocking().size } catch { throw UblkError("\(what): \(error.description)") }
        } else {
            guard let r = remote else { throw UblkError("the image's verity tree cannot be fetched: the remote is unreachable") }
            size = r.size
        }
        guard base + UInt64(VerityParams.superblockSize) <= size else {
            throw UblkError("\(what): no verity superblock at offset \(base) (the object has \(size) bytes)")
        }
        let tmp = copy + ".tmp"
        let out = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard out >= 0 else { throw UblkError("cannot create \(tmp): \(Errno.current)") }
        func fail(_ m: String) -> UblkError {
            close(out)
            unlink(tmp)
            return UblkError(m)
        }
        guard ftruncate(out, off_t(size)) == 0 else { throw fail("cannot size \(tmp): \(Errno.current)") }
        let source: HTTPSource
        do { source = try HTTPSource(config: config) } catch { throw fail("\(what): \(error.description)") }
        // The superblock, then (once its block size is known) the top hash block.
        if let e = fetch(source, into: out, offset: base, length: VerityParams.superblockSize) { throw fail("\(what): \(e)") }
        var sb = [UInt8](repeating: 0, count: VerityParams.superblockSize)
        _ = sb.withUnsafeMutableBytes { pread(out, $0.baseAddress, $0.count, off_t(base)) }
        let params: VerityParams
        do { params = try VerityParams.parse(superblock: sb, hashOffset: base) } catch { throw fail("\(what): \(error.description)") }
        let top = VerityTree.topBlockOffset(params)
        if top + UInt64(params.hashBlockSize) <= size,
           let e = fetch(source, into: out, offset: top, length: params.hashBlockSize) {
            throw fail("\(what): \(e)")
        }
        guard fsync(out) == 0, rename(tmp, copy) == 0 else { throw fail("cannot keep the verity tree in \(copy): \(Errno.current)") }
        do { return try VerityTree(fd: out, owns: true, hashOffset: base, rootHex: spec.rootHex) } catch {
            throw UblkError("\(what): \(error.description)")
        }
    }

    /// How the tree's object is fetched: the image's config, at the tree's URL when it has one.
    static func treeConfig(_ spec: VeritySpec, http: HTTPConfig) -> HTTPConfig {
        var config = http
        if let url = spec.tree, spec.treeIsURL {
            config.url = url
            config.mirrors = []  // the image's mirrors, not the tree's
        }
        return config
    }

    /// One Range GET into `fd` at the same offset, blocking (at `add`); the error, or nil.
    static func fetch(_ source: HTTPSource, into fd: Int32, offset: UInt64, length: Int) -> String? {
        var failure: String?
        var done = false
        source.fetch(offset: offset, length: length, onData: { at, bytes in
            let w = pwriteAll(fd, bytes.baseAddress!, bytes.count, at)
            if w < 0 { failure = "writing the verity tree's copy: \(Errno(returned: w))"; return false }
            return true
        }, completion: { result in
            if case .failure(let e) = result, failure == nil { failure = e.description }
            done = true
        })
        while !done { _ = source.runUntilIdle(timeout: 600) }
        return failure
    }

    /// The home's fetcher of the tree's other hash blocks (nil: a local tree file, complete).
    static func fetcher(_ spec: VeritySpec, http: HTTPConfig, cachePath: String, tree: VerityTree,
                        stats: CacheStats) throws(UblkError) -> TreeFetcher? {
        if spec.tree != nil && !spec.treeIsURL { return nil }
        var config = treeConfig(spec, http: http)
        config.maxAttempts = max(1, config.maxAttempts)
        let source: HTTPSource
        do { source = try HTTPSource(config: config, stats: stats) } catch { throw UblkError("the verity tree: \(error)") }
        return try TreeFetcher(source: source, path: VeritySpec.localCopy(cachePath: cachePath), tree: tree)
    }
}
