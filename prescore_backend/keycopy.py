"""A 4-bit copy of the keys beside the KV cache: the estimator behind ``query_aware="sparq4"``.

SparQ (Ribar et al., arXiv 2312.04985) ranks keys by q.k on the query's r largest-|q|
channels, reading those channels of every key exactly: r/D of the keys' bytes per step
(``query_aware="sparq"``: 1/16 of a bf16 K+V at r=8, D=64, half of a 1/8 budget). Here the
same channels are read from a 4-bit copy of the keys, a quarter of those bytes (r=8: 4 bytes
per token and KV head, 1/64 of the K+V, plus the blocks' scales). Departures from the paper,
and why:

* the copy is quantized per (KV block, KV head, channel) with that block's own min and step
  (16 levels), written when the block becomes full: a function of the block's keys alone, so
  prefix caching, chunked prefill and preemption give the same copy, and nothing is
  calibrated. An incomplete block needs no copy: it lies inside the recent window, which is
  always attended. On the calibration text this ranked tiles as well as the exact channels
  (attention recall of the exact top tiles 0.668 against 0.672), where one static scale per
  channel lost 4 points (0.628) and rotary pairs of channels 3 more;
* one set of channels per KV head, the r largest of |q| summed over the GQA group's heads
  (the keys are shared by the group), and a tile is ranked by the max of the estimate over
  its tokens *and the group's heads* (SparQ keeps the top-k tokens per head; prescore ranks
  16-token tiles per KV head; with exact keys the max over heads ranked ~7 points of
  perplexity better than the group's summed query, docs/results/selection-probes.md);
  SparQ's second step (exact attention on the top-k plus a mean-value term) is prescore's
  sparse decode over the selected tiles.

Layout: ``kq [num_blocks, Hkv, D, B/2]`` uint8, per (block, KV head) one run of B/2 bytes per
channel; in each 16-token chunk byte i holds token i (low nibble) and token i + 8 (high), so a
chunk's 8 bytes widen to its 16 tokens in order. ``kz [num_blocks, Hkv, 2, D]`` fp32: each
channel's min and step; a code c stands for min + c * step.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LEVELS", "pack_blocks", "unpack_blocks", "top_channels", "sparq4_tile_rank",
           "scale_bytes_per_token"]

LEVELS = 15  # codes 0..15


def scale_bytes_per_token(channels: int, block_size: int) -> float:
    """Bytes of the blocks' (min, step) pairs a ranking reads per token and KV head."""
    return 2 * 4 * channels / block_size


def pack_blocks(keys: Tensor) -> tuple[Tensor, Tensor]:
    """keys ``[nblk, Hkv, B, D]`` (full blocks) -> (kq ``[nblk, Hkv, D, B/2]`` uint8, kz
    ``[nblk, Hkv, 2, D]`` fp32): per (block, head, channel) the codes
    ``round((k - min) / step)``, step = (max - min) / 15."""
    k = keys.float()
    nb, hkv, bs, d = k.shape
    lo = k.amin(2)  # [nblk, Hkv, D]
    step = (k.amax(2) - lo).div_(LEVELS).clamp_min_(1e-8)
    c = ((k - lo.unsqueeze(2)) / step.unsqueeze(2)).round_().clamp_(0, LEVELS).to(torch.uint8)
    c = c.transpose(2, 3).reshape(nb, hkv, d, bs // 16, 2, 8)  # [.., chunk, half, 8]
    kq = (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(nb, hkv, d, bs // 2)
    return kq.contiguous(), torch.stack([lo, step], 2)


def unpack_blocks(kq: Tensor, kz: Tensor) -> Tensor:
    """The dequantized keys of :func:`pack_blocks`: -> ``[nblk, Hkv, B, D]`` fp32."""
    nb, hkv, d, half = kq.shape
    x = kq.view(nb, hkv, d, half // 8, 8)
    c = torch.stack([x & 15, x >> 4], -2).reshape(nb, hkv, d, 2 * half).float()
    return (kz[:, :, 0].unsqueeze(-1) + c * kz[:, :, 1].unsqueeze(-1)).transpose(2, 3)


def top_channels(q: Tensor, num_kv_heads: int, channels: int) -> Tensor:
    """Key channels read for each (row, KV head): ``[Rs, Hkv, r]`` int64 ascending, the r
    largest of |q| summed over the GQA group's heads (ties to the lower channel, as the C++
    pick). q ``[Rs, Hq, D]``."""
    rs, hq, d = q.shape
    a = q.float().abs().view(rs, num_kv_heads, hq // num_kv_heads, d).sum(2)
    idx = torch.sort(a, dim=-1, descending=True, stable=True).indices[..., : min(channels, d)]
    return idx.sort(-1).values


def sparq4_tile_rank(q: Tensor, kq: Tensor, kz: Tensor, bt: Tensor, channels: int,
                     tile_size: int) -> Tensor:
    """Estimated max of q.k per tile: ``[Rs, Hkv, M]`` fp32, M = MB * B / T (plain torch).

    q ``[Rs, Hq, D]``; kq ``[NB, Hkv, D, B/2]`` uint8 and kz ``[NB, Hkv, 2, D]``
    (:func:`pack_blocks`); bt ``[Rs, MB]`` int64. Per (row, KV head): q.k on the
    :func:`top_channels` of the dequantized copy, max over the group's heads and the tile's
    tokens. Blocks without a copy (incomplete, inside the window) hold stale codes: callers
    rank only tiles outside the window."""
    rs, hq, d = q.shape
    hkv = kq.shape[1]
    g = hq // hkv
    ch = top_channels(q, hkv, channels)  # [Rs, Hkv, r]
    qs = torch.gather(q.float().view(rs, hkv, g, d), 3, ch.unsqueeze(2).expand(-1, -1, g, -1))
    mb, half = bt.shape[1], kq.shape[-1]
    r = ch.shape[-1]
    # only the r channels' runs of bytes and scales are read and unpacked
    cix = ch.view(rs, 1, hkv, r, 1).expand(-1, mb, -1, -1, half)
    codes = torch.gather(kq[bt], 3, cix).view(rs * mb, hkv, r, half)  # [Rs*MB, Hkv, r, B/2]
    zs = torch.gather(kz[bt], 4, ch.view(rs, 1, hkv, 1, r).expand(-1, mb, -1, 2, -1))
    keys = unpack_blocks(codes, zs.view(rs * mb, hkv, 2, r))  # [Rs*MB, Hkv, B, r]
    ks = keys.view(rs, mb, hkv, -1, r).permute(0, 2, 1, 3, 4).reshape(rs, hkv, -1, r)
    est = torch.matmul(qs, ks.transpose(-1, -2)).amax(2)  # [Rs, Hkv, N]
    return est.view(rs, hkv, -1, tile_size).amax(-1)
