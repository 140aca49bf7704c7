"""Fused CPU tile selection and Quest ranking (C++, compiled with the sparse decode kernel).

The torch version of :func:`prescore_backend.selection.select_tiles` is ~20 tensor ops per
layer (top-k, scatters, a sort), ~0.3 ms at 16k context on one core: as much as reading the
selected tiles. Here one task per (row, KV head) does the same in O(M) with
a branch-free top-k (the k-th largest score built bit by bit by vectorized counting passes
over order-preserving integer keys, then a vectorized pass marking the keys above it and a scan
for the ties, lower index first) and writes the ascending tile list directly.

* :func:`cpu_select_tiles` implements exactly the rules of ``select_tiles_ref`` (sinks and
  window first, most recent window tiles first when the budget is smaller; then up to
  ``lsh_cap`` query-aware matches by pre-score; then pre-scores; ties to the lower index; NaN
  pre-scores count as -inf), so it is checked against the loop oracle tile for tile.
* :func:`cpu_quest_pick` ranks each row's eligible tiles (neither sink nor window, optionally
  an LSH candidate) by the Quest upper bound of q.k, max over the GQA group (Tang et al.,
  "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024), reading
  the per-tile key bounds through the block table in place instead of gathering them, and marks
  the best ``caps[r]`` (ties to the lower index).

Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cpu_pq_pick", "cpu_quest_pick", "cpu_select_tiles", "cpu_sparq_pick"]

SRC = r"""
#include <cfloat>
// ---- Tile selection (see kernels/cpu_select.py).
namespace {
// Order-preserving map of a float key to uint32 (a > b as floats <=> as keys), NaN as -inf and
// -0 as +0 (they compare equal, so they must tie). Every key is >= 0x007FFFFF (that of -inf):
// 0 is free to mean "not a candidate".
inline uint32_t order_bits(float x) {
  x = (x != x) ? -std::numeric_limits<float>::infinity() : x;
  x += 0.0f;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  // negative: all bits flipped; positive: the sign bit set. As an xor with a mask built from
  // the sign, not a ?: (compiled as a branch in scalar loops: random signs mispredict half
  // the time)
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}
typedef uint32_t v16u_t __attribute__((vector_size(64)));
typedef int32_t v16i_t __attribute__((vector_size(64)));

// Bit i set where p[i] != 0, for i < 64 (p readable for 64 bytes).
inline uint64_t kept_mask64(const uint8_t* p) {
#ifdef __AVX512BW__
  return _mm512_test_epi8_mask(_mm512_loadu_si512(p), _mm512_set1_epi8(-1));
#else
  uint64_t bits = 0;
  for (int i = 0; i < 64; ++i) bits |= static_cast<uint64_t>(p[i] != 0) << i;
  return bits;
#endif
}

// Marks src[t] = mark for the best `take` candidates among u[0..n) (u[t] = 0: not a candidate;
// u padded with zeros to nv vectors; k candidates in all), ties to the lower index: the same
// set as sorting by (key descending, index ascending). The k-th largest key is built bit by bit:
// 32 branch-free counting passes over the vectors (std::nth_element on random scores
// mispredicts about every other comparison, 5x slower); then the keys above it are marked in a
// vectorized pass and, only if some are needed, the first keys equal to it by a scan.
inline void mark_top(const v16u_t* uv, int64_t nv, int64_t n, int64_t k, int64_t take,
                     uint8_t* src, uint8_t mark) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(uv);
  if (take <= 0) return;
  if (take >= k) {  // every candidate
    for (int64_t i = 0; i < n; ++i) src[i] = u[i] != 0 ? mark : src[i];
    return;
  }
  uint32_t thr = 0;  // the largest value with at least `take` keys >= it: the take-th largest
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = thr | (1u << bit);
    v16i_t cnt = v16i_t{};
    for (int64_t i = 0; i < nv; ++i) cnt -= (uv[i] >= cand);  // true is -1
    int64_t total = 0;
    for (int l = 0; l < 16; ++l) total += cnt[l];
    if (total >= take) thr = cand;
  }
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool gt = u[i] > thr;
    above += gt;
    src[i] = gt ? mark : src[i];
  }
  for (int64_t i = 0, ties = take - above; i < n && ties > 0; ++i)
    if (u[i] == thr) { src[i] = mark; --ties; }
}
}  // namespace

// HyperAttention's LSH candidates computed in place (select_decode_cpu with lsh_proj): tile t
// of row r, KV head h is a candidate when its bucket set (the side data's per-block masks, read
// through the block table) meets the bucket set of the query group (qmask, hashed here), and
// its pre-score is finite (a tile not scored yet is never a query-aware pick, as in
// prescore_backend.decode.query_aware_pick). Per-row caps.
struct LshInPlace {
  const uint64_t* qmask;  // [R, H, W] the query group's buckets
  const int64_t* tmask;   // [NB, H, tpb, W] the tiles' bucket sets, contiguous
  const int32_t* bt;      // [R, bt_stride] block table
  int64_t bt_stride, tpb, W;
  const int64_t* caps;    // [R] query-aware tiles at most per (row, head)
};

// The converted inputs of a selection (kept alive here) and its sizes.
struct SelPlan {
  torch::Tensor scores, num_tiles, budget, lsh_match;  // [R, H, M] fp32, [R] int64, [R, H, M]
  int64_t R = 0, H = 0, M = 0, S = 0;                  // S: the widest row's tile count
  std::vector<int64_t> keep;                           // [R] tiles kept per (row, head)
};

static SelPlan select_plan(torch::Tensor scores, torch::Tensor num_tiles, torch::Tensor budget,
                           const c10::optional<torch::Tensor>& lsh_match_opt) {
  // scores [R, H, M] float; num_tiles, budget [R] integer; lsh_match [R, H, M] bool or None.
  // Conversions here (no-ops for the usual dtypes), not in Python.
  SelPlan p;
  p.scores = as_contig(scores, at::kFloat);
  p.R = p.scores.size(0), p.H = p.scores.size(1), p.M = p.scores.size(2);
  p.num_tiles = as_contig(num_tiles.dim() == 1 ? num_tiles : num_tiles.reshape({p.R}), at::kLong);
  p.budget = as_contig(budget.dim() == 1 ? budget : budget.reshape({p.R}), at::kLong);
  if (lsh_match_opt.has_value()) p.lsh_match = as_contig(*lsh_match_opt, at::kBool);
  TORCH_CHECK(p.num_tiles.numel() == p.R && p.budget.numel() == p.R,
              "select_tiles_cpu: num_tiles and budget must have one entry per row");
  const int64_t* nt = p.num_tiles.data_ptr<int64_t>();
  const int64_t* bu = p.budget.data_ptr<int64_t>();
  p.keep.resize(p.R);
  for (int64_t r = 0; r < p.R; ++r) {
    const int64_t n = std::clamp<int64_t>(nt[r], 0, p.M);
    p.keep[r] = std::clamp<int64_t>(bu[r], 0, n);
    p.S = std::max(p.S, p.keep[r]);
  }
  return p;
}

