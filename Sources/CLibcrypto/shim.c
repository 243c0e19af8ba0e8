/* OpenSSL's digests; see include/CLibcrypto.h. */
#include "CLibcrypto.h"
#include <string.h>
#include <openssl/evp.h>

int clibcrypto_sha256(const void *data, size_t len, uint8_t out[32]) {
    unsigned int n = 0;
    if (EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) == 1 && n == 32) return 0;
    memset(out, 0, 32);
    return -1;
}

void *clibcrypto_digest_new(const char *name) {
    const EVP_MD *md = EVP_get_digestbyname(name);
    if (!md) return NULL;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx) return NULL;
    if (EVP_DigestInit_ex(ctx, md, NULL) != 1) { EVP_MD_CTX_free(ctx); return NULL; }
    return ctx;
}

int clibcrypto_digest_size(void *ctx) {
    return ctx ? EVP_MD_CTX_get_size((EVP_MD_CTX *)ctx) : 0;
}

int clibcrypto_digest_reset(void *ctx) {
    return EVP_DigestInit_ex((EVP_MD_CTX *)ctx, NULL, NULL) == 1 ? 0 : -1;
}

int clibcrypto_digest_update(void *ctx, const void *data, size_t len) {
    return EVP_DigestUpdate((EVP_MD_CTX *)ctx, data, len) == 1 ? 0 : -1;
}

int clibcrypto_digest_final(void *ctx, uint8_t *out) {
    unsigned int n = 0;
    return EVP_DigestFinal_ex((EVP_MD_CTX *)ctx, out, &n) == 1 ? 0 : -1;
}

void clibcrypto_digest_free(void *ctx) { EVP_MD_CTX_free((EVP_MD_CTX *)ctx); }
