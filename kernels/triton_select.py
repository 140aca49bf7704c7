"""Triton tile selection (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

The torch version of :func:`prescore_backend.selection.select_tiles` is ~15-20 small ops (two
top-k's, a sort, scatters); replayed from a CUDA graph on an H100 it costs 0.09-0.17 ms per
layer, 3-10x the sparse decode it feeds (``bench/bench_triton_decode.py``). Here one program per
(row, KV head) holds the row's M tile keys in registers and does the whole selection:

* every tile gets one exact int64 priority key, unique per row (the tile index is its low
  bits): ``class << 56 | secondary << 24 | (2^24 - 1 - index)``; class 3 = sinks and window
  (secondary: the window by recency, then the sinks from the first), 2 = LSH matches that get
  LSH priority, 1 = other valid tiles (secondary: the pre-score as an order-preserving 32-bit
  integer, NaN = -inf, -0.0 = +0.0), 0 = beyond the row's tiles;
* the keep-th largest key is found by bisection on the key bits (58 counting passes over the
  registers; the LSH cap's threshold the same way over the eligible tiles), and the tiles with
  a key at or above it are kept: keys are unique, so there are no ties to resolve;
* the kept indices are compacted in ascending order with a prefix sum and stored, -1 padded.

The rules are exactly ``prescore_backend.selection.select_tiles_ref``'s (ties to the lower
index), which is the oracle the tests compare against tile for tile. Shapes are fixed by the
caller's ``num_slots`` and nothing syncs with the host, so a CUDA graph can capture it.

Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["triton_select_tiles"]


@triton.jit
def _kth_largest(key, k, BITS: tl.constexpr):
    """The k-th largest of the non-negative int64 ``key`` values (k >= 1; unique keys), by
    bisection on the bits below 2^BITS."""
    lo = tl.zeros([], tl.int64)
    for i in range(BITS):
        cand = lo | (tl.full([], 1, tl.int64) << (BITS - 1 - i))
        cnt = tl.sum((key >= cand).to(tl.int32), 0)
        lo = tl.where(cnt >= k, cand, lo)
    return lo


@triton.jit
def _select_kernel(
    sc_ptr, nt_ptr, bud_ptr, lsh_ptr, tiles_ptr, num_ptr, cnt_ptr,
    M, S, sink_tiles, window_tiles, lsh_cap,
    stride_sr, stride_sh, stride_sm,
    stride_lr, stride_lh, stride_lm,
    stride_tr, stride_th, stride_ts,
    HAS_LSH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    idx = tl.arange(0, BLOCK_M)
    n = tl.minimum(tl.maximum(tl.load(nt_ptr + r).to(tl.int32), 0), M)
    keep = tl.minimum(tl.minimum(tl.maximum(tl.load(bud_ptr + r).to(tl.int32), 0), n), S)
    valid = idx < n
    sc = tl.load(sc_ptr + r * stride_sr + h * stride_sh + idx * stride_sm, mask=valid,
                 other=float("-inf")).to(tl.float32)
    sc = tl.where(sc != sc, float("-inf"), sc) + 0.0  # NaN -> -inf, -0.0 -> +0.0
    bits = sc.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648  # [0, 2^32)
    low = (16777215 - idx).to(tl.int64)  # 2^24 - 1 - index: lower index wins
    score_key = (ordered << 24) | low  # [BM] < 2^56
    window = valid & (idx >= n - window_tiles)
    forced = window | (valid & (idx < sink_tiles))
    forced_sec = tl.where(window, M + 1 + idx, M - idx).to(tl.int64)
    key = tl.where(forced, (3 << 56) | (forced_sec << 24) | low, (1 << 56) | score_key)
    key = tl.where(valid, key, 0)
    taken = idx < 0  # [BM] False
    if HAS_LSH:
        match = tl.load(lsh_ptr + r * stride_lr + h * stride_lh + idx * stride_lm, mask=valid,
                        other=0) != 0
        elig = match & valid & (forced == 0)
        ekey = tl.where(elig, score_key, -1)
        n_elig = tl.sum(elig.to(tl.int32), 0)
        cap = tl.minimum(n_elig, lsh_cap)
        lthr = _kth_largest(ekey, tl.maximum(cap, 1), 56)
        # (tensor comparisons only: the interpreter rejects a scalar bool in a mask)
        taken = elig & (ekey >= lthr) & ((idx * 0 + cap) > 0)
        key = tl.where(taken, (2 << 56) | score_key, key)
    thr = _kth_largest(key, tl.maximum(keep, 1), 58)
    chosen = (key >= thr) & valid & ((idx * 0 + keep) > 0)  # [BM]: exactly keep tiles
    pos = tl.cumsum(chosen.to(tl.int32), 0) - 1  # ascending slot of each kept tile
    base = tiles_ptr + r * stride_tr + h * stride_th
    tl.store(base + pos * stride_ts, idx, mask=chosen)
    offs_s = tl.arange(0, BLOCK_S)
    tl.store(base + offs_s * stride_ts, tl.full([BLOCK_S], -1, tl.int32),
             mask=(offs_s >= keep) & (offs_s < S))
    tl.store(num_ptr + r * H + h, keep)
    # Per-source counts of the kept tiles: sink beats window beats LSH beats pre-score.
    is_sink = idx < sink_tiles
    is_win = (is_sink == 0) & window
    is_lsh = (is_sink == 0) & (window == 0) & taken
    cbase = cnt_ptr + (r * H + h) * 4
    tl.store(cbase, tl.sum((chosen & is_sink).to(tl.int32), 0))
    tl.store(cbase + 1, tl.sum((chosen & is_win).to(tl.int32), 0))
    tl.store(cbase + 2, tl.sum((chosen & is_lsh).to(tl.int32), 0))
    tl.store(cbase + 3, tl.sum((chosen & (is_sink == 0) & (window == 0) & (taken == 0)).to(tl.int32), 0))


def triton_select_tiles(tile_scores: Tensor, num_tiles: Tensor, budget: Tensor, *,
                        num_slots: int, sink_tiles: int, window_tiles: int,
                        lsh_match: Tensor | None = None, lsh_cap: int = 0,
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Select tiles per (row, KV head) in one kernel launch (grid ``(R, Hkv)``).

    Args:
        tile_scores: ``[R, Hkv, M]`` float pre-scores (M < 2^24); entries at index >=
            num_tiles[r] are ignored.
        num_tiles: ``[R]`` valid tiles per row; budget: ``[R]`` tiles to keep per (row, head).
        num_slots: output slots S (the step's largest budget, known on the host); rows whose
            budget exceeds it keep their S highest-priority tiles. Clamped to M.
        sink_tiles, window_tiles, lsh_match ``[R, Hkv, M]`` bool or None, lsh_cap: as
            ``prescore_backend.selection.select_tiles``.

    Returns:
        tiles ``[R, Hkv, S]`` int32 ascending, -1 padded at the end; num_selected ``[R, Hkv]``
        int32; per-source counts ``[R, Hkv, 4]`` int32 (sink, window, LSH, pre-score; a tile
        that is both sink and window counts as sink).
    """
    R, H, M = tile_scores.shape
    if M >= 1 << 24:
        raise ValueError(f"triton_select_tiles supports fewer than 2^24 tiles, got {M}")
    dev = tile_scores.device
    S = max(0, min(int(num_slots), M))
    tiles = torch.empty(R, H, S, dtype=torch.int32, device=dev)
    num = torch.empty(R, H, dtype=torch.int32, device=dev)
    counts = torch.zeros(R, H, 4, dtype=torch.int32, device=dev)
    if R == 0 or H == 0:
        return tiles, num, counts
    has_lsh = lsh_match is not None and lsh_cap > 0
    lsh = lsh_match.to(device=dev, dtype=torch.int8) if has_lsh else tiles  # dummy pointer
    ls = lsh.stride() if has_lsh else (0, 0, 0)
    block_m = max(16, triton.next_power_of_2(max(M, 1)))
    _select_kernel[(R, H)](
        tile_scores, num_tiles.to(dev), budget.to(dev), lsh, tiles, num, counts,
        M, S, int(sink_tiles), int(window_tiles), int(lsh_cap),
        *tile_scores.stride(), *ls, *tiles.stride(),
        HAS_LSH=has_lsh, BLOCK_M=block_m, BLOCK_S=max(16, triton.next_power_of_2(max(S, 1))),
        num_warps=4 if block_m <= 2048 else 8,
    )
    return tiles, num, counts