// -> to [R, H, S] int32 ascending, -1 padded; no [R, H] int32; cnt [R, H, 4] int64 (sink,
// window, lsh, prescore per (row, head)).
static void select_run(const SelPlan& p, int64_t sink, int64_t window, int64_t lsh_cap,
                       const LshInPlace* lip, int32_t* to, int32_t* no, int64_t* cnt) {
  const int64_t R = p.R, H = p.H, M = p.M, S = p.S;
  const float* sc = p.scores.data_ptr<float>();
  const int64_t* nt = p.num_tiles.data_ptr<int64_t>();
  const int64_t* keep = p.keep.data();
  const bool use_lsh = lip == nullptr && p.lsh_match.defined() && p.lsh_match.numel() > 0 &&
                       lsh_cap > 0;
  const bool* lm = use_lsh ? p.lsh_match.data_ptr<bool>() : nullptr;
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    // Scratch kept per thread across calls (a cold malloc per call costs microseconds on the
    // per-layer path); every element read below is written first for this task.
    // src: 0 not chosen, 1 sink, 2 window, 3 lsh, 4 prescore; padded for 64-byte reads.
    // hv: LSH hits. uv: candidate keys (0: not a candidate), padded to whole vectors.
    static thread_local std::vector<uint8_t> src, hv;
    static thread_local std::vector<v16u_t> uv;
    if (src.size() < static_cast<size_t>(M + 64)) src.resize(M + 64);
    if (lip != nullptr && hv.size() < static_cast<size_t>(M)) hv.resize(M);
    if (uv.size() < static_cast<size_t>((M + 15) / 16)) uv.resize((M + 15) / 16);
    uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / H;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M), b = keep[r], nv = (n + 15) / 16;
      const float* s = sc + rh * M;
      std::fill(src.begin(), src.begin() + n, 0);
      std::fill(uv.begin(), uv.begin() + nv, v16u_t{});
      const int64_t w_lo = std::max<int64_t>(n - window, 0), s_hi = std::min(sink, n);
      auto kind = [&](int64_t t) { return t < sink ? 1 : 2; };  // a sink in the window is a sink
      // per-source counts kept as the tiles are marked (a counting pass over src after the
      // marking widened every byte to 64 bits: ~1/4 of the selection's time)
      int64_t taken = 0, c_sink = 0, c_lsh = 0, c_pre = 0;
      for (int64_t t = n - 1; t >= w_lo && taken < b; --t, ++taken) {
        src[t] = kind(t);
        c_sink += src[t] == 1;
      }
      const int64_t c_win = taken - c_sink;
      for (int64_t t = 0; t < s_hi && taken < b; ++t)
        if (!src[t]) { src[t] = kind(t); ++taken; ++c_sink; }
      int64_t room = b - taken;
      // Candidates: neither sink nor window (src is 0 there while room > 0), and for the LSH
      // part a match. Keys built branch-free (the loops vectorize), counted as they go.
      if (room > 0 && use_lsh) {
        const bool* mt = lm + rh * M;
        int64_t k = 0;
        for (int64_t t = s_hi; t < w_lo; ++t) {
          const bool c = mt[t];
          u[t] = c ? order_bits(s[t]) : 0u;
          k += c;
        }
        const int64_t take = std::min({lsh_cap, k, room});
        mark_top(uv.data(), nv, n, k, take, src.data(), 3);
        room -= take;
        c_lsh += take;
      }
      if (room > 0 && lip != nullptr && lip->caps[r] > 0) {
        const int64_t W = lip->W, tpb = lip->tpb, h = rh % H;
        const uint64_t* qm = lip->qmask + rh * W;
        const int32_t* btr = lip->bt + r * lip->bt_stride;
        const int64_t run = tpb * W;  // a (block, head)'s bucket sets: one contiguous run
        auto block_sets = [&](int64_t lb) { return lip->tmask + (btr[lb] * H + h) * run; };
        int64_t k = 0;
        // block by block: one division per block, not two per tile (64-bit divisions made
        // this loop cost ~1 ms at 16k, batch 8); the run 16 blocks ahead is prefetched
        // (blocks sit at random places: each run is a cold 1-2 line read)
        const int64_t lb_end = (w_lo + tpb - 1) / tpb;
        // pass 1: hit[t] = the tile's set meets the group's (W a constant for 1 and 2 words,
        // 2^r <= 128 buckets, so the word loop unrolls)
        auto match_pass = [&](auto ww) {
          const int64_t WW = ww;
          for (int64_t lb = s_hi / tpb; lb < lb_end; ++lb) {
            if (lb + 16 < lb_end) {
              const int64_t* nx = block_sets(lb + 16);
              __builtin_prefetch(nx, 0, 3);
              __builtin_prefetch(nx + run - 1, 0, 3);
            }
            const int64_t* tm = block_sets(lb) - lb * tpb * WW;  // indexed by logical tile
            const int64_t t_end = std::min(w_lo, (lb + 1) * tpb);
            for (int64_t t = std::max(s_hi, lb * tpb); t < t_end; ++t) {
              uint64_t hit = 0;
              for (int64_t w = 0; w < WW; ++w)
                hit |= static_cast<uint64_t>(tm[t * WW + w]) & qm[w];
              hv[t] = hit != 0;
            }
          }
        };
        if (W == 1) match_pass(std::integral_constant<int64_t, 1>{});
        else if (W == 2) match_pass(std::integral_constant<int64_t, 2>{});
        else match_pass(W);
        // pass 2, branch-free (it vectorizes; a match is a coin flip per tile and branches
        // on it mispredicted: ~50 cycles per tile in one fused loop with `if`s)
        for (int64_t t = s_hi; t < w_lo; ++t) {
          const uint32_t c = static_cast<uint32_t>(hv[t]) &
                             static_cast<uint32_t>(std::fabs(s[t]) <= FLT_MAX);  // finite
          u[t] = order_bits(s[t]) & (0u - c);
          k += c;
        }
        const int64_t take = std::min({lip->caps[r], k, room});
        mark_top(uv.data(), nv, n, k, take, src.data(), 3);
        room -= take;
        c_lsh += take;
      }
      if (room > 0) {
        int64_t k = 0;
        for (int64_t t = s_hi; t < w_lo; ++t) {
          const bool c = src[t] == 0;
          u[t] = c ? order_bits(s[t]) : 0u;
          k += c;
        }
        mark_top(uv.data(), nv, n, k, std::min(k, room), src.data(), 4);
        c_pre = std::min(k, room);
      }
      // ascending list: a 64-bit mask of the kept tiles per 64 (one vector compare with
      // AVX-512), then its set bits; costs ~n/64 + kept steps instead of n
      int64_t j = 0;
      int32_t* o = to + rh * S;
      for (int64_t t0 = 0; t0 < n; t0 += 64) {
        uint64_t bits = kept_mask64(src.data() + t0);
        if (n - t0 < 64) bits &= (uint64_t{1} << (n - t0)) - 1;
        for (; bits; bits &= bits - 1) o[j++] = static_cast<int32_t>(t0 + __builtin_ctzll(bits));
      }
      for (int64_t k = j; k < S; ++k) o[k] = -1;
      int64_t* ct = cnt + rh * 4;
      ct[0] = c_sink, ct[1] = c_win, ct[2] = c_lsh, ct[3] = c_pre;
      no[rh] = static_cast<int32_t>(j);
    }
  });
}

