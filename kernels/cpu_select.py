"""Fused CPU tile selection and Quest ranking (C++, compiled with the sparse decode kernel).

The torch version of :func:`prescore_backend.selection.select_tiles` is ~20 tensor ops per
layer (top-k, scatters, a sort), ~0.3 ms at 16k context on one core: as much as reading the
selected tiles. Here one task per (row, KV head) does the same in O(M) with
a branch-free top-k (the k-th largest score built bit by bit by vectorized counting passes,
then one pass that keeps ties to the lower index) and writes the ascending tile list directly.

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
// ---- Tile selection (see kernels/cpu_select.py).
namespace {
struct Cand {  // order: higher key first, then lower index
  float key;
  int32_t idx;
};
inline bool better(const Cand& a, const Cand& b) {
  return a.key > b.key || (a.key == b.key && a.idx < b.idx);
}
// Moves the best k of c[0..n) (by `better`; c in ascending idx order) to the front, in any
// order. The k-th largest key is built bit by bit on the keys mapped to order-preserving
// uint32: 32 branch-free counting passes that vectorize (std::nth_element on random scores
// mispredicts about every other comparison: ~15 us per 1k tiles, 5x slower). One more pass
// keeps the keys above it and, among those equal to it, the lowest indices: the same set as
// sorting by `better`.
inline uint32_t order_bits(float x) {
  x += 0.0f;  // -0 -> +0: they compare equal, so they must tie
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline void top_k(std::vector<Cand>& c, int64_t n, int64_t k) {
  if (k <= 0 || k >= n) return;
  typedef uint32_t v16u_t __attribute__((vector_size(64)));
  typedef int32_t v16i_t __attribute__((vector_size(64)));
  const int64_t nv = (n + 15) / 16;
  thread_local std::vector<v16u_t> uv;
  uv.assign(nv, v16u_t{});  // padding 0: below every mapped key, never counted
  uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
  for (int64_t i = 0; i < n; ++i) u[i] = order_bits(c[i].key);
  uint32_t thr = 0;  // the largest value with at least k keys >= it: the k-th largest key
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = thr | (1u << bit);
    v16i_t cnt = v16i_t{};
    for (int64_t i = 0; i < nv; ++i) cnt -= (uv[i] >= cand);  // true is -1
    int64_t total = 0;
    for (int l = 0; l < 16; ++l) total += cnt[l];
    if (total >= k) thr = cand;
  }
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += u[i] > thr;
  int64_t ties = k - above, j = 0;
  for (int64_t i = 0; i < n; ++i) {  // branch-free: a kept tile is 1 in 8 at random
    const bool eq = u[i] == thr;
    const bool take = (u[i] > thr) | (eq & (ties > 0));
    ties -= eq & take;
    c[j] = c[i];  // j <= i: overwrites only entries already read
    j += take;
  }
}
inline float nan_to_neginf(float x) {
  return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x;
}
}  // namespace

std::vector<torch::Tensor> select_tiles_cpu(torch::Tensor scores, torch::Tensor num_tiles,
                                            torch::Tensor budget, int64_t sink, int64_t window,
                                            c10::optional<torch::Tensor> lsh_match_opt,
                                            int64_t lsh_cap) {
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
  const bool use_lsh = lsh_match.defined() && lsh_match.numel() > 0 && lsh_cap > 0;
  const bool* lm = use_lsh ? lsh_match.data_ptr<bool>() : nullptr;
  std::vector<int64_t> keep(R);
  int64_t S = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
    keep[r] = std::clamp<int64_t>(bu[r], 0, n);
    S = std::max(S, keep[r]);
  }
  auto tiles = torch::full({R, H, S}, -1, torch::dtype(torch::kInt32));
  auto num = torch::empty({R, H}, torch::dtype(torch::kInt32));
  std::vector<int64_t> cnt(R * H * 4, 0);
  int32_t* to = tiles.data_ptr<int32_t>();
  int32_t* no = num.data_ptr<int32_t>();
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> src(M);  // 0 not chosen, 1 sink, 2 window, 3 lsh, 4 prescore
    std::vector<Cand> c(M);
    std::vector<int32_t> out_buf(M + 1);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / H;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M), b = keep[r];
      const float* s = sc + rh * M;
      std::fill(src.begin(), src.begin() + n, 0);
      const int64_t w_lo = std::max<int64_t>(n - window, 0), s_hi = std::min(sink, n);
      auto forced = [&](int64_t t) { return t < s_hi || t >= w_lo; };
      auto kind = [&](int64_t t) { return t < sink ? 1 : 2; };  // a sink in the window is a sink
      int64_t taken = 0;
      for (int64_t t = n - 1; t >= w_lo && taken < b; --t, ++taken) src[t] = kind(t);
      for (int64_t t = 0; t < s_hi && taken < b; ++t)
        if (!src[t]) { src[t] = kind(t); ++taken; }
      int64_t room = b - taken;
      if (room > 0 && use_lsh) {
        const bool* mt = lm + rh * M;
        int64_t k = 0;
        for (int64_t t = s_hi; t < w_lo; ++t)
          if (mt[t]) c[k++] = Cand{nan_to_neginf(s[t]), static_cast<int32_t>(t)};
        const int64_t take = std::min({lsh_cap, k, room});
        top_k(c, k, take);
        for (int64_t i = 0; i < take; ++i) src[c[i].idx] = 3;
        room -= take;
      }
      if (room > 0) {
        int64_t k = 0;
        for (int64_t t = s_hi; t < w_lo; ++t)
          if (!src[t]) c[k++] = Cand{nan_to_neginf(s[t]), static_cast<int32_t>(t)};
        const int64_t take = std::min(k, room);
        top_k(c, k, take);
        for (int64_t i = 0; i < take; ++i) src[c[i].idx] = 4;
      }
      // ascending list, branch-free (kept tiles are scattered): every t is written, the
      // cursor moves only for kept ones; the buffer has room for the write past the last one
      int64_t j = 0, ct5[5] = {0, 0, 0, 0, 0};
      for (int64_t t = 0; t < n; ++t) {
        const uint8_t k = src[t];
        out_buf[j] = static_cast<int32_t>(t);
        j += k != 0;
        ++ct5[k];
      }
      std::copy(out_buf.begin(), out_buf.begin() + j, to + rh * S);
      int64_t* ct = cnt.data() + rh * 4;
      for (int k = 0; k < 4; ++k) ct[k] = ct5[k + 1];
      no[rh] = static_cast<int32_t>(j);
    }
  });
  auto counts = torch::zeros({4}, torch::dtype(torch::kInt64));
  int64_t* co = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < R * H; ++i)
    for (int k = 0; k < 4; ++k) co[k] += cnt[i * 4 + k];
  return {tiles, num, counts};
}

template <typename scalar_t>
static void quest_run(const float* q, const scalar_t* kmin, const scalar_t* kmax, int64_t s0,
                      int64_t s1, int64_t s2, const int64_t* bt, int64_t bt_stride,
                      const int64_t* nt, const int64_t* caps, const bool* cand, bool* pick,
                      int64_t R, int64_t Hkv, int64_t G, int64_t D, int64_t M, int64_t tpb,
                      int64_t sink, int64_t window) {
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<Cand> c(M);
    std::vector<float> qp(G * D), qn(G * D);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
      const int64_t lo = std::min(sink, n), hi = std::max<int64_t>(n - window, 0);
      const float* qg = q + rh * G * D;
      for (int64_t i = 0; i < G * D; ++i) {
        qp[i] = std::max(qg[i], 0.f);
        qn[i] = std::min(qg[i], 0.f);
      }
      int64_t k = 0;
      for (int64_t t = lo; t < hi; ++t) {
        if (cand && !cand[rh * M + t]) continue;
        const int64_t off = bt[r * bt_stride + t / tpb] * s0 + h * s1 + (t % tpb) * s2;
        const scalar_t* mn = kmin + off;
        const scalar_t* mx = kmax + off;
        float best = -std::numeric_limits<float>::infinity();
        if (D % 16 == 0) {  // 16 lanes at a time (a float sum does not auto-vectorize)
          for (int64_t g = 0; g < G; ++g) {
            v16f u = v16f{};
            for (int64_t d = 0; d < D; d += 16) {
              v16f a, bq;
              std::memcpy(&a, qp.data() + g * D + d, 64);
              std::memcpy(&bq, qn.data() + g * D + d, 64);
              u += a * load16(mx + d) + bq * load16(mn + d);
            }
            best = std::max(best, hsum(u));
          }
        } else {
          for (int64_t g = 0; g < G; ++g) {
            const float* a = qp.data() + g * D;
            const float* bq = qn.data() + g * D;
            float u = 0.f;
            for (int64_t d = 0; d < D; ++d) u += a[d] * ld(mx + d) + bq[d] * ld(mn + d);
            best = std::max(best, u);
          }
        }
        if (std::isfinite(best)) c[k++] = Cand{best, static_cast<int32_t>(t)};
      }
      const int64_t take = std::min(k, std::max<int64_t>(caps[r], 0));
      top_k(c, k, take);
      bool* p = pick + rh * M;
      for (int64_t i = 0; i < take; ++i) p[c[i].idx] = true;
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
// seconds (a 0-dim double tensor, for the selection-time metric).
std::vector<torch::Tensor> select_decode_cpu(torch::Tensor query, torch::Tensor k,
                                             torch::Tensor v, torch::Tensor bt,
                                             torch::Tensor seq_lens, torch::Tensor scores,
                                             torch::Tensor num_tiles, torch::Tensor budget,
                                             int64_t sink, int64_t window,
                                             c10::optional<torch::Tensor> lsh_match,
                                             int64_t lsh_cap, int64_t T, double scale, bool amx,
                                             c10::optional<at::ScalarType> out_dtype) {
  const auto t0 = std::chrono::steady_clock::now();
  auto sel = select_tiles_cpu(scores, num_tiles, budget, sink, window, lsh_match, lsh_cap);
  const double sel_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto od = sparse_decode_cpu(query, k, v, bt, seq_lens, sel[0], T, scale, amx, out_dtype);
  return {od[0], od[1], sel[0], sel[1], sel[2],
          torch::scalar_tensor(sel_s, torch::dtype(torch::kFloat64))};
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
