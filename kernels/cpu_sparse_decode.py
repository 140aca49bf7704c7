"""Fused CPU sparse paged decode (C++: ``csrc/sparse_decode.h``, built by :mod:`.cpu_ext`).

The torch path (:func:`.sparse_decode._torch_core`) gathers the selected tiles into a
workspace and runs two batched matmuls: ~60 torch ops per call, each with a fixed overhead,
and a gather of K tiles that vLLM's CPU cache stores transposed (``[D, B]`` per block and head,
so a 16-token K tile is D separate 64-byte pieces). This kernel reads the tiles in place: one
task per (row, KV head), an online softmax (exact over the selected union, as in
FlashAttention's streaming form) and the V accumulation, with no intermediate tensors.

Two loops share the contract:
  * the vector path (K token-contiguous as in vLLM's "vec" layout, V dim-contiguous, T and D
    multiples of 16, GQA group G <= 8): 16-token chunks in vector registers (GCC vector
    extensions: AVX-512 where the machine has it), the G score vectors and G 16-dim slices of
    the accumulator kept in registers, a branch-free polynomial exp, and software prefetch of
    the next 16-token chunk, one cache line per load of the current one (the K^T rows of a
    chunk are D lines 4*B bytes apart, which the hardware prefetchers do not follow; a burst of
    a whole tile's prefetches fills the line-fill buffers and stalls the compute behind it;
    docs/cpu-kernels.md). Unwritten slots after
    seq_len inside a chunk are read (they are inside the block) but masked to -inf before the
    softmax and never touch V.
  * the packed path for vLLM's "amx" layout (bf16; ``kv_layout="amx"``, see :mod:`.layouts`):
    the same register scheme, reading a 16-token K chunk as D/2 consecutive 64-byte lines
    (dims 2p, 2p+1 of 16 tokens each: the two bf16 halves of each 32-bit lane widened by a
    shift and a mask) and V as token pairs of 16-dim lines, with the same chunk-ahead prefetch.
    A K chunk is one contiguous run and a V chunk D/16 runs (half the cache lines of a bf16
    chunk in the "vec" layout, whose 16-token K^T rows are 32-byte halves of separate lines).
  * a generic scalar loop for any other strides, tile sizes and groups (a packed cache that
    the packed path does not take is unpacked first).

Same contract as :func:`.sparse_decode.sparse_decode`. Compilation needs a C++ compiler and
Python headers (g++ on Linux); when unavailable, :func:`available` is False and callers use the
torch path. The extension also holds the fused tile selection (:mod:`.cpu_select`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .cpu_ext import extension as _ext
from .dispatch import cpu_kernels_available as available
from .layouts import amx_unpack_blocks

__all__ = ["SelectDecodeIntoArgs", "available", "cpu_select_decode", "cpu_sparse_decode",
           "in_place_fields", "run_select_decode_into"]


# The C++ ops' arguments, in their order (csrc/sparse_decode.h, csrc/select_decode.h): one
# named tuple per op, so the unpack-and-retry below replaces fields by name.
class _DecodeArgs(NamedTuple):
    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    tiles: Tensor
    tile_size: int
    scale: float
    amx: bool
    out_dtype: Optional[torch.dtype]


class _SelectDecodeArgs(NamedTuple):
    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    tile_scores: Tensor
    num_tiles: Tensor
    budget: Tensor
    sink_tiles: int
    window_tiles: int
    lsh_match: Optional[Tensor]
    lsh_cap: int
    tile_size: int
    scale: float
    amx: bool
    out_dtype: Optional[torch.dtype]
    lsh_proj: Optional[Tensor]
    lsh_masks: Optional[Tensor]
    lsh_caps: Optional[Tensor]
    paged_scores: bool = False
    sparq4_kq: Optional[Tensor] = None
    sparq4_kz: Optional[Tensor] = None
    sparq4_caps: Optional[Tensor] = None
    sparq4_channels: int = 0


class SelectDecodeIntoArgs(NamedTuple):
    """The arguments of the per-layer op (``select_decode_into_cpu``), in its order."""

    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    tile_scores: Tensor
    num_tiles: Tensor
    budget: Tensor
    sink_tiles: int
    window_tiles: int
    lsh_match: Optional[Tensor]
    lsh_cap: int
    tile_size: int
    scale: float
    amx: bool
    out: Tensor
    rows: Optional[Tensor]
    stats: Optional[Tensor]
    lsh_proj: Optional[Tensor]
    lsh_masks: Optional[Tensor]
    lsh_caps: Optional[Tensor]
    paged_scores: bool = False
    sparq4_kq: Optional[Tensor] = None
    sparq4_kz: Optional[Tensor] = None
    sparq4_caps: Optional[Tensor] = None
    sparq4_channels: int = 0


def _unpacked(args: NamedTuple) -> NamedTuple:
    """``args`` with the blocks their table references unpacked from the "amx" layout to the
    plain one (a copy, numbered 0..R*MB-1 in table order; the side data read through the
    table - LSH bucket sets, the key copy, paged pre-scores - renumbered alike)."""
    k, v, bt = amx_unpack_blocks(args.key_cache, args.value_cache, args.block_tables)
    new = dict(key_cache=k, value_cache=v, block_tables=bt, amx=False)
    ids = args.block_tables.long().reshape(-1)
    for name in ("lsh_masks", "sparq4_kq", "sparq4_kz"):
        if getattr(args, name, None) is not None:
            new[name] = getattr(args, name)[ids]
    if getattr(args, "paged_scores", False):
        new["tile_scores"] = args.tile_scores[ids]
    return args._replace(**new)


def _run(op: Callable, args: NamedTuple, declined: Callable[[object], bool]):
    """``op(*args)``; where the packed "amx" loop declines the case (its shapes or strides),
    the same call on the unpacked blocks, which the generic loop takes."""
    res = op(*args)
    if args.amx and declined(res):
        res = op(*_unpacked(args))
    return res


def cpu_sparse_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                      block_tables: Tensor, seq_lens: Tensor, tiles: Tensor, tile_size: int,
                      scale: float, *, kv_layout: str = "strided",
                      out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Fused CPU path; same arguments as ``sparse_decode``; returns out ``[R, Hq, D]`` (fp32, or
    ``out_dtype``) and lse ``[R, Hq]`` fp32. ``kv_layout="amx"``: the caches are vLLM's packed
    "amx" regions."""
    args = _DecodeArgs(query, key_cache, value_cache, block_tables, seq_lens, tiles, tile_size,
                       scale, kv_layout == "amx", out_dtype)
    out, lse = _run(_ext().sparse_decode_cpu, args, lambda res: res[0] is None)
    return out, lse  # [R, Hq, D], [R, Hq]


