"""Triton sparse decode kernels, run on CPU tensors by the Triton interpreter.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own jitted
helpers and our @triton.jit kernel read it when they are defined). It is set here at import;
if triton was already imported in this process without it (e.g. by a module that imports
vLLM), these tests re-run in a fresh subprocess instead. Triton is a test dependency: a missing
triton fails, it does not skip.

On a GPU machine ``PRESCORE_TRITON_TEST_DEVICE=cuda pytest tests/test_triton_sparse_decode.py``
runs the same tests compiled for the GPU (no interpreter; bf16 then uses the native dots).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

DEVICE = os.environ.get("PRESCORE_TRITON_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
_PRE_IMPORTED = (not ON_GPU and "triton" in sys.modules
                 and os.environ.get("TRITON_INTERPRET") != "1")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (must import: no skip)

tsd = importlib.import_module("prescore_backend.kernels.triton_sparse_decode")

from prescore_backend.kernels import sparse_decode, sparse_decode_ref  # noqa: E402
from prescore_backend.kernels.testing import all_tiles, dense_attention, make_paged_case  # noqa: E402

B, T = 32, 16
HKV = 2
SEQ_LENS = [37, 64, 5]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if _PRE_IMPORTED and request.node.name != "test_in_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET: covered by test_in_fresh_process")


def test_in_fresh_process():
    if not _PRE_IMPORTED:
        return  # the tests below run in this process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the child ran the tests (a run where every test skipped would pass too)
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 10 and " skipped" not in r.stdout, r.stdout[-2000:]


def test_kernel_is_interpreted():
    interpreted = type(tsd._sparse_decode_kernel).__name__ == "InterpretedFunction"
    assert interpreted == (not ON_GPU) == tsd.INTERPRETED


@pytest.mark.parametrize("layout,group,head_dim,dtype", [
    ("cpu", 1, 64, torch.float32),
    ("cpu_rowmajor", 3, 64, torch.float32),
    ("cpu", 3, 128, torch.bfloat16),
    ("gpu", 3, 64, torch.float32),
    ("gpu", 1, 128, torch.bfloat16),
])
def test_triton_all_tiles_is_dense(layout, group, head_dim, dtype):
    case = make_paged_case(SEQ_LENS, HKV, group, head_dim, B, layout=layout, dtype=dtype,
                           seed=head_dim, device=DEVICE)
    scale = head_dim ** -0.5
    out = torch.full_like(case.query, float("nan"))  # poisoned
    o, lse = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                           case.seq_lens, all_tiles(case.seq_lens, HKV, T), T, scale,
                           impl="triton", out=out)
    assert o is out
    for r in range(len(SEQ_LENS)):
        ro, rl = dense_attention(case.query[r].cpu(), case.keys[r], case.values[r], scale)
        torch.testing.assert_close(o[r].cpu().double(), ro, **TOL[dtype])
        torch.testing.assert_close(lse[r].cpu().double(), rl, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout,group", [("cpu", 3), ("gpu", 1)])
def test_triton_matches_ref_on_random_selection(layout, group):
    case = make_paged_case(SEQ_LENS, HKV, group, 64, B, layout=layout, seed=5, device=DEVICE)
    g = torch.Generator().manual_seed(group)
    # Row 1 head 0 selects nothing; -1 padding interleaved; tiles in arbitrary order.
    tiles = torch.tensor([[[2, -1, 0], [1, -1, -1]],
                          [[-1, -1, -1], [3, 0, -1]],
                          [[-1, 0, -1], [-1, -1, -1]]], dtype=torch.int32, device=DEVICE)
    tiles = tiles[:, :, torch.randperm(3, generator=g).to(DEVICE)]
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, tiles, T, 0.125)
    o, lse = sparse_decode(*args, impl="triton")
    ro, rl = sparse_decode_ref(*args)
    o, lse = o.cpu(), lse.cpu()
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse[fin].double(), rl[fin], atol=1e-4, rtol=1e-5)
    # The torch path agrees too, including the residual merge.
    w = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.5, 1.0]], device=DEVICE)
    res = torch.tensor([[[1], [0]], [[0], [2]], [[-1], [0]]], dtype=torch.int32, device=DEVICE)
    ot, lt = sparse_decode(*args, impl="triton", residual_tiles=res, residual_weight=w)
    oc, lc = sparse_decode(*args, impl="torch", residual_tiles=res, residual_weight=w)
    torch.testing.assert_close(ot, oc, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lt, lc, atol=1e-5, rtol=1e-5)


def _random_selection(seq_lens: list[int], hkv: int, tile: int, seed: int) -> torch.Tensor:
    """Random unique tiles per (row, head) in random order, -1 padding interleaved; row 0 head 0
    selects nothing (its splits are all empty)."""
    g = torch.Generator().manual_seed(seed)
    nts = [-(-n // tile) for n in seq_lens]
    S = max(nts) + 3
    tiles = torch.full((len(seq_lens), hkv, S), -1, dtype=torch.int32)
    for r, nt in enumerate(nts):
        for h in range(hkv):
            if r == 0 and h == 0:
                continue
            k = int(torch.randint(1, nt + 1, (1,), generator=g))
            pick = torch.randperm(nt, generator=g)[:k]
            slots = torch.randperm(S, generator=g)[:k]
            tiles[r, h, slots] = pick.to(torch.int32)
    return tiles


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_triton_splits_match_ref(num_splits):
    """Flash-decoding splits (forced counts, more splits than tiles included: empty splits
    carry lse -inf and weigh nothing in the merge) give the oracle's result."""
    seq_lens = [300, 77, 512]
    case = make_paged_case(seq_lens, HKV, 4, 64, 64, seed=num_splits, device=DEVICE)
    tiles = _random_selection(seq_lens, HKV, T, num_splits).to(DEVICE)
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
            tiles, T, 0.125)
    o, lse = tsd.triton_sparse_decode(*args, num_splits=num_splits)
    ro, rl = sparse_decode_ref(*args)
    o, lse = o.cpu(), lse.cpu()
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    assert bool((o[0, :4] == 0).all())  # the empty (row, head): out 0
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse[fin].double(), rl[fin], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tile,block_n,group,head_dim,dtype,layout", [
    (8, 64, 2, 64, torch.float32, "gpu"),  # T < 16: two tiles is the smallest dot
    (16, 16, 8, 128, torch.bfloat16, "cpu"),  # one tile per iteration, G = 8
    (32, 64, 1, 128, torch.bfloat16, "gpu"),  # MHA, bf16
    (32, 128, 4, 64, torch.float32, "cpu_rowmajor"),
])
def test_triton_tile_and_iteration_sizes(tile, block_n, group, head_dim, dtype, layout):
    seq_lens = [200, 33, 129]
    case = make_paged_case(seq_lens, HKV, group, head_dim, 32, layout=layout, dtype=dtype,
                           seed=tile + block_n, device=DEVICE)
    tiles = _random_selection(seq_lens, HKV, tile, tile).to(DEVICE)
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
            tiles, tile, head_dim ** -0.5)
    out = torch.full_like(case.query, float("nan"))  # poisoned
    o, lse = tsd.triton_sparse_decode(*args, out_dtype=dtype, block_n=block_n)
    assert o.dtype == dtype
    ro, rl = sparse_decode_ref(*args)
    torch.testing.assert_close(o.cpu().double(), ro.to(dtype).double(), **TOL[dtype])
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse.cpu()), ~fin)
    torch.testing.assert_close(lse.cpu()[fin].double(), rl[fin], atol=1e-4, rtol=1e-5)
    # Every tile selected == dense attention, through sparse_decode(impl="triton").
    o2, _ = sparse_decode(*args[:5], all_tiles(case.seq_lens, HKV, tile), tile,
                          head_dim ** -0.5, impl="triton", out=out)
    for r in range(len(seq_lens)):
        ref, _ = dense_attention(case.query[r].cpu(), case.keys[r], case.values[r], head_dim ** -0.5)
        torch.testing.assert_close(o2[r].cpu().double(), ref.to(dtype).double(), **TOL[dtype])


