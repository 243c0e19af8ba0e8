/* Non-variadic libcurl wrappers; see include/CCurl.h. */
#include "CCurl.h"

CURLcode ccurl_easy_setopt_long(CURL *e, CURLoption o, long v) { return curl_easy_setopt(e, o, v); }
CURLcode ccurl_easy_setopt_off_t(CURL *e, CURLoption o, curl_off_t v) { return curl_easy_setopt(e, o, v); }
CURLcode ccurl_easy_setopt_string(CURL *e, CURLoption o, const char *v) { return curl_easy_setopt(e, o, v); }
CURLcode ccurl_easy_setopt_pointer(CURL *e, CURLoption o, void *v) { return curl_easy_setopt(e, o, v); }
CURLcode ccurl_easy_setopt_slist(CURL *e, CURLoption o, struct curl_slist *v) { return curl_easy_setopt(e, o, v); }
CURLcode ccurl_easy_setopt_write_callback(CURL *e, CURLoption o, curl_write_callback cb) { return curl_easy_setopt(e, o, cb); }
CURLcode ccurl_easy_setopt_xferinfo_callback(CURL *e, curl_xferinfo_callback cb) { return curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, cb); }

CURLMcode ccurl_multi_setopt_long(CURLM *m, CURLMoption o, long v) { return curl_multi_setopt(m, o, v); }
CURLMcode ccurl_multi_setopt_pointer(CURLM *m, CURLMoption o, void *v) { return curl_multi_setopt(m, o, v); }
CURLMcode ccurl_multi_setopt_socket_callback(CURLM *m, curl_socket_callback cb) { return curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, cb); }
CURLMcode ccurl_multi_setopt_timer_callback(CURLM *m, curl_multi_timer_callback cb) { return curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, cb); }

CURLcode ccurl_easy_getinfo_long(CURL *e, CURLINFO i, long *out) { return curl_easy_getinfo(e, i, out); }
CURLcode ccurl_easy_getinfo_off_t(CURL *e, CURLINFO i, curl_off_t *out) { return curl_easy_getinfo(e, i, out); }
CURLcode ccurl_easy_getinfo_double(CURL *e, CURLINFO i, double *out) { return curl_easy_getinfo(e, i, out); }
CURLcode ccurl_easy_getinfo_string(CURL *e, CURLINFO i, const char **out) {
    char *s = NULL;
    CURLcode r = curl_easy_getinfo(e, i, &s);
    *out = s;
    return r;
}
CURLcode ccurl_easy_getinfo_pointer(CURL *e, CURLINFO i, void **out) { return curl_easy_getinfo(e, i, out); }

const curl_socket_t ccurl_socket_timeout = CURL_SOCKET_TIMEOUT;
const int ccurl_poll_none = CURL_POLL_NONE, ccurl_poll_in = CURL_POLL_IN, ccurl_poll_out = CURL_POLL_OUT,
          ccurl_poll_inout = CURL_POLL_INOUT, ccurl_poll_remove = CURL_POLL_REMOVE;
const int ccurl_cselect_in = CURL_CSELECT_IN, ccurl_cselect_out = CURL_CSELECT_OUT, ccurl_cselect_err = CURL_CSELECT_ERR;
const long ccurl_global_default = CURL_GLOBAL_DEFAULT;
const long ccurl_pipe_multiplex = CURLPIPE_MULTIPLEX;
const long ccurl_http_version_2tls = CURL_HTTP_VERSION_2TLS;
const long ccurl_http_version_1_1 = CURL_HTTP_VERSION_1_1;
const long ccurl_http_version_2_0 = CURL_HTTP_VERSION_2_0, ccurl_http_version_3 = CURL_HTTP_VERSION_3;
const long ccurl_proto_http_https = CURLPROTO_HTTP | CURLPROTO_HTTPS;
const long ccurl_sslversion_tlsv1_2 = CURL_SSLVERSION_TLSv1_2;
const size_t ccurl_error_size = CURL_ERROR_SIZE;
const size_t ccurl_writefunc_error = 0; /* returning 0 for a non-empty chunk aborts with CURLE_WRITE_ERROR */