static std::vector<torch::Tensor> select_impl(torch::Tensor scores, torch::Tensor num_tiles,
                                              torch::Tensor budget, int64_t sink,
                                              int64_t window,
                                              c10::optional<torch::Tensor> lsh_match_opt,
                                              int64_t lsh_cap, const LshInPlace* lip) {
  // -> tiles [R, H, S] int32 ascending, -1 padded; num [R, H] int32; counts [4] int64 (sink,
  // window, lsh, prescore).
  const SelPlan p = select_plan(scores, num_tiles, budget, lsh_match_opt);
  auto tiles = torch::empty({p.R, p.H, p.S}, torch::dtype(torch::kInt32));
  auto num = torch::empty({p.R, p.H}, torch::dtype(torch::kInt32));
  std::vector<int64_t> cnt(p.R * p.H * 4, 0);
  select_run(p, sink, window, lsh_cap, lip, tiles.data_ptr<int32_t>(), num.data_ptr<int32_t>(),
             cnt.data());
  auto counts = torch::empty({4}, torch::dtype(torch::kInt64));
  int64_t* co = counts.data_ptr<int64_t>();
  std::fill(co, co + 4, int64_t{0});
  for (int64_t i = 0; i < p.R * p.H; ++i)
    for (int k = 0; k < 4; ++k) co[k] += cnt[i * 4 + k];
  return {tiles, num, counts};
}

std::vector<torch::Tensor> select_tiles_cpu(torch::Tensor scores, torch::Tensor num_tiles,
                                            torch::Tensor budget, int64_t sink, int64_t window,
                                            c10::optional<torch::Tensor> lsh_match_opt,
                                            int64_t lsh_cap) {
  return select_impl(scores, num_tiles, budget, sink, window, lsh_match_opt, lsh_cap, nullptr);
}

// The query group's LSH bucket set per (row, KV head): bucket of x = sum_j [x . proj[:, j] > 0]
// 2^j (kernels.lsh.AngularLSH.hash), one bit per query head of the group -> qmask [R, Hkv, W].
template <typename scalar_t>
static void hash_query_groups(const scalar_t* q, const float* proj, int64_t R, int64_t Hkv,
                              int64_t G, int64_t D, int64_t bits, int64_t W, uint64_t* qmask) {
  std::fill(qmask, qmask + R * Hkv * W, uint64_t{0});
  std::vector<float> acc(bits);
  for (int64_t rh = 0; rh < R * Hkv; ++rh) {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* x = q + (rh * G + g) * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t d = 0; d < D; ++d) {
        const float xd = static_cast<float>(x[d]);
        for (int64_t j = 0; j < bits; ++j) acc[j] += xd * proj[d * bits + j];
      }
      int64_t b = 0;
      for (int64_t j = 0; j < bits; ++j) b |= static_cast<int64_t>(acc[j] > 0.f) << j;
      qmask[rh * W + b / 64] |= uint64_t{1} << (b % 64);
    }
  }
}

