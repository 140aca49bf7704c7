// Query-aware picks (kernels/cpu_select.py): Quest, SparQ and PQ ranking of each row's eligible
// tiles, read through the block table in place. Part of the one translation unit bindings.cpp.
#pragma once

#include "common.h"
#include "select.h"

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

// SparQ pick on the 4-bit key copy (query_aware="sparq4", prescore_backend/keycopy.py): per
// (row, KV head) the NC channels of largest |q| summed over the group, then block by block each
// channel's run of B/2 bytes (a 16-token chunk is 8 bytes: token i in the low nibble of byte
// i, token i + 8 in the high one) against q * step, the block's q . min added once per head.
// Max over the tile's tokens and the group's heads; the best caps[r] eligible tiles are marked
// (ties to the lower index). Blocks are full when ranked (the window holds the last one).
static inline v16f nibbles16(const uint8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, 8);
  const uint64_t lo = x & 0x0F0F0F0F0F0F0F0FULL, hi = (x >> 4) & 0x0F0F0F0F0F0F0F0FULL;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(
      static_cast<long long>(hi), static_cast<long long>(lo))));
  v16f o;
  std::memcpy(&o, &f, 64);
  return o;
#else
  uint8_t b[16];
  std::memcpy(b, &lo, 8);
  std::memcpy(b + 8, &hi, 8);
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<float>(b[i]);
  v16f o;
  std::memcpy(&o, t, 64);
  return o;
#endif
}

constexpr int64_t kSparq4Ahead = 12;  // blocks whose key-copy lines are prefetched ahead

// One block's 16-token chunks [c0, c1) for GG heads of the group: per chunk the heads' q.k on
// the chosen channels accumulated in registers (from the scales' offset, channels in
// ascending order), then the max over the heads into cmax[c] (max-ed with what is there when
// `merge`: the next slice of a group of more than 8 heads). roff[j]: channel j's run in the
// block; coef [GG, NC], off [GG].
#if PS_AVX2_ONLY
// AVX2: the same arithmetic (same roundings) on explicit ymm pairs: GCC lowers the 64-byte
// vector code below through the stack when it has no zmm registers, several times slower.
template <int GG>
static inline void sparq4_chunks(const uint8_t* base, const int64_t* roff, int64_t NC,
                                 const float* coef, const float* off, int64_t c0, int64_t c1,
                                 v16f* cmax, bool merge) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t c = c0; c < c1; ++c) {
    __m256 a0[GG], a1[GG];
    for (int g = 0; g < GG; ++g) a0[g] = a1[g] = _mm256_set1_ps(off[g]);
    for (int64_t j = 0; j < NC; ++j) {
      int64_t x;
      std::memcpy(&x, base + roff[j] + c * 8, 8);
      const __m128i v = _mm_cvtsi64_si128(x);
      const __m256 k0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, m4)));
      const __m256 k1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi64(v, 4), m4)));
      for (int g = 0; g < GG; ++g) {
        const __m256 w = _mm256_set1_ps(coef[g * NC + j]);
        a0[g] = _mm256_fmadd_ps(w, k0, a0[g]);
        a1[g] = _mm256_fmadd_ps(w, k1, a1[g]);
      }
    }
    float* o = reinterpret_cast<float*>(cmax + c);
    __m256 m0 = merge ? _mm256_loadu_ps(o) : a0[0], m1 = merge ? _mm256_loadu_ps(o + 8) : a1[0];
    for (int g = 0; g < GG; ++g) { m0 = _mm256_max_ps(m0, a0[g]); m1 = _mm256_max_ps(m1, a1[g]); }
    _mm256_storeu_ps(o, m0);
    _mm256_storeu_ps(o + 8, m1);
  }
}
#else
template <int GG>
static inline void sparq4_chunks(const uint8_t* base, const int64_t* roff, int64_t NC,
                                 const float* coef, const float* off, int64_t c0, int64_t c1,
                                 v16f* cmax, bool merge) {
  for (int64_t c = c0; c < c1; ++c) {
    v16f acc[GG];
    for (int g = 0; g < GG; ++g) acc[g] = v16f{} + off[g];
    for (int64_t j = 0; j < NC; ++j) {
      const v16f kv = nibbles16(base + roff[j] + c * 8);
      for (int g = 0; g < GG; ++g) acc[g] += coef[g * NC + j] * kv;
    }
    v16f m = merge ? cmax[c] : acc[0];
    for (int g = 0; g < GG; ++g) m = m > acc[g] ? m : acc[g];
    cmax[c] = m;
  }
}
#endif

