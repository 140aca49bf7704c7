"""Two precision tiers (``low_tier_bits > 0``): the budget split, both tiers' tiles, their decode.

Per sparse decode row, the tiles are ranked by SparQ's estimate on the 4-bit key copy
(``query_aware="sparq4"``, :func:`~prescore_backend.keycopy.sparq4_tile_rank`); sinks and window
plus the best ones are read exactly from the cache, the next ones in the same ranking from the
low-bit K/V copy (:mod:`prescore_backend.kernels.lowbit`), and both parts are merged into one
softmax. The budget's bytes beyond sinks and window are split: ``low_tier_share`` of them
buys low-bit tiles at their own byte cost, the rest exact tiles. On the evaluation texts
(4k, keep 1/8 of the bytes, docs/results/selection_tiers.md) this came within ~0.4 points of
the per-query oracle where the single exact tier lost several times more.

The backends (:mod:`prescore_backend.backends`) and the quality evaluation call these
functions. Nothing here imports vLLM. Shapes: ``Rs`` sparse rows, ``Hq``/``Hkv`` query/KV
heads, ``D`` head dim, ``M`` tile slots per row, ``S`` tiles per (row, KV head).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prescore_backend.config import PrescoreConfig
from prescore_backend.keycopy import sparq4_tile_rank
from prescore_backend.kernels.lowbit import bytes_per_token, two_tier_decode
from prescore_backend.kernels.select import Selection, select_tiles, tokens_read
from prescore_backend.side_data import SideData

__all__ = ["low_token_cost", "tier_budgets", "select_two_tiers", "decode_two_tiers"]


def low_token_cost(cfg: PrescoreConfig, head_dim: int, kv_bytes: int = 2,
                   block_size: int = 128) -> float:
    """Bytes of one low-bit token per byte of an exact one (K and V, ``kv_bytes`` each)."""
    return bytes_per_token(cfg.low_tier_bits, head_dim, block_size) / (2 * head_dim * kv_bytes)


def tier_budgets(cfg: PrescoreConfig, budget: Tensor, num_tiles: Tensor, head_dim: int,
                 kv_bytes: int = 2, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Split a budget ``[R]`` int64 (tiles, at least sinks + window) between the tiers: ->
    (exact tiles ``[R]``, exact + low-bit tiles ``[R]``). Of the tiles beyond sinks and window,
    ``1 - low_tier_share`` stay exact; the bytes of the rest buy low-bit tiles at
    :func:`low_token_cost` each. A budget that covers the row's ``num_tiles`` ``[R]`` stays
    exact (nothing is read in low precision that could be read exactly)."""
    forced = cfg.sink_tiles + cfg.window_tiles
    free = (budget - forced).clamp_min(0).double()
    exact = forced + (free * (1 - cfg.low_tier_share)).floor().long()
    c = low_token_cost(cfg, head_dim, kv_bytes, block_size)
    total = exact + (free * cfg.low_tier_share / c).floor().long()
    covers = budget >= num_tiles
    return (torch.where(covers, budget, torch.minimum(exact, budget)),
            torch.where(covers, budget, total))


def select_two_tiers(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                     num_tiles: Tensor, exact_budget: Tensor, total_budget: Tensor, *,
                     impl: str = "auto") -> tuple[Selection, Tensor]:
    """Both tiers' tiles: -> (the exact tier's :class:`Selection`, low-bit tiles ``[Rs, Hkv, S]``
    int32 ascending, -1 pad, disjoint from the exact ones).

    q ``[Rs, Hq, D]``; bt ``[Rs, MB]`` int64; num_tiles, exact_budget, total_budget ``[Rs]``
    int64 (:func:`tier_budgets`). Sinks and window are forced into the exact tier; both tiers
    take the tiles in the sparq4 ranking's order, the exact tier the best."""
    est = sparq4_tile_rank(q, side.kq, side.kz, bt, cfg.query_channels, cfg.tile_size)
    kw = dict(sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles, impl=impl)
    sel = select_tiles(est, num_tiles, exact_budget, **kw)
    both = select_tiles(est, num_tiles, total_budget, **kw)
    rs, hkv, M = est.shape
    mask = torch.zeros(rs, hkv, M + 1, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, torch.where(both.tiles >= 0, both.tiles.long(), M), True)
    mask.scatter_(-1, torch.where(sel.tiles >= 0, sel.tiles.long(), M), False)
    idx = torch.where(mask[..., :M], torch.arange(M, device=q.device), M)
    low = idx.sort(-1).values[..., : both.tiles.shape[-1]]
    return sel, torch.where(low < M, low, -1).to(torch.int32)


def decode_two_tiers(cfg: PrescoreConfig, q: Tensor, key_cache: Tensor, value_cache: Tensor,
                     side: SideData, bt: Tensor, seq_lens: Tensor, num_tiles: Tensor,
                     exact_budget: Tensor, total_budget: Tensor, scale: float, *,
                     kv_layout: str = "strided", kv_bytes: int = 2,
                     impl: str = "auto") -> tuple[Tensor, Tensor, Selection]:
    """Attention of sparse decode rows over both tiers: -> (out ``[Rs, Hq, D]`` fp32, bytes
    read ``[Rs, Hkv]`` fp64 in exact-KV-token units (low-bit tokens at their cost), the exact
    tier's :class:`Selection`).

    q ``[Rs, Hq, D]``; key_cache / value_cache ``[NB, Hkv, B, D]`` in ``kv_layout``; side: the
    layer's side data with its low-bit copy; bt ``[Rs, MB]`` int64; seq_lens ``[Rs]``;
    num_tiles, exact_budget, total_budget ``[Rs]`` int64; ``kv_bytes``: bytes per cached
    element (what a low-bit token is charged against)."""
    sel, low = select_two_tiers(cfg, q, side, bt, num_tiles, exact_budget, total_budget,
                                impl=impl)
    out = two_tier_decode(q, key_cache, value_cache, side.low, bt.int(), seq_lens.int(),
                          sel.tiles, low, cfg.tile_size, scale, kv_layout=kv_layout)
    c = low_token_cost(cfg, q.shape[-1], kv_bytes, key_cache.shape[2])
    read = (tokens_read(sel.tiles, seq_lens, cfg.tile_size).double()
            + c * tokens_read(low, seq_lens, cfg.tile_size).double())
    return out, read, sel
