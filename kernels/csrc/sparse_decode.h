// Fused sparse paged decode (kernels/cpu_sparse_decode.py): a generic scalar loop, the vector
// path for vLLM's "vec" layout and the packed path for its "amx" layout, and the entry point
// sparse_decode_cpu. Part of the one translation unit bindings.cpp.
#pragma once

#include "common.h"

// e^x for x <= 0 (softmax numerators), branch-free so loops over it vectorize: 2^(x log2 e)
// split as 2^k * 2^f with k = round(.), f in [-1/2, 1/2], 2^f by its degree-6 Taylor
// polynomial (relative error < 2e-7, at float rounding). x < -87 is clamped (e^-87 ~ 1.6e-38).
// e^g for |g| <= ln2/2: degree-6 Taylor polynomial (Horner), scalar or GCC vector.
template <typename F> static inline F exp_taylor6(F g) {
  F p = g * 1.3888889e-3f + 8.3333333e-3f;
  p = p * g + 4.1666667e-2f;
  p = p * g + 1.6666667e-1f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  return p * g + 1.0f;
}

static inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.4426950408889634f;
  const float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const float f = (t - k) * 0.6931471805599453f;    // f ln 2, in [-0.347, 0.347]
  const float p = exp_taylor6(f);
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, 4);
  return p * s;
}

// Tiles this many positions ahead are prefetched while one is computed: a tile's K^T rows are
// D separate cache lines (vLLM's CPU layout), which the hardware prefetchers do not follow.
constexpr int64_t kPrefetchAhead = 2;

// Prefetches the K and V rows of tile t (logical) of KV head h in a row whose block table is
// btr and length L; nothing past seq_len. Strides as in sparse_decode_cpu.
template <typename scalar_t>
static inline void prefetch_tile(int64_t t, int64_t h, int64_t L, const int32_t* btr, int64_t T,
                                 int64_t B, int64_t D, const scalar_t* kb, const scalar_t* vb,
                                 int64_t ks0, int64_t ks1, int64_t kst, int64_t ksd, int64_t vs0,
                                 int64_t vs1, int64_t vst, int64_t vsd) {
  const int64_t tok0 = t * T, es = sizeof(scalar_t);
  if (t < 0 || tok0 >= L) return;
  const int64_t n = std::min<int64_t>(T, L - tok0);
  const int64_t blk = btr[tok0 / B], off = tok0 % B;
  const scalar_t* kp = kb + blk * ks0 + h * ks1 + off * kst;
  const scalar_t* vp = vb + blk * vs0 + h * vs1 + off * vst;
  if (kst == 1) {
    for (int64_t d = 0; d < D; ++d) prefetch_span(kp + d * ksd, n * es);
  } else if (ksd == 1) {
    for (int64_t i = 0; i < n; ++i) prefetch_span(kp + i * kst, D * es);
  }
  if (vsd == 1) {
    if (vst == D) prefetch_span(vp, n * D * es);
    else for (int64_t i = 0; i < n; ++i) prefetch_span(vp + i * vst, D * es);
  }
}