#if PS_AVX2_ONLY
// AVX2: the keys of 8 one-chunk tiles at once (T = 16): the maxima of cm[16 c .. 16 c + 16)
// for c < 8, by a transposing max, as u[c] = order_bits(max) where finite (u[c] left as is
// elsewhere); -> how many were finite. The scalar hmax per tile, each reading back the chunk
// maxima just stored, was a third of the pick's time.
static inline int64_t tile_keys8(const float* cm, uint32_t* u) {
  auto pairs = [](__m256 a, __m256 b) {  // per 128-bit half: a0^a1, a2^a3, b0^b1, b2^b3
    return _mm256_max_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
  };
  __m256 r[8];
  for (int c = 0; c < 8; ++c)
    r[c] = _mm256_max_ps(_mm256_loadu_ps(cm + 16 * c), _mm256_loadu_ps(cm + 16 * c + 8));
  const __m256 t0 = pairs(pairs(r[0], r[1]), pairs(r[2], r[3]));
  const __m256 t1 = pairs(pairs(r[4], r[5]), pairs(r[6], r[7]));
  const __m256 m = _mm256_add_ps(  // lane c: chunk c's max; + 0: -0 -> +0, as order_bits
      _mm256_max_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31)),
      _mm256_setzero_ps());
  const __m256 fin = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), m),
                                   _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                                   _CMP_LT_OQ);
  const __m256i x = _mm256_castps_si256(m);
  const __m256i key = _mm256_xor_si256(
      x, _mm256_or_si256(_mm256_srai_epi32(x, 31), _mm256_set1_epi32(INT32_MIN)));
  __m256i* up = reinterpret_cast<__m256i*>(u);
  _mm256_storeu_si256(up, _mm256_blendv_epi8(_mm256_loadu_si256(up), key, _mm256_castps_si256(fin)));
  return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(fin)));
}
#endif

// The 4-bit key copy as the ranking reads it (kq [NB, Hkv, D, B/2] uint8, kz [NB, Hkv, 2, D]
// fp32 min and step, both contiguous) and the channels per (row, KV head).
struct Sparq4Copy {
  const uint8_t* kq;
  const float* kz;
  int64_t Hkv, D, B, NC;
};

static Sparq4Copy sparq4_copy(const torch::Tensor& kq, const torch::Tensor& kz, int64_t Hq,
                              int64_t D, int64_t T, int64_t NC, const char* fn) {
  TORCH_CHECK(kq.dim() == 4 && kq.scalar_type() == at::kByte && kq.is_contiguous() && kq.device().is_cpu() &&
              kz.dim() == 4 && kz.scalar_type() == at::kFloat && kz.is_contiguous(),
              fn, ": key copy [NB, Hkv, D, B/2] uint8 and scales [NB, Hkv, 2, D] fp32, "
              "contiguous, on the CPU");
  const int64_t Hkv = kq.size(1), B = kq.size(3) * 2;
  TORCH_CHECK(kq.size(2) == D && Hq % Hkv == 0 && kz.size(0) == kq.size(0) && kz.size(1) == Hkv &&
              kz.size(2) == 2 && kz.size(3) == D,
              fn, ": shapes of q, the key copy and the scales do not match");
  TORCH_CHECK(B % T == 0 && B % 16 == 0 && T % 16 == 0, fn, ": 16 | tile, tile | block");
  return Sparq4Copy{kq.data_ptr<uint8_t>(), kz.data_ptr<float>(), Hkv, D, B,
                    std::clamp<int64_t>(NC, 1, D)};
}

