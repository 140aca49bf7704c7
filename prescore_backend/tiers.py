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
from prescore_backend.keycopy import sparq4_tile_rank, top_channels
from prescore_backend.kernels.cpu_select import cpu_sparq4_tiers_pick
from prescore_backend.kernels.dispatch import resolve
from prescore_backend.kernels.lowbit import bytes_per_token, two_tier_decode
from prescore_backend.kernels.select import Selection, select_tiles, tokens_read
from prescore_backend.selection import CHARGE_KV_BYTES
from prescore_backend.side_data import SideData

__all__ = ["low_token_cost", "tier_budgets", "select_two_tiers", "decode_two_tiers"]




def low_token_cost(cfg: PrescoreConfig, head_dim: int, block_size: int = 128) -> float:
    """Bytes of one low-bit token per byte of an exact bf16 one (K and V)."""
    return (bytes_per_token(cfg.low_tier_bits, head_dim, block_size)
            / (2 * head_dim * CHARGE_KV_BYTES))


def tier_budgets(cfg: PrescoreConfig, budget: Tensor, num_tiles: Tensor, head_dim: int,
                 block_size: int = 128) -> tuple[Tensor, Tensor]:
    """Split a budget ``[R]`` int64 (tiles, at least sinks + window) between the tiers: ->
    (exact tiles ``[R]``, exact + low-bit tiles ``[R]``). Of the tiles beyond sinks and window,
    ``1 - low_tier_share`` stay exact; the bytes of the rest buy low-bit tiles at
    :func:`low_token_cost` each (3 bits, head dim 64: 0.21). A budget that covers the row's
    ``num_tiles`` ``[R]`` stays exact (nothing is read in low precision that could be read
    exactly)."""
    forced = cfg.sink_tiles + cfg.window_tiles
    free = (budget - forced).clamp_min(0).double()
    exact = forced + (free * (1 - cfg.low_tier_share)).floor().long()
    c = low_token_cost(cfg, head_dim, block_size)
    total = exact + (free * cfg.low_tier_share / c).floor().long()
    covers = budget >= num_tiles
    return (torch.where(covers, budget, torch.minimum(exact, budget)),
            torch.where(covers, budget, total))


def _channels(cfg: PrescoreConfig, q: Tensor, side: SideData) -> int:
    return cfg.ranking_channels(q.shape[-1])


def _marks_torch(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor, num_tiles: Tensor,
                 take_exact: Tensor, take_total: Tensor, M: int) -> Tensor:
    """Torch twin of :func:`~prescore_backend.kernels.cpu_select.cpu_sparq4_tiers_pick`: the
    marks ``[Rs, Hkv, M]`` uint8 (1: exact, 2: low-bit)."""
    est = sparq4_tile_rank(q, side.kq, side.kz, bt, _channels(cfg, q, side), cfg.tile_size)
    idx = torch.arange(M, device=q.device)
    n = num_tiles.view(-1, 1, 1)
    elig = (idx >= cfg.sink_tiles) & (idx < n - cfg.window_tiles)
    rank = est[..., :M].masked_fill(~elig, float("-inf"))
    order = torch.sort(rank, dim=-1, descending=True, stable=True).indices  # ties: lower first
    pos = torch.empty_like(order).scatter_(-1, order, idx.expand_as(order))  # rank of each tile
    ok = torch.isfinite(rank)
    marks = torch.where(ok & (pos < take_total.view(-1, 1, 1)), 2, 0)
    return torch.where(ok & (pos < take_exact.view(-1, 1, 1)), 1, marks).to(torch.uint8)


def _marks_cpp(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor, num_tiles: Tensor,
               take_exact: Tensor, take_total: Tensor, M: int) -> Tensor:
    return cpu_sparq4_tiers_pick(q, side.kq, side.kz, bt, num_tiles, take_exact, take_total,
                                 num_tile_slots=M, channels=_channels(cfg, q, side),
                                 tile_size=cfg.tile_size, sink_tiles=cfg.sink_tiles,
                                 window_tiles=cfg.window_tiles)


def _marks_triton(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                  num_tiles: Tensor, take_exact: Tensor, take_total: Tensor, M: int,
                  low_slots: int | None = None) -> tuple[Tensor, Tensor]:
    """Two Triton launches: the sparq4 ranking read through the block table, then the pick
    (marks and the low-bit tiles compacted, ``low_slots`` of them)."""
    from prescore_backend.kernels.triton_select import triton_tiers_pick  # lazy: triton
    from prescore_backend.kernels.triton_sparq4 import triton_sparq4_tile_rank

    ch = top_channels(q, side.kq.shape[1], _channels(cfg, q, side))  # [Rs, Hkv, NC]
    est = triton_sparq4_tile_rank(q, side.kq, side.kz, bt, ch, cfg.tile_size)  # [Rs, Hkv, M]
    return triton_tiers_pick(est[..., :M], num_tiles, take_exact, take_total,
                             sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles,
                             num_low_slots=low_slots)


