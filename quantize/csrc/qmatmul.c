/* dbrxq's own weight-only quantized matmul for CPUs: y[M, N] = x[M, K] @ W[N, K]^T.
 *
 * Plain C (no torch headers) so it compiles in a second; quantize/cext.py builds it with
 * `gcc -O3 -fopenmp -shared` and loads it with ctypes. The AVX2 functions carry
 * __attribute__((target("avx2,fma,f16c"))) so ONE build holds both paths and the file never
 * needs -march flags; Python picks the path from /proc/cpuinfo at run time.
 *
 * Method (the llama.cpp Q4_0 x Q8_0 idea): activations are quantized per row, per span of 32
 * values (128 for q4 with groups a multiple of 128: dbrxq_act_span), to int8 with a float scale
 * d = amax / 127 over the span (q = round(x / d), |q| <= 127), kept per 32-block. Weights keep
 * their canonical unsigned codes c (format.py), repacked at load into one row record:
 *
 *   q4: codes  K/2 bytes, per superblock of 64 columns k0..k0+63, byte j < 16 holds
 *              c[k0+j] | c[k0+16+j] << 4 and byte 16+j holds c[k0+32+j] | c[k0+48+j] << 4,
 *              so ONE 32-byte load + two masks yields 64 codes (low nibbles: columns
 *              k0..15, k0+32..47; high nibbles: k0+16..31, k0+48..63). Activations are stored
 *              in the same permuted order (see quant_act).
 *   q8: codes  K bytes, int8 c - 128, natural column order.
 *   then       scales  K/G fp16, then zeros K/G uint8 (asymmetric only); record padded to 64 B.
 *
 * Per row n and activation row m:
 *   y = sum_b d_b * s_g(b) * sum_{k in b} c_k q_k  -  sum_g s_g * z_g * A_g,
 *   A_g = sum_{b in g} d_b * sum_{k in b} q_k            (the zero-point correction)
 * The inner dot products are exact integers (_mm256_maddubs_epi16: unsigned 4-bit codes x
 * signed int8; pair sums <= 2 * 15 * 127, no saturation), so the only error against the float
 * reference is activation quantization, |x - d q| <= d / 2 per element, i.e.
 *   |y - y_ref| <= sum_k |W[n,k]| * d(k) / 2   (+ float32 accumulation rounding).
 * For q8 the codes are shifted to signed (c - 128) and multiplied with the abs/sign trick
 * (|c-128| <= 128 unsigned x sign-adjusted q, pair sums <= 2 * 128 * 127 < 32767).
 *
 * Blocking: rows of W are split into chunks of NCHUNK, handed to OpenMP threads 16 chunks
 * (256 rows, 0.8 MB at K = 6144) at a time, dynamically: on a shared 2-core VM one thread is
 * often slowed and static halves left the other idle (dynamic took 10-20% less time in the
 * session-2 A/B runs), while each new work item restarts the prefetch stream (16 chunks per
 * item beat 4 by 2-4% in 5 of 6 paired runs of the fused GLU; static, 16 and 64 could not be
 * told apart). Each row's result is independent of the schedule. Within a chunk,
 * activation rows go in tiles of 4 so a weight row (3 KB at K = 6144) is unpacked once per
 * tile and re-read from L2 (the chunk is 51 KB) by later tiles: batch 16 costs far less than
 * 16x batch 1, but each tile streams its activations (9 KB per row with scales) from L2 too.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32     /* activation block */
#define NCHUNK 16 /* weight rows per work item */
#define MT 4      /* activation rows per tile */
#define NR2 2     /* weight rows per tile on the AVX2 path (16 ymm registers) */
#ifndef PF
/* Software prefetch distance in bytes (prefetch_line: L1 at PF, L2 at 4 * PF), about bandwidth x
 * memory latency of one core's share, with room. 2-core AMD EPYC (Zen 3) VM, M = 1, one
 * 10752 x 6144 int4 g128 matrix, median kernel time over the median time of an AVX2 read of
 * a same-sized buffer in between: no prefetch 1.76-2.20x, PF = 1 KB 1.17-1.36x, 8 KB
 * 1.15-1.22x. Row records are walked in memory order, so the prefetch runs on across row
 * boundaries, which the hardware prefetchers (trained per 4 KB page) do not. */
#define PF 8192
#endif

/* ------------------------------------------------------------------ helpers (portable) */

static float h2f(uint16_t h) { /* IEEE half -> float, no F16C needed */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, bits;
    if (e == 0) {
        if (m == 0) { bits = sign; }
        else { /* subnormal: normalise */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) { m <<= 1; e--; }
            bits = sign | (e << 23) | ((m & 0x3FF) << 13);
        }
    } else if (e == 31) { bits = sign | 0x7F800000u | (m << 13); }
    else { bits = sign | ((e + 127 - 15) << 23) | (m << 13); }
    float f; memcpy(&f, &bits, 4); return f;
}

/* Position of natural column o (0..63 in a superblock) in the q4 permuted order. */
static inline int perm64(int o) { return o < 16 ? o : o < 32 ? o + 16 : o < 48 ? o - 16 : o; }

