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
