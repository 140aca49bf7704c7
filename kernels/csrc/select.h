// Tile selection (kernels/cpu_select.py): sinks, window, LSH matches and pre-scores into an
// ascending tile list per (row, KV head); the entry point select_tiles_cpu. Part of the one
// translation unit bindings.cpp.
#pragma once

#include "common.h"

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
#elif defined(__AVX2__)
  const __m256i z = _mm256_setzero_si256();
  auto nonzero32 = [&](const uint8_t* q) {
    return ~static_cast<uint32_t>(_mm256_movemask_epi8(
        _mm256_cmpeq_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), z)));
  };
  return (static_cast<uint64_t>(nonzero32(p + 32)) << 32) | nonzero32(p);
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
// mispredicts about every other comparison; docs/cpu-kernels.md); then the keys above it are marked in a
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
    int64_t total = 0;
#if PS_AVX2_ONLY
    // ymm code: GCC lowers the unsigned compare of the 64-byte vectors below to 16 scalar
    // compares and inserts without AVX-512 (a third of the sparq4 pick's time, measured)
    const __m256i c = _mm256_set1_epi32(static_cast<int32_t>(cand));
    __m256i cnt = _mm256_setzero_si256();
    const __m256i* p8 = reinterpret_cast<const __m256i*>(uv);
    for (int64_t i = 0; i < 2 * nv; ++i) {  // a >= c <=> max(a, c) == a, unsigned
      const __m256i a = _mm256_loadu_si256(p8 + i);
      cnt = _mm256_sub_epi32(cnt, _mm256_cmpeq_epi32(_mm256_max_epu32(a, c), a));
    }
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), cnt);
    for (int l = 0; l < 8; ++l) total += lanes[l];
#else
    v16i_t cnt = v16i_t{};
    for (int64_t i = 0; i < nv; ++i) cnt -= (uv[i] >= cand);  // true is -1
    for (int l = 0; l < 16; ++l) total += cnt[l];
#endif
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

// A query-aware ranking run inside the selection (select_decode_cpu with the sparq4 key copy):
// rank(rh, lo, hi, u) writes u[t] = a key for each eligible tile t in [lo, hi) of (row, head)
// rh it ranks (0 elsewhere is left as is) and returns how many; the best caps[r] of them are
// the row's query-aware picks, as a [R, H, M] pick of the same ranking then the selection.
struct RankInPlace {
  std::function<int64_t(int64_t rh, int64_t lo, int64_t hi, uint32_t* u)> rank;
  const int64_t* caps;  // [R] query-aware tiles at most per (row, head)
};

// Pre-scores read in place: scores [NB, H, tpb] per physical block (the side data's), tile t of
// row r at scores[bt[r, t / tpb], h, t % tpb], instead of a gathered [R, H, M].
struct PagedScores {
  const float* scores;
  const int32_t* bt;
  int64_t bt_stride, tpb;
};

// The converted inputs of a selection (kept alive here) and its sizes.
struct SelPlan {
  torch::Tensor scores, num_tiles, budget, lsh_match;  // [R, H, M] fp32, [R] int64, [R, H, M]
  int64_t R = 0, H = 0, M = 0, S = 0;                  // S: the widest row's tile count
  std::vector<int64_t> keep;                           // [R] tiles kept per (row, head)
};

static SelPlan select_plan(torch::Tensor scores, torch::Tensor num_tiles, torch::Tensor budget,
                           const c10::optional<torch::Tensor>& lsh_match_opt,
                           const torch::Tensor* paged_bt = nullptr) {
  // scores [R, H, M] float, or with paged_bt [R, MB] (the block table) [NB, H, tpb] per
  // physical block (M = MB * tpb); num_tiles, budget [R] integer; lsh_match [R, H, M] bool or
  // None. Conversions here (no-ops for the usual dtypes), not in Python.
  SelPlan p;
  p.scores = as_contig(scores, at::kFloat);
  TORCH_CHECK(p.scores.dim() == 3, "select_tiles_cpu: tile_scores must be 3-d");
  if (paged_bt != nullptr)
    p.R = paged_bt->size(0), p.H = p.scores.size(1), p.M = paged_bt->size(1) * p.scores.size(2);
  else
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
                       const LshInPlace* lip, int32_t* to, int32_t* no, int64_t* cnt,
                       const RankInPlace* rip = nullptr, const PagedScores* ps = nullptr) {
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
    // sp: the row's pre-scores gathered from paged ones.
    static thread_local std::vector<uint8_t> src, hv;
    static thread_local std::vector<v16u_t> uv;
    static thread_local std::vector<float> sp;
    if (src.size() < static_cast<size_t>(M + 64)) src.resize(M + 64);
    if ((lip != nullptr || rip != nullptr) && hv.size() < static_cast<size_t>(M + 64))
      hv.resize(M + 64);
    if (ps != nullptr && sp.size() < static_cast<size_t>(M)) sp.resize(M);
    if (uv.size() < static_cast<size_t>((M + 15) / 16)) uv.resize((M + 15) / 16);
    uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / H;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M), b = keep[r], nv = (n + 15) / 16;
      std::fill(src.begin(), src.begin() + n, 0);
      std::fill(uv.begin(), uv.begin() + nv, v16u_t{});
      const int64_t w_lo = std::max<int64_t>(n - window, 0), s_hi = std::min(sink, n);
      const float* s = ps == nullptr ? sc + rh * M : sp.data();
      if (ps != nullptr) {  // only tiles in [s_hi, w_lo) are read below
        const int64_t tpb = ps->tpb, h = rh % H;
        const int32_t* btr = ps->bt + r * ps->bt_stride;
        for (int64_t lb = s_hi / tpb; lb * tpb < w_lo; ++lb)
          std::memcpy(sp.data() + lb * tpb, ps->scores + (btr[lb] * H + h) * tpb, tpb * 4);
      }
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
        // block by block: one division per block, not two per tile (64-bit divisions
        // dominated this loop); the run 16 blocks ahead is prefetched
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
      if (room > 0 && rip != nullptr && rip->caps[r] > 0) {
        const int64_t k = rip->rank(rh, s_hi, w_lo, u);
        const int64_t take = std::min(k, rip->caps[r]), kept = std::min(take, room);
        if (take <= room) {  // the usual case (caps <= budget - sinks - window): all picked
          mark_top(uv.data(), nv, n, k, take, src.data(), 3);
        } else {  // more picks than room: the best pre-scores among them, as lsh_match does
          std::fill(hv.begin(), hv.begin() + n, 0);
          mark_top(uv.data(), nv, n, k, take, hv.data(), 1);
          for (int64_t t = s_hi; t < w_lo; ++t) u[t] = hv[t] ? order_bits(s[t]) : 0u;
          mark_top(uv.data(), nv, n, take, room, src.data(), 3);
        }
        room -= kept;
        c_lsh += kept;
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

