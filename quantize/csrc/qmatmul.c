/* dbrxq's own weight-only quantized matmul for CPUs: y[M, N] = x[M, K] @ W[N, K]^T.
 *
 * Plain C (no torch headers) so it compiles in a second; quantize/cext.py builds it with
 * `gcc -O3 -fopenmp -shared` and loads it with ctypes. The SIMD functions carry target
 * attributes (AVX2; AVX-512 F/BW/VL + VNNI) so ONE build holds every path and the file never
 * needs -march flags; Python picks the path from /proc/cpuinfo at run time.
 *
 * Method (the llama.cpp Q4_0 x Q8_0 idea): activations are quantized per row, per span of 32
 * values (128 for q4 with groups a multiple of 128: dbrxq_act_span), to int8 with a float scale
 * d = amax / 127 over the span (q = round(x / d), |q| <= 127), kept per 32-block. Weights keep
 * their canonical unsigned codes c (format.py), repacked at load into BLOCKS of RB = 16 output
 * rows, interleaved so that one 32-bit lane of a SIMD register belongs to one output row:
 *
 *   q4: codes  per octet of columns k0..k0+7: 16 rows x 4 bytes (64 B), byte j of row r holds
 *              c[r][k0 + j] | c[r][k0 + 4 + j] << 4: masking the low nibbles of one 64-byte load
 *              gives every row's 4 codes for k0..k0+3 (a u8 quad per lane), the high nibbles
 *              those for k0+4..k0+7.
 *   q8: codes  per quad of columns: 16 rows x 4 bytes, int8 c - 128.
 *   then       scales fp16 [K/G][16 rows], then zeros uint8 [K/G][16 rows] (asymmetric only);
 *              the block is padded to 64 B, and N is padded to a multiple of 16 with zero rows.
 *
 * One activation quad (4 int8, natural column order) broadcast to all lanes then meets every
 * row's codes in one multiply-add: vpdpbusd on AVX-512 (u8 x s8, 4 products into each int32
 * lane), vpmaddubsw + vpmaddwd on AVX2. So the dot product over a span is an exact integer per
 * lane, isum[r] = sum_k w_int[r, k] * q_k (w_int = c for q4, c - 128 for q8), and the float work
 * happens once per span for 16 rows at a time. Per (output row n, activation row m), in order:
 *
 *   acc  = fma(float(isum_span), s_g(span) * d_span, acc)        over the spans of K
 *   corr = fma(s_g * zc_g, A_g, corr)                             over the groups of K
 *   y    = acc - corr,   A_g = sum_{b in g} d_b * sum_{k in b} q_k,
 *   zc_g = 8 (q4 sym), z_g (q4 asym), 0 (q8 sym), z_g - 128 (q8 asym).
 *
 * Every path (generic C, AVX2, AVX-512) performs exactly these float operations, so their
 * results are bit-identical, and a row's result never depends on how many rows are batched
 * with it (M). The only error against the float reference is activation quantization,
 * |x - d q| <= d / 2 per element:  |y - y_ref| <= sum_k |W[n,k]| * d(k) / 2 (+ float rounding).
 *
 * Blocking: a work item is BPI blocks (256 rows) handed to OpenMP threads dynamically (on a
 * shared 2-core VM one thread is often slowed, and static halves left the other idle). Within an
 * item, each block (RB rows x K: 49 KB at K = 6144, int4) is streamed once from memory and then
 * stays in L2 while every tile of MT activation rows passes over it; the activation tile is read
 * from L1/L2. Decode (M = 1) is the same loop with one activation row: a stream of weights.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define QK 32   /* activation block */
#define RB 16   /* output rows per weight block (one 32-bit lane each on AVX-512) */
#define BPI 16  /* blocks per work item */
#ifndef MT
#define MT 8    /* activation rows per tile */
#endif
#ifndef PF
/* Software prefetch distance in bytes (prefetch_line: L1 at PF, L2 at 4 * PF), about bandwidth x
 * memory latency of one core's share, with room. Blocks are walked in memory order, so the
 * prefetch runs on across block boundaries, which the hardware prefetchers (trained per 4 KB
 * page) do not. */
#define PF 8192
#endif

/* ------------------------------------------------------------------ layout */

/* The layout generation: part of the prepared-expert file key (dbrxq/runtime/prepared.py). */
int dbrxq_layout_version(void) { return 3; } /* 3: native 2- and 3-bit blocks */

/* Code bytes of one block: K/2 per row at 4 bits, K at 8, K/4 at 2, 3K/8 at 3 (two planes). */
static int64_t codes_bytes(int bits, int K) {
    return (int64_t)RB * (bits == 4 ? K / 2 : bits == 8 ? K : bits == 2 ? K / 4 : bits == 3 ? 3 * K / 8
                          : bits == 5 ? 5 * K / 8 : 3 * K / 4 /* 6 */);
}

/* K-quant weights (llama.cpp's Q2_K .. Q6_K, exactly): bits = KQ + the GGML type id. Per type: the
 * code width as stored (5 and 6 bits in the 8-bit layout), the sub-block (values per integer scale),
 * whether sub-blocks have an integer min, and the code offset (W = d sc (c - off) - dmin m). */
#define KQ 16
#define QKK 256 /* a super-block: one fp16 d (and dmin) */
typedef struct { int cbits, sub, mins, off; } kqi_t;
static kqi_t kq_info(int bits) {
    switch (bits - KQ) {
    case 10: return (kqi_t){2, 16, 1, 0};  /* Q2_K */
    case 11: return (kqi_t){3, 16, 0, 4};  /* Q3_K */
    case 12: return (kqi_t){4, 32, 1, 0};  /* Q4_K */
    case 13: return (kqi_t){5, 32, 1, 0};  /* Q5_K */
    case 14: return (kqi_t){6, 16, 0, 32}; /* Q6_K */
    }
    return (kqi_t){0, 0, 0, 0};
}
int dbrxq_kq_kind(int bits) { return kq_info(bits).cbits != 0; }

/* Bytes of one K-quant block of RB rows: codes, int8 sub-scales [K/sub][RB], uint8 mins [K/sub][RB]
 * (types with mins), fp16 d [K/256][RB], fp16 dmin [K/256][RB] (types with mins); a multiple of 64. */
static int64_t kq_block_bytes(int bits, int K) {
    kqi_t t = kq_info(bits);
    int64_t b = codes_bytes(t.cbits, K) + (int64_t)RB * (K / t.sub) * (1 + t.mins) + (int64_t)RB * (K / QKK) * 2 * (1 + t.mins);
    return (b + 63) / 64 * 64;
}

/* Bytes of one block of RB rows (codes, scales, zeros), a multiple of 64. */
static int64_t block_bytes(int bits, int K, int G, int asym) {
    if (bits >= KQ) return kq_block_bytes(bits, K);
    int64_t b = codes_bytes(bits, K) + (int64_t)RB * (K / G) * (asym ? 3 : 2);
    return (b + 63) / 64 * 64;
}

/* Bytes of a whole repacked weight [N, K]: ceil(N / RB) blocks. */
int64_t dbrxq_packed_bytes(int bits, int N, int K, int G, int asym) {
    return (int64_t)((N + RB - 1) / RB) * block_bytes(bits, K, G, asym);
}

/* Bytes per row (a block's bytes / RB), for callers that size one row's share. */
int64_t dbrxq_row_bytes(int bits, int K, int G, int asym) { return block_bytes(bits, K, G, asym) / RB; }

/* Row r's codes c [K] into its block (the layouts above). */
static void put_codes(uint8_t *blk, const uint8_t *c, int bits, int K, int r) {
    if (bits == 4) {
        for (int k0 = 0; k0 < K; k0 += 8)
            for (int j = 0; j < 4; j++)
                blk[(k0 / 8) * (RB * 4) + r * 4 + j] = (uint8_t)(c[k0 + j] | c[k0 + 4 + j] << 4);
    } else if (bits == 2) { /* per 16 columns: byte j of row r = c[k0+j] | c[k0+4+j] << 2 | ... << 6 */
        for (int k0 = 0; k0 < K; k0 += 16)
            for (int j = 0; j < 4; j++)
                blk[(k0 / 16) * (RB * 4) + r * 4 + j] =
                    (uint8_t)(c[k0 + j] | c[k0 + 4 + j] << 2 | c[k0 + 8 + j] << 4 | c[k0 + 12 + j] << 6);
    } else if (bits == 3) { /* per 32 columns, 3 x 64 bytes: the low 2 bits of columns 0-15 and 16-31
                               (as at 2 bits), then the high bits: bit u of byte j of row r = column 4u + j */
        for (int k0 = 0; k0 < K; k0 += 32) {
            uint8_t *o = blk + (k0 / 32) * (RB * 4 * 3);
            for (int j = 0; j < 4; j++) {
                for (int half = 0; half < 2; half++) {
                    const uint8_t *ch = c + k0 + 16 * half;
                    o[half * (RB * 4) + r * 4 + j] = (uint8_t)((ch[j] & 3) | (ch[4 + j] & 3) << 2 |
                                                               (ch[8 + j] & 3) << 4 | (ch[12 + j] & 3) << 6);
                }
                uint8_t hb = 0;
                for (int u = 0; u < 8; u++) hb |= (uint8_t)(((c[k0 + 4 * u + j] >> 2) & 1) << u);
                o[2 * (RB * 4) + r * 4 + j] = hb;
            }
        }
    } else if (bits == 5 || bits == 6) { /* K-quants' Q5_K / Q6_K codes: the low nibbles as at 4 bits, then a
        plane of the high bits: 6 bits, per 16 columns one line as at 2 bits; 5 bits, per 32 columns one line,
        bit u of byte j = column 4u + j (the 3-bit layout's high plane) */
        for (int k0 = 0; k0 < K; k0 += 8)
            for (int j = 0; j < 4; j++)
                blk[(k0 / 8) * (RB * 4) + r * 4 + j] = (uint8_t)((c[k0 + j] & 15) | (c[k0 + 4 + j] & 15) << 4);
        uint8_t *pl = blk + (int64_t)RB * K / 2;
        if (bits == 6) {
            for (int k0 = 0; k0 < K; k0 += 16)
                for (int j = 0; j < 4; j++)
                    pl[(k0 / 16) * (RB * 4) + r * 4 + j] = (uint8_t)((c[k0 + j] >> 4) | (c[k0 + 4 + j] >> 4) << 2 |
                                                                     (c[k0 + 8 + j] >> 4) << 4 | (c[k0 + 12 + j] >> 4) << 6);
        } else {
            for (int k0 = 0; k0 < K; k0 += 32)
                for (int j = 0; j < 4; j++) {
                    uint8_t hb = 0;
                    for (int u = 0; u < 8; u++) hb |= (uint8_t)(((c[k0 + 4 * u + j] >> 4) & 1) << u);
                    pl[(k0 / 32) * (RB * 4) + r * 4 + j] = hb;
                }
        }
    } else {
        for (int k0 = 0; k0 < K; k0 += 4)
            for (int j = 0; j < 4; j++) blk[(k0 / 4) * (RB * 4) + r * 4 + j] = (uint8_t)(c[k0 + j] ^ 0x80);
    }
}