template <typename scalar_t>
static void run(const float* q, const scalar_t* kb, const scalar_t* vb,
                int64_t ks0, int64_t ks1, int64_t kst, int64_t ksd,
                int64_t vs0, int64_t vs1, int64_t vst, int64_t vsd,
                const int32_t* bt, int64_t bt_stride, const int32_t* seq_lens,
                const int32_t* tiles, int64_t S, float* out, float* lse, float scale,
                int64_t R, int64_t Hkv, int64_t G, int64_t D, int64_t B, int64_t T) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * T), acc(G * D), m(G), l(G), kf(T), vf(D), qv(G * D);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      for (int64_t i = 0; i < G * D; ++i) qv[i] = q[rh * G * D + i] * scale;
      const float* qg = qv.data();  // query heads h*G .. h*G+G-1 of row r, scaled
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t L = seq_lens[r];
      const int32_t* tl = tiles + rh * S;
      const int32_t* btr = bt + r * bt_stride;
      auto prefetch = [&](int64_t si) {
        if (si < S) prefetch_tile(tl[si], h, L, btr, T, B, D, kb, vb, ks0, ks1, kst, ksd, vs0,
                                  vs1, vst, vsd);
      };
      for (int64_t si = 0; si < kPrefetchAhead; ++si) prefetch(si);
      for (int64_t si = 0; si < S; ++si) {
        prefetch(si + kPrefetchAhead);
        const int64_t t = tl[si];
        if (t < 0) continue;
        const int64_t tok0 = t * T;
        const int64_t n = std::min<int64_t>(T, L - tok0);
        if (n <= 0) continue;
        const int64_t blk = btr[tok0 / B], off = tok0 % B;
        const scalar_t* kp = kb + blk * ks0 + h * ks1 + off * kst;
        const scalar_t* vp = vb + blk * vs0 + h * vs1 + off * vst;
        // scores s[g, i] = q_g . k_i (q pre-scaled)
        std::fill(s.begin(), s.end(), 0.f);
        if (kst == 1) {  // K^T: for each dim, n contiguous tokens
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t* kd = kp + d * ksd;
            for (int64_t i = 0; i < n; ++i) kf[i] = ld(kd + i);
            for (int64_t g = 0; g < G; ++g) {
              const float qd = qg[g * D + d];
              float* sg = s.data() + g * T;
              for (int64_t i = 0; i < n; ++i) sg[i] += qd * kf[i];
            }
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* ki = kp + i * kst;
            for (int64_t d = 0; d < D; ++d) vf[d] = ld(ki + d * ksd);
            for (int64_t g = 0; g < G; ++g) {
              const float* qd = qg + g * D;
              float a = 0.f;
              for (int64_t d = 0; d < D; ++d) a += qd[d] * vf[d];
              s[g * T + i] = a;
            }
          }
        }
        // online softmax: rescale the running state, scores -> probabilities in place
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * T;
          float mx = sg[0];
          for (int64_t i = 1; i < n; ++i) mx = std::max(mx, sg[i]);
          const float mnew = std::max(m[g], mx);
          const float corr = (m[g] == NEG_INF) ? 0.f : std::exp(m[g] - mnew);
          if (corr != 1.f) {
            float* ag = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          }
          float lsum = 0.f;
          for (int64_t i = 0; i < n; ++i) {
            const float p = exp_nonpos(sg[i] - mnew);
            sg[i] = p;
            lsum += p;
          }
          l[g] = l[g] * corr + lsum;
          m[g] = mnew;
        }
        // acc[g] += sum_i p[g, i] v_i (each V row widened once for the G heads)
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* vi = vp + i * vst;
          if (vsd == 1) {
            for (int64_t d = 0; d < D; ++d) vf[d] = ld(vi + d);
          } else {
            for (int64_t d = 0; d < D; ++d) vf[d] = ld(vi + d * vsd);
          }
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * T + i];
            float* ag = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + (rh * G + g) * D;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
        lse[rh * G + g] = l[g] > 0.f ? m[g] + std::log(l[g]) : NEG_INF;
      }
    }
  });
}

// ---- Fast path: K^T token-contiguous (vLLM's CPU "vec" layout), V dim-contiguous, T and D
// multiples of 16, G <= 8. Works on 16-token chunks held in vector registers (GCC vector
// extensions: zmm with AVX-512, pairs of ymm with AVX2): the G score vectors of a chunk and
// the G accumulators of a 16-dim slice of the output stay in registers.

// exp_nonpos on 16 lanes; also exact for 0 < x < 88 (the lazily rescaled softmax passes x <= 8)
static inline v16f vexp_nonpos(v16f x) {
  const v16f lo = v16f{} - 87.0f;
  x = x < lo ? lo : x;
  const v16f t = x * 1.4426950408889634f;
  const v16f k = (t + 12582912.0f) - 12582912.0f;
  const v16f f = (t - k) * 0.6931471805599453f;
  const v16f p = exp_taylor6(f);
  const v16i bits = (__builtin_convertvector(k, v16i) + 127) << 23;
  v16f s;
  std::memcpy(&s, &bits, 64);
  return p * s;
}