/* Row record size in bytes for a weight with K columns, group G. */
int64_t dbrxq_row_bytes(int bits, int K, int G, int asym) {
    int64_t b = (bits == 4 ? K / 2 : K) + 2 * (K / G) + (asym ? K / G : 0);
    return (b + 63) / 64 * 64;
}

/* Repack one canonical weight (codes uint8 [N, K] unpacked, scales fp16 [N, K/G],
 * zeros uint8 [N, K/G] or NULL) into row records (dst: N * row_bytes). */
void dbrxq_repack(const uint8_t *codes, const uint16_t *scales, const uint8_t *zeros,
                  int bits, int N, int K, int G, uint8_t *dst) {
    int64_t rb = dbrxq_row_bytes(bits, K, G, zeros != NULL), nc = bits == 4 ? K / 2 : K;
    for (int n = 0; n < N; n++) {
        const uint8_t *c = codes + (int64_t)n * K;
        uint8_t *r = dst + n * rb;
        memset(r, 0, rb);
        if (bits == 4) {
            for (int k0 = 0; k0 < K; k0 += 64)
                for (int j = 0; j < 16; j++) {
                    r[k0 / 2 + j] = (uint8_t)(c[k0 + j] | c[k0 + 16 + j] << 4);
                    r[k0 / 2 + 16 + j] = (uint8_t)(c[k0 + 32 + j] | c[k0 + 48 + j] << 4);
                }
        } else {
            for (int k = 0; k < K; k++) r[k] = (uint8_t)(c[k] ^ 0x80); /* = (int8)(c - 128) */
        }
        memcpy(r + nc, scales + (int64_t)n * (K / G), 2 * (K / G));
        if (zeros) memcpy(r + nc + 2 * (K / G), zeros + (int64_t)n * (K / G), K / G);
    }
}

/* Activation values that share one scale: 128 (one 64-byte line of q4 codes) for q4 weights
 * whose groups are multiples of 128, else QK. With one scale per 128 values the q4 kernel sums
 * the integer dot products of a whole line before converting them (q4_kern): about a quarter
 * fewer instructions per line. The cost is a coarser activation grid, d = amax / 127 over 128
 * values instead of 32 (llama.cpp's Q8_K uses 256). */
int dbrxq_act_span(int bits, int G) { return bits == 4 && G % 128 == 0 ? 128 : QK; }

/* Quantize activations x [M, K] float32 -> qa int8 [M, K] (q4: permuted per 64), d [M, K/32],
 * bsum [M, K/32] = d_b * sum(q_b); d = amax / 127 over each span (32 or 128 values, K % span
 * == 0), stored once per 32-block. */
static void quant_act(const float *x, int M, int K, int span, int permute, int8_t *qa, float *d, float *bsum) {
    float amax = 0.f;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / QK; b++) {
            const float *xb = x + (int64_t)m * K + b * QK;
            if (b % (span / QK) == 0) {
                amax = 0.f;
                for (int i = 0; i < span; i++) { float v = fabsf(xb[i]); amax = v > amax ? v : amax; }
            }
            float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            int s = 0;
            for (int i = 0; i < QK; i++) {
                float r = xb[i] * id; /* |r| <= 127; the magic number rounds half to even */
                int q = (int)((r + 12582912.f) - 12582912.f);
                q = q > 127 ? 127 : q < -127 ? -127 : q;
                int k = b * QK + i;
                int pos = permute ? (k & ~63) + perm64(k & 63) : k;
                qa[(int64_t)m * K + pos] = (int8_t)q;
                s += q;
            }
            d[m * (K / QK) + b] = db;
            bsum[m * (K / QK) + b] = db * (float)s;
        }
}

/* ------------------------------------------------------------------ generic scalar path */

static void rows_generic(const uint8_t *row, int bits, int K, int G, int asym,
                         const int8_t *qa, const float *d, const float *bsum, int m0, int mt,
                         float *y, int64_t ldy) {
    int ng = K / G, nc = bits == 4 ? K / 2 : K;
    const uint16_t *sc = (const uint16_t *)(row + nc);
    const uint8_t *zp = row + nc + 2 * ng;
    for (int m = m0; m < m0 + mt; m++) {
        const int8_t *a = qa + (int64_t)m * K;
        double acc = 0.0;
        for (int g = 0; g < ng; g++) {
            float s = h2f(sc[g]), ag = 0.f, part = 0.f;
            int zc = bits == 4 ? (asym ? zp[g] : 8) : (asym ? zp[g] - 128 : 0);
            for (int b = g * G / QK; b < (g + 1) * G / QK; b++) {
                int32_t dot = 0;
                if (bits == 4) {
                    /* block b is half of superblock b/2: lanes 0..15 of each half */
                    const uint8_t *w = row + (b / 2) * 32 + (b & 1) * 16;
                    const int8_t *ab = a + (b / 2) * 64 + (b & 1) * 16;
                    for (int j = 0; j < 16; j++)
                        dot += (w[j] & 15) * ab[j] + (w[j] >> 4) * ab[32 + j];
                } else {
                    const int8_t *w = (const int8_t *)row + b * QK, *ab = a + b * QK;
                    for (int j = 0; j < QK; j++) dot += w[j] * ab[j];
                }
                part += d[m * (K / QK) + b] * (float)dot;
                ag += bsum[m * (K / QK) + b];
            }
            acc += (double)(s * (part - (float)zc * ag));
        }
        y[m * ldy] = (float)acc;
    }
}

