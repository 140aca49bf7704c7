"""The low tier's decode as a Triton kernel (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

Two precision tiers read the tiles after the best ones from a low-bit copy of K and V
(:mod:`.lowbit`: bit planes per channel for K, per token for V, fp16 min and step). Its torch
form gathers and dequantizes every selected tile into ``[R, Hkv, S, T, D]`` fp32 temporaries
(K and V) before one batched softmax. Here one program per (row, KV head, slice of the tile
list) reads each selected tile's plane bytes through the block table, rebuilds the codes in
registers (``bits`` loads of one byte per value, shifted and or-ed), dequantizes, and runs an
online softmax over the GQA group's query heads, which share each K/V load; several slices per
(row, KV head) are merged by the log-sum-exp rule (the sparse decode's merge kernel). Nothing
is allocated but the output (and the slices' partial states), nothing syncs with the host.

The float64 loop oracle is :func:`~.lowbit.lowbit_decode_ref` (each code read bit by bit from
its plane bytes). Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_sparse_decode import MAX_SPLITS, _num_sms, merge_splits, plan_splits, split_outputs

__all__ = ["triton_lowbit_decode"]


@triton.jit(do_not_specialize=["S", "tiles_per_split", "max_blocks"])
def _lowbit_decode_kernel(
    q_ptr, kc_ptr, kz_ptr, vc_ptr, vz_ptr, bt_ptr, sl_ptr, tiles_ptr, out_ptr, lse_ptr,
    scale, S, tiles_per_split, max_blocks, Hkv,
    stride_qr, stride_qh, stride_btr,
    stride_tr, stride_th, stride_ts,
    stride_or, stride_oh, stride_os, stride_od,
    stride_lr, stride_lh, stride_ls,
    G: tl.constexpr, D: tl.constexpr, T: tl.constexpr, B: tl.constexpr, BITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, TILES_PER_ITER: tl.constexpr,
):
    BLOCK_N: tl.constexpr = TILES_PER_ITER * BLOCK_T
    KROW: tl.constexpr = BITS * (B // 8)  # bytes of one channel's planes (K)
    VROW: tl.constexpr = BITS * (D // 8)  # bytes of one token's planes (V)
    r = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    slot = offs_n // BLOCK_T
    within = offs_n % BLOCK_T
    g_ok = offs_g < G
    qh = h * G + offs_g
    q = tl.load(q_ptr + r * stride_qr + qh[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32)  # [BG, D]
    seq_len = tl.load(sl_ptr + r)
    s_begin = sp * tiles_per_split
    s_end = tl.minimum(S, s_begin + tiles_per_split)
    tile_base = tiles_ptr + r * stride_tr + h * stride_th

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for s0 in range(s_begin, s_end, TILES_PER_ITER):
        si = s0 + slot  # [BN]
        t = tl.load(tile_base + si * stride_ts, mask=si < s_end, other=-1)  # [BN]
        tok = t * T + within
        valid = (within < T) & (t >= 0) & (tok < seq_len)
        tok = tl.where(valid, tok, 0)
        lblk = tl.minimum(tok // B, max_blocks - 1)
        blk = tl.load(bt_ptr + r * stride_btr + lblk, mask=valid, other=0).to(tl.int64)
        off = tok % B  # [BN] token inside its block
        bh = blk * Hkv + h  # [BN] (block, KV head) entry of the copy
        # K: channel c's plane p holds token `off`'s bit at byte off // 8, bit off % 8
        kmask = valid[None, :]
        kaddr = kc_ptr + bh[None, :] * (D * KROW) + offs_d[:, None] * KROW + (off // 8)[None, :]
        kshift = (off % 8)[None, :]
        kcode = tl.zeros([D, BLOCK_N], tl.int32)
        for p in tl.static_range(BITS):
            byte = tl.load(kaddr + p * (B // 8), mask=kmask, other=0).to(tl.int32)
            kcode = kcode | (((byte >> kshift) & 1) << p)
        zb = kz_ptr + bh[None, :] * (2 * D) + offs_d[:, None]
        kmin = tl.load(zb, mask=kmask, other=0.0).to(tl.float32)
        kstep = tl.load(zb + D, mask=kmask, other=0.0).to(tl.float32)
        k = kmin + kcode.to(tl.float32) * kstep  # [D, BN]
        sc = tl.dot(q, k, input_precision="ieee")  # [BG, BN]
        sc = tl.where(valid[None, :], sc * scale, float("-inf"))
        # V: token `off`'s plane p holds channel c's bit at byte c // 8, bit c % 8
        vmask = valid[:, None]
        vaddr = vc_ptr + (bh * B + off)[:, None] * VROW + (offs_d // 8)[None, :]
        vshift = (offs_d % 8)[None, :]
        vcode = tl.zeros([BLOCK_N, D], tl.int32)
        for p in tl.static_range(BITS):
            byte = tl.load(vaddr + p * (D // 8), mask=vmask, other=0).to(tl.int32)
            vcode = vcode | (((byte >> vshift) & 1) << p)
        vzb = vz_ptr + (bh * B + off) * 2
        vmin = tl.load(vzb, mask=valid, other=0.0).to(tl.float32)
        vstep = tl.load(vzb + 1, mask=valid, other=0.0).to(tl.float32)
        v = vmin[:, None] + vcode.to(tl.float32) * vstep[:, None]  # [BN, D]
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr, v, input_precision="ieee")
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(out_ptr + r * stride_or + qh[:, None] * stride_oh + sp * stride_os
             + offs_d[None, :] * stride_od, o, mask=g_ok[:, None])
    tl.store(lse_ptr + r * stride_lr + qh * stride_lh + sp * stride_ls, lse, mask=g_ok)


def triton_lowbit_decode(query: Tensor, kc: Tensor, kz: Tensor, vc: Tensor, vz: Tensor,
                         block_tables: Tensor, seq_lens: Tensor, tiles: Tensor, tile_size: int,
                         scale: float, *, num_splits: int | None = None,
                         tiles_per_iter: int | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention over tiles read from the low-bit copy: -> out ``[R, Hq, D]`` fp32,
    lse ``[R, Hq]`` fp32 (-inf and out 0 where nothing is read).

    query ``[R, Hq, D]``; kc ``[NB, Hkv, D, bits, B/8]`` uint8, kz ``[NB, Hkv, 2, D]`` fp16,
    vc ``[NB, Hkv, B, bits, D/8]`` uint8, vz ``[NB, Hkv, B, 2]`` fp16 (contiguous,
    :class:`~.lowbit.LowBitCopy`); block_tables ``[R, MB]`` int; seq_lens ``[R]``; tiles
    ``[R, Hkv, S]`` int32 logical tile ids, -1 pad. ``num_splits`` forces the slice count
    (tests); ``tiles_per_iter``: tiles per loop iteration (default 64 tokens' worth)."""
    R, Hq, D = query.shape
    NB, Hkv, _, bits, b8 = kc.shape
    B, T = 8 * b8, int(tile_size)
    if (Hq % Hkv or D < 16 or D & (D - 1) or T & (T - 1) or B % T
            or tuple(vc.shape) != (NB, Hkv, B, bits, D // 8)):
        raise ValueError(f"triton_lowbit_decode: head dim {D} (a power of two, at least 16), "
                         f"tile {T} (a power of two dividing the block {B}), {Hq} query over "
                         f"{Hkv} KV heads, vc {tuple(vc.shape)}")
    for name, x in (("kc", kc), ("kz", kz), ("vc", vc), ("vz", vz)):
        if not x.is_contiguous():
            raise ValueError(f"triton_lowbit_decode: {name} must be contiguous")
    G = Hq // Hkv
    dev = query.device
    out = torch.empty(R, Hq, D, dtype=torch.float32, device=dev)
    lse = torch.empty(R, Hq, dtype=torch.float32, device=dev)
    if R == 0:
        return out, lse
    S = tiles.shape[2]
    block_t = max(T, 1)
    tpi = tiles_per_iter or max(1, 64 // block_t)
    if block_t * tpi < 16:  # tl.dot: every dim >= 16
        tpi = -(-16 // block_t)
    if num_splits is None:
        ns, per = plan_splits(R, Hkv, S, tpi, _num_sms(dev))
    else:
        ns = max(1, min(int(num_splits), MAX_SPLITS))
        per = -(-S // ns) if S else 0
    tiles = tiles if tiles.dtype == torch.int32 else tiles.to(torch.int32)
    if query.stride(2) != 1:
        query = query.contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if block_tables.stride(1) != 1:
        block_tables = block_tables.contiguous()
    po, pl, po_strides, pl_strides = split_outputs(out, lse, ns)
    _lowbit_decode_kernel[(R, Hkv, ns)](
        query, kc, kz, vc, vz, block_tables, seq_lens, tiles, po, pl,
        float(scale), S, per, block_tables.shape[1], Hkv,
        query.stride(0), query.stride(1), block_tables.stride(0), *tiles.stride(),
        *po_strides, *pl_strides,
        G=G, D=D, T=T, B=B, BITS=bits, BLOCK_G=max(16, triton.next_power_of_2(G)),
        BLOCK_T=block_t, TILES_PER_ITER=tpi, num_warps=4,
    )
    merge_splits(po, pl, out, lse)
    return out, lse
