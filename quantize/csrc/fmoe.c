/* Float experts in one call: a layer's MoE step over bf16 or float32 weights as the hub stores them.
 *
 * Built into the same library as qmatmul.c (quantize/cext.py). w1, v1, w2 are [E, F, D] (w1 and v1
 * (out, in) per expert, w2 (in, out): the hub's fused layout, untouched). For each token m and its K
 * routed experts, in increasing expert id:
 *
 *   h[f]  = silu(x . w1[e, f]) * (x . v1[e, f])          f < F, dot products over D in float32
 *   y[d]  = sum_f h[f] * w2[e, f, d]                     d < D, in increasing f
 *   out   = y_0 * w_0,  then out = out + y_j * w_j       each product rounded before the add
 *
 * Every value is float32 (a bf16 weight widens exactly: its bits shifted up by 16); silu(t) =
 * t / (1 + exp(-t)). The AVX2 path keeps 16 partial sums per dot product (two 8-lane registers) and
 * fuses multiply-adds, the generic path sums in order: the two differ by float rounding only. A token's
 * result never depends on the other tokens of the call (tokens are computed one by one, threads split
 * a token's rows, never its sums), so a batch gives every row the bits it gets alone.
 *
 * What it is for: a float model small enough that a decode step's weights sit in cache (the embedded
 * demo) spends its time in tensor dispatch, not arithmetic; one call per layer replaces a gather, three
 * widening copies and five batched matmuls. A large float model decodes through it at one read of
 * each routed expert's bytes.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FTGT __attribute__((target("avx2,fma")))
#define MAXK 64
/* Work (multiply-adds) below which a step stays on the calling thread: waking threads costs more. */
#define PAR_MIN (1 << 20)

