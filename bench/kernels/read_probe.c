/* Memory probe (not a test, not part of the package): how fast can one core read the tiles a
 * keep-1/8 sparse decode step selects, in vLLM's CPU "amx" cache layout, against a sequential
 * sweep of the whole layer? Per (block of 128 tokens, KV head) 32 KiB: K 16 KiB (a 16-token tile
 * is one 2 KiB run), then V 16 KiB (a tile is four 512-byte runs, 4 KiB apart). 16k context, 3
 * KV heads, shuffled block table, 128 tiles per head (sink, window, random), ~1 GiB of layers
 * cycled so every read is cold, huge pages (madvise). Strategies as in
 * kernels/cpu_sparse_decode.py: near = T0 prefetch of the next tile spread over the current
 * one's loads; farNtouch = T1 prefetch of the first line(s) of each run N tiles ahead (starts
 * the L2 streamer); others are variants. Medians of 41 rounds, thread CPU time.
 *
 *   gcc -O2 -march=native -o /tmp/read_probe bench/kernels/read_probe.c && /tmp/read_probe [COMPUTE [REAL]]
 *
 * COMPUTE: a dependent FMA chain of that length after each tile's K and V (arithmetic to
 * overlap); REAL=1: each loaded line feeds 6 FMAs, as the kernel's q.k and p.v do.
 * Measured 2026-12-01 (README, "Decode speed through vLLM"): 0.165-0.19 ms for the tiles vs
 * 1.1-1.3 ms sequential; no variant below ~0.175 ms. Needs AVX-512 (x86-64 with avx512f). */
#define _GNU_SOURCE
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define HKV 3
#define B 128
#define D 64
#define T 16
#define REG (32 * 1024)  /* K 16K + V 16K per (block, head) */
static int CTX = 16384, NB, M, S, LAYERS;
static char* mem;
static int32_t* bt;      /* [NB-1] */
static int32_t* tiles;   /* [LAYERS][HKV][S] */
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static __m512 acc;
static __m512 A[6];
static int REAL = 0;
static inline void ld(const char* p) {
  const __m512i u = _mm512_loadu_si512(p);
  if (REAL) {
    const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), hi = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0xFFFF0000)));
    A[0] = _mm512_fmadd_ps(lo, A[3], A[0]); A[1] = _mm512_fmadd_ps(lo, A[4], A[1]); A[2] = _mm512_fmadd_ps(lo, A[5], A[2]);
    A[3] = _mm512_fmadd_ps(hi, A[0], A[3]); A[4] = _mm512_fmadd_ps(hi, A[1], A[4]); A[5] = _mm512_fmadd_ps(hi, A[2], A[5]);
  } else acc = _mm512_add_ps(acc, _mm512_castsi512_ps(u));
}
static int COMPUTE = 0;
static inline void compute(void) { __m512 x = acc; for (int i = 0; i < COMPUTE; ++i) x = _mm512_fmadd_ps(x, x, x); acc = x; }

static void seq_read(const char* L) {  /* vLLM-like: every block of the row, all heads */
  for (int b = 0; b < NB - 1; ++b) {
    const char* r = L + (size_t)bt[b] * HKV * REG;
    for (int o = 0; o < HKV * REG; o += 64) ld(r + o);
    for (int i = 0; i < 8 * HKV; ++i) compute();
  }
}
static inline const char* tile_k(const char* L, int h, int t) { int tok = t * T; return L + ((size_t)bt[tok / B] * HKV + h) * REG + (tok % B) * D * 2; }
static inline const char* tile_v(const char* L, int h, int t) { int tok = t * T; return L + ((size_t)bt[tok / B] * HKV + h) * REG + 16384 + (tok % B) / 2 * 64; }

