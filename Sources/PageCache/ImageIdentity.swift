// ImageIdentity: the string that names a remote image (bitmaps, `status`,
// default cache file names, overlays, boot profiles): the URL minus what
// signs or expires it, with no secret in clear. The type's comment is the
// contract.
import CLibcrypto

/// What names a remote image: the string a cache's bitmaps record, `status`
/// prints, default cache file names hash, an overlay finds its base by and a
/// boot profile records. It is the whole URL minus only what signs or
/// expires it, so that
/// - URLs that differ in anything else (scheme, user, host, port, path, a
///   query parameter's name or value, the fragment) are different images,
///   with their own caches: `/download?id=a` is never served from the cache
///   of `/download?id=b`;
/// - a presigned URL signed again (new signature, date, expiry, credential)
///   is the same image and finds its cache; whether the object itself changed
///   is what its ETag and Last-Modified say.
///
/// FORM. No secret is in clear in it:
/// - a URL with no query left (once the signing parameters are out): the URL
///   as `Redact.url` shows it (a password as REDACTED). A plain URL is its own
///   identity, as it always was, so caches of plain URLs stay valid;
/// - otherwise: the URL as `Redact.url` shows it (query values REDACTED, the
///   fragment left out) plus `#sha256=` and the first 32 hex digits (128
///   bits) of the SHA-256 of the canonical URL: the URL with the signing
///   parameters and the password left out, every other parameter with its
///   value, in the order given (order is kept, not sorted: a server may read
///   `id=1&id=2` differently from `id=2&id=1`), fragment included. Empty
///   pairs (`&&`) are dropped. The password is in neither part: a password
///   authenticates, it does not choose the image.
///
/// SIGNING PARAMETERS (names compared case-insensitively, not percent-decoded):
/// - always: `X-Amz-*` (AWS SigV4, incl. X-Amz-Security-Token), `X-Goog-*`
///   (Google Cloud Storage V4), `Expires` and `Signature` (AWS SigV2,
///   CloudFront, GCS V2);
/// - with a `Signature` parameter present: `AWSAccessKeyId` (AWS SigV2),
///   `GoogleAccessId` (GCS V2), `Key-Pair-Id` and `Policy` (CloudFront);
/// - with a `sig` parameter present (an Azure SAS token always has one): the
///   Azure Storage SAS fields, from the account, service and user delegation
///   SAS parameter tables:
///   https://learn.microsoft.com/rest/api/storageservices/create-account-sas
///   https://learn.microsoft.com/rest/api/storageservices/create-service-sas
///   https://learn.microsoft.com/rest/api/storageservices/create-user-delegation-sas
///   These names are short and common (`sp`, `st`, `si`, `sr`...), so they
///   leave the identity only in a URL signed that way: elsewhere they may
///   well choose the image. Azure's `snapshot` and `versionid` are not SAS
///   fields: they choose the blob, and stay.
public enum ImageIdentity {
    /// The identity of the image at `url` (see the type).
    public static func of(_ url: String) -> String {
        let p = split(url)
        guard let query = p.query else { return Redact.url(url) }
        let kept = keptPairs(query)
        if kept.isEmpty {
            // Only signing parameters (or none): the URL without its query.
            return Redact.url(p.authority + p.path + (p.fragment.map { "#" + $0 } ?? ""))
        }
        let q = "?" + kept.joined(separator: "&")
        let canonical = p.authorityWithoutPassword + p.path + q + (p.fragment.map { "#" + $0 } ?? "")
        return Redact.url(p.authority + p.path + q) + "#sha256=" + sha256Hex(canonical).prefix(32)
    }

    /// Whether `old` is the identity an earlier version recorded for the image
    /// now named `new`: every query value redacted, no digest. Such a cache
    /// cannot tell which of the URLs that differ only in a query value filled
    /// it, so it is not reused; this only lets a message say why.
    public static func isEarlierForm(_ old: String, of new: String) -> Bool {
        old != new && (new.hasPrefix(old + "#sha256=") || of(old) == new)
    }

