"""Decode: one decode step of one layer over the tiles a selection picks.

:func:`select_and_decode` = :func:`.select.select_tiles` then :func:`.sparse_decode.sparse_decode`
over the chosen tiles (returns the output and the :class:`~.select.Selection`, for tests and the
evaluation); :func:`select_and_decode_into` is the backends' per-layer call (writes vLLM's
output rows and adds the step's counters in place). On CPU both run as one C++ call (no return
to Python between the selection and the attention, no tensor made per layer); elsewhere the
torch selection, then the decode implementation named by ``impl``.
"""

from __future__ import annotations

import time

from torch import Tensor

from .cpu_sparse_decode import (SelectDecodeIntoArgs, cpu_select_decode, in_place_fields,
                                run_select_decode_into)
from .dispatch import resolve
from .select import Selection, select_tiles, tokens_read
from .sparse_decode import sparse_decode

__all__ = ["paged_tile_scores", "select_and_decode", "select_and_decode_into"]

# impl -> how the step runs: the fused C++ call, or the torch selection then that decode impl.
_FUSED, _SPLIT = "fused", "split"
_IMPLS = {"cpp": _FUSED, "torch": _SPLIT, "triton": _SPLIT, "ref": _SPLIT}


def paged_tile_scores(block_scores: Tensor, block_tables: Tensor) -> Tensor:
    """Each row's tile pre-scores in logical order from per-block ones: block_scores
    ``[NB, Hkv, B / T]``, block_tables ``[R, MB]`` -> ``[R, Hkv, MB * B / T]``."""
    r, hkv = block_tables.shape[0], block_scores.shape[1]
    return block_scores[block_tables.long()].permute(0, 2, 1, 3).reshape(r, hkv, -1)


def select_and_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                      block_tables: Tensor, seq_lens: Tensor, tile_scores: Tensor,
                      num_tiles: Tensor, budget: Tensor, *, tile_size: int, scale: float,
                      sink_tiles: int, window_tiles: int, lsh_match: Tensor | None = None,
                      lsh_cap: int = 0, lsh_in_place: tuple[Tensor, Tensor, Tensor] | None = None,
                      sparq4_in_place: tuple[Tensor, Tensor, Tensor, int] | None = None,
                      paged_scores: bool = False, kv_layout: str = "strided", impl: str = "auto",
                      ) -> tuple[Tensor, Tensor, Selection, float]:
    """:func:`~.select.select_tiles` then :func:`~.sparse_decode.sparse_decode` over the
    chosen tiles.

    Args:
        query ``[R, Hq, D]``, key_cache/value_cache, block_tables ``[R, MB]``, seq_lens ``[R]``,
        tile_size, scale, kv_layout: as :func:`~.sparse_decode.sparse_decode`.
        tile_scores ``[R, Hkv, M]``, num_tiles ``[R]``, budget ``[R]``, sink_tiles,
        window_tiles, lsh_match ``[R, Hkv, M]`` bool or None, lsh_cap: as
        :func:`~.select.select_tiles`.
        lsh_in_place: (proj ``[D, r]``, tile bucket sets ``[NB, Hkv, B / T, W]`` int64, caps
            ``[R]`` int64) instead of lsh_match: HyperAttention's candidates found inside the
            C++ call (see :func:`~.cpu_sparse_decode.cpu_select_decode`; the same tiles as
            the backend's LSH pick then :func:`~.select.select_tiles`). impl "cpp" only.
        sparq4_in_place: (key copy kq ``[NB, Hkv, D, B/2]`` uint8, its scales kz
            ``[NB, Hkv, 2, D]`` fp32, caps ``[R]`` int64, channels) instead of lsh_match: the
            SparQ ranking on the 4-bit key copy run inside the C++ call (the same tiles as
            :func:`~.cpu_select.cpu_sparq4_pick` as lsh_match, lsh_cap >= caps). impl "cpp"
            only.
        paged_scores: tile_scores is ``[NB, Hkv, B / T]`` per physical block, read through
            block_tables (any impl; the fused call reads it in place).
        impl: "cpp" runs both in one C++ call (CPU tensors); "torch", "triton", "ref" select
            with the torch code and decode with that impl; "auto" as :mod:`.dispatch` says.

    Returns:
        out ``[R, Hq, D]`` in query dtype, lse ``[R, Hq]`` fp32, the :class:`~.select.Selection`,
        and the seconds spent selecting (for the selection-time metric).
    """
    impl, how = resolve("select_and_decode", impl, query, _IMPLS)
    if how == _FUSED:
        out, lse, tiles, num, counts, sec = cpu_select_decode(
            query, key_cache, value_cache, block_tables, seq_lens, tile_scores, num_tiles,
            budget, tile_size=tile_size, scale=scale, sink_tiles=sink_tiles,
            window_tiles=window_tiles, lsh_match=lsh_match, lsh_cap=lsh_cap,
            lsh_in_place=lsh_in_place, sparq4_in_place=sparq4_in_place,
            paged_scores=paged_scores, kv_layout=kv_layout, out_dtype=query.dtype)
        return out, lse, Selection(tiles, num, source_counts=counts), sec
    for name, given in (("lsh_in_place", lsh_in_place), ("sparq4_in_place", sparq4_in_place)):
        if given is not None:
            raise ValueError(f"{name} needs impl='cpp' (the fused CPU kernel), got {impl!r}; "
                             "pass its pick as lsh_match instead")
    if paged_scores:
        tile_scores = paged_tile_scores(tile_scores, block_tables)
    t0 = time.perf_counter()
    sel = select_tiles(tile_scores, num_tiles, budget, sink_tiles=sink_tiles,
                       window_tiles=window_tiles, lsh_match=lsh_match, lsh_cap=lsh_cap,
                       impl="torch")
    sec = time.perf_counter() - t0
    out, lse = sparse_decode(query, key_cache, value_cache, block_tables, seq_lens, sel.tiles,
                             tile_size, scale, impl=impl, kv_layout=kv_layout)
    return out, lse, sel, sec


