// HTTPVerity: where a verified http device's hash tree comes from
// (`--verity-root` with `--verity-tree URL|FILE` and/or `--verity-offset`),
// and the checks that the tree fits the image. What is checked against it,
// and when: CachingVerify.swift; the tree's format: PageCache/VerityTree.swift.
//
// SOURCES.
//   - a local FILE: read in place, the superblock at --verity-offset (0);
//   - a URL: downloaded whole at `add` (from --verity-offset to the object's
//     end) to `<cache>.verity`, beside the cache; a copy there whose top
//     verifies against the root is used again without a download (the
//     device then also starts with the remote down, as a complete cache does);
//   - neither: the tree is appended to the image at --verity-offset
//     (`veritysetup format IMG IMG --hash-offset N --data-blocks K`): the
//     image's bytes from there are downloaded as above, and the device is
//     the data part only (K blocks).
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
        guard let root = VerityTree.hex(spec.rootHex), root.count >= 16 else {
            throw UblkError("--verity-root must be the root hash veritysetup printed (hex digits), not '\(Redact.printable(spec.rootHex))'")
        }
        _ = root  // its length is checked against the tree's algorithm by VerityTree
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

    /// The tree from the local copy when it verifies, else downloaded anew.
    static func downloaded(_ spec: VeritySpec, http: HTTPConfig, remote: RemoteImage?, cachePath: String) throws(UblkError) -> VerityTree {
        let copy = VeritySpec.localCopy(cachePath: cachePath)
        let fd = open(copy, O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            if let t = try? VerityTree(fd: fd, owns: true, hashOffset: 0, rootHex: spec.rootHex) { return t }
            close(fd)
        }
        var config = http
        let what: String
        var from = spec.offset ?? 0
        let end: UInt64
        if let url = spec.tree {
            config.url = url
            what = "--verity-tree \(Redact.url(url))"
            let probe: RemoteImage
            do { probe = try HTTPSource(config: config).probeBlocking() } catch {
                throw UblkError("\(what): \(error.description)")
            }
            end = probe.size
        } else {
            guard let r = remote else { throw UblkError("the image's verity tree cannot be fetched: the remote is unreachable") }
            what = "the verity tree in the image at \(from)"
            end = r.size
        }
        guard from < end else { throw UblkError("\(what): nothing at offset \(from) (the object has \(end) bytes)") }
        let tmp = copy + ".tmp"
        let out = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard out >= 0 else { throw UblkError("cannot create \(tmp): \(Errno.current)") }
        let source: HTTPSource
        do { source = try HTTPSource(config: config) } catch {
            close(out)
            throw UblkError("\(what): \(error.description)")
        }
        var failure: String?
        var writeFailed = false
        var done = false
        while from < end && failure == nil {
            // In pieces of at most 64 MiB (one Range GET each).
            let length = Int(min(end - from, 64 << 20))
            let base = spec.offset ?? 0
            done = false
            source.fetch(offset: from, length: length, onData: { offset, bytes in
                var o = 0
                while o < bytes.count {
                    let n = pwrite(out, bytes.baseAddress! + o, bytes.count - o, off_t(offset - base) + off_t(o))
                    if n <= 0 { writeFailed = true; return false }
                    o += n
                }
                return true
            }, completion: { result in
                if case .failure(let e) = result { failure = writeFailed ? "writing \(tmp) failed" : e.description }
                done = true
            })
            while !done { _ = source.runUntilIdle(timeout: 600) }
            from += UInt64(length)
        }
        if let f = failure {
            close(out)
            unlink(tmp)
            throw UblkError("\(what): \(f)")
        }
        guard fsync(out) == 0, rename(tmp, copy) == 0 else {
            let e = Errno.current
            close(out)
            unlink(tmp)
            throw UblkError("cannot keep the verity tree in \(copy): \(e)")
        }
        do { return try VerityTree(fd: out, owns: true, hashOffset: 0, rootHex: spec.rootHex) } catch {
            throw UblkError("\(what): \(error.description)")
        }
    }
}