// The 16-token chunks of the selected tiles of one (row, KV head), in processing order. The
// vector paths keep a second cursor kAheadChunks ahead and spread that chunk's prefetches over
// the loads of the current one, a line per load: prefetching a whole tile at once fills the
// line-fill buffers, and the compute behind the burst waits for them (docs/cpu-kernels.md).
struct Chunk {
  int64_t blk, off, n;  // physical block, token offset in it (a multiple of 16), valid tokens
};
struct ChunkCursor {
  const int32_t* tl;   // [S] selected tiles, -1 = padding
  int64_t S, T, L, B;  // selection width, tile size, seq_len, block size
  const int32_t* btr;  // the row's block table
  int64_t si = 0, c0 = 0;
  bool next(Chunk& c) {
    while (si < S) {
      const int64_t t = tl[si], tok = t * T + c0;
      if (t < 0 || c0 >= T || tok >= L) { ++si; c0 = 0; continue; }
      c = Chunk{btr[tok / B], tok % B, std::min<int64_t>(16, L - tok)};
      c0 += 16;
      return true;
    }
    return false;
  }
};
constexpr int kAheadChunks = 1;

static inline void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 3); }

// Every loop over the GG heads of a group is unrolled (PS_FOR_HEADS): left as a runtime loop,
// GCC keeps the per-head arrays (q.k sums, softmax state, PV accumulators) on the stack and each
// FMA of a dependency chain goes through a store and a reload (docs/cpu-kernels.md).
#define PS_FOR_HEADS(g) _Pragma("GCC unroll 8") for (int g = 0; g < GG; ++g)

// Stores p[GG][16] to memory for real: left to itself, GCC keeps the probabilities in
// registers and builds each of the 16 * GG lane broadcasts the PV products need with shuffles
// (and spills them); from memory each is a free {1to16} operand of its FMA (measured: the
// step's compute 25% faster with the data in L1).
#define PS_P_TO_MEMORY(p) asm volatile("" : : "r"(&(p)[0][0]) : "memory")

// The running max of the online softmax moves only when a chunk's max exceeds it by more than
// this (natural-log units): probabilities are then e^(s - m) <= e^8 ~ 3e3 in fp32, exact up to
// rounding (the softmax does not depend on the reference), and most chunks skip the rescale of
// the accumulators, the scalar exp and the wait for the chunk's max before the PV products (the
// lazy rescaling of FlashAttention-4; a chunk's max feeds only a predictable branch).
constexpr float kRescaleSlack = 8.0f;

// One 16-token chunk of the online softmax for the GG heads of a group: scores s0 + s1 (n
// valid slots, the rest masked to -inf) -> probabilities p[g][0..16) relative to the running
// reference m (raised, with acc [GG, D] and the lane sums lv rescaled, only past the slack), and
// lv[g] += p[g] lane-wise (reduced once per row in finish_row).
template <int GG>
static inline void softmax_chunk(const v16f (&s0)[GG], const v16f (&s1)[GG], int64_t n,
                                 const v16f& iota, float* m, v16f* lv, float* acc,
                                 float (*p)[16], int64_t D) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  PS_FOR_HEADS(g) {
    v16f sc = s0[g] + s1[g];
    if (n < 16) sc = iota < static_cast<float>(n) ? sc : v16f{} + NEG_INF;  // unwritten slots
    const float cm = hmax(sc);
    if (__builtin_expect(cm > m[g] + kRescaleSlack, 0)) {  // also the first chunk (m = -inf)
      const float corr = (m[g] == NEG_INF) ? 0.f : std::exp(m[g] - cm);
      float* ag = acc + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
      lv[g] *= corr;
      m[g] = cm;
    }
    v16f pv = vexp_nonpos(sc - m[g]);  // sc - m <= slack: the exp is valid there too
    if (n < 16) pv = iota < static_cast<float>(n) ? pv : v16f{};
    std::memcpy(p[g], &pv, 64);
    lv[g] += pv;
  }
}

