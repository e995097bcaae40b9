/* A/B of builds of the C kernel on one real-width expert GLU (dbrxq_glu, M = 1, int4 g128),
 * each call paired with reads of the same number of bytes right before and after it.
 *
 *   gcc -O3 -std=gnu11 -fopenmp scripts/bench_glu_ab.c -o /tmp/ab -ldl
 *   gcc -O3 -std=gnu11 -fopenmp -fPIC -shared quantize/csrc/qmatmul.c -o /tmp/a.so -lm
 *   gcc -O3 -std=gnu11 -fopenmp -fPIC -shared -DPF=4096 quantize/csrc/qmatmul.c -o /tmp/b.so -lm
 *   /tmp/ab 30 /tmp/a.so /tmp/b.so        # REPS, then up to 8 builds, each BUILD.so[:PATH]
 *                                          # (PATH 1 AVX2, the default; 2 AVX-512 where built)
 *
 * This VM's bandwidth drifts by 30% within minutes, so separate runs cannot tell a 5% change
 * from noise: the builds take turns in one process, and each call's ratio is its time over the
 * mean of the two reads around it (an AVX2 read of a 103 MB buffer, which also evicts the
 * weights). Prints each build's median time and median ratio with quartiles; swap the order of
 * the builds between runs. Weights: two sets of random records (scales 2^-7), used in turn. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"

typedef int64_t (*packed_bytes_t)(int bits, int N, int K, int G, int asym);
typedef void (*repack_t)(const uint8_t *codes, const uint16_t *scales, const uint8_t *zeros, int bits, int N, int K,
                         int G, uint8_t *dst);
typedef int (*glu_t)(const float *x, int M, int D, int F, const uint8_t *w1, const uint8_t *v1,
                     const uint8_t *w2, int bits, int G1, int G2, int asym, float *y, int path, int nthreads);

typedef int64_t (*row_bytes_t)(int bits, int K, int G, int asym);

/* Builds before the 16-row blocks (layout 1: one record per row, codes then fp16 scales):
 * random records with scales 2^-7, so such a build can take turns with a newer one. */
static uint8_t *records(row_bytes_t row_bytes, int N, int K) {
    int64_t rb = row_bytes(4, K, 128, 0);
    uint8_t *w = aligned_alloc(64, (N * rb + 63) / 64 * 64);
    for (int64_t i = 0; i < N * rb; i++) w[i] = (uint8_t)rand();
    for (int n = 0; n < N; n++) {
        uint16_t *s = (uint16_t *)(w + n * rb + K / 2);
        for (int g = 0; g < K / 128; g++) s[g] = 0x2000;
    }
    return w;
}

/* An N x K int4 g128 weight with random codes and scales 2^-7, repacked by the build itself
 * (each build's own layout). */
static uint8_t *weight(packed_bytes_t pb, repack_t rp, int N, int K) {
    int64_t bytes = pb(4, N, K, 128, 0);
    uint8_t *codes = malloc((size_t)N * K), *w = aligned_alloc(64, (bytes + 63) / 64 * 64);
    uint16_t *s = malloc(sizeof(uint16_t) * (size_t)N * (K / 128));
    for (int64_t i = 0; i < (int64_t)N * K; i++) codes[i] = (uint8_t)(rand() & 15);
    for (int64_t i = 0; i < (int64_t)N * (K / 128); i++) s[i] = 0x2000;
    rp(codes, s, NULL, 4, N, K, 128, w);
    free(codes);
    free(s);
    return w;
}

#define MAXV 8
#define MAXR 1000

