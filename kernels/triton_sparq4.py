"""The sparq4 ranking as a Triton kernel (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

The default ranking estimates each tile's largest q.k from a 4-bit copy of the keys kept per
physical KV block (``kq [NB, Hkv, D, B/2]`` uint8: per channel one run of B/2 bytes, in each
16-token chunk byte i holding token i in its low nibble and token i + 8 in its high one;
``kz [NB, Hkv, 2, D]`` fp32: each channel's min and step, a code c standing for
min + c * step). Its torch form gathers every block of every row and unpacks the chosen
channels (``prescore_backend.keycopy.sparq4_tile_rank``): GBs of temporaries at 64 rows x 32k
tokens. Here one program per (row, KV head, logical block) reads that block's bytes of the
chosen channels through the block table, widens the nibbles in registers and writes the
block's tile estimates: the only tensor made is the ``[Rs, Hkv, M]`` estimate (4 bytes per
tile). Shapes are fixed by the block table's width, nothing syncs with the host.

:func:`sparq4_tile_rank_ref` is the float64 loop oracle the tests compare against.
Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["triton_sparq4_tile_rank", "sparq4_tile_rank_ref"]


@triton.jit
def _sparq4_rank_kernel(q_ptr, kq_ptr, kz_ptr, bt_ptr, ch_ptr, out_ptr,
                        Hkv, MB, bt_stride, M,
                        G: tl.constexpr, D: tl.constexpr, B: tl.constexpr, T: tl.constexpr,
                        NC: tl.constexpr, G_PAD: tl.constexpr, NC_PAD: tl.constexpr):
    rh = tl.program_id(0)  # row * Hkv + KV head
    b = tl.program_id(1)  # logical block of the row
    r = rh // Hkv
    h = rh % Hkv
    blk = tl.load(bt_ptr + r * bt_stride + b).to(tl.int64)
    j = tl.arange(0, NC_PAD)
    jm = j < NC
    ch = tl.load(ch_ptr + rh * NC + j, mask=jm, other=0).to(tl.int64)  # [NC_PAD]
    t = tl.arange(0, B)
    byte = (t // 16) * 8 + (t % 8)  # token t's byte in its channel's run
    shift = ((t % 16) // 8) * 4  # low nibble: tokens 0-7 of a chunk, high: 8-15
    base = kq_ptr + (blk * Hkv + h) * (D * (B // 2))
    codes = tl.load(base + ch[:, None] * (B // 2) + byte[None, :], mask=jm[:, None], other=0)
    codes = ((codes.to(tl.int32) >> shift[None, :]) & 15).to(tl.float32)  # [NC_PAD, B]
    zb = kz_ptr + (blk * Hkv + h) * (2 * D)
    zmin = tl.load(zb + ch, mask=jm, other=0.0)
    zstep = tl.load(zb + D + ch, mask=jm, other=0.0)
    k = zmin[:, None] + codes * zstep[:, None]  # [NC_PAD, B] the channels' dequantized keys
    g = tl.arange(0, G_PAD)
    gm = g < G
    qs = tl.load(q_ptr + (r * Hkv * G + h * G + g[:, None]) * D + ch[None, :],
                 mask=gm[:, None] & jm[None, :], other=0.0).to(tl.float32)  # [G_PAD, NC_PAD]
    est = tl.sum(qs[:, :, None] * k[None, :, :], axis=1)  # [G_PAD, B]
    est = tl.where(gm[:, None], est, float("-inf"))
    tok = tl.max(est, axis=0)  # [B] max over the group's heads
    tiles = tl.max(tl.reshape(tok, (B // T, T)), axis=1)  # [B/T]
    i = tl.arange(0, B // T)
    tl.store(out_ptr + rh * M + b * (B // T) + i, tiles)


def triton_sparq4_tile_rank(q: Tensor, kq: Tensor, kz: Tensor, bt: Tensor, channels: Tensor,
                            tile_size: int) -> Tensor:
    """Estimated max of q.k per tile: ``[Rs, Hkv, M]`` fp32, M = MB * B / T.

    q ``[Rs, Hq, D]``; kq ``[NB, Hkv, D, B/2]`` uint8 and kz ``[NB, Hkv, 2, D]`` fp32, both
    contiguous; bt ``[Rs, MB]`` int32/int64 block table; channels ``[Rs, Hkv, NC]`` int64 the
    key channels each (row, KV head) reads. Blocks without a copy (incomplete, inside the
    window) give stale estimates: callers rank only tiles outside the window."""
    rs, hq, d = q.shape
    _, hkv, _, half = kq.shape
    B, T, nc = 2 * half, int(tile_size), channels.shape[-1]
    if B % 16 or B % T or T & (T - 1) or hq % hkv:
        raise ValueError(f"triton_sparq4_tile_rank: block {B} must be a multiple of 16 and of "
                         f"the tile {T} (a power of two); {hq} query heads over {hkv} KV heads")
    mb = bt.shape[1]
    out = torch.empty(rs, hkv, mb * (B // T), dtype=torch.float32, device=q.device)
    if rs == 0 or mb == 0:
        return out
    g = hq // hkv
    _sparq4_rank_kernel[(rs * hkv, mb)](
        q.contiguous(), kq, kz, bt, channels.contiguous(), out, hkv, mb, bt.stride(0),
        out.shape[-1], G=g, D=d, B=B, T=T, NC=nc, G_PAD=triton.next_power_of_2(g),
        NC_PAD=triton.next_power_of_2(nc))
    return out


def sparq4_tile_rank_ref(q: Tensor, kq: Tensor, kz: Tensor, bt: Tensor, channels: Tensor,
                         tile_size: int) -> Tensor:
    """Oracle of :func:`triton_sparq4_tile_rank`: plain loops over rows, KV heads, tiles,
    tokens and heads, every code read by its byte and nibble, in float64."""
    rs, hq, d = q.shape
    hkv, half = kq.shape[1], kq.shape[3]
    B, T, g = 2 * half, tile_size, hq // hkv
    mb = bt.shape[1]
    q64, codes, zs = q.double().cpu(), kq.cpu(), kz.double().cpu()
    out = torch.empty(rs, hkv, mb * (B // T), dtype=torch.float64)
    for r in range(rs):
        for h in range(hkv):
            chs = [int(c) for c in channels[r, h]]
            for tile in range(mb * (B // T)):
                best = float("-inf")
                for tok in range(tile * T, (tile + 1) * T):
                    blk, off = int(bt[r, tok // B]), tok % B
                    byte_i = (off // 16) * 8 + off % 8
                    for gg in range(g):
                        acc = 0.0
                        for c in chs:
                            v = int(codes[blk, h, c, byte_i])
                            code = v & 15 if off % 16 < 8 else v >> 4
                            acc += float(q64[r, h * g + gg, c]) * float(
                                zs[blk, h, 0, c] + code * zs[blk, h, 1, c])
                        best = max(best, acc)
                out[r, h, tile] = best
    return out
