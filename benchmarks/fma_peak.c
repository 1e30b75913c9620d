// The CPU's fp32 peak: twelve independent chains of 512-bit fused multiply-adds per thread (more
// than latency x ports, so the FMA units never wait), one thread per core (OpenMP). Prints
// GFLOP/s per repeat and the best; benchmarks/kernel_ceiling.py builds and runs it.
//   gcc -O2 -mavx512f -mfma -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const long iters = 50000000L;
  double best = 0;
  for (int rep = 0; rep < 5; rep++) {
    double start = now();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
      // distinct starting values: identical chains would be merged by the compiler
      __m512 a[12];
      for (int k = 0; k < 12; k++) a[k] = _mm512_set1_ps(1.0f + 0.1f * k);
      const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
      for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int k = 0; k < 12; k++) a[k] = _mm512_fmadd_ps(a[k], b, c);
      }
      __m512 s = a[0];
      for (int k = 1; k < 12; k++) s = _mm512_add_ps(s, a[k]);
      sink += _mm512_reduce_add_ps(s);
    }
    double seconds = now() - start;
    double gflops = (double)iters * 12 * 32 * omp_get_max_threads() / seconds / 1e9;  // 16 lanes x 2
    if (gflops > best) best = gflops;
    printf("threads %d: %.1f GFLOP/s (checksum %g)\n", omp_get_max_threads(), gflops, sink);
  }
  printf("best %.1f\n", best);
  return 0;
}