// x[0..16) -> one vector whose lane i is the sum of x[i]'s 16 lanes: four levels of pairwise
// combines (15 adds of two two-source permutes) instead of 16 horizontal reductions, each a
// chain of ~4 shuffle-add steps: what the Quest ranking spends per tile beyond its FMAs.
static inline v16f sum_lanes16(const v16f* x) {
#ifdef __AVX512F__
  auto comb = [](v16f a, v16f b, const __m512i& i1, const __m512i& i2) {
    __m512 x1, x2;
    std::memcpy(&x1, &a, 64);
    std::memcpy(&x2, &b, 64);
    const __m512 r = _mm512_add_ps(_mm512_permutex2var_ps(x1, i1, x2),
                                   _mm512_permutex2var_ps(x1, i2, x2));
    v16f o;
    std::memcpy(&o, &r, 64);
    return o;
  };
  // lane indices: 0..15 from the first operand, 16..31 from the second
  const __m512i a1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i a2 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const __m512i b1 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i b2 = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  const __m512i c1 = _mm512_setr_epi32(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
  const __m512i c2 = _mm512_setr_epi32(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const __m512i d1 = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  const __m512i d2 = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  v16f a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) a[i] = comb(x[i], x[i + 8], a1, a2);  // 8-lane halves: x_i, x_i+8
  for (int i = 0; i < 4; ++i) b[i] = comb(a[i], a[i + 4], b1, b2);  // quarters: i, i+4, i+8, i+12
  for (int i = 0; i < 2; ++i) c[i] = comb(b[i], b[i + 2], c1, c2);  // pairs: i, i+2, .., i+14
  return comb(c[0], c[1], d1, d2);                                   // lanes: 0, 1, .., 15
#else
  v16f o;
  for (int i = 0; i < 16; ++i) o[i] = hsum(x[i]);
  return o;
#endif
}

constexpr int64_t kQuestTouch = 4;  // blocks ahead whose bound runs get their L2 streamer started

template <typename scalar_t>
static void quest_run(const float* q, const scalar_t* kmin, const scalar_t* kmax, int64_t s0,
                      int64_t s1, int64_t s2, const int64_t* bt, int64_t bt_stride,
                      const int64_t* nt, const int64_t* caps, const bool* cand, bool* pick,
                      int64_t R, int64_t Hkv, int64_t G, int64_t D, int64_t M, int64_t tpb,
                      int64_t sink, int64_t window) {
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<v16u_t> uv((M + 15) / 16);  // candidate keys (0: not a candidate), padded
    uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
    std::vector<float> qp(G * D), qn(G * D);
    std::vector<v16f> qpv(D % 16 == 0 ? G * D / 16 : 0), qnv(qpv.size());  // the same, as vectors
    // Vector path: tiles ranked 16 at a time. Slot j holds tile ts[j]'s G per-lane partial
    // sums (part[g * 16 + j]); a full batch (or the last) is reduced by sum_lanes16 per head,
    // max over the group lane-wise.
    std::vector<v16f> part(qpv.empty() ? 0 : 16 * G, v16f{});
    int64_t ts[16];
    int slots = 0;
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
      const int64_t lo = std::min(sink, n), hi = std::max<int64_t>(n - window, 0);
      const int64_t nv = (n + 15) / 16;
      std::fill(uv.begin(), uv.begin() + nv, v16u_t{});
      const float* qg = q + rh * G * D;
      for (int64_t i = 0; i < G * D; ++i) {
        qp[i] = std::max(qg[i], 0.f);
        qn[i] = std::min(qg[i], 0.f);
      }
      if (!qpv.empty()) {
        std::memcpy(qpv.data(), qp.data(), G * D * sizeof(float));
        std::memcpy(qnv.data(), qn.data(), G * D * sizeof(float));
      }
      int64_t k = 0;
      auto flush = [&] {  // rank the batch's tiles
        v16f best = sum_lanes16(part.data());
        for (int64_t g = 1; g < G; ++g) {
          const v16f sg = sum_lanes16(part.data() + g * 16);
          best = best > sg ? best : sg;
        }
        for (int j = 0; j < slots; ++j)
          if (std::isfinite(best[j])) { u[ts[j]] = order_bits(best[j]); ++k; }
        slots = 0;
      };
      // Block by block (no division per tile); a tile's bounds are loaded once for the G heads.
      const bool vec = D % 16 == 0 && D <= 256;
      const int64_t nd = D / 16;
      // The blocks sit at random places, so the bounds are cold runs of tpb * s2 elements (per
      // array) read one after the other: the next block's runs are prefetched whole, and
      // kQuestTouch blocks ahead the first two lines of each (which starts the L2 streamer on
      // them, as in the decode kernels). Without it the loop waited on memory for every block.
      const int64_t run_bytes = tpb * s2 * static_cast<int64_t>(sizeof(scalar_t));
      const int64_t b_end = (hi + tpb - 1) / tpb;
      auto block_base = [&](int64_t lb) { return bt[r * bt_stride + lb] * s0 + h * s1; };
      for (int64_t i = 1; i <= kQuestTouch && lo / tpb + i < b_end; ++i) {
        const int64_t nb = block_base(lo / tpb + i);
        for (const scalar_t* a : {kmin + nb, kmax + nb}) {
          __builtin_prefetch(a, 0, 2);
          __builtin_prefetch(reinterpret_cast<const char*>(a) + 64, 0, 2);
        }
      }
      // D / 16 fixed at compile time (one dispatch per (row, KV head)): the bounds stay in
      // registers (with a runtime count they went through the stack). With the batched
      // reduction: 7-10% less time with the bounds in cache, 3-4% cold (16k, b1 and b8)
      with_const<16>(vec ? nd : 1, [&](auto ndc) {
        constexpr int ND = decltype(ndc)::value;
        for (int64_t b = lo / tpb; b * tpb < hi; ++b) {
          const int64_t base = block_base(b);
          if (b + 1 < b_end) {
            const int64_t nb = block_base(b + 1);
            prefetch_span(kmin + nb, run_bytes);
            prefetch_span(kmax + nb, run_bytes);
          }
          if (b + kQuestTouch < b_end) {
            const int64_t nb = block_base(b + kQuestTouch);
            for (const scalar_t* a : {kmin + nb, kmax + nb}) {
              __builtin_prefetch(a, 0, 2);
              __builtin_prefetch(reinterpret_cast<const char*>(a) + 64, 0, 2);
            }
          }
          const int64_t t0 = std::max(lo, b * tpb), t1 = std::min(hi, (b + 1) * tpb);
          for (int64_t t = t0; t < t1; ++t) {
            if (cand && !cand[rh * M + t]) continue;
            const scalar_t* mn = kmin + base + (t - b * tpb) * s2;
            const scalar_t* mx = kmax + base + (t - b * tpb) * s2;
            float best = -std::numeric_limits<float>::infinity();
            if (vec) {  // 16 lanes at a time (a float sum does not auto-vectorize)
              v16f vmx[ND], vmn[ND];
              for (int d = 0; d < ND; ++d) {
                vmx[d] = load16(mx + 16 * d);
                vmn[d] = load16(mn + 16 * d);
              }
              for (int64_t g = 0; g < G; ++g) {
                const v16f* a = qpv.data() + g * ND;
                const v16f* bq = qnv.data() + g * ND;
                v16f acc0 = a[0] * vmx[0] + bq[0] * vmn[0], acc1 = v16f{};
                for (int d = 1; d < ND; d += 2) {  // two chains: FMA latency
                  acc1 += a[d] * vmx[d] + bq[d] * vmn[d];
                  if (d + 1 < ND) acc0 += a[d + 1] * vmx[d + 1] + bq[d + 1] * vmn[d + 1];
                }
                part[g * 16 + slots] = acc0 + acc1;  // reduced with 15 other tiles in flush
              }
              ts[slots] = t;
              if (++slots == 16) flush();
              continue;
            } else {
              for (int64_t g = 0; g < G; ++g) {
                const float* a = qp.data() + g * D;
                const float* bq = qn.data() + g * D;
                float acc = 0.f;
                for (int64_t d = 0; d < D; ++d) acc += a[d] * ld(mx + d) + bq[d] * ld(mn + d);
                best = std::max(best, acc);
              }
            }
            if (std::isfinite(best)) { u[t] = order_bits(best); ++k; }
          }
        }
      });
      if (slots) flush();
      const int64_t take = std::min(k, std::max<int64_t>(caps[r], 0));
      static_assert(sizeof(bool) == 1, "pick is written as bytes");
      mark_top(uv.data(), nv, n, k, take, reinterpret_cast<uint8_t*>(pick + rh * M), 1);
    }
  });
}

torch::Tensor quest_pick_cpu(torch::Tensor q, torch::Tensor kmin, torch::Tensor kmax,
                             torch::Tensor bt, torch::Tensor num_tiles, torch::Tensor caps,
                             torch::Tensor cand, int64_t M, int64_t sink, int64_t window) {
  // q [R, Hq, D] fp32 contiguous; kmin/kmax [num_blocks, Hkv, tpb, D] (last dim contiguous);
  // bt [R, MB] int64; num_tiles, caps [R] int64; cand [R, Hkv, M] bool or empty.
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kmin.size(1), tpb = kmin.size(2), G = Hq / Hkv;
  auto pick = torch::zeros({R, Hkv, M}, torch::dtype(torch::kBool));
  const bool* cp = cand.numel() > 0 ? cand.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kmin.scalar_type(), "quest_pick_cpu", [&] {
    quest_run<scalar_t>(q.data_ptr<float>(), kmin.data_ptr<scalar_t>(), kmax.data_ptr<scalar_t>(),
                        kmin.stride(0), kmin.stride(1), kmin.stride(2), bt.data_ptr<int64_t>(),
                        bt.stride(0), num_tiles.data_ptr<int64_t>(), caps.data_ptr<int64_t>(),
                        cp, pick.data_ptr<bool>(), R, Hkv, G, D, M, tpb, sink, window);
  });
  return pick;
}

// SparQ pick: tiles ranked by max over the tile's tokens and the group's heads of q.k on the
// chosen key channels, read from the KV cache in place, block by block: for each chosen
// channel, the block's tokens of that channel are one contiguous run in vLLM's "vec" layout
// (K^T: B values) and 16-token lines of channel pairs in the packed "amx" layout, so the
// partial products of all the block's tokens accumulate in unit-stride loops that vectorize.
// The next block's runs are prefetched (the blocks sit at random places).
template <typename T> static inline v16f gather16(const T* p, int64_t stride) {
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<float>(p[i * stride]);
  v16f x;
  std::memcpy(&x, t, 64);
  return x;
}

