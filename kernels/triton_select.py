"""Triton tile selection (GPU; runs on CPU tensors under TRITON_INTERPRET=1).

The torch version of :func:`prescore_backend.kernels.select.select_tiles` is ~15-20 small ops (two
top-k's, a sort, scatters); replayed from a CUDA graph it costs several times the sparse
decode it feeds (``bench/kernels/bench_triton_decode.py``, docs/cpu-kernels.md). Here one program per
(row, KV head) holds the row's M tile keys in registers and does the whole selection:

* every tile gets one exact integer priority key: ``class << 32 | secondary``; class 3 =
  sinks and window (secondary: the window by recency, then the sinks from the first), 2 = LSH
  matches that get LSH priority, 1 = other valid tiles (secondary: the pre-score as an
  order-preserving 32-bit integer, NaN = -inf, -0.0 = +0.0), 0 = beyond the row's tiles;
* the keep-th largest key is built two bits per pass (17 passes of three counts over the
  registers; the LSH cap's threshold the same way over the eligible tiles' scores); keys above
  it are kept, then the first keys equal to it in index order (a prefix sum), so ties go to
  the lower index;
* the kept indices are compacted in ascending order with a prefix sum and stored, -1 padded.

Two precision tiers split one ranking between the exact tier and the low-bit one:
:func:`triton_tiers_pick` marks the best eligible tiles of the sparq4 estimate (top-k masks
as above, nested) and compacts the low-bit ones with a prefix sum; its oracle is
:func:`tiers_pick_ref`.

The rules are exactly ``prescore_backend.kernels.select.select_tiles_ref``'s (ties to the lower
index), which is the oracle the tests compare against tile for tile. Shapes are fixed by the
caller's ``num_slots`` and nothing syncs with the host, so a CUDA graph can capture it.

Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["triton_select_tiles", "triton_tiers_pick", "tiers_pick_ref", "MAX_TILES"]

#: Most tiles per row (one program holds a row's keys in registers): 1M tokens at tile 16.
MAX_TILES = 1 << 16


@triton.jit
def _kth_largest(key, k, BITS: tl.constexpr):
    """The k-th largest of the int64 ``key`` values (k >= 1, duplicates counted; at least k
    keys >= 0), built two bits per pass from the top of a BITS-bit (even) range: three
    independent counts per pass, so half the dependent reductions of a bit-by-bit search."""
    lo = tl.zeros([], tl.int64)
    for i in range(BITS // 2):
        sh = BITS - 2 - 2 * i
        c1 = lo | (tl.full([], 1, tl.int64) << sh)
        c2 = lo | (tl.full([], 2, tl.int64) << sh)
        c3 = lo | (tl.full([], 3, tl.int64) << sh)
        n1 = tl.sum((key >= c1).to(tl.int32), 0)
        n2 = tl.sum((key >= c2).to(tl.int32), 0)
        n3 = tl.sum((key >= c3).to(tl.int32), 0)
        lo = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, lo)))
    return lo


@triton.jit
def _top_k_mask(key, k, BITS: tl.constexpr):
    """Mask of the k largest keys (k <= number of keys >= 0), equal keys to the lower index:
    those above the k-th largest, then the first ties in index order (a prefix sum)."""
    thr = _kth_largest(key, tl.maximum(k, 1), BITS)
    above = key > thr
    need = k - tl.sum(above.to(tl.int32), 0)
    tie = key == thr
    rank = tl.cumsum(tie.to(tl.int32), 0) - 1  # [BM] order of each tie by index
    # (tensor comparisons only: the interpreter rejects a scalar bool in a mask)
    return (above | (tie & (rank < need))) & ((rank * 0 + k) > 0)


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
    # Clamp in int64 before narrowing: a budget of 2^31 or more means "everything".
    n = tl.minimum(tl.maximum(tl.load(nt_ptr + r).to(tl.int64), 0), M).to(tl.int32)
    keep = tl.minimum(tl.minimum(tl.maximum(tl.load(bud_ptr + r).to(tl.int64), 0), n), S)
    keep = keep.to(tl.int32)
    valid = idx < n
    sc = tl.load(sc_ptr + r * stride_sr + h * stride_sh + idx * stride_sm, mask=valid,
                 other=float("-inf")).to(tl.float32)
    sc = tl.where(sc != sc, float("-inf"), sc) + 0.0  # NaN -> -inf, -0.0 -> +0.0
    bits = sc.to(tl.int32, bitcast=True)
    score = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648  # [0, 2^32)
    window = valid & (idx >= n - window_tiles)
    forced = window | (valid & (idx < sink_tiles))
    forced_sec = tl.where(window, M + 1 + idx, M - idx).to(tl.int64)  # recency, then sinks
    key = tl.where(forced, (3 << 32) | forced_sec, (1 << 32) | score)  # [BM] < 2^34
    key = tl.where(valid, key, 0)
    taken = idx < 0  # [BM] False
    if HAS_LSH:
        match = tl.load(lsh_ptr + r * stride_lr + h * stride_lh + idx * stride_lm, mask=valid,
                        other=0) != 0
        elig = match & valid & (forced == 0)
        cap = tl.minimum(tl.sum(elig.to(tl.int32), 0), lsh_cap)
        taken = _top_k_mask(tl.where(elig, score, -1), cap, 32) & elig
        key = tl.where(taken, (2 << 32) | score, key)
    chosen = _top_k_mask(key, keep, 34) & valid  # [BM]: exactly keep tiles
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
        tile_scores: ``[R, Hkv, M]`` float pre-scores (M <= :data:`MAX_TILES`); entries at index >=
            num_tiles[r] are ignored.
        num_tiles: ``[R]`` valid tiles per row; budget: ``[R]`` tiles to keep per (row, head).
        num_slots: output slots S (the step's largest budget, known on the host); rows whose
            budget exceeds it keep their S highest-priority tiles. Clamped to M.
        sink_tiles, window_tiles, lsh_match ``[R, Hkv, M]`` bool or None, lsh_cap: as
            ``prescore_backend.kernels.select.select_tiles``.

    Returns:
        tiles ``[R, Hkv, S]`` int32 ascending, -1 padded at the end; num_selected ``[R, Hkv]``
        int32; per-source counts ``[R, Hkv, 4]`` int32 (sink, window, LSH, pre-score; a tile
        that is both sink and window counts as sink).
    """
    R, H, M = tile_scores.shape
    if M > MAX_TILES:
        raise ValueError(f"triton_select_tiles holds a row's tiles in registers: at most "
                         f"{MAX_TILES} tiles per row, got {M}")
    if lsh_match is not None and tuple(lsh_match.shape) != (R, H, M):
        raise ValueError(f"lsh_match must be [R={R}, Hkv={H}, M={M}], got {tuple(lsh_match.shape)}")
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
        tile_scores, num_tiles.to(device=dev, dtype=torch.int64).contiguous(),
        budget.to(device=dev, dtype=torch.int64).contiguous(), lsh, tiles, num, counts,
        M, S, int(sink_tiles), int(window_tiles), int(lsh_cap),
        *tile_scores.stride(), *ls, *tiles.stride(),
        HAS_LSH=has_lsh, BLOCK_M=block_m, BLOCK_S=max(16, triton.next_power_of_2(max(S, 1))),
        num_warps=4 if block_m <= 2048 else 8 if block_m <= 8192 else 16,
    )
    return tiles, num, counts