// out [GG, D] = acc / l and lse [GG] of one (row, KV head), l the sum of the lanes of lv; an
// empty selection gives 0, -inf.
template <int GG>
static inline void finish_row(const float* m, const v16f* lv, const float* acc, float* out,
                              float* lse, int64_t D) {
  PS_FOR_HEADS(g) {
    const float l = hsum(lv[g]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = acc[g * D + d] * inv;
    lse[g] = l > 0.f ? m[g] + std::log(l) : -std::numeric_limits<float>::infinity();
  }
}

// f(std::integral_constant<int, G>{}) for a group size 1 <= G <= 8.
template <typename F> static inline void with_group(int64_t G, F&& f) { with_const<8>(G, f); }

// Chunks this far ahead of the one computed get the first two lines of each of their
// contiguous runs prefetched into L2 (hint T1): two accesses at the start of a run start the L2
// streamer on it, which brings the rest of the run without holding the core's line-fill
// buffers, so the one-chunk-ahead line prefetches then mostly hit L2. The runs: in the packed
// "amx" layout the K chunk (D/2 lines) and D/16 V runs of 8 lines; in the "vec" layout only the
// V chunk (16 rows of D), its K^T rows being single lines 4*B bytes apart. Measured on the
// kernel alone (16k, keep 1/8, cold layers, round-robin in one process): "amx" batch 1 10-16%
// faster at distance 6-8 (less at 12-16; touching one line per run, or prefetching whole runs
// far ahead with T0 or T1, was no faster or slower); "vec" fp32 ~5% faster.
constexpr int kTouchAhead = 6;

// AVX2 without AVX-512: the q.k sums and the PV accumulators of a chunk are written with ymm
// intrinsics (a low and a high half of 8 lanes per head). Written with v16f arrays, GCC kept
// them on the stack and moved each through general registers in 8-byte pieces on every FMA:
// the kernel ran at ~1/5 of its FMA rate (docs/cpu-kernels.md). One q.k sum per head (two
// would outgrow the 16 ymm registers), dims in order; the PV products as before.
template <typename scalar_t, int GG>
static void run_fast(const float* q, const scalar_t* kb, const scalar_t* vb,
                     int64_t ks0, int64_t ks1, int64_t ksd, int64_t vs0, int64_t vs1, int64_t vst,
                     const int32_t* bt, int64_t bt_stride, const int32_t* seq_lens,
                     const int32_t* tiles, int64_t S, float* out, float* lse, float scale,
                     int64_t R, int64_t Hkv, int64_t D, int64_t B, int64_t T) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  v16f iota;
  for (int i = 0; i < 16; ++i) iota[i] = static_cast<float>(i);
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(GG * D), qv(GG * D);
    alignas(64) float p[GG][16];
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      for (int64_t i = 0; i < GG * D; ++i) qv[i] = q[rh * GG * D + i] * scale;
      const float* qg = qv.data();  // query heads h*G .. h*G+G-1 of row r, scaled
      std::fill(acc.begin(), acc.end(), 0.f);
      float m[GG];
      v16f lv[GG];
      PS_FOR_HEADS(g) { m[g] = NEG_INF; lv[g] = v16f{}; }
      const int32_t* btr = bt + r * bt_stride;
      ChunkCursor cur{tiles + rh * S, S, T, seq_lens[r], B, btr}, ahead = cur, far = cur;
      const scalar_t* kbh = kb + h * ks1;
      const scalar_t* vbh = vb + h * vs1;
      // the chunk ahead: K^T rows d at kf + d * ksd, V rows i at vf + i * vst (null: none)
      const scalar_t* kf = nullptr;
      const scalar_t* vf = nullptr;
      auto touch_far = [&] {  // start the L2 streamer on a far chunk's V run (see run_amx)
        Chunk c;
        if (!far.next(c)) return;
        const char* v2 = reinterpret_cast<const char*>(vbh + c.blk * vs0 + c.off * vst);
        __builtin_prefetch(v2, 0, 2);
        __builtin_prefetch(v2 + 64, 0, 2);
      };
      for (int i = 0; i < kTouchAhead; ++i) touch_far();
      auto advance = [&] {
        Chunk c;
        if (ahead.next(c)) {
          kf = kbh + c.blk * ks0 + c.off;
          vf = vbh + c.blk * vs0 + c.off * vst;
        } else {
          kf = vf = nullptr;
        }
      };
      for (int i = 0; i < kAheadChunks; ++i) {
        advance();
        if (kf) {
          for (int64_t d = 0; d < D; ++d) prefetch_line(kf + d * ksd);
          for (int64_t i2 = 0; i2 < 16; ++i2) prefetch_span(vf + i2 * vst, D * sizeof(scalar_t));
        }
      }
      advance();
      Chunk c;
      while (cur.next(c)) {
        touch_far();
        const int64_t n = c.n;
        // 16 slots from a multiple of 16 inside the block: in bounds even when n < 16
        const scalar_t* kp = kbh + c.blk * ks0 + c.off;
        const scalar_t* vp = vbh + c.blk * vs0 + c.off * vst;
        v16f s0[GG], s1[GG];  // two partial sums per head: shorter FMA dependency chains
#if PS_AVX2_ONLY
        {
          __m256 lo[GG], hi[GG];  // one sum per head (two would outgrow the 16 ymm registers)
          PS_FOR_HEADS(g) lo[g] = hi[g] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; ++d) {
            if (kf) prefetch_line(kf + d * ksd);
            const __m256 k0 = load8(kp + d * ksd), k1 = load8(kp + d * ksd + 8);
            PS_FOR_HEADS(g) {
              const __m256 w = _mm256_broadcast_ss(qg + g * D + d);
              lo[g] = _mm256_fmadd_ps(w, k0, lo[g]);
              hi[g] = _mm256_fmadd_ps(w, k1, hi[g]);
            }
          }
          PS_FOR_HEADS(g) {
            alignas(64) float t[16];
            _mm256_store_ps(t, lo[g]);
            _mm256_store_ps(t + 8, hi[g]);
            std::memcpy(&s0[g], t, 64);
            s1[g] = v16f{};
          }
        }
#else
        PS_FOR_HEADS(g) { s0[g] = v16f{}; s1[g] = v16f{}; }
        for (int64_t d = 0; d < D; d += 2) {
          if (kf) { prefetch_line(kf + d * ksd); prefetch_line(kf + (d + 1) * ksd); }
          const v16f k0 = load16(kp + d * ksd), k1 = load16(kp + (d + 1) * ksd);
          PS_FOR_HEADS(g) {
            s0[g] += qg[g * D + d] * k0;
            s1[g] += qg[g * D + d + 1] * k1;
          }
        }
#endif
        softmax_chunk<GG>(s0, s1, n, iota, m, lv, acc.data(), p, D);
        PS_P_TO_MEMORY(p);
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
#if PS_AVX2_ONLY
          float* ad = acc.data() + d0;
          __m256 lo[GG], hi[GG];
          PS_FOR_HEADS(g) { lo[g] = _mm256_loadu_ps(ad + g * D); hi[g] = _mm256_loadu_ps(ad + g * D + 8); }
          for (int64_t i = 0; i < n; ++i) {
            if (vf) prefetch_line(vf + i * vst + d0);
            const __m256 v0 = load8(vp + i * vst + d0), v1 = load8(vp + i * vst + d0 + 8);
            PS_FOR_HEADS(g) {
              const __m256 w = _mm256_broadcast_ss(&p[g][i]);
              lo[g] = _mm256_fmadd_ps(w, v0, lo[g]);
              hi[g] = _mm256_fmadd_ps(w, v1, hi[g]);
            }
          }
          PS_FOR_HEADS(g) { _mm256_storeu_ps(ad + g * D, lo[g]); _mm256_storeu_ps(ad + g * D + 8, hi[g]); }
#else
          v16f a[GG];
          PS_FOR_HEADS(g) std::memcpy(&a[g], acc.data() + g * D + d0, 64);
          for (int64_t i = 0; i < n; ++i) {
            if (vf) prefetch_line(vf + i * vst + d0);
            const v16f vv = load16(vp + i * vst + d0);
            PS_FOR_HEADS(g) a[g] += p[g][i] * vv;
          }
          PS_FOR_HEADS(g) std::memcpy(acc.data() + g * D + d0, &a[g], 64);
#endif
        }
        advance();
      }
      finish_row<GG>(m, lv, acc.data(), out + rh * GG * D, lse + rh * GG, D);
    }
  });
}