/* Repack one canonical weight (codes uint8 [N, K] unpacked, scales fp16 [N, K/G],
 * zeros uint8 [N, K/G] or NULL) into blocks (dst: dbrxq_packed_bytes). Padding rows are zero. */
void dbrxq_repack(const uint8_t *codes, const uint16_t *scales, const uint8_t *zeros,
                  int bits, int N, int K, int G, uint8_t *dst) {
    int ng = K / G, nb = (N + RB - 1) / RB;
    int64_t bb = block_bytes(bits, K, G, zeros != NULL), cb = codes_bytes(bits, K);
    memset(dst, 0, (size_t)(nb * bb));
    for (int n = 0; n < N; n++) {
        uint8_t *blk = dst + (n / RB) * bb;
        int r = n % RB;
        put_codes(blk, codes + (int64_t)n * K, bits, K, r);
        uint16_t *sc = (uint16_t *)(blk + cb);
        for (int g = 0; g < ng; g++) sc[g * RB + r] = scales[(int64_t)n * ng + g];
        if (zeros) {
            uint8_t *zp = blk + cb + 2 * RB * ng;
            for (int g = 0; g < ng; g++) zp[g * RB + r] = zeros[(int64_t)n * ng + g];
        }
    }
}

/* Repack one K-quant weight [N, K] (K a multiple of 256) into blocks (dst: dbrxq_packed_bytes):
 * codes uint8 [N, K] unsigned (the grid's code minus its lowest, so c - off is llama.cpp's signed
 * code), sc int8 [N, K/sub], mn uint8 [N, K/sub] (types with mins, else NULL), d and dmin fp16
 * [N, K/256] (dmin NULL without mins). The integers and halves are copied, never rounded: the
 * weight the kernel computes with is llama.cpp's dequantization of the same block. */
/* Row r of a block from its unpacked K-quant parts (one row: codes [K], sc/mn [K/sub], d/dmin [K/256]). */
static void kq_put_row(uint8_t *blk, int r, const uint8_t *codes, const int8_t *sc, const uint8_t *mn,
                       const uint16_t *d, const uint16_t *dmin, kqi_t t, int K) {
    int ns = K / t.sub, nsb = K / QKK;
    if (codes) put_codes(blk, codes, t.cbits, K, r); /* NULL: the caller placed them (put_q4k) */
    int8_t *s = (int8_t *)(blk + codes_bytes(t.cbits, K));
    uint8_t *m = (uint8_t *)s + (int64_t)RB * ns;
    uint16_t *dd = (uint16_t *)(m + (t.mins ? (int64_t)RB * ns : 0)), *dm = dd + RB * nsb;
    for (int j = 0; j < ns; j++) {
        s[j * RB + r] = sc[j];
        if (t.mins) m[j * RB + r] = mn[j];
    }
    for (int j = 0; j < nsb; j++) {
        dd[j * RB + r] = d[j];
        if (t.mins) dm[j * RB + r] = dmin[j];
    }
}

void dbrxq_kq_repack(const uint8_t *codes, const int8_t *sc, const uint8_t *mn, const uint16_t *d,
                     const uint16_t *dmin, int bits, int N, int K, uint8_t *dst) {
    kqi_t t = kq_info(bits);
    int ns = K / t.sub, nsb = K / QKK, nb = (N + RB - 1) / RB;
    int64_t bb = kq_block_bytes(bits, K);
    memset(dst, 0, (size_t)(nb * bb));
    for (int n = 0; n < N; n++)
        kq_put_row(dst + (n / RB) * bb, n % RB, codes + (int64_t)n * K, sc + (int64_t)n * ns,
                   mn ? mn + (int64_t)n * ns : NULL, d + (int64_t)n * nsb, dmin ? dmin + (int64_t)n * nsb : NULL, t, K);
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* One GGUF block of 256 values (llama.cpp's block_q2_K .. block_q6_K, little-endian) into unsigned codes
 * c[256] (minus the grid's lowest code), sub-block scales and mins, d and dmin: the layouts of llama.cpp's
 * dequantize_row_* (quantize/kquants.py's from_bytes reads the same, in numpy). */
static void kq_parse(int bits, const uint8_t *b, uint8_t *c, int8_t *sc, uint8_t *mn, uint16_t *d, uint16_t *dmin) {
    switch (bits - KQ) {
    case 10: /* Q2_K: scales[16] (sc | m << 4), qs[64], d, dmin */
        for (int j = 0; j < 16; j++) { sc[j] = (int8_t)(b[j] & 15); mn[j] = b[j] >> 4; }
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 32; l++) c[h * 128 + r * 32 + l] = (b[16 + h * 32 + l] >> (2 * r)) & 3;
        *d = rd16(b + 80); *dmin = rd16(b + 82);
        break;
    case 11: { /* Q3_K: hmask[32], qs[64], scales[12] (16 6-bit, biased by 32), d */
        const uint8_t *hm = b, *qs = b + 32, *s = b + 96;
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 32; l++) {
                    int v = h * 128 + r * 32 + l;
                    c[v] = (uint8_t)(((qs[h * 32 + l] >> (2 * r)) & 3) | (((hm[l] >> (v / 32)) & 1) << 2));
                }
        for (int j = 0; j < 16; j++) {
            int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4, hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
            sc[j] = (int8_t)((lo | hi << 4) - 32);
        }
        *d = rd16(b + 108);
        break;
    }
    case 12: case 13: { /* Q4_K / Q5_K: d, dmin, scales[12] (8 6-bit scales and mins), [qh[32]], qs[128] */
        const uint8_t *s = b + 4, *qh = b + 16, *qs = b + (bits - KQ == 13 ? 48 : 16);
        *d = rd16(b); *dmin = rd16(b + 2);
        for (int j = 0; j < 8; j++) {
            sc[j] = (int8_t)(j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
            mn[j] = (uint8_t)(j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4));
        }
        if (!c) break; /* Q4_K's codes go straight to the block (put_q4k) */
        for (int i = 0; i < 4; i++)
            for (int l = 0; l < 32; l++) {
                c[i * 64 + l] = qs[i * 32 + l] & 15;
                c[i * 64 + 32 + l] = qs[i * 32 + l] >> 4;
            }
        if (bits - KQ == 13)
            for (int v = 0; v < 256; v++) c[v] |= (uint8_t)(((qh[v % 32] >> (v / 32)) & 1) << 4);
        break;
    }
    default: { /* Q6_K: ql[128], qh[64], scales[16] int8, d */
        const uint8_t *ql = b, *qh = b + 128;
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 4; r++)
                for (int l = 0; l < 32; l++) {
                    uint8_t lo = r < 2 ? ql[h * 64 + r * 32 + l] & 15 : ql[h * 64 + (r - 2) * 32 + l] >> 4;
                    c[h * 128 + r * 32 + l] = (uint8_t)(lo | ((qh[h * 32 + l] >> (2 * r)) & 3) << 4);
                }
        memcpy(sc, b + 192, 16);
        *d = rd16(b + 208);
    }
    }
}

/* Q4_K's qs[128] of super-block j straight into row r's 4-bit lines, with no code array between: qs[32 i + l]
 * holds column 64 i + l (low nibble) and 64 i + 32 + l (high); byte jj of a line of 8 columns k0.. holds
 * c[k0 + jj] | c[k0 + 4 + jj] << 4 (dbrxq_repack). The loader's most common type, at twice the general path. */
static void put_q4k(uint8_t *blk, int r, const uint8_t *qs, int j) {
    for (int i = 0; i < 4; i++)
        for (int m = 0; m < 8; m++) {
            uint8_t *o = blk + (int64_t)((j * QKK + i * 64 + 8 * m) / 8) * (RB * 4) + r * 4;
            const uint8_t *a = qs + i * 32 + 8 * (m & 3);
            if (m < 4)
                for (int jj = 0; jj < 4; jj++) o[jj] = (uint8_t)((a[jj] & 15) | (a[jj + 4] & 15) << 4);
            else
                for (int jj = 0; jj < 4; jj++) o[jj] = (uint8_t)((a[jj] >> 4) | (a[jj + 4] & 0xF0));
        }
}

/* Bytes of one GGUF block of 256 values of a K-quant kind. */
int dbrxq_kq_ggml_block_bytes(int bits) {
    static const int bytes[] = {84, 110, 144, 176, 210};
    return kq_info(bits).cbits ? bytes[bits - KQ - 10] : 0;
}

/* A GGUF K-quant tensor [N, K] (rows of K/256 blocks) straight into the kernel's blocks (dst:
 * dbrxq_packed_bytes), blocks of rows in parallel: what kquants.from_bytes + dbrxq_kq_repack give, at
 * memory speed. Returns 0; -1 on allocation failure; -2 when a block's d or dmin is not finite (an fp16
 * of exponent 31: the weights would be NaN or Inf), after converting the rest. */
int dbrxq_kq_from_ggml(const uint8_t *src, int bits, int N, int K, uint8_t *dst, int nthreads) {
    kqi_t t = kq_info(bits);
    int nsb = K / QKK, ns = K / t.sub, nb = (N + RB - 1) / RB, per = dbrxq_kq_ggml_block_bytes(bits);
    int64_t bb = kq_block_bytes(bits, K);
    int failed = 0, nonfinite = 0;
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : nonfinite)
    {
        uint8_t *c = malloc((size_t)K + 2 * (size_t)ns + 4 * (size_t)nsb + 8);
        int8_t *sc = (int8_t *)(c + K);
        uint8_t *mn = (uint8_t *)(sc + ns);
        uint16_t *d = (uint16_t *)(c + ((K + 2 * (size_t)ns + 1) & ~(size_t)1)), *dm = d + nsb;
        if (!c) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int b = 0; b < nb; b++) {
            if (!c) continue;
            memset(dst + (int64_t)b * bb, 0, (size_t)bb);
            for (int n = b * RB; n < N && n < (b + 1) * RB; n++) {
                const uint8_t *row = src + (int64_t)n * nsb * per;
                const int q4k = bits - KQ == 12;
                for (int j = 0; j < nsb; j++) {
                    const uint8_t *blk = row + (int64_t)j * per;
                    kq_parse(bits, blk, q4k ? NULL : c + j * QKK, sc + j * (QKK / t.sub), mn + j * (QKK / t.sub), d + j,
                             dm + j);
                    if (q4k) put_q4k(dst + (int64_t)b * bb, n % RB, blk + 16, j);
                    nonfinite |= (d[j] & 0x7C00) == 0x7C00 || (t.mins && (dm[j] & 0x7C00) == 0x7C00);
                }
                kq_put_row(dst + (int64_t)b * bb, n % RB, q4k ? NULL : c, sc, t.mins ? mn : NULL, d, t.mins ? dm : NULL, t, K);
            }
        }
        free(c);
    }
    return failed ? -1 : nonfinite ? -2 : 0;
}