/* ------------------------------------------------------------------ AVX2 path */

#define TGT __attribute__((target("avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline))

/* Once per 64-byte line (records are 64-byte aligned): into L1 PF bytes ahead and into L2
 * 4 * PF ahead (adding the L2 prefetch: mean 1.27x -> 1.20x over 7 runs each, in the noise
 * of this VM but never worse on average). */
INL void prefetch_line(const uint8_t *p) {
    _mm_prefetch((const char *)(p + PF), _MM_HINT_T0);
    _mm_prefetch((const char *)(p + 4 * PF), _MM_HINT_T1);
}

TGT INL float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* quant_act for AVX2, bit-identical to the generic one (the same float operations;
 * cvtps rounds half to even like the magic number). */
TGT static void quant_act_avx2(const float *x, int M, int K, int span, int permute, int8_t *qa, float *d,
                               float *bsum) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undo packs' lane interleave */
    float amax = 0.f;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / QK; b++) {
            const float *xb = x + (int64_t)m * K + b * QK;
            __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
            __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
            if (b % (span / QK) == 0) { /* max is exact: any order gives the scalar path's value */
                __m256 mx = _mm256_setzero_ps();
                for (int i = 0; i < span; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
                __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                h = _mm_max_ss(h, _mm_movehdup_ps(h));
                amax = _mm_cvtss_f32(h);
            }
            float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            __m256 vid = _mm256_set1_ps(id);
            __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
            __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
            __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q0, q1), _mm256_add_epi32(q2, q3));
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            p = _mm256_permutevar8x32_epi32(p, fix); /* 32 int8 in column order */
            int8_t *dst = qa + (int64_t)m * K;
            if (permute) { /* block b is half (b & 1) of superblock b / 2; see perm64 */
                int8_t *base = dst + (b / 2) * 64 + (b & 1) * 16;
                _mm_storeu_si128((__m128i *)base, _mm256_castsi256_si128(p));
                _mm_storeu_si128((__m128i *)(base + 32), _mm256_extracti128_si256(p, 1));
            } else {
                _mm256_storeu_si256((__m256i *)(dst + b * QK), p);
            }
            d[m * (K / QK) + b] = db;
            bsum[m * (K / QK) + b] = db * (float)_mm_cvtsi128_si32(s);
        }
}

/* q4 kernel for `nr` weight rows (records w0, w0 + rb, ...) x `nt` activation rows (nr, nt
 * compile-time constants after inlining: 1 x 1 for decode, NR2 x MT for batches).
 * dv [M, K/8]: per superblock 8 floats [d_A x4, d_B x4] matching the madd lanes.
 * ag [K/G, M]: A_g per group (transposed so a tile's values are adjacent).
 * Three loops: G % 128 == 0 (the activation scale is constant over each 128-column line,
 * dbrxq_act_span): integer sums per line, one convert and FMA per line; other G >= 64: the
 * weight scale is constant over a group, so accumulate d_a * dot in accg and apply the scale
 * once per group; G == 32: both scales per superblock half. Each 64-byte line prefetches
 * ahead once; see PF.
 * For every (weight row, activation row) the float operations are the same sequence whatever
 * nr and nt are (and on the AVX-512 path below), so a row's result never depends on M. */
