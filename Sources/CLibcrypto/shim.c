/* OpenSSL's one-shot digest; see include/CLibcrypto.h. */
#include "CLibcrypto.h"
#include <string.h>
#include <openssl/evp.h>

int clibcrypto_sha256(const void *data, size_t len, uint8_t out[32]) {
    unsigned int n = 0;
    if (EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) == 1 && n == 32) return 0;
    memset(out, 0, 32);
    return -1;
}
