// Selection then sparse decode in one call (kernels/cpu_sparse_decode.py: cpu_select_decode,
// cpu_select_decode_into), with the query-aware part in place (the LSH candidates hashed, or the
// sparq4 key copy ranked, per (row, KV head)) and optionally the pre-scores read through the
// block table. Part of the one translation unit bindings.cpp.
#pragma once

#include "common.h"
#include "picks.h"
#include "select.h"
#include "sparse_decode.h"

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

// In-place SparQ ranking on the 4-bit key copy (s4_kq [NB, Hkv, D, B/2] uint8, s4_kz
// [NB, Hkv, 2, D] fp32, s4_caps [R] int64, NC channels; as sparq4_pick_cpu) run per (row, KV
// head) inside the selection on the fp32 query rows qf [R, Hq, D]: instead of a [R, Hkv, M] bool
// pick made by a separate call on a gathered query. nullptr without the key copy.
struct Sparq4Args {
  torch::Tensor kq, kz, caps;
  RankInPlace rip;
};
static const RankInPlace* sparq4_prepare(Sparq4Args& a, const float* qf, int64_t R, int64_t Hq,
                                         int64_t D, const torch::Tensor& k,
                                         const torch::Tensor& btc, int64_t T,
                                         const c10::optional<torch::Tensor>& s4_kq,
                                         const c10::optional<torch::Tensor>& s4_kz,
                                         const c10::optional<torch::Tensor>& s4_caps,
                                         int64_t NC) {
  if (!s4_kq.has_value()) return nullptr;
  TORCH_CHECK(s4_kz.has_value() && s4_caps.has_value(),
              "select_decode_cpu: sparq4_kq needs sparq4_kz and sparq4_caps");
  a.kq = as_contig(*s4_kq, at::kByte);
  a.kz = as_contig(*s4_kz, at::kFloat);
  a.caps = as_contig(*s4_caps, at::kLong);
  const Sparq4Copy cp = sparq4_copy(a.kq, a.kz, Hq, D, T, NC, "select_decode_cpu");
  TORCH_CHECK(cp.Hkv == k.size(1) && cp.B == k.size(2) && a.caps.numel() == R,
              "select_decode_cpu: the key copy [NB, Hkv, D, B/2] and sparq4_caps [R] do not "
              "match the cache's KV heads and block size and the query rows");
  const int64_t Hkv = cp.Hkv, G = Hq / Hkv, MB = btc.size(1), bts = btc.stride(0);
  const int32_t* bp = btc.data_ptr<int32_t>();
  a.rip.caps = a.caps.data_ptr<int64_t>();
  a.rip.rank = [=](int64_t rh, int64_t lo, int64_t hi, uint32_t* u) {
    static thread_local Sparq4Scratch w;
    return sparq4_rank(cp, qf + rh * G * D, G, rh % Hkv, bp + (rh / Hkv) * bts, MB, T, lo, hi,
                       u, w);
  };
  return &a.rip;
}