def test_plan_splits():
    # Batch 1, 8 KV heads, 128 selected tiles, 132 SMs: 16 splits of 8 tiles (two iterations
    # each is the floor), not one program per head.
    assert tsd.plan_splits(1, 8, 128, 4, 132) == (16, 8)
    # Enough (row, head) pairs already: one program each.
    assert tsd.plan_splits(64, 8, 128, 4, 132) == (1, 128)
    assert tsd.plan_splits(1, 8, 0, 4, 132) == (1, 0)
    for rows, hkv, s, tpi, sms in [(1, 3, 1000, 4, 132), (8, 3, 77, 2, 132), (1, 1, 5000, 4, 132),
                                   (2, 8, 9, 1, 4), (3, 2, 64, 4, 16)]:
        ns, per = tsd.plan_splits(rows, hkv, s, tpi, sms)
        assert 1 <= ns <= tsd.MAX_SPLITS and per % tpi == 0
        assert ns * per >= s and (ns - 1) * per < s  # covers every tile, no empty split
        assert per >= min(s, 2 * tpi) or ns == 1


# ----------------------------------------------------------------------------- selection

tsel = importlib.import_module("prescore_backend.kernels.triton_select")


def _selection_problem(seed: int, R: int = 5, H: int = 3, M: int = 40, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(R, H, M, generator=g)
    if ties:  # ~7 distinct values, and -0.0 next to 0.0
        scores = scores.mul(1.5).round()
        scores[0, 0, :4] = -0.0
    num_tiles = torch.randint(1, M + 1, (R,), generator=g)
    num_tiles[0] = M
    budget = torch.randint(0, M + 5, (R,), generator=g)
    budget[1] = 10 ** 6  # dense row
    beyond = torch.arange(M) >= num_tiles.view(R, 1, 1)  # garbage that must be ignored
    scores = torch.where(beyond & (torch.rand(R, H, M, generator=g) < 0.5), float("inf"), scores)
    scores = torch.where(beyond & (torch.rand(R, H, M, generator=g) < 0.3), float("nan"), scores)
    scores[2, 1, 0] = float("nan")  # a valid NaN pre-score counts as -inf
    lsh = torch.rand(R, H, M, generator=g) < 0.25
    return scores, num_tiles, budget, lsh


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True)])
@pytest.mark.parametrize("sink,window,cap", [(0, 0, 0), (1, 2, 3), (2, 4, 0), (4, 16, 2)])
@pytest.mark.parametrize("use_lsh", [False, True])
def test_triton_select_matches_ref(seed, ties, sink, window, cap, use_lsh):
    """The one-kernel selection == the loop oracle tile for tile (ties to the lower index,
    budgets below sinks + window, LSH priority, NaN/inf beyond num_tiles), counts included."""
    from prescore_backend.kernels.select import select_tiles, select_tiles_ref

    scores, num_tiles, budget, lsh = _selection_problem(seed, ties=ties)
    kw = dict(sink_tiles=sink, window_tiles=window, lsh_match=lsh if use_lsh else None,
              lsh_cap=cap)
    ref = select_tiles_ref(scores, num_tiles, budget, **kw)
    dev = dict(lsh_match=lsh.to(DEVICE) if use_lsh else None)
    sel = select_tiles(scores.to(DEVICE), num_tiles.to(DEVICE), budget.to(DEVICE), impl="triton",
                       **{**kw, **dev})
    assert torch.equal(sel.tiles.cpu(), ref.tiles)
    assert torch.equal(sel.num_selected.cpu(), ref.num_selected)
    assert torch.equal(sel.source_counts.cpu(), ref.source_counts)


