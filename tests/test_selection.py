"""Tile aggregation, vectorized tile selection vs its loop oracle, and the residual sample."""

from __future__ import annotations

import math

import pytest
import torch

from prescore_backend.kernels import sparse_decode
from prescore_backend.kernels.testing import make_paged_case
from prescore_backend.kernels.select import (
    residual_sample,
    select_tiles,
    select_tiles_ref,
    select_tiles_static,
    tokens_read,
)
from prescore_backend.kernels.select_decode import select_and_decode, select_and_decode_into
from prescore_backend.scoring.tiles import aggregate_tiles
from prescore_backend.kernels import sparse_decode_ref

def _assert_decode_matches_oracle(case, out, lse, tiles, T, dtype):
    """out, lse of a decode over ``tiles`` (scale 0.125) equal the decode oracle's, within
    the dtype's tolerance."""
    ref_o, ref_lse = sparse_decode_ref(case.query, *case.strided(), case.seq_lens, tiles, T,
                                       0.125)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_o, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


def _assert_oracle_selection_and_decode(case, out, lse, sel, ref, T, dtype):
    """The fused call's Selection is exactly the oracle's (tiles, counts, sources) and its
    decode the decode oracle's over those tiles."""
    assert torch.equal(sel.tiles, ref.tiles)
    assert torch.equal(sel.num_selected, ref.num_selected)
    assert torch.equal(sel.source_counts, ref.source_counts)
    _assert_decode_matches_oracle(case, out, lse, ref.tiles, T, dtype)


# ----------------------------------------------------------------------------- aggregation