/* Activation values that share one scale: 128 for q4 weights whose group size is a multiple
 * of 128, 256 (a super-block, as llama.cpp's Q8_K) for K-quants, else QK. A coarser grid than 32
 * for fewer float steps per integer product. */
int dbrxq_act_span(int bits, int G) { return bits >= KQ ? QKK : bits == 4 && G % 128 == 0 ? 128 : QK; }

/* ------------------------------------------------------------------ activations */

/* Quantize activations x [M, K] float32 -> qa int8 [M, K], d [M, K/32] (scale of each
 * 32-block: d = amax / 127 over its span, 32 or 128 values, K % span == 0), qs [M, K/32]
 * int32 sum of its codes, bsum [M, K/32] = d * qs. */
static void quant_act(const float *x, int M, int K, int span, int8_t *qa, float *d, int32_t *qs, float *bsum) {
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
                qa[(int64_t)m * K + b * QK + i] = (int8_t)q;
                s += q;
            }
            d[m * (K / QK) + b] = db;
            qs[m * (K / QK) + b] = s;
            bsum[m * (K / QK) + b] = db * (float)s;
        }
}

#define TGT __attribute__((target("avx2,fma,f16c")))
#define TGT5 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline))

/* quant_act for AVX2, bit-identical to the generic one (the same float operations; cvtps
 * rounds half to even like the magic number). */
TGT static void quant_act_avx2(const float *x, int M, int K, int span, int8_t *qa, float *d, int32_t *qs,
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
            _mm256_storeu_si256((__m256i *)(qa + (int64_t)m * K + b * QK), p);
            int si = _mm_cvtsi128_si32(s);
            d[m * (K / QK) + b] = db;
            qs[m * (K / QK) + b] = si;
            bsum[m * (K / QK) + b] = db * (float)si;
        }
}

/* One activation matrix [M, K], quantized for a weight with (bits, G) on `path`. */
typedef struct {
    int M, K, G, bits, path;
    int8_t *qa;      /* [M, K] int8 codes */
    float *d, *bsum; /* [M, K/32]: block scales and d_b * sum(q_b) */
    int32_t *qs;     /* [M, K/32]: sum(q_b) */
    float *ag;       /* [M, K/G]: A_g for the zero-point correction (K-quants: unused) */
    int32_t *qs16;   /* [M, K/16]: sum of the codes of each 16 values (K-quants only, else NULL) */
} acts_t;

static void acts_free(acts_t *a) { free(a->qa); free(a->d); free(a->bsum); free(a->qs); free(a->ag); free(a->qs16); }

static int acts_alloc(acts_t *a, int M, int K, int bits, int G, int path) {
    int nb = K / QK;
    if (bits >= KQ) G = QKK;
    *a = (acts_t){M, K, G, bits, path, NULL, NULL, NULL, NULL, NULL, NULL};
    a->qa = aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    a->d = malloc(sizeof(float) * M * nb);
    a->bsum = malloc(sizeof(float) * M * nb);
    a->qs = malloc(sizeof(int32_t) * M * nb);
    a->ag = malloc(sizeof(float) * M * (K / G));
    if (bits >= KQ) a->qs16 = malloc(sizeof(int32_t) * M * (K / 16));
    if (!a->qa || !a->d || !a->bsum || !a->qs || !a->ag || (bits >= KQ && !a->qs16)) {
        acts_free(a);
        return -1;
    }
    return 0;
}

/* Quantize rows m0..m1 of x [M, K] into a (rows are independent: callers may split them). */
static void acts_quant(acts_t *a, const float *x, int m0, int m1) {
    int K = a->K, G = a->G, nb = K / QK;
    int64_t o = (int64_t)m0 * K, ob = (int64_t)m0 * nb;
    (a->path >= 1 ? quant_act_avx2 : quant_act)(x + o, m1 - m0, K, dbrxq_act_span(a->bits, G), a->qa + o,
                                                a->d + ob, a->qs + ob, a->bsum + ob);
    if (a->qs16) { /* K-quants: integer code sums per 16 values (exact; the span's one d applies) */
        for (int64_t i = (int64_t)m0 * (K / 16); i < (int64_t)m1 * (K / 16); i++) {
            int32_t t = 0;
            for (int j = 0; j < 16; j++) t += a->qa[i * 16 + j];
            a->qs16[i] = t;
        }
        return;
    }
    for (int m = m0; m < m1; m++)
        for (int g = 0; g < K / G; g++) {
            float s = 0.f;
            for (int b = g * (G / QK); b < (g + 1) * (G / QK); b++) s += a->bsum[(int64_t)m * nb + b];
            a->ag[(int64_t)m * (K / G) + g] = s;
        }
}

/* ------------------------------------------------------------------ block geometry */

/* What the kernels need of one weight block and the activation tile. */
typedef struct {
    const uint8_t *codes;   /* the block's codes */
    const uint16_t *scales; /* [K/G][RB] */
    const uint8_t *zeros;   /* [K/G][RB] or NULL */
    int K, G, bits, span;
} blk_t;

static blk_t block_at(const uint8_t *w, int b, int bits, int K, int G, int asym) {
    const uint8_t *p = w + (int64_t)b * block_bytes(bits, K, G, asym);
    int64_t cb = codes_bytes(bits, K);
    return (blk_t){p, (const uint16_t *)(p + cb), asym ? p + cb + 2 * RB * (K / G) : NULL, K, G, bits,
                   dbrxq_act_span(bits, G)};
}

/* zc_g of row r: what the integer dot products leave to the correction term. */
static inline float zero_code(const blk_t *w, int g, int r) {
    if (w->bits != 8) return (float)(w->zeros ? w->zeros[g * RB + r] : 1 << (w->bits - 1));
    return w->zeros ? (float)((int)w->zeros[g * RB + r] - 128) : 0.f;
}

/* Code of row r at column k of a 2- or 3-bit block (the generic path's decoder; the layouts in dbrxq_repack). */
static inline int low_code(const blk_t *w, int r, int k) {
    if (w->bits == 2) return w->codes[(k / 16) * (RB * 4) + r * 4 + (k & 3)] >> (2 * ((k >> 2) & 3)) & 3;
    const uint8_t *o = w->codes + (k / 32) * (RB * 4 * 3);
    int lo = o[((k % 32) / 16) * (RB * 4) + r * 4 + (k & 3)] >> (2 * ((k >> 2) & 3)) & 3;
    int hi = o[2 * (RB * 4) + r * 4 + (k & 3)] >> ((k % 32) >> 2) & 1;
    return lo | hi << 2;
}

/* Store rows r < nrows of the block's 16 results for activation row m. */
static inline void store_rows(float *y, int64_t ldy, int m, int n0, int nrows, const float *v) {
    float *o = y + (int64_t)m * ldy + n0;
    for (int r = 0; r < nrows; r++) o[r] = v[r];
}

/* ------------------------------------------------------------------ generic scalar path */