_MARKS = {"torch": _marks_torch, "cpp": _marks_cpp, "triton": _marks_triton}


def _mask_tiles(mask: Tensor) -> Tensor:
    """``[Rs, Hkv, M]`` bool -> its tiles ``[Rs, Hkv, M]`` int32 ascending, -1 pad."""
    M = mask.shape[-1]
    idx = torch.where(mask, torch.arange(M, device=mask.device), M).sort(-1).values
    return torch.where(idx < M, idx, -1).to(torch.int32)


def select_two_tiers(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                     num_tiles: Tensor, exact_budget: Tensor, total_budget: Tensor, *,
                     impl: str = "auto", num_slots: int | None = None,
                     low_slots: int | None = None) -> tuple[Selection, Tensor]:
    """Both tiers' tiles: -> (the exact tier's :class:`Selection`, low-bit tiles ``[Rs, Hkv,
    L]`` int32 ascending, -1 pad, disjoint from the exact ones).

    q ``[Rs, Hq, D]``; bt ``[Rs, MB]`` int64; num_tiles, exact_budget, total_budget ``[Rs]``
    int64 (:func:`tier_budgets`). One sparq4 ranking of the tiles beyond sinks and window
    (C++ on CPU and Triton on GPUs, reading the key copy through the block table; or torch):
    its best ``exact_budget`` - sinks - window are read exactly with sinks and window, the next
    ones up to ``total_budget`` from the low-bit copy. ``num_slots``: the exact selection's
    slots (the step's largest exact budget, known on the host); ``low_slots`` L: the low-bit
    tiles' slots (the step's largest ``total_budget - exact_budget``), default M (the tile
    slots)."""
    M = bt.shape[1] * side.kq.shape[-1] * 2 // cfg.tile_size  # tile slots: blocks x B / T
    forced = cfg.sink_tiles + cfg.window_tiles
    take_e = (exact_budget - forced).clamp_min(0)
    take_t = (total_budget - forced).clamp_min(0)
    name, marks_fn = resolve("select_two_tiers", impl, q, _MARKS)
    if name == "cpp" and cfg.tile_size % 16:  # the C++ ranking reads 16-token chunks
        name, marks_fn = "torch", _marks_torch
    if name == "triton":
        marks, low = _marks_triton(cfg, q, side, bt, num_tiles, take_e, take_t, M, low_slots)
    else:
        marks = marks_fn(cfg, q, side, bt, num_tiles, take_e, take_t, M)  # [Rs, Hkv, M]
        low = _mask_tiles(marks == 2)
        if low_slots is not None:
            low = low[..., :low_slots]
    sel = select_tiles(torch.zeros(marks.shape, device=q.device), num_tiles, exact_budget,
                       sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles,
                       lsh_match=marks == 1, lsh_cap=M, impl=impl, num_slots=num_slots)
    return sel, low


def decode_two_tiers(cfg: PrescoreConfig, q: Tensor, key_cache: Tensor, value_cache: Tensor,
                     side: SideData, bt: Tensor, seq_lens: Tensor, num_tiles: Tensor,
                     exact_budget: Tensor, total_budget: Tensor, scale: float, *,
                     kv_layout: str = "strided", impl: str = "auto",
                     side_bt: Tensor | None = None, num_slots: int | None = None,
                     low_slots: int | None = None) -> tuple[Tensor, Tensor, Selection]:
    """Attention of sparse decode rows over both tiers: -> (out ``[Rs, Hq, D]`` fp32, bytes
    read ``[Rs, Hkv]`` fp64 in exact-KV-token units (low-bit tokens at :func:`low_token_cost`),
    the exact tier's :class:`Selection`).

    q ``[Rs, Hq, D]``; key_cache / value_cache ``[NB, Hkv, B, D]`` in ``kv_layout``; side: the
    layer's side data with its low-bit copy; bt ``[Rs, MB]`` int64; seq_lens ``[Rs]``;
    num_tiles, exact_budget, total_budget ``[Rs]`` int64; side_bt ``[Rs, MB]`` int64: the side
    data's block table where it differs from the cache's (the evaluation keeps one side-data
    range per scorer), default bt; num_slots, low_slots: :func:`select_two_tiers`'s."""
    sbt = bt if side_bt is None else side_bt
    sel, low = select_two_tiers(cfg, q, side, sbt, num_tiles, exact_budget, total_budget,
                                impl=impl, num_slots=num_slots, low_slots=low_slots)
    out = two_tier_decode(q, key_cache, value_cache, side.low, bt.int(), seq_lens.int(),
                          sel.tiles, low, cfg.tile_size, scale, kv_layout=kv_layout, impl=impl,
                          copy_block_tables=sbt)
    c = low_token_cost(cfg, q.shape[-1], key_cache.shape[2])
    read = (tokens_read(sel.tiles, seq_lens, cfg.tile_size).double()
            + c * tokens_read(low, seq_lens, cfg.tile_size).double())
    return out, read, sel
