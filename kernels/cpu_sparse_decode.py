"""Fused CPU sparse paged decode (C++, compiled on first use with torch's inline extension).

The torch path (:func:`.sparse_decode._torch_core`) gathers the selected tiles into a
workspace and runs two batched matmuls: ~60 torch ops per call, each with a fixed overhead,
and a gather of K tiles that vLLM's CPU cache stores transposed (``[D, B]`` per block and head,
so a 16-token K tile is D separate 64-byte pieces). This kernel reads the tiles in place: one
task per (row, KV head), scores of the G query heads of the group over each tile (contiguous
token runs of K^T vectorize), an online softmax (exact over the selected union, as in
FlashAttention's streaming form) and the V accumulation, with no intermediate tensors.

Same contract as :func:`.sparse_decode.sparse_decode` (any strides; the fast inner loops are
taken when K is token-contiguous and V is dim-contiguous, which is vLLM's CPU layout).
Compilation needs a C++ compiler and Python headers (g++ on Linux); when unavailable,
:func:`available` is False and callers use the torch path.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

__all__ = ["available", "cpu_sparse_decode"]

logger = logging.getLogger(__name__)

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

template <typename scalar_t>
static void run(const float* q, const scalar_t* kb, const scalar_t* vb,
                int64_t ks0, int64_t ks1, int64_t kst, int64_t ksd,
                int64_t vs0, int64_t vs1, int64_t vst, int64_t vsd,
                const int32_t* bt, int64_t bt_stride, const int32_t* seq_lens,
                const int32_t* tiles, int64_t S, float* out, float* lse,
                int64_t R, int64_t Hkv, int64_t G, int64_t D, int64_t B, int64_t T) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * T), acc(G * D), m(G), l(G);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t r = rh / Hkv, h = rh % Hkv;
      const float* qg = q + rh * G * D;  // query heads h*G .. h*G+G-1 of row r
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), NEG_INF);
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t L = seq_lens[r];
      const int32_t* tl = tiles + rh * S;
      for (int64_t si = 0; si < S; ++si) {
        const int64_t t = tl[si];
        if (t < 0) continue;
        const int64_t tok0 = t * T;
        const int64_t n = std::min<int64_t>(T, L - tok0);
        if (n <= 0) continue;
        const int64_t blk = bt[r * bt_stride + tok0 / B], off = tok0 % B;
        const scalar_t* kp = kb + blk * ks0 + h * ks1 + off * kst;
        const scalar_t* vp = vb + blk * vs0 + h * vs1 + off * vst;
        std::fill(s.begin(), s.end(), 0.f);
        if (kst == 1) {  // K^T: for each dim, n contiguous tokens
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t* kd = kp + d * ksd;
            for (int64_t g = 0; g < G; ++g) {
              const float qv = qg[g * D + d];
              float* sg = s.data() + g * T;
              for (int64_t i = 0; i < n; ++i) sg[i] += qv * static_cast<float>(kd[i]);
            }
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t* ki = kp + i * kst;
            for (int64_t g = 0; g < G; ++g) {
              float a = 0.f;
              for (int64_t d = 0; d < D; ++d) a += qg[g * D + d] * static_cast<float>(ki[d * ksd]);
              s[g * T + i] = a;
            }
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * T;
          float mx = sg[0];
          for (int64_t i = 1; i < n; ++i) mx = std::max(mx, sg[i]);
          const float mnew = std::max(m[g], mx);
          const float corr = (m[g] == NEG_INF) ? 0.f : std::exp(m[g] - mnew);
          float* ag = acc.data() + g * D;
          if (corr != 1.f) {
            for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          }
          float lsum = l[g] * corr;
          for (int64_t i = 0; i < n; ++i) {
            const float p = std::exp(sg[i] - mnew);
            lsum += p;
            const scalar_t* vi = vp + i * vst;
            if (vsd == 1) {
              for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<float>(vi[d]);
            } else {
              for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<float>(vi[d * vsd]);
            }
          }
          l[g] = lsum;
          m[g] = mnew;
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

std::vector<torch::Tensor> sparse_decode_cpu(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                             torch::Tensor bt, torch::Tensor seq_lens,
                                             torch::Tensor tiles, int64_t T) {
  // q [R, Hq, D] fp32 contiguous (pre-scaled); k, v [NB, Hkv, B, D] strided views;
  // bt [R, MB] int32; seq_lens [R] int32; tiles [R, Hkv, S] int32 contiguous.
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k.size(1), B = k.size(2), G = Hq / Hkv, S = tiles.size(2);
  auto out = torch::empty({R, Hq, D}, q.options());
  auto lse = torch::empty({R, Hq}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "sparse_decode_cpu", [&] {
    run<scalar_t>(q.data_ptr<float>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                  k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                  v.stride(0), v.stride(1), v.stride(2), v.stride(3),
                  bt.data_ptr<int32_t>(), bt.stride(0), seq_lens.data_ptr<int32_t>(),
                  tiles.data_ptr<int32_t>(), S, out.data_ptr<float>(), lse.data_ptr<float>(),
                  R, Hkv, G, D, B, T);
  });
  return {out, lse};
}
"""


@functools.lru_cache(maxsize=1)
def _module():
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="prescore_cpu_sparse_decode_v1", cpp_sources=_SRC,
                       functions=["sparse_decode_cpu"], extra_cflags=["-O3", "-march=native"],
                       verbose=False)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Compile (once per machine, cached by torch) and report whether the kernel loads."""
    try:
        _module()
        return True
    except Exception as e:  # no compiler, no headers: the torch path still works
        logger.warning("prescore: fused CPU sparse decode unavailable (%s); using the torch path",
                       e)
        return False


def cpu_sparse_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                      block_tables: Tensor, seq_lens: Tensor, tiles: Tensor, tile_size: int,
                      scale: float) -> tuple[Tensor, Tensor]:
    """Fused CPU path; same arguments as ``sparse_decode``; returns out ``[R, Hq, D]`` fp32 and
    lse ``[R, Hq]`` fp32."""
    q = (query.float() * scale).contiguous()  # [R, Hq, D]
    out, lse = _module().sparse_decode_cpu(
        q, key_cache, value_cache, block_tables.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(), tiles.to(torch.int32).contiguous(), tile_size)
    return out, lse