def in_place_fields(lsh_in_place: tuple[Tensor, Tensor, Tensor] | None,
                    sparq4_in_place: tuple[Tensor, Tensor, Tensor, int] | None,
                    paged_scores: bool) -> tuple:
    """The selection ops' trailing fields (lsh_proj .. sparq4_channels) from the callers'
    ``lsh_in_place`` / ``sparq4_in_place`` tuples."""
    proj, masks, caps = lsh_in_place if lsh_in_place is not None else (None, None, None)
    kq, kz, s4caps, nc = sparq4_in_place if sparq4_in_place is not None else (None,) * 3 + (0,)
    return proj, masks, caps, bool(paged_scores), kq, kz, s4caps, int(nc)


def cpu_select_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                      block_tables: Tensor, seq_lens: Tensor, tile_scores: Tensor,
                      num_tiles: Tensor, budget: Tensor, *, tile_size: int, scale: float,
                      sink_tiles: int, window_tiles: int, lsh_match: Tensor | None = None,
                      lsh_cap: int = 0, lsh_in_place: tuple[Tensor, Tensor, Tensor] | None = None,
                      sparq4_in_place: tuple[Tensor, Tensor, Tensor, int] | None = None,
                      paged_scores: bool = False, kv_layout: str = "strided",
                      out_dtype: torch.dtype | None = None,
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    """:func:`.cpu_select.cpu_select_tiles` then :func:`cpu_sparse_decode` in one C++ call.

    Arguments as those two take them (tile_scores ``[R, Hkv, M]``, num_tiles and budget
    ``[R]``, lsh_match ``[R, Hkv, M]`` bool or None). ``paged_scores``: tile_scores is
    ``[NB, Hkv, B / T]`` per physical block (the side data's) and read through the block
    table, tile t of row r at ``[block_tables[r, t // (B / T)], :, t % (B / T)]``.
    ``lsh_in_place`` = (proj ``[D, r]`` fp32
    of :class:`~.lsh.AngularLSH`, tile bucket sets ``[NB, Hkv, B / T, W]`` int64 per physical
    block, caps ``[R]`` int64) replaces lsh_match/lsh_cap: the query group is hashed and the
    tiles' sets are read through the block table inside the call; candidates are the tiles
    (neither sink nor window, finite pre-score) whose set meets the group's, up to caps[r] of
    them by pre-score. ``sparq4_in_place`` = (kq ``[NB, Hkv, D, B/2]`` uint8, kz
    ``[NB, Hkv, 2, D]`` fp32, caps ``[R]`` int64, channels) likewise: each (row, KV head)'s
    tiles ranked on the 4-bit key copy inside the call, the best caps[r] picked (the picks of
    :func:`.cpu_select.cpu_sparq4_pick`, then selected as its lsh_match with lsh_cap >= caps).
    Returns out ``[R, Hq, D]`` (fp32 or ``out_dtype``), lse ``[R, Hq]``,
    tiles ``[R, Hkv, S]`` int32 ascending (-1 pad), num_selected ``[R, Hkv]`` int32, source
    counts ``[4]`` int64 and the selection's seconds.
    """
    args = _SelectDecodeArgs(query, key_cache, value_cache, block_tables, seq_lens, tile_scores,
                             num_tiles, budget, int(sink_tiles), int(window_tiles), lsh_match,
                             int(lsh_cap), tile_size, scale, kv_layout == "amx", out_dtype,
                             *in_place_fields(lsh_in_place, sparq4_in_place, paged_scores))
    # (out, lse, tiles, num, counts, seconds)
    return tuple(_run(_ext().select_decode_cpu, args, lambda res: res[0] is None))


def run_select_decode_into(args: SelectDecodeIntoArgs) -> float:
    """The per-layer op (:func:`cpu_select_decode` writing the caller's output rows and
    counters in place) on prepared arguments: the selection's seconds. The backend's hot path
    calls this through :func:`~.select_decode.select_and_decode_into`."""
    return _run(_ext().select_decode_into_cpu, args, lambda sec: sec < 0.0)