// ---- Packed path: vLLM's "amx" layout (bf16; see split_pairs in common.h).
template <int GG>
static void run_amx(const float* q, const c10::BFloat16* kb, const c10::BFloat16* vb,
                    int64_t ks0, int64_t ks1, int64_t vs0, int64_t vs1,
                    const int32_t* bt, int64_t bt_stride, const int32_t* seq_lens,
                    const int32_t* tiles, int64_t S, float* out, float* lse, float scale,
                    int64_t R, int64_t Hkv, int64_t D, int64_t B, int64_t T) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  v16f iota;
  for (int i = 0; i < 16; ++i) iota[i] = static_cast<float>(i);
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(GG * D), qv(GG * D);
    alignas(64) float p[GG][16];
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      for (int64_t i = 0; i < GG * D; ++i) qv[i] = q[rh * GG * D + i] * scale;
      const float* qg = qv.data();  // query heads h*G .. h*G+G-1 of row r, scaled
      std::fill(acc.begin(), acc.end(), 0.f);
      float m[GG];
      v16f lv[GG];
      PS_FOR_HEADS(g) { m[g] = NEG_INF; lv[g] = v16f{}; }
      const int32_t* btr = bt + r * bt_stride;
      ChunkCursor cur{tiles + rh * S, S, T, seq_lens[r], B, btr}, ahead = cur, far = cur;
      const c10::BFloat16* kbh = kb + h * ks1;
      const c10::BFloat16* vbh = vb + h * vs1;
      // The chunk ahead: its K is one run of D/2 lines from kf, its V D/16 runs of 8 lines
      // from vf + c * B (null: none).
      const c10::BFloat16* kf = nullptr;
      const c10::BFloat16* vf = nullptr;
      auto touch_far = [&] {  // the next far chunk: start the L2 streamer on its runs
        Chunk c;
        if (!far.next(c)) return;
        const c10::BFloat16* k2 = kbh + c.blk * ks0 + c.off * D;
        const c10::BFloat16* v2 = vbh + c.blk * vs0 + c.off * 16;
        __builtin_prefetch(k2, 0, 2);
        __builtin_prefetch(k2 + 32, 0, 2);
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          __builtin_prefetch(v2 + d0 * B, 0, 2);
          __builtin_prefetch(v2 + d0 * B + 32, 0, 2);
        }
      };
      for (int i = 0; i < kTouchAhead; ++i) touch_far();
      auto advance = [&] {
        Chunk c;
        if (ahead.next(c)) {
          kf = kbh + c.blk * ks0 + c.off * D;
          vf = vbh + c.blk * vs0 + c.off * 16;
        } else {
          kf = vf = nullptr;
        }
      };
      for (int i = 0; i < kAheadChunks; ++i) {
        advance();
        if (kf) {
          prefetch_span(kf, 16 * D * 2);
          for (int64_t c = 0; c < D; c += 16) prefetch_span(vf + c * B, 16 * 32);
        }
      }
      advance();
      Chunk c;
      while (cur.next(c)) {
        touch_far();
        const int64_t n = c.n;
        const c10::BFloat16* kp = kbh + c.blk * ks0 + c.off * D;  // the chunk: D/2 lines
        // Per head 2 * NL partial sums (even and odd dims of NL lines per step): FMA chains of
        // D / (2 NL) instead of D / 2; NL = 2 while the 4 * GG sums fit the 32 zmm registers.
        constexpr int NL = GG <= 4 ? 2 : 1;
        v16f s0[NL][GG], s1[NL][GG];
        _Pragma("GCC unroll 2") for (int j = 0; j < NL; ++j)
          PS_FOR_HEADS(g) { s0[j][g] = v16f{}; s1[j][g] = v16f{}; }
        for (int64_t d = 0; d < D; d += 2 * NL) {  // D is a multiple of 16
          _Pragma("GCC unroll 2") for (int j = 0; j < NL; ++j) {
            const int64_t dj = d + 2 * j;
            if (kf) prefetch_line(kf + dj * 16);
            v16f k0, k1;
            split_pairs(kp + dj * 16, k0, k1);  // dims dj, dj+1 of the 16 tokens
            PS_FOR_HEADS(g) {
              s0[j][g] += qg[g * D + dj] * k0;
              s1[j][g] += qg[g * D + dj + 1] * k1;
            }
          }
        }
        if constexpr (NL == 2) PS_FOR_HEADS(g) { s0[0][g] += s0[1][g]; s1[0][g] += s1[1][g]; }
        softmax_chunk<GG>(s0[0], s1[0], n, iota, m, lv, acc.data(), p, D);
        PS_P_TO_MEMORY(p);
        const c10::BFloat16* vp = vbh + c.blk * vs0 + c.off * 16;  // token pair c.off / 2
        for (int64_t d0 = 0; d0 < D; d0 += 16) {
          const c10::BFloat16* vc = vp + d0 * B;  // the 16-dim chunk d0/16: 8 lines
          v16f a0[GG], a1[GG];  // even and odd tokens: two shorter FMA chains per head
          PS_FOR_HEADS(g) {
            std::memcpy(&a0[g], acc.data() + g * D + d0, 64);
            a1[g] = v16f{};
          }
          for (int64_t i = 0; i < n; i += 2) {
            if (vf) prefetch_line(vf + d0 * B + i * 16);
            v16f v0, v1;
            split_pairs(vc + i * 16, v0, v1);  // tokens i, i+1 of the 16 dims
            if (i + 1 >= n) v1 = v16f{};  // an unwritten slot: p is 0 there, V may be NaN
            PS_FOR_HEADS(g) {
              a0[g] += p[g][i] * v0;
              a1[g] += p[g][i + 1] * v1;
            }
          }
          PS_FOR_HEADS(g) {
            const v16f a = a0[g] + a1[g];
            std::memcpy(acc.data() + g * D + d0, &a, 64);
          }
        }
        advance();
      }
      finish_row<GG>(m, lv, acc.data(), out + rh * GG * D, lse + rh * GG, D);
    }
  });
}