// Pre-scores per physical block ([NB, Hkv, B / T], paged) read through the block table btc.
static const PagedScores* paged_prepare(PagedScores& ps, bool paged, const SelPlan& p,
                                        const torch::Tensor& k, const torch::Tensor& btc,
                                        int64_t T) {
  if (!paged) return nullptr;
  TORCH_CHECK(p.scores.size(1) == k.size(1) && p.scores.size(2) * T == k.size(2),
              "select_decode_cpu: paged tile_scores must be [NB, Hkv, B / T]: one score per "
              "tile of each physical block of the cache");
  ps = PagedScores{p.scores.data_ptr<float>(), btc.data_ptr<int32_t>(), btc.stride(0),
                   p.scores.size(2)};
  return &ps;
}

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Selection then sparse decode in one call (see cpu_select_decode): the entry points
// select_tiles_cpu and sparse_decode_cpu run back to back without returning to Python in
// between, whose per-call overhead (wrappers, argument conversion, cold interpreter state after
// other layers' work) costs about as much as the kernel's own reads at batch 1. -> out, lse,
// tiles, num, counts, and the selection's seconds (a Python float, for the selection-time
// metric).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, double>
select_decode_cpu(torch::Tensor query, torch::Tensor k, torch::Tensor v, torch::Tensor bt,
                  torch::Tensor seq_lens, torch::Tensor scores, torch::Tensor num_tiles,
                  torch::Tensor budget, int64_t sink, int64_t window,
                  c10::optional<torch::Tensor> lsh_match, int64_t lsh_cap, int64_t T,
                  double scale, bool amx, c10::optional<at::ScalarType> out_dtype,
                  c10::optional<torch::Tensor> lsh_proj, c10::optional<torch::Tensor> lsh_masks,
                  c10::optional<torch::Tensor> lsh_caps, bool paged_scores,
                  c10::optional<torch::Tensor> sparq4_kq, c10::optional<torch::Tensor> sparq4_kz,
                  c10::optional<torch::Tensor> sparq4_caps, int64_t sparq4_channels) {
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
  Sparq4Args sa;
  const RankInPlace* rip = sparq4_prepare(sa, qf, R, Hq, D, k, btc, T, sparq4_kq, sparq4_kz,
                                          sparq4_caps, sparq4_channels);
  TORCH_CHECK(lip == nullptr || rip == nullptr,
              "select_decode_cpu: LSH or the sparq4 key copy in place, not both");
  const SelPlan p = select_plan(scores, num_tiles, budget, lsh_match,
                                paged_scores ? &btc : nullptr);
  TORCH_CHECK(p.R == R && p.H == k.size(1),
              "select_decode_cpu: tile_scores must be [R, Hkv, M]: one row per query row, one "
              "head per KV head of the cache");
  PagedScores psv;
  const PagedScores* ps = paged_prepare(psv, paged_scores, p, k, btc, T);
  auto tiles = torch::empty({p.R, p.H, p.S}, torch::dtype(torch::kInt32));
  auto num = torch::empty({p.R, p.H}, torch::dtype(torch::kInt32));
  std::vector<int64_t> cnt(p.R * p.H * 4, 0);
  select_run(p, sink, window, lsh_cap, lip, tiles.data_ptr<int32_t>(), num.data_ptr<int32_t>(),
             cnt.data(), rip, ps);
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
// with caches cold from the rest of the layer (docs/cpu-kernels.md). -> the selection's seconds,
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
                              c10::optional<torch::Tensor> lsh_caps, bool paged_scores,
                              c10::optional<torch::Tensor> sparq4_kq,
                              c10::optional<torch::Tensor> sparq4_kz,
                              c10::optional<torch::Tensor> sparq4_caps,
                              int64_t sparq4_channels) {
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
  Sparq4Args sa;
  const RankInPlace* rip = sparq4_prepare(sa, qbuf.data(), R, Hq, D, k, btc, T, sparq4_kq,
                                          sparq4_kz, sparq4_caps, sparq4_channels);
  TORCH_CHECK(lip == nullptr || rip == nullptr,
              "select_decode_into_cpu: LSH or the sparq4 key copy in place, not both");
  const SelPlan p = select_plan(scores, num_tiles, budget, lsh_match,
                                paged_scores ? &btc : nullptr);
  TORCH_CHECK(p.R == R && p.H == k.size(1),
              "select_decode_into_cpu: tile_scores must be [R, Hkv, M]: one row per selected "
              "row, one head per KV head of the cache");
  PagedScores psv;
  const PagedScores* ps = paged_prepare(psv, paged_scores, p, k, btc, T);
  tbuf.resize(std::max<int64_t>(p.R * p.H * p.S, 1));
  nbuf.resize(p.R * p.H);
  cbuf.assign(p.R * p.H * 4, 0);
  select_run(p, sink, window, lsh_cap, lip, tbuf.data(), nbuf.data(), cbuf.data(), rip, ps);
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