def _agg_ref(x: torch.Tensor, T: int, how: str, valid_len: int | None, k: int | None):
    H, n = x.shape
    lim = n if valid_len is None else min(n, valid_len)
    nt = -(-n // T)
    out = torch.empty(H, nt)
    for h in range(H):
        top = set(x[h, :lim].topk(k).indices.tolist()) if how == "topk_count" else set()
        for t in range(nt):
            vals = [x[h, i].item() for i in range(t * T, min(t * T + T, lim))]
            if how == "max":
                out[h, t] = max(vals) if vals else float("-inf")
            elif how == "sum":
                out[h, t] = sum(vals)
            elif how == "mean":
                out[h, t] = sum(vals) / len(vals) if vals else float("-inf")
            else:
                out[h, t] = sum(1 for i in range(t * T, min(t * T + T, lim)) if i in top)
    return out


@pytest.mark.parametrize("how", ["max", "sum", "mean", "topk_count"])
@pytest.mark.parametrize("n,valid_len", [(64, None), (70, None), (70, 40), (5, None)])
def test_aggregate_tiles(how, n, valid_len):
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    k = 4 if how == "topk_count" else None
    got = aggregate_tiles(x, 16, how, valid_len=valid_len, k=k)
    assert got.shape == (3, -(-n // 16)) and got.dtype == torch.float32
    torch.testing.assert_close(got, _agg_ref(x, 16, how, valid_len, k))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="max"):
        aggregate_tiles(torch.randn(1, 8), 4, "median")
    with pytest.raises(ValueError, match="k"):
        aggregate_tiles(torch.randn(1, 8), 4, "topk_count")


# ----------------------------------------------------------------------------- selection


def _random_problem(seed: int, R: int = 5, H: int = 3, M: int = 40):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(R, H, M, generator=g)
    num_tiles = torch.randint(1, M + 1, (R,), generator=g)
    num_tiles[0] = M
    budget = torch.randint(0, M + 5, (R,), generator=g)
    budget[1] = 10 ** 6  # dense row
    # Entries beyond num_tiles are garbage, even +inf / NaN: they must be ignored.
    beyond = torch.arange(M) >= num_tiles.view(R, 1, 1)
    scores = torch.where(beyond & (torch.rand(R, H, M, generator=g) < 0.5), float("inf"), scores)
    scores = torch.where(beyond & (torch.rand(R, H, M, generator=g) < 0.3), float("nan"), scores)
    lsh = torch.rand(R, H, M, generator=g) < 0.25
    return scores, num_tiles, budget, lsh


IMPLS = ["torch", "cpp", "static"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sink,window,cap", [(0, 0, 0), (1, 2, 3), (2, 4, 0), (4, 16, 2)])
@pytest.mark.parametrize("use_lsh", [False, True])
def test_select_matches_ref_and_invariants(seed, sink, window, cap, use_lsh, impl):
    scores, num_tiles, budget, lsh = _random_problem(seed)
    kw = dict(sink_tiles=sink, window_tiles=window, lsh_match=lsh if use_lsh else None, lsh_cap=cap)
    sel = select_tiles(scores, num_tiles, budget, impl=impl, **kw)
    ref = select_tiles_ref(scores, num_tiles, budget, **kw)
    assert torch.equal(sel.tiles, ref.tiles)
    assert torch.equal(sel.num_selected, ref.num_selected)
    assert torch.equal(sel.source_counts, ref.source_counts)

    R, H, S = sel.tiles.shape
    keep = torch.minimum(budget.clamp_min(0), num_tiles)
    assert S == int(keep.max())
    assert sel.tiles.dtype == torch.int32 and sel.num_selected.dtype == torch.int32
    assert torch.equal(sel.num_selected, keep.view(R, 1).expand(R, H).int())
    assert int(sel.source_counts.sum()) == int(sel.num_selected.sum())
    for r in range(R):
        n, b = int(num_tiles[r]), int(keep[r])
        for h in range(H):
            row = sel.tiles[r, h].tolist()
            chosen = row[:b]
            assert row[b:] == [-1] * (S - b)  # -1 padding at the end
            assert chosen == sorted(set(chosen)) and all(0 <= t < n for t in chosen)
            forced = {t for t in range(n) if t < sink or t >= n - window}
            if b >= len(forced):
                assert forced <= set(chosen)
            if budget[r] >= n:
                assert chosen == list(range(n))  # dense


@pytest.mark.parametrize("impl", IMPLS)
def test_lsh_cap_and_priority(impl):
    M = 20
    scores = torch.arange(M, dtype=torch.float32).view(1, 1, M)  # later tiles score higher
    match = torch.zeros(1, 1, M, dtype=torch.bool)
    match[0, 0, [2, 3, 4, 5]] = True  # low-scored matches
    sel = select_tiles(scores, torch.tensor([M]), torch.tensor([6]), sink_tiles=1, window_tiles=1,
                       lsh_match=match, lsh_cap=2, impl=impl)
    # sink 0, window 19, LSH: the two best-scored matches 5 and 4, then top scores 18, 17.
    assert sel.tiles[0, 0].tolist() == [0, 4, 5, 17, 18, 19]
    assert sel.source_counts.tolist() == [1, 1, 2, 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_budget_below_forced_prefers_recent_window(impl):
    scores = torch.randn(1, 2, 10)
    sel = select_tiles(scores, torch.tensor([10]), torch.tensor([3]), sink_tiles=2, window_tiles=4,
                       impl=impl)
    assert sel.tiles[0, 0].tolist() == [7, 8, 9]
    sel = select_tiles(scores, torch.tensor([10]), torch.tensor([5]), sink_tiles=2, window_tiles=4,
                       impl=impl)
    assert sel.tiles[0, 1].tolist() == [0, 6, 7, 8, 9]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_budget_and_empty(impl):
    sel = select_tiles(torch.randn(2, 3, 8), torch.tensor([8, 3]), torch.tensor([0, 0]),
                       sink_tiles=1, window_tiles=1, impl=impl)
    assert sel.tiles.shape == (2, 3, 0) and (sel.num_selected == 0).all()
    sel = select_tiles(torch.randn(0, 3, 8), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), sink_tiles=1, window_tiles=1, impl=impl)
    assert sel.tiles.shape == (0, 3, 0) and int(sel.source_counts.sum()) == 0


@pytest.mark.parametrize("impl", ["cpp", "static"])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("use_lsh", [False, True])
def test_cpp_select_breaks_ties_like_ref(seed, use_lsh, impl):
    """Integer pre-scores (many exact ties): the C++ and the static selections equal the
    oracle tile for tile."""
    scores, num_tiles, budget, lsh = _random_problem(seed, M=64)
    scores = torch.where(scores.isfinite(), scores.mul(1.5).round(), scores)  # ~7 distinct values
    scores[0, 0, :5] = -0.0  # -0.0 and 0.0 are equal: the integer keys must tie them too
    scores[0, 0, 5:9] = 0.0
    kw = dict(sink_tiles=2, window_tiles=3, lsh_match=lsh if use_lsh else None, lsh_cap=5)
    sel = select_tiles(scores, num_tiles, budget, impl=impl, **kw)
    ref = select_tiles_ref(scores, num_tiles, budget, **kw)
    assert torch.equal(sel.tiles, ref.tiles)
    assert torch.equal(sel.source_counts, ref.source_counts)


def test_static_select_fixed_slots():
    """The static selection's shape is fixed by num_slots, not by the data (CUDA graphs): more
    slots pad with -1; fewer cut each row to its highest-priority tiles (forced tiles first)."""
    scores, num_tiles, budget, lsh = _random_problem(3, M=48)
    kw = dict(sink_tiles=2, window_tiles=3, lsh_match=lsh, lsh_cap=4)
    ref = select_tiles_ref(scores, num_tiles, budget, **kw)
    S = ref.tiles.shape[2]
    wide = select_tiles_static(scores, num_tiles, budget, num_slots=S + 7, **kw)
    assert wide.tiles.shape[2] == min(S + 7, 48)
    assert torch.equal(wide.tiles[:, :, :S], ref.tiles) and (wide.tiles[:, :, S:] == -1).all()
    assert torch.equal(wide.num_selected, ref.num_selected)
    assert torch.equal(wide.source_counts, ref.source_counts)
    narrow = select_tiles_static(scores, num_tiles, budget, num_slots=6, **kw)
    cut = select_tiles_ref(scores, num_tiles, budget.clamp_max(6), **kw)
    assert torch.equal(narrow.tiles, cut.tiles)
    assert torch.equal(narrow.num_selected, cut.num_selected)


def test_select_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        select_tiles(torch.randn(1, 1, 4), torch.tensor([4]), torch.tensor([2]), sink_tiles=0,
                     window_tiles=0, impl="fortran")


# ----------------------------------------------------------------------------- residual


def test_residual_sample_properties():
    scores, num_tiles, budget, _ = _random_problem(3)
    sel = select_tiles(scores, num_tiles, budget, sink_tiles=1, window_tiles=2)
    m = 5
    g = torch.Generator().manual_seed(0)
    res, w = residual_sample(sel.tiles, num_tiles, m, generator=g, max_tiles=scores.shape[-1])
    res2, w2 = residual_sample(sel.tiles, num_tiles, m, generator=torch.Generator().manual_seed(0),
                               max_tiles=scores.shape[-1])
    assert torch.equal(res, res2) and torch.equal(w, w2)  # deterministic given the generator
    assert res.shape == (*sel.tiles.shape[:2], m) and res.dtype == torch.int32
    for r in range(res.shape[0]):
        n = int(num_tiles[r])
        for h in range(res.shape[1]):
            selected = {t for t in sel.tiles[r, h].tolist() if t >= 0}
            unsel = n - len(selected)
            drawn = [t for t in res[r, h].tolist() if t >= 0]
            assert len(drawn) == min(m, unsel) and drawn == sorted(set(drawn))
            assert res[r, h, len(drawn):].eq(-1).all()
            assert all(0 <= t < n and t not in selected for t in drawn)
            expect = unsel / len(drawn) if drawn else 0.0
            assert math.isclose(float(w[r, h]), expect, rel_tol=1e-6)


def test_residual_estimator_is_unbiased():
    """E[w * exp(lse_residual)] = exp-sum of the unselected keys (HyperAttention's residual).

    N independent draws are batched as N rows over the same cached sequence. Each unselected
    tile is sampled with probability m/n_u, so the estimator is unbiased; by the CLT its mean
    over N draws lies within 4 standard errors of the truth except with probability ~6e-5 (the
    seed is fixed, so the test is deterministic).
    """
    N, n, T, Hkv, G, D = 4000, 300, 16, 1, 2, 32
    base = make_paged_case([n], Hkv, G, D, 32, seed=0)
    rows = lambda x: x.expand(N, *x.shape[1:])  # noqa: E731
    q, bt, sl = rows(base.query), rows(base.block_tables), rows(base.seq_lens)
    nt = -(-n // T)
    selected = torch.tensor([0, 5, 6, 18], dtype=torch.int32).view(1, 1, 4).expand(N, Hkv, 4)
    res, w = residual_sample(selected, sl.new_full((N,), nt), 3, generator=torch.Generator().manual_seed(1))
    _, lse = sparse_decode(q, base.key_cache, base.value_cache, bt, sl, res, T, 0.5)  # [N, Hq]
    est = (lse.double() + w.double().log().repeat_interleave(G, 1)).exp()  # [N, Hq]
    unsel = torch.tensor([t for t in range(nt) if t not in {0, 5, 6, 18}], dtype=torch.int32)
    _, true_lse = sparse_decode(base.query, base.key_cache, base.value_cache, base.block_tables,
                                base.seq_lens, unsel.view(1, 1, -1), T, 0.5)
    truth = true_lse.double().exp()[0]  # [Hq]
    mean, se = est.mean(0), est.std(0) / math.sqrt(N)
    assert ((mean - truth).abs() <= 4 * se).all(), (mean, truth, se)
    assert (se < 0.05 * truth).all()  # the bound is informative, not vacuous


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("use_lsh", [False, True])
def test_select_fast_path_matches_ref(seed, use_lsh, impl):
    """Budgets that fit sinks + window + the LSH cap take the single-top-k fast path."""
    scores, num_tiles, budget, lsh = _random_problem(seed)
    kw = dict(sink_tiles=2, window_tiles=3, lsh_match=lsh if use_lsh else None, lsh_cap=4)
    budget = budget.clamp_min(2 + 3 + 4)
    sel = select_tiles(scores, num_tiles, budget, impl=impl, **kw)
    ref = select_tiles_ref(scores, num_tiles, budget, **kw)
    assert torch.equal(sel.tiles, ref.tiles)
    assert torch.equal(sel.num_selected, ref.num_selected)
    assert torch.equal(sel.source_counts, ref.source_counts)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("layout,dtype,group", [("cpu", torch.float32, 3), ("cpu_amx", torch.bfloat16, 3),
                                                ("cpu", torch.bfloat16, 9), ("gpu", torch.float32, 2),
                                                # G > 8: the packed loop declines, blocks unpacked
                                                ("cpu_amx", torch.bfloat16, 9)])
@pytest.mark.parametrize("use_lsh", [False, True])
def test_select_and_decode_is_select_then_decode(impl, layout, dtype, group, use_lsh):
    """One fused call (cpp) or the two steps (torch) == the selection oracle's tiles decoded by
    the decode oracle: ragged rows, a dense row, a partial last tile, shuffled blocks."""
    lens = [300, 37, 129, 256]
    T, hkv = 16, 2
    case = make_paged_case(lens, hkv, group, 64, 64, layout=layout, dtype=dtype, seed=group)
    g = torch.Generator().manual_seed(group + use_lsh)
    M = max(-(-n // T) for n in lens)
    num_tiles = torch.tensor([-(-n // T) for n in lens])
    scores = torch.randn(len(lens), hkv, M, generator=g)
    budget = torch.tensor([6, 100, 5, 7])  # row 1 dense
    lsh = torch.rand(len(lens), hkv, M, generator=g) < 0.3 if use_lsh else None
    kw = dict(sink_tiles=1, window_tiles=2, lsh_match=lsh, lsh_cap=2 if use_lsh else 0)
    out, lse, sel, sec = select_and_decode(
        case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, scores,
        num_tiles, budget, tile_size=T, scale=0.125, kv_layout=case.kv_layout, impl=impl, **kw)
    ref = select_tiles_ref(scores, num_tiles, budget, **kw)
    if impl == "cpp":  # exactly the oracle's tiles; torch may break exact ties differently
        assert torch.equal(sel.tiles, ref.tiles)
        assert torch.equal(sel.source_counts, ref.source_counts)
    assert torch.equal(sel.num_selected, ref.num_selected)
    assert sec >= 0.0 and out.dtype == dtype and out.shape == case.query.shape
    _assert_decode_matches_oracle(case, out, lse, ref.tiles, T, dtype)


@pytest.mark.parametrize("layout,dtype,group", [("cpu", torch.float32, 3),
                                                ("cpu_amx", torch.bfloat16, 2),
                                                # G > 8: the packed loop declines, unpacked
                                                ("cpu_amx", torch.bfloat16, 9)])
@pytest.mark.parametrize("bits", [3, 7])
def test_select_and_decode_lsh_in_place_is_query_aware_pick(layout, dtype, group, bits):
    """The fused call's in-place LSH (the query group hashed in C++, the tiles' bucket sets
    read through the shuffled block table, per-row caps, unscored tiles never picked) selects
    exactly what the backend's torch path does: ``query_aware_pick`` with
    ``query_aware="lsh"`` then the selection oracle; the decode matches the decode oracle."""
    from types import SimpleNamespace

    from prescore_backend.selection import query_aware_pick
    from prescore_backend.kernels import AngularLSH, bucket_masks
    from prescore_backend.kernels.layouts import amx_unpack

    lens = [300, 37, 129, 256]
    T, hkv, D, B = 16, 2, 64, 64
    case = make_paged_case(lens, hkv, group, D, B, layout=layout, dtype=dtype, seed=bits + group)
    lsh = AngularLSH(bits, D, seed=1)
    kc = amx_unpack(case.key_cache, case.value_cache)[0] if case.kv_layout == "amx" \
        else case.key_cache  # [NB, Hkv, B, D] by physical block
    nb = kc.shape[0]
    masks = bucket_masks(lsh.hash(kc.float().nan_to_num()).view(nb, hkv, B // T, T),
                         bits).contiguous()  # [NB, Hkv, B/T, W]
    g = torch.Generator().manual_seed(bits)
    M = case.block_tables.shape[1] * (B // T)  # tile slots of the block table, as the backend
    num_tiles = torch.tensor([-(-n // T) for n in lens])
    scores = torch.randn(len(lens), hkv, M, generator=g)
    scores[:, :, 3] = float("-inf")  # not scored yet: never an LSH pick
    scores[3, :, 1:11] = float("-inf")  # row 3: fewer finite matches than its cap
    budget = torch.tensor([9, 100, 5, 12])  # row 1 dense
    caps = torch.tensor([3, 2, 0, 6])
    cfg = SimpleNamespace(query_aware="lsh", uses_lsh=True, uses_bounds=False, uses_keys=False,
                          uses_key_copy=False, uses_codes=False, lsh_bits=bits,
                          sink_tiles=1, window_tiles=2)
    pick = query_aware_pick(cfg, case.query, SimpleNamespace(masks=masks),
                            case.block_tables.long(), scores, num_tiles, caps, lsh=lsh,
                            impl="torch")
    ref = select_tiles_ref(scores, num_tiles, budget, sink_tiles=1, window_tiles=2,
                           lsh_match=pick, lsh_cap=int(caps.max()))
    assert int(ref.source_counts[2]) > 0  # the case exercises LSH picks
    out, lse, sel, _ = select_and_decode(
        case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, scores,
        num_tiles, budget, tile_size=T, scale=0.125, sink_tiles=1, window_tiles=2,
        lsh_in_place=(lsh.proj, masks, caps), kv_layout=case.kv_layout, impl="cpp")
    _assert_oracle_selection_and_decode(case, out, lse, sel, ref, T, dtype)


def _key_copy(case, B):
    """The 4-bit key copy of every physical block of a case's cache -> kq, kz."""
    from prescore_backend.keycopy import pack_blocks
    from prescore_backend.kernels.layouts import amx_unpack

    kc = amx_unpack(case.key_cache, case.value_cache)[0] if case.kv_layout == "amx" \
        else case.key_cache  # [NB, Hkv, B, D] by physical block
    return pack_blocks(kc.float().nan_to_num())


@pytest.mark.parametrize("layout,dtype,group", [("cpu", torch.float32, 3),
                                                ("cpu_amx", torch.bfloat16, 2),
                                                # G > 8: the packed loop declines, unpacked
                                                ("cpu_amx", torch.bfloat16, 9)])
@pytest.mark.parametrize("paged", [False, True])
def test_select_and_decode_sparq4_in_place_is_query_aware_pick(layout, dtype, group, paged):
    """The fused call's in-place sparq4 (each (row, KV head) ranked on the key copy read
    through the shuffled block table, per-row caps; a row whose picks outnumber the room left
    after sinks and window keeps its best pre-scores among them) selects exactly what the
    backend's split path does: ``cpu_sparq4_pick`` then the selection oracle with the pick as
    lsh_match. With ``paged`` the pre-scores are read per physical block through the table."""
    from prescore_backend.kernels.cpu_select import cpu_sparq4_pick
    from prescore_backend.kernels.select_decode import paged_tile_scores

    lens = [300, 37, 129, 256]
    T, hkv, D, B = 16, 2, 64, 64
    case = make_paged_case(lens, hkv, group, D, B, layout=layout, dtype=dtype, seed=group + 3)
    kq, kz = _key_copy(case, B)
    g = torch.Generator().manual_seed(group)
    M = case.block_tables.shape[1] * (B // T)
    num_tiles = torch.tensor([-(-n // T) for n in lens])
    block_scores = torch.randn(kq.shape[0], hkv, B // T, generator=g)
    scores = paged_tile_scores(block_scores, case.block_tables)  # [R, Hkv, M]
    budget = torch.tensor([9, 100, 5, 12])  # row 1 dense
    caps = torch.tensor([3, 2, 4, 0])  # row 2: 4 picks, room for 5 - 1 - 2; row 3: none
    pick = cpu_sparq4_pick(case.query, kq, kz, case.block_tables.long(), num_tiles, caps,
                           num_tile_slots=M, channels=8, tile_size=T, sink_tiles=1,
                           window_tiles=2)
    ref = select_tiles_ref(scores, num_tiles, budget, sink_tiles=1, window_tiles=2,
                           lsh_match=pick, lsh_cap=int(caps.max()))
    assert int(ref.source_counts[2]) == hkv * (3 + 2)  # rows 0 and 2 (capped by its room)
    out, lse, sel, _ = select_and_decode(
        case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
        block_scores if paged else scores, num_tiles, budget, tile_size=T, scale=0.125,
        sink_tiles=1, window_tiles=2, sparq4_in_place=(kq, kz, caps, 8), paged_scores=paged,
        kv_layout=case.kv_layout, impl="cpp")
    _assert_oracle_selection_and_decode(case, out, lse, sel, ref, T, dtype)


@pytest.mark.parametrize("impl,lsh", [("cpp", "none"), ("cpp", "match"), ("cpp", "in_place"),
                                      ("cpp", "sparq4"), ("torch", "none"),
                                      ("torch", "match")])
@pytest.mark.parametrize("layout,dtype,group,out_dtype", [
    ("cpu", torch.float32, 3, torch.float32), ("cpu_amx", torch.bfloat16, 2, torch.bfloat16),
    ("cpu", torch.bfloat16, 3, torch.float32),  # out in its own dtype
    ("cpu_amx", torch.bfloat16, 9, torch.bfloat16)])  # G > 8: unpacked, then the generic loop
def test_select_and_decode_into_writes_rows_and_counters(impl, lsh, layout, dtype, group,
                                                         out_dtype):
    """The backend's in-place call: out[rows[r]] = select_and_decode's row r (read from
    query[rows[r]]), other rows untouched; the tokens read and per-source counts added to
    stats[0:5] (tokens checked against a loop over the oracle's tiles), stats[5:] untouched.
    (lsh_in_place and sparq4_in_place are the fused call's only; other impls refuse them; the
    sparq4 case also reads the pre-scores per physical block: paged_scores.)"""
    from prescore_backend.kernels import AngularLSH, bucket_masks
    from prescore_backend.kernels.layouts import amx_unpack

    lens = [300, 37, 129, 256]
    T, hkv, D, B = 16, 2, 64, 64
    case = make_paged_case(lens, hkv, group, D, B, layout=layout, dtype=dtype, seed=group + 7)
    g = torch.Generator().manual_seed(group)
    R, N = len(lens), 7
    rows = torch.tensor([4, 0, 6, 2])
    query = torch.randn(N, *case.query.shape[1:], generator=g).to(dtype)  # other rows: noise
    query[rows] = case.query
    M = case.block_tables.shape[1] * (B // T)
    num_tiles = torch.tensor([-(-n // T) for n in lens])
    scores = torch.randn(R, hkv, M, generator=g)
    budget = torch.tensor([6, 100, 5, 9])  # row 1 dense
    kw = dict(tile_size=T, scale=0.125, sink_tiles=1, window_tiles=2, kv_layout=case.kv_layout)
    if lsh == "match":
        kw.update(lsh_match=torch.rand(R, hkv, M, generator=g) < 0.3, lsh_cap=2)
    elif lsh == "in_place":
        ah = AngularLSH(5, D, seed=1)
        kc = amx_unpack(case.key_cache, case.value_cache)[0] if case.kv_layout == "amx" \
            else case.key_cache
        nb = kc.shape[0]
        masks = bucket_masks(ah.hash(kc.float().nan_to_num()).view(nb, hkv, B // T, T),
                             5).contiguous()
        kw.update(lsh_in_place=(ah.proj, masks, torch.tensor([2, 1, 0, 3])))
    elif lsh == "sparq4":
        kq, kz = _key_copy(case, B)
        scores = torch.randn(kq.shape[0], hkv, B // T, generator=g)  # per physical block
        kw.update(sparq4_in_place=(kq, kz, torch.tensor([2, 1, 0, 3]), 8), paged_scores=True)
    args = (case.key_cache, case.value_cache, case.block_tables, case.seq_lens, scores,
            num_tiles, budget)
    ref_out, _, sel, _ = select_and_decode(case.query, *args, impl=impl, **kw)
    out = torch.full((N + 2, *case.query.shape[1:]), float("nan"), dtype=out_dtype)
    stats = torch.tensor([10, 0, 0, 0, 0, -1, -2, -3])
    sec = select_and_decode_into(query, *args, out, rows=rows, stats=stats, impl=impl, **kw)
    assert sec >= 0.0
    if out_dtype == dtype:
        assert torch.equal(out[rows], ref_out)
    else:  # fp32 out of a bf16 query: the fp32 result, not its bf16 rounding
        torch.testing.assert_close(out[rows], ref_out.float(), atol=1e-2, rtol=1e-2)
    untouched = torch.ones(N + 2, dtype=torch.bool)
    untouched[rows] = False
    assert out[untouched].isnan().all()
    tokens = sum(min(T, lens[r] - int(t) * T) for r in range(R) for h in range(hkv)
                 for t in sel.tiles[r, h, : int(sel.num_selected[r, h])])
    assert int(tokens_read(sel.tiles, case.seq_lens, T).sum()) == tokens
    assert stats[0] == 10 + tokens and torch.equal(stats[1:5], sel.source_counts)
    assert stats[1:5].sum() == sel.num_selected.sum() and stats[5:].tolist() == [-1, -2, -3]
    # rows=None: row r in, row r out; counters accumulate
    out2 = torch.empty(R, *case.query.shape[1:], dtype=out_dtype)
    select_and_decode_into(case.query, *args, out2, stats=stats, impl=impl, **kw)
    assert torch.equal(out2, out[rows])
    assert stats[0] == 10 + 2 * tokens and torch.equal(stats[1:5], 2 * sel.source_counts)


def test_select_and_decode_into_errors():
    """Rows outside query or out, a stats tensor of the wrong dtype, mismatched out heads,
    block-table rows or score heads: clear errors, nothing written."""
    case = make_paged_case([40], 2, 2, 64, 32, seed=0)
    args = (case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
            torch.randn(1, 2, 3), torch.tensor([3]), torch.tensor([3]))
    kw = dict(tile_size=16, scale=0.125, sink_tiles=1, window_tiles=1, impl="cpp")
    out = torch.zeros(2, 4, 64)
    with pytest.raises(RuntimeError, match="row index out of range"):
        select_and_decode_into(case.query, *args, out, rows=torch.tensor([1]), **kw)
    with pytest.raises(RuntimeError, match="row index out of range"):
        select_and_decode_into(case.query, *args, out, rows=torch.tensor([-1]), **kw)
    with pytest.raises(RuntimeError, match="stats must be int64"):
        select_and_decode_into(case.query, *args, out, stats=torch.zeros(5), **kw)
    with pytest.raises(RuntimeError, match="stats must be int64"):
        select_and_decode_into(case.query, *args, out, stats=torch.zeros(4, dtype=torch.int64),
                               **kw)
    with pytest.raises(RuntimeError, match=r"query and out \[N, Hq, D\]"):  # 3 heads, not 4
        select_and_decode_into(case.query, *args, torch.zeros(2, 3, 64), **kw)
    with pytest.raises(RuntimeError, match="one block table row"):
        select_and_decode_into(case.query.expand(2, -1, -1), *args, out,
                               rows=torch.tensor([0, 1]), **kw)
    with pytest.raises(RuntimeError, match=r"tile_scores must be \[R, Hkv, M\]"):
        select_and_decode_into(case.query, *args[:4], torch.randn(1, 1, 3), *args[5:], out, **kw)
    assert not out.any()


def test_select_and_decode_in_place_errors():
    """lsh_in_place and sparq4_in_place are the fused CPU call's: other impls, both at once
    and mismatched shapes are refused."""
    from prescore_backend.kernels import AngularLSH

    case = make_paged_case([40], 2, 2, 64, 32, seed=0)
    lsh = AngularLSH(4, 64, seed=0)
    nb = case.key_cache.shape[0]
    masks = torch.zeros(nb, 2, 2, 1, dtype=torch.int64)
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
            torch.randn(1, 2, 3), torch.tensor([3]), torch.tensor([3]))
    kw = dict(tile_size=16, scale=0.125, sink_tiles=1, window_tiles=1)
    with pytest.raises(ValueError, match="impl='cpp'"):
        select_and_decode(*args, **kw, lsh_in_place=(lsh.proj, masks, torch.tensor([1])),
                          impl="torch")
    with pytest.raises(RuntimeError, match="lsh_masks"):  # B / T tiles per block: 2, not 3
        select_and_decode(*args, **kw, impl="cpp", lsh_in_place=(
            lsh.proj, torch.zeros(nb, 2, 3, 1, dtype=torch.int64), torch.tensor([1])))
    kq = torch.zeros(nb, 2, 64, 16, dtype=torch.uint8)  # [NB, Hkv, D, B/2]
    kz = torch.zeros(nb, 2, 2, 64)
    s4 = (kq, kz, torch.tensor([1]), 8)
    with pytest.raises(ValueError, match="sparq4_in_place needs impl='cpp'"):
        select_and_decode(*args, **kw, sparq4_in_place=s4, impl="torch")
    with pytest.raises(RuntimeError, match="not both"):
        select_and_decode(*args, **kw, impl="cpp", sparq4_in_place=s4,
                          lsh_in_place=(lsh.proj, masks, torch.tensor([1])))
    with pytest.raises(RuntimeError, match="block size"):  # a copy of 16-token blocks
        select_and_decode(*args, **kw, impl="cpp", sparq4_in_place=(
            torch.zeros(nb, 2, 64, 8, dtype=torch.uint8), kz, torch.tensor([1]), 8))
    with pytest.raises(RuntimeError, match="paged tile_scores"):  # 3 tiles per block, not 2
        select_and_decode(*args[:5], torch.randn(nb, 2, 3), *args[6:], **kw, impl="cpp",
                          paged_scores=True)
