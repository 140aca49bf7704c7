"""Store: the side data PRESCORE keeps beside vLLM's paged KV cache, and its upkeep.

Per layer, :class:`SideData` holds for every physical KV block a pre-score per (block, KV
head, tile) and what the query-aware ranking needs (per-tile key min/max for Quest, LSH bucket
bitmasks for HyperAttention, per-token PQ codes, the 4-bit key copy) and, with two precision
tiers, the low-bit K/V copy (:class:`~prescore_backend.kernels.lowbit.LowBitCopy`). Its life cycle (the
rules are in :mod:`prescore_backend.backends.cpu`'s docstring):

* :func:`record_decode_tokens` - per-token data of decode keys just written;
* :func:`record_codes` - PQ codes of every key written (prefill and decode);
* :func:`run_score_jobs` - per :class:`ScoreJob` (a prefill chunk, or a decode row that just
  filled a block): every KV block that became full is scored with ``Scorer.score_prefixes`` on
  the keys up to its end and aggregated per tile (:mod:`prescore_backend.scoring.tiles`);
  prefill chunks also record per-token data (:func:`record_chunk_tokens`).

The backends call these on vLLM's cache and the quality evaluation on a paged cache of its
own, so what it measures is what the backend does. Nothing here imports vLLM.

Shapes: ``Hkv`` KV heads, ``D`` head dim, ``B`` KV block size, ``T`` tile size, ``W`` LSH mask
words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.nn.functional import pad

from prescore_backend.config import PrescoreConfig
from prescore_backend.keycopy import pack_blocks
from prescore_backend.kernels.cpu_side import cpu_record_bounds, cpu_record_codes
from prescore_backend.kernels.dispatch import resolve
from prescore_backend.kernels.layouts import amx_unpack_k, amx_unpack_v
from prescore_backend.kernels.lowbit import LowBitCopy
from prescore_backend.kernels.lsh import AngularLSH, bucket_masks, num_words
from prescore_backend.pq import LayerCodebook, pq_encode
from prescore_backend.scoring import Scorer
from prescore_backend.scoring.tiles import aggregate_tiles

__all__ = ["ScoreJob", "SideData", "record_chunk_tokens", "record_codes",
           "record_decode_tokens", "run_score_jobs"]


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
    low: LowBitCopy | None = None  # low-bit K/V copy of full blocks (two precision tiers)

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, tiles_per_block: int, *,
                 lsh_words: int = 0, head_dim: int = 0,
                 dtype: torch.dtype = torch.float32, block_size: int = 0,
                 codebook: LayerCodebook | None = None, key_copy_dim: int = 0,
                 low_bits: int = 0, device: torch.device | str = "cpu",
                 pq_subspaces: int = 0) -> "SideData":
        """``head_dim`` > 0: Quest bounds; ``codebook`` (with ``block_size``; on ``device``):
        PQ codes (``pq_subspaces`` of them per token without a codebook: for sizing);
        ``key_copy_dim`` > 0 (the head dim, with ``block_size``): the 4-bit key copy, and
        with ``low_bits`` > 0 the low-bit K/V copy of two precision tiers. Everything on
        ``device`` (the KV cache's)."""
        shape = (num_blocks, num_kv_heads, tiles_per_block)
        bounds = head_dim > 0
        codes = kq = kz = None
        u8 = dict(dtype=torch.uint8, device=device)
        m = codebook.subspaces if codebook is not None else pq_subspaces
        if m:
            codes = torch.zeros((num_blocks, num_kv_heads, block_size, m), **u8)
        if key_copy_dim:
            kq = torch.zeros((num_blocks, num_kv_heads, key_copy_dim, block_size // 2), **u8)
            kz = torch.zeros((num_blocks, num_kv_heads, 2, key_copy_dim), device=device)
        return cls(
            scores=torch.full(shape, float("-inf"), device=device),
            masks=(torch.zeros((*shape, lsh_words), dtype=torch.int64, device=device)
                   if lsh_words else None),
            kmin=torch.zeros((*shape, head_dim), dtype=dtype, device=device) if bounds else None,
            kmax=torch.zeros((*shape, head_dim), dtype=dtype, device=device) if bounds else None,
            codes=codes, codebook=codebook, kq=kq, kz=kz,
            low=(LowBitCopy.allocate(num_blocks, num_kv_heads, block_size, key_copy_dim,
                                     low_bits, device) if low_bits and key_copy_dim else None))

    @classmethod
    def for_config(cls, cfg: PrescoreConfig, num_blocks: int, num_kv_heads: int,
                   head_dim: int, block_size: int, dtype: torch.dtype, *,
                   codebook: LayerCodebook | None = None,
                   device: torch.device | str = "cpu") -> "SideData":
        """What ``cfg``'s selection keeps beside a cache of ``num_blocks`` blocks (on the
        "meta" device: its size, for the memory budget, with no codebook needed)."""
        return cls.allocate(
            num_blocks, num_kv_heads, block_size // cfg.tile_size,
            lsh_words=num_words(cfg.lsh_bits) if cfg.uses_lsh else 0,
            head_dim=head_dim if cfg.uses_bounds else 0, dtype=dtype, block_size=block_size,
            codebook=codebook, key_copy_dim=head_dim if cfg.uses_key_copy else 0,
            low_bits=cfg.low_tier_bits, device=device,
            pq_subspaces=cfg.pq_subspaces if cfg.uses_codes and codebook is None else 0)

    def bytes_per_token(self, block_size: int) -> float:
        low = self.low.tensors() if self.low is not None else ()
        parts = [t for t in (self.scores, self.masks, self.kmin, self.kmax, self.codes, self.kq,
                             self.kz, *low) if t is not None]
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



# The per-token upkeep runs as one C++ pass per layer on CPU or as torch indexing ops.
_RECORD_IMPLS = {"cpp": "cpp", "torch": "torch"}


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
    impl, _ = resolve("record_decode_tokens", impl, keys, _RECORD_IMPLS)
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
    impl, _ = resolve("record_codes", impl, keys, _RECORD_IMPLS)
    book = side.codebook
    if impl == "cpp":
        cpu_record_codes(keys, block, offset, side.codes, book.dims, book.enc_w, book.enc_ct,
                         book.enc_cn)
    else:
        side.codes[block, :, offset] = pq_encode(keys, book)


def run_score_jobs(side: SideData, jobs: list[ScoreJob], key_cache: Tensor, *,
                   scorer_for: Callable[[str | None], Scorer], tile_size: int, aggregate: str,
                   lsh: AngularLSH | None, lsh_bits: int, kv_layout: str = "strided",
                   value_cache: Tensor | None = None, scores: bool = True) -> None:
    """Score the blocks each job filled (and write their 4-bit key copy and low-bit K/V copy)
    and record its per-token data.

    key_cache ``[num_blocks, Hkv, B, D]`` (any strides; with ``kv_layout="amx"`` vLLM's packed K
    region, unpacked per job); value_cache likewise (read only for the low-bit copy, which
    needs it). ``scorer_for(job.method)`` gives the
    scorer of a job (``None``: the configured one). A full block's scores come from a fit on
    every key of the sequence up to the block's end (``Scorer.score_prefixes``), aggregated
    per tile; tiles the job wrote in the incomplete last block are set unscored (-inf).
    ``scores=False`` (nothing reads the pre-scores: ``PrescoreConfig.reads_prescores``) skips
    the scorer; full blocks' tiles then score their position in the sequence (a function of the
    block's place alone, as prefix caching needs), so a row that skips the ranking
    (``selection.ratio_budgets``) fills its budget with the most recent tiles.
    """
    T = tile_size
    _, hkv, bs, d = key_cache.shape
    tpb = bs // T
    for job in jobs:
        s = job.seq_len
        b0, b1 = job.blocks_done
        # The scorer fits on the whole prefix; everything else reads only the blocks this job
        # wrote, from block lo on (a decode row that fills a block reads that block alone).
        lo = 0 if b1 > b0 and scores else min(b0, job.first_pos // bs)
        keys = key_cache[job.block_ids[lo:]]  # [nblk - lo, Hkv, B, D]
        if kv_layout == "amx":
            keys = amx_unpack_k(keys)
        keys = keys.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :s - lo * bs]  # [Hkv, s - lo B, D]
        if b1 > b0 and scores:  # full blocks: final scores, fitted on the prefix to each end
            ends = [(b + 1) * bs for b in range(b0, b1)]
            ks = scorer_for(job.method).score_prefixes(keys.float(), b0 * bs, ends, grain=bs)
            tiles = aggregate_tiles(ks, T, aggregate)  # [Hkv, (b1 - b0) * tpb]
            side.scores[job.block_ids[b0:b1]] = tiles.view(hkv, b1 - b0, tpb).transpose(0, 1)
        elif b1 > b0:  # the tiles' positions: a fill by pre-score is then the recent tiles
            pos = torch.arange(b0 * tpb, b1 * tpb, device=keys.device, dtype=side.scores.dtype)
            side.scores[job.block_ids[b0:b1]] = pos.view(b1 - b0, 1, tpb)
        if b1 > b0:
            full = keys[:, (b0 - lo) * bs:(b1 - lo) * bs].reshape(hkv, b1 - b0, bs, d)
            full = full.transpose(0, 1)  # [b1 - b0, Hkv, B, D]
            if side.kq is not None:  # the 4-bit key copy: per block, once it is full
                side.kq[job.block_ids[b0:b1]], side.kz[job.block_ids[b0:b1]] = pack_blocks(full)
            if side.low is not None:  # the two tiers' low-bit K/V copy, also once per block
                if value_cache is None:
                    raise ValueError("the low-bit copy needs value_cache")
                ids = job.block_ids[b0:b1]
                vals = value_cache[ids]
                if kv_layout == "amx":
                    vals = amx_unpack_v(vals)
                side.low.write(ids, full, vals)
        if s > b1 * bs:  # tiles this step wrote in the incomplete last block: unscored
            t = torch.arange(max(b1 * bs, job.first_pos) // T, (s + T - 1) // T,
                             device=keys.device)
            side.scores[job.block_ids[(t * T) // bs], :, t % tpb] = float("-inf")
        if job.per_token:
            record_chunk_tokens(side, job, keys, tile_size=T, lsh=lsh, lsh_bits=lsh_bits,
                                first_key=lo * bs)


def record_chunk_tokens(side: SideData, job: ScoreJob, keys: Tensor, *, tile_size: int,
                        lsh: AngularLSH | None, lsh_bits: int, first_key: int = 0) -> None:
    """Per-token side data (LSH bits, key bounds) of the tiles a prefill chunk touched.

    keys ``[Hkv, seq_len - first_key, D]``: the row's keys from position ``first_key`` (at
    most the first touched tile's start: its earlier keys are included in its data).
    """
    T, s = tile_size, job.seq_len
    hkv, _, d = keys.shape
    t_lo, t_hi = job.first_pos // T, (s + T - 1) // T
    seg = keys[:, t_lo * T - first_key:]  # [Hkv, L, D]
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