TGT INL void q4_kern(const uint8_t *w0, int64_t rb, const int nr, int K, int G, int asym, const int8_t *qa,
                     const float *dv, const float *ag, int M, int m0, const int nt, float *y, int64_t ldy) {
    const int ng = K / G;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[NR2][MT], accg[NR2][MT];
    float corr[NR2][MT];
    const int8_t *a[MT];
    const float *dd[MT];
    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
        a[i] = qa + (int64_t)(m0 + i) * K;
        dd[i] = dv + (int64_t)(m0 + i) * (K / 8);
        _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) { acc[r][i] = _mm256_setzero_ps(); corr[r][i] = 0.f; }
    }
    if (G % 128 == 0) { /* one activation scale per line (dbrxq_act_span): sum its 128 products first */
        const int lpg = G / 128;
        for (int g = 0; g < ng; g++) {
            float s[NR2], sz[NR2];
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                const uint8_t *row = w0 + r * rb;
                s[r] = _cvtsh_ss(((const uint16_t *)(row + K / 2))[g]);
                sz[r] = s[r] * (float)(asym ? (row + K / 2 + 2 * ng)[g] : 8);
            }
            for (int l = g * lpg; l < (g + 1) * lpg; l++) {
                _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                    const uint8_t *wl = w0 + r * rb + l * 64;
                    prefetch_line(wl);
                    __m256i v0 = _mm256_loadu_si256((const __m256i *)wl), v1 = _mm256_loadu_si256((const __m256i *)(wl + 32));
                    __m256i lo0 = _mm256_and_si256(v0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4);
                    __m256i lo1 = _mm256_and_si256(v1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
                    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                        const int8_t *al = a[i] + l * 128;
                        /* int16 lanes: 8 products of <= 15 * 127 each, |sum| <= 15240: no overflow */
                        __m256i p = _mm256_add_epi16(
                            _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_loadu_si256((const __m256i *)al)),
                                             _mm256_maddubs_epi16(hi0, _mm256_loadu_si256((const __m256i *)(al + 32)))),
                            _mm256_add_epi16(_mm256_maddubs_epi16(lo1, _mm256_loadu_si256((const __m256i *)(al + 64))),
                                             _mm256_maddubs_epi16(hi1, _mm256_loadu_si256((const __m256i *)(al + 96)))));
                        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)),
                                                    _mm256_set1_ps(s[r] * dd[i][l * 16]), acc[r][i]);
                    }
                }
            }
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++)
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) corr[r][i] += sz[r] * ag[(int64_t)g * M + m0 + i];
        }
    } else if (G >= 64) {
        const int spg = G / 64;
        for (int g = 0; g < ng; g++) {
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++)
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) accg[r][i] = _mm256_setzero_ps();
            for (int sb = g * spg; sb < (g + 1) * spg; sb++) {
                _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                    const uint8_t *row = w0 + r * rb;
                    __m256i v = _mm256_loadu_si256((const __m256i *)(row + sb * 32));
                    if (!(sb & 1)) prefetch_line(row + sb * 32);
                    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                        __m256i p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(a[i] + sb * 64))),
                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a[i] + sb * 64 + 32))));
                        accg[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)),
                                                     _mm256_loadu_ps(dd[i] + sb * 8), accg[r][i]);
                    }
                }
            }
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                const uint8_t *row = w0 + r * rb;
                float s = _cvtsh_ss(((const uint16_t *)(row + K / 2))[g]);
                float sz = s * (float)(asym ? (row + K / 2 + 2 * ng)[g] : 8);
                __m256 ws = _mm256_set1_ps(s);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    acc[r][i] = _mm256_fmadd_ps(accg[r][i], ws, acc[r][i]);
                    corr[r][i] += sz * ag[(int64_t)g * M + m0 + i];
                }
            }
        }
    } else { /* G == 32: the two halves of a superblock have their own scales */
        const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (int sb = 0; sb < K / 64; sb++) {
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                const uint8_t *row = w0 + r * rb;
                const uint16_t *sc = (const uint16_t *)(row + K / 2);
                const uint8_t *zp = row + K / 2 + 2 * ng;
                uint32_t two; memcpy(&two, sc + 2 * sb, 4);
                __m128 s2 = _mm_cvtph_ps(_mm_cvtsi32_si128((int)two));
                __m256 ws = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), lanes);
                __m256i v = _mm256_loadu_si256((const __m256i *)(row + sb * 32));
                if (!(sb & 1)) prefetch_line(row + sb * 32);
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                float sz0 = _cvtsh_ss(sc[2 * sb]) * (float)(asym ? zp[2 * sb] : 8);
                float sz1 = _cvtsh_ss(sc[2 * sb + 1]) * (float)(asym ? zp[2 * sb + 1] : 8);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    __m256i p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(a[i] + sb * 64))),
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a[i] + sb * 64 + 32))));
                    __m256 t = _mm256_mul_ps(_mm256_loadu_ps(dd[i] + sb * 8), ws);
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), t, acc[r][i]);
                    corr[r][i] += sz0 * ag[(int64_t)(2 * sb) * M + m0 + i] + sz1 * ag[(int64_t)(2 * sb + 1) * M + m0 + i];
                }
            }
        }
    }
    _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) y[(int64_t)(m0 + i) * ldy + r] = hsum8(acc[r][i]) - corr[r][i];
}

/* q8: codes int8 (c - 128); d [M, K/32] per block. Zero correction uses (z - 128).
 * `nr` weight rows x `nt` activation rows, as q4_kern. */
TGT INL void q8_tile(const uint8_t *w0, int64_t rb, const int nr, int K, int G, int asym, const int8_t *qa,
                     const float *d, const float *ag, int M, int m0, const int nt, float *y, int64_t ldy) {
    const int ng = K / G, bpg = G / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NR2][MT];
    float corr[NR2][MT];
    _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) { acc[r][i] = _mm256_setzero_ps(); corr[r][i] = 0.f; }
    for (int g = 0; g < ng; g++) {
        float s[NR2];
        _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) s[r] = _cvtsh_ss(((const uint16_t *)(w0 + r * rb + K))[g]);
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                const uint8_t *row = w0 + r * rb;
                __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * QK));
                if (!(b & 1)) prefetch_line(row + b * QK);
                __m256i aw = _mm256_abs_epi8(w);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    const int8_t *ab = qa + (int64_t)(m0 + i) * K + b * QK;
                    __m256i sa = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)ab), w);
                    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sa), ones);
                    __m256 t = _mm256_set1_ps(s[r] * d[(int64_t)(m0 + i) * (K / QK) + b]);
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), t, acc[r][i]);
                }
            }
        }
        if (asym) {
            _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++) {
                float sz = s[r] * (float)((int)(w0 + r * rb + K + 2 * ng)[g] - 128);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) corr[r][i] += sz * ag[(int64_t)g * M + m0 + i];
            }
        }
    }
    _Pragma("GCC unroll 2") for (int r = 0; r < nr; r++)
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) y[(int64_t)(m0 + i) * ldy + r] = hsum8(acc[r][i]) - corr[r][i];
}