static float h2f(uint16_t h) { /* IEEE half -> float, no F16C needed (exact: every half is a float) */
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

static void block_generic(const blk_t *w, const acts_t *a, int m0, int mt, float *y, int64_t ldy, int n0, int nrows) {
    int K = w->K, G = w->G, span = w->span, nb = K / QK, ng = K / G;
    for (int m = m0; m < m0 + mt; m++) {
        const int8_t *q = a->qa + (int64_t)m * K;
        float out[RB];
        for (int r = 0; r < RB; r++) {
            float acc = 0.f, corr = 0.f;
            for (int k0 = 0; k0 < K; k0 += span) {
                int32_t isum = 0;
                for (int k = k0; k < k0 + span; k++) {
                    int c;
                    if (w->bits == 4) {
                        uint8_t byte = w->codes[(k / 8) * (RB * 4) + r * 4 + (k & 3)];
                        c = (k & 4) ? byte >> 4 : byte & 15;
                    } else if (w->bits < 4) {
                        c = low_code(w, r, k);
                    } else {
                        c = (int8_t)w->codes[(k / 4) * (RB * 4) + r * 4 + (k & 3)];
                    }
                    isum += c * q[k];
                }
                float s = h2f(w->scales[(k0 / G) * RB + r]);
                acc = fmaf((float)isum, s * a->d[(int64_t)m * nb + k0 / QK], acc);
            }
            for (int g = 0; g < ng; g++) {
                float s = h2f(w->scales[g * RB + r]);
                corr = fmaf(s * zero_code(w, g, r), a->ag[(int64_t)m * ng + g], corr);
            }
            out[r] = acc - corr;
        }
        store_rows(y, ldy, m, n0, nrows, out);
    }
}

/* ------------------------------------------------------------------ AVX-512 VNNI path */

/* Once per 64-byte line: into L1 PF bytes ahead and into L2 4 * PF ahead. */
INL void prefetch_line(const uint8_t *p) {
    _mm_prefetch((const char *)(p + PF), _MM_HINT_T0);
    _mm_prefetch((const char *)(p + 4 * PF), _MM_HINT_T1);
}

/* Four activation codes as one int32 (unaligned, may alias): read straight from memory, so the
 * compiler can fold the broadcast into vpdpbusd's {1to16} operand instead of a register shuffle. */
typedef int32_t __attribute__((may_alias, aligned(1))) i32u_t;
INL int32_t quad(const int8_t *p) { return *(const i32u_t *)p; }

/* acc += vpdpbusd(w, a). Inline assembly keeps each accumulator in its register: with the
 * intrinsic, GCC 12 copied every accumulator twice per use and broadcast the activations through
 * general registers (88 instructions per octet of an 8-row tile instead of ~30). */
#define DPBUSD(acc, w, a) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(a))
TGT5 INL __m512i bcast_quad(const int8_t *p) { /* vpbroadcastd from memory: a load, no shuffle */
    __m512i r;
    __asm__("vpbroadcastd %1, %0" : "=v"(r) : "m"(*(const i32u_t *)p));
    return r;
}

/* nb blocks (16 rows each, one per 32-bit lane; nb = 1 or 2) x nt activation rows (compile-time
 * constants after inlining). Each broadcast activation quad feeds nb blocks; with one block the
 * low and high nibbles go to two integer chains per row (vpdpbusd's latency stays covered), with
 * two blocks one chain per (block, row) leaves registers for 2 x 8 of them. The integer sum of a
 * span is exact, then one convert and FMA per span and block, as the other paths. */
TGT5 INL void blk512(const blk_t *w, const acts_t *a, int m0, const int nt, const int nb, float *y, int64_t ldy,
                     int n0, int nrows, const uint8_t *next) {
    const int K = w->K, G = w->G, span = w->span, nbk = K / QK, ng = K / G;
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[2][MT], corr[2][MT];
    const int8_t *q[MT];
    _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {
        q[i] = a->qa + (int64_t)(m0 + i) * K;
        _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) acc[b][i] = corr[b][i] = _mm512_setzero_ps();
    }
    for (int k0 = 0; k0 < K; k0 += span) {
        __m512i s[2][MT], s1[MT]; /* s1: the second chain, one block only */
        _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {
            s1[i] = _mm512_setzero_si512();
            _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) s[b][i] = _mm512_setzero_si512();
        }
        if (w->bits < 4) { /* one block (run_blocks): 2 bits, 16 columns per 64-byte line; 3 bits, 32 per 3 lines */
            const __m512i m2 = _mm512_set1_epi8(0x03), b2 = _mm512_set1_epi8(0x04);
            if (w->bits == 2) {
                const uint8_t *cp = w->codes + (int64_t)(k0 / 16) * 64;
                for (int k = k0; k < k0 + span; k += 16, cp += 64) {
                    prefetch_line(cp);
                    __m512i v = _mm512_loadu_si512((const void *)cp);
                    __m512i c0 = _mm512_and_si512(v, m2), c1 = _mm512_and_si512(_mm512_srli_epi16(v, 2), m2);
                    __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m2);
                    __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(v, 6), m2);
                    _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {
                        DPBUSD(s[0][i], c0, bcast_quad(q[i] + k));
                        DPBUSD(s1[i], c1, bcast_quad(q[i] + k + 4));
                        DPBUSD(s[0][i], c2, bcast_quad(q[i] + k + 8));
                        DPBUSD(s1[i], c3, bcast_quad(q[i] + k + 12));
                    }
                }
            } else {
                const uint8_t *cp = w->codes + (int64_t)(k0 / 32) * 192;
                for (int k = k0; k < k0 + span; k += 32, cp += 192) {
                    prefetch_line(cp);
                    prefetch_line(cp + 64);
                    prefetch_line(cp + 128);
                    __m512i l0 = _mm512_loadu_si512((const void *)cp), l1 = _mm512_loadu_si512((const void *)(cp + 64));
                    __m512i hb = _mm512_loadu_si512((const void *)(cp + 128));
                    /* quad u (columns 4u..4u+3): low bits from l0/l1, bit u of hb moved to bit 2 */
#define Q3(u)                                                                                              \
    do {                                                                                                   \
        __m512i c = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16((u) < 4 ? l0 : l1, 2 * ((u) & 3)), m2), \
                                    _mm512_and_si512((u) >= 2 ? _mm512_srli_epi16(hb, (u) - 2)             \
                                                              : _mm512_slli_epi16(hb, 2 - (u)), b2));      \
        _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {                                            \
            if ((u) & 1) DPBUSD(s1[i], c, bcast_quad(q[i] + k + 4 * (u)));                                \
            else DPBUSD(s[0][i], c, bcast_quad(q[i] + k + 4 * (u)));                                      \
        }                                                                                                  \
    } while (0)
                    Q3(0); Q3(1); Q3(2); Q3(3); Q3(4); Q3(5); Q3(6); Q3(7);
#undef Q3
                }
            }
        } else {
        const int step = w->bits == 4 ? 64 : 128; /* code bytes per 8 columns of a block */
        const uint8_t *cp[2];
        _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) cp[b] = w[b].codes + (int64_t)(k0 / 8) * step;
        const uint8_t *np = next ? next + (int64_t)(k0 / 8) * step : NULL;
        for (int k = k0; k < k0 + span; k += 8) {
            __m512i lo[2], hi[2];
            if (np) { /* the next blocks into L2 at this tile's pace: their first tile then reads L2, not DRAM */
                _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++)
                    for (int o = 0; o < step; o += 64) _mm_prefetch((const char *)(np + (w[b].codes - w[0].codes) + o), _MM_HINT_T1);
                np += step;
            }
            _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) {
                prefetch_line(cp[b]);
                if (w->bits == 4) {
                    __m512i v = _mm512_loadu_si512((const void *)cp[b]);
                    lo[b] = _mm512_and_si512(v, m4);
                    hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                } else { /* codes stored c - 128 (int8); vpdpbusd wants u8: c, and 128 * sum(q) comes off below */
                    prefetch_line(cp[b] + 64);
                    lo[b] = _mm512_xor_si512(_mm512_loadu_si512((const void *)cp[b]), flip);
                    hi[b] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(cp[b] + 64)), flip);
                }
                cp[b] += step;
            }
            _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {
                __m512i a0 = bcast_quad(q[i] + k), a1 = bcast_quad(q[i] + k + 4);
                if (nb == 1) {
                    DPBUSD(s[0][i], lo[0], a0);
                    DPBUSD(s1[i], hi[0], a1);
                } else {
                    _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) {
                        DPBUSD(s[b][i], lo[b], a0);
                        DPBUSD(s[b][i], hi[b], a1);
                    }
                }
            }
        }
        }
        _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) {
            __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w[b].scales + (k0 / G) * RB)));
            _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {
                __m512i is = nb == 1 ? _mm512_add_epi32(s[0][i], s1[i]) : s[b][i];
                if (w->bits == 8) is = _mm512_sub_epi32(is, _mm512_set1_epi32(128 * a->qs[(int64_t)(m0 + i) * nbk + k0 / QK]));
                __m512 sd = _mm512_mul_ps(sv, _mm512_set1_ps(a->d[(int64_t)(m0 + i) * nbk + k0 / QK]));
                acc[b][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), sd, acc[b][i]);
            }
        }
    }
    _Pragma("GCC unroll 2") for (int b = 0; b < nb; b++) {
        for (int g = 0; g < ng; g++) {
            __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w[b].scales + g * RB)));
            __m512 zc;
            if (w[b].zeros) {
                zc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w[b].zeros + g * RB))));
                if (w->bits == 8) zc = _mm512_sub_ps(zc, _mm512_set1_ps(128.f)); /* exact: small integers */
            } else {
                zc = _mm512_set1_ps(w->bits == 8 ? 0.f : (float)(1 << (w->bits - 1)));
            }
            __m512 sz = _mm512_mul_ps(sv, zc);
            _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++)
                corr[b][i] = _mm512_fmadd_ps(sz, _mm512_set1_ps(a->ag[(int64_t)(m0 + i) * ng + g]), corr[b][i]);
        }
        int rows = nrows - RB * b;
        _Pragma("GCC unroll 8") for (int i = 0; i < nt; i++) {
            float out[RB];
            _mm512_storeu_ps(out, _mm512_sub_ps(acc[b][i], corr[b][i]));
            store_rows(y, ldy, m0 + i, n0 + RB * b, rows < RB ? rows : RB, out);
        }
    }
}

/* nb (1 or 2) consecutive blocks x activation rows m0..m0+mt; nrows: valid rows from n0 on. */
TGT5 static void block_avx512(const blk_t *w, int nb, const acts_t *a, int m0, int mt, float *y, int64_t ldy,
                              int n0, int nrows, const uint8_t *next) {
#define CASE(t)                                                   \
    case t: {                                                     \
        if (nb == 2) blk512(w, a, m0, t, 2, y, ldy, n0, nrows, next); \
        else blk512(w, a, m0, t, 1, y, ldy, n0, nrows, next);         \
        break;                                                    \
    }
    switch (mt) {
        CASE(8) CASE(7) CASE(6) CASE(5) CASE(4) CASE(3) CASE(2) CASE(1)
    }
#undef CASE
}

/* ------------------------------------------------------------------ AVX2 path */

#define MT2 4 /* activation rows per AVX2 tile (16 ymm registers) */

/* Halves h0..h0+nh-1 (rows 8h..8h+7, one per lane) of one block x nt activation rows (nh, nt
 * compile-time constants after inlining). Decode and small tiles take both halves in one pass
 * over the block, so the prefetch stream runs on while it computes; larger tiles take one half
 * at a time (16 ymm registers). q4: two maddubs per octet summed in int16 (a lane pair holds
 * <= 2 * 15 * 127 per maddubs, 7620 per octet), four octets at most before madd(ones) widens to
 * int32 (30480 < 32767). q8: |w| x sign-moved q (pairs <= 2 * 128 * 127 = 32512), widened per
 * quad. Exact integers, as vpdpbusd. */
