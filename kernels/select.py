"""Tile selection: per (row, KV head), the tiles one decode step attends.

:func:`select_tiles` picks sink tiles + the recent window + up to ``lsh_cap`` query-aware
matches (HyperAttention's LSH matches, 2310.05869, or any ranked pick) + the best pre-scored
tiles, up to a budget; :func:`select_tiles_ref` is its oracle (plain loops).
:func:`residual_sample` draws HyperAttention's uniform residual among the unselected tiles;
:func:`tokens_read` counts what a selection reads.

GQA: everything is per KV head; the query heads of a group share their KV head's selection.
Implementations (one table, "auto" resolved by :mod:`.dispatch`): "cpp" (fused C++,
:mod:`.cpu_select`), "torch" (vectorized, any device), "static" (sync-free torch, for CUDA
graphs), "triton" (one launch, :mod:`.triton_select`). No Python loop over rows or heads.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .cpu_select import cpu_select_tiles
from .dispatch import resolve

__all__ = ["SOURCES", "Selection", "residual_sample", "select_tiles", "select_tiles_ref",
           "select_tiles_static", "tokens_read"]

#: Order of :attr:`Selection.source_counts`.
SOURCES = ("sink", "window", "lsh", "prescore")


class Selection:
    """Tiles chosen for each (row, KV head).

    tiles: ``[R, Hkv, S]`` int32 logical tile indices, ascending, padded with -1 at the end;
        S = max over rows of min(budget, num_tiles) (0 if every budget is 0); for the "static"
        and "triton" selections S = min(num_slots, M).
    num_selected: ``[R, Hkv]`` int32 valid entries per (row, head).
    source_counts: ``[4]`` int64 tiles selected per source, in :data:`SOURCES` order
        (sink, window, lsh, prescore), summed over rows and heads. A tile that is both sink
        and window counts as sink, an LSH match that is also a sink or window tile counts as
        sink or window. Computed on first access (it costs ~10 small ops per step, which
        matters on the decode path when nobody reads it).
    """

    __slots__ = ("tiles", "num_selected", "_counts", "_counts_fn")

    def __init__(self, tiles: Tensor, num_selected: Tensor, source_counts: Tensor | None = None,
                 counts_fn: Callable[[], Tensor] | None = None) -> None:
        self.tiles = tiles
        self.num_selected = num_selected
        self._counts = source_counts
        self._counts_fn = counts_fn

    @property
    def source_counts(self) -> Tensor:
        if self._counts is None:
            self._counts = self._counts_fn()
        return self._counts

    def __repr__(self) -> str:
        return f"Selection(tiles={self.tiles!r}, num_selected={self.num_selected!r})"


# Priority classes (higher wins); within a class the secondary key orders tiles.
_INVALID, _PRESCORE, _LSH, _FORCED = 0, 1, 2, 3


def select_tiles(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, sink_tiles: int,
                 window_tiles: int, lsh_match: Tensor | None = None,
                 lsh_cap: int = 0, impl: str = "auto", num_slots: int | None = None) -> Selection:
    """Pick the tiles to attend per (row, KV head), without Python loops over rows or heads.

    Args:
        tile_scores: ``[R, Hkv, M]`` float pre-scores of each row's logical tiles; entries at
            index >= num_tiles[r] are ignored whatever their value (NaN counts as -inf).
        num_tiles: ``[R]`` valid tiles per row, including the partial last one.
        budget: ``[R]`` total tiles to read per (row, head), sinks, window and LSH included.
            Rows with budget >= num_tiles take every tile (exact attention).
        sink_tiles: the first tiles, always kept (StreamingLLM sinks).
        window_tiles: the last tiles (incl. the partial last one), always kept.
        lsh_match: optional ``[R, Hkv, M]`` bool, tiles whose bucket set holds the query's bucket.
        lsh_cap: at most this many LSH matches get LSH priority, the highest-scored ones;
            the others compete on score with the rest.

        impl: "cpp" (fused C++, :mod:`prescore_backend.kernels.cpu_select`; CPU tensors),
            "torch" (vectorized torch ops, any device), "static" (:func:`select_tiles_static`:
            no host sync, for CUDA graphs; any device), "triton" (one kernel launch,
            :mod:`prescore_backend.kernels.triton_select`; no host sync) or "auto" (cpp on CPU
            when it compiles, triton on CUDA, else torch).
        num_slots: for "static" and "triton", the output's slot count (the step's largest
            budget); None = the largest min(budget, num_tiles), read from the device (one sync).

    Priority: sinks and window, then LSH matches (up to the cap), then the highest pre-scores,
    until the budget. The budget is a hard cap: if it is smaller than sinks + window, the most
    recent window tiles are kept first, then the sinks from the first one on. The cpp path
    follows :func:`select_tiles_ref` exactly (ties to the lower index); the torch fast path may
    break exact pre-score ties differently.

    Returns:
        :class:`Selection`.
    """
    impl, fn = resolve("select_tiles", impl, tile_scores, _IMPLS)
    return fn(tile_scores, num_tiles, budget, sink_tiles=sink_tiles, window_tiles=window_tiles,
              lsh_match=lsh_match, lsh_cap=lsh_cap, num_slots=num_slots)


def _num_slots(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor,
               num_slots: int | None) -> int:
    """The step's largest min(budget, num_tiles), read from the device unless given."""
    if num_slots is not None:
        return num_slots
    n_ = num_tiles.long().clamp(0, tile_scores.shape[2])
    return int(torch.minimum(budget.long().clamp_min(0), n_).max()) if len(n_) else 0


