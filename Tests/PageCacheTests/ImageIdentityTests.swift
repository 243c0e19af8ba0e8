import XCTest
@testable import PageCache

/// An image's identity (what a cache's bitmaps record, default cache names
/// hash, an overlay finds its base by): the whole URL minus only what signs
/// or expires it, with no secret in clear.
final class ImageIdentityTests: XCTestCase {
    func id(_ u: String) -> String { ImageIdentity.of(u) }

    func testURLsThatDifferInAQueryValueAreDifferentImages() {
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://h/download?id=b"))
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://h/download?name=a"), "parameter name")
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://h/download?id=a&v=2"), "one parameter more")
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://h/download"), "no query")
        XCTAssertNotEqual(id("http://h/d?a=1&b=2"), id("http://h/d?b=2&a=1"), "order is kept, not sorted")
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://h/get?id=a"), "path")
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://g/download?id=a"), "host")
        XCTAssertNotEqual(id("http://h/download?id=a"), id("http://h:81/download?id=a"), "port")
        XCTAssertNotEqual(id("http://h/download?id=a"), id("https://h/download?id=a"), "scheme")
        XCTAssertNotEqual(id("http://u@h/download?id=a"), id("http://v@h/download?id=a"), "user")
        XCTAssertNotEqual(id("http://h/d?id=a#x"), id("http://h/d?id=a#y"), "fragment")
        // A signed URL's other parameters still choose the image.
        XCTAssertNotEqual(id("https://b.s3.amazonaws.com/d.img?versionId=1&X-Amz-Signature=S"),
                          id("https://b.s3.amazonaws.com/d.img?versionId=2&X-Amz-Signature=S"))
        XCTAssertNotEqual(id("https://a.blob.core.windows.net/c/d.img?snapshot=1&sv=2022-11-02&sig=S"),
                          id("https://a.blob.core.windows.net/c/d.img?snapshot=2&sv=2022-11-02&sig=S"))
        // Azure's short names choose the image where no SAS signature is.
        XCTAssertNotEqual(id("http://h/d?sp=1"), id("http://h/d?sp=2"))
        XCTAssertNotEqual(id("http://h/d?si=1&st=x"), id("http://h/d?si=2&st=x"))
        XCTAssertNotEqual(id("http://h/d?Policy=1"), id("http://h/d?Policy=2"), "Policy without Signature")
    }

    func testAURLSignedAgainIsTheSameImage() {
        // AWS SigV4 (query-string authentication), names in any case.
        let v4a = "https://bucket.s3.eu-west-1.amazonaws.com/disk.img?partNumber=1&X-Amz-Algorithm=AWS4-HMAC-SHA256"
            + "&X-Amz-Credential=AKIA1%2F20250101%2Feu-west-1%2Fs3%2Faws4_request&X-Amz-Date=20250101T000000Z"
            + "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=TOKEN1&X-Amz-Signature=SIG1"
        let v4b = "https://bucket.s3.eu-west-1.amazonaws.com/disk.img?partNumber=1&x-amz-algorithm=AWS4-HMAC-SHA256"
            + "&x-amz-credential=AKIA2%2F20250202%2Feu-west-1%2Fs3%2Faws4_request&x-amz-date=20250202T000000Z"
            + "&x-amz-expires=600&x-amz-signedheaders=host&x-amz-security-token=TOKEN2&x-amz-signature=SIG2"
        XCTAssertEqual(id(v4a), id(v4b))
        // AWS SigV2.
        XCTAssertEqual(id("https://b.s3.amazonaws.com/d.img?AWSAccessKeyId=K1&Expires=1&Signature=S1"),
                       id("https://b.s3.amazonaws.com/d.img?AWSAccessKeyId=K2&Expires=2&Signature=S2"))
        // Azure SAS: service SAS and user delegation SAS.
        let sasA = "https://acct.blob.core.windows.net/c/disk.img?sp=r&st=2025-01-01T00:00:00Z&se=2025-01-02T00:00:00Z"
            + "&spr=https&sv=2022-11-02&sr=b&sig=SIG1"
        let sasB = "https://acct.blob.core.windows.net/c/disk.img?sp=r&st=2025-02-01T00:00:00Z&se=2025-02-02T00:00:00Z"
            + "&sip=10.0.0.1&spr=https&sv=2023-01-03&sr=b&si=policy&sig=SIG2"
        let udSAS = "https://acct.blob.core.windows.net/c/disk.img?sv=2022-11-02&ss=b&srt=o&sp=r&se=2025-01-02T00:00:00Z"
            + "&skoid=O&sktid=T&skt=2025-01-01T00:00:00Z&ske=2025-01-02T00:00:00Z&sks=b&skv=2022-11-02"
            + "&sdd=1&ses=scope&saoid=A&suoid=U&scid=C&rscd=attachment&sig=SIG3"
        XCTAssertEqual(id(sasA), id(sasB))
        XCTAssertEqual(id(sasA), id(udSAS))
        // Google Cloud Storage V4 and V2.
        XCTAssertEqual(id("https://storage.googleapis.com/b/disk.img?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=C1"
                          + "&X-Goog-Date=20250101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=S1"),
                       id("https://storage.googleapis.com/b/disk.img?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=C2"
                          + "&X-Goog-Date=20250202T000000Z&X-Goog-Expires=60&X-Goog-SignedHeaders=host&X-Goog-Signature=S2"))
        XCTAssertEqual(id("https://storage.googleapis.com/b/disk.img?GoogleAccessId=G1&Expires=1&Signature=S1"),
                       id("https://storage.googleapis.com/b/disk.img?GoogleAccessId=G2&Expires=2&Signature=S2"))
        // CloudFront, canned and custom policy; generic Expires/Signature.
        XCTAssertEqual(id("https://d.cloudfront.net/disk.img?Expires=1&Signature=S1&Key-Pair-Id=K1"),
                       id("https://d.cloudfront.net/disk.img?Policy=P2&Signature=S2&Key-Pair-Id=K2"))
        XCTAssertEqual(id("http://h/download?id=a&Expires=1&Signature=S1"), id("http://h/download?id=a&Expires=2&Signature=S2"))
        // Only signing parameters: the image is the URL without them.
        XCTAssertEqual(id("https://storage.googleapis.com/b/disk.img?X-Goog-Signature=S1"), "https://storage.googleapis.com/b/disk.img")
        // The password authenticates, it does not choose the image.
        XCTAssertEqual(id("http://u:pw1@h/download?id=a"), id("http://u:pw2@h/download?id=a"))
    }

