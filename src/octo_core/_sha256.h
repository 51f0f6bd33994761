/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) for request signing.
 *
 * Self-contained so the extension builds without OpenSSL headers. HMAC keys are
 * prepared once (octo_hmac_key: the inner and outer pad blocks already hashed),
 * so signing a short request costs two compressions for the message plus two to
 * finish, instead of four plus key handling.
 */
#ifndef OCTO_SHA256_H
#define OCTO_SHA256_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint32_t h[8];
    uint64_t length;        /* bytes hashed so far */
    unsigned char block[64];
    size_t used;            /* bytes waiting in block */
} octo_sha256;

typedef struct {
    octo_sha256 inner;      /* state after hashing key ^ ipad */
    octo_sha256 outer;      /* state after hashing key ^ opad */
} octo_hmac_key;

static const uint32_t octo_sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define OCTO_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void octo_sha256_compress_c(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) |
               ((uint32_t)p[4 * i + 2] << 8) | p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = OCTO_ROTR(w[i - 15], 7) ^ OCTO_ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = OCTO_ROTR(w[i - 2], 17) ^ OCTO_ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
    for (i = 0; i < 64; i++) {
        t1 = k + (OCTO_ROTR(e, 6) ^ OCTO_ROTR(e, 11) ^ OCTO_ROTR(e, 25)) + ((e & f) ^ (~e & g))
             + octo_sha256_k[i] + w[i];
        t2 = (OCTO_ROTR(a, 2) ^ OCTO_ROTR(a, 13) ^ OCTO_ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

/* The x86 SHA extensions: two rounds per sha256rnds2; the message schedule by
 * sha256msg1/msg2. The state is kept as (A,B,E,F) and (C,D,G,H), as the
 * instructions want it. */
__attribute__((target("sha,sse4.1,ssse3")))
static void octo_sha256_compress_ni(uint32_t h[8], const unsigned char *p) {
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i t = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);  /* C D A B */
    __m128i s1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B); /* E F G H */
    __m128i s0 = _mm_alignr_epi8(t, s1, 8);                                          /* A B E F */
    __m128i abef = s0, cdgh;
    __m128i w[4], msg;
    int g;
    s1 = _mm_blend_epi16(s1, t, 0xF0);                                              /* C D G H */
    cdgh = s1;
    for (g = 0; g < 16; g++) {
        if (g < 4) {
            w[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * g)), swap);
        } else {
            __m128i x = _mm_sha256msg1_epu32(w[g & 3], w[(g + 1) & 3]);      /* W[t-16] + s0(W[t-15]) */
            x = _mm_add_epi32(x, _mm_alignr_epi8(w[(g + 3) & 3], w[(g + 2) & 3], 4)); /* + W[t-7] */
            w[g & 3] = _mm_sha256msg2_epu32(x, w[(g + 3) & 3]);                  /* + s1(W[t-2]) */
        }
        msg = _mm_add_epi32(w[g & 3], _mm_loadu_si128((const __m128i *)&octo_sha256_k[4 * g]));
        s1 = _mm_sha256rnds2_epu32(s1, s0, msg);
        s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(msg, 0x0E));
    }
    s0 = _mm_add_epi32(s0, abef);
    s1 = _mm_add_epi32(s1, cdgh);
    t = _mm_shuffle_epi32(s0, 0x1B);                                                 /* F E B A */
    s1 = _mm_shuffle_epi32(s1, 0xB1);                                                /* D C H G */
    _mm_storeu_si128((__m128i *)&h[0], _mm_blend_epi16(t, s1, 0xF0));                /* D C B A */
    _mm_storeu_si128((__m128i *)&h[4], _mm_alignr_epi8(s1, t, 8));                   /* H G F E */
}

static int octo_sha_ni_available(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3)) return 0;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 29) & 1;    /* CPUID.7.0:EBX.SHA */
}
#endif

static void (*octo_sha256_compress)(uint32_t h[8], const unsigned char *p) = octo_sha256_compress_c;

/* Pick the hardware rounds when the CPU has them; called once at import.
 * OCTO_SHA256_PORTABLE=1 keeps the portable C rounds (so tests cover both). */
static int octo_sha256_setup(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    const char *portable = getenv("OCTO_SHA256_PORTABLE");
    if ((portable == NULL || strcmp(portable, "1") != 0) && octo_sha_ni_available()) {
        octo_sha256_compress = octo_sha256_compress_ni;
        return 1;
    }
#endif
    return 0;
}

static void octo_sha256_init(octo_sha256 *s) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->length = 0;
    s->used = 0;
}

static void octo_sha256_update(octo_sha256 *s, const unsigned char *p, size_t n) {
    s->length += n;
    if (s->used) {
        size_t take = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->block + s->used, p, take);
        s->used += take; p += take; n -= take;
        if (s->used < 64) return;
        octo_sha256_compress(s->h, s->block);
        s->used = 0;
    }
    for (; n >= 64; p += 64, n -= 64)
        octo_sha256_compress(s->h, p);
    memcpy(s->block, p, n);
    s->used = n;
}

static void octo_sha256_final(octo_sha256 *s, unsigned char out[32]) {
    uint64_t bits = s->length * 8;
    int i;
    s->block[s->used++] = 0x80;
    if (s->used > 56) {
        memset(s->block + s->used, 0, 64 - s->used);
        octo_sha256_compress(s->h, s->block);
        s->used = 0;
    }
    memset(s->block + s->used, 0, 56 - s->used);
    for (i = 0; i < 8; i++) s->block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    octo_sha256_compress(s->h, s->block);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)s->h[i];
    }
}

static void octo_hmac_key_init(octo_hmac_key *k, const unsigned char *key, size_t n) {
    unsigned char block[64], pad[64];
    int i;
    memset(block, 0, sizeof block);
    if (n > 64) {           /* long keys are hashed first (RFC 2104) */
        octo_sha256 s;
        octo_sha256_init(&s);
        octo_sha256_update(&s, key, n);
        octo_sha256_final(&s, block);
    } else {
        memcpy(block, key, n);
    }
    for (i = 0; i < 64; i++) pad[i] = block[i] ^ 0x36;
    octo_sha256_init(&k->inner);
    octo_sha256_update(&k->inner, pad, 64);
    for (i = 0; i < 64; i++) pad[i] = block[i] ^ 0x5c;
    octo_sha256_init(&k->outer);
    octo_sha256_update(&k->outer, pad, 64);
}

/* HMAC over the concatenation of `parts` (count of them), separated by `sep` when sep >= 0. */
static void octo_hmac_parts(const octo_hmac_key *k, const unsigned char *const *parts,
                            const size_t *lengths, int count, int sep, unsigned char out[32]) {
    octo_sha256 s = k->inner;
    unsigned char digest[32], separator = (unsigned char)sep;
    int i;
    for (i = 0; i < count; i++) {
        if (i && sep >= 0) octo_sha256_update(&s, &separator, 1);
        octo_sha256_update(&s, parts[i], lengths[i]);
    }
    octo_sha256_final(&s, digest);
    s = k->outer;
    octo_sha256_update(&s, digest, 32);
    octo_sha256_final(&s, out);
}

#endif
