"""Fused CPU tile selection and query-aware picks (C++: ``csrc/select.h``, ``csrc/picks.h``).

The torch version of :func:`prescore_backend.kernels.select.select_tiles` is ~20 tensor ops per
layer (top-k, scatters, a sort), which cost as much as reading the selected tiles
(docs/cpu-kernels.md). Here one task per (row, KV head) does the same in O(M) with
a branch-free top-k (the k-th largest score built bit by bit by vectorized counting passes
over order-preserving integer keys, then a vectorized pass marking the keys above it and a scan
for the ties, lower index first) and writes the ascending tile list directly.

* :func:`cpu_select_tiles` implements exactly the rules of ``select_tiles_ref`` (sinks and
  window first, most recent window tiles first when the budget is smaller; then up to
  ``lsh_cap`` query-aware matches by pre-score; then pre-scores; ties to the lower index; NaN
  pre-scores count as -inf), so it is checked against the loop oracle tile for tile.
* :func:`cpu_quest_pick` ranks each row's eligible tiles (neither sink nor window, optionally
  an LSH candidate) by the Quest upper bound of q.k, max over the GQA group (Tang et al.,
  "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024), reading
  the per-tile key bounds through the block table in place instead of gathering them, and marks
  the best ``caps[r]`` (ties to the lower index).

Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpu_ext import extension as _ext

__all__ = ["cpu_pq_pick", "cpu_quest_pick", "cpu_select_tiles", "cpu_sparq4_pick",
           "cpu_sparq4_tiers_pick", "cpu_sparq_pick"]


def cpu_select_tiles(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, sink_tiles: int,
                     window_tiles: int, lsh_match: Tensor | None = None,
                     lsh_cap: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``select_tiles`` in C++ (same arguments): returns tiles ``[R, Hkv, S]`` int32 ascending
    (-1 padded), num_selected ``[R, Hkv]`` int32 and source counts ``[4]`` int64."""
    return tuple(_ext().select_tiles_cpu(tile_scores, num_tiles, budget, int(sink_tiles),
                                         int(window_tiles), lsh_match, int(lsh_cap)))