def _select_cpp(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, sink_tiles: int,
                window_tiles: int, lsh_match: Tensor | None, lsh_cap: int,
                num_slots: int | None) -> Selection:
    tiles, num, counts = cpu_select_tiles(tile_scores, num_tiles, budget, sink_tiles=sink_tiles,
                                          window_tiles=window_tiles, lsh_match=lsh_match,
                                          lsh_cap=lsh_cap)
    return Selection(tiles, num, source_counts=counts)


def _select_static(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, num_slots, **kw
                   ) -> Selection:
    return select_tiles_static(tile_scores, num_tiles, budget,
                               num_slots=_num_slots(tile_scores, num_tiles, budget, num_slots),
                               **kw)


def _select_triton(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, num_slots, **kw
                   ) -> Selection:
    from .triton_select import triton_select_tiles  # lazy: triton is optional

    tiles, num, per_head = triton_select_tiles(
        tile_scores, num_tiles, budget,
        num_slots=_num_slots(tile_scores, num_tiles, budget, num_slots), **kw)
    return Selection(tiles, num, counts_fn=lambda: per_head.sum((0, 1)).to(torch.int64))


def _select_torch(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, sink_tiles: int,
                  window_tiles: int, lsh_match: Tensor | None, lsh_cap: int,
                  num_slots: int | None) -> Selection:
    """Vectorized torch ops, any device."""
    R, H, M = tile_scores.shape
    dev = tile_scores.device
    n = num_tiles.to(dev).long().clamp(0, M).view(R, 1, 1)  # [R, 1, 1]
    b = budget.to(dev).long()
    keep = torch.minimum(b.view(R, 1, 1).clamp_min(0), n)  # [R, 1, 1]
    S = int(keep.max()) if R > 0 and M > 0 else 0
    idx = torch.arange(M, device=dev)  # [M]
    all_valid = R > 0 and int(n.min()) == M  # common: every row has M tiles
    valid = None if all_valid else idx < n  # [R, 1, M]
    window = idx >= n - window_tiles  # [R, 1, M]
    forced = (idx < sink_tiles) | window  # [R, 1, M]
    if valid is not None:
        forced &= valid
    use_lsh = lsh_match is not None and lsh_cap > 0
    scores = tile_scores.float()

    # Fast path (the common case): every forced tile and every capped LSH match fits in each
    # row's budget (or the row is dense), so their order among themselves cannot matter and a
    # single float top-k decides. Exact ties between pre-scores may break differently from
    # the oracle's "lower index first". Op count matters here (each torch op has a fixed dispatch cost).
    room = sink_tiles + window_tiles + (lsh_cap if use_lsh else 0)
    if bool(((keep >= room) | (keep >= n)).all()):
        big = torch.finfo(torch.float32).max / 2
        key = torch.nan_to_num(scores, nan=-big, posinf=big, neginf=-big)  # [R, H, M], finite
        taken = None
        if use_lsh:
            elig = lsh_match.to(dev).bool() & ~forced  # [R, H, M]
            if valid is not None:
                elig &= valid
            k = min(lsh_cap, M)
            cand = key.masked_fill(~elig, float("-inf")).topk(k, dim=-1).indices  # [R, H, k]
            taken = torch.zeros_like(elig).scatter_(-1, cand, elig.gather(-1, cand))
            key.masked_fill_(taken, torch.finfo(torch.float32).max)
        key.masked_fill_(forced, float("inf"))
        if valid is not None:
            key.masked_fill_(~valid, float("-inf"))
        if bool((keep == S).all()):  # no padding: any order, then ascending via a mask
            top = key.topk(S, dim=-1, sorted=False).indices  # [R, H, S]
            hit = torch.zeros(R, H, M, dtype=torch.bool, device=dev).scatter_(-1, top, True)
            tiles = hit.nonzero()[:, 2].view(R, H, S)  # row-major nonzero: ascending per row
            return _finish(tiles, keep, n, sink_tiles, window_tiles, taken, M, ascending=True)
        top = key.topk(S, dim=-1).indices  # [R, H, S], best first
        return _finish(top, keep, n, sink_tiles, window_tiles, taken, M)

    if valid is None:
        valid = idx < n
    # General path: exact integer priority keys (class, then a secondary order), no ties.
    # Rank of every tile by score within its (row, head), 0 = best; stable for ties.
    scores = torch.nan_to_num(scores, nan=float("-inf")).masked_fill(~valid, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)  # [R, H, M]
    rank = torch.empty_like(order).scatter_(-1, order, idx.expand(R, H, M))  # [R, H, M]
    cls = torch.where(forced, _FORCED, _PRESCORE).expand(R, H, M)  # [R, H, M]
    cls = cls.masked_fill(~valid, _INVALID)
    taken = None
    if use_lsh:
        elig = lsh_match.to(dev).bool() & valid & ~forced  # [R, H, M]
        elig_sorted = elig.gather(-1, order)  # in descending score order
        take_sorted = elig_sorted & (elig_sorted.cumsum(-1) <= lsh_cap)
        taken = torch.zeros_like(elig).scatter_(-1, order, take_sorted)
        cls = torch.where(taken, _LSH, cls)
    # Secondary key in [0, 2M]: window tiles by recency, then sinks by position; others by rank.
    forced_key = torch.where(window, M + 1 + idx, M - idx).expand(R, H, M)
    sec = torch.where(cls == _FORCED, forced_key, M - rank)
    key = cls * (2 * M + 2) + sec  # [R, H, M] int64, exact (no float ties/overflow)
    top = key.topk(S, dim=-1).indices  # [R, H, S]
    return _finish(top, keep, n, sink_tiles, window_tiles, taken, M)