template <typename scalar_t>
static void sparq_run(const float* q, const scalar_t* kc, int64_t s0, int64_t s1, int64_t s2,
                      int64_t s3, bool amx, const int64_t* bt,
                      int64_t bt_stride, const int64_t* nt, const int64_t* caps, bool* pick,
                      int64_t R, int64_t Hkv, int64_t G, int64_t D, int64_t NC, int64_t M,
                      int64_t T, int64_t B, int64_t sink, int64_t window) {
  const int64_t tpb = B / T;
  const int64_t es = static_cast<int64_t>(sizeof(scalar_t));
  amx = amx && std::is_same_v<scalar_t, c10::BFloat16>;
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<v16u_t> uv((M + 15) / 16);
    uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
    const int64_t NB16 = B / 16;
    std::vector<v16f> accv(G * NB16);
    std::vector<float> qs(G * NC), mag(D / 2);
    std::vector<int64_t> chr(NC), pairs(D / 2);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
      const int64_t lo = std::min(sink, n), hi = std::max<int64_t>(n - window, 0);
      const int64_t nv = (n + 15) / 16;
      std::fill(uv.begin(), uv.begin() + nv, v16u_t{});
      // The channels: the NC / 2 pairs (2p, 2p+1) of largest |q| summed over the group (the
      // rule of decode.sparq_channels; ties to the lower pair), in ascending order.
      const float* qg = q + rh * G * D;
      for (int64_t p = 0; p < D / 2; ++p) {
        float m = 0.f;
        for (int64_t g = 0; g < G; ++g) m += std::abs(qg[g * D + 2 * p]) + std::abs(qg[g * D + 2 * p + 1]);
        mag[p] = m;
        pairs[p] = p;
      }
      std::partial_sort(pairs.begin(), pairs.begin() + NC / 2, pairs.end(),
                        [&](int64_t a, int64_t b) { return mag[a] > mag[b] || (mag[a] == mag[b] && a < b); });
      std::sort(pairs.begin(), pairs.begin() + NC / 2);
      for (int64_t j = 0; j < NC / 2; ++j) { chr[2 * j] = 2 * pairs[j]; chr[2 * j + 1] = 2 * pairs[j] + 1; }
      for (int64_t j = 0; j < NC; ++j)
        for (int64_t g = 0; g < G; ++g) qs[g * NC + j] = q[(rh * G + g) * D + chr[j]];
      // where channel c's run starts in a (block, head) region, and its element stride
      auto run_of = [&](const scalar_t* base, int64_t c) {
        return amx ? base + (c / 2) * 32 + c % 2 : base + c * s3;
      };
      auto block_base = [&](int64_t lb) { return kc + bt[r * bt_stride + lb] * s0 + h * s1; };
      auto prefetch_block = [&](int64_t lb) {
        const scalar_t* nb = block_base(lb);
        for (int64_t j = 0; j < NC; ++j) {
          if (amx) {
            for (int64_t c16 = 0; c16 < B / 16; ++c16)
              __builtin_prefetch(run_of(nb, chr[j]) + c16 * 16 * D, 0, 3);
          } else if (s2 == 1) {
            prefetch_span(run_of(nb, chr[j]), B * es);
          }
        }
      };
      // the first line of each channel run kQuestTouch blocks ahead: starts the L2 streamer
      // on the runs before the next block's full prefetch (as the Quest ranking does)
      auto touch_block = [&](int64_t lb) {
        const scalar_t* nb = block_base(lb);
        for (int64_t j = 0; j < NC; j += 2) __builtin_prefetch(run_of(nb, chr[j]), 0, 2);
      };
      int64_t k = 0;
      const int64_t b_end = (hi + tpb - 1) / tpb;
      if (lo / tpb < b_end) prefetch_block(lo / tpb);
      for (int64_t i = 1; i <= kQuestTouch && lo / tpb + i < b_end; ++i) touch_block(lo / tpb + i);
      for (int64_t b = lo / tpb; b < b_end; ++b) {
        if (b + 1 < b_end) prefetch_block(b + 1);
        if (b + kQuestTouch < b_end) touch_block(b + kQuestTouch);
        const scalar_t* base = block_base(b);
        const int64_t t0 = std::max(lo, b * tpb) - b * tpb, t1 = std::min(hi, (b + 1) * tpb) - b * tpb;
        const int64_t x0 = t0 * T, x1 = t1 * T;  // tokens of the block ranked here
        // 16 tokens at a time over the 16-token chunks that hold the ranked tiles, a channel
        // pair per step: acc[g * NB16 + c] = partial q.k of head g, chunk c.
        const int64_t c0 = x0 / 16, c1 = (x1 + 15) / 16;
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t g = 0; g < G; ++g) accv[g * NB16 + c] = v16f{};
        for (int64_t j = 0; j < NC; j += 2) {
          const int64_t c_lo = chr[j];
          for (int64_t c = c0; c < c1; ++c) {
            v16f k0, k1;
            if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
              if (amx) {
                split_pairs(base + c * 16 * D + (c_lo / 2) * 32, k0, k1);
              } else if (s2 == 1) {
                k0 = load16(base + c_lo * s3 + c * 16);
                k1 = load16(base + (c_lo + 1) * s3 + c * 16);
              } else {
                k0 = gather16(base + c_lo * s3 + c * 16 * s2, s2);
                k1 = gather16(base + (c_lo + 1) * s3 + c * 16 * s2, s2);
              }
            } else if (s2 == 1) {
              k0 = load16(base + c_lo * s3 + c * 16);
              k1 = load16(base + (c_lo + 1) * s3 + c * 16);
            } else {
              k0 = gather16(base + c_lo * s3 + c * 16 * s2, s2);
              k1 = gather16(base + (c_lo + 1) * s3 + c * 16 * s2, s2);
            }
            for (int64_t g = 0; g < G; ++g)
              accv[g * NB16 + c] += qs[g * NC + j] * k0 + qs[g * NC + j + 1] * k1;
          }
        }
        const float* acc = reinterpret_cast<const float*>(accv.data());
        for (int64_t t = t0; t < t1; ++t) {
          float best = -std::numeric_limits<float>::infinity();
          if (T % 16 == 0) {
            v16f m = accv[t * T / 16];
            for (int64_t g = 0; g < G; ++g)
              for (int64_t c = t * T / 16; c < (t + 1) * T / 16; ++c) {
                const v16f v = accv[g * NB16 + c];
                m = m > v ? m : v;
              }
            best = hmax(m);
          } else {
            for (int64_t g = 0; g < G; ++g)
              for (int64_t i = t * T; i < (t + 1) * T; ++i) best = std::max(best, acc[g * B + i]);
          }
          if (std::isfinite(best)) { u[b * tpb + t] = order_bits(best); ++k; }
        }
      }
      const int64_t take = std::min(k, std::max<int64_t>(caps[r], 0));
      mark_top(uv.data(), nv, n, k, take, reinterpret_cast<uint8_t*>(pick + rh * M), 1);
    }
  });
}

