// VerityTree: an image's dm-verity hash tree, as `veritysetup format` writes
// it (cryptsetup's format, the one the kernel's dm-verity reads), and the
// check of a data block against it. The contract:
//
// TRUST. The root digest (`--verity-root`) is the one trusted value. Every
// other byte (the superblock with its salt, algorithm and block sizes, every
// hash block) comes from a file or a server that may lie, and is believed only
// once it hashes, level by level, up to the root: a hash block is used only
// after its digest matched the entry of its parent (the top block: the root).
// A data block is good when its digest matches its entry in a verified
// level-0 block. A lying superblock (another salt, block size or block count)
// makes the top block's digest differ from the root, so nothing verifies.
//
// LAYOUT (cryptsetup lib/verity, the kernel's drivers/md/dm-verity-target.c):
//   - the superblock (512 bytes, little-endian, "verity\0\0") at the hash
//     offset; the tree starts at the next hash block boundary after it;
//   - `levels`: the least L with hashPerBlock^L >= data blocks (0 for one block:
//     the root is that block's digest); hashPerBlock = the largest power of
//     two <= hashBlockSize / digestSize;
//   - the top level first, then down to level 0; level i holds
//     ceil(dataBlocks / hashPerBlock^(i+1)) blocks;
//   - an entry: digest i of a block at i * (hashBlockSize / hashPerBlock)
//     (format 1: each digest in a power-of-two slot; format 0, Chrome OS:
//     packed, i * digestSize);
//   - a digest: H(salt || block) (format 1) or H(block || salt) (format 0).
//
// MEMORY. Verified hash blocks are kept, up to `cacheBlocks` of them (oldest
// out first; an evicted block is read and verified again when next needed,
// its parents usually still kept). Nothing else grows with the image.
//
// THREADS. One owner: the device's home queue (fetches, first reads, the
// scrub) or the thread that made it. Hash blocks are read with pread from a
// local file (the tree given, or the copy `add` downloaded).
import CLibcrypto
import Glibc

public struct VerityError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ d: String) { description = d }
}

/// What veritysetup's superblock says about a tree (none of it trusted: see the file's header).
public struct VerityParams: Equatable, Sendable {
    /// 1: normal (salt first); 0: Chrome OS (salt last, digests packed).
    public var hashType: UInt32
    public var algorithm: String
    public var dataBlockSize: Int
    public var hashBlockSize: Int
    public var dataBlocks: UInt64
    public var salt: [UInt8]
    /// Where the superblock is, in the tree's file (veritysetup's --hash-offset).
    public var hashOffset: UInt64

    public static let superblockSize = 512

    /// Parses the superblock at `hashOffset` (its 512 bytes in `sb`).
    public static func parse(superblock sb: [UInt8], hashOffset: UInt64) throws(VerityError) -> VerityParams {
        guard sb.count >= superblockSize else { throw VerityError("the tree is shorter than its superblock") }
        guard sb[0..<8].elementsEqual(Array("verity".utf8) + [0, 0]) else {
            throw VerityError("no verity superblock at offset \(hashOffset) (make the tree with veritysetup format, with its superblock)")
        }
        func u32(_ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(sb[o + $1]) << (8 * $1) } }
        func u64(_ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(sb[o + $1]) << (8 * $1) } }
        guard u32(8) == 1 else { throw VerityError("verity superblock version \(u32(8)) is not supported (1 is)") }
        let hashType = u32(12)
        guard hashType <= 1 else { throw VerityError("verity hash type \(hashType) is not supported (0 or 1)") }
        let name = sb[32..<64].prefix { $0 != 0 }
        let algorithm = String(decoding: name, as: UTF8.self)
        let dbs = Int(u32(64)), hbs = Int(u32(68))
        for (what, size) in [("data", dbs), ("hash", hbs)] {
            guard size >= 512, size <= 1 << 20, size.nonzeroBitCount == 1 else {
                throw VerityError("verity \(what) block size \(size) is not a power of two between 512 and 1M")
            }
        }
        let saltSize = Int(sb[80]) | Int(sb[81]) << 8
        guard saltSize <= 256 else { throw VerityError("verity salt of \(saltSize) bytes (at most 256)") }
        let blocks = u64(72)
        guard blocks > 0 else { throw VerityError("the verity tree covers no data block") }
        return VerityParams(hashType: hashType, algorithm: algorithm, dataBlockSize: dbs, hashBlockSize: hbs,
                            dataBlocks: blocks, salt: Array(sb[88..<88 + saltSize]), hashOffset: hashOffset)
    }

    /// The data the tree covers, in bytes.
    public var dataBytes: UInt64 { dataBlocks * UInt64(dataBlockSize) }
    /// Where the tree's first hash block is, in its file.
    public var treeStart: UInt64 {
        let h = UInt64(hashBlockSize)
        return (hashOffset + UInt64(VerityParams.superblockSize) + h - 1) / h * h
    }
}