// One (row, KV head)'s scratch, kept per thread by the callers.
struct Sparq4Scratch {
  std::vector<v16f> cmax;
  std::vector<float> mag, qc, coef, off;
  std::vector<int64_t> chs, roff;
};

// The ranking of one (row, KV head): u[t] = order_bits(estimate) for the eligible tiles t in
// [lo, hi) with a finite estimate (u is not touched elsewhere); -> how many. qg [G, D] the
// group's query (fp32), btr the row's block table (MB entries).
template <typename idx_t>
static int64_t sparq4_rank(const Sparq4Copy& c, const float* qg, int64_t G, int64_t h,
                           const idx_t* btr, int64_t MB, int64_t T, int64_t lo, int64_t hi,
                           uint32_t* u, Sparq4Scratch& w) {
  const int64_t D = c.D, B = c.B, NCc = c.NC, Hkv = c.Hkv, tpb = B / T;
  w.cmax.resize(B / 16);
  w.mag.resize(D), w.chs.resize(D), w.roff.resize(NCc);
  w.qc.resize(G * NCc), w.coef.resize(G * NCc), w.off.resize(G);
  for (int64_t i = 0; i < D; ++i) {
    float m = 0.f;
    for (int64_t g = 0; g < G; ++g) m += std::abs(qg[g * D + i]);
    w.mag[i] = m;
    w.chs[i] = i;
  }
  const float* mag = w.mag.data();
  std::partial_sort(w.chs.begin(), w.chs.begin() + NCc, w.chs.end(),
                    [&](int64_t a, int64_t b) { return mag[a] > mag[b] || (mag[a] == mag[b] && a < b); });
  std::sort(w.chs.begin(), w.chs.begin() + NCc);
  const int64_t* chs = w.chs.data();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < NCc; ++j) w.qc[g * NCc + j] = qg[g * D + chs[j]];
  for (int64_t j = 0; j < NCc; ++j) w.roff[j] = chs[j] * (B / 2);
  // The chosen channels' runs are 8 lines scattered over a block's 4 KiB region (and their
  // scales a few more), the blocks at random places: cold, the ranking waited on memory
  // for every block (3x its time with the lines in cache). Prefetching kSparq4Ahead blocks
  // ahead keeps that many blocks' lines in flight.
  auto prefetch_block = [&](int64_t lb) {
    const int64_t id = btr[lb];
    const uint8_t* nb = c.kq + (id * Hkv + h) * D * (B / 2);
    const float* z = c.kz + (id * Hkv + h) * 2 * D;
    for (int64_t j = 0; j < NCc; ++j) {
      for (int64_t o = 0; o < B / 2; o += 64) __builtin_prefetch(nb + chs[j] * (B / 2) + o, 0, 1);
      __builtin_prefetch(z + chs[j], 0, 1);
      __builtin_prefetch(z + D + chs[j], 0, 1);
    }
  };
  int64_t k = 0;
  const int64_t b_end = std::min<int64_t>((hi + tpb - 1) / tpb, MB);
  for (int64_t i = 0; i < kSparq4Ahead && lo / tpb + i < b_end; ++i) prefetch_block(lo / tpb + i);
  for (int64_t b = lo / tpb; b < b_end; ++b) {
    if (b + kSparq4Ahead < b_end) prefetch_block(b + kSparq4Ahead);
    const int64_t blk = btr[b];
    const uint8_t* base = c.kq + (blk * Hkv + h) * D * (B / 2);
    const float* zmin = c.kz + (blk * Hkv + h) * 2 * D;
    const float* zstep = zmin + D;
    const int64_t t0 = std::max(lo, b * tpb) - b * tpb, t1 = std::min(hi, (b + 1) * tpb) - b * tpb;
    const int64_t c0 = t0 * T / 16, c1 = t1 * T / 16;
    for (int64_t g = 0; g < G; ++g) {
      float o = 0.f;
      for (int64_t j = 0; j < NCc; ++j) {
        o += w.qc[g * NCc + j] * zmin[chs[j]];
        w.coef[g * NCc + j] = w.qc[g * NCc + j] * zstep[chs[j]];
      }
      w.off[g] = o;
    }
    // the group in slices of up to 8 heads, each slice's per-chunk max kept in registers
    for (int64_t g0 = 0; g0 < G; g0 += 8)
      with_const<8>(G - g0, [&](auto gg) {
        sparq4_chunks<decltype(gg)::value>(base, w.roff.data(), NCc, w.coef.data() + g0 * NCc,
                                           w.off.data() + g0, c0, c1, w.cmax.data(), g0 > 0);
      });
#if PS_AVX2_ONLY
    if (T == 16 && t0 == 0 && t1 == 8) {  // a whole block of 8 tiles
      k += tile_keys8(reinterpret_cast<const float*>(w.cmax.data()), u + b * tpb);
      continue;
    }
#endif
    for (int64_t t = t0; t < t1; ++t) {
      v16f m = w.cmax[t * T / 16];
      for (int64_t ch = t * T / 16 + 1; ch < (t + 1) * T / 16; ++ch)
        m = m > w.cmax[ch] ? m : w.cmax[ch];
      const float best = hmax(m);
      if (std::isfinite(best)) { u[b * tpb + t] = order_bits(best); ++k; }
    }
  }
  return k;
}

