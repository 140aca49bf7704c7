// Side-data upkeep for decode keys (kernels/cpu_side.py): the entry point record_bounds_cpu.
// Part of the one translation unit bindings.cpp.
#pragma once

#include "common.h"

template <typename kt, typename st>
static void record_run(const kt* keys, int64_t k0, int64_t k1, const int64_t* block,
                       const int64_t* tile, const bool* reset, float* scores, int64_t sc0,
                       int64_t sc1, st* kmin, st* kmax, int64_t b0, int64_t b1, int64_t b2,
                       int64_t N, int64_t H, int64_t D) {
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const kt* k = keys + i * k0 + h * k1;
      if (reset[i]) scores[block[i] * sc0 + h * sc1 + tile[i]] = -std::numeric_limits<float>::infinity();
      if (!kmin) continue;
      st* mn = kmin + block[i] * b0 + h * b1 + tile[i] * b2;
      st* mx = kmax + block[i] * b0 + h * b1 + tile[i] * b2;
      for (int64_t d = 0; d < D; ++d) {
        const st v = static_cast<st>(static_cast<float>(k[d]));
        if (reset[i] || static_cast<float>(v) < static_cast<float>(mn[d])) mn[d] = v;
        if (reset[i] || static_cast<float>(v) > static_cast<float>(mx[d])) mx[d] = v;
      }
    }
  }
}

void record_bounds_cpu(torch::Tensor keys, torch::Tensor block, torch::Tensor tile,
                       torch::Tensor reset, torch::Tensor scores, torch::Tensor kmin,
                       torch::Tensor kmax) {
  // keys [N, Hkv, D] (last dim contiguous); block, tile [N] int64; reset [N] bool;
  // scores [num_blocks, Hkv, tpb] fp32; kmin/kmax [num_blocks, Hkv, tpb, D] or empty.
  const int64_t N = keys.size(0), H = keys.size(1), D = keys.size(2);
  const bool bounds = kmin.numel() > 0;
  TORCH_CHECK(!bounds || kmin.scalar_type() == kmax.scalar_type(), "kmin/kmax dtypes differ");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "record_keys", [&] {
    using kt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf,
                                    bounds ? kmin.scalar_type() : at::kFloat, "record_side", [&] {
      record_run<kt, scalar_t>(
          keys.data_ptr<kt>(), keys.stride(0), keys.stride(1), block.data_ptr<int64_t>(),
          tile.data_ptr<int64_t>(), reset.data_ptr<bool>(), scores.data_ptr<float>(),
          scores.stride(0), scores.stride(1), bounds ? kmin.data_ptr<scalar_t>() : nullptr,
          bounds ? kmax.data_ptr<scalar_t>() : nullptr, bounds ? kmin.stride(0) : 0,
          bounds ? kmin.stride(1) : 0, bounds ? kmin.stride(2) : 0, N, H, D);
    });
  });
}

// PQ codes of new keys (prescore_backend.decode.record_codes): per (key, KV head, subspace) the
// nearest centroid under the per-channel weights, argmin_c |c|^2 - 2 x.c over the weighted
// key x and weighted centroids c (first index on ties, as torch's argmin), written in place.
template <typename kt>
static void record_codes_run(const kt* keys, int64_t k0, int64_t k1, const int64_t* block,
                             const int64_t* off, uint8_t* codes, int64_t c0, int64_t c1,
                             int64_t c2, int64_t c3, const int64_t* dims, const float* w,
                             const float* ct, const float* cn, int64_t N, int64_t H, int64_t m,
                             int64_t d, int64_t C) {
  at::parallel_for(0, N * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(C), x(d);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t n = i / H, h = i % H;
      const kt* k = keys + n * k0 + h * k1;
      uint8_t* out = codes + block[n] * c0 + h * c1 + off[n] * c2;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t hj = h * m + j;
        const float* wj = w + hj * d;
        for (int64_t t = 0; t < d; ++t) x[t] = -2.f * static_cast<float>(k[dims[j * d + t]]) * wj[t];
        const float* cnj = cn + hj * C;
        const float* ctj = ct + hj * d * C;  // [d, C]: one contiguous run of centroids per channel
        float* __restrict a = acc.data();
        for (int64_t c = 0; c < C; ++c) a[c] = cnj[c];
        for (int64_t t = 0; t < d; ++t) {
          const float xt = x[t];
          const float* __restrict row = ctj + t * C;
          for (int64_t c = 0; c < C; ++c) a[c] += xt * row[c];  // vectorized over centroids
        }
        int64_t best = 0;
        float bv = a[0];
        for (int64_t c = 1; c < C; ++c)
          if (a[c] < bv) { bv = a[c]; best = c; }
        out[j * c3] = static_cast<uint8_t>(best);
      }
    }
  });
}

void record_codes_cpu(torch::Tensor keys, torch::Tensor block, torch::Tensor offset,
                      torch::Tensor codes, torch::Tensor dims, torch::Tensor weights,
                      torch::Tensor centroids_t, torch::Tensor norms) {
  // keys [N, Hkv, D] (last dim contiguous); block, offset [N] int64; codes [NB, Hkv, B, m]
  // uint8; dims [m, d] int64; weights [Hkv, m, d], centroids_t [Hkv * m, d, C] and norms
  // [Hkv * m, 1, C] fp32 contiguous (LayerCodebook's enc_w, enc_ct, enc_cn).
  const int64_t N = keys.size(0), H = keys.size(1);
  const int64_t m = dims.size(0), d = dims.size(1), C = centroids_t.size(2);
  TORCH_CHECK(keys.stride(2) == 1 && codes.scalar_type() == at::kByte && C <= 256 &&
                  centroids_t.size(0) == H * m && centroids_t.size(1) == d &&
                  weights.numel() == H * m * d && norms.numel() == H * m * C &&
                  codes.size(1) == H && codes.size(3) == m && block.numel() == N &&
                  offset.numel() == N,
              "record_codes_cpu: shapes of keys, codes and codebook do not match");
  if (N == 0) return;
  auto dc = dims.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, keys.scalar_type(), "record_codes", [&] {
    record_codes_run<scalar_t>(
        keys.data_ptr<scalar_t>(), keys.stride(0), keys.stride(1), block.data_ptr<int64_t>(),
        offset.data_ptr<int64_t>(), codes.data_ptr<uint8_t>(), codes.stride(0), codes.stride(1),
        codes.stride(2), codes.stride(3), dc.data_ptr<int64_t>(), weights.data_ptr<float>(),
        centroids_t.data_ptr<float>(), norms.data_ptr<float>(), N, H, m, d, C);
  });
}
