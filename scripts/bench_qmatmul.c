/* The int4 C kernel alone, against a plain AVX2 read of the same number of bytes.
 *
 *   gcc -O3 -std=gnu11 -fopenmp quantize/csrc/qmatmul.c scripts/bench_qmatmul.c -o /tmp/bq -lm
 *   /tmp/bq N K M THREADS REPS [PATH]  e.g. /tmp/bq 10752 6144 1 2 40  (PATH 1 AVX2, 2 AVX-512)
 *
 * Four N x K int4 g128 weights (random codes, scales 2^-7) are rotated so none stays in L3.
 * Every repetition times one dbrxq_matmul on weight r % 4, then a read of weight (r + 2) % 4
 * (not the next one: that would warm the cache for the next kernel call). Prints the median
 * and best of each and the ratio of the medians: the kernel's distance from the memory bound
 * without Python, torch or the GLU around it (scripts/bench_kernels.py measures those). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "bench_common.h"

int64_t dbrxq_packed_bytes(int bits, int N, int K, int G, int asym);
void dbrxq_repack(const uint8_t *codes, const uint16_t *scales, const uint8_t *zeros, int bits, int N, int K, int G,
                  uint8_t *dst);
int dbrxq_matmul(const float *x, int M, int K, const uint8_t *w, int N, int bits, int G, int asym,
                 float *y, int path, int nthreads);

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) {
        fprintf(stderr, "usage: %s N K M THREADS REPS [PATH]\n", argv[0]);
        return 2;
    }
    int N = atoi(argv[1]), K = atoi(argv[2]), M = atoi(argv[3]), th = atoi(argv[4]), reps = atoi(argv[5]);
    int path = argc == 7 ? atoi(argv[6]) : 1;
    const int G = 128, copies = 4;
    if (K % 128 || N < 1 || M < 1 || th < 1 || reps < 1) {
        fprintf(stderr, "need K %% 128 == 0 and positive N, M, THREADS, REPS\n");
        return 2;
    }
    int64_t bytes = dbrxq_packed_bytes(4, N, K, G, 0);
    uint8_t *codes = malloc((size_t)N * K);
    uint16_t *scales = malloc(sizeof(uint16_t) * (size_t)N * (K / G));
    uint8_t *w[4];
    for (int64_t i = 0; i < (int64_t)N * (K / G); i++) scales[i] = 0x2000; /* fp16 2^-7 */
    for (int c = 0; c < copies; c++) {
        for (int64_t i = 0; i < (int64_t)N * K; i++) codes[i] = (uint8_t)(rand() & 15);
        w[c] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        dbrxq_repack(codes, scales, NULL, 4, N, K, G, w[c]);
    }
    free(codes);
    free(scales);
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N);
    double *tk = malloc(sizeof(double) * reps), *tr = malloc(sizeof(double) * reps);
    for (int i = 0; i < M * K; i++) x[i] = rand() / (float)RAND_MAX - 0.5f;
    for (int i = 0; i < 3; i++) dbrxq_matmul(x, M, K, w[i % copies], N, 4, G, 0, y, path, th);
    uint64_t sink = 0;
    for (int r = 0; r < reps; r++) {
        double t = now();
        dbrxq_matmul(x, M, K, w[r % copies], N, 4, G, 0, y, path, th);
        tk[r] = now() - t;
        t = now();
        sink += read_all(w[(r + 2) % copies], bytes, th);
        tr[r] = now() - t;
    }
    qsort(tk, reps, sizeof(double), cmp);
    qsort(tr, reps, sizeof(double), cmp);
    printf("N=%d K=%d M=%d threads=%d, %.1f MB: kernel median %.0f us (best %.0f) | read median %.0f us "
           "(best %.0f, %.1f GB/s) | ratio of medians %.2f%s\n",
           N, K, M, th, bytes / 1e6, tk[reps / 2] * 1e6, tk[0] * 1e6, tr[reps / 2] * 1e6, tr[0] * 1e6,
           bytes / tr[reps / 2] / 1e9, tk[reps / 2] / tr[reps / 2], sink == 1 ? " " : "");
    return 0;
}