torch::Tensor sparq_pick_cpu(torch::Tensor q, torch::Tensor kc, torch::Tensor bt,
                             torch::Tensor num_tiles, torch::Tensor caps, int64_t NC,
                             int64_t M, int64_t T, int64_t sink, int64_t window, bool amx) {
  // q [R, Hq, D] fp32 contiguous; kc [NB, Hkv, B, D] K view (any strides) or the packed "amx"
  // K region; bt [R, MB] int64; num_tiles, caps [R] int64; NC channels (even, <= D).
  TORCH_CHECK(!kc.is_cuda() && kc.dim() == 4, "sparq_pick_cpu: CPU key cache [NB, Hkv, B, D]");
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kc.size(1), B = kc.size(2), G = Hq / Hkv;
  NC = std::min<int64_t>(NC - NC % 2, D - D % 2);
  TORCH_CHECK(NC >= 2, "sparq_pick_cpu: at least one channel pair");
  TORCH_CHECK(B % T == 0 && B % 16 == 0 && kc.size(3) == D,
              "sparq_pick_cpu: tile must divide the block, a multiple of 16 tokens");
  if (amx)
    TORCH_CHECK(kc.scalar_type() == at::kBFloat16 && B % 16 == 0 && D % 2 == 0 && kc.stride(3) == 1 && kc.stride(2) == D,
                "sparq_pick_cpu: packed amx region must be contiguous per (block, head)");
  auto pick = torch::zeros({R, Hkv, M}, torch::dtype(torch::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, kc.scalar_type(), "sparq_pick_cpu", [&] {
    sparq_run<scalar_t>(q.data_ptr<float>(), kc.data_ptr<scalar_t>(), kc.stride(0), kc.stride(1),
                        kc.stride(2), kc.stride(3), amx, bt.data_ptr<int64_t>(), bt.stride(0), num_tiles.data_ptr<int64_t>(),
                        caps.data_ptr<int64_t>(), pick.data_ptr<bool>(), R, Hkv, G, D, NC, M, T,
                        B, sink, window);
  });
  return pick;
}

// PQ pick (query_aware="pq", prescore_backend.pq.pq_tile_rank): per (row, KV head) a lookup
// table of the group's summed query against each subspace's centroids, then per token the sum
// of its m table entries (codes read in place through the block table), max per tile, and the
// best caps[r] eligible tiles marked (ties to the lower index, as the torch ranking + topk).
torch::Tensor pq_pick_cpu(torch::Tensor q, torch::Tensor codes, torch::Tensor bt,
                          torch::Tensor book, torch::Tensor dims, torch::Tensor num_tiles,
                          torch::Tensor caps, int64_t M, int64_t T, int64_t sink, int64_t window) {
  // q [R, Hq, D] fp32; codes [NB, Hkv, B, m] uint8; bt [R, MB] int64; book [Hkv, m, C, d]
  // fp32 over the channels dims [m, d] int64 of each subspace
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && book.dim() == 4,
              "pq_pick_cpu: codes [NB, Hkv, B, m] uint8, codebook [Hkv, m, C, d]");
  const auto qc = as_contig(q, at::kFloat), cc = codes.contiguous(), bk = as_contig(book, at::kFloat);
  const auto btc = as_contig(bt, at::kLong), ntc = as_contig(num_tiles, at::kLong),
             cpc = as_contig(caps, at::kLong);
  const int64_t R = qc.size(0), Hq = qc.size(1), D = qc.size(2);
  const int64_t Hkv = cc.size(1), B = cc.size(2), m = cc.size(3), C = bk.size(2), d = bk.size(3);
  const auto dm = as_contig(dims, at::kLong);
  TORCH_CHECK(bk.size(0) == Hkv && bk.size(1) == m && m * d == D && C <= 256 && Hq % Hkv == 0 &&
              B % T == 0 && dm.numel() == D, "pq_pick_cpu: shapes of q, codes and codebook do not match");
  const int64_t* dp = dm.data_ptr<int64_t>();
  const int64_t G = Hq / Hkv, tpb = B / T, MB = btc.size(1);
  auto pick = torch::zeros({R, Hkv, M}, torch::dtype(torch::kBool));
  const float* qp = qc.data_ptr<float>();
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const float* bp = bk.data_ptr<float>();
  const int64_t* btp = btc.data_ptr<int64_t>();
  const int64_t* nt = ntc.data_ptr<int64_t>();
  const int64_t* cap = cpc.data_ptr<int64_t>();
  bool* pk = pick.data_ptr<bool>();
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<v16u_t> uv((M + 15) / 16);
    uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
    std::vector<float> lut(m * C), qs(D);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
      const int64_t lo = std::min(sink, n), hi = std::max<int64_t>(n - window, 0);
      const int64_t nv = (n + 15) / 16;
      std::fill(uv.begin(), uv.begin() + nv, v16u_t{});
      std::fill(qs.begin(), qs.end(), 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < D; ++i) qs[i] += qp[(r * Hq + h * G + g) * D + i];
      for (int64_t j = 0; j < m; ++j)
        for (int64_t c = 0; c < C; ++c) {
          const float* cen = bp + ((h * m + j) * C + c) * d;
          float acc = 0.f;
          for (int64_t i = 0; i < d; ++i) acc += qs[dp[j * d + i]] * cen[i];
          lut[j * C + c] = acc;
        }
      int64_t k = 0;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t lb = (t * T) / B;
        if (lb >= MB) break;
        const uint8_t* tok = cp + ((btp[r * MB + lb] * Hkv + h) * B + (t % tpb) * T) * m;
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < T; ++i) {
          float e = 0.f;
          for (int64_t j = 0; j < m; ++j) e += lut[j * C + tok[i * m + j]];
          best = std::max(best, e);
        }
        if (std::isfinite(best)) { u[t] = order_bits(best); ++k; }
      }
      const int64_t take = std::min(k, std::max<int64_t>(cap[r], 0));
      mark_top(uv.data(), nv, n, k, take, reinterpret_cast<uint8_t*>(pk + rh * M), 1);
    }
  });
  return pick;
}