_IMPLS = {"cpp": _select_cpp, "static": _select_static, "torch": _select_torch,
          "triton": _select_triton}


def select_tiles_static(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *,
                        num_slots: int, sink_tiles: int, window_tiles: int,
                        lsh_match: Tensor | None = None, lsh_cap: int = 0) -> Selection:
    """:func:`select_tiles` without host synchronization, for CUDA graphs (any device).

    The same rules and the same result as :func:`select_tiles_ref`, ties included (lower index
    first), computed as one exact int64 priority key per tile and one top-k:
    ``class << 56 | secondary << 24 | (2^24 - 1 - index)``, class 3 for sinks and window (the
    secondary orders the window by recency, then the sinks from the first), 2 for the LSH
    matches that got LSH priority (chosen by the same key among the eligible tiles, at most
    ``lsh_cap``), 1 for the other valid tiles (secondary: the pre-score's order-preserving
    32-bit integer; NaN counts as -inf), 0 for padding. No shape depends on the data: the caller
    gives ``num_slots`` (the largest budget of the step, known on the host where the budget is
    planned); the output has min(num_slots, M) slots.

    Args: as :func:`select_tiles`; ``M`` (tile_scores.shape[2]) must be below 2^24.

    Returns:
        :class:`Selection` with tiles ``[R, Hkv, min(num_slots, M)]`` ascending, -1 padded at
        the end (a row whose budget exceeds ``num_slots`` is cut to its first ``num_slots``
        tiles by priority), num_selected ``[R, Hkv]``.
    """
    R, H, M = tile_scores.shape
    if M >= 1 << 24:
        raise ValueError(f"select_tiles_static supports fewer than 2^24 tiles, got {M}")
    dev = tile_scores.device
    S = max(0, min(int(num_slots), M))
    idx = torch.arange(M, device=dev)  # [M]
    n = num_tiles.to(dev).long().clamp(0, M).view(R, 1, 1)  # [R, 1, 1]
    keep = torch.minimum(budget.to(dev).long().view(R, 1, 1).clamp_min(0), n).clamp_max(S)
    valid = idx < n  # [R, 1, M]
    window = valid & (idx >= n - window_tiles)
    forced = window | (valid & (idx < sink_tiles))
    # Order-preserving int of the float score, shifted to [0, 2^32).
    sc = torch.nan_to_num(tile_scores.float(), nan=float("-inf")) + 0.0  # -0.0 -> +0.0 (they tie)
    bits = sc.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long() + (1 << 31)  # [R, H, M]
    low = (1 << 24) - 1 - idx  # lower index wins ties
    score_key = (ordered << 24) | low  # [R, H, M], < 2^56
    forced_sec = torch.where(window, M + 1 + idx, M - idx)  # recency, then sinks from the first
    key = torch.where(forced, (3 << 56) | (forced_sec << 24) | low, (1 << 56) | score_key)
    key = torch.where(valid, key, 0)
    taken = None
    if lsh_match is not None and lsh_cap > 0 and M > 0:
        elig = lsh_match.to(dev).bool() & valid & ~forced  # [R, H, M]
        k = min(lsh_cap, M)
        cand = torch.where(elig, score_key, -1).topk(k, dim=-1).indices  # [R, H, k]
        taken = torch.zeros_like(elig).scatter_(-1, cand, elig.gather(-1, cand))
        key = torch.where(taken, (2 << 56) | score_key, key)
    top = key.topk(S, dim=-1).indices  # [R, H, S], best first
    in_budget = torch.arange(S, device=dev) < keep  # [R, 1, S]
    tiles = torch.where(in_budget, top, M).sort(dim=-1).values  # padding (M) sorts last
    chosen = tiles < M
    tiles = torch.where(chosen, tiles, -1).to(torch.int32)
    num = keep.view(R, 1).expand(R, H).to(torch.int32)
    return Selection(tiles, num.contiguous(), counts_fn=_counts_fn(tiles, chosen, n, sink_tiles,
                                                                   window_tiles, taken, M))