/* One weight row x activation rows m0..m0+mt, one at a time (decode, and the edges of a tile). */
TGT static void row_avx2(const uint8_t *row, int bits, int K, int G, int asym, const int8_t *qa, const float *dvd,
                         const float *ag, int M, int m0, int mt, float *y, int64_t ldy) {
    for (int i = 0; i < mt; i++) {
        if (bits == 8) q8_tile(row, 0, 1, K, G, asym, qa, dvd, ag, M, m0 + i, 1, y, ldy);
        else q4_kern(row, 0, 1, K, G, asym, qa, dvd, ag, M, m0 + i, 1, y, ldy);
    }
}

/* Weight rows n0..n1 (records at w, stride rb) x activation rows m0..m0+mt: NR2 x MT register
 * tiles where both are full, single rows at the edges. */
TGT static void rows_avx2(const uint8_t *w, int64_t rb, int n0, int n1, int bits, int K, int G, int asym,
                          const int8_t *qa, const float *dvd, const float *ag, int M, int m0, int mt,
                          float *y, int64_t ldy) {
    int n = n0;
    if (mt == MT)
        for (; n + NR2 <= n1; n += NR2) {
            const uint8_t *row = w + (int64_t)n * rb;
            if (bits == 8) q8_tile(row, rb, NR2, K, G, asym, qa, dvd, ag, M, m0, MT, y + n, ldy);
            else q4_kern(row, rb, NR2, K, G, asym, qa, dvd, ag, M, m0, MT, y + n, ldy);
        }
    for (; n < n1; n++) row_avx2(w + (int64_t)n * rb, bits, K, G, asym, qa, dvd, ag, M, m0, mt, y + n, ldy);
}

/* ------------------------------------------------------------------ AVX-512 VNNI path */

/* Skylake-X and later (AVX512F/BW/VL + VNNI: Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4).
 * The same numbers as the AVX2 path, bit for bit, twice the work per instruction: a 512-bit
 * register holds TWO weight rows' 32-byte vectors (row A in lanes 0-7, row B in lanes 8-15) and
 * an activation vector broadcast to both halves, so every 32-bit lane sees exactly the products
 * it sees on the AVX2 path, and vpdpbusd (u8 x s8, four products summed into each int32 lane)
 * equals maddubs + add + madd(ones) there: all of them are exact integers (no saturation, see
 * q4_kern). The float work (convert, s * d, FMA) is then the same operation per lane, and
 * each half is reduced with the same hsum8. Decode (M = 1) and the edges of a tile run the
 * AVX2 functions; a tile is NP pairs of weight rows x MT activation rows. */
#define TGT5 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define NP 2 /* weight-row pairs per tile: 2 x MT accumulators + 8 weight registers of 32 */