// Whether run_amx takes this case of vLLM's "amx" layout: bf16, T and D multiples of 16,
// 1 <= G <= 8, each (block, head) region's (B, D) rows contiguous. When it does not, the entry
// points return undefined tensors (None in Python) and the caller unpacks the blocks
// (layouts.amx_unpack_blocks) for the generic loop: checked here, not in Python, because it
// runs on every layer's call.
static bool packed_path_takes(const torch::Tensor& query, const torch::Tensor& k,
                              const torch::Tensor& v, int64_t T) {
  const int64_t Hq = query.size(1), D = query.size(2), Hkv = k.size(1);
  return k.scalar_type() == at::kBFloat16 && T % 16 == 0 && D % 16 == 0 && Hkv <= Hq &&
         Hq <= 8 * Hkv && k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 &&
         v.stride(2) == D;
}

// The loops behind the entry points. qf [R, Hq, D] fp32 (unscaled), bt [R, MB] int32 and seq
// [R] int32 contiguous, tiles [R, Hkv, S] int32 -> of [R, Hq, D] fp32 and lse [R, Hq]. amx:
// packed_path_takes was checked.
static void decode_core(const float* qf, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& bt, const int32_t* seq, const int32_t* tiles,
                        int64_t S, float* of, float* lse, double scale, bool amx, int64_t R,
                        int64_t Hq, int64_t D, int64_t T) {
  const int64_t Hkv = k.size(1), B = k.size(2), G = Hq / Hkv;
  const int32_t* btp = bt.data_ptr<int32_t>();
  if (amx) {
    auto go = [&](auto gg) {
      run_amx<decltype(gg)::value>(
          qf, k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
          k.stride(0), k.stride(1), v.stride(0), v.stride(1), btp, bt.stride(0), seq, tiles, S,
          of, lse, static_cast<float>(scale), R, Hkv, D, B, T);
    };
    with_group(G, go);
    return;
  }
  const bool fast = k.stride(2) == 1 && v.stride(3) == 1 && T % 16 == 0 && D % 16 == 0 &&
                    G >= 1 && G <= 8 && B % 16 == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "sparse_decode_cpu", [&] {
    if (fast) {
      auto go = [&](auto gg) {
        run_fast<scalar_t, decltype(gg)::value>(
            qf, k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k.stride(0),
            k.stride(1), k.stride(3), v.stride(0), v.stride(1), v.stride(2), btp, bt.stride(0),
            seq, tiles, S, of, lse, static_cast<float>(scale), R, Hkv, D, B, T);
      };
      with_group(G, go);
      return;
    }
    run<scalar_t>(qf, k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                  k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                  v.stride(0), v.stride(1), v.stride(2), v.stride(3), btp, bt.stride(0), seq,
                  tiles, S, of, lse, static_cast<float>(scale), R, Hkv, G, D, B, T);
  });
}