def tokens_read(tiles: Tensor, seq_lens: Tensor, tile_size: int) -> Tensor:
    """Tokens a selection reads: tiles ``[Rs, Hkv, S]`` (-1 pad), seq_lens ``[Rs]`` ->
    ``[Rs, Hkv]`` int64 (each chosen tile's tokens below seq_len: the last may be partial)."""
    t = tiles.long()
    lens = seq_lens.long().view(-1, 1, 1)
    return ((lens - t * tile_size).clamp(0, tile_size) * (t >= 0)).sum(-1)


def _finish(top: Tensor, keep: Tensor, n: Tensor, sink_tiles: int, window_tiles: int,
            taken: Tensor | None, M: int, ascending: bool = False) -> Selection:
    """Selected candidates ``[R, H, S]``, best first (the first keep[r] are chosen), or all
    chosen and already ascending (``ascending=True``) -> :class:`Selection`."""
    R, H, S = top.shape
    dev = top.device
    if ascending or bool((keep == S).all()):  # every (row, head) keeps S tiles: no padding
        tiles = top if ascending else top.sort(dim=-1).values
        chosen = None
        num = torch.full((R, H), S, dtype=torch.int32, device=dev)
    else:
        in_budget = torch.arange(S, device=dev) < keep  # [R, 1, S]; every top tile is valid
        tiles = torch.where(in_budget, top, M).sort(dim=-1).values  # padding (M) sorts last
        chosen = tiles < M  # [R, H, S]
        num = chosen.sum(-1, dtype=torch.int32)
        tiles = torch.where(chosen, tiles, -1)

    return Selection(tiles.to(torch.int32), num,
                     counts_fn=_counts_fn(tiles, chosen, n, sink_tiles, window_tiles, taken, M))


def _counts_fn(tiles: Tensor, chosen: Tensor | None, n: Tensor, sink_tiles: int,
               window_tiles: int, taken: Tensor | None, M: int) -> Callable[[], Tensor]:
    """:attr:`Selection.source_counts`, computed on access: tiles ``[R, H, S]`` (chosen
    ``[R, H, S]`` marks the valid entries, None = all), n ``[R, 1, 1]`` tiles per row, taken
    ``[R, H, M]`` the tiles that got LSH priority or None."""

    def counts() -> Tensor:
        # Sink beats window beats LSH; computed on the chosen tiles only.
        t = tiles.long()
        src = torch.where(t < sink_tiles, 0, torch.where(t >= n - window_tiles, 1, 3))
        if taken is not None:
            src = torch.where((src == 3) & taken.gather(-1, t.clamp(0, max(M - 1, 0))), 2, src)
        if chosen is not None:
            src = torch.where(chosen, src, 4)
        return torch.bincount(src.reshape(-1), minlength=5)[:4].to(torch.int64)

    return counts