TGT5 INL __m512i ld_pair(const uint8_t *a, const uint8_t *b) { /* 32 B at a | 32 B at b */
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}
TGT5 INL __m512i bcast32(const int8_t *p) { return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p)); }
TGT5 INL __m512 bcast8f(const float *p) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}
TGT5 INL __m512 pair_ps(__m256 a, __m256 b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
}
TGT5 INL __m256 lo_half(__m512 v) { return _mm512_castps512_ps256(v); }
TGT5 INL __m256 hi_half(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* q4, 2 * np weight rows (records w0 + j * rb) x nt activation rows; see q4_kern. */
TGT5 INL void q4_tile512(const uint8_t *w0, int64_t rb, const int np, int K, int G, int asym, const int8_t *qa,
                         const float *dv, const float *ag, int M, int m0, const int nt, float *y, int64_t ldy) {
    const int ng = K / G;
    const __m512i m4 = _mm512_set1_epi8(0x0F), z = _mm512_setzero_si512();
    __m512 acc[NP][MT], accg[NP][MT];
    float corr[2 * NP][MT];
    const int8_t *a[MT];
    const float *dd[MT];
    const uint8_t *rw[2 * NP];
    _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) rw[j] = w0 + j * rb;
    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
        a[i] = qa + (int64_t)(m0 + i) * K;
        dd[i] = dv + (int64_t)(m0 + i) * (K / 8);
        _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) acc[p][i] = _mm512_setzero_ps();
        _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) corr[j][i] = 0.f;
    }
    if (G % 128 == 0) {
        const int lpg = G / 128;
        for (int g = 0; g < ng; g++) {
            float s[2 * NP], sz[2 * NP];
            __m512 sv[NP];
            _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) {
                s[j] = _cvtsh_ss(((const uint16_t *)(rw[j] + K / 2))[g]);
                sz[j] = s[j] * (float)(asym ? (rw[j] + K / 2 + 2 * ng)[g] : 8);
            }
            _Pragma("GCC unroll 2") for (int p = 0; p < np; p++)
                sv[p] = pair_ps(_mm256_set1_ps(s[2 * p]), _mm256_set1_ps(s[2 * p + 1]));
            for (int l = g * lpg; l < (g + 1) * lpg; l++) {
                __m512i lo0[NP], hi0[NP], lo1[NP], hi1[NP];
                _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                    const uint8_t *wa = rw[2 * p] + l * 64, *wb = rw[2 * p + 1] + l * 64;
                    prefetch_line(wa);
                    prefetch_line(wb);
                    __m512i v0 = ld_pair(wa, wb), v1 = ld_pair(wa + 32, wb + 32);
                    lo0[p] = _mm512_and_si512(v0, m4); hi0[p] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
                    lo1[p] = _mm512_and_si512(v1, m4); hi1[p] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
                }
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    const int8_t *al = a[i] + l * 128;
                    __m512i a0 = bcast32(al), a1 = bcast32(al + 32), a2 = bcast32(al + 64), a3 = bcast32(al + 96);
                    __m512 dvec = _mm512_set1_ps(dd[i][l * 16]);
                    _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                        __m512i q = _mm512_dpbusd_epi32(z, lo0[p], a0);
                        q = _mm512_dpbusd_epi32(q, hi0[p], a1);
                        q = _mm512_dpbusd_epi32(q, lo1[p], a2);
                        q = _mm512_dpbusd_epi32(q, hi1[p], a3);
                        acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(sv[p], dvec), acc[p][i]);
                    }
                }
            }
            _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++)
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) corr[j][i] += sz[j] * ag[(int64_t)g * M + m0 + i];
        }
    } else if (G >= 64) {
        const int spg = G / 64;
        for (int g = 0; g < ng; g++) {
            _Pragma("GCC unroll 2") for (int p = 0; p < np; p++)
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) accg[p][i] = _mm512_setzero_ps();
            for (int sb = g * spg; sb < (g + 1) * spg; sb++) {
                __m512i lo[NP], hi[NP];
                _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                    const uint8_t *wa = rw[2 * p] + sb * 32, *wb = rw[2 * p + 1] + sb * 32;
                    if (!(sb & 1)) { prefetch_line(wa); prefetch_line(wb); }
                    __m512i v = ld_pair(wa, wb);
                    lo[p] = _mm512_and_si512(v, m4); hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    __m512i a0 = bcast32(a[i] + sb * 64), a1 = bcast32(a[i] + sb * 64 + 32);
                    __m512 dvec = bcast8f(dd[i] + sb * 8);
                    _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                        __m512i q = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo[p], a0), hi[p], a1);
                        accg[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), dvec, accg[p][i]);
                    }
                }
            }
            float s[2 * NP];
            _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) {
                s[j] = _cvtsh_ss(((const uint16_t *)(rw[j] + K / 2))[g]);
                float sz = s[j] * (float)(asym ? (rw[j] + K / 2 + 2 * ng)[g] : 8);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) corr[j][i] += sz * ag[(int64_t)g * M + m0 + i];
            }
            _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                __m512 ws = pair_ps(_mm256_set1_ps(s[2 * p]), _mm256_set1_ps(s[2 * p + 1]));
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) acc[p][i] = _mm512_fmadd_ps(accg[p][i], ws, acc[p][i]);
            }
        }
    } else { /* G == 32 */
        const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        for (int sb = 0; sb < K / 64; sb++) {
            __m512i lo[NP], hi[NP];
            __m512 ws[NP];
            float sz[2 * NP][2];
            _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) {
                const uint16_t *sc = (const uint16_t *)(rw[j] + K / 2);
                const uint8_t *zp = rw[j] + K / 2 + 2 * ng;
                sz[j][0] = _cvtsh_ss(sc[2 * sb]) * (float)(asym ? zp[2 * sb] : 8);
                sz[j][1] = _cvtsh_ss(sc[2 * sb + 1]) * (float)(asym ? zp[2 * sb + 1] : 8);
            }
            _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                const uint8_t *wa = rw[2 * p], *wb = rw[2 * p + 1];
                uint32_t ta, tb;
                memcpy(&ta, (const uint16_t *)(wa + K / 2) + 2 * sb, 4);
                memcpy(&tb, (const uint16_t *)(wb + K / 2) + 2 * sb, 4);
                ws[p] = pair_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128((int)ta))), lanes),
                                _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128((int)tb))), lanes));
                if (!(sb & 1)) { prefetch_line(wa + sb * 32); prefetch_line(wb + sb * 32); }
                __m512i v = ld_pair(wa + sb * 32, wb + sb * 32);
                lo[p] = _mm512_and_si512(v, m4); hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            }
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                __m512i a0 = bcast32(a[i] + sb * 64), a1 = bcast32(a[i] + sb * 64 + 32);
                __m512 dvec = bcast8f(dd[i] + sb * 8);
                float ag0 = ag[(int64_t)(2 * sb) * M + m0 + i], ag1 = ag[(int64_t)(2 * sb + 1) * M + m0 + i];
                _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                    __m512i q = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo[p], a0), hi[p], a1);
                    acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(dvec, ws[p]), acc[p][i]);
                }
                _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) corr[j][i] += sz[j][0] * ag0 + sz[j][1] * ag1;
            }
        }
    }
    _Pragma("GCC unroll 2") for (int p = 0; p < np; p++)
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
            float *yo = y + (int64_t)(m0 + i) * ldy + 2 * p;
            yo[0] = hsum8(lo_half(acc[p][i])) - corr[2 * p][i];
            yo[1] = hsum8(hi_half(acc[p][i])) - corr[2 * p + 1][i];
        }
}