def test_triton_select_slots_and_edges():
    from prescore_backend.kernels.select import select_tiles_ref

    scores, num_tiles, budget, lsh = _selection_problem(7, M=300)
    kw = dict(sink_tiles=2, window_tiles=3, lsh_cap=4)
    ref = select_tiles_ref(scores, num_tiles, budget, lsh_match=lsh, **kw)
    S = ref.tiles.shape[2]
    tiles, num, _ = tsel.triton_select_tiles(scores.to(DEVICE), num_tiles.to(DEVICE),
                                             budget.to(DEVICE), num_slots=S + 5,
                                             lsh_match=lsh.to(DEVICE), **kw)
    assert tiles.shape[2] == S + 5 and (tiles[:, :, S:] == -1).all()
    assert torch.equal(tiles[:, :, :S].cpu(), ref.tiles) and torch.equal(num.cpu(), ref.num_selected)
    tiles, num, _ = tsel.triton_select_tiles(scores.to(DEVICE), num_tiles.to(DEVICE),
                                             budget.to(DEVICE), num_slots=6,
                                             lsh_match=lsh.to(DEVICE), **kw)
    cut = select_tiles_ref(scores, num_tiles, budget.clamp_max(6), lsh_match=lsh, **kw)
    assert torch.equal(tiles.cpu(), cut.tiles) and torch.equal(num.cpu(), cut.num_selected)
    # Zero budget and empty batches.
    z = torch.zeros(2, dtype=torch.long, device=DEVICE)
    tiles, num, _ = tsel.triton_select_tiles(torch.randn(2, 3, 8, device=DEVICE),
                                             torch.tensor([8, 3], device=DEVICE), z,
                                             num_slots=0, sink_tiles=1, window_tiles=1)
    assert tiles.shape == (2, 3, 0) and (num == 0).all()
    tiles, num, cnt = tsel.triton_select_tiles(torch.randn(0, 3, 8, device=DEVICE), z[:0], z[:0],
                                               num_slots=4, sink_tiles=1, window_tiles=1)
    assert tiles.shape == (0, 3, 4) and cnt.shape == (0, 3, 4)