static int STRAT, DIST, FAR;
static void sparse_read(const char* L, const int32_t* tl) {
  for (int h = 0; h < HKV; ++h) {
    const int32_t* th = tl + h * S;
    for (int i = 0; i < S; ++i) {
      const char* k = tile_k(L, h, th[i]);
      const char* v = tile_v(L, h, th[i]);
      const char *kn = 0, *vn = 0;
      if (STRAT >= 1 && i + DIST < S) { kn = tile_k(L, h, th[i + DIST]); vn = tile_v(L, h, th[i + DIST]); }
      if (STRAT == 2 && i + FAR < S) {
        const char* kf = tile_k(L, h, th[i + FAR]); const char* vf = tile_v(L, h, th[i + FAR]);
        _mm_prefetch(kf, _MM_HINT_T1); _mm_prefetch(kf + 64, _MM_HINT_T1);
        for (int c = 0; c < 4; ++c) { _mm_prefetch(vf + c * 4096, _MM_HINT_T1); _mm_prefetch(vf + c * 4096 + 64, _MM_HINT_T1); }
      }
      if (STRAT == 4 && i + FAR < S) {
        const char* kf = tile_k(L, h, th[i + FAR]); const char* vf = tile_v(L, h, th[i + FAR]);
        _mm_prefetch(kf, _MM_HINT_T1);
        for (int c = 0; c < 4; ++c) _mm_prefetch(vf + c * 4096, _MM_HINT_T1);
      }
      if ((STRAT == 5 || STRAT == 6 || STRAT == 7) && i + FAR < S) {
        const char* kf = tile_k(L, h, th[i + FAR]); const char* vf = tile_v(L, h, th[i + FAR]);
        _mm_prefetch(kf, _MM_HINT_T1); _mm_prefetch(kf + 64, _MM_HINT_T1);
        for (int c = 0; c < 4; ++c) { _mm_prefetch(vf + c * 4096, _MM_HINT_T1); _mm_prefetch(vf + c * 4096 + 64, _MM_HINT_T1); }
      }
      if (STRAT == 6 && i + 3 < S) {
        const char* kf = tile_k(L, h, th[i + 3]); const char* vf = tile_v(L, h, th[i + 3]);
        _mm_prefetch(kf + 128, _MM_HINT_T1); _mm_prefetch(kf + 192, _MM_HINT_T1);
        for (int c = 0; c < 4; ++c) { _mm_prefetch(vf + c * 4096 + 128, _MM_HINT_T1); _mm_prefetch(vf + c * 4096 + 192, _MM_HINT_T1); }
      }
      const char *km = 0, *vm = 0;
      if (STRAT == 5 && i + 2 < S) { km = tile_k(L, h, th[i + 2]); vm = tile_v(L, h, th[i + 2]); }
      if (STRAT == 3 && i + FAR < S) {  /* all lines of the far tile into L2 */
        const char* kf = tile_k(L, h, th[i + FAR]); const char* vf = tile_v(L, h, th[i + FAR]);
        for (int o = 0; o < 2048; o += 64) _mm_prefetch(kf + o, _MM_HINT_T1);
        for (int c = 0; c < 4; ++c) for (int o = 0; o < 512; o += 64) _mm_prefetch(vf + c * 4096 + o, _MM_HINT_T1);
      }
      for (int o = 0; o < 2048; o += 64) { if (kn) { if (STRAT == 7) _mm_prefetch(kn + o, _MM_HINT_NTA); else _mm_prefetch(kn + o, _MM_HINT_T0); } if (km) _mm_prefetch(km + o, _MM_HINT_T1); ld(k + o); }
      compute();
      for (int c = 0; c < 4; ++c) for (int o = 0; o < 512; o += 64) { if (vn) { if (STRAT == 7) _mm_prefetch(vn + c * 4096 + o, _MM_HINT_NTA); else _mm_prefetch(vn + c * 4096 + o, _MM_HINT_T0); } if (vm) _mm_prefetch(vm + c * 4096 + o, _MM_HINT_T1); ld(v + c * 4096 + o); }
      compute();
    }
  }
}