/* q8, 2 * np weight rows x nt activation rows; see q8_tile. AVX-512 has no vpsignb: the sign
 * of w moves onto the activations with a masked negation (w < 0), |w| stays unsigned. */
TGT5 INL void q8_tile512(const uint8_t *w0, int64_t rb, const int np, int K, int G, int asym, const int8_t *qa,
                         const float *d, const float *ag, int M, int m0, const int nt, float *y, int64_t ldy) {
    const int ng = K / G, bpg = G / QK;
    const __m512i z = _mm512_setzero_si512();
    __m512 acc[NP][MT];
    float corr[2 * NP][MT];
    const uint8_t *rw[2 * NP];
    _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) rw[j] = w0 + j * rb;
    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
        _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) acc[p][i] = _mm512_setzero_ps();
        _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) corr[j][i] = 0.f;
    }
    for (int g = 0; g < ng; g++) {
        float s[2 * NP];
        __m512 sv[NP];
        _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) s[j] = _cvtsh_ss(((const uint16_t *)(rw[j] + K))[g]);
        _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) sv[p] = pair_ps(_mm256_set1_ps(s[2 * p]), _mm256_set1_ps(s[2 * p + 1]));
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            __m512i aw[NP];
            __mmask64 neg[NP];
            _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                const uint8_t *wa = rw[2 * p] + b * QK, *wb = rw[2 * p + 1] + b * QK;
                if (!(b & 1)) { prefetch_line(wa); prefetch_line(wb); }
                __m512i w = ld_pair(wa, wb);
                aw[p] = _mm512_abs_epi8(w);
                neg[p] = _mm512_movepi8_mask(w);
            }
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                __m512i av = bcast32(qa + (int64_t)(m0 + i) * K + b * QK);
                __m512 dvec = _mm512_set1_ps(d[(int64_t)(m0 + i) * (K / QK) + b]);
                _Pragma("GCC unroll 2") for (int p = 0; p < np; p++) {
                    __m512i sa = _mm512_mask_sub_epi8(av, neg[p], z, av);
                    __m512i q = _mm512_dpbusd_epi32(z, aw[p], sa);
                    acc[p][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_mul_ps(sv[p], dvec), acc[p][i]);
                }
            }
        }
        if (asym) {
            _Pragma("GCC unroll 4") for (int j = 0; j < 2 * np; j++) {
                float sz = s[j] * (float)((int)(rw[j] + K + 2 * ng)[g] - 128);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) corr[j][i] += sz * ag[(int64_t)g * M + m0 + i];
            }
        }
    }
    _Pragma("GCC unroll 2") for (int p = 0; p < np; p++)
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
            float *yo = y + (int64_t)(m0 + i) * ldy + 2 * p;
            yo[0] = hsum8(lo_half(acc[p][i])) - corr[2 * p][i];
            yo[1] = hsum8(hi_half(acc[p][i])) - corr[2 * p + 1][i];
        }
}

TGT5 static void rows_avx512(const uint8_t *w, int64_t rb, int n0, int n1, int bits, int K, int G, int asym,
                             const int8_t *qa, const float *dvd, const float *ag, int M, int m0, int mt,
                             float *y, int64_t ldy) {
    int n = n0;
    if (mt == MT)
        for (; n + 2 * NP <= n1; n += 2 * NP) {
            const uint8_t *row = w + (int64_t)n * rb;
            if (bits == 8) q8_tile512(row, rb, NP, K, G, asym, qa, dvd, ag, M, m0, MT, y + n, ldy);
            else q4_tile512(row, rb, NP, K, G, asym, qa, dvd, ag, M, m0, MT, y + n, ldy);
        }
    for (; n < n1; n++) row_avx2(w + (int64_t)n * rb, bits, K, G, asym, qa, dvd, ag, M, m0, mt, y + n, ldy);
}

/* ------------------------------------------------------------------ entry points */

/* One activation matrix [M, K], quantized for a weight with (bits, G) on `path`. */
typedef struct {
    int M, K, G, bits, path;
    int8_t *qa;          /* [M, K] int8 codes (q4: permuted per superblock) */
    float *d, *bsum;     /* [M, K/32]: block scales and d_b * sum(q_b) */
    float *ag;           /* [K/G, M]: A_g for the zero-point correction */
    float *dv;           /* [M, K/8]: the AVX2 q4 kernel's per-lane scales (else NULL) */
} acts_t;

static void acts_free(acts_t *a) {
    free(a->qa); free(a->d); free(a->bsum); free(a->ag); free(a->dv);
}

static int acts_alloc(acts_t *a, int M, int K, int bits, int G, int path) {
    int nb = K / QK;
    *a = (acts_t){M, K, G, bits, path, NULL, NULL, NULL, NULL, NULL};
    a->qa = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    a->d = malloc(sizeof(float) * M * nb);
    a->bsum = malloc(sizeof(float) * M * nb);
    a->ag = malloc(sizeof(float) * M * (K / G));
    if (bits == 4 && path >= 1) a->dv = malloc(sizeof(float) * M * (K / 8));
    if (!a->qa || !a->d || !a->bsum || !a->ag || (bits == 4 && path >= 1 && !a->dv)) {
        acts_free(a);
        return -1;
    }
    return 0;
}