    func testNoSecretIsInTheIdentity() {
        let urls = [
            "http://u:PASSWORD1@h/download?id=VALUE1&X-Amz-Signature=SIGNATURE1",
            "https://acct.blob.core.windows.net/c/d.img?token=VALUE2&sv=2022-11-02&sig=SIGNATURE2",
            "https://h/d?VALUE3&key=VALUE4",
            "http://u:PASSWORD2@h/d.img",
            "https://b.s3.amazonaws.com/d.img?X-Amz-Credential=AKIAVALUE5&X-Amz-Signature=SIGNATURE3",
        ]
        for u in urls {
            let i = id(u)
            for secret in ["PASSWORD", "VALUE", "SIGNATURE"] {
                XCTAssertFalse(i.contains(secret), "\(i) shows \(secret)")
            }
        }
        let digest = String(id("http://h/download?id=a").split(separator: "#").last!)
        XCTAssertTrue(digest.hasPrefix("sha256="))
        XCTAssertEqual(digest.dropFirst(7).count, 32)
        XCTAssertTrue(digest.dropFirst(7).allSatisfy { $0.isHexDigit && !$0.isUppercase })
    }

    func testTheFormIsTheRedactedURLAndADigestOfTheCanonicalURL() {
        XCTAssertEqual(ImageIdentity.sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(id("https://h/download?id=a"),
                       "https://h/download?id=REDACTED#sha256=" + ImageIdentity.sha256Hex("https://h/download?id=a").prefix(32))
        // Signing parameters and the password out of both parts; the fragment only in the digest.
        XCTAssertEqual(id("https://u:pw@h/download?X-Amz-Date=D&id=a&&Signature=S#f"),
                       "https://u:REDACTED@h/download?id=REDACTED#sha256=" + ImageIdentity.sha256Hex("https://u@h/download?id=a#f").prefix(32))
    }

    func testAPlainURLIsItsOwnIdentityAsBefore() {
        // Caches of URLs with no query and no password keep their identity.
        for u in ["http://127.0.0.1:8080/disk.img", "https://images.example.com/a/b/disk-1.2.img", "s3://bucket/key/disk.img",
                  "http://h/disk.img#part", "http://user@h/disk.img"] {
            XCTAssertEqual(id(u), u)
        }
        XCTAssertEqual(id("http://u:secret@h/disk.img"), "http://u:REDACTED@h/disk.img")
    }

    /// A cache recorded under the earlier identity (every query value
    /// redacted) cannot tell which URL filled it: it starts afresh, or with
    /// local writes in it is refused, and the message says why.
    func testACacheUnderTheEarlierIdentityIsNotReusedAndTheMessageSaysWhy() throws {
        let dir = TempDir()
        let url = "http://h/download?id=a"
        let size: UInt64 = 64 << 10
        func spec(_ name: String, identity: String, writable: Bool) -> CacheStoreSpec {
            var s = CacheStoreSpec(cachePath: dir.file(name + ".cache"), bitmapPath: dir.file(name + ".bitmap"),
                                   identity: BitmapIdentity(pageSize: 4096, imageSize: size, url: identity, etag: "\"e\""))
            s.dirty = writable ? .open : .none
            s.local = writable ? .open : .none
            return s
        }
        func fill(_ name: String, written: Bool) throws {
            let store = try CacheStore.open(spec(name, identity: Redact.url(url), writable: written))
            let page = [UInt8](repeating: 7, count: 4096)
            try page.withUnsafeBytes { try store.cache.write($0, at: 0) }
            store.present.markPresent(0..<1)
            if written { store.local?.markPresent(0..<1); store.dirty?.markPresent(0..<1) }
            try store.present.commit(syncing: store.cache)
            try store.local?.commit(syncing: store.cache)
            try store.dirty?.commit(syncing: store.cache)
        }
        let why = "the remote image is named differently now: by its URL minus what signs it, where every query value used to be redacted "
            + "(http://h/download?id=REDACTED is now \(ImageIdentity.of(url)))"
        try fill("ro", written: false)
        let s = try CacheStore.open(spec("ro", identity: ImageIdentity.of(url), writable: false))
        XCTAssertEqual(s.state, .startedAfresh(why))
        XCTAssertEqual(s.present.count, 0)

        try fill("rw", written: true)
        XCTAssertThrowsError(try CacheStore.open(spec("rw", identity: ImageIdentity.of(url), writable: true))) { error in
            let text = "\(error)"
            XCTAssertTrue(text.hasPrefix(why + ", but the cache holds 1 locally written page"), text)
            XCTAssertFalse(text.contains("\n"))
        }
        XCTAssertTrue(ImageIdentity.isEarlierForm("https://b/d.img?X-Amz-Signature=REDACTED", of: ImageIdentity.of("https://b/d.img?X-Amz-Signature=S")))
        XCTAssertFalse(ImageIdentity.isEarlierForm("http://h/other?id=REDACTED", of: ImageIdentity.of(url)))
    }
}
