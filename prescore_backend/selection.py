"""Select: the budget of each sparse decode row and the query-aware part of its selection.

Per decode step, for the rows a backend decodes sparsely:

* budgets - :func:`config_budget` (``keep_ratio`` or ``max_tokens``, the selection's own reads
  :func:`side_read_fraction` taken out), :func:`floor_budget`, :func:`query_caps`;
* the query-aware pick - :func:`query_aware_pick` ranks the tiles by an estimate of their
  largest q.k (Quest bounds, SparQ channels, PQ codes, the 4-bit key copy; LSH matches) and
  marks up to each row's cap; :func:`scores_and_pick` adds the rows' pre-scores;
* :func:`select_decode_tiles` - both, then :func:`~prescore_backend.kernels.select.select_tiles`
  (sinks + window + picks + best pre-scores up to the budget) and the optional HyperAttention
  residual. On CPU the backend runs the last two steps fused with the attention
  (:func:`~prescore_backend.kernels.select_decode.select_and_decode_into`).

The backends and the quality evaluation call the same functions. Nothing here imports vLLM.

Shapes: ``Rs`` sparse decode rows, ``Hq``/``Hkv`` query/KV heads, ``D`` head dim, ``B`` KV block
size, ``T`` tile size, ``M`` logical tiles per row (max blocks x B / T), ``W`` LSH mask words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from prescore_backend.config import PrescoreConfig
from prescore_backend.keycopy import scale_bytes_per_token, sparq4_tile_rank, top_channels
from prescore_backend.kernels.cpu_select import (cpu_pq_pick, cpu_quest_pick, cpu_sparq4_pick,
                                                 cpu_sparq_pick)
from prescore_backend.kernels.dispatch import resolve
from prescore_backend.kernels.layouts import amx_unpack_k
from prescore_backend.kernels.lsh import AngularLSH, bucket_masks, masks_intersect, num_words
from prescore_backend.kernels.select import Selection, residual_sample, select_tiles
from prescore_backend.kernels.select_decode import paged_tile_scores
from prescore_backend.pq import pq_tile_rank
from prescore_backend.side_data import SideData

__all__ = [
    "CHARGE_KV_BYTES",
    "config_budget",
    "floor_budget",
    "gather_tile_scores",
    "query_aware_pick",
    "query_caps",
    "ratio_budgets",
    "ratio_tiles",
    "scores_and_pick",
    "select_decode_tiles",
    "side_read_fraction",
    "sparq_channels",
    "sparq_tile_rank",
]


# ----------------------------------------------------------------------------- budgets


#: Bytes per cached element the budget charges side data (and low-bit tokens) against: a bf16
#: KV on every host (the evaluation's accounting), so one setting reads the same tiles on fp32
#: and bf16 hosts.
CHARGE_KV_BYTES = 2


def side_read_fraction(cfg: PrescoreConfig, head_dim: int, kv_bytes: int = 2,
                       block_size: int = 128) -> float:
    """Bytes of side data one decode step reads, per KV byte of the context, under ``cfg``.

    Every tile's side data is read each step: the pre-scores (4 bytes per tile and KV head,
    unless the query-aware part takes the whole budget), Quest's key bounds (2 x D per tile in
    the cache dtype: 1 / tile_size of the KV), the LSH bucket sets (8 bytes per mask word and
    tile), SparQ's key channels (query_channels of the 2 x D values per token), the 4-bit key copy
    (query_channels / 2 bytes per token, and each block's min and step of those channels).
    ``kv_bytes``: bytes per cached element; ``block_size``: tokens per KV block."""
    tile_kv = 2 * cfg.tile_size * head_dim * kv_bytes
    f = 0.0
    if cfg.reads_prescores:
        f += 4 / tile_kv  # the pre-scores (two tiers rank every tile by the estimate alone)
    if cfg.uses_bounds:
        f += 1 / cfg.tile_size
    if cfg.uses_lsh:
        f += 8 * num_words(cfg.lsh_bits) / tile_kv
    if cfg.uses_keys:
        f += cfg.ranking_channels(head_dim) / (2 * head_dim)
    if cfg.uses_codes:
        f += cfg.pq_subspaces / (2 * head_dim * kv_bytes)
    if cfg.uses_key_copy:  # 4-bit codes of the ranking's channels, their blocks' scales
        nc = cfg.ranking_channels(head_dim)
        per_token = nc / 2 + scale_bytes_per_token(nc, block_size)
        f += per_token / (2 * head_dim * kv_bytes)
    return f


def ratio_tiles(num_tiles: Tensor, ratio: float, side_fraction: float = 0.0) -> Tensor:
    """Tiles per (row, KV head) that read ``ratio`` of the KV bytes when the selection itself
    reads ``side_fraction`` (:func:`side_read_fraction`): ``[R]`` -> ``[R]`` int64,
    ceil(num_tiles * (ratio - side_fraction)); a ratio of 1 or more reads everything."""
    if ratio >= 1.0:
        return num_tiles.clone()
    return torch.ceil(num_tiles.double() * max(ratio - side_fraction, 0.0)).long()


def ratio_budgets(cfg: PrescoreConfig, num_tiles: Tensor, ratios: Tensor,
                  side_fraction: float = 0.0) -> tuple[Tensor, Tensor]:
    """Tiles per (row, KV head) at keep ratios ``ratios [R]`` (float64) and whether each row
    ranks (``[R]`` bool): :func:`ratio_tiles` with the selection's own reads
    (``side_fraction``) taken out, for the rows where that buys at least one tile beyond sinks
    and window. Where it does not (short contexts at small ratios), reading the ranking's side
    data would only shorten the window: with a config that reads no pre-scores
    (:attr:`PrescoreConfig.streams_without_room`, the default) such a row reads no side data
    and spends all of its ratio's bytes on tiles: the sinks and the most recent tiles (its
    unscored blocks' pre-scores are their positions, ``run_score_jobs(scores=False)``), i.e.
    StreamingLLM's selection at equal bytes. Other configs rank every row, as before."""
    n = num_tiles.double()
    full = ratios >= 1.0
    with_side = torch.where(full, n, torch.ceil(n * (ratios - side_fraction).clamp_min(0.0)))
    ranks = torch.ones_like(num_tiles, dtype=torch.bool)
    if cfg.streams_without_room and side_fraction > 0.0:
        ranks = with_side > cfg.sink_tiles + cfg.window_tiles
    budget = torch.where(ranks | full, with_side, torch.ceil(n * ratios))
    return budget.long(), ranks


def config_budget(cfg: PrescoreConfig, num_tiles: Tensor, side_fraction: float = 0.0) -> Tensor:
    """Tiles per (row, KV head) from the global budget settings: ``[R]`` -> ``[R]`` int64.

    ``max_tokens`` (rounded up to tiles) if set, else :func:`ratio_tiles` of keep_ratio with
    the selection's own reads (``side_fraction``) taken out of it.
    """
    if cfg.max_tokens > 0:
        return torch.full_like(num_tiles, -(-cfg.max_tokens // cfg.tile_size))
    return ratio_tiles(num_tiles, cfg.keep_ratio, side_fraction)


def floor_budget(cfg: PrescoreConfig, budget: Tensor) -> Tensor:
    """A budget never below sinks + window (those are always read): ``[R]`` -> ``[R]``."""
    return torch.maximum(budget, torch.full_like(budget, cfg.sink_tiles + cfg.window_tiles))


def query_caps(cfg: PrescoreConfig, budget: Tensor) -> Tensor:
    """Query-aware tiles per (row, KV head) at most, ``[R]``: floor(query_cap_ratio * budget),
    and never more than the budget left after sinks and window (picks beyond it could not be
    kept, and the selection would then choose among them by pre-score, not by their rank).

    Per row, so a request's split between query-aware and pre-scored tiles does not depend on
    the budgets of the other rows of its batch.
    """
    cap = (budget.double() * cfg.query_cap_ratio).floor().long()
    return torch.minimum(cap, (budget - cfg.sink_tiles - cfg.window_tiles).clamp_min(0))


# ----------------------------------------------------------------------------- selection


def sparq_channels(q: Tensor, num_kv_heads: int, channels: int) -> Tensor:
    """The key channels SparQ reads for each (row, KV head): ``[Rs, Hkv, channels]`` int64.

    q ``[Rs, Hq, D]``. The channels of largest |q| summed over the GQA group's heads, chosen
    in adjacent pairs (2p, 2p+1) by |q_2p| + |q_2p+1|: vLLM's packed "amx" K layout stores a
    pair of channels of 16 tokens in one cache line, so pairs cost the same bytes as single
    channels there (SparQ, arXiv 2312.04985, takes the top-r single channels per head; one set
    per KV head serves the whole group, as its keys are shared)."""
    rs, hq, d = q.shape
    mag = q.float().abs().view(rs, num_kv_heads, hq // num_kv_heads, d // 2, 2).sum((2, 4))
    top = mag.topk(min(channels, d) // 2, dim=-1).indices.sort(-1).values  # [Rs, Hkv, P]
    return torch.stack([2 * top, 2 * top + 1], -1).flatten(-2)


def sparq_tile_rank(q: Tensor, key_cache: Tensor, bt: Tensor, channels: int, tile_size: int,
                    *, kv_layout: str = "strided") -> Tensor:
    """Estimated max of q.k per tile: ``[Rs, Hkv, M]`` fp32, M = MB * B / T (plain torch).

    q ``[Rs, Hq, D]``; key_cache ``[NB, Hkv, B, D]`` (a strided view, or vLLM's packed "amx" K
    region with ``kv_layout="amx"``); bt ``[Rs, MB]`` int64. Per (row, KV head), the exact
    partial products of q and each key on :func:`sparq_channels`, max over the group's heads
    and the tile's tokens. Tokens past a row's length hold stale keys: callers rank only
    full tiles outside the window."""
    rs, hq, d = q.shape
    hkv, bs = key_cache.shape[1], key_cache.shape[2]
    ch = sparq_channels(q, hkv, channels)  # [Rs, Hkv, r]
    qg = q.float().view(rs, hkv, hq // hkv, d)
    qs = torch.gather(qg, 3, ch.unsqueeze(2).expand(-1, -1, hq // hkv, -1))  # [Rs, Hkv, G, r]
    if kv_layout == "amx":
        keys = amx_unpack_k(key_cache[bt.reshape(-1)]).view(rs, -1, hkv, bs, d)
        blk = torch.arange(bt.shape[1], device=q.device).view(1, -1, 1, 1, 1)
        rix = torch.arange(rs, device=q.device).view(-1, 1, 1, 1, 1)
    else:
        keys, blk, rix = key_cache, bt.view(rs, -1, 1, 1, 1), None
    h = torch.arange(hkv, device=q.device).view(1, 1, -1, 1, 1)
    t = torch.arange(bs, device=q.device).view(1, 1, 1, -1, 1)
    c = ch.view(rs, 1, hkv, 1, -1)
    idx = (blk, h, t, c) if rix is None else (rix, blk, h, t, c)
    ks = keys[idx].float()  # [Rs, MB, Hkv, B, r]: only the chosen channels are read
    ks = ks.permute(0, 2, 1, 3, 4).reshape(rs, hkv, -1, ch.shape[-1])  # [Rs, Hkv, N, r]
    est = torch.matmul(qs, ks.transpose(-1, -2)).amax(2)  # [Rs, Hkv, N]
    return est.view(rs, hkv, -1, tile_size).amax(-1)


@dataclass(frozen=True)
class _PickInputs:
    """What a ranking reads: q ``[Rs, Hq, D]``, bt / key_bt ``[Rs, MB]`` int64, tile_scores
    ``[Rs, Hkv, M]``, num_tiles and caps ``[Rs]``, LSH candidates ``[Rs, Hkv, M]`` bool or None,
    the KV cache's keys (SparQ) in ``kv_layout``."""

    cfg: PrescoreConfig
    q: Tensor
    side: SideData
    bt: Tensor
    tile_scores: Tensor
    num_tiles: Tensor
    caps: Tensor
    M: int
    cand: Tensor | None
    key_cache: Tensor | None
    key_bt: Tensor
    kv_layout: str

    @property
    def channels(self) -> int:
        """Key channels of the SparQ rankings (:meth:`PrescoreConfig.ranking_channels`)."""
        return self.cfg.ranking_channels(self.q.shape[-1])

    def slots(self) -> dict:
        c = self.cfg
        return dict(num_tile_slots=self.M, sink_tiles=c.sink_tiles, window_tiles=c.window_tiles)


@dataclass(frozen=True)
class Ranking:
    """One query-aware estimator of each tile's largest q.k. ``rank`` (torch, any device):
    the estimate ``[Rs, Hkv, M]``, the pick being its top caps[r] eligible tiles; ``cpp_pick``
    (CPU, optional): the same pick in one C++ call, reading the side data in place;
    ``triton_rank`` (GPU, optional): the estimate from a Triton kernel reading the side data
    through the block table (no gathered copy)."""

    rank: Callable[[_PickInputs], Tensor]
    cpp_pick: Callable[[_PickInputs], Tensor] | None = None
    triton_rank: Callable[[_PickInputs], Tensor] | None = None


def _quest_rank(x: _PickInputs) -> Tensor:
    """Quest (arXiv 2406.10774): the upper bound of q.k over the tile from its per-channel key
    min/max, max over the GQA group."""
    rs, hkv, d = x.q.shape[0], x.tile_scores.shape[1], x.q.shape[-1]
    qg = x.q.float().view(rs * hkv, -1, d)  # [Rs*Hkv, G, D]
    kmin = x.side.kmin[x.bt].permute(0, 2, 1, 3, 4).reshape(rs * hkv, x.M, d).float()
    kmax = x.side.kmax[x.bt].permute(0, 2, 1, 3, 4).reshape(rs * hkv, x.M, d).float()
    bound = (torch.bmm(qg.clamp_min(0), kmax.transpose(1, 2))
             + torch.bmm(qg.clamp_max(0), kmin.transpose(1, 2)))  # [Rs*Hkv, G, M]
    return bound.amax(1).view(rs, hkv, x.M)


def _quest_cpp(x: _PickInputs) -> Tensor:  # the bounds read through the block table in place
    return cpu_quest_pick(x.q, x.side.kmin, x.side.kmax, x.bt, x.num_tiles, x.caps,
                          candidates=x.cand, **x.slots())


def _sparq_rank(x: _PickInputs) -> Tensor:
    return sparq_tile_rank(x.q, x.key_cache, x.key_bt, x.channels, x.cfg.tile_size,
                           kv_layout=x.kv_layout)


def _sparq_cpp(x: _PickInputs) -> Tensor:
    return cpu_sparq_pick(x.q, x.key_cache, x.key_bt, x.num_tiles, x.caps,
                          channels=x.channels, tile_size=x.cfg.tile_size,
                          kv_layout=x.kv_layout, **x.slots())


def _sparq4_rank(x: _PickInputs) -> Tensor:
    return sparq4_tile_rank(x.q, x.side.kq, x.side.kz, x.bt, x.channels, x.cfg.tile_size)


def _sparq4_cpp(x: _PickInputs) -> Tensor:
    return cpu_sparq4_pick(x.q, x.side.kq, x.side.kz, x.bt, x.num_tiles, x.caps,
                           channels=x.channels, tile_size=x.cfg.tile_size, **x.slots())


def _sparq4_triton(x: _PickInputs) -> Tensor:
    from prescore_backend.kernels.triton_sparq4 import triton_sparq4_tile_rank

    ch = top_channels(x.q, x.side.kq.shape[1], x.channels)  # [Rs, Hkv, NC]
    return triton_sparq4_tile_rank(x.q, x.side.kq, x.side.kz, x.bt, ch, x.cfg.tile_size)


def _pq_rank(x: _PickInputs) -> Tensor:
    return pq_tile_rank(x.q, x.side.codes, x.bt, x.side.codebook, x.cfg.tile_size)


def _pq_cpp(x: _PickInputs) -> Tensor:
    book = x.side.codebook
    return cpu_pq_pick(x.q, x.side.codes, x.bt, book.centroids_t, book.dims, x.num_tiles,
                       x.caps, tile_size=x.cfg.tile_size, **x.slots())


#: ``query_aware`` mode -> its ranking ("lsh" ranks its bucket matches by pre-score).
RANKINGS: dict[str, Ranking] = {
    "quest": Ranking(_quest_rank, _quest_cpp),
    "lsh_quest": Ranking(_quest_rank, _quest_cpp),
    "lsh": Ranking(lambda x: x.tile_scores.clone()),
    "sparq": Ranking(_sparq_rank, _sparq_cpp),
    "sparq4": Ranking(_sparq4_rank, _sparq4_cpp, _sparq4_triton),
    "pq": Ranking(_pq_rank, _pq_cpp),
}
_PICK_IMPLS = {"cpp": "cpp", "torch": "torch", "triton": "triton"}


def query_aware_pick(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                     tile_scores: Tensor, num_tiles: Tensor, caps: Tensor, *,
                     lsh: AngularLSH | None, impl: str = "auto", key_cache: Tensor | None = None,
                     key_bt: Tensor | None = None, kv_layout: str = "strided",
                     max_cap: int | None = None, caps_uniform: bool | None = None) -> Tensor | None:
    """Tiles the query-aware part picks: ``[Rs, Hkv, M]`` bool, at most ``caps[r]`` per row.

    q ``[Rs, Hq, D]``; bt ``[Rs, MB]`` int64 block table; tile_scores ``[Rs, Hkv, M]``
    pre-scores; num_tiles ``[Rs]``; caps ``[Rs]`` int64. Eligible: tiles that are neither
    sinks nor window. ``lsh``/``lsh_quest``: tiles whose LSH bucket set meets the query
    group's buckets; ``quest``/``lsh_quest``: ranked by the Quest upper bound of q.k (max over
    the GQA group), ``lsh`` alone ranks its matches by pre-score. None when the part is off.
    ``sparq``: ranked by :func:`sparq_tile_rank` on the KV cache (key_cache ``[NB, Hkv, B, D]``
    in ``kv_layout``, read through key_bt ``[Rs, MB]``, default bt). ``pq``: ranked by
    :func:`prescore_backend.pq.pq_tile_rank` on the side data's per-token codes. ``sparq4``:
    :func:`prescore_backend.keycopy.sparq4_tile_rank` on the side data's 4-bit key copy of the
    full blocks.
    ``impl``: "cpp" ranks Quest bounds and SparQ estimates in C++ (CPU), "torch" with batched
    matmuls, "triton" the sparq4 estimate in a Triton kernel (the others in torch), "auto"
    picks triton on CUDA and cpp on CPU when it compiles. ``max_cap`` (= caps.max()) and
    ``caps_uniform`` (every cap equals it), when the caller knows them on the host, spare
    the torch path two host syncs.
    """
    rs, hkv, M = tile_scores.shape
    cap = max_cap if max_cap is not None else int(caps.max()) if rs else 0
    if cfg.query_aware == "none" or cap == 0:
        return None
    ranking = RANKINGS[cfg.query_aware]
    impl, _ = resolve("query_aware_pick", impl, q, _PICK_IMPLS)
    cand = None
    if cfg.uses_lsh:  # HyperAttention: the query's buckets (union over the group)
        qmask = bucket_masks(lsh.hash(q).view(rs, hkv, -1), cfg.lsh_bits)  # [Rs, Hkv, W]
        tmask = side.masks[bt].permute(0, 2, 1, 3, 4).reshape(rs, hkv, M, -1)
        cand = masks_intersect(tmask, qmask.unsqueeze(2))  # [Rs, Hkv, M]
    x = _PickInputs(cfg, q, side, bt, tile_scores, num_tiles, caps, M, cand,
                    key_cache, bt if key_bt is None else key_bt, kv_layout)
    if impl == "cpp" and ranking.cpp_pick is not None:
        return ranking.cpp_pick(x)
    use_triton = impl == "triton" and ranking.triton_rank is not None
    rank = (ranking.triton_rank if use_triton else ranking.rank)(x)  # [Rs, Hkv, M]
    idx = torch.arange(M, device=q.device)
    n = num_tiles.view(rs, 1, 1)
    elig = (idx < n) & (idx >= cfg.sink_tiles) & (idx < n - cfg.window_tiles)
    if cand is not None:
        elig = elig & cand
    rank = rank.masked_fill(~elig, float("-inf"))
    top = rank.topk(min(cap, M), dim=-1)  # [Rs, Hkv, k], best first
    ok = torch.isfinite(top.values)
    ragged = not caps_uniform if caps_uniform is not None else bool((caps != cap).any())
    if ragged:  # rows with a smaller cap keep only their best caps[r]
        ok &= (torch.arange(top.values.shape[-1], device=q.device)
               < caps.view(rs, hkv if caps.dim() == 2 else 1, 1))
    pick = torch.zeros(rs, hkv, M, dtype=torch.bool, device=q.device)
    return pick.scatter_(-1, top.indices, ok)


def scores_and_pick(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                    num_tiles: Tensor, caps: Tensor, *, lsh: AngularLSH | None = None,
                    impl: str = "auto", **keys) -> tuple[Tensor, Tensor | None]:
    """The selection's inputs: each row's tile pre-scores ``[Rs, Hkv, M]`` (gathered through
    the block table bt ``[Rs, MB]`` int64) and the query-aware pick (:func:`query_aware_pick`,
    ``[Rs, Hkv, M]`` bool or None; ``keys``: its key_cache, key_bt, kv_layout, max_cap,
    caps_uniform)."""
    scores = gather_tile_scores(side, bt)  # [Rs, Hkv, M]
    pick = query_aware_pick(cfg, q, side, bt, scores, num_tiles, caps, lsh=lsh, impl=impl,
                            **keys)
    return scores, pick


def gather_tile_scores(side: SideData, bt: Tensor) -> Tensor:
    """Each row's tile pre-scores in logical order: bt ``[Rs, MB]`` int64 -> ``[Rs, Hkv, M]``,
    M = MB * tiles_per_block."""
    return paged_tile_scores(side.scores, bt)


def select_decode_tiles(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                        num_tiles: Tensor, budget: Tensor, caps: Tensor, *,
                        lsh: AngularLSH | None = None,
                        generator: torch.Generator | None = None, impl: str = "auto",
                        **keys) -> tuple[Selection, Tensor | None, Tensor | None]:
    """The tiles each sparse decode row attends: sinks + window + query-aware pick + pre-scores.

    q ``[Rs, Hq, D]``; bt ``[Rs, MB]`` int64 block table; num_tiles ``[Rs]`` int64 logical
    tiles (the partial last one included); budget ``[Rs]`` int64 tiles per (row, KV head),
    at least sinks + window; caps ``[Rs]`` int64 query-aware tiles at most (:func:`query_caps`).
    Returns the :class:`~prescore_backend.kernels.select.Selection` and, with ``residual_tiles > 0``,
    HyperAttention's residual sample (tiles ``[Rs, Hkv, m]``, weight ``[Rs, Hkv]``) for
    :func:`~prescore_backend.kernels.sparse_decode.sparse_decode`, else (None, None).
    ``impl`` ("auto", "cpp", "torch") chooses the selection code (:func:`select_tiles`).
    ``keys``: key_cache, key_bt, kv_layout for ``query_aware="sparq"`` (:func:`query_aware_pick`).
    """
    scores, pick = scores_and_pick(cfg, q, side, bt, num_tiles, caps, lsh=lsh, impl=impl,
                                   **keys)
    sel = select_tiles(scores, num_tiles, budget, sink_tiles=cfg.sink_tiles,
                       window_tiles=cfg.window_tiles, lsh_match=pick,
                       lsh_cap=int(caps.max()) if pick is not None else 0, impl=impl)
    if cfg.residual_tiles > 0:
        res_tiles, res_w = residual_sample(sel.tiles, num_tiles, cfg.residual_tiles,
                                           generator=generator)
        return sel, res_tiles, res_w
    return sel, None, None