int main(int argc, char** argv) {
  COMPUTE = argc > 1 ? atoi(argv[1]) : 0; REAL = argc > 2 ? atoi(argv[2]) : 0; for (int i = 0; i < 6; ++i) A[i] = _mm512_set1_ps(1e-3f);
  NB = CTX / B + 1; M = CTX / T; S = M / 8;
  size_t layer = (size_t)NB * HKV * REG;
  LAYERS = (int)((1ul << 30) / layer) + 1;
  size_t tot = layer * LAYERS;
  mem = mmap(0, tot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(mem, tot, MADV_HUGEPAGE);
  memset(mem, 1, tot);
  srand(1);
  bt = malloc(sizeof(int32_t) * NB);
  int* perm = malloc(sizeof(int) * NB); for (int i = 0; i < NB; ++i) perm[i] = i;
  for (int i = NB - 1; i > 0; --i) { int j = rand() % (i + 1); int t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
  for (int i = 0; i < NB - 1; ++i) bt[i] = perm[i];
  tiles = malloc(sizeof(int32_t) * LAYERS * HKV * S);
  char* mark = malloc(M);
  for (int l = 0; l < LAYERS; ++l) for (int h = 0; h < HKV; ++h) {
    memset(mark, 0, M); int n = 0;
    for (int t = 0; t < 2; ++t) { mark[t] = 1; n++; }
    for (int t = M - 10; t < M; ++t) { mark[t] = 1; n++; }
    while (n < S) { int t = rand() % M; if (!mark[t]) { mark[t] = 1; n++; } }
    int k = 0; for (int t = 0; t < M; ++t) if (mark[t]) tiles[(l * HKV + h) * S + k++] = t;
  }
  struct { const char* name; int strat, dist, far; } cfg[] = {
    {"near1+far6touch", 2, 1, 6}, {"near1+far8touch", 2, 1, 8}, {"near1+far6touch1", 4, 1, 6}, {"near1+mid2+far6", 5, 1, 6},
    {"near1+far3b+far6", 6, 1, 6}, {"nta1+far6touch", 7, 1, 6}, {"near1+far6touch'", 2, 1, 6}, {"near1+far10touch1", 4, 1, 10}};
  int NC = sizeof(cfg) / sizeof(cfg[0]);
  double best[16] = {0}; double* all = calloc(64 * 16, sizeof(double));
  int iters = 41, call = 0;
  for (int it = 0; it < iters; ++it) {
    for (int c = -1; c < NC; ++c) {
      const char* L = mem + (size_t)(call % LAYERS) * layer; const int32_t* tl = tiles + (call % LAYERS) * HKV * S; call++;
      double t0 = now();
      if (c < 0) seq_read(L); else { STRAT = cfg[c].strat; DIST = cfg[c].dist; FAR = cfg[c].far; sparse_read(L, tl); }
      all[it * 16 + c + 1] = now() - t0;
    }
  }
  /* medians */
  for (int c = -1; c < NC; ++c) {
    double v[64]; for (int it = 0; it < iters; ++it) v[it] = all[it * 16 + c + 1];
    for (int a = 0; a < iters; ++a) for (int b2 = a + 1; b2 < iters; ++b2) if (v[b2] < v[a]) { double x = v[a]; v[a] = v[b2]; v[b2] = x; }
    best[c + 1] = v[iters / 2];
  }
  printf("compute=%d layers=%d seq %.3f ms (%.2f GB/s)\n", COMPUTE, LAYERS, best[0] * 1e3, layer / best[0] / 1e9);
  for (int c = 0; c < NC; ++c) printf("  %-18s %.3f ms  ratio %.2fx  (%.2f GB/s)\n", cfg[c].name, best[c + 1] * 1e3, best[0] / best[c + 1], (double)HKV * S * 4096 / best[c + 1] / 1e9);
  float f[16]; for (int i = 0; i < 6; ++i) acc = _mm512_add_ps(acc, A[i]); _mm512_storeu_ps(f, acc); return f[0] == 12345.f;
}