/* Quantize rows m0..m1 of x [M, K] into a (rows are independent: callers may split them). */
static void acts_quant(acts_t *a, const float *x, int m0, int m1) {
    int K = a->K, M = a->M, G = a->G, nb = K / QK;
    int64_t o = (int64_t)m0 * K, ob = (int64_t)m0 * nb;
    (a->path >= 1 ? quant_act_avx2 : quant_act)(x + o, m1 - m0, K, dbrxq_act_span(a->bits, G), a->bits == 4, a->qa + o,
                                                a->d + ob, a->bsum + ob);
    for (int m = m0; m < m1; m++) {
        for (int g = 0; g < K / G; g++) {
            float s = 0.f;
            for (int b = g * (G / QK); b < (g + 1) * (G / QK); b++) s += a->bsum[(int64_t)m * nb + b];
            a->ag[(int64_t)g * M + m] = s;
        }
        if (a->dv)
            for (int sb = 0; sb < K / 64; sb++)
                for (int l = 0; l < 8; l++)
                    a->dv[(int64_t)m * (K / 8) + sb * 8 + l] = a->d[(int64_t)m * nb + 2 * sb + (l >> 2)];
    }
}

/* y[:, n0:n1] (row stride ldy) for one chunk of weight rows, all activation rows. */
static void chunk_rows(const acts_t *a, const uint8_t *w, int asym, int n0, int n1, float *y, int64_t ldy) {
    int M = a->M, K = a->K, G = a->G, bits = a->bits;
    int64_t rb = dbrxq_row_bytes(bits, K, G, asym);
    for (int m0 = 0; m0 < M; m0 += MT) {
        int mt = M - m0 < MT ? M - m0 : MT;
        if (a->path >= 1) {
            (a->path == 2 ? rows_avx512 : rows_avx2)(w, rb, n0, n1, bits, K, G, asym, a->qa, a->dv ? a->dv : a->d,
                                                     a->ag, M, m0, mt, y, ldy);
            continue;
        }
        for (int n = n0; n < n1; n++)
            rows_generic(w + (int64_t)n * rb, bits, K, G, asym, a->qa, a->d, a->bsum, m0, mt, y + n, ldy);
    }
}

static int nchunks_of(int N) { return (N + NCHUNK - 1) / NCHUNK; }
static int chunk_end(int c, int N) { return c * NCHUNK + NCHUNK < N ? c * NCHUNK + NCHUNK : N; }

/* y [M, N] float32 = x [M, K] float32 @ W^T; W as repacked row records (w, row_bytes).
 * path: 0 generic scalar, 1 AVX2. Returns 0, or -1 on allocation failure. */
int dbrxq_matmul(const float *x, int M, int K, const uint8_t *w, int N, int bits, int G,
                 int asym, float *y, int path, int nthreads) {
    acts_t a;
    if (acts_alloc(&a, M, K, bits, G, path)) return -1;
    acts_quant(&a, x, 0, M);
    int nc = nchunks_of(N);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int c = 0; c < nc; c++) chunk_rows(&a, w, asym, c * NCHUNK, chunk_end(c, N), y, N);
    acts_free(&a);
    return 0;
}

/* One DBRX expert, y [M, D] = (silu(x @ W1^T) * (x @ V1^T)) @ W2^T, in ONE call and one
 * parallel region: x [M, D] is quantized once for W1 and V1 [F, D] (same bits, G, asym as
 * W2 [D, F]), whose rows are shared out together; silu * product and the quantization of the
 * hidden state are split over the threads; then W2. Against three dbrxq_matmul calls this saves
 * two thread wake-ups and barriers, one activation quantization and the Python in between.
 * silu(t) = t / (1 + exp(-t)) in float32. Returns 0, or -1 on allocation failure. */
int dbrxq_glu(const float *x, int M, int D, int F, const uint8_t *w1, const uint8_t *v1,
              const uint8_t *w2, int bits, int G1, int G2, int asym, float *y, int path, int nthreads) {
    acts_t ax, ah;
    float *h = malloc(sizeof(float) * 2 * (size_t)M * F); /* [M, F] gate, then [M, F] up */
    if (!h || acts_alloc(&ax, M, D, bits, G1, path)) { free(h); return -1; }
    if (acts_alloc(&ah, M, F, bits, G2, path)) { free(h); acts_free(&ax); return -1; }
    float *up = h + (size_t)M * F;
    int nc1 = nchunks_of(F), nc2 = nchunks_of(D);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) acts_quant(&ax, x, m, m + 1);
#pragma omp for schedule(dynamic, 16)
        for (int c = 0; c < 2 * nc1; c++) {
            int cc = c < nc1 ? c : c - nc1;
            chunk_rows(&ax, c < nc1 ? w1 : v1, asym, cc * NCHUNK, chunk_end(cc, F), c < nc1 ? h : up, F);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (int64_t)M * F; i++) h[i] = h[i] / (1.f + expf(-h[i])) * up[i];
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) acts_quant(&ah, h, m, m + 1);
#pragma omp for schedule(dynamic, 16)
        for (int c = 0; c < nc2; c++) chunk_rows(&ah, w2, asym, c * NCHUNK, chunk_end(c, D), y, D);
    }
    free(h); acts_free(&ax); acts_free(&ah);
    return 0;
}
