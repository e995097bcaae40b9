/* What the C benchmarks share: a clock, a plain AVX2 read of n bytes on th threads (the
 * memory bound they compare against), and a comparison for qsort. Included, not linked. */
#include <immintrin.h>
#include <stdint.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2"))) static uint64_t read_all(const uint8_t *w, int64_t n, int th) {
    uint64_t tot = 0;
#pragma omp parallel for num_threads(th) reduction(+ : tot) schedule(static)
    for (int64_t c = 0; c < n / 4096; c++) {
        __m256i a = _mm256_setzero_si256(), b = a;
        for (int i = 0; i < 4096; i += 64) {
            a = _mm256_add_epi64(a, _mm256_loadu_si256((const __m256i *)(w + c * 4096 + i)));
            b = _mm256_add_epi64(b, _mm256_loadu_si256((const __m256i *)(w + c * 4096 + i + 32)));
        }
        a = _mm256_add_epi64(a, b);
        tot += _mm256_extract_epi64(a, 0) + _mm256_extract_epi64(a, 3);
    }
    return tot;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

