/*
 * CLibcrypto: ABI only. The one digest the project needs from OpenSSL's
 * libcrypto, as a plain function Swift can call. No policy lives here.
 */
#ifndef CLIBCRYPTO_H
#define CLIBCRYPTO_H

#include <stddef.h>
#include <stdint.h>

/* SHA-256 of `len` bytes at `data` into `out` (32 bytes); 0 on success,
 * -1 when libcrypto fails (then `out` is zeroed). */
int clibcrypto_sha256(const void *data, size_t len, uint8_t out[32]);

#endif
