/*
 * CLibcrypto: ABI only. The digests the project needs from OpenSSL's
 * libcrypto, as plain functions Swift can call. No policy lives here.
 */
#ifndef CLIBCRYPTO_H
#define CLIBCRYPTO_H

#include <stddef.h>
#include <stdint.h>

/* SHA-256 of `len` bytes at `data` into `out` (32 bytes); 0 on success,
 * -1 when libcrypto fails (then `out` is zeroed). */
int clibcrypto_sha256(const void *data, size_t len, uint8_t out[32]);

/* A digest context for the algorithm OpenSSL knows by `name` ("sha256",
 * "sha1", "sha512", ...), ready for updates; NULL when the name is unknown
 * or libcrypto fails. Free it with clibcrypto_digest_free. */
void *clibcrypto_digest_new(const char *name);
/* The algorithm's digest size in bytes (0 when `ctx` is NULL). */
int clibcrypto_digest_size(void *ctx);
/* Starts a new digest (what was updated before is dropped); 0 on success. */
int clibcrypto_digest_reset(void *ctx);
/* Adds `len` bytes; 0 on success. */
int clibcrypto_digest_update(void *ctx, const void *data, size_t len);
/* Writes the digest (clibcrypto_digest_size bytes) to `out`; 0 on success.
 * The context needs clibcrypto_digest_reset before its next digest. */
int clibcrypto_digest_final(void *ctx, uint8_t *out);
void clibcrypto_digest_free(void *ctx);

#endif