static inline float bf16_f(const void *w, int64_t i) {
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline float wget(const void *w, int64_t i, int bf16) { return bf16 ? bf16_f(w, i) : ((const float *)w)[i]; }
static inline float silu_mul(float a, float b) { return a / (1.f + expf(-a)) * b; }

static void gate_generic(const float *x, const void *w1, const void *v1, int bf16, int D, int f0, int f1, float *h) {
    for (int f = f0; f < f1; f++) {
        float a = 0.f, b = 0.f;
        for (int d = 0; d < D; d++) {
            a += x[d] * wget(w1, (int64_t)f * D + d, bf16);
            b += x[d] * wget(v1, (int64_t)f * D + d, bf16);
        }
        h[f] = silu_mul(a, b);
    }
}

static void down_generic(const float *h, const void *w2, int bf16, int D, int F, int d0, int d1, float *y) {
    for (int d = d0; d < d1; d++) y[d] = 0.f;
    for (int f = 0; f < F; f++)
        for (int d = d0; d < d1; d++) y[d] += h[f] * wget(w2, (int64_t)f * D + d, bf16);
}

FTGT static inline __m256 ld8(const void *w, int64_t i, int bf16) {
    if (bf16) {
        __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
    }
    return _mm256_loadu_ps((const float *)w + i);
}

FTGT static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* D a multiple of 16. */
FTGT static inline __attribute__((always_inline)) void gate_avx2_(const float *x, const void *w1, const void *v1,
                                                                  int bf16, int D, int f0, int f1, float *h) {
    for (int f = f0; f < f1; f++) {
        int64_t r = (int64_t)f * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        for (int d = 0; d < D; d += 16) {
            __m256 x0 = _mm256_loadu_ps(x + d), x1 = _mm256_loadu_ps(x + d + 8);
            a0 = _mm256_fmadd_ps(x0, ld8(w1, r + d, bf16), a0);
            a1 = _mm256_fmadd_ps(x1, ld8(w1, r + d + 8, bf16), a1);
            b0 = _mm256_fmadd_ps(x0, ld8(v1, r + d, bf16), b0);
            b1 = _mm256_fmadd_ps(x1, ld8(v1, r + d + 8, bf16), b1);
        }
        h[f] = silu_mul(hsum8(_mm256_add_ps(a0, a1)), hsum8(_mm256_add_ps(b0, b1)));
    }
}
FTGT static void gate_avx2_bf16(const float *x, const void *w1, const void *v1, int D, int f0, int f1, float *h) {
    gate_avx2_(x, w1, v1, 1, D, f0, f1, h);
}
FTGT static void gate_avx2_f32(const float *x, const void *w1, const void *v1, int D, int f0, int f1, float *h) {
    gate_avx2_(x, w1, v1, 0, D, f0, f1, h);
}

/* d0, d1 multiples of 64: eight 8-lane accumulators per 64 columns, f streamed in order. */
FTGT static inline __attribute__((always_inline)) void down_avx2_(const float *h, const void *w2, int bf16, int D,
                                                                  int F, int d0, int d1, float *y) {
    for (int d = d0; d < d1; d += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int f = 0; f < F; f++) {
            __m256 hf = _mm256_set1_ps(h[f]);
            int64_t r = (int64_t)f * D + d;
            _Pragma("GCC unroll 8") for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(hf, ld8(w2, r + 8 * j, bf16), acc[j]);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(y + d + 8 * j, acc[j]);
    }
}
FTGT static void down_avx2_bf16(const float *h, const void *w2, int D, int F, int d0, int d1, float *y) {
    down_avx2_(h, w2, 1, D, F, d0, d1, y);
}
FTGT static void down_avx2_f32(const float *h, const void *w2, int D, int F, int d0, int d1, float *y) {
    down_avx2_(h, w2, 0, D, F, d0, d1, y);
}

static void gate(int simd, const float *x, const void *w1, const void *v1, int bf16, int D, int f0, int f1, float *h) {
    if (!simd) gate_generic(x, w1, v1, bf16, D, f0, f1, h);
    else if (bf16) gate_avx2_bf16(x, w1, v1, D, f0, f1, h);
    else gate_avx2_f32(x, w1, v1, D, f0, f1, h);
}
static void down(int simd, const float *h, const void *w2, int bf16, int D, int F, int d0, int d1, float *y) {
    if (!simd) down_generic(h, w2, bf16, D, F, d0, d1, y);
    else if (bf16) down_avx2_bf16(h, w2, D, F, d0, d1, y);
    else down_avx2_f32(h, w2, D, F, d0, d1, y);
}

/* out [M, D] float32 = the MoE of x [M, D] float32 over float experts (see the top of this file).
 * ids [M * K] int64 expert ids (distinct per token), wts [M * K] float32 routing weights; w1, v1,
 * w2 [E, F, D] of bf16 (bf16 = 1) or float32. path 0: generic C; otherwise AVX2 + FMA where D is a
 * multiple of 64. Returns 0, -1 on allocation failure, -2 for an expert id outside [0, E) or K outside
 * [1, 64]. */
int dbrxq_moe_float(const float *x, int M, int D, int F, int K, const int64_t *ids, const float *wts,
                    const void *w1, const void *v1, const void *w2, int E, int bf16, float *out, int path,
                    int nthreads) {
    if (K < 1 || K > MAXK) return -2;
    for (int64_t i = 0; i < (int64_t)M * K; i++)
        if (ids[i] < 0 || ids[i] >= E) return -2;
    float *h = malloc(sizeof(float) * (size_t)F), *y = malloc(sizeof(float) * (size_t)D);
    if (!h || !y) { free(h); free(y); return -1; }
    int simd = path != 0 && D % 64 == 0;
    int64_t esize = bf16 ? 2 : 4, ebytes = (int64_t)F * D * esize;
    int par = nthreads > 1 && (int64_t)F * D >= PAR_MIN;
    int nd = D / 64; /* column chunks of the down projection when simd */
    if (nthreads < 1) nthreads = 1;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * D;
        float *o = out + (int64_t)m * D;
        int ord[MAXK];
        for (int j = 0; j < K; j++) { /* the token's experts in increasing id (insertion sort, K small) */
            int i = j;
            while (i > 0 && ids[(int64_t)m * K + ord[i - 1]] > ids[(int64_t)m * K + j]) { ord[i] = ord[i - 1]; i--; }
            ord[i] = j;
        }
        for (int j = 0; j < K; j++) {
            int64_t at = (int64_t)m * K + ord[j];
            const char *e1 = (const char *)w1 + ids[at] * ebytes, *ev = (const char *)v1 + ids[at] * ebytes,
                       *e2 = (const char *)w2 + ids[at] * ebytes;
            float w = wts[at];
#pragma omp parallel num_threads(nthreads) if (par)
            {
                int nt = par ? omp_get_num_threads() : 1, t = par ? omp_get_thread_num() : 0;
                gate(simd, xm, e1, ev, bf16, D, (int)((int64_t)F * t / nt), (int)((int64_t)F * (t + 1) / nt), h);
#pragma omp barrier
                if (simd)
                    down(1, h, e2, bf16, D, F, 64 * (int)((int64_t)nd * t / nt), 64 * (int)((int64_t)nd * (t + 1) / nt), y);
                else
                    down(0, h, e2, bf16, D, F, (int)((int64_t)D * t / nt), (int)((int64_t)D * (t + 1) / nt), y);
            }
            for (int d = 0; d < D; d++) {
                volatile float p = y[d] * w; /* rounded to float, never fused into the add */
                o[d] = j == 0 ? p : o[d] + p;
            }
        }
    }
    free(h); free(y);
    return 0;
}