def select_tiles_ref(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *, sink_tiles: int,
                     window_tiles: int, lsh_match: Tensor | None = None,
                     lsh_cap: int = 0) -> Selection:
    """Oracle for :func:`select_tiles`: the same rules with plain loops (ties: lower index first).
    budget: ``[R]``."""
    R, H, M = tile_scores.shape
    budget = budget.view(R, 1).expand(R, H)
    rows: list[list[list[int]]] = []
    counts = [0, 0, 0, 0]
    for r in range(R):
        n = min(int(num_tiles[r]), M)
        rows.append([])
        for h in range(H):
            b = max(0, min(int(budget[r, h]), n))
            sc = [float(x) for x in tile_scores[r, h, :n].float().tolist()]
            sc = [float("-inf") if x != x else x for x in sc]  # NaN -> -inf
            window = list(range(n - 1, max(n - window_tiles, 0) - 1, -1))  # most recent first
            sinks = [t for t in range(min(sink_tiles, n)) if t not in window]
            forced = window + sinks
            by_score = sorted(range(n), key=lambda t: (-sc[t], t))
            lsh = []
            if lsh_match is not None and lsh_cap > 0:
                lsh = [t for t in by_score if bool(lsh_match[r, h, t]) and t not in forced][:lsh_cap]
            rest = [t for t in by_score if t not in forced and t not in lsh]
            chosen = (forced + lsh + rest)[:b]
            for t in chosen:
                src = 0 if t < sink_tiles else 1 if t >= n - window_tiles else 2 if t in lsh else 3
                counts[src] += 1
            rows[r].append(sorted(chosen))
    S = max((len(x) for row in rows for x in row), default=0)
    tiles = torch.full((R, H, S), -1, dtype=torch.int32)
    num = torch.zeros(R, H, dtype=torch.int32)
    for r in range(R):
        for h in range(H):
            tiles[r, h, : len(rows[r][h])] = torch.tensor(rows[r][h], dtype=torch.int32)
            num[r, h] = len(rows[r][h])
    return Selection(tiles=tiles, num_selected=num, source_counts=torch.tensor(counts, dtype=torch.int64))


# ----------------------------------------------------------------------------- residual


def residual_sample(tiles: Tensor, num_tiles: Tensor, m: int, *,
                    generator: torch.Generator | None = None,
                    max_tiles: int | None = None) -> tuple[Tensor, Tensor]:
    """HyperAttention residual: m tiles uniformly without replacement among the unselected.

    tiles ``[R, Hkv, S]`` selected tiles (-1 pad), num_tiles ``[R]`` valid tiles per row ->
    (sampled ``[R, Hkv, m]`` int32 ascending, -1 pad; weight ``[R, Hkv]`` float32 =
    #unselected / #sampled, 0 when nothing is left to sample). Uniform subsets come from the
    top-m of i.i.d. uniform keys (random-key sampling), drawn from ``generator`` on its device.
    Every unselected tile is sampled with probability #sampled / #unselected, so
    weight * (sum over sampled tiles of exp-scores) is an unbiased estimate of the unselected
    exp-sum (at tile granularity, which keeps it unbiased even for a partial last tile).
    """
    R, H, _ = tiles.shape
    dev = tiles.device
    M = int(max_tiles) if max_tiles is not None else (int(num_tiles.max()) if R else 0)
    valid = torch.arange(M, device=dev) < num_tiles.to(dev).long().view(R, 1, 1)  # [R, 1, M]
    taken = torch.zeros(R, H, M + 1, dtype=torch.bool, device=dev)
    taken.scatter_(-1, torch.where(tiles >= 0, tiles.long(), M), True)
    elig = valid & ~taken[..., :M]  # [R, H, M]
    n_u = elig.sum(-1)  # [R, H]
    gen_dev = generator.device if generator is not None else dev
    u = torch.rand(R, H, M, generator=generator, device=gen_dev).to(dev)
    u = u.masked_fill(~elig, -1.0)  # uniforms are >= 0: ineligible sort last
    k = min(m, M)
    top = u.topk(k, dim=-1).indices  # [R, H, k]
    n_s = n_u.clamp_max(m)  # [R, H]
    ok = torch.arange(k, device=dev) < n_s.unsqueeze(-1)
    out = torch.where(ok, top, M).sort(dim=-1).values
    out = torch.where(out == M, -1, out).to(torch.int32)
    if k < m:
        out = torch.nn.functional.pad(out, (0, m - k), value=-1)
    weight = torch.where(n_s > 0, n_u.float() / n_s.clamp_min(1).float(), 0.0)
    return out, weight
