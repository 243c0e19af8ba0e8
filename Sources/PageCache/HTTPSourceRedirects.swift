// HTTPSource, redirects: each hop a request of its own, and which hops get
// the credentials.
//
// Contract:
// - Redirects (301, 302, 303, 307, 308; at most `maxRedirects`) are followed
//   here, hop by hop, not by curl: each hop is a request of its own, to the
//   Location curl resolved (CURLINFO_REDIRECT_URL), http or https only. The
//   credentials (headers, user and password, a user in the URL, S3 signing)
//   go only to the URL's origin (scheme, host and port): a hop elsewhere,
//   https to http included, is sent without them (`RedirectCredentials.drop`,
//   the default) or refused (`.refuse`, `.redirectRefused`, not retried);
//   once dropped they stay off for the rest of the attempt. Every request and
//   every retry starts again at the URL: the final URL is never remembered
//   (a presigned redirect target may expire; the probe's `effectiveURL` is
//   for display only).
import CCurl

extension HTTPSource {
    /// Follows a 3xx to `next` (already absolute) as the next hop of `t`'s
    /// attempt, or returns why not. A hop to another origin than the URL's
    /// (scheme, host or port differ; so https to http too) goes without the
    /// credentials (`.drop`), or is refused (`.refuse`) while they are attached;
    /// once dropped they stay off for the rest of the attempt.
    func redirect(_ t: Transfer, to next: String) -> HTTPError.Reason? {
        if t.hops >= config.maxRedirects { return .tooManyRedirects }
        guard let to = HTTPSource.origin(next), to.scheme == "http" || to.scheme == "https" else {
            return .redirectRefused("\(Redact.url(next)) is not an http(s) URL")
        }
        if t.credentials && credentialed && to != HTTPSource.origin(mirrors[t.mirror].url) {
            switch config.redirectCredentials {
            case .refuse:
                return .redirectRefused("\(Redact.url(next)) is another origin than the URL's (scheme, host or port) "
                                        + "and the request carries credentials")
            case .drop:
                t.credentials = false
            }
        }
        t.target = next
        t.hops += 1
        start(t, hop: true)
        return nil
    }

    /// A URL's scheme, host and port (the default port when none is written),
    /// lowercased, as curl's URL parser reads them; nil when it does not parse.
    static func origin(_ u: String) -> Origin? {
        guard let h = curl_url() else { return nil }
        defer { curl_url_cleanup(h) }
        guard curl_url_set(h, CURLUPART_URL, u, 0) == CURLUE_OK else { return nil }
        func part(_ what: CURLUPart, _ flags: UInt32) -> String? {
            var out: UnsafeMutablePointer<CChar>?
            guard curl_url_get(h, what, &out, flags) == CURLUE_OK, let out else { return nil }
            defer { curl_free(out) }
            return String(cString: out).lowercased()
        }
        guard let scheme = part(CURLUPART_SCHEME, 0), let host = part(CURLUPART_HOST, 0),
              let port = part(CURLUPART_PORT, UInt32(CURLU_DEFAULT_PORT)) else { return nil }
        return Origin(scheme: scheme, host: host, port: port)
    }

    /// Whether a URL names a user (and maybe a password) before its host.
    static func hasUserInfo(_ u: String) -> Bool {
        guard let h = curl_url() else { return false }
        defer { curl_url_cleanup(h) }
        guard curl_url_set(h, CURLUPART_URL, u, 0) == CURLUE_OK else { return false }
        var out: UnsafeMutablePointer<CChar>?
        let r = curl_url_get(h, CURLUPART_USER, &out, 0)
        if let out { curl_free(out) }
        return r == CURLUE_OK
    }

    struct Origin: Equatable {
        var scheme: String
        var host: String
        var port: String
    }
}