TGT INL void blk2(const blk_t *w, const acts_t *a, int m0, const int nt, const int h0, const int nh, float *y,
                  int64_t ldy, int n0, int nrows) {
    const int K = w->K, G = w->G, span = w->span, nb = K / QK, ng = K / G;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[2][MT2], corr[2][MT2];
    const int8_t *q[MT2];
    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
        q[i] = a->qa + (int64_t)(m0 + i) * K;
        _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) acc[j][i] = corr[j][i] = _mm256_setzero_ps();
    }
    for (int k0 = 0; k0 < K; k0 += span) {
        __m256i s32[2][MT2];
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
            _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) s32[j][i] = _mm256_setzero_si256();
        if (w->bits == 4) {
            const uint8_t *cp = w->codes + (int64_t)(k0 / 8) * 64 + 32 * h0;
            for (int k4 = k0; k4 < k0 + span; k4 += 32) {
                __m256i s16[2][MT2];
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                    _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) s16[j][i] = _mm256_setzero_si256();
                for (int k = k4; k < k4 + 32; k += 8, cp += 64) {
                    if (h0 == 0) prefetch_line(cp);
                    _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) {
                        __m256i v = _mm256_loadu_si256((const __m256i *)(cp + 32 * j));
                        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                            s16[j][i] = _mm256_add_epi16(s16[j][i], _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(q[i] + k))),
                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(q[i] + k + 4)))));
                    }
                }
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                    _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++)
                        s32[j][i] = _mm256_add_epi32(s32[j][i], _mm256_madd_epi16(s16[j][i], ones));
            }
        } else if (w->bits < 4) {
            /* span 32 (dbrxq_act_span): at most 8 maddubs per span, each lane pair <= 2 * 7 * 127, so the
             * int16 sums stay <= 14224 before madd(ones) widens them */
            const __m256i m2 = _mm256_set1_epi8(0x03), b2 = _mm256_set1_epi8(0x04);
            __m256i s16[2][MT2];
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) s16[j][i] = _mm256_setzero_si256();
            if (w->bits == 2) {
                const uint8_t *cp = w->codes + (int64_t)(k0 / 16) * 64 + 32 * h0;
                for (int k = k0; k < k0 + span; k += 16, cp += 64) {
                    if (h0 == 0) prefetch_line(cp);
                    _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) {
                        __m256i v = _mm256_loadu_si256((const __m256i *)(cp + 32 * j));
                        _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
                            __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, 2 * u), m2);
                            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                                s16[j][i] = _mm256_add_epi16(s16[j][i],
                                                             _mm256_maddubs_epi16(c, _mm256_set1_epi32(quad(q[i] + k + 4 * u))));
                        }
                    }
                }
            } else {
                const uint8_t *cp = w->codes + (int64_t)(k0 / 32) * 192 + 32 * h0;
                for (int k = k0; k < k0 + span; k += 32, cp += 192) {
                    if (h0 == 0) {
                        prefetch_line(cp);
                        prefetch_line(cp + 64);
                        prefetch_line(cp + 128);
                    }
                    _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) {
                        __m256i l0 = _mm256_loadu_si256((const __m256i *)(cp + 32 * j));
                        __m256i l1 = _mm256_loadu_si256((const __m256i *)(cp + 64 + 32 * j));
                        __m256i hb = _mm256_loadu_si256((const __m256i *)(cp + 128 + 32 * j));
                        _Pragma("GCC unroll 8") for (int u = 0; u < 8; u++) {
                            __m256i lo = _mm256_and_si256(_mm256_srli_epi16(u < 4 ? l0 : l1, 2 * (u & 3)), m2);
                            __m256i hi = _mm256_and_si256(u >= 2 ? _mm256_srli_epi16(hb, u - 2) : _mm256_slli_epi16(hb, 2 - u), b2);
                            __m256i c = _mm256_or_si256(lo, hi);
                            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                                s16[j][i] = _mm256_add_epi16(s16[j][i],
                                                             _mm256_maddubs_epi16(c, _mm256_set1_epi32(quad(q[i] + k + 4 * u))));
                        }
                    }
                }
            }
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) s32[j][i] = _mm256_madd_epi16(s16[j][i], ones);
        } else {
            const uint8_t *cp = w->codes + (int64_t)(k0 / 4) * 64 + 32 * h0;
            for (int k = k0; k < k0 + span; k += 4, cp += 64) {
                if (h0 == 0) prefetch_line(cp);
                _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(cp + 32 * j)), av = _mm256_abs_epi8(v);
                    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                        __m256i sa = _mm256_sign_epi8(_mm256_set1_epi32(quad(q[i] + k)), v);
                        s32[j][i] = _mm256_add_epi32(s32[j][i], _mm256_madd_epi16(_mm256_maddubs_epi16(av, sa), ones));
                    }
                }
            }
        }
        _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) {
            __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->scales + (k0 / G) * RB + 8 * (h0 + j))));
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                __m256 sd = _mm256_mul_ps(sv, _mm256_set1_ps(a->d[(int64_t)(m0 + i) * nb + k0 / QK]));
                acc[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[j][i]), sd, acc[j][i]);
            }
        }
    }
    _Pragma("GCC unroll 2") for (int j = 0; j < nh; j++) {
        const int h = h0 + j;
        for (int g = 0; g < ng; g++) {
            __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->scales + g * RB + 8 * h)));
            __m256 zc;
            if (w->zeros) {
                zc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->zeros + g * RB + 8 * h))));
                if (w->bits == 8) zc = _mm256_sub_ps(zc, _mm256_set1_ps(128.f));
            } else {
                zc = _mm256_set1_ps(w->bits == 8 ? 0.f : (float)(1 << (w->bits - 1)));
            }
            __m256 sz = _mm256_mul_ps(sv, zc);
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++)
                corr[j][i] = _mm256_fmadd_ps(sz, _mm256_set1_ps(a->ag[(int64_t)(m0 + i) * ng + g]), corr[j][i]);
        }
        int rows = nrows - 8 * h;
        if (rows <= 0) continue;
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
            float out[8];
            _mm256_storeu_ps(out, _mm256_sub_ps(acc[j][i], corr[j][i]));
            store_rows(y, ldy, m0 + i, n0 + 8 * h, rows < 8 ? rows : 8, out);
        }
    }
}

TGT static void block_avx2(const blk_t *w, const acts_t *a, int m0, int mt, float *y, int64_t ldy, int n0,
                           int nrows) {
    for (int i = m0; i < m0 + mt;) {
        int t = m0 + mt - i;
        if (t <= 2) { /* both halves in one pass (decode, tile edges) */
            if (t == 2) blk2(w, a, i, 2, 0, 2, y, ldy, n0, nrows);
            else blk2(w, a, i, 1, 0, 2, y, ldy, n0, nrows);
            i += t;
            continue;
        }
        t = t < MT2 ? t : MT2;
        for (int h = 0; h < 2 && 8 * h < nrows; h++) {
            if (t == 4) blk2(w, a, i, 4, h, 1, y, ldy, n0, nrows);
            else blk2(w, a, i, 3, h, 1, y, ldy, n0, nrows);
        }
        i += t;
    }
}

/* ------------------------------------------------------------------ K-quant blocks */

/* K-quant weights keep llama.cpp's integers: per row, per sub-block of 16 or 32 values an integer scale
 * sc (and, with mins, an integer min m), per 256 values fp16 d (and dmin); W = d sc (c - off) - dmin m.
 * Activations take one scale d_a per 256 values (dbrxq_act_span), so per (row, activation row) and
 * super-block j the whole sum is integer but for two float steps, in this order on every path:
 *
 *   isb  = sum over sub-blocks s of sc_s * (sum_k c_k q_k - off * qsum_s)     exact int32
 *   msb  = sum over sub-blocks s of m_s * qsum_s                              exact int32 (mins only)
 *   acc  = fma(float(isb), d_j * d_a, acc);   corr = fma(float(msb), dmin_j * d_a, corr)
 *   y    = acc - corr
 *
 * |isb| <= 32 * 127 * 16 * 128 * 16 (Q6_K, the largest) < 2^31. The codes sit in the 2-, 3- and 4-bit
 * layouts of dbrxq_repack; 5- and 6-bit codes as 4-bit nibbles, then a plane of their high bits (put_codes). */
typedef struct {
    const uint8_t *codes;
    const int8_t *sc;          /* [K/sub][RB] */
    const uint8_t *mn;         /* [K/sub][RB] or NULL */
    const uint16_t *d, *dmin;  /* [K/256][RB]; dmin NULL without mins */
    int K;
    kqi_t t;
} kqb_t;

static kqb_t kq_block_at(const uint8_t *w, int b, int bits, int K) {
    kqi_t t = kq_info(bits);
    const uint8_t *p = w + (int64_t)b * kq_block_bytes(bits, K);
    int64_t ns = K / t.sub;
    const int8_t *sc = (const int8_t *)(p + codes_bytes(t.cbits, K));
    const uint8_t *mn = (const uint8_t *)sc + RB * ns;
    const uint16_t *d = (const uint16_t *)(mn + (t.mins ? RB * ns : 0));
    return (kqb_t){p, sc, t.mins ? mn : NULL, d, t.mins ? d + RB * (K / QKK) : NULL, K, t};
}

/* Unsigned code of row r at column k (the generic path's decoder). */
static inline int kq_code(const kqb_t *w, int r, int k) {
    if (w->t.cbits >= 4 && w->t.cbits <= 6) {
        uint8_t byte = w->codes[(k / 8) * (RB * 4) + r * 4 + (k & 3)];
        int lo = (k & 4) ? byte >> 4 : byte & 15;
        const uint8_t *pl = w->codes + (int64_t)RB * w->K / 2;
        if (w->t.cbits == 6) return lo | ((pl[(k / 16) * (RB * 4) + r * 4 + (k & 3)] >> (2 * ((k >> 2) & 3))) & 3) << 4;
        if (w->t.cbits == 5) return lo | ((pl[(k / 32) * (RB * 4) + r * 4 + (k & 3)] >> ((k % 32) >> 2)) & 1) << 4;
        return lo;
    }
    if (w->t.cbits == 8) return w->codes[(k / 4) * (RB * 4) + r * 4 + (k & 3)] ^ 0x80;
    blk_t b = {w->codes, NULL, NULL, w->K, 0, w->t.cbits, 0};
    return low_code(&b, r, k);
}

/* The activation codes' sum over the sub-block at k0 of row m. */
static inline int32_t kq_qsum(const acts_t *a, int m, int k0, int sub) {
    const int32_t *q = a->qs16 + (int64_t)m * (a->K / 16) + k0 / 16;
    return sub == 16 ? q[0] : q[0] + q[1];
}

static void kq_generic(const kqb_t *w, const acts_t *a, int m0, int mt, float *y, int64_t ldy, int n0, int nrows) {
    const int K = w->K, sub = w->t.sub, nb = K / QK;
    for (int m = m0; m < m0 + mt; m++) {
        const int8_t *q = a->qa + (int64_t)m * K;
        float out[RB];
        for (int r = 0; r < RB; r++) {
            float acc = 0.f, corr = 0.f;
            for (int j = 0; j < K / QKK; j++) {
                int32_t isb = 0, msb = 0;
                for (int k0 = j * QKK; k0 < (j + 1) * QKK; k0 += sub) {
                    int32_t t = 0, qsum = kq_qsum(a, m, k0, sub);
                    for (int k = k0; k < k0 + sub; k++) t += kq_code(w, r, k) * q[k];
                    isb += w->sc[(k0 / sub) * RB + r] * (t - w->t.off * qsum);
                    if (w->mn) msb += w->mn[(k0 / sub) * RB + r] * qsum;
                }
                float da = a->d[(int64_t)m * nb + j * (QKK / QK)];
                acc = fmaf((float)isb, h2f(w->d[j * RB + r]) * da, acc);
                if (w->mn) corr = fmaf((float)msb, h2f(w->dmin[j * RB + r]) * da, corr);
            }
            out[r] = acc - corr;
        }
        store_rows(y, ldy, m, n0, nrows, out);
    }
}