/// A digest algorithm of libcrypto's, reused for many digests (one owner).
public final class VerityDigest {
    let ctx: UnsafeMutableRawPointer
    public let size: Int

    public init(_ algorithm: String) throws(VerityError) {
        guard let c = algorithm.withCString({ clibcrypto_digest_new($0) }) else {
            throw VerityError("hash algorithm \"\(algorithm)\" is unknown to libcrypto")
        }
        ctx = c
        size = Int(clibcrypto_digest_size(c))
    }
    deinit { clibcrypto_digest_free(ctx) }

    public func reset() { precondition(clibcrypto_digest_reset(ctx) == 0, "libcrypto: digest init failed") }
    public func update(_ b: UnsafeRawBufferPointer) {
        guard let p = b.baseAddress, b.count > 0 else { return }
        precondition(clibcrypto_digest_update(ctx, p, b.count) == 0, "libcrypto: digest update failed")
    }
    public func update(_ b: [UInt8]) { b.withUnsafeBytes { update($0) } }
    public func final(into out: inout [UInt8]) {
        if out.count != size { out = [UInt8](repeating: 0, count: size) }
        let ok = out.withUnsafeMutableBytes { clibcrypto_digest_final(ctx, $0.baseAddress!.assumingMemoryBound(to: UInt8.self)) }
        precondition(ok == 0, "libcrypto: digest final failed")
    }
}

/// A tree and the checks against it (see the file's header).
public final class VerityTree {
    public let params: VerityParams
    public let root: [UInt8]
    public let levels: Int
    let hashPerBlockBits: Int
    /// Bytes between entries in a hash block.
    let entryStride: Int
    /// Each level's first block, counted in hash blocks from `params.treeStart`.
    let levelStart: [UInt64]
    /// Where the tree ends, in its file (hash blocks after it are not read).
    public let treeEnd: UInt64
    let fd: Int32
    let ownsFD: Bool
    let digest: VerityDigest
    /// Verified hash blocks by absolute block number, and their insertion order.
    private var cache: [UInt64: [UInt8]] = [:]
    private var order: [UInt64] = []
    private var orderHead = 0
    public let cacheBlocks: Int
    private var scratch: [UInt8]
    var computed: [UInt8]
    /// Hash blocks read from the file, and found not to verify (counters for tests and `stats`).
    public private(set) var hashBlocksRead: UInt64 = 0
    public private(set) var hashBlockFailures: UInt64 = 0