// query rows (rows[r], or r when rows is null) as fp32 [R, Hq, D] in buf. A plain loop: a .to() runs through TensorIterator, whose code is cold on the
// per-layer path (docs/cpu-kernels.md).
static void query_rows_f32(const torch::Tensor& query, const int64_t* rows, int64_t R,
                           std::vector<float>& buf) {
  const int64_t Hq = query.size(1), D = query.size(2), s0 = query.stride(0),
                s1 = query.stride(1), s2 = query.stride(2);
  buf.resize(R * Hq * D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "q_to_fp32", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R; ++r) {
      const scalar_t* qr = q + (rows ? rows[r] : r) * s0;
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < D; ++d)
          buf[(r * Hq + h) * D + d] = static_cast<float>(qr[h * s1 + d * s2]);
    }
  });
}

// The query [R, Hq, D] as fp32 contiguous: its own data when it already is, else copied to buf.
static const float* query_f32(const torch::Tensor& query, std::vector<float>& buf) {
  if (query.scalar_type() == at::kFloat && query.is_contiguous()) return query.data_ptr<float>();
  query_rows_f32(query, nullptr, query.size(0), buf);
  return buf.data();
}

// of [R, Hq, D] fp32 -> out[rows[r]] (or out[r]) in out's dtype.
static void write_out_rows(const float* of, torch::Tensor& out, const int64_t* rows, int64_t R) {
  const int64_t Hq = out.size(1), D = out.size(2), s0 = out.stride(0), s1 = out.stride(1),
                s2 = out.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "out_cast", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R; ++r) {
      scalar_t* orow = o + (rows ? rows[r] : r) * s0;
      for (int64_t h = 0; h < Hq; ++h)
        for (int64_t d = 0; d < D; ++d)
          orow[h * s1 + d * s2] = static_cast<scalar_t>(of[(r * Hq + h) * D + d]);
    }
  });
}