    /// Whether the query parameter `name` signs or expires a URL whose
    /// parameter names (lowercased) are `names`.
    static func isSigning(_ name: Substring, among names: Set<String>) -> Bool {
        let n = name.lowercased()
        if n.hasPrefix("x-amz-") || n.hasPrefix("x-goog-") || n == "expires" || n == "signature" { return true }
        if names.contains("signature") && signatureCompanions.contains(n) { return true }
        if names.contains("sig") && azureSAS.contains(n) { return true }
        return false
    }

    static let signatureCompanions: Set<String> = ["awsaccesskeyid", "googleaccessid", "key-pair-id", "policy"]

    /// Azure Storage SAS fields: version, services, resource types, resource,
    /// permissions, start, expiry, IP range, protocol, policy identifier,
    /// signature, directory depth, encryption scope, the user delegation
    /// key's fields (skoid, sktid, skt, ske, sks, skv, skdutid), the
    /// authorized/unauthorized/delegated user and correlation ids, and the
    /// response header overrides a SAS signs (rscc, rscd, rsce, rscl, rsct).
    static let azureSAS: Set<String> = [
        "sv", "ss", "srt", "sr", "sp", "st", "se", "sip", "spr", "si", "sig", "sdd", "ses",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "skdutid",
        "saoid", "suoid", "sduoid", "scid",
        "rscc", "rscd", "rsce", "rscl", "rsct",
    ]

    /// The query's pairs that are not signing parameters, in order; empty pairs dropped.
    static func keptPairs(_ query: Substring) -> [Substring] {
        let pairs = query.split(separator: "&", omittingEmptySubsequences: true)
        let names = Set(pairs.map { name(of: $0).lowercased() })
        return pairs.filter { !isSigning(name(of: $0), among: names) }
    }

    static func name(of pair: Substring) -> Substring {
        pair.firstIndex(of: "=").map { pair[..<$0] } ?? pair
    }

    struct Parts {
        /// `scheme://userinfo@host:port` as given ("" when not a scheme:// URL).
        var authority: Substring
        /// The same with the password (`:...` in the userinfo) left out.
        var authorityWithoutPassword: String
        var path: Substring
        var query: Substring?
        var fragment: Substring?
    }

    /// The URL's parts, found the way `Redact.url` finds them.
    static func split(_ u: String) -> Parts {
        var rest = Substring(u)
        var authority = rest[rest.startIndex..<rest.startIndex]
        var bare = ""
        if let colon = rest.firstIndex(of: ":"), rest[colon...].hasPrefix("://"),
           !rest[..<colon].contains(where: { $0 == "/" || $0 == "?" }) {
            let hostStart = rest.index(colon, offsetBy: 3)
            let end = rest[hostStart...].firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
            authority = rest[..<end]
            bare = String(rest[..<hostStart])
            let hostPart = rest[hostStart..<end]
            if let at = hostPart.lastIndex(of: "@") {
                let user = hostPart[..<at]
                bare += (user.firstIndex(of: ":").map { user[..<$0] } ?? user) + hostPart[at...]
            } else {
                bare += hostPart
            }
            rest = rest[end...]
        }
        var fragment: Substring?
        if let hash = rest.firstIndex(of: "#") {
            fragment = rest[rest.index(after: hash)...]
            rest = rest[..<hash]
        }
        var query: Substring?
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        return Parts(authority: authority, authorityWithoutPassword: bare, path: rest, query: query, fragment: fragment)
    }

    /// SHA-256 (OpenSSL's libcrypto) as 64 lowercase hex digits.
    public static func sha256Hex(_ s: String) -> String {
        var out = [UInt8](repeating: 0, count: 32)
        let ok = Array(s.utf8).withUnsafeBytes { b in clibcrypto_sha256(b.baseAddress, b.count, &out) } == 0
        // EVP_Digest fails only when it cannot allocate its context (out of
        // memory, where Swift traps too); no identity would be right then.
        precondition(ok, "libcrypto's SHA-256 failed")
        return out.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }
}