int main(int argc, char **argv) {
    const int D = 6144, F = 10752, th = 2;
    int reps = argc > 2 ? atoi(argv[1]) : 0, nv = argc - 2;
    if (reps < 1 || reps > MAXR || nv > MAXV) {
        fprintf(stderr, "usage: %s REPS(1..%d) BUILD.so [BUILD.so ...] (at most %d)\n", argv[0], MAXR, MAXV);
        return 2;
    }
    glu_t fn[MAXV];
    int path[MAXV];
    uint8_t *w[MAXV][2][3];
    int64_t bytes = 0;
    for (int v = 0; v < nv; v++) {
        char *colon = strrchr(argv[2 + v], ':'); /* BUILD.so:PATH (1 AVX2, default; 2 AVX-512) */
        path[v] = colon ? atoi(colon + 1) : 1;
        if (colon) *colon = 0;
        void *h = dlopen(argv[2 + v], RTLD_NOW | RTLD_LOCAL);
        packed_bytes_t pb = h ? (packed_bytes_t)dlsym(h, "dbrxq_packed_bytes") : NULL;
        repack_t rp = h ? (repack_t)dlsym(h, "dbrxq_repack") : NULL;
        row_bytes_t rb = h ? (row_bytes_t)dlsym(h, "dbrxq_row_bytes") : NULL;
        if (!h || !(fn[v] = (glu_t)dlsym(h, "dbrxq_glu")) || !((pb && rp) || rb)) {
            fprintf(stderr, "%s: %s\n", argv[2 + v], h ? dlerror() : "cannot load");
            return 1;
        }
        for (int c = 0; c < 2; c++) {
            w[v][c][0] = pb ? weight(pb, rp, F, D) : records(rb, F, D);
            w[v][c][1] = pb ? weight(pb, rp, F, D) : records(rb, F, D);
            w[v][c][2] = pb ? weight(pb, rp, D, F) : records(rb, D, F);
        }
        bytes = pb ? 2 * pb(4, F, D, 128, 0) + pb(4, D, F, 128, 0) : 2 * F * rb(4, D, 128, 0) + D * rb(4, F, 128, 0);
    }
    /* FLUSH_MB (environment): also read that many MB between calls, untimed, to push the weights
     * out of a large last-level cache (one VM here reports a 480 MB L3) */
    int64_t flush = (getenv("FLUSH_MB") ? atoll(getenv("FLUSH_MB")) : 0) << 20;
    uint8_t *rd = malloc(bytes), *fl = flush ? malloc(flush) : NULL;
    for (int64_t i = 0; i < bytes; i++) rd[i] = (uint8_t)rand();
    for (int64_t i = 0; i < flush; i++) fl[i] = (uint8_t)i;
    float *x = malloc(sizeof(float) * D), *y = malloc(sizeof(float) * D);
    for (int i = 0; i < D; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    static double tk[MAXV][MAXR], ra[MAXV][MAXR];
    uint64_t sink = 0;
    for (int r = 0; r < reps; r++)
        for (int v = 0; v < nv; v++) {
            if (fl) sink += read_all(fl, flush, th);
            double t = now();
            sink += read_all(rd, bytes, th);
            double t1 = now() - t;
            t = now();
            fn[v](x, 1, D, F, w[v][r & 1][0], w[v][r & 1][1], w[v][r & 1][2], 4, 128, 128, 0, y, path[v], th);
            tk[v][r] = now() - t;
            t = now();
            sink += read_all(rd, bytes, th);
            ra[v][r] = tk[v][r] / (0.5 * (t1 + now() - t));
        }
    printf("GLU 3 x %d x %d int4 g128, M = 1, %d threads, %.1f MB; %d turns each\n", D, F, th, bytes / 1e6, reps);
    for (int v = 0; v < nv; v++) {
        qsort(tk[v], reps, sizeof(double), cmp);
        qsort(ra[v], reps, sizeof(double), cmp);
        printf("%-32s median %.0f us | ratio to the reads around it: median %.3f (quartiles %.3f %.3f)%s\n",
               argv[2 + v], tk[v][reps / 2] * 1e6, ra[v][reps / 2], ra[v][reps / 4], ra[v][3 * reps / 4],
               sink == 1 ? " " : "");
    }
    return 0;
}