def select_and_decode_into(query: Tensor, key_cache: Tensor, value_cache: Tensor,
                           block_tables: Tensor, seq_lens: Tensor, tile_scores: Tensor,
                           num_tiles: Tensor, budget: Tensor, out: Tensor, *,
                           rows: Tensor | None = None, stats: Tensor | None = None,
                           tile_size: int, scale: float, sink_tiles: int, window_tiles: int,
                           lsh_match: Tensor | None = None, lsh_cap: int = 0,
                           lsh_in_place: tuple[Tensor, Tensor, Tensor] | None = None,
                           sparq4_in_place: tuple[Tensor, Tensor, Tensor, int] | None = None,
                           paged_scores: bool = False, kv_layout: str = "strided",
                           impl: str = "auto") -> float:
    """:func:`select_and_decode` as the backend's per-layer call: the output written in place,
    the counters added in place, only the selection's seconds returned.

    Args:
        query ``[N, Hq, D]``, out ``[N', Hq, D]``: row r of the step reads ``query[rows[r]]``
            and writes ``out[rows[r]]`` in out's dtype (rows ``[R]`` int64, e.g. the decode
            tokens among the step's tokens; None: row r).
        stats: ``[>= 5]`` int64 or None; adds the tokens read (each chosen tile's tokens below
            seq_len, summed over rows and KV heads) to ``stats[0]`` and the tiles chosen per
            source (:data:`~.select.SOURCES` order) to ``stats[1:5]``.
        The rest as :func:`select_and_decode` (block_tables, seq_lens, tile_scores, num_tiles,
        budget have R rows).

    With ``impl="cpp"`` (the default on CPU) no tensor is allocated and no Python object but a
    float comes back (each costs microseconds per layer at batch 1). Other impls run
    :func:`select_and_decode` and do the same writes with torch ops.
    """
    impl, how = resolve("select_and_decode_into", impl, query, _IMPLS)
    if how == _FUSED:
        return run_select_decode_into(SelectDecodeIntoArgs(
            query, key_cache, value_cache, block_tables, seq_lens, tile_scores, num_tiles,
            budget, sink_tiles, window_tiles, lsh_match, lsh_cap, tile_size, scale,
            kv_layout == "amx", out, rows, stats,
            *in_place_fields(lsh_in_place, sparq4_in_place, paged_scores)))
    q = query if rows is None else query[rows]  # [R, Hq, D]
    o, _, sel, sec = select_and_decode(
        q, key_cache, value_cache, block_tables, seq_lens, tile_scores, num_tiles, budget,
        tile_size=tile_size, scale=scale, sink_tiles=sink_tiles, window_tiles=window_tiles,
        lsh_match=lsh_match, lsh_cap=lsh_cap, lsh_in_place=lsh_in_place,
        sparq4_in_place=sparq4_in_place, paged_scores=paged_scores, kv_layout=kv_layout,
        impl=impl)
    if rows is None:
        out[: o.shape[0]] = o.to(out.dtype)
    else:
        out.index_copy_(0, rows, o.to(out.dtype))
    if stats is not None:
        stats[0] += tokens_read(sel.tiles, seq_lens, tile_size).sum().to(stats.device)
        stats[1:5] += sel.source_counts.to(stats.device)
    return sec