// In-place LSH inputs (lsh_proj [D, r] fp32, lsh_masks [NB, Hkv, B / T, W] int64, lsh_caps [R]
// int64) checked and converted, and the query group (qf [R, Hq, D] fp32) hashed into qmask:
// instead of a [R, Hkv, M] bool match built by ~15 torch ops per layer. nullptr without LSH.
struct LshArgs {
  torch::Tensor proj, tmasks, caps;
  LshInPlace lip{};
};
static const LshInPlace* lsh_prepare(LshArgs& a, std::vector<uint64_t>& qmask, const float* qf,
                                     int64_t R, int64_t Hq, int64_t D, const torch::Tensor& k,
                                     const torch::Tensor& btc, int64_t T,
                                     const c10::optional<torch::Tensor>& lsh_proj,
                                     const c10::optional<torch::Tensor>& lsh_masks,
                                     const c10::optional<torch::Tensor>& lsh_caps) {
  if (!lsh_proj.has_value()) return nullptr;
  TORCH_CHECK(lsh_masks.has_value() && lsh_caps.has_value(),
              "select_decode_cpu: lsh_proj needs lsh_masks and lsh_caps");
  a.proj = as_contig(*lsh_proj, at::kFloat);
  a.tmasks = as_contig(*lsh_masks, at::kLong);
  a.caps = as_contig(*lsh_caps, at::kLong);
  const int64_t Hkv = k.size(1), bits = a.proj.size(1), W = a.tmasks.size(3),
                tpb = a.tmasks.size(2);
  TORCH_CHECK(a.proj.dim() == 2 && a.proj.size(0) == D && bits >= 1 && bits <= 16 &&
              W * 64 >= (int64_t{1} << bits) && a.tmasks.size(1) == Hkv &&
              tpb * T == k.size(2) && a.caps.numel() == R && Hq % Hkv == 0,
              "select_decode_cpu: lsh_proj [D, r], lsh_masks [NB, Hkv, B / T, W >= 2^r / 64] "
              "and lsh_caps [R] do not match the query and cache");
  qmask.resize(R * Hkv * W);
  hash_query_groups(qf, a.proj.data_ptr<float>(), R, Hkv, Hq / Hkv, D, bits, W, qmask.data());
  a.lip = LshInPlace{qmask.data(), a.tmasks.data_ptr<int64_t>(), btc.data_ptr<int32_t>(),
                     btc.stride(0), tpb, W, a.caps.data_ptr<int64_t>()};
  return &a.lip;
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Selection then sparse decode in one call (see cpu_select_decode): the two entry points above,
// run back to back without returning to Python in between, whose per-call overhead (wrappers,
// argument conversion, cold interpreter state after other layers' work) costs about as much as
// the kernel's own reads at batch 1. -> out, lse, tiles, num, counts, and the selection's
// seconds (a Python float, for the selection-time metric).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, double>
select_decode_cpu(torch::Tensor query, torch::Tensor k, torch::Tensor v, torch::Tensor bt,
                  torch::Tensor seq_lens, torch::Tensor scores, torch::Tensor num_tiles,
                  torch::Tensor budget, int64_t sink, int64_t window,
                  c10::optional<torch::Tensor> lsh_match, int64_t lsh_cap, int64_t T,
                  double scale, bool amx, c10::optional<at::ScalarType> out_dtype,
                  c10::optional<torch::Tensor> lsh_proj, c10::optional<torch::Tensor> lsh_masks,
                  c10::optional<torch::Tensor> lsh_caps) {
  if (amx && !packed_path_takes(query, k, v, T))  // the caller unpacks and calls again
    return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            0.0};
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t R = query.size(0), Hq = query.size(1), D = query.size(2);
  std::vector<float> qbuf, obuf;
  const float* qf = query_f32(query, qbuf);  // [R, Hq, D]
  const auto btc = as_contig(bt, at::kInt);
  const auto seq = as_contig(seq_lens, at::kInt);
  LshArgs la;
  std::vector<uint64_t> qmask;
  const LshInPlace* lip = lsh_prepare(la, qmask, qf, R, Hq, D, k, btc, T, lsh_proj, lsh_masks,
                                      lsh_caps);
  const SelPlan p = select_plan(scores, num_tiles, budget, lsh_match);
  TORCH_CHECK(p.R == R && p.H == k.size(1),
              "select_decode_cpu: tile_scores must be [R, Hkv, M]: one row per query row, one "
              "head per KV head of the cache");
  auto tiles = torch::empty({p.R, p.H, p.S}, torch::dtype(torch::kInt32));
  auto num = torch::empty({p.R, p.H}, torch::dtype(torch::kInt32));
  std::vector<int64_t> cnt(p.R * p.H * 4, 0);
  select_run(p, sink, window, lsh_cap, lip, tiles.data_ptr<int32_t>(), num.data_ptr<int32_t>(),
             cnt.data());
  auto counts = torch::zeros({4}, torch::dtype(torch::kInt64));
  int64_t* co = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < p.R * p.H; ++i)
    for (int j = 0; j < 4; ++j) co[j] += cnt[i * 4 + j];
  const double sel_s = seconds_since(t0);
  const at::ScalarType odt = out_dtype ? *out_dtype : at::kFloat;
  auto out = torch::empty({R, Hq, D}, torch::dtype(odt));
  auto lse = torch::empty({R, Hq}, torch::dtype(torch::kFloat32));
  if (odt != at::kFloat) obuf.resize(R * Hq * D);
  decode_core(qf, k, v, btc, seq.data_ptr<int32_t>(), tiles.data_ptr<int32_t>(), p.S,
              odt == at::kFloat ? out.data_ptr<float>() : obuf.data(), lse.data_ptr<float>(),
              scale, amx, R, Hq, D, T);
  if (odt != at::kFloat) write_out_rows(obuf.data(), out, nullptr, R);
  return {out, lse, tiles, num, counts, sel_s};  // seconds as a float: no tensor
}