// The sparq4 ranking of every (row, KV head) in parallel, each handed to
// mark(rh, r, uv, nv, n, k) (sparq4_rank's keys in uv, n tiles, k ranked) to mark its picks.
template <typename F>
static void sparq4_rows(const Sparq4Copy& cp, const torch::Tensor& q, const torch::Tensor& bt,
                        const torch::Tensor& num_tiles, int64_t M, int64_t T, int64_t sink,
                        int64_t window, F&& mark) {
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = cp.Hkv, G = Hq / Hkv, MB = bt.size(1);
  const float* qp = q.data_ptr<float>();
  const int64_t* btp = bt.data_ptr<int64_t>();
  const int64_t bts = bt.stride(0);
  const int64_t* nt = num_tiles.data_ptr<int64_t>();
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<v16u_t> uv((M + 15) / 16);
    uint32_t* u = reinterpret_cast<uint32_t*>(uv.data());
    Sparq4Scratch w;
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv;
      const int64_t n = std::clamp<int64_t>(nt[r], 0, M);
      const int64_t lo = std::min(sink, n), hi = std::max<int64_t>(n - window, 0);
      const int64_t nv = (n + 15) / 16;
      std::fill(uv.begin(), uv.begin() + nv, v16u_t{});
      const int64_t k = sparq4_rank(cp, qp + rh * G * D, G, rh % Hkv, btp + r * bts, MB, T, lo,
                                    hi, u, w);
      mark(rh, r, uv.data(), nv, n, k);
    }
  });
}

