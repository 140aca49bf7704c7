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

__all__ = ["cpu_quest_pick", "cpu_select_tiles"]

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

static std::vector<torch::Tensor> select_impl(torch::Tensor scores, torch::Tensor num_tiles,
                                              torch::Tensor budget, int64_t sink,
                                              int64_t window,
                                              c10::optional<torch::Tensor> lsh_match_opt,
                                              int64_t lsh_cap, const LshInPlace* lip) {
  // scores [R, H, M] float; num_tiles, budget [R] integer; lsh_match [R, H, M] bool or None.
  // -> tiles [R, H, S] int32 ascending, -1 padded; num [R, H] int32; counts [4] int64 (sink,
  // window, lsh, prescore). Conversions here (no-ops for the usual dtypes), not in Python.
  scores = as_contig(scores, at::kFloat);
  num_tiles = as_contig(num_tiles.dim() == 1 ? num_tiles : num_tiles.reshape({scores.size(0)}),
                        at::kLong);
  budget = as_contig(budget.dim() == 1 ? budget : budget.reshape({scores.size(0)}), at::kLong);
  torch::Tensor lsh_match = lsh_match_opt.has_value() ? as_contig(*lsh_match_opt, at::kBool)
                                                      : torch::Tensor();
  TORCH_CHECK(num_tiles.numel() == scores.size(0) && budget.numel() == scores.size(0),
              "select_tiles_cpu: num_tiles and budget must have one entry per row");
  const int64_t R = scores.size(0), H = scores.size(1), M = scores.size(2);
  const float* sc = scores.data_ptr<float>();
  const int64_t* nt = num_tiles.data_ptr<int64_t>();
  const int64_t* bu = budget.data_ptr<int64_t>();
  const bool use_lsh = lip == nullptr && lsh_match.defined() && lsh_match.numel() > 0 &&
                       lsh_cap > 0;
  const bool* lm = use_lsh ? lsh_match.data_ptr<bool>() : nullptr;
  std::vector<int64_t> keep(R);
  int64_t S = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
    keep[r] = std::clamp<int64_t>(bu[r], 0, n);
    S = std::max(S, keep[r]);
  }
  auto tiles = torch::empty({R, H, S}, torch::dtype(torch::kInt32));  // -1 padded below
  auto num = torch::empty({R, H}, torch::dtype(torch::kInt32));
  std::vector<int64_t> cnt(R * H * 4, 0);
  int32_t* to = tiles.data_ptr<int32_t>();
  int32_t* no = num.data_ptr<int32_t>();
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    // 0 not chosen, 1 sink, 2 window, 3 lsh, 4 prescore; padded for 64-byte reads
    std::vector<uint8_t> src(M + 64, 0), hv(lip != nullptr ? M : 0);  // hv: LSH hits
    std::vector<v16u_t> uv((M + 15) / 16);  // candidate keys (0: not a candidate), padded
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
      int64_t* ct = cnt.data() + rh * 4;
      ct[0] = c_sink, ct[1] = c_win, ct[2] = c_lsh, ct[3] = c_pre;
      no[rh] = static_cast<int32_t>(j);
    }
  });
  auto counts = torch::empty({4}, torch::dtype(torch::kInt64));
  int64_t* co = counts.data_ptr<int64_t>();
  std::fill(co, co + 4, int64_t{0});
  for (int64_t i = 0; i < R * H; ++i)
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
      // Block by block (no division per tile); a tile's bounds are loaded once for the G heads.
      const bool vec = D % 16 == 0 && D <= 256;
      const int64_t nd = D / 16;
      for (int64_t b = lo / tpb; b * tpb < hi; ++b) {
        const int64_t base = bt[r * bt_stride + b] * s0 + h * s1;
        const int64_t t0 = std::max(lo, b * tpb), t1 = std::min(hi, (b + 1) * tpb);
        for (int64_t t = t0; t < t1; ++t) {
          if (cand && !cand[rh * M + t]) continue;
          const scalar_t* mn = kmin + base + (t - b * tpb) * s2;
          const scalar_t* mx = kmax + base + (t - b * tpb) * s2;
          float best = -std::numeric_limits<float>::infinity();
          if (vec) {  // 16 lanes at a time (a float sum does not auto-vectorize)
            v16f vmx[16], vmn[16];
            for (int64_t d = 0; d < nd; ++d) {
              vmx[d] = load16(mx + 16 * d);
              vmn[d] = load16(mn + 16 * d);
            }
            for (int64_t g = 0; g < G; ++g) {
              const v16f* a = qpv.data() + g * nd;
              const v16f* bq = qnv.data() + g * nd;
              v16f acc0 = a[0] * vmx[0] + bq[0] * vmn[0], acc1 = v16f{};
              for (int64_t d = 1; d < nd; d += 2) {  // two chains: FMA latency
                acc1 += a[d] * vmx[d] + bq[d] * vmn[d];
                if (d + 1 < nd) acc0 += a[d + 1] * vmx[d + 1] + bq[d + 1] * vmn[d + 1];
              }
              best = std::max(best, hsum(acc0 + acc1));
            }
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
  // In-place LSH (lsh_proj [D, r] fp32, lsh_masks [NB, Hkv, tpb, W] int64, lsh_caps [R]
  // int64): the query hashed and the tiles' bucket sets read here, instead of a [R, Hkv, M]
  // bool match built by ~15 torch ops per layer.
  LshInPlace lip{};
  std::vector<uint64_t> qmask;
  torch::Tensor proj, tmasks, caps, btc;
  if (lsh_proj.has_value()) {
    TORCH_CHECK(lsh_masks.has_value() && lsh_caps.has_value(),
                "select_decode_cpu: lsh_proj needs lsh_masks and lsh_caps");
    proj = as_contig(*lsh_proj, at::kFloat);
    tmasks = as_contig(*lsh_masks, at::kLong);
    caps = as_contig(*lsh_caps, at::kLong);
    btc = as_contig(bt, at::kInt);
    const int64_t R = query.size(0), Hq = query.size(1), D = query.size(2), Hkv = k.size(1);
    const int64_t bits = proj.size(1), W = tmasks.size(3), tpb = tmasks.size(2);
    TORCH_CHECK(proj.dim() == 2 && proj.size(0) == D && bits >= 1 && bits <= 16 &&
                W * 64 >= (int64_t{1} << bits) && tmasks.size(1) == Hkv &&
                tpb * T == k.size(2) && caps.numel() == R && Hq % Hkv == 0,
                "select_decode_cpu: lsh_proj [D, r], lsh_masks [NB, Hkv, B / T, W >= 2^r / 64] "
                "and lsh_caps [R] do not match the query and cache");
    qmask.resize(R * Hkv * W);
    const auto qc = query.is_contiguous() ? query : query.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "lsh_hash", [&] {
      hash_query_groups(qc.data_ptr<scalar_t>(), proj.data_ptr<float>(), R, Hkv, Hq / Hkv, D,
                        bits, W, qmask.data());
    });
    lip = LshInPlace{qmask.data(), tmasks.data_ptr<int64_t>(), btc.data_ptr<int32_t>(),
                     btc.stride(0), tpb, W, caps.data_ptr<int64_t>()};
  }
  auto sel = select_impl(scores, num_tiles, budget, sink, window, lsh_match, lsh_cap,
                         lsh_proj.has_value() ? &lip : nullptr);
  const double sel_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto od = sparse_decode_cpu(query, k, v, bt, seq_lens, sel[0], T, scale, amx, out_dtype);
  return {od[0], od[1], sel[0], sel[1], sel[2], sel_s};  // seconds as a float: no tensor
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
