"""A 4-bit copy of the keys beside the KV cache: the estimator behind ``query_aware="sparq4"``.

SparQ (Ribar et al., arXiv 2312.04985) ranks keys by q.k on the query's r largest-|q|
channels, reading those channels of every key exactly: r/D of the keys' bytes per step
(``query_aware="sparq"``: 1/16 of a bf16 K+V at r=8, D=64, half of a 1/8 budget). Here the
same channels are read from a 4-bit copy of the keys, 1/4 of those bytes (r=8: 4 bytes per
token and KV head, 1/64 of the K+V). Departures from the paper, and why:

* keys are quantized to 4 bits with one scale per (layer, KV head, channel): the calibration
  keys' largest magnitude (``prescore-models calibrate``; values beyond it clamp), as Double
  Sparsity (Yang et al., arXiv 2408.07092) keeps an offline-calibrated low-bit label cache. A
  static scale makes a key's copy a function of the key alone, so prefix caching, chunked
  prefill and preemption give the same copy;
* channels are chosen in **rotary pairs** (i, i + D/2), by |q_i| + |q_{i+D/2}| summed over the
  GQA group's heads: RoPE rotates the two together (the pair's magnitude does not depend on the
  position), and one byte holds a token's pair, so a token's copy is written in whole bytes;
* a tile is ranked by the max of the estimate over its tokens *and the group's heads* (SparQ
  keeps the top-k tokens per head; prescore ranks 16-token tiles per KV head; with exact keys
  the max over heads ranked tiles ~7 points of perplexity better than the group's summed
  query, docs/results/selection-probes.md); SparQ's second step (exact attention on the top-k
  plus a mean-value term) is prescore's sparse decode over the selected tiles.

Layout: ``kq [num_blocks, Hkv, D/2, B]`` uint8, per (block, KV head) one run of B bytes per
rotary pair, byte = (channel i code) | (channel i + D/2 code) << 4, code = round(k / s) + 8 in
[0, 15], s = absmax / 7: a ranking reads r/2 contiguous runs per block.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LEVELS", "key_scale", "pack_keys", "unpack_keys", "pair_channels",
           "sparq4_tile_rank"]

LEVELS = 7  # codes -8..7 around 0: absmax maps to +-7


def key_scale(key_absmax: Tensor) -> Tensor:
    """Quantization step per (KV head, channel) ``[Hkv, D]`` fp32 from the calibration absmax."""
    return (key_absmax.float() / LEVELS).clamp_min(1e-8)


def pack_keys(keys: Tensor, scale: Tensor) -> Tensor:
    """keys ``[N, Hkv, D]`` -> ``[N, Hkv, D/2]`` uint8: channel i in the low nibble, channel
    i + D/2 in the high one, each ``clamp(round(k / scale), -8, 7) + 8``."""
    d = keys.shape[-1]
    c = (keys.float() / scale).round_().clamp_(-8, 7).add_(8).to(torch.uint8)
    return c[..., : d // 2] | (c[..., d // 2:] << 4)


def unpack_keys(packed: Tensor, scale: Tensor) -> Tensor:
    """The dequantized keys of :func:`pack_keys`: ``[..., Hkv, D/2]`` -> ``[..., Hkv, D]``."""
    lo = (packed & 15).float() - 8
    hi = (packed >> 4).float() - 8
    return torch.cat([lo, hi], -1) * scale


def pair_channels(q: Tensor, num_kv_heads: int, channels: int) -> Tensor:
    """Rotary pairs read for each (row, KV head): ``[Rs, Hkv, channels // 2]`` int64 pair
    indices i in [0, D/2), ascending; pair i = channels (i, i + D/2). q ``[Rs, Hq, D]``: the
    pairs of largest |q_i| + |q_{i+D/2}| summed over the GQA group's heads (ties to the lower
    pair, as the C++ pick)."""
    rs, hq, d = q.shape
    a = q.float().abs().view(rs, num_kv_heads, hq // num_kv_heads, 2, d // 2).sum((2, 3))
    p = min(channels, d) // 2
    # stable order: by magnitude, then by index (topk's tie order is unspecified)
    idx = torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :p]
    return idx.sort(-1).values


def sparq4_tile_rank(q: Tensor, kq: Tensor, scale: Tensor, bt: Tensor, channels: int,
                     tile_size: int) -> Tensor:
    """Estimated max of q.k per tile: ``[Rs, Hkv, M]`` fp32, M = MB * B / T (plain torch).

    q ``[Rs, Hq, D]``; kq ``[NB, Hkv, D/2, B]`` uint8 (:func:`pack_keys`, pair-major); scale
    ``[Hkv, D]``; bt ``[Rs, MB]`` int64. Per (row, KV head): q.k on the :func:`pair_channels`
    of the dequantized copy, max over the group's heads and the tile's tokens. Tokens past a
    row's length hold stale codes: callers rank only full tiles outside the window."""
    rs, hq, d = q.shape
    nb, hkv, half, bs = kq.shape
    g = hq // hkv
    pairs = pair_channels(q, hkv, channels)  # [Rs, Hkv, P]
    ch = torch.cat([pairs, pairs + half], -1)  # [Rs, Hkv, 2P]: channels (i, i + D/2)
    qg = q.float().view(rs, hkv, g, d)
    qs = torch.gather(qg, 3, ch.unsqueeze(2).expand(-1, -1, g, -1))  # [Rs, Hkv, G, 2P]
    qs = qs * torch.gather(scale.float().expand(rs, hkv, d), 2, ch).unsqueeze(2)
    blk = kq[bt]  # [Rs, MB, Hkv, D/2, B]
    pidx = pairs.view(rs, 1, hkv, -1, 1).expand(-1, blk.shape[1], -1, -1, bs)
    sel = torch.gather(blk, 3, pidx)  # [Rs, MB, Hkv, P, B]
    codes = torch.cat([(sel & 15), (sel >> 4)], 3).float() - 8  # [Rs, MB, Hkv, 2P, B]
    codes = codes.permute(0, 2, 3, 1, 4).reshape(rs, hkv, ch.shape[-1], -1)  # [Rs, Hkv, 2P, N]
    est = torch.matmul(qs, codes).amax(2)  # [Rs, Hkv, N]
    return est.view(rs, hkv, -1, tile_size).amax(-1)