def _i64(t: Tensor) -> Tensor:
    """t as contiguous int64 (itself when it already is: no dispatcher call on the hot path)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.long().contiguous()


def cpu_sparq_pick(q: Tensor, key_cache: Tensor, block_tables: Tensor, num_tiles: Tensor,
                   caps: Tensor, *, num_tile_slots: int, channels: int, tile_size: int,
                   sink_tiles: int, window_tiles: int, kv_layout: str = "strided") -> Tensor:
    """SparQ pick per (row, KV head): ``[R, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[R, Hq, D]``; key_cache ``[NB, Hkv, B, D]`` (any strides; with ``kv_layout="amx"``
    vLLM's packed K region); block_tables ``[R, MB]``; num_tiles, caps ``[R]``; channels: how
    many (the pairs of ``decode.sparq_channels``, chosen in the call). A tile's estimate is
    the max over its tokens and the group's heads of q.k on those channels, read from the
    cache in place; eligible: index in [sink_tiles, num_tiles - window_tiles). The same picks
    as ranking ``decode.sparq_tile_rank`` (ties to the lower index)."""
    return _ext().sparq_pick_cpu(
        q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous(),
        key_cache, _i64(block_tables),
        _i64(num_tiles), _i64(caps), int(channels), int(num_tile_slots), int(tile_size), int(sink_tiles),
        int(window_tiles), kv_layout == "amx")


def cpu_sparq4_pick(q: Tensor, kq: Tensor, kz: Tensor, block_tables: Tensor,
                    num_tiles: Tensor, caps: Tensor, *, num_tile_slots: int, channels: int,
                    tile_size: int, sink_tiles: int, window_tiles: int) -> Tensor:
    """SparQ pick on the 4-bit key copy per (row, KV head): ``[R, Hkv, M]`` bool, at most
    ``caps[r]`` per row.

    q ``[R, Hq, D]``; kq ``[NB, Hkv, D, B/2]`` uint8 (one run of B/2 bytes per channel; in a
    16-token chunk byte i holds token i low and token i + 8 high) and kz ``[NB, Hkv, 2, D]``
    fp32 (each block's min and step: code c stands for min + c * step); block_tables
    ``[R, MB]``; num_tiles, caps ``[R]``; channels: how many (the group's largest |q|, chosen in
    the call). A tile's estimate is the max over its tokens and the group's heads; eligible:
    index in [sink_tiles, num_tiles - window_tiles). The same picks as ranking with
    ``prescore_backend.keycopy.sparq4_tile_rank`` (ties to the lower index)."""
    return _ext().sparq4_pick_cpu(
        q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous(),
        kq.contiguous(), kz.float().contiguous(), _i64(block_tables), _i64(num_tiles),
        _i64(caps), int(channels), int(num_tile_slots), int(tile_size), int(sink_tiles),
        int(window_tiles))


def cpu_sparq4_tiers_pick(q: Tensor, kq: Tensor, kz: Tensor, block_tables: Tensor,
                          num_tiles: Tensor, take_exact: Tensor, take_total: Tensor, *,
                          num_tile_slots: int, channels: int, tile_size: int, sink_tiles: int,
                          window_tiles: int) -> Tensor:
    """Two precision tiers from one sparq4 ranking (arguments as :func:`cpu_sparq4_pick`):
    ``[R, Hkv, M]`` uint8, 2 = the best ``take_total[r]`` eligible tiles, 1 = the best
    ``take_exact[r]`` of them (a subset: same order, ties to the lower index); sinks and
    window are not eligible and stay 0."""
    return _ext().sparq4_tiers_pick_cpu(
        q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous(),
        kq.contiguous(), kz.float().contiguous(), _i64(block_tables), _i64(num_tiles),
        _i64(take_exact), _i64(take_total), int(channels), int(num_tile_slots),
        int(tile_size), int(sink_tiles), int(window_tiles))


def cpu_pq_pick(q: Tensor, codes: Tensor, block_tables: Tensor, centroids: Tensor,
                dims: Tensor, num_tiles: Tensor, caps: Tensor, *, num_tile_slots: int,
                tile_size: int, sink_tiles: int, window_tiles: int) -> Tensor:
    """PQ pick per (row, KV head): ``[R, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[R, Hq, D]``; codes ``[NB, Hkv, B, m]`` uint8; block_tables ``[R, MB]``; centroids
    transposed ``[Hkv, m, d, C]`` (``LayerCodebook.centroids_t``) over the channels ``dims
    [m, d]`` of each subspace; num_tiles, caps ``[R]``. The same picks as ranking with
    ``prescore_backend.pq.pq_tile_rank`` (ties to the lower index); eligible: index in
    [sink_tiles, num_tiles - window_tiles)."""
    return _ext().pq_pick_cpu(q, codes, block_tables, centroids, dims, num_tiles, caps,
                              int(num_tile_slots), int(tile_size), int(sink_tiles),
                              int(window_tiles))


def cpu_quest_pick(q: Tensor, kmin: Tensor, kmax: Tensor, block_tables: Tensor,
                   num_tiles: Tensor, caps: Tensor, *, num_tile_slots: int, sink_tiles: int,
                   window_tiles: int, candidates: Tensor | None = None) -> Tensor:
    """Quest pick per (row, KV head): ``[R, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[R, Hq, D]``; kmin/kmax ``[num_blocks, Hkv, tiles_per_block, D]`` per-tile key bounds;
    block_tables ``[R, MB]``; num_tiles ``[R]`` logical tiles (the last may be partial); caps
    ``[R]``; num_tile_slots M; candidates ``[R, Hkv, M]`` bool (LSH matches) or None. Eligible:
    index in [sink_tiles, num_tiles - window_tiles), a candidate if given, finite bound.
    """
    cand = (candidates.to(torch.bool).contiguous() if candidates is not None
            else torch.empty(0, dtype=torch.bool))
    return _ext().quest_pick_cpu(
        q.float().contiguous(), kmin.contiguous(), kmax.contiguous(),
        block_tables.long().contiguous(), num_tiles.long().contiguous(), caps.long().contiguous(),
        cand, int(num_tile_slots), int(sink_tiles), int(window_tiles))
