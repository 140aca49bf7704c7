"""The vLLM-independent core of PRESCORE's decode path: side data, scoring jobs, selection.

:mod:`prescore_backend.backends.cpu` calls these functions on vLLM's paged cache; the quality
evaluation (``bench/eval_quality.py``) calls the same functions on a paged cache of its own, so
what it measures is what the backend does. Nothing here imports vLLM.

Per layer, beside the KV cache, :class:`SideData` holds for every physical KV block a pre-score
per (block, KV head, tile) and what the query-aware part needs (per-tile key min/max for Quest,
LSH bucket bitmasks for HyperAttention). Its life cycle (the rules are in the backend's module
docstring):

* :func:`record_decode_tokens` - per-token data of decode keys just written;
* :func:`run_score_jobs` - per :class:`ScoreJob` (a prefill chunk, or a decode row that just
  filled a block): every KV block that became full is scored with ``Scorer.score_prefixes`` on
  the keys up to its end, aggregated per tile; prefill chunks also record per-token data
  (:func:`record_chunk_tokens`);
* :func:`select_decode_tiles` - per decode step: budgets from :func:`config_budget` and
  :func:`query_caps`, the query-aware pick (:func:`query_aware_pick`), then
  :func:`prescore_backend.selection.select_tiles` and the optional HyperAttention residual.

Shapes: ``Rs`` sparse decode rows, ``Hq``/``Hkv`` query/KV heads, ``D`` head dim, ``B`` KV block
size, ``T`` tile size, ``M`` logical tiles per row (max blocks x B / T), ``W`` LSH mask words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn.functional import pad

from prescore_backend.config import PrescoreConfig
from prescore_backend.kernels.cpu_select import (cpu_pq_pick, cpu_quest_pick, cpu_sparq4_pick,
                                                 cpu_sparq_pick)
from prescore_backend.kernels.cpu_side import cpu_record_bounds, cpu_record_codes
from prescore_backend.kernels.cpu_sparse_decode import available as cpu_kernels_available
from prescore_backend.kernels.layouts import amx_unpack_k
from prescore_backend.kernels.lsh import AngularLSH, bucket_masks, masks_intersect, num_words
from prescore_backend.keycopy import pack_blocks, scale_bytes_per_token, sparq4_tile_rank
from prescore_backend.pq import LayerCodebook, pq_encode, pq_tile_rank
from prescore_backend.scoring import Scorer
from prescore_backend.selection import (  # tokens_read: re-exported
    Selection,
    aggregate_tiles,
    residual_sample,
    select_tiles,
    tokens_read,
)

__all__ = [
    "ScoreJob",
    "SideData",
    "config_budget",
    "ratio_tiles",
    "side_read_fraction",
    "floor_budget",
    "query_caps",
    "record_decode_tokens",
    "record_codes",
    "run_score_jobs",
    "record_chunk_tokens",
    "query_aware_pick",
    "sparq_channels",
    "sparq_tile_rank",
    "gather_tile_scores",
    "scores_and_pick",
    "select_decode_tiles",
    "tokens_read",
]


# ----------------------------------------------------------------------------- side data


@dataclass
class SideData:
    """Per-layer tile data beside the KV cache, one entry per physical block.

    Only the parts the configured selection needs are allocated.
    """

    scores: Tensor  # [num_blocks, Hkv, tiles_per_block] fp32, -inf = not scored yet
    masks: Tensor | None  # [num_blocks, Hkv, tiles_per_block, W] int64 LSH bucket bitmask
    kmin: Tensor | None  # [num_blocks, Hkv, tiles_per_block, D] cache dtype, per-tile key min
    kmax: Tensor | None  # [num_blocks, Hkv, tiles_per_block, D] cache dtype, per-tile key max
    codes: Tensor | None = None  # [num_blocks, Hkv, B, m] uint8 per-token PQ codes
    codebook: LayerCodebook | None = None  # this layer's PQ codebook
    kq: Tensor | None = None  # [num_blocks, Hkv, D, B/2] uint8 4-bit key copy (keycopy.py)
    kz: Tensor | None = None  # [num_blocks, Hkv, 2, D] fp32 its per-block min and step

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, tiles_per_block: int, *,
                 lsh_words: int = 0, head_dim: int = 0,
                 dtype: torch.dtype = torch.float32, block_size: int = 0,
                 codebook: LayerCodebook | None = None, key_copy_dim: int = 0,
                 device: torch.device | str = "cpu") -> "SideData":
        """``head_dim`` > 0: Quest bounds; ``codebook`` (with ``block_size``; on ``device``):
        PQ codes; ``key_copy_dim`` > 0 (the head dim, with ``block_size``): the 4-bit key
        copy. Everything on ``device`` (the KV cache's)."""
        shape = (num_blocks, num_kv_heads, tiles_per_block)
        bounds = head_dim > 0
        codes = kq = kz = None
        u8 = dict(dtype=torch.uint8, device=device)
        if codebook is not None:
            codes = torch.zeros((num_blocks, num_kv_heads, block_size, codebook.subspaces), **u8)
        if key_copy_dim:
            kq = torch.zeros((num_blocks, num_kv_heads, key_copy_dim, block_size // 2), **u8)
            kz = torch.zeros((num_blocks, num_kv_heads, 2, key_copy_dim), device=device)
        return cls(
            scores=torch.full(shape, float("-inf"), device=device),
            masks=(torch.zeros((*shape, lsh_words), dtype=torch.int64, device=device)
                   if lsh_words else None),
            kmin=torch.zeros((*shape, head_dim), dtype=dtype, device=device) if bounds else None,
            kmax=torch.zeros((*shape, head_dim), dtype=dtype, device=device) if bounds else None,
            codes=codes, codebook=codebook, kq=kq, kz=kz)

    def bytes_per_token(self, block_size: int) -> float:
        parts = [t for t in (self.scores, self.masks, self.kmin, self.kmax, self.codes, self.kq,
                             self.kz) if t is not None]
        return sum(t[0].numel() * t.element_size() for t in parts) / block_size

    @property
    def tiles_per_block(self) -> int:
        return self.scores.shape[2]


@dataclass
class ScoreJob:
    """Side-data work for one row's tokens written this step (prefill chunk or decode)."""

    block_ids: Tensor  # [ceil(seq_len / B)] int64 physical blocks of the row, in order
    seq_len: int
    first_pos: int  # first position written this step
    per_token: bool  # record per-token side data of [first_pos, seq_len) (prefill chunks)
    blocks_done: tuple[int, int]  # logical blocks [b0, b1) that became full: score them
    method: str | None = None  # the request's prescore_method control, if any


# ----------------------------------------------------------------------------- budgets


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
    if cfg.query_cap_ratio < 1.0 or cfg.query_aware == "none":
        f += 4 / tile_kv
    if cfg.uses_bounds:
        f += 1 / cfg.tile_size
    if cfg.uses_lsh:
        f += 8 * num_words(cfg.lsh_bits) / tile_kv
    if cfg.uses_keys:
        f += cfg.query_channels / (2 * head_dim)
    if cfg.uses_codes:
        f += cfg.pq_subspaces / (2 * head_dim * kv_bytes)
    if cfg.uses_key_copy:  # 4-bit codes of query_channels channels, their blocks' scales
        per_token = cfg.query_channels / 2 + scale_bytes_per_token(cfg.query_channels, block_size)
        f += per_token / (2 * head_dim * kv_bytes)
    return f


def ratio_tiles(num_tiles: Tensor, ratio: float, side_fraction: float = 0.0) -> Tensor:
    """Tiles per (row, KV head) that read ``ratio`` of the KV bytes when the selection itself
    reads ``side_fraction`` (:func:`side_read_fraction`): ``[R]`` -> ``[R]`` int64,
    ceil(num_tiles * (ratio - side_fraction)); a ratio of 1 or more reads everything."""
    if ratio >= 1.0:
        return num_tiles.clone()
    return torch.ceil(num_tiles.double() * max(ratio - side_fraction, 0.0)).long()


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


# ----------------------------------------------------------------------------- recording


def record_decode_tokens(side: SideData, keys: Tensor, block: Tensor, tile: Tensor,
                         reset: Tensor, *, lsh: AngularLSH | None, lsh_bits: int,
                         impl: str = "auto") -> None:
    """Per-token side data of decode keys just written (one token per row and tile).

    keys ``[Nk, Hkv, D]``; block ``[Nk]`` int64 physical block; tile ``[Nk]`` int64 tile inside
    the block; reset ``[Nk]`` bool: the token starts its tile (its data replaces the tile's).
    A tile begun by a decode token is unscored until its block is full. ``impl``: "cpp"
    updates scores and key bounds in one C++ pass (CPU), "torch" with indexing ops, "auto"
    picks cpp on CPU when it compiles.
    """
    if keys.shape[0] == 0:
        return
    if impl == "auto":
        impl = "cpp" if not keys.is_cuda and cpu_kernels_available() else "torch"
    if impl == "cpp":  # scores and Quest bounds in one C++ pass; LSH masks below in torch
        cpu_record_bounds(keys, block, tile, reset, side.scores, side.kmin, side.kmax)
    else:  # where, not a boolean index: no host sync on a GPU
        side.scores[block, :, tile] = side.scores[block, :, tile].masked_fill(
            reset.view(-1, 1), float("-inf"))
    r3 = reset.view(-1, 1, 1)
    if side.masks is not None:
        new = bucket_masks(lsh.hash(keys).unsqueeze(-1), lsh_bits)  # [Nk, Hkv, W]
        old = side.masks[block, :, tile]  # [Nk, Hkv, W]
        side.masks[block, :, tile] = torch.where(r3, new, old | new)
    if side.kmin is not None and impl != "cpp":
        kk = keys.to(side.kmin.dtype)
        side.kmin[block, :, tile] = torch.where(r3, kk, torch.minimum(side.kmin[block, :, tile], kk))
        side.kmax[block, :, tile] = torch.where(r3, kk, torch.maximum(side.kmax[block, :, tile], kk))


def record_codes(side: SideData, keys: Tensor, block: Tensor, offset: Tensor, *,
                 impl: str = "auto") -> None:
    """PQ codes of keys just written (prefill and decode alike): keys ``[N, Hkv, D]`` at
    physical block ``[N]`` int64, offset in the block ``[N]`` int64. A code depends on its key
    only, so this is the whole life cycle of the codes. ``impl``: "cpp" encodes and writes in
    one C++ pass (CPU), "torch" with :func:`~prescore_backend.pq.pq_encode`, "auto" picks cpp
    on CPU when it compiles."""
    if side.codes is None or keys.shape[0] == 0:
        return
    if impl == "auto":
        impl = "cpp" if not keys.is_cuda and cpu_kernels_available() else "torch"
    book = side.codebook
    if impl == "cpp":
        cpu_record_codes(keys, block, offset, side.codes, book.dims, book.enc_w, book.enc_ct,
                         book.enc_cn)
    else:
        side.codes[block, :, offset] = pq_encode(keys, book)


def run_score_jobs(side: SideData, jobs: list[ScoreJob], key_cache: Tensor, *,
                   scorer_for: Callable[[str | None], Scorer], tile_size: int, aggregate: str,
                   lsh: AngularLSH | None, lsh_bits: int, kv_layout: str = "strided") -> None:
    """Score the blocks each job filled (and write their 4-bit key copy) and record its
    per-token data.

    key_cache ``[num_blocks, Hkv, B, D]`` (any strides; with ``kv_layout="amx"`` vLLM's packed K
    region, unpacked per job). ``scorer_for(job.method)`` gives the
    scorer of a job (``None``: the configured one). A full block's scores come from a fit on
    every key of the sequence up to the block's end (``Scorer.score_prefixes``), aggregated
    per tile; tiles the job wrote in the incomplete last block are set unscored (-inf).
    """
    T = tile_size
    _, hkv, bs, d = key_cache.shape
    tpb = bs // T
    for job in jobs:
        s = job.seq_len
        keys = key_cache[job.block_ids]  # [nblk, Hkv, B, D]
        if kv_layout == "amx":
            keys = amx_unpack_k(keys)
        keys = keys.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :s]  # [Hkv, s, D]
        b0, b1 = job.blocks_done
        if b1 > b0:  # full blocks: final scores, fitted on the prefix up to each block end
            ends = [(b + 1) * bs for b in range(b0, b1)]
            ks = scorer_for(job.method).score_prefixes(keys.float(), b0 * bs, ends, grain=bs)
            tiles = aggregate_tiles(ks, T, aggregate)  # [Hkv, (b1 - b0) * tpb]
            side.scores[job.block_ids[b0:b1]] = tiles.view(hkv, b1 - b0, tpb).transpose(0, 1)
            if side.kq is not None:  # the 4-bit key copy: per block, once it is full
                full = keys[:, b0 * bs:b1 * bs].reshape(hkv, b1 - b0, bs, d).transpose(0, 1)
                side.kq[job.block_ids[b0:b1]], side.kz[job.block_ids[b0:b1]] = pack_blocks(full)
        if s > b1 * bs:  # tiles this step wrote in the incomplete last block: unscored
            t = torch.arange(max(b1 * bs, job.first_pos) // T, (s + T - 1) // T,
                             device=keys.device)
            side.scores[job.block_ids[(t * T) // bs], :, t % tpb] = float("-inf")
        if job.per_token:
            record_chunk_tokens(side, job, keys, tile_size=T, lsh=lsh, lsh_bits=lsh_bits)


def record_chunk_tokens(side: SideData, job: ScoreJob, keys: Tensor, *, tile_size: int,
                        lsh: AngularLSH | None, lsh_bits: int) -> None:
    """Per-token side data (LSH bits, key bounds) of the tiles a prefill chunk touched.

    keys ``[Hkv, seq_len, D]``: the row's keys from position 0 (the first touched tile's
    earlier keys are included in its data).
    """
    T, s = tile_size, job.seq_len
    hkv, _, d = keys.shape
    t_lo, t_hi = job.first_pos // T, (s + T - 1) // T
    seg = keys[:, t_lo * T:]  # [Hkv, L, D]
    npad = (t_hi - t_lo) * T - seg.shape[1]
    t = torch.arange(t_lo, t_hi, device=keys.device)
    bs = side.tiles_per_block * T
    blk, j = job.block_ids[(t * T) // bs], t % (bs // T)
    valid = torch.ones(hkv, seg.shape[1], dtype=torch.bool, device=keys.device)
    valid = pad(valid, (0, npad)).view(hkv, -1, T)  # [Hkv, nt, T]
    if side.masks is not None:
        buckets = pad(lsh.hash(seg), (0, npad))  # [Hkv, nt*T]
        m = bucket_masks(buckets.view(hkv, -1, T), lsh_bits, valid=valid)  # [Hkv, nt, W]
        side.masks[blk, :, j] = m.transpose(0, 1)
    if side.kmin is not None:
        x = pad(seg.float(), (0, 0, 0, npad)).view(hkv, -1, T, d)
        v4 = valid.unsqueeze(-1)  # [Hkv, nt, T, 1]
        kmin = x.masked_fill(~v4, float("inf")).amin(2)  # [Hkv, nt, D]
        kmax = x.masked_fill(~v4, float("-inf")).amax(2)
        side.kmin[blk, :, j] = kmin.transpose(0, 1).to(side.kmin.dtype)
        side.kmax[blk, :, j] = kmax.transpose(0, 1).to(side.kmax.dtype)


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
    matmuls, "auto" picks cpp on CPU when it compiles. ``max_cap`` (= caps.max()) and
    ``caps_uniform`` (every cap equals it), when the caller knows them on the host, spare
    the torch path two host syncs.
    """
    if impl == "auto":
        impl = "cpp" if not q.is_cuda and cpu_kernels_available() else "torch"
    rs, hkv, M = tile_scores.shape
    cap = max_cap if max_cap is not None else int(caps.max()) if rs else 0
    if cfg.query_aware == "none" or cap == 0:
        return None
    cand = None
    if cfg.uses_lsh:  # HyperAttention: the query's buckets (union over the group)
        qmask = bucket_masks(lsh.hash(q).view(rs, hkv, -1), cfg.lsh_bits)  # [Rs, Hkv, W]
        tmask = side.masks[bt].permute(0, 2, 1, 3, 4).reshape(rs, hkv, M, -1)
        cand = masks_intersect(tmask, qmask.unsqueeze(2))  # [Rs, Hkv, M]
    if cfg.uses_bounds and impl == "cpp":
        # Quest in C++: the bounds are read through the block table in place (no gather)
        return cpu_quest_pick(q, side.kmin, side.kmax, bt, num_tiles, caps, num_tile_slots=M,
                              sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles,
                              candidates=cand)
    if cfg.uses_keys:
        kbt = bt if key_bt is None else key_bt
        if impl == "cpp":
            return cpu_sparq_pick(q, key_cache, kbt, num_tiles, caps, num_tile_slots=M,
                                  channels=cfg.query_channels,
                                  tile_size=cfg.tile_size, sink_tiles=cfg.sink_tiles,
                                  window_tiles=cfg.window_tiles, kv_layout=kv_layout)
        rank = sparq_tile_rank(q, key_cache, kbt, cfg.query_channels, cfg.tile_size,
                               kv_layout=kv_layout)
    elif cfg.uses_key_copy:
        if impl == "cpp":
            return cpu_sparq4_pick(q, side.kq, side.kz, bt, num_tiles, caps,
                                   num_tile_slots=M, channels=cfg.query_channels,
                                   tile_size=cfg.tile_size, sink_tiles=cfg.sink_tiles,
                                   window_tiles=cfg.window_tiles)
        rank = sparq4_tile_rank(q, side.kq, side.kz, bt, cfg.query_channels, cfg.tile_size)
    elif cfg.uses_codes:
        if impl == "cpp":
            return cpu_pq_pick(q, side.codes, bt, side.codebook.centroids_t, side.codebook.dims,
                               num_tiles, caps,
                               num_tile_slots=M, tile_size=cfg.tile_size,
                               sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles)
        rank = pq_tile_rank(q, side.codes, bt, side.codebook, cfg.tile_size)
    elif cfg.uses_bounds:  # Quest: upper bound of q.k over the tile, max over the group
        d = q.shape[-1]
        qg = q.float().view(rs * hkv, -1, d)  # [Rs*Hkv, G, D]
        kmin = side.kmin[bt].permute(0, 2, 1, 3, 4).reshape(rs * hkv, M, d).float()
        kmax = side.kmax[bt].permute(0, 2, 1, 3, 4).reshape(rs * hkv, M, d).float()
        bound = (torch.bmm(qg.clamp_min(0), kmax.transpose(1, 2))
                 + torch.bmm(qg.clamp_max(0), kmin.transpose(1, 2)))  # [Rs*Hkv, G, M]
        rank = bound.amax(1).view(rs, hkv, M)
    else:
        rank = tile_scores.clone()  # LSH matches ranked by pre-score
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
    ``[Rs, Hkv, M]`` bool or None; ``keys``: its key_cache, key_bt, kv_layout)."""
    scores = gather_tile_scores(side, bt)  # [Rs, Hkv, M]
    pick = query_aware_pick(cfg, q, side, bt, scores, num_tiles, caps, lsh=lsh, impl=impl,
                            **keys)
    return scores, pick


def gather_tile_scores(side: SideData, bt: Tensor) -> Tensor:
    """Each row's tile pre-scores in logical order: bt ``[Rs, MB]`` int64 -> ``[Rs, Hkv, M]``,
    M = MB * tiles_per_block."""
    rs, hkv = bt.shape[0], side.scores.shape[1]
    return side.scores[bt].permute(0, 2, 1, 3).reshape(rs, hkv, -1)


def select_decode_tiles(cfg: PrescoreConfig, q: Tensor, side: SideData, bt: Tensor,
                        num_tiles: Tensor, budget: Tensor, caps: Tensor, *,
                        lsh: AngularLSH | None = None,
                        generator: torch.Generator | None = None, impl: str = "auto",
                        **keys) -> tuple[Selection, Tensor | None, Tensor | None]:
    """The tiles each sparse decode row attends: sinks + window + query-aware pick + pre-scores.

    q ``[Rs, Hq, D]``; bt ``[Rs, MB]`` int64 block table; num_tiles ``[Rs]`` int64 logical
    tiles (the partial last one included); budget ``[Rs]`` int64 tiles per (row, KV head),
    at least sinks + window; caps ``[Rs]`` int64 query-aware tiles at most (:func:`query_caps`).
    Returns the :class:`~prescore_backend.selection.Selection` and, with ``residual_tiles > 0``,
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