    /// `rootHex`: the trusted root digest. `fd`: the tree's file, with the
    /// superblock at `hashOffset` (the tree takes ownership when `owns`).
    /// Fails when the superblock is missing or bad, the file is shorter than
    /// the tree, or the tree's top does not hash to the root.
    public init(fd: Int32, owns: Bool = false, hashOffset: UInt64, rootHex: String,
                cacheBlocks: Int = 2048) throws(VerityError) {
        self.fd = fd
        ownsFD = owns
        var sb = [UInt8](repeating: 0, count: VerityParams.superblockSize)
        let n = sb.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(hashOffset)) }
        if n < 0 { throw VerityError("cannot read the verity tree: \(String(cString: strerror(errno)))") }
        let p = try VerityParams.parse(superblock: Array(sb.prefix(max(n, 0))), hashOffset: hashOffset)
        params = p
        digest = try VerityDigest(p.algorithm)
        guard let r = VerityTree.hex(rootHex), r.count == digest.size else {
            throw VerityError("--verity-root must be the \(digest.size * 2) hex digits of a \(p.algorithm) digest")
        }
        root = r
        var bits = 0
        while (1 << (bits + 1)) <= p.hashBlockSize / digest.size { bits += 1 }
        guard bits > 0 else { throw VerityError("a \(p.hashBlockSize)-byte hash block holds no \(p.algorithm) digest") }
        hashPerBlockBits = bits
        entryStride = p.hashType == 0 ? digest.size : p.hashBlockSize >> bits
        var lv = 0
        while bits * lv < 64 && (p.dataBlocks - 1) >> UInt64(bits * lv) != 0 { lv += 1 }
        levels = lv
        var starts = [UInt64](repeating: 0, count: lv)
        var position: UInt64 = 0
        for i in stride(from: lv - 1, through: 0, by: -1) {
            starts[i] = position
            let shift = UInt64((i + 1) * bits)
            guard shift < 64 else { throw VerityError("the verity tree is too deep") }
            position += (p.dataBlocks + (UInt64(1) << shift) - 1) >> shift
        }
        levelStart = starts
        treeEnd = p.treeStart + position * UInt64(p.hashBlockSize)
        self.cacheBlocks = max(cacheBlocks, lv + 1)
        scratch = [UInt8](repeating: 0, count: p.hashBlockSize)
        computed = [UInt8](repeating: 0, count: digest.size)
        var st = stat()
        guard fstat(fd, &st) == 0, UInt64(st.st_size) >= treeEnd else {
            throw VerityError("the verity tree is truncated: it needs \(treeEnd) bytes, the file has \(st.st_size)")
        }
        if lv > 0 && topBlock() == nil {
            throw VerityError("the verity tree does not match --verity-root (its top hash block hashes to another digest)")
        }
    }

    deinit { if ownsFD { close(fd) } }

    /// The bytes of `hex` (an even number of hex digits), or nil.
    public static func hex(_ hex: String) -> [UInt8]? {
        let u = Array(hex.utf8)
        guard u.count % 2 == 0, !u.isEmpty else { return nil }
        func v(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: return c - 48
            case 97...102: return c - 87
            case 65...70: return c - 55
            default: return nil
            }
        }
        var out: [UInt8] = []
        out.reserveCapacity(u.count / 2)
        var i = 0
        while i < u.count {
            guard let a = v(u[i]), let b = v(u[i + 1]) else { return nil }
            out.append(a << 4 | b)
            i += 2
        }
        return out
    }

    public var dataBlockSize: Int { params.dataBlockSize }
    /// The bytes of the tree's memory at most: its verified hash blocks.
    public var memoryBytes: Int { cacheBlocks * params.hashBlockSize }

    /// The digest of `block` (bytes of one data or hash block) as the tree makes it.
    func hash(_ block: UnsafeRawBufferPointer, into out: inout [UInt8]) {
        digest.reset()
        if params.hashType == 1 { digest.update(params.salt) }
        digest.update(block)
        if params.hashType == 0 { digest.update(params.salt) }
        digest.final(into: &out)
    }

    func topBlock() -> [UInt8]? { verifiedHashBlock(level: levels - 1, index: 0) }

    /// Hash block `index` of `level`, read and verified up to the root; nil
    /// when it cannot be read or does not verify.
    func verifiedHashBlock(level: Int, index: UInt64) -> [UInt8]? {
        let abs = levelStart[level] + index
        if let b = cache[abs] { return b }
        let hbs = params.hashBlockSize
        let at = params.treeStart + abs * UInt64(hbs)
        let n = scratch.withUnsafeMutableBytes { pread(fd, $0.baseAddress, hbs, off_t(at)) }
        hashBlocksRead += 1
        guard n == hbs else { hashBlockFailures += 1; return nil }
        let block = scratch
        // Its own digest (not `computed`: that holds the data block's being checked, and the parents' turn comes next).
        var mine = [UInt8](repeating: 0, count: digest.size)
        block.withUnsafeBytes { hash($0, into: &mine) }
        let ok: Bool
        if level == levels - 1 {
            ok = index == 0 && mine == root
        } else if let parent = verifiedHashBlock(level: level + 1, index: index >> UInt64(hashPerBlockBits)) {
            ok = entryMatches(parent, index & ((1 << UInt64(hashPerBlockBits)) - 1), mine)
        } else {
            ok = false
        }
        guard ok else { hashBlockFailures += 1; return nil }
        remember(abs, block)
        return block
    }

    /// `d` equals entry `i` of the hash block `parent`.
    private func entryMatches(_ parent: [UInt8], _ i: UInt64, _ d: [UInt8]) -> Bool {
        let o = Int(i) * entryStride
        return parent.withUnsafeBytes { p in
            d.withUnsafeBytes { c in memcmp(p.baseAddress! + o, c.baseAddress!, digest.size) == 0 }
        }
    }

    private func remember(_ abs: UInt64, _ block: [UInt8]) {
        if order.count < cacheBlocks {
            order.append(abs)
        } else {
            cache[order[orderHead]] = nil
            order[orderHead] = abs
            orderHead = (orderHead + 1) % order.count
        }
        cache[abs] = block
    }

    /// The digest `computed` holds is data block `block`'s, as the tree says.
    func matchesData(_ block: UInt64) -> Bool {
        guard block < params.dataBlocks else { return false }
        if levels == 0 { return computed == root }
        guard let leaf = verifiedHashBlock(level: 0, index: block >> UInt64(hashPerBlockBits)) else { return false }
        return entryMatches(leaf, block & ((1 << UInt64(hashPerBlockBits)) - 1), computed)
    }

    /// `data` (one data block's bytes) is data block `block` of the image.
    public func check(block: UInt64, data: UnsafeRawBufferPointer) -> Bool {
        precondition(data.count == params.dataBlockSize, "a data block has \(params.dataBlockSize) bytes")
        hash(data, into: &computed)
        return matchesData(block)
    }

    /// Checks the data blocks in `bytes`, which start at the image's byte
    /// `offset` (a multiple of the data block size; whole blocks): the first
    /// block that fails, or nil when all are good.
    public func firstBad(offset: UInt64, bytes: UnsafeRawBufferPointer) -> UInt64? {
        let dbs = params.dataBlockSize
        var b = offset / UInt64(dbs)
        var o = 0
        while o + dbs <= bytes.count {
            if !check(block: b, data: UnsafeRawBufferPointer(rebasing: bytes[o..<o + dbs])) { return b }
            b += 1
            o += dbs
        }
        return nil
    }

    // MARK: A tree fetched on demand

    /// The hash blocks (absolute numbers, ascending) that data blocks `blocks`
    /// need and that do not verify now: on each path to the root, the blocks
    /// from the highest one that does not verify down to level 0. Empty: every
    /// one of those data blocks can be checked. (A tree whose file is filled on
    /// demand: a block not fetched yet reads as zeros, and does not verify.)
    public func missing(forData blocks: Range<UInt64>) -> [UInt64] {
        guard levels > 0, !blocks.isEmpty else { return [] }
        let bits = UInt64(hashPerBlockBits)
        var out = Set<UInt64>()
        var leaf = blocks.lowerBound >> bits
        let lastLeaf = (min(blocks.upperBound, params.dataBlocks) - 1) >> bits
        while leaf <= lastLeaf {
            if verifiedHashBlock(level: 0, index: leaf) == nil {
                var l = levels - 1
                while l > 0 && verifiedHashBlock(level: l, index: leaf >> (bits * UInt64(l))) != nil { l -= 1 }
                for k in 0...l { out.insert(levelStart[k] + (leaf >> (bits * UInt64(k)))) }
            }
            leaf += 1
        }
        return out.sorted()
    }

    /// Where hash block `abs` is in the tree's file: its byte offset (its length is `params.hashBlockSize`).
    public func offset(ofHashBlock abs: UInt64) -> UInt64 { params.treeStart + abs * UInt64(params.hashBlockSize) }

    /// The top hash block's number (what `add` fetches with the superblock).
    public static func topBlockOffset(_ p: VerityParams) -> UInt64 { p.treeStart }

    /// A stream of one fetch's bytes, checked block by block as they arrive.
    public func stream(from offset: UInt64) -> VerityStream { VerityStream(tree: self, offset: offset) }
}

