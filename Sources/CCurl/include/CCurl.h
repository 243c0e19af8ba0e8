/*
 * CCurl: ABI only. Non-variadic wrappers for libcurl's variadic calls
 * (`curl_easy_setopt`, `curl_multi_setopt`, `curl_easy_getinfo`), one per
 * argument type, so Swift can call them; plus the few constants Swift cannot
 * see through macros. No policy lives here: no retries, no defaults, no
 * error strings beyond libcurl's own.
 */
#ifndef CCURL_H
#define CCURL_H

#include <stdint.h>
#include <sys/types.h>
#include <curl/curl.h>
/* The readiness plumbing curl's multi-socket API is driven by (glibc's Swift
 * module does not export these). */
#include <sys/epoll.h>
#include <sys/timerfd.h>

/* ---- curl_easy_setopt, by argument type ---------------------------------- */
CURLcode ccurl_easy_setopt_long(CURL *easy, CURLoption option, long value);
CURLcode ccurl_easy_setopt_off_t(CURL *easy, CURLoption option, curl_off_t value);
/* Strings are copied by libcurl (since 7.17), so the Swift string may die. */
CURLcode ccurl_easy_setopt_string(CURL *easy, CURLoption option, const char *value);
CURLcode ccurl_easy_setopt_pointer(CURL *easy, CURLoption option, void *value);
CURLcode ccurl_easy_setopt_slist(CURL *easy, CURLoption option, struct curl_slist *value);
/* CURLOPT_WRITEFUNCTION and CURLOPT_HEADERFUNCTION share this type. */
CURLcode ccurl_easy_setopt_write_callback(CURL *easy, CURLoption option, curl_write_callback cb);
CURLcode ccurl_easy_setopt_xferinfo_callback(CURL *easy, curl_xferinfo_callback cb);

/* ---- curl_multi_setopt, by argument type --------------------------------- */
CURLMcode ccurl_multi_setopt_long(CURLM *multi, CURLMoption option, long value);
CURLMcode ccurl_multi_setopt_pointer(CURLM *multi, CURLMoption option, void *value);
CURLMcode ccurl_multi_setopt_socket_callback(CURLM *multi, curl_socket_callback cb);
CURLMcode ccurl_multi_setopt_timer_callback(CURLM *multi, curl_multi_timer_callback cb);

/* ---- curl_easy_getinfo, by result type ----------------------------------- */
CURLcode ccurl_easy_getinfo_long(CURL *easy, CURLINFO info, long *out);
CURLcode ccurl_easy_getinfo_off_t(CURL *easy, CURLINFO info, curl_off_t *out);
CURLcode ccurl_easy_getinfo_double(CURL *easy, CURLINFO info, double *out);
/* The string belongs to the handle; copy it before the next transfer. */
CURLcode ccurl_easy_getinfo_string(CURL *easy, CURLINFO info, const char **out);
CURLcode ccurl_easy_getinfo_pointer(CURL *easy, CURLINFO info, void **out);

/* ---- CURLMsg: the anonymous union ---------------------------------------- */
static inline CURLcode ccurl_msg_result(const CURLMsg *msg) { return msg->data.result; }

/* ---- Constants hidden behind macros or casts ------------------------------ */
extern const curl_socket_t ccurl_socket_timeout;      /* CURL_SOCKET_TIMEOUT */
extern const int ccurl_poll_none, ccurl_poll_in, ccurl_poll_out, ccurl_poll_inout, ccurl_poll_remove;
extern const int ccurl_cselect_in, ccurl_cselect_out, ccurl_cselect_err;
extern const long ccurl_global_default;               /* CURL_GLOBAL_DEFAULT */
extern const long ccurl_pipe_multiplex;               /* CURLPIPE_MULTIPLEX */
extern const long ccurl_http_version_2tls;            /* CURL_HTTP_VERSION_2TLS */
extern const long ccurl_http_version_1_1;             /* CURL_HTTP_VERSION_1_1 */
extern const long ccurl_http_version_2_0, ccurl_http_version_3;  /* CURL_HTTP_VERSION_2_0, _3 (CURLINFO_HTTP_VERSION) */
extern const long ccurl_proto_http_https;             /* CURLPROTO_HTTP | CURLPROTO_HTTPS */
extern const long ccurl_sslversion_tlsv1_2;           /* CURL_SSLVERSION_TLSv1_2 */
extern const size_t ccurl_error_size;                 /* CURL_ERROR_SIZE */
extern const size_t ccurl_writefunc_error;            /* a size that is not the count: abort */

#endif