# ----------------------------------------------------------------------------- two tiers' pick


@triton.jit
def _tiers_pick_kernel(
    est_ptr, nt_ptr, te_ptr, tt_ptr, marks_ptr, low_ptr,
    M, S_LOW, sink_tiles, window_tiles,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    idx = tl.arange(0, BLOCK_M)
    n = tl.minimum(tl.maximum(tl.load(nt_ptr + r).to(tl.int64), 0), M).to(tl.int32)
    in_m = idx < M
    est = tl.load(est_ptr + (r * H + h) * M + idx, mask=in_m, other=float("-inf"))
    est = est.to(tl.float32) + 0.0  # -0.0 -> +0.0
    finite = (est == est) & (est != float("inf")) & (est != float("-inf"))
    ok = in_m & finite & (idx >= sink_tiles) & (idx < n - window_tiles)  # eligible
    bits = est.to(tl.int32, bitcast=True)
    score = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648  # [0, 2^32)
    cnt = tl.sum(ok.to(tl.int32), 0)
    k_tot = tl.minimum(tl.maximum(tl.load(tt_ptr + r).to(tl.int64), 0), cnt).to(tl.int32)
    k_ex = tl.minimum(tl.maximum(tl.load(te_ptr + r).to(tl.int64), 0), k_tot).to(tl.int32)
    total = _top_k_mask(tl.where(ok, score, -1), k_tot, 32) & ok
    exact = _top_k_mask(tl.where(total, score, -1), k_ex, 32) & total
    marks = tl.where(exact, 1, tl.where(total, 2, 0)).to(tl.uint8)
    tl.store(marks_ptr + (r * H + h) * M + idx, marks, mask=in_m)
    low = total & (exact == 0)
    pos = tl.cumsum(low.to(tl.int32), 0) - 1  # ascending slot of each low-bit tile
    base = low_ptr + (r * H + h) * S_LOW
    tl.store(base + pos, idx, mask=low & (pos < S_LOW))
    offs_s = tl.arange(0, BLOCK_S)
    tl.store(base + offs_s, tl.full([BLOCK_S], -1, tl.int32),
             mask=(offs_s >= tl.sum(low.to(tl.int32), 0)) & (offs_s < S_LOW))


def triton_tiers_pick(estimate: Tensor, num_tiles: Tensor, take_exact: Tensor,
                      take_total: Tensor, *, sink_tiles: int, window_tiles: int,
                      num_low_slots: int | None = None) -> tuple[Tensor, Tensor]:
    """Both tiers' tiles from one ranking, one program per (row, KV head) (grid ``(R, Hkv)``).

    estimate ``[R, Hkv, M]`` fp32 (the sparq4 estimate); num_tiles, take_exact, take_total
    ``[R]`` int: the tiles beyond sinks and window ranked (``sink_tiles <= i < num_tiles -
    window_tiles``, finite estimates), the best ``take_exact`` marked 1 (read exactly), the
    next ones up to ``take_total`` marked 2 (read from the low-bit copy); ties to the lower
    index. Returns marks ``[R, Hkv, M]`` uint8 (0, 1, 2) and the low-bit tiles ``[R, Hkv,
    num_low_slots]`` int32 ascending, -1 pad (default M slots; more low-bit tiles than slots
    keep the lowest indices). The oracle is :func:`tiers_pick_ref`."""
    R, H, M = estimate.shape
    if M > MAX_TILES:
        raise ValueError(f"triton_tiers_pick holds a row's tiles in registers: at most "
                         f"{MAX_TILES} tiles per row, got {M}")
    dev = estimate.device
    S = M if num_low_slots is None else max(0, min(int(num_low_slots), M))
    marks = torch.empty(R, H, M, dtype=torch.uint8, device=dev)
    low = torch.empty(R, H, S, dtype=torch.int32, device=dev)
    if R == 0 or H == 0 or M == 0:
        low.fill_(-1)
        marks.zero_()
        return marks, low
    as64 = lambda t: t.to(device=dev, dtype=torch.int64).contiguous()  # noqa: E731
    block_m = max(16, triton.next_power_of_2(M))
    _tiers_pick_kernel[(R, H)](
        estimate.contiguous(), as64(num_tiles), as64(take_exact), as64(take_total), marks, low,
        M, S, int(sink_tiles), int(window_tiles),
        BLOCK_M=block_m, BLOCK_S=max(16, triton.next_power_of_2(max(S, 1))),
        num_warps=4 if block_m <= 2048 else 8 if block_m <= 8192 else 16,
    )
    return marks, low


def tiers_pick_ref(estimate: Tensor, num_tiles: Tensor, take_exact: Tensor, take_total: Tensor,
                   *, sink_tiles: int, window_tiles: int) -> Tensor:
    """Oracle of :func:`triton_tiers_pick`'s marks: per (row, KV head) a Python sort of the
    eligible tiles by (estimate descending in float64, index ascending)."""
    R, H, M = estimate.shape
    est = estimate.double().cpu()
    marks = torch.zeros(R, H, M, dtype=torch.uint8)
    for r in range(R):
        n = min(max(int(num_tiles[r]), 0), M)
        te, tt = max(int(take_exact[r]), 0), max(int(take_total[r]), 0)
        for h in range(H):
            elig = [i for i in range(sink_tiles, n - window_tiles)
                    if float(est[r, h, i]) not in (float("inf"), float("-inf"))
                    and est[r, h, i] == est[r, h, i]]
            order = sorted(elig, key=lambda i: (-float(est[r, h, i]), i))
            for rank, i in enumerate(order[:tt]):
                marks[r, h, i] = 1 if rank < te else 2
    return marks