torch::Tensor sparq4_pick_cpu(torch::Tensor q, torch::Tensor kq, torch::Tensor kz,
                              torch::Tensor bt, torch::Tensor num_tiles, torch::Tensor caps,
                              int64_t NC, int64_t M, int64_t T, int64_t sink, int64_t window) {
  // q [R, Hq, D] fp32 contiguous; kq [NB, Hkv, D, B/2] uint8 and kz [NB, Hkv, 2, D] fp32
  // (min, step), both contiguous; bt [R, MB] int64; num_tiles, caps [R] int64; NC channels.
  const Sparq4Copy cp = sparq4_copy(kq, kz, q.size(1), q.size(2), T, NC, "sparq4_pick_cpu");
  auto pick = torch::zeros({q.size(0), cp.Hkv, M}, torch::dtype(torch::kBool));
  const int64_t* cap = caps.data_ptr<int64_t>();
  uint8_t* pk = reinterpret_cast<uint8_t*>(pick.data_ptr<bool>());
  sparq4_rows(cp, q, bt, num_tiles, M, T, sink, window,
              [&](int64_t rh, int64_t r, const v16u_t* uv, int64_t nv, int64_t n, int64_t k) {
                mark_top(uv, nv, n, k, std::min(k, std::max<int64_t>(cap[r], 0)), pk + rh * M, 1);
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
  // q [R, Hq, D] fp32; codes [NB, Hkv, B, m] uint8; bt [R, MB] int64; book [Hkv, m, d, C]
  // fp32 (centroids transposed: a lookup table row is one contiguous pass per channel) over
  // the channels dims [m, d] int64 of each subspace
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && book.dim() == 4,
              "pq_pick_cpu: codes [NB, Hkv, B, m] uint8, codebook [Hkv, m, d, C]");
  const auto qc = as_contig(q, at::kFloat), cc = codes.contiguous(), bk = as_contig(book, at::kFloat);
  const auto btc = as_contig(bt, at::kLong), ntc = as_contig(num_tiles, at::kLong),
             cpc = as_contig(caps, at::kLong);
  const int64_t R = qc.size(0), Hq = qc.size(1), D = qc.size(2);
  const int64_t Hkv = cc.size(1), B = cc.size(2), m = cc.size(3), C = bk.size(3), d = bk.size(2);
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
      // lut[j, c] = sum_i q[dims[j, i]] * centroid[j, c, i], i ascending for every c
      std::fill(lut.begin(), lut.end(), 0.f);
      for (int64_t j = 0; j < m; ++j)
        for (int64_t i = 0; i < d; ++i) {
          const float qv = qs[dp[j * d + i]];
          const float* cen = bp + ((h * m + j) * d + i) * C;
          float* row = lut.data() + j * C;
          for (int64_t c = 0; c < C; ++c) row[c] += qv * cen[c];
        }
      int64_t k = 0;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t lb = (t * T) / B;
        if (lb >= MB) break;
        const uint8_t* tok = cp + ((btp[r * MB + lb] * Hkv + h) * B + (t % tpb) * T) * m;
        float best = -std::numeric_limits<float>::infinity();
        if (m == 4 && C == 256) {
          // 4 codes per token are one 32-bit lane, summed in the scalar loop's order (the same
          // floats). AVX-512: a 16-lane gather per subspace. Elsewhere one 32-bit load per
          // token and 4 scalar table loads: on AVX2-only CPUs (AMD Zen 3) the 8-lane gathers
          // were slower than this loop (docs/cpu-kernels.md).
          const float* L = lut.data();
          int64_t i = 0;
#if defined(__AVX512F__)
          const __m512i lo8 = _mm512_set1_epi32(255);
          __m512 bv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          for (; i + 16 <= T; i += 16) {
            const __m512i v = _mm512_loadu_si512(tok + i * 4);
            __m512 e = _mm512_i32gather_ps(_mm512_and_si512(v, lo8), L, 4);
            e = _mm512_add_ps(e, _mm512_i32gather_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8), lo8), L + 256, 4));
            e = _mm512_add_ps(e, _mm512_i32gather_ps(_mm512_and_si512(_mm512_srli_epi32(v, 16), lo8), L + 512, 4));
            e = _mm512_add_ps(e, _mm512_i32gather_ps(_mm512_srli_epi32(v, 24), L + 768, 4));
            bv = _mm512_max_ps(bv, e);
          }
          best = _mm512_reduce_max_ps(bv);
#endif
          for (; i < T; ++i) {
            uint32_t c4;
            std::memcpy(&c4, tok + i * 4, 4);
            best = std::max(best, L[c4 & 255] + L[256 + ((c4 >> 8) & 255)] +
                                      L[512 + ((c4 >> 16) & 255)] + L[768 + (c4 >> 24)]);
          }
        } else {
          for (int64_t i = 0; i < T; ++i) {
            float e = 0.f;
            for (int64_t j = 0; j < m; ++j) e += lut[j * C + tok[i * m + j]];
            best = std::max(best, e);
          }
        }
        if (std::isfinite(best)) { u[t] = order_bits(best); ++k; }
      }
      const int64_t take = std::min(k, std::max<int64_t>(cap[r], 0));
      mark_top(uv.data(), nv, n, k, take, reinterpret_cast<uint8_t*>(pk + rh * M), 1);
    }
  });
  return pick;
}