def test_triton_select_wide_budgets_strided_inputs_and_errors():
    """Budgets past int32 mean "everything"; 1-D inputs may be strided views; bad shapes and
    rows too long for one program are refused."""
    from prescore_backend.kernels.select import select_tiles_ref

    scores, num_tiles, budget, lsh = _selection_problem(11, R=3, M=12)
    budget = torch.tensor([2 ** 31, torch.iinfo(torch.int64).max, 5])
    nt_strided = torch.stack([num_tiles, torch.zeros_like(num_tiles)], 1)[:, 0]  # stride 2
    kw = dict(sink_tiles=1, window_tiles=2, lsh_cap=2)
    ref = select_tiles_ref(scores, num_tiles, budget, lsh_match=lsh, **kw)
    tiles, num, _ = tsel.triton_select_tiles(scores.to(DEVICE), nt_strided.to(DEVICE),
                                             budget.to(DEVICE), num_slots=12,
                                             lsh_match=lsh.to(DEVICE), **kw)
    S = ref.tiles.shape[2]
    assert torch.equal(tiles[:, :, :S].cpu(), ref.tiles) and torch.equal(num.cpu(), ref.num_selected)
    with pytest.raises(ValueError, match="lsh_match"):
        tsel.triton_select_tiles(scores.to(DEVICE), num_tiles.to(DEVICE), budget.to(DEVICE),
                                 num_slots=4, lsh_match=lsh[:, :, :5].to(DEVICE), **kw)
    big = tsel.MAX_TILES + 1
    with pytest.raises(ValueError, match="at most"):
        tsel.triton_select_tiles(torch.zeros(1, 1, big, device=DEVICE),
                                 torch.tensor([big], device=DEVICE),
                                 torch.tensor([4], device=DEVICE), num_slots=4, sink_tiles=0,
                                 window_tiles=0)


def test_triton_decode_strided_seq_lens():
    seq_lens = [150, 40]
    case = make_paged_case(seq_lens, HKV, 2, 64, 32, seed=3, device=DEVICE)
    sl = torch.stack([case.seq_lens, torch.zeros_like(case.seq_lens)], 1)[:, 0]  # stride 2
    tiles = all_tiles(case.seq_lens, HKV, T)
    o, lse = tsd.triton_sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                              sl, tiles, T, 0.125)
    ro, rl = sparse_decode_ref(case.query, case.key_cache, case.value_cache, case.block_tables,
                               case.seq_lens, tiles, T, 0.125)
    torch.testing.assert_close(o.cpu().double(), ro, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), rl, atol=1e-4, rtol=1e-5)