/// Bytes of the image arriving in order from `offset` (a data block
/// boundary), hashed as they come: each block is checked once its last byte
/// is in. One owner, as its tree.
public final class VerityStream {
    let tree: VerityTree
    let digest: VerityDigest
    /// The block being hashed, and how many of its bytes are in.
    public private(set) var block: UInt64
    var filled = 0
    /// The first block that did not verify (then the stream takes nothing more).
    public private(set) var failed: UInt64?
    /// After a `feed` that failed: how many of its bytes come before the block
    /// that failed (they belong to blocks that verified, or to one not complete).
    public private(set) var goodBytes = 0

    init(tree: VerityTree, offset: UInt64) {
        self.tree = tree
        // A digest of its own: the tree's is used to check the hash blocks.
        digest = try! VerityDigest(tree.params.algorithm)
        block = offset / UInt64(tree.dataBlockSize)
        begin()
    }

    private func begin() {
        digest.reset()
        if tree.params.hashType == 1 { digest.update(tree.params.salt) }
        filled = 0
    }

    /// Adds `bytes` (the next ones of the stream); false once a block failed.
    public func feed(_ bytes: UnsafeRawBufferPointer) -> Bool {
        if failed != nil { return false }
        let dbs = tree.dataBlockSize
        var o = 0
        while o < bytes.count {
            let n = min(dbs - filled, bytes.count - o)
            digest.update(UnsafeRawBufferPointer(rebasing: bytes[o..<o + n]))
            filled += n
            o += n
            if filled == dbs {
                if tree.params.hashType == 0 { digest.update(tree.params.salt) }
                digest.final(into: &tree.computed)
                if !tree.matchesData(block) {
                    failed = block
                    goodBytes = max(0, o - dbs)
                    return false
                }
                block += 1
                begin()
            }
        }
        return true
    }

    /// Bytes of the image checked so far, from the stream's start offset on: up to here.
    public var checkedUpTo: UInt64 { block * UInt64(tree.dataBlockSize) }
}