/* One block (16 rows, one per 32-bit lane) x nt <= 4 activation rows (a compile-time constant after
 * inlining): per sub-block two integer chains per row, then the sub-block's scales as int32 lanes. */
TGT5 INL void kq512(const kqb_t *w, const acts_t *a, int m0, const int nt, float *y, int64_t ldy, int n0, int nrows) {
    const int K = w->K, sub = w->t.sub, cbits = w->t.cbits, off = w->t.off, nbk = K / QK;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x03), b2 = _mm512_set1_epi8(0x04);
    __m512 acc[4], corr[4];
    const int8_t *q[4];
    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
        q[i] = a->qa + (int64_t)(m0 + i) * K;
        acc[i] = corr[i] = _mm512_setzero_ps();
    }
    for (int j = 0; j < K / QKK; j++) {
        __m512i isb[4], msb[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) isb[i] = msb[i] = _mm512_setzero_si512();
        for (int k0 = j * QKK; k0 < (j + 1) * QKK; k0 += sub) {
            __m512i t0[4], t1[4];
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) t0[i] = t1[i] = _mm512_setzero_si512();
            if (cbits == 4) { /* sub-blocks of 32: four lines of 8 columns */
                const uint8_t *cp = w->codes + (int64_t)(k0 / 8) * 64;
                for (int k = k0; k < k0 + 32; k += 8, cp += 64) {
                    prefetch_line(cp);
                    __m512i v = _mm512_loadu_si512((const void *)cp);
                    __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                        DPBUSD(t0[i], lo, bcast_quad(q[i] + k));
                        DPBUSD(t1[i], hi, bcast_quad(q[i] + k + 4));
                    }
                }
            } else if (cbits == 6) { /* Q6_K, sub-blocks of 16: two nibble lines and one line of high-bit pairs */
                const uint8_t *cp = w->codes + (int64_t)(k0 / 8) * 64, *pp = w->codes + (int64_t)RB * K / 2 + (k0 / 16) * 64;
                prefetch_line(cp);
                prefetch_line(cp + 64);
                prefetch_line(pp);
                __m512i v0 = _mm512_loadu_si512((const void *)cp), v1 = _mm512_loadu_si512((const void *)(cp + 64));
                __m512i hp = _mm512_loadu_si512((const void *)pp);
#define HI2(u) _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hp, 2 * (u)), m2), 4)
                __m512i c0 = _mm512_or_si512(_mm512_and_si512(v0, m4), HI2(0));
                __m512i c1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v0, 4), m4), HI2(1));
                __m512i c2 = _mm512_or_si512(_mm512_and_si512(v1, m4), HI2(2));
                __m512i c3 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v1, 4), m4), HI2(3));
#undef HI2
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    DPBUSD(t0[i], c0, bcast_quad(q[i] + k0));
                    DPBUSD(t1[i], c1, bcast_quad(q[i] + k0 + 4));
                    DPBUSD(t0[i], c2, bcast_quad(q[i] + k0 + 8));
                    DPBUSD(t1[i], c3, bcast_quad(q[i] + k0 + 12));
                }
            } else if (cbits == 5) { /* Q5_K, sub-blocks of 32: four nibble lines and one line of high bits */
                const uint8_t *cp = w->codes + (int64_t)(k0 / 8) * 64, *pp = w->codes + (int64_t)RB * K / 2 + (k0 / 32) * 64;
                prefetch_line(pp);
                __m512i hb = _mm512_loadu_si512((const void *)pp);
                const __m512i b4 = _mm512_set1_epi8(0x10);
                _Pragma("GCC unroll 4") for (int k = k0; k < k0 + 32; k += 8, cp += 64) { /* constant shifts once unrolled */
                    prefetch_line(cp);
                    const int u = (k - k0) / 4; /* quads u (low nibbles) and u + 1 (high) of the 32 columns */
                    __m512i v = _mm512_loadu_si512((const void *)cp);
                    /* bit u of hb to bit 4: a 16-bit shift keeps each byte's bits in its byte for shifts <= 4 */
                    __m512i h0 = u <= 4 ? _mm512_slli_epi16(hb, 4 - u) : _mm512_srli_epi16(hb, u - 4);
                    __m512i h1 = u + 1 <= 4 ? _mm512_slli_epi16(hb, 3 - u) : _mm512_srli_epi16(hb, u - 3);
                    __m512i lo = _mm512_or_si512(_mm512_and_si512(v, m4), _mm512_and_si512(h0, b4));
                    __m512i hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_and_si512(h1, b4));
                    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                        DPBUSD(t0[i], lo, bcast_quad(q[i] + k));
                        DPBUSD(t1[i], hi, bcast_quad(q[i] + k + 4));
                    }
                }
            } else if (cbits == 2) { /* sub-blocks of 16: one line */
                const uint8_t *cp = w->codes + (int64_t)(k0 / 16) * 64;
                prefetch_line(cp);
                __m512i v = _mm512_loadu_si512((const void *)cp);
                __m512i c0 = _mm512_and_si512(v, m2), c1 = _mm512_and_si512(_mm512_srli_epi16(v, 2), m2);
                __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m2), c3 = _mm512_and_si512(_mm512_srli_epi16(v, 6), m2);
                _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                    DPBUSD(t0[i], c0, bcast_quad(q[i] + k0));
                    DPBUSD(t1[i], c1, bcast_quad(q[i] + k0 + 4));
                    DPBUSD(t0[i], c2, bcast_quad(q[i] + k0 + 8));
                    DPBUSD(t1[i], c3, bcast_quad(q[i] + k0 + 12));
                }
            } else { /* 3 bits, sub-blocks of 16: half h of a 32-column group (low bits in line h, high bits in line 2) */
                const uint8_t *cp = w->codes + (int64_t)(k0 / 32) * 192;
                const int h = (k0 / 16) & 1;
                if (!h) { prefetch_line(cp); prefetch_line(cp + 64); prefetch_line(cp + 128); }
                __m512i l = _mm512_loadu_si512((const void *)(cp + 64 * h)), hb = _mm512_loadu_si512((const void *)(cp + 128));
                if (h) hb = _mm512_srli_epi16(hb, 4); /* quads 4..7: their high bits now at bits 0..3 */
#define KQ3(uu)                                                                                           \
    do {                                                                                                  \
        __m512i c = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 2 * (uu)), m2),                  \
                                    _mm512_and_si512((uu) >= 2 ? _mm512_srli_epi16(hb, (uu) - 2)           \
                                                               : _mm512_slli_epi16(hb, 2 - (uu)), b2));   \
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {                                            \
            if ((uu) & 1) DPBUSD(t1[i], c, bcast_quad(q[i] + k0 + 4 * (uu)));                             \
            else DPBUSD(t0[i], c, bcast_quad(q[i] + k0 + 4 * (uu)));                                      \
        }                                                                                                 \
    } while (0)
                KQ3(0); KQ3(1); KQ3(2); KQ3(3);
#undef KQ3
            }
            const int s = k0 / sub;
            __m512i scv = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w->sc + s * RB)));
            __m512i mnv = w->mn ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w->mn + s * RB))) : scv;
            _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
                int32_t qsum = kq_qsum(a, m0 + i, k0, sub);
                __m512i t = _mm512_add_epi32(t0[i], t1[i]);
                if (off) t = _mm512_sub_epi32(t, _mm512_set1_epi32(off * qsum));
                isb[i] = _mm512_add_epi32(isb[i], _mm512_mullo_epi32(t, scv));
                if (w->mn) msb[i] = _mm512_add_epi32(msb[i], _mm512_mullo_epi32(mnv, _mm512_set1_epi32(qsum)));
            }
        }
        __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->d + j * RB)));
        __m512 dmv = w->mn ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w->dmin + j * RB))) : dv;
        _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
            __m512 da = _mm512_set1_ps(a->d[(int64_t)(m0 + i) * nbk + j * (QKK / QK)]);
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isb[i]), _mm512_mul_ps(dv, da), acc[i]);
            if (w->mn) corr[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msb[i]), _mm512_mul_ps(dmv, da), corr[i]);
        }
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < nt; i++) {
        float out[RB];
        _mm512_storeu_ps(out, _mm512_sub_ps(acc[i], corr[i]));
        store_rows(y, ldy, m0 + i, n0, nrows, out);
    }
}

TGT5 static void kq_avx512(const kqb_t *w, const acts_t *a, int m0, int mt, float *y, int64_t ldy, int n0, int nrows) {
    switch (mt) {
    case 4: kq512(w, a, m0, 4, y, ldy, n0, nrows); break;
    case 3: kq512(w, a, m0, 3, y, ldy, n0, nrows); break;
    case 2: kq512(w, a, m0, 2, y, ldy, n0, nrows); break;
    default: kq512(w, a, m0, 1, y, ldy, n0, nrows); break;
    }
}

/* Halves h0..h0+nh-1 (rows 8h..8h+7, one per lane) of one block x nt activation rows, nh * nt <= 2
 * (compile-time constants after inlining): decode takes both halves in one pass, so each 64-byte line is
 * loaded once and the prefetch stream runs on; batches take one half and two rows. Slot x = g * nt + i.
 * vpmaddubsw's int16 pairs stay in range: 4 bits, <= 4 octets x 2 x 2 x 15 x 127 = 30480 before
 * widening; 2 and 3 bits, 4 quads x 2 x 7 x 127; 8-bit codes (<= 63) are widened per quad. */
