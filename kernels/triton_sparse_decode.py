"""Triton kernel for sparse paged decode (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

One program per (row, KV head): it loads the G query heads of the group once, loops over the
selected tiles, fetches each K/V tile through the block table with the caller's strides (so
the same kernel serves vLLM's CPU layout ``[blocks, Hkv, B, D]`` views and its GPU layout
``cache[:, 0].permute(0, 2, 1, 3)``), and keeps an online softmax (running max, denominator and
accumulator) over the group's query heads. Padding tiles (-1) and positions >= seq_len are
masked. The group's G query heads share each K/V load, which is the point of GQA at decode.

Not yet done: splitting a (row, head) over several programs for very long selections
(flash-decoding style, merged with merge_attn_states); fp32 inputs use Triton's default dot
precision (TF32 on Ampere+ GPUs; exact in the interpreter).

Whether the kernel is interpreted is decided by triton when this module is imported: set
``TRITON_INTERPRET=1`` before the first import to run it on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .sparse_decode import _check_inputs, sparse_decode

__all__ = ["triton_sparse_decode"]


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, tiles_ptr, out_ptr, lse_ptr,
    scale, S,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_btr, stride_btb,
    stride_tr, stride_th, stride_ts,
    stride_or, stride_oh, stride_od,
    stride_lr, stride_lh,
    G: tl.constexpr, D: tl.constexpr, T: tl.constexpr, B: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    g_ok = offs_g < G
    d_ok = offs_d < D
    t_in = offs_t < T

    qh = h * G + offs_g
    q = tl.load(q_ptr + r * stride_qr + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BG, BD]
    q = q * scale
    seq_len = tl.load(sl_ptr + r)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(0, S):
        t = tl.load(tiles_ptr + r * stride_tr + h * stride_th + s * stride_ts)
        t_ok = t >= 0
        tok0 = tl.where(t_ok, t, 0) * T
        tok = tok0 + offs_t  # [BT]
        # Build the mask from tensor comparisons only: the interpreter rejects scalar-bool & tensor.
        tmask = t_in & (tok < seq_len) & ((offs_t * 0 + t) >= 0)  # [BT]
        blk = tl.load(bt_ptr + r * stride_btr + (tok0 // B) * stride_btb).to(tl.int64)
        rows = (tok0 % B) + offs_t  # [BT] rows inside the physical block
        kv_mask = tmask[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk * stride_kb + h * stride_kh + rows[:, None] * stride_kt
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(tl.float32)  # [BT, BD]
        sc = tl.dot(q, tl.trans(k))  # [BG, BT]
        sc = tl.where(tmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: avoid inf - inf
        p = tl.exp(sc - m_safe[:, None])  # [BG, BT]
        alpha = tl.exp(m_i - m_safe)  # [BG]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk * stride_vb + h * stride_vh + rows[:, None] * stride_vt
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(tl.float32)  # [BT, BD]
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]  # empty row -> 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(out_ptr + r * stride_or + qh[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + r * stride_lr + qh * stride_lh, lse, mask=g_ok)


def _triton_core(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                 seq_lens: Tensor, tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Launch the kernel: grid (R, Hkv); returns out ``[R, Hq, D]`` fp32, lse ``[R, Hq]`` fp32."""
    R, Hq, Hkv, D, B = _check_inputs(query, key_cache, value_cache, block_tables, seq_lens,
                                     tiles, tile_size)
    G = Hq // Hkv
    out = torch.empty(R, Hq, D, dtype=torch.float32, device=query.device)
    lse = torch.empty(R, Hq, dtype=torch.float32, device=query.device)
    if R == 0:
        return out, lse
    # tl.dot needs every dim >= 16; padded lanes are masked.
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(D))
    block_t = max(16, triton.next_power_of_2(tile_size))
    tiles = tiles.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32)
    _sparse_decode_kernel[(R, Hkv)](
        query, key_cache, value_cache, block_tables, seq_lens, tiles, out, lse,
        float(scale), tiles.shape[2],
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_tables.stride(),
        *tiles.stride(), *out.stride(), *lse.stride(),
        G=G, D=D, T=tile_size, B=B, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_T=block_t,
        num_warps=4,
    )
    return out, lse


def triton_sparse_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                         block_tables: Tensor, seq_lens: Tensor, tiles: Tensor, tile_size: int,
                         scale: float, *, residual_tiles: Tensor | None = None,
                         residual_weight: Tensor | None = None,
                         out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`~prescore_backend.kernels.sparse_decode.sparse_decode` with ``impl="triton"``.

    Shapes: query ``[R, Hq, D]``, caches ``[num_blocks, Hkv, B, D]`` (any strides), block_tables
    ``[R, max_blocks]``, seq_lens ``[R]``, tiles ``[R, Hkv, S]`` -> out ``[R, Hq, D]``, lse ``[R, Hq]``.
    """
    return sparse_decode(query, key_cache, value_cache, block_tables, seq_lens, tiles, tile_size,
                         scale, impl="triton", residual_tiles=residual_tiles,
                         residual_weight=residual_weight, out=out)
