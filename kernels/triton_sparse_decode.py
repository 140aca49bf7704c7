"""Triton kernels for sparse paged decode (GPU; run on CPU tensors under TRITON_INTERPRET=1).

Flash-decoding over the selected tiles. Grid ``(R, Hkv, num_splits)``: a program takes one
(row, KV head) and one contiguous slice of its selected-tile list, loads the G query heads of
the group once, and walks its slice ``tiles_per_iter`` tiles at a time: every token of those
tiles is fetched through the block table with the caller's strides (so one kernel serves
vLLM's CPU layout ``[blocks, Hkv, B, D]`` views and its GPU layout
``cache[:, 0].permute(0, 2, 1, 3)``), and an online softmax (running max, denominator,
accumulator) runs over the group's query heads, which share each K/V load (the point of GQA at
decode). Padding tiles (-1) and positions >= seq_len are masked. With one split the program
writes the result; with several, each writes its partial state (normalized output and lse)
and ``_merge_splits_kernel`` combines them by the log-sum-exp rule. The launcher picks the
split count so that R * Hkv * splits fills the GPU: at batch 1 there are only Hkv (row, head)
pairs, and one program per pair would leave all but a few SMs idle.

Precision: bf16/fp16 caches use the tensor cores on their own dtype (q.k and p.v with p cast
to the cache dtype, fp32 accumulation: what FlashAttention does); fp32 caches use exact fp32
dots (``input_precision="ieee"``, not TF32). Softmax state is fp32 throughout.

Validated on an H100 (``docs/results/gpu/``, ``bench/kernels/bench_triton_decode.py --check``). The
split count follows the step's selection length (a host-side int): a CUDA graph captures one
plan per step shape, as vLLM's graphs do per batch size. The CUDA backend
(``prescore_backend/backends/cuda.py``) calls it through ``sparse_decode(impl="triton")``.

Whether the kernels are interpreted is decided by triton when this module is imported: set
``TRITON_INTERPRET=1`` before the first import to run them on CPU tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .decode_inputs import check_decode_inputs

__all__ = ["triton_sparse_decode", "plan_splits", "split_outputs", "merge_splits"]


@triton.jit(do_not_specialize=["S", "tiles_per_split", "max_blocks"])  # one compile per shape
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, tiles_ptr, out_ptr, lse_ptr,
    scale, S, tiles_per_split, max_blocks,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_btr, stride_btb,
    stride_tr, stride_th, stride_ts,
    stride_or, stride_oh, stride_os, stride_od,
    stride_lr, stride_lh, stride_ls,
    G: tl.constexpr, D: tl.constexpr, T: tl.constexpr, B: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    TILES_PER_ITER: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    BLOCK_N: tl.constexpr = TILES_PER_ITER * BLOCK_T
    r = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n // BLOCK_T  # [BN] which tile of the iteration
    within = offs_n % BLOCK_T  # [BN] token inside that tile
    g_ok = offs_g < G
    d_ok = offs_d < D

    qh = h * G + offs_g
    q = tl.load(q_ptr + r * stride_qr + qh[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BG, BD]
    if not NATIVE_DOT:
        q = q.to(tl.float32)
    seq_len = tl.load(sl_ptr + r)
    s_begin = sp * tiles_per_split
    s_end = tl.minimum(S, s_begin + tiles_per_split)
    tile_base = tiles_ptr + r * stride_tr + h * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s0 in range(s_begin, s_end, TILES_PER_ITER):
        si = s0 + slot  # [BN]
        t = tl.load(tile_base + si * stride_ts, mask=si < s_end, other=-1)  # [BN] tile id per token
        tok = t * T + within  # [BN] logical position
        valid = (within < T) & (t >= 0) & (tok < seq_len)  # [BN]
        tok = tl.where(valid, tok, 0)
        lblk = tl.minimum(tok // B, max_blocks - 1)  # like the torch path: stay in the table
        blk = tl.load(bt_ptr + r * stride_btr + lblk * stride_btb, mask=valid,
                      other=0).to(tl.int64)  # [BN] physical block
        row = tok % B  # [BN] slot inside the block
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + blk[:, None] * stride_kb + h * stride_kh + row[:, None] * stride_kt
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(v_ptr + blk[:, None] * stride_vb + h * stride_vh + row[:, None] * stride_vt
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)  # [BN, BD]
        if NATIVE_DOT:
            sc = tl.dot(q, tl.trans(k))  # [BG, BN] fp32 accumulation
        else:
            sc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        sc = tl.where(valid[None, :], sc * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no inf - inf
        p = tl.exp(sc - m_safe[:, None])  # [BG, BN]
        alpha = tl.exp(m_i - m_safe)  # [BG]
        l_i = l_i * alpha + tl.sum(p, 1)
        if NATIVE_DOT:
            pv = tl.dot(p.to(v.dtype), v)  # [BG, BD]
        else:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]  # nothing selected -> 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(out_ptr + r * stride_or + qh[:, None] * stride_oh + sp * stride_os
             + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + r * stride_lr + qh * stride_lh + sp * stride_ls, lse, mask=g_ok)


@triton.jit(do_not_specialize=["NS"])
def _merge_splits_kernel(
    po_ptr, plse_ptr, out_ptr, lse_ptr, NS,
    stride_pr, stride_ph, stride_ps, stride_pd,
    stride_plr, stride_plh, stride_pls,
    stride_or, stride_oh, stride_od,
    stride_lr, stride_lh,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    hq = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NS
    d_ok = offs_d < D
    ls = tl.load(plse_ptr + r * stride_plr + hq * stride_plh + offs_s * stride_pls, mask=s_ok,
                 other=float("-inf"))  # [BS]
    m = tl.max(ls, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(ls - m_safe)  # [BS]; empty splits weigh 0
    wsum = tl.sum(w, 0)
    po = tl.load(po_ptr + r * stride_pr + hq * stride_ph + offs_s[:, None] * stride_ps
                 + offs_d[None, :] * stride_pd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    has = wsum > 0
    o = tl.sum(w[:, None] * po, 0) / tl.where(has, wsum, 1.0)  # [BD]
    lse = tl.where(has, m_safe + tl.log(tl.where(has, wsum, 1.0)), float("-inf"))
    tl.store(out_ptr + r * stride_or + hq * stride_oh + offs_d * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + r * stride_lr + hq * stride_lh, lse)


#: The interpreter (TRITON_INTERPRET=1) computes bf16/fp16 ``tl.dot`` wrongly (triton 3.9 on CPU:
#: errors ~1e10 on a 16x16 product), so there every dot runs in exact fp32; the native-dtype
#: dots are what a GPU runs and are validated there (``bench/kernels/bench_triton_decode.py --check``).
INTERPRETED = type(_sparse_decode_kernel).__name__ == "InterpretedFunction"

#: Most splits per (row, KV head); the merge kernel reads them all at once.
MAX_SPLITS = 64


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits, so the split path is exercised


def plan_splits(rows: int, num_kv_heads: int, num_tiles: int, tiles_per_iter: int,
                num_sms: int, *, waves: int = 2) -> tuple[int, int]:
    """(num_splits, tiles_per_split) for ``num_tiles`` selected tiles per (row, KV head).

    Enough programs for ``waves`` per SM, each with at least two iterations of
    ``tiles_per_iter`` tiles (a shorter slice spends more on its prologue and the merge than
    it saves), at most :data:`MAX_SPLITS`; slices are whole iterations.
    """
    if num_tiles <= 0:
        return 1, 0
    pairs = max(1, rows * num_kv_heads)
    want = -(-waves * num_sms // pairs)
    by_work = -(-num_tiles // (2 * tiles_per_iter))
    ns = max(1, min(want, by_work, MAX_SPLITS))
    per = -(-num_tiles // ns)
    per = -(-per // tiles_per_iter) * tiles_per_iter
    return -(-num_tiles // per), per


def triton_sparse_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                         seq_lens: Tensor, tiles: Tensor, tile_size: int, scale: float, *,
                         out_dtype: torch.dtype = torch.float32, num_splits: int | None = None,
                         block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """The typed launcher: query ``[R, Hq, D]``, caches ``[num_blocks, Hkv, B, D]`` (any
    strides), block_tables ``[R, max_blocks]``, seq_lens ``[R]``, tiles ``[R, Hkv, S]`` (-1
    padded) -> out ``[R, Hq, D]`` in ``out_dtype``, lse ``[R, Hq]`` fp32. The residual merge
    and ``out=`` are :func:`~prescore_backend.kernels.sparse_decode.sparse_decode`'s
    (``impl="triton"``).

    ``num_splits`` forces the split count (tests); ``block_n``: tokens per iteration (whole
    tiles, at least one; default 8192 / D elements' worth: 128 tokens at D 64, 64 at D 128,
    the faster setting of each on an H100, ``docs/results/gpu/``).
    """
    R, Hq, Hkv, D, B = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens,
                                     tiles, tile_size)
    G = Hq // Hkv
    dev = query.device
    out = torch.empty(R, Hq, D, dtype=out_dtype, device=dev)
    lse = torch.empty(R, Hq, dtype=torch.float32, device=dev)
    if R == 0:
        return out, lse
    S = tiles.shape[2]
    # tl.dot needs every dim >= 16; padded lanes are masked.
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(D))
    block_t = triton.next_power_of_2(tile_size)
    if block_n is None:
        block_n = max(16, 8192 // block_d)
    tpi = max(1, block_n // block_t)
    if block_t * tpi < 16:
        tpi = 16 // block_t
    if num_splits is None:
        ns, per = plan_splits(R, Hkv, S, tpi, _num_sms(dev))
    else:
        ns = max(1, min(int(num_splits), MAX_SPLITS))
        per = -(-S // ns) if S else 0
    native = (not INTERPRETED and key_cache.dtype in (torch.bfloat16, torch.float16)
              and query.dtype == key_cache.dtype)
    tiles = tiles if tiles.dtype == torch.int32 else tiles.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32).contiguous()  # read with stride 1
    po, pl, po_strides, pl_strides = split_outputs(out, lse, ns)
    _sparse_decode_kernel[(R, Hkv, ns)](
        query, key_cache, value_cache, block_tables, seq_lens, tiles, po, pl,
        float(scale), S, per, block_tables.shape[1],
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_tables.stride(),
        *tiles.stride(), *po_strides, *pl_strides,
        G=G, D=D, T=tile_size, B=B, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_T=block_t,
        TILES_PER_ITER=tpi, NATIVE_DOT=native, num_warps=4,
    )
    merge_splits(po, pl, out, lse)
    return out, lse


def split_outputs(out: Tensor, lse: Tensor, ns: int) -> tuple[Tensor, Tensor, tuple, tuple]:
    """Where the programs of ``ns`` splits write: ``out`` ``[R, Hq, D]`` and ``lse`` ``[R, Hq]``
    themselves with one split (split stride 0), else fp32 partials ``[R, Hq, ns, D]`` and
    ``[R, Hq, ns]``; -> (partial out, partial lse, their 4 and 3 strides)."""
    if ns == 1:
        return (out, lse, (out.stride(0), out.stride(1), 0, out.stride(2)),
                (lse.stride(0), lse.stride(1), 0))
    R, Hq, D = out.shape
    po = torch.empty(R, Hq, ns, D, dtype=torch.float32, device=out.device)
    pl = torch.empty(R, Hq, ns, dtype=torch.float32, device=out.device)
    return po, pl, po.stride(), pl.stride()


def merge_splits(po: Tensor, pl: Tensor, out: Tensor, lse: Tensor) -> None:
    """Combine the splits of :func:`split_outputs` into ``out`` and ``lse`` by the
    log-sum-exp rule (nothing to do with one split)."""
    if po is out:
        return
    R, Hq, ns, D = po.shape
    _merge_splits_kernel[(R, Hq)](
        po, pl, out, lse, ns, *po.stride(), *pl.stride(), *out.stride(), *lse.stride(),
        D=D, BLOCK_S=max(2, triton.next_power_of_2(ns)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=1,
    )