TGT INL void kq2(const kqb_t *w, const acts_t *a, int m0, const int nt, const int h0, const int nh, float *y,
                 int64_t ldy, int n0, int nrows) {
    const int K = w->K, sub = w->t.sub, cbits = w->t.cbits, off = w->t.off, nbk = K / QK;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03), b2 = _mm256_set1_epi8(0x04);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2], corr[2];
    const int8_t *q[2];
    _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++) q[i] = a->qa + (int64_t)(m0 + i) * K;
    _Pragma("GCC unroll 2") for (int x = 0; x < nt * nh; x++) acc[x] = corr[x] = _mm256_setzero_ps();
    for (int j = 0; j < K / QKK; j++) {
        __m256i isb[2], msb[2];
        _Pragma("GCC unroll 2") for (int x = 0; x < nt * nh; x++) isb[x] = msb[x] = _mm256_setzero_si256();
        for (int k0 = j * QKK; k0 < (j + 1) * QKK; k0 += sub) {
            __m256i t[2];
            if (cbits >= 5) { /* Q5_K / Q6_K: nibble lines and a high-bit plane; codes <= 63, widened per octet */
                _Pragma("GCC unroll 2") for (int x = 0; x < nt * nh; x++) t[x] = _mm256_setzero_si256();
                const uint8_t *cp = w->codes + (int64_t)(k0 / 8) * 64;
                const uint8_t *pp = w->codes + (int64_t)RB * K / 2 + (k0 / (cbits == 6 ? 16 : 32)) * 64;
                if (h0 == 0) prefetch_line(pp);
                const __m256i b4 = _mm256_set1_epi8(0x10);
                _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
                    __m256i hp = _mm256_loadu_si256((const __m256i *)(pp + 32 * (h0 + g)));
                    _Pragma("GCC unroll 4") for (int k = k0; k < k0 + sub; k += 8) { /* constant shifts once unrolled */
                        const uint8_t *lp = cp + (k - k0) / 8 * 64;
                        if (h0 == 0 && g == 0) prefetch_line(lp);
                        const int u = (k - k0) / 4; /* quads u and u + 1 of the sub-block */
                        __m256i v = _mm256_loadu_si256((const __m256i *)(lp + 32 * (h0 + g)));
                        __m256i hi0, hi1;
                        if (cbits == 6) { /* bits 2u, 2u+1 (and 2u+2, 2u+3) of the pair plane to bits 4, 5 */
                            hi0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hp, 2 * u), m2), 4);
                            hi1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hp, 2 * u + 2), m2), 4);
                        } else { /* bit u (and u + 1) of the plane to bit 4, within each byte */
                            hi0 = _mm256_and_si256(u <= 4 ? _mm256_slli_epi16(hp, 4 - u) : _mm256_srli_epi16(hp, u - 4), b4);
                            hi1 = _mm256_and_si256(u + 1 <= 4 ? _mm256_slli_epi16(hp, 3 - u) : _mm256_srli_epi16(hp, u - 3), b4);
                        }
                        __m256i lo = _mm256_or_si256(_mm256_and_si256(v, m4), hi0);
                        __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), hi1);
                        /* an octet's two maddubs summed in int16: <= 2 x (2 x 63 x 127) = 32004 */
                        _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++)
                            t[g * nt + i] = _mm256_add_epi32(t[g * nt + i], _mm256_madd_epi16(_mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(q[i] + k))),
                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(q[i] + k + 4)))), ones));
                    }
                }
            } else {
                __m256i s16[2];
                _Pragma("GCC unroll 2") for (int x = 0; x < nt * nh; x++) s16[x] = _mm256_setzero_si256();
                if (cbits == 4) {
                    const uint8_t *cp = w->codes + (int64_t)(k0 / 8) * 64;
                    for (int k = k0; k < k0 + 32; k += 8, cp += 64) {
                        if (h0 == 0) prefetch_line(cp);
                        _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
                            __m256i v = _mm256_loadu_si256((const __m256i *)(cp + 32 * (h0 + g)));
                            __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                            _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++)
                                s16[g * nt + i] = _mm256_add_epi16(s16[g * nt + i], _mm256_add_epi16(
                                    _mm256_maddubs_epi16(lo, _mm256_set1_epi32(quad(q[i] + k))),
                                    _mm256_maddubs_epi16(hi, _mm256_set1_epi32(quad(q[i] + k + 4)))));
                        }
                    }
                } else if (cbits == 2) {
                    const uint8_t *cp = w->codes + (int64_t)(k0 / 16) * 64;
                    if (h0 == 0) prefetch_line(cp);
                    _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
                        __m256i v = _mm256_loadu_si256((const __m256i *)(cp + 32 * (h0 + g)));
                        _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
                            __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, 2 * u), m2);
                            _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++)
                                s16[g * nt + i] = _mm256_add_epi16(s16[g * nt + i],
                                    _mm256_maddubs_epi16(c, _mm256_set1_epi32(quad(q[i] + k0 + 4 * u))));
                        }
                    }
                } else {
                    const uint8_t *cp = w->codes + (int64_t)(k0 / 32) * 192;
                    const int half = (k0 / 16) & 1;
                    if (h0 == 0 && !half) { prefetch_line(cp); prefetch_line(cp + 64); prefetch_line(cp + 128); }
                    _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
                        __m256i l = _mm256_loadu_si256((const __m256i *)(cp + 64 * half + 32 * (h0 + g)));
                        __m256i hb = _mm256_loadu_si256((const __m256i *)(cp + 128 + 32 * (h0 + g)));
                        if (half) hb = _mm256_srli_epi16(hb, 4);
                        _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
                            __m256i lo = _mm256_and_si256(_mm256_srli_epi16(l, 2 * u), m2);
                            __m256i hi = _mm256_and_si256(u >= 2 ? _mm256_srli_epi16(hb, u - 2) : _mm256_slli_epi16(hb, 2 - u), b2);
                            __m256i c = _mm256_or_si256(lo, hi);
                            _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++)
                                s16[g * nt + i] = _mm256_add_epi16(s16[g * nt + i],
                                    _mm256_maddubs_epi16(c, _mm256_set1_epi32(quad(q[i] + k0 + 4 * u))));
                        }
                    }
                }
                _Pragma("GCC unroll 2") for (int x = 0; x < nt * nh; x++) t[x] = _mm256_madd_epi16(s16[x], ones);
            }
            const int s = k0 / sub;
            _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
                const int h = h0 + g;
                __m256i scv = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w->sc + s * RB + 8 * h)));
                __m256i mnv = w->mn ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->mn + s * RB + 8 * h))) : scv;
                _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++) {
                    const int x = g * nt + i;
                    int32_t qsum = kq_qsum(a, m0 + i, k0, sub);
                    __m256i tt = off ? _mm256_sub_epi32(t[x], _mm256_set1_epi32(off * qsum)) : t[x];
                    isb[x] = _mm256_add_epi32(isb[x], _mm256_mullo_epi32(tt, scv));
                    if (w->mn) msb[x] = _mm256_add_epi32(msb[x], _mm256_mullo_epi32(mnv, _mm256_set1_epi32(qsum)));
                }
            }
        }
        _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
            const int h = h0 + g;
            __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->d + j * RB + 8 * h)));
            __m256 dmv = w->mn ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w->dmin + j * RB + 8 * h))) : dv;
            _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++) {
                const int x = g * nt + i;
                __m256 da = _mm256_set1_ps(a->d[(int64_t)(m0 + i) * nbk + j * (QKK / QK)]);
                acc[x] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isb[x]), _mm256_mul_ps(dv, da), acc[x]);
                if (w->mn) corr[x] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msb[x]), _mm256_mul_ps(dmv, da), corr[x]);
            }
        }
    }
    _Pragma("GCC unroll 2") for (int g = 0; g < nh; g++) {
        const int h = h0 + g, rows = nrows - 8 * h;
        if (rows <= 0) continue;
        _Pragma("GCC unroll 2") for (int i = 0; i < nt; i++) {
            float out[8];
            _mm256_storeu_ps(out, _mm256_sub_ps(acc[g * nt + i], corr[g * nt + i]));
            store_rows(y, ldy, m0 + i, n0 + 8 * h, rows < 8 ? rows : 8, out);
        }
    }
}

TGT static void kq_avx2(const kqb_t *w, const acts_t *a, int m0, int mt, float *y, int64_t ldy, int n0, int nrows) {
    if (mt == 1) { /* decode: both halves in one pass */
        kq2(w, a, m0, 1, 0, 2, y, ldy, n0, nrows);
        return;
    }
    for (int i = m0; i < m0 + mt; i += 2)
        for (int h = 0; h < 2 && 8 * h < nrows; h++) {
            if (m0 + mt - i >= 2) kq2(w, a, i, 2, h, 1, y, ldy, n0, nrows);
            else kq2(w, a, i, 1, h, 1, y, ldy, n0, nrows);
        }
}

/* Blocks b0..b1 of a K-quant weight, all activation rows, tiles of 4. */
static void run_kq_blocks(const acts_t *a, const uint8_t *w, int N, int b0, int b1, float *y, int64_t ldy) {
    for (int b = b0; b < b1; b++) {
        kqb_t blk = kq_block_at(w, b, a->bits, a->K);
        int n0 = b * RB, nrows = N - n0 < RB ? N - n0 : RB;
        for (int m0 = 0; m0 < a->M; m0 += 4) {
            int mt = a->M - m0 < 4 ? a->M - m0 : 4;
            if (a->path == 2) kq_avx512(&blk, a, m0, mt, y, ldy, n0, nrows);
            else if (a->path == 1) kq_avx2(&blk, a, m0, mt, y, ldy, n0, nrows);
            else kq_generic(&blk, a, m0, mt, y, ldy, n0, nrows);
        }
    }
}

/* ------------------------------------------------------------------ entry points */

/* y[:, rows of blocks b0..b1) (row stride ldy), all activation rows: each block once from
 * memory, then every activation tile over it while it sits in cache. */
static void run_blocks(const acts_t *a, const uint8_t *w, int asym, int N, int b0, int b1, float *y, int64_t ldy) {
    if (a->bits >= KQ) {
        run_kq_blocks(a, w, N, b0, b1, y, ldy);
        return;
    }
    for (int b = b0; b < b1;) {
        /* AVX-512 batches take two blocks at a time (each activation load feeds 32 rows) */
        int nb = a->path == 2 && a->M > 1 && b + 1 < b1 && a->bits >= 4 ? 2 : 1;
        blk_t blk[2] = {block_at(w, b, a->bits, a->K, a->G, asym), block_at(w, b + nb - 1, a->bits, a->K, a->G, asym)};
        int n0 = b * RB, nrows = N - n0;
        for (int m0 = 0; m0 < a->M; m0 += MT) {
            int mt = a->M - m0 < MT ? a->M - m0 : MT;
            /* a batch's tiles prefetch the next blocks of this work item (same shape: nb blocks on) */
            const uint8_t *next = a->M > 1 && b + 2 * nb <= b1 ? blk[0].codes + nb * block_bytes(a->bits, a->K, a->G, asym) : NULL;
            if (a->path == 2) block_avx512(blk, nb, a, m0, mt, y, ldy, n0, nrows, next);
            else if (a->path == 1) block_avx2(blk, a, m0, mt, y, ldy, n0, nrows < RB ? nrows : RB);
            else block_generic(blk, a, m0, mt, y, ldy, n0, nrows < RB ? nrows : RB);
        }
        b += nb;
    }
}