// select_decode_cpu for the per-layer path, with nothing allocated or returned but a float: the
// query read from query[rows[r]] (query[r] without rows), the output written to out[rows[r]] in
// out's dtype, and when stats [>= 5] int64 is given, the tokens read and the tiles chosen per
// source (sink, window, lsh, prescore) added to stats[0..5). Scratch is kept per thread. Each
// torch allocation, returned tensor and Python object costs microseconds here: the call runs
// with caches cold from the rest of the layer (measured at 16k, batch 1: ~0.1 ms less per call
// than select_decode_cpu plus the caller's copy and counter ops). -> the selection's seconds,
// or -1 when the packed "amx" loop declines (the caller unpacks and calls again).
double select_decode_into_cpu(torch::Tensor query, torch::Tensor k, torch::Tensor v,
                              torch::Tensor bt, torch::Tensor seq_lens, torch::Tensor scores,
                              torch::Tensor num_tiles, torch::Tensor budget, int64_t sink,
                              int64_t window, c10::optional<torch::Tensor> lsh_match,
                              int64_t lsh_cap, int64_t T, double scale, bool amx,
                              torch::Tensor out, c10::optional<torch::Tensor> rows,
                              c10::optional<torch::Tensor> stats,
                              c10::optional<torch::Tensor> lsh_proj,
                              c10::optional<torch::Tensor> lsh_masks,
                              c10::optional<torch::Tensor> lsh_caps) {
  if (amx && !packed_path_takes(query, k, v, T)) return -1.0;
  const auto t0 = std::chrono::steady_clock::now();
  torch::Tensor rw;
  const int64_t* rp = nullptr;
  int64_t R = query.size(0);
  if (rows.has_value()) {
    rw = as_contig(*rows, at::kLong);
    rp = rw.data_ptr<int64_t>();
    R = rw.numel();
  }
  const int64_t Hq = query.size(1), D = query.size(2);
  TORCH_CHECK(query.device().is_cpu() && out.device().is_cpu() && k.device().is_cpu(),
              "select_decode_into_cpu: CPU tensors only");
  TORCH_CHECK(query.dim() == 3 && out.dim() == 3 && out.size(1) == Hq && out.size(2) == D &&
              Hq % k.size(1) == 0 && bt.size(0) == R && seq_lens.numel() == R,
              "select_decode_into_cpu: query and out [N, Hq, D] (Hq a multiple of the cache's "
              "KV heads), one block table row and seq_len per selected row");
  TORCH_CHECK(!stats.has_value() || (stats->scalar_type() == at::kLong &&
                                      stats->is_contiguous() && stats->numel() >= 5),
              "select_decode_into_cpu: stats must be int64 [>= 5], contiguous");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(rp ? rp[r] >= 0 && rp[r] < query.size(0) && rp[r] < out.size(0) : r < out.size(0),
                "select_decode_into_cpu: row index out of range of query or out");
  static thread_local std::vector<float> qbuf, obuf, lbuf;
  static thread_local std::vector<int32_t> tbuf, nbuf;
  static thread_local std::vector<int64_t> cbuf;
  static thread_local std::vector<uint64_t> qmask;
  query_rows_f32(query, rp, R, qbuf);  // [R, Hq, D]
  const auto btc = as_contig(bt, at::kInt);
  const auto seq = as_contig(seq_lens, at::kInt);
  LshArgs la;
  const LshInPlace* lip = lsh_prepare(la, qmask, qbuf.data(), R, Hq, D, k, btc, T, lsh_proj,
                                      lsh_masks, lsh_caps);
  const SelPlan p = select_plan(scores, num_tiles, budget, lsh_match);
  TORCH_CHECK(p.R == R && p.H == k.size(1),
              "select_decode_into_cpu: tile_scores must be [R, Hkv, M]: one row per selected "
              "row, one head per KV head of the cache");
  tbuf.resize(std::max<int64_t>(p.R * p.H * p.S, 1));
  nbuf.resize(p.R * p.H);
  cbuf.assign(p.R * p.H * 4, 0);
  select_run(p, sink, window, lsh_cap, lip, tbuf.data(), nbuf.data(), cbuf.data());
  const double sel_s = seconds_since(t0);
  obuf.resize(R * Hq * D);
  lbuf.resize(R * Hq);
  decode_core(qbuf.data(), k, v, btc, seq.data_ptr<int32_t>(), tbuf.data(), p.S, obuf.data(),
              lbuf.data(), scale, amx, R, Hq, D, T);
  write_out_rows(obuf.data(), out, rp, R);
  if (stats.has_value()) {
    int64_t* st = stats->data_ptr<int64_t>();
    const int32_t* sl = seq.data_ptr<int32_t>();
    int64_t tokens = 0;  // what the kernel reads: each chosen tile's tokens below seq_len
    for (int64_t rh = 0; rh < p.R * p.H; ++rh) {
      const int64_t L = sl[rh / p.H];
      for (int64_t j = 0; j < nbuf[rh]; ++j)
        tokens += std::clamp<int64_t>(L - int64_t{tbuf[rh * p.S + j]} * T, 0, T);
      for (int j = 0; j < 4; ++j) st[1 + j] += cbuf[rh * 4 + j];
    }
    st[0] += tokens;
  }
  return sel_s;
}
"""


def _ext():
    from .cpu_sparse_decode import _module

    return _module()


def cpu_select_tiles(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, sink_tiles: int,
                     window_tiles: int, lsh_match: Tensor | None = None,
                     lsh_cap: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``select_tiles`` in C++ (same arguments): returns tiles ``[R, Hkv, S]`` int32 ascending
    (-1 padded), num_selected ``[R, Hkv]`` int32 and source counts ``[4]`` int64."""
    return tuple(_ext().select_tiles_cpu(tile_scores, num_tiles, budget, int(sink_tiles),
                                         int(window_tiles), lsh_match, int(lsh_cap)))


def _i64(t: Tensor) -> Tensor:
    """t as contiguous int64 (itself when it already is: no dispatcher call on the hot path)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.long().contiguous()


def cpu_sparq_pick(q: Tensor, key_cache: Tensor, block_tables: Tensor, num_tiles: Tensor,
                   caps: Tensor, *, num_tile_slots: int, channels: int, tile_size: int,
                   sink_tiles: int, window_tiles: int, kv_layout: str = "strided") -> Tensor:
    """SparQ pick per (row, KV head): ``[R, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[R, Hq, D]``; key_cache ``[NB, Hkv, B, D]`` (any strides; with ``kv_layout="amx"``
    vLLM's packed K region); block_tables ``[R, MB]``; num_tiles, caps ``[R]``; channels: how
    many (the pairs of ``decode.sparq_channels``, chosen in the call). A tile's estimate is
    the max over its tokens and the group's heads of q.k on those channels, read from the
    cache in place; eligible: index in [sink_tiles, num_tiles - window_tiles). The same picks
    as ranking ``decode.sparq_tile_rank`` (ties to the lower index)."""
    return _ext().sparq_pick_cpu(
        q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous(),
        key_cache, _i64(block_tables),
        _i64(num_tiles), _i64(caps), int(channels), int(num_tile_slots), int(tile_size), int(sink_tiles),
        int(window_tiles), kv_layout == "amx")


def cpu_pq_pick(q: Tensor, codes: Tensor, block_tables: Tensor, centroids: Tensor,
                dims: Tensor, num_tiles: Tensor, caps: Tensor, *, num_tile_slots: int,
                tile_size: int, sink_tiles: int, window_tiles: int) -> Tensor:
    """PQ pick per (row, KV head): ``[R, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[R, Hq, D]``; codes ``[NB, Hkv, B, m]`` uint8; block_tables ``[R, MB]``; centroids
    ``[Hkv, m, C, d]`` over the channels ``dims [m, d]`` of each subspace; num_tiles, caps
    ``[R]``. The same picks as ranking with
    ``prescore_backend.pq.pq_tile_rank`` (ties to the lower index); eligible: index in
    [sink_tiles, num_tiles - window_tiles)."""
    return _ext().pq_pick_cpu(q, codes, block_tables, centroids, dims, num_tiles, caps,
                              int(num_tile_slots), int(tile_size), int(sink_tiles),
                              int(window_tiles))


def cpu_quest_pick(q: Tensor, kmin: Tensor, kmax: Tensor, block_tables: Tensor,
                   num_tiles: Tensor, caps: Tensor, *, num_tile_slots: int, sink_tiles: int,
                   window_tiles: int, candidates: Tensor | None = None) -> Tensor:
    """Quest pick per (row, KV head): ``[R, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[R, Hq, D]``; kmin/kmax ``[num_blocks, Hkv, tiles_per_block, D]`` per-tile key bounds;
    block_tables ``[R, MB]``; num_tiles ``[R]`` logical tiles (the last may be partial); caps
    ``[R]``; num_tile_slots M; candidates ``[R, Hkv, M]`` bool (LSH matches) or None. Eligible:
    index in [sink_tiles, num_tiles - window_tiles), a candidate if given, finite bound.
    """
    cand = (candidates.to(torch.bool).contiguous() if candidates is not None
            else torch.empty(0, dtype=torch.bool))
    return _ext().quest_pick_cpu(
        q.float().contiguous(), kmin.contiguous(), kmax.contiguous(),
        block_tables.long().contiguous(), num_tiles.long().contiguous(), caps.long().contiguous(),
        cand, int(num_tile_slots), int(sink_tiles), int(window_tiles))