std::vector<torch::Tensor> sparse_decode_cpu(torch::Tensor query, torch::Tensor k,
                                             torch::Tensor v, torch::Tensor bt,
                                             torch::Tensor seq_lens, torch::Tensor tiles,
                                             int64_t T, double scale, bool amx,
                                             c10::optional<at::ScalarType> out_dtype) {
  // query [R, Hq, D] any float dtype; k, v [NB, Hkv, B, D] strided views; bt [R, MB],
  // seq_lens [R], tiles [R, Hkv, S] integer. The conversions below are no-ops (no copy) for
  // fp32 / int32 contiguous inputs; done here, not in Python, for the per-layer overhead.
  if (amx && !packed_path_takes(query, k, v, T)) return {torch::Tensor(), torch::Tensor()};
  bt = as_contig(bt, at::kInt);
  seq_lens = as_contig(seq_lens, at::kInt);
  tiles = as_contig(tiles, at::kInt);
  const int64_t R = query.size(0), Hq = query.size(1), D = query.size(2), S = tiles.size(2);
  std::vector<float> qbuf, obuf;
  const float* qf = query_f32(query, qbuf);  // scaled per task in the loops
  const at::ScalarType odt = out_dtype ? *out_dtype : at::kFloat;
  auto out = torch::empty({R, Hq, D}, torch::dtype(odt));
  auto lse = torch::empty({R, Hq}, torch::dtype(torch::kFloat32));
  float* of = nullptr;  // fp32 output the kernels write; cast into `out` at the end if needed
  if (odt == at::kFloat) {
    of = out.data_ptr<float>();
  } else {
    obuf.resize(out.numel());
    of = obuf.data();
  }
  decode_core(qf, k, v, bt, seq_lens.data_ptr<int32_t>(), tiles.data_ptr<int32_t>(), S, of,
              lse.data_ptr<float>(), scale, amx, R, Hq, D, T);
  if (odt != at::kFloat) write_out_rows(obuf.data(), out, nullptr, R);
  return {out, lse};
}