static int nitems_of(int N) { return ((N + RB - 1) / RB + BPI - 1) / BPI; }
static void item_blocks(int c, int N, int *b0, int *b1) {
    int nb = (N + RB - 1) / RB;
    *b0 = c * BPI;
    *b1 = *b0 + BPI < nb ? *b0 + BPI : nb;
}

/* y [M, N] float32 = x [M, K] float32 @ W^T; W as repacked blocks (dbrxq_repack).
 * path: 0 generic scalar, 1 AVX2, 2 AVX-512 VNNI. Returns 0, or -1 on allocation failure. */
int dbrxq_matmul(const float *x, int M, int K, const uint8_t *w, int N, int bits, int G,
                 int asym, float *y, int path, int nthreads) {
    acts_t a;
    if (acts_alloc(&a, M, K, bits, G, path)) return -1;
    acts_quant(&a, x, 0, M);
    int ni = nitems_of(N);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1)
    for (int c = 0; c < ni; c++) {
        int b0, b1;
        item_blocks(c, N, &b0, &b1);
        run_blocks(&a, w, asym, N, b0, b1, y, N);
    }
    acts_free(&a);
    return 0;
}

/* One DBRX expert, y [M, D] = (silu(x @ W1^T) * (x @ V1^T)) @ W2^T, in ONE call and one
 * parallel region: x [M, D] is quantized once for W1 and V1 [F, D] (same bits, G, asym as
 * W2 [D, F]), whose blocks are shared out together; silu * product and the quantization of the
 * hidden state are split over the threads; then W2. Against three dbrxq_matmul calls this saves
 * two thread wake-ups and barriers, one activation quantization and the Python in between.
 * silu(t) = t / (1 + exp(-t)) in float32. Returns 0, or -1 on allocation failure. */
static int glu_run(const float *x, int M, int D, int F, const uint8_t *w1, const uint8_t *v1,
                   const uint8_t *w2, int bits, int bitsv, int G1, int bits2, int G2, int asym, float *y, int path,
                   int nthreads) {
    acts_t ax, ah;
    if (bitsv != bits && (bits < KQ || bitsv < KQ)) return -3; /* W1 and V1 share x's quantization */
    float *h = malloc(sizeof(float) * 2 * (size_t)M * F); /* [M, F] gate, then [M, F] up */
    if (!h || acts_alloc(&ax, M, D, bits, G1, path)) { free(h); return -1; }
    if (acts_alloc(&ah, M, F, bits2, G2, path)) { free(h); acts_free(&ax); return -1; }
    float *up = h + (size_t)M * F;
    acts_t axv = ax; /* V1's view of x: the same buffers (every K-quant quantizes x alike), its own kind */
    axv.bits = bitsv;
    int n1 = nitems_of(F), n2 = nitems_of(D);
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) acts_quant(&ax, x, m, m + 1);
#pragma omp for schedule(dynamic, 1)
        for (int c = 0; c < 2 * n1; c++) {
            int b0, b1;
            item_blocks(c < n1 ? c : c - n1, F, &b0, &b1);
            run_blocks(c < n1 ? &ax : &axv, c < n1 ? w1 : v1, asym, F, b0, b1, c < n1 ? h : up, F);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (int64_t)M * F; i++) h[i] = h[i] / (1.f + expf(-h[i])) * up[i];
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) acts_quant(&ah, h, m, m + 1);
#pragma omp for schedule(dynamic, 1)
        for (int c = 0; c < n2; c++) {
            int b0, b1;
            item_blocks(c, D, &b0, &b1);
            run_blocks(&ah, w2, asym, D, b0, b1, y, D);
        }
    }
    free(h); acts_free(&ax); acts_free(&ah);
    return 0;
}

int dbrxq_glu(const float *x, int M, int D, int F, const uint8_t *w1, const uint8_t *v1,
              const uint8_t *w2, int bits, int G1, int G2, int asym, float *y, int path, int nthreads) {
    return glu_run(x, M, D, F, w1, v1, w2, bits, bits, G1, bits, G2, asym, y, path, nthreads);
}

/* dbrxq_glu with V1 and W2 of their own kinds (bitsv; bits2, G2): a K-quant mix may give ffn_gate, ffn_up
 * and ffn_down three types. V1's kind differs from W1's only between K-quants (else -3). */
int dbrxq_glu2(const float *x, int M, int D, int F, const uint8_t *w1, const uint8_t *v1,
               const uint8_t *w2, int bits, int bitsv, int G1, int bits2, int G2, int asym, float *y, int path,
               int nthreads) {
    return glu_run(x, M, D, F, w1, v1, w2, bits, bitsv, G1, bits2, G2, asym, y, path, nthreads);
}

/* One MoE step of a layer in ONE call: out [M, D] = the sum over each token's K routed experts, in
 * increasing expert id, of w * expert(x). ids [M * K] (int64 expert ids), wts [M * K] (float32
 * routing weights); table, per expert e: 9 int64 (w1, v1, w2 block pointers, bits, bitsv, G1, bits2, G2,
 * asym).
 * Each active expert is one dbrxq_glu over its tokens (gathered in token order), so every row is what
 * a dbrxq_glu call of that expert gives it (rows are independent of the batch); the sum is float32,
 * each y * w rounded, then added (as torch's index_add_ of y * w; this function is compiled without
 * FMA contraction). The Python between experts, and a thread wake-up per expert's gather and scatter,
 * are gone. Returns 0, or -1 on allocation failure. */
int dbrxq_moe(const float *x, int M, int D, int F, int K, const int64_t *ids, const float *wts,
              const int64_t *table, int E, float *out, int path, int nthreads) {
    int *count = calloc((size_t)E + 1, sizeof(int));
    int *start = calloc((size_t)E + 1, sizeof(int));
    int *tok = malloc(sizeof(int) * (size_t)M * K);
    float *wt = malloc(sizeof(float) * (size_t)M * K);
    float *xe = malloc(sizeof(float) * (size_t)M * K * D);
    float *ye = malloc(sizeof(float) * (size_t)M * K * D);
    int rc = 0;
    if (!count || !start || !tok || !wt || !xe || !ye) { rc = -1; goto done; }
    for (int64_t i = 0; i < (int64_t)M * K; i++) {
        if (ids[i] < 0 || ids[i] >= E) { rc = -2; goto done; }
        count[ids[i]]++;
    }
    for (int e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
    memset(count, 0, sizeof(int) * (size_t)E);
    for (int m = 0; m < M; m++) /* each expert's tokens in token order */
        for (int k = 0; k < K; k++) {
            int e = (int)ids[(int64_t)m * K + k], at = start[e] + count[e]++;
            tok[at] = m;
            wt[at] = wts[(int64_t)m * K + k];
        }
    memset(out, 0, sizeof(float) * (size_t)M * D);
    for (int e = 0; e < E; e++) {
        int n = start[e + 1] - start[e];
        if (!n) continue;
        const int64_t *t = table + 9 * (int64_t)e;
        for (int i = 0; i < n; i++) memcpy(xe + (int64_t)i * D, x + (int64_t)tok[start[e] + i] * D, sizeof(float) * D);
        if (glu_run(xe, n, D, F, (const uint8_t *)t[0], (const uint8_t *)t[1], (const uint8_t *)t[2], (int)t[3],
                    (int)t[4], (int)t[5], (int)t[6], (int)t[7], (int)t[8], ye, path, nthreads)) { rc = -1; goto done; }
        for (int i = 0; i < n; i++) {
            float w = wt[start[e] + i], *o = out + (int64_t)tok[start[e] + i] * D;
            const float *y = ye + (int64_t)i * D;
            for (int d = 0; d < D; d++) {
                volatile float p = y[d] * w; /* rounded to float, never fused into the add */
                o[d] += p;
            }
        }
    }
done:
    free(count); free(start); free(tok); free(wt); free(xe); free(ye);
    return rc;
}

/* ------------------------------------------------------------------ compute peak probe */

/* The int8 multiply-add rate of one thread's inner instruction on `path`, for benchmarks: the
 * compute floor of a batched call next to its read bound. `iters` rounds of 12 independent
 * accumulators (more than latency x throughput on current cores): AVX2 vpmaddubsw + vpaddw (32
 * products each), AVX-512 vpdpbusd on 512-bit registers (64 each). Returns multiply-adds per
 * second, or 0 for the generic path. */
#define PEAK_ACC 12
static double wall_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
TGT static double peak_avx2(long iters) {
    __m256i a[PEAK_ACC], x[PEAK_ACC], y = _mm256_set1_epi8(1);
    for (int i = 0; i < PEAK_ACC; i++) { a[i] = _mm256_setzero_si256(); x[i] = _mm256_set1_epi8((char)i); }
    double t0 = wall_s();
    for (long k = 0; k < iters; k++) {
        _Pragma("GCC unroll 12") for (int i = 0; i < PEAK_ACC; i++) a[i] = _mm256_add_epi16(a[i], _mm256_maddubs_epi16(x[i], y));
        __asm__ volatile("" : "+x"(y));
    }
    double t = wall_s() - t0;
    int s = 0;
    for (int i = 0; i < PEAK_ACC; i++) s += _mm256_extract_epi32(a[i], 0);
    __asm__ volatile("" : : "r"(s));
    return 32.0 * PEAK_ACC * iters / t;
}
TGT5 static double peak_avx512(long iters) {
    __m512i a[PEAK_ACC], x[PEAK_ACC], y = _mm512_set1_epi8(1);
    for (int i = 0; i < PEAK_ACC; i++) { a[i] = _mm512_setzero_si512(); x[i] = _mm512_set1_epi8((char)i); }
    double t0 = wall_s();
    for (long k = 0; k < iters; k++) {
        _Pragma("GCC unroll 12") for (int i = 0; i < PEAK_ACC; i++) a[i] = _mm512_dpbusd_epi32(a[i], x[i], y);
        __asm__ volatile("" : "+v"(y));
    }
    double t = wall_s() - t0;
    int s = 0;
    for (int i = 0; i < PEAK_ACC; i++) s += _mm512_reduce_add_epi32(a[i]);
    __asm__ volatile("" : : "r"(s));
    return 64.0 * PEAK_ACC * iters / t;
}
double dbrxq_peak_macs(int path, long iters) {
    return path == 1 ? peak_avx2(iters) : path == 2 ? peak_avx512(iters) : 0.0;
}