def _lowbit_case(lens, hkv, group, d, bs, bits, seed):
    """A paged case with shuffled blocks and the low-bit copy of every full block."""
    from prescore_backend.kernels.lowbit import LowBitCopy

    case = make_paged_case(lens, hkv, group, d, bs, seed=seed, poison=None)
    nb = case.key_cache.shape[0]
    copy = LowBitCopy.allocate(nb, hkv, bs, d, bits)
    for r, n in enumerate(lens):
        ids = case.block_tables[r, : n // bs].long()
        if ids.numel():
            copy.write(ids, case.key_cache[ids].float(), case.value_cache[ids].float())
    return case, copy


@pytest.mark.parametrize("hkv,group,d,bs,bits,splits", [
    (2, 1, 64, 32, 3, None), (2, 7, 64, 16, 3, None), (1, 4, 128, 128, 2, 3),
    (3, 2, 64, 32, 4, 2), (1, 8, 64, 16, 8, 1)],
    ids=["mha", "gqa7-qwen-block16", "d128-block128-splits", "gqa2-4bit", "8bit"])
def test_triton_lowbit_decode_matches_the_loop_oracle(hkv, group, d, bs, bits, splits):
    """The low tier's Triton decode (codes rebuilt from the bit planes through a shuffled
    block table, online softmax over the group, slices merged) equals the float64 loop
    oracle on ragged rows; a row with no tile and an empty tile list give out 0, lse -inf."""
    from prescore_backend.kernels.lowbit import lowbit_decode, lowbit_decode_ref
    from prescore_backend.kernels.triton_lowbit import triton_lowbit_decode

    lens = [5 * bs + 7, 3 * bs, 2 * bs + 1, bs - 1]  # the last row has no full block
    case, copy = _lowbit_case(lens, hkv, group, d, bs, bits, seed=hkv + group + d + bs)
    g = torch.Generator().manual_seed(bits)
    S = 7
    tiles = torch.full((len(lens), hkv, S), -1, dtype=torch.int32)
    for r, n in enumerate(lens[:-1]):
        m = (n // bs) * (bs // T)
        for h in range(hkv):
            k = int(torch.randint(1, min(S, m) + 1, (1,), generator=g))
            tiles[r, h, :k] = torch.randperm(m, generator=g)[:k].sort().values.int()
    scale = d ** -0.5
    want_o, want_l = lowbit_decode_ref(case.query, copy, case.block_tables, case.seq_lens,
                                       tiles, T, scale)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    args = (dev(case.query), *(dev(t) for t in copy.tensors()), dev(case.block_tables),
            dev(case.seq_lens), dev(tiles), T, scale)
    o, lse = triton_lowbit_decode(*args, num_splits=splits)
    torch.testing.assert_close(o.cpu(), want_o, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu(), want_l, atol=2e-5, rtol=1e-5)
    assert bool(torch.isneginf(lse[-1]).all()) and bool((o[-1] == 0).all())
    o2, _ = lowbit_decode(dev(case.query), copy.__class__(*(dev(t) for t in copy.tensors())),
                          dev(case.block_tables), dev(case.seq_lens), dev(tiles), T, scale,
                          impl="triton")  # the op's "triton" entry is this kernel
    torch.testing.assert_close(o2.cpu(), want_o, atol=2e-5, rtol=1e-4)
    e_o, e_l = triton_lowbit_decode(*args[:7], dev(tiles[..., :0]), T, scale)
    assert bool((e_o == 0).all()) and bool(torch.isneginf(e_l).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_tiers_pick_matches_the_loop_oracle(seed):
    """The two tiers' pick (best eligible tiles of the estimate exact, the next ones low-bit,
    ties to the lower index, NaN / inf never picked) equals the loop oracle's marks for
    budgets from none to more than the eligible tiles; the low-bit tiles come compacted
    ascending, and truncated to the slots asked for."""
    from prescore_backend.kernels.triton_select import tiers_pick_ref, triton_tiers_pick

    g = torch.Generator().manual_seed(seed)
    R, H, M = 6, 3, 90
    est = torch.randn(R, H, M, generator=g)
    if seed == 1:  # ties: few distinct values
        est = (est * 2).round() / 2
    est[0, 0, 10:25] = 0.5
    est[1, 1, 5], est[2, 2, 7], est[3, 0, 9] = float("nan"), float("-inf"), float("inf")
    est[3, 0, 30], est[3, 0, 31] = -0.0, 0.0
    nt = torch.tensor([90, 60, 41, 77, 3, 50])
    te = torch.tensor([5, 0, 3, 40, 2, 10])
    tt = torch.tensor([20, 7, 3, 500, 4, 10])
    kw = dict(sink_tiles=2, window_tiles=4)
    want = tiers_pick_ref(est, nt, te, tt, **kw)
    marks, low = triton_tiers_pick(est.to(DEVICE), nt.to(DEVICE), te.to(DEVICE),
                                   tt.to(DEVICE), **kw)
    assert torch.equal(marks.cpu(), want)
    assert int((want == 1).sum()) > 0 and int((want == 2).sum()) > 0
    for r in range(R):
        for h in range(H):
            lo = sorted(i for i in range(M) if want[r, h, i] == 2)
            got = [t for t in low[r, h].tolist() if t >= 0]
            assert got == lo and all(t == -1 for t in low[r, h, len(lo):].tolist())
    _, low4 = triton_tiers_pick(est.to(DEVICE), nt.to(DEVICE), te.to(DEVICE), tt.to(DEVICE),
                                num_low_slots=4, **kw)
    assert low4.shape == (R, H, 4) and torch.equal(low4.cpu(), low[..., :4].cpu())


def test_two_tiers_on_the_triton_path():
    """Two precision tiers as the CUDA backend runs them (Triton end to end: the sparq4
    ranking, the pick, the exact tier's selection and decode, the low tier's decode) == an
    independent float64 oracle: the loop ranking and pick, ``sparse_decode_ref`` over sinks,
    window and the best tiles, ``lowbit_decode_ref`` over the next ones, merged by their
    log-sum-exps; the bytes read count the low-bit tokens at their cost."""
    from prescore_backend.config import PrescoreConfig
    from prescore_backend.keycopy import pack_blocks, top_channels
    from prescore_backend.kernels.lowbit import LowBitCopy, lowbit_decode_ref
    from prescore_backend.kernels.triton_select import tiers_pick_ref
    from prescore_backend.kernels.triton_sparq4 import sparq4_tile_rank_ref
    from prescore_backend.side_data import SideData
    from prescore_backend.tiers import decode_two_tiers, low_token_cost, tier_budgets

    Bt, lens, hkv, group = 128, [1100, 700], 2, 2
    case = make_paged_case(lens, hkv, group, 64, Bt, seed=9, poison=None)
    nb = case.key_cache.shape[0]
    side = SideData.allocate(nb, hkv, Bt // T, block_size=Bt, key_copy_dim=64, low_bits=3)
    for r, n in enumerate(lens):
        ids = case.block_tables[r, : n // Bt].long()
        side.kq[ids], side.kz[ids] = pack_blocks(case.key_cache[ids])
        side.low.write(ids, case.key_cache[ids], case.value_cache[ids])
    cfg = PrescoreConfig(low_tier_bits=3, sink_tokens=16, window_tokens=144)
    nt = (case.seq_lens.long() + T - 1) // T
    exact, total = tier_budgets(cfg, torch.tensor([16, 12]), nt, 64, Bt)
    bt = case.block_tables.long()
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    sd = SideData(dev(side.scores), None, None, None, kq=dev(side.kq), kz=dev(side.kz),
                  low=LowBitCopy(*(dev(t) for t in side.low.tensors())))
    kc, vc = (dev(t) for t in (case.key_cache, case.value_cache))
    low_slots = int((total - exact).max())
    out, read, sel = decode_two_tiers(cfg, dev(case.query), kc, vc, sd, dev(bt),
                                      dev(case.seq_lens), dev(nt), dev(exact), dev(total), 0.125,
                                      impl="triton", num_slots=int(exact.max()),
                                      low_slots=low_slots)
    # the oracle
    ch = top_channels(case.query, hkv, cfg.ranking_channels(64))
    est = sparq4_tile_rank_ref(case.query, side.kq, side.kz, bt, ch, T)
    forced = cfg.sink_tiles + cfg.window_tiles
    marks = tiers_pick_ref(est, nt, exact - forced, total - forced, sink_tiles=cfg.sink_tiles,
                           window_tiles=cfg.window_tiles)
    M = est.shape[-1]
    ex = torch.full((2, hkv, M), -1, dtype=torch.int32)
    lo = torch.full((2, hkv, M), -1, dtype=torch.int32)
    for r in range(2):
        n = int(nt[r])
        f = set(range(cfg.sink_tiles)) | set(range(n - cfg.window_tiles, n))
        for h in range(hkv):
            a = sorted(f | {i for i in range(M) if marks[r, h, i] == 1})
            b = [i for i in range(M) if marks[r, h, i] == 2]
            assert b, "no low-bit tile: the low tier is untested"
            ex[r, h, :len(a)], lo[r, h, :len(b)] = torch.tensor(a), torch.tensor(b)
    o1, l1 = sparse_decode_ref(case.query, case.key_cache, case.value_cache, case.block_tables,
                               case.seq_lens, ex, T, 0.125)
    o2, l2 = lowbit_decode_ref(case.query, side.low, bt, case.seq_lens, lo, T, 0.125)
    m = torch.maximum(l1.double(), l2.double())
    w1, w2 = torch.exp(l1.double() - m), torch.exp(l2.double() - m)
    want = (o1.double() * w1[..., None] + o2.double() * w2[..., None]) / (w1 + w2)[..., None]
    torch.testing.assert_close(out.cpu().double(), want, atol=2e-5, rtol=1e-4)
    c = low_token_cost(cfg, 64, Bt)
    for r in range(2):
        n = int(case.seq_lens[r])
        for h in range(hkv):
            toks = lambda ts: sum(min(T, n - t * T) for t in ts.tolist() if t >= 0)  # noqa: E731
            assert float(read[r, h]) == pytest.approx(toks(ex[r, h]) + c * toks(lo[r, h]))
    assert sel.tiles.shape[-1] == int(exact.max())


@pytest.mark.parametrize("hkv,group,d,bs,nc", [(2, 1, 64, 16, 16), (2, 7, 64, 16, 8),
                                                (1, 4, 128, 32, 24), (3, 2, 64, 128, 16)],
                         ids=["mha", "gqa7-qwen", "d128", "block128"])
def test_triton_sparq4_rank_matches_the_loop_oracle(hkv, group, d, bs, nc):
    """The sparq4 ranking kernel (the key copy read through a shuffled block table, nibbles
    widened in registers, max over tokens and the group's heads) equals the float64 loop
    oracle for every tile, over MHA, GQA 7:1 (Qwen2.5-0.5B), head dim 128, GPU and CPU block
    sizes; it allocates only its [Rs, Hkv, M] output."""
    from prescore_backend.keycopy import pack_blocks, top_channels
    from prescore_backend.kernels.triton_sparq4 import (sparq4_tile_rank_ref,
                                                       triton_sparq4_tile_rank)

    g = torch.Generator().manual_seed(hkv * 100 + group + d + bs)
    rows, mb, nb = 3, 4, 16
    keys = torch.randn(nb, hkv, bs, d, generator=g)
    kq, kz = pack_blocks(keys)
    bt = torch.randperm(nb, generator=g)[: rows * mb].view(rows, mb)
    q = torch.randn(rows, hkv * group, d, generator=g)
    ch = top_channels(q, hkv, nc)
    dev = torch.device(DEVICE)
    got = triton_sparq4_tile_rank(q.to(dev), kq.to(dev), kz.to(dev), bt.to(dev), ch.to(dev), T)
    want = sparq4_tile_rank_ref(q, kq, kz, bt, ch, T)
    assert got.shape == (rows, hkv, mb * bs // T)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-4)
