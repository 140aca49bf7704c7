"""Side data, budgets and the query-aware pick (side_data.py, selection.py): the vLLM-free core shared by the backends and the evaluation."""

from __future__ import annotations

import pytest
import torch

from prescore_backend.config import PrescoreConfig
from prescore_backend.kernels.select import tokens_read
from prescore_backend.selection import config_budget, floor_budget, query_caps, select_decode_tiles
from prescore_backend.side_data import ScoreJob, SideData, record_decode_tokens, run_score_jobs
from prescore_backend.kernels.lsh import AngularLSH, num_words
from prescore_backend.kernels.testing import make_paged_case
from prescore_backend.scoring import get_scorer


def _filled(cfg: PrescoreConfig, seq_lens: list[int], seed: int = 0,
            dtype: torch.dtype = torch.float32, layout: str = "cpu"):
    B, hkv, d = 128, 3, 64
    case = make_paged_case(seq_lens, hkv, 3, d, B, seed=seed, poison=None, dtype=dtype,
                           layout=layout)
    side = SideData.allocate(case.key_cache.shape[0], hkv, B // cfg.tile_size,
                             lsh_words=num_words(cfg.lsh_bits), head_dim=d, dtype=dtype)
    lsh = AngularLSH(cfg.lsh_bits, d, seed=cfg.seed)
    scorer = get_scorer(cfg.method)
    jobs = [ScoreJob(block_ids=case.block_tables[r, :-(-n // B)].long(), seq_len=n, first_pos=0,
                     per_token=True, blocks_done=(0, n // B)) for r, n in enumerate(seq_lens)]
    run_score_jobs(side, jobs, case.key_cache, scorer_for=lambda m: scorer,
                   tile_size=cfg.tile_size, aggregate=cfg.aggregate, lsh=lsh, lsh_bits=cfg.lsh_bits,
                   kv_layout=case.kv_layout)
    return case, side, lsh


def test_score_jobs_read_the_packed_amx_layout_like_the_vec_one() -> None:
    """The same keys written in vLLM's "vec" and packed "amx" layouts give identical side data
    (scores, LSH masks, Quest bounds): the jobs unpack K before scoring."""
    cfg = PrescoreConfig(query_aware="lsh_quest")
    lens = [300, 1000]
    _, vec, _ = _filled(cfg, lens, dtype=torch.bfloat16, layout="cpu")
    _, amx, _ = _filled(cfg, lens, dtype=torch.bfloat16, layout="cpu_amx")
    assert torch.isfinite(vec.scores).any()
    for name in ("scores", "masks", "kmin", "kmax"):
        assert torch.equal(getattr(vec, name), getattr(amx, name)), name


def test_rows_with_different_budgets_select_as_alone() -> None:
    """A row's selection does not depend on its batch neighbours' budgets (per-row caps)."""
    for mode in ("quest", "lsh", "lsh_quest"):
        cfg = PrescoreConfig(query_aware=mode)
        n = 3000
        case, side, lsh = _filled(cfg, [n] * 3)
        nt = torch.full((3,), -(-n // 16), dtype=torch.int64)
        budgets = torch.stack([floor_budget(cfg, config_budget(cfg.replace(keep_ratio=r), nt[:1]))
                               for r in (0.5, 0.125, 1 / 32)]).view(3)
        bt = case.block_tables.long()
        sel, _, _ = select_decode_tiles(cfg, case.query, side, bt, nt, budgets,
                                        query_caps(cfg, budgets), lsh=lsh)
        for r in range(3):
            alone, _, _ = select_decode_tiles(cfg, case.query[r:r + 1], side, bt[r:r + 1], nt[r:r + 1],
                                              budgets[r:r + 1], query_caps(cfg, budgets[r:r + 1]),
                                              lsh=lsh)
            k = int(alone.num_selected[0, 0])
            assert torch.equal(sel.tiles[r, :, :k], alone.tiles[0, :, :k]), (mode, r)
            assert bool((sel.tiles[r, :, k:] == -1).all())
            read = tokens_read(alone.tiles, case.seq_lens[r:r + 1], 16)
            assert bool((read <= budgets[r] * 16).all())


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_tokens_extend_tile_bounds(impl, dtype) -> None:
    """Quest bounds recorded token by token equal the chunk-recorded ones, and a token that
    starts a tile marks it unscored (-inf) while a token that extends one keeps its score."""
    cfg = PrescoreConfig(query_aware="lsh_quest")
    n = 300
    case, side, lsh = _filled(cfg, [n], dtype=dtype)
    chunk = SideData(side.scores.clone(), side.masks.clone(), side.kmin.clone(), side.kmax.clone())
    side.kmin.zero_(), side.kmax.zero_(), side.masks.zero_()
    keys = case.keys[0]  # [Hkv, n, D]
    bt = case.block_tables[0].long()
    side.scores.fill_(1.0)
    for p in range(n):
        record_decode_tokens(side, keys[:, p].unsqueeze(0), bt[p // 128].view(1),
                             torch.tensor([(p % 128) // 16]), torch.tensor([p % 16 == 0]),
                             lsh=lsh, lsh_bits=cfg.lsh_bits, impl=impl)
        blk, t = bt[p // 128], (p % 128) // 16
        assert bool((side.scores[blk, :, t] == float("-inf")).all())
    used = bt[: -(-n // 128)]
    touched = torch.zeros_like(side.scores, dtype=torch.bool)
    for t in range(-(-n // 16)):
        touched[bt[t * 16 // 128], :, (t * 16 % 128) // 16] = True
    assert bool((side.scores[touched] == float("-inf")).all())
    assert bool((side.scores[~touched] == 1.0).all())
    assert torch.equal(side.kmin[used], chunk.kmin[used])
    assert torch.equal(side.kmax[used], chunk.kmax[used])
    assert torch.equal(side.masks[used], chunk.masks[used])


def test_cpp_quest_pick_and_selection_match_torch() -> None:
    """The C++ Quest ranking + selection pick the same tiles as the torch ops (ragged rows,
    per-row caps, every query-aware mode). Bounds are continuous, so exact ties do not occur."""
    from prescore_backend.selection import query_aware_pick

    for mode in ("quest", "lsh_quest", "lsh", "none"):
        cfg = PrescoreConfig(query_aware=mode)
        lens = [3000, 1700, 2500]
        case, side, lsh = _filled(cfg, lens, seed=3)
        nt = torch.tensor([-(-n // 16) for n in lens], dtype=torch.int64)
        budget = floor_budget(cfg, config_budget(cfg, nt))
        caps = query_caps(cfg, budget)
        bt = case.block_tables.long()
        M = bt.shape[1] * side.tiles_per_block
        scores = side.scores[bt].permute(0, 2, 1, 3).reshape(3, side.scores.shape[1], M)
        got = {}
        for impl in ("torch", "cpp"):
            pick = query_aware_pick(cfg, case.query, side, bt, scores, nt, caps, lsh=lsh, impl=impl)
            sel, _, _ = select_decode_tiles(cfg, case.query, side, bt, nt, budget, caps, lsh=lsh,
                                            impl=impl)
            got[impl] = (pick, sel)
        (p_t, s_t), (p_c, s_c) = got["torch"], got["cpp"]
        if mode == "none":
            assert p_t is None and p_c is None
        else:
            assert torch.equal(p_t, p_c), mode
            assert bool(((p_c.sum(-1) <= caps.view(3, 1)) & (p_c.sum(-1) > 0)).all())
        assert torch.equal(s_t.tiles, s_c.tiles), mode
        assert torch.equal(s_t.source_counts, s_c.source_counts), mode


@pytest.mark.parametrize("dtype,head_dim,group", [(torch.float32, 64, 3), (torch.bfloat16, 64, 3),
                                                  (torch.bfloat16, 128, 2), (torch.float32, 48, 4),
                                                  (torch.bfloat16, 16, 1)])
def test_cpp_quest_pick_matches_bound_oracle(dtype, head_dim, group) -> None:
    """cpu_quest_pick == the Quest definition computed directly: per eligible tile (not sink, not
    window, a candidate when given) the bound max over the group of sum_d max(q*min, q*max),
    the caps[r] highest per (row, KV head); bounds read through a shuffled block table, rows
    starting and ending mid-block."""
    from prescore_backend.kernels.cpu_select import cpu_quest_pick

    g = torch.Generator().manual_seed(head_dim + group)
    R, hkv, tpb, D = 3, 2, 8, head_dim
    nblocks = 20
    kmin = torch.randn(nblocks, hkv, tpb, D, generator=g).to(dtype)
    kmax = (kmin.float() + torch.rand(nblocks, hkv, tpb, D, generator=g)).to(dtype)
    bt = torch.stack([torch.randperm(nblocks, generator=g)[:6] for _ in range(R)])  # [R, 6]
    nt = torch.tensor([45, 17, 48])
    caps = torch.tensor([5, 3, 40])
    M = 6 * tpb
    q = torch.randn(R, hkv * group, D, generator=g)
    cand = torch.rand(R, hkv, M, generator=g) < 0.6
    for candidates in (None, cand):
        pick = cpu_quest_pick(q, kmin, kmax, bt, nt, caps, num_tile_slots=M, sink_tiles=3,
                              window_tiles=5, candidates=candidates)
        for r in range(R):
            for h in range(hkv):
                tiles = list(range(3, int(nt[r]) - 5))
                if candidates is not None:
                    tiles = [t for t in tiles if bool(candidates[r, h, t])]
                bound = {}
                for t in tiles:
                    lo = kmin[bt[r, t // tpb], h, t % tpb].double()
                    hi = kmax[bt[r, t // tpb], h, t % tpb].double()
                    qg = q[r, h * group:(h + 1) * group].double()  # [G, D]
                    bound[t] = float(torch.maximum(qg * lo, qg * hi).sum(-1).max())
                best = sorted(tiles, key=lambda t: (-bound[t], t))[: int(caps[r])]
                got = pick[r, h].nonzero().flatten().tolist()
                assert got == sorted(best), (r, h, candidates is None)


def _sparq_rank_oracle(case, channels: int, tile_size: int) -> torch.Tensor:
    """Per (row, KV head, tile): max over the tile's tokens and the group's heads of q.k
    on the chosen channels, from the plain keys the case wrote (a loop, no paging)."""
    from prescore_backend.selection import sparq_channels

    q = case.query.double()
    R, hq, _ = q.shape
    hkv = case.keys[0].shape[0]
    g = hq // hkv
    ch = sparq_channels(case.query, hkv, channels)
    M = case.block_tables.shape[1] * case.block_size // tile_size
    out = torch.full((R, hkv, M), float("-inf"), dtype=torch.float64)
    for r in range(R):
        n = case.keys[r].shape[1]
        for h in range(hkv):
            c = ch[r, h]
            s = q[r, h * g:(h + 1) * g][:, c] @ case.keys[r][h][:, c].double().T  # [G, n]
            for t in range(n // tile_size):
                out[r, h, t] = s[:, t * tile_size:(t + 1) * tile_size].max()
    return out


@pytest.mark.parametrize("layout,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                          ("cpu_amx", torch.bfloat16),
                                          ("cpu_rowmajor", torch.float32)])
@pytest.mark.parametrize("group", [1, 3])
def test_sparq_pick_cpp_and_torch_match_the_oracle(layout, dtype, group) -> None:
    """SparQ (query_aware="sparq"): the torch ranking equals a per-tile loop over the plain keys
    (full tiles), reading only the chosen channels of vLLM's layouts (K^T "vec", packed "amx",
    row-major); the C++ pick through the block table marks the same tiles as ranking the
    torch estimates (MHA and GQA, ragged rows, shuffled blocks, per-row caps)."""
    from prescore_backend.selection import query_aware_pick, sparq_channels, sparq_tile_rank

    cfg = PrescoreConfig(query_aware="sparq", query_channels=8)
    lens = [1500, 700, 1100]
    B, hkv, d = 128, 2, 64
    case = make_paged_case(lens, hkv, group, d, B, seed=5, poison=None, dtype=dtype,
                           layout=layout)
    bt = case.block_tables.long()
    ch = sparq_channels(case.query, hkv, 8)
    assert ch.shape == (3, hkv, 8) and bool((ch[..., 1::2] == ch[..., ::2] + 1).all())
    rank = sparq_tile_rank(case.query, case.key_cache, bt, 8, 16, kv_layout=case.kv_layout)
    want = _sparq_rank_oracle(case, 8, 16)
    full = torch.isfinite(want)
    torch.testing.assert_close(rank.double()[full], want[full], rtol=1e-5, atol=1e-4)

    nt = torch.tensor([-(-n // 16) for n in lens], dtype=torch.int64)
    caps = torch.tensor([7, 3, 5])
    M = bt.shape[1] * B // 16
    scores = torch.zeros(3, hkv, M)
    picks = {impl: query_aware_pick(cfg, case.query, SideData.allocate(1, hkv, 8), bt, scores,
                                    nt, caps, lsh=None, impl=impl, key_cache=case.key_cache,
                                    kv_layout=case.kv_layout) for impl in ("torch", "cpp")}
    assert torch.equal(picks["torch"], picks["cpp"])
    assert torch.equal(picks["cpp"].sum(-1), caps.view(3, 1).expand(3, hkv))
    # the picks are the best-estimated eligible tiles
    for r, n in enumerate(nt.tolist()):
        elig = torch.arange(M)
        elig = (elig >= cfg.sink_tiles) & (elig < n - cfg.window_tiles)
        for h in range(hkv):
            top = want[r, h].masked_fill(~elig, float("-inf")).topk(int(caps[r])).indices
            assert set(top.tolist()) == set(picks["cpp"][r, h].nonzero().flatten().tolist())


def test_ratio_tiles_can_fund_the_selections_side_data() -> None:
    """The side data a selection reads per KV byte (Quest's bounds: 1/16 with 16-token tiles;
    SparQ: r / (2 D); pre-scores 4 bytes per tile), and budgets that fund it from the ratio
    (the evaluation's equal-bytes mode; the backend counts it on top of keep_ratio): a ratio
    of 1 reads every tile; max_tokens stays an absolute tile budget."""
    from prescore_backend.selection import ratio_tiles, side_read_fraction

    nt = torch.tensor([256, 100])
    quest = side_read_fraction(PrescoreConfig(query_aware="quest", query_cap_ratio=0.5), 64)
    sparq = side_read_fraction(PrescoreConfig(query_aware="sparq", query_channels=4,
                                              query_cap_ratio=0.5), 64)
    assert quest == pytest.approx(1 / 16 + 4 / 4096) and sparq == pytest.approx(1 / 32 + 4 / 4096)
    assert side_read_fraction(PrescoreConfig(query_aware="sparq", query_channels=4,
                                             query_cap_ratio=0.5), 64, 4) \
        == pytest.approx(1 / 32 + 4 / 8192)  # fp32 cache: pre-scores are a smaller share
    assert ratio_tiles(nt, 0.125, quest).tolist() == [16, 7]  # ceil(256 * 0.0615...)
    assert ratio_tiles(nt, 0.125, 0.0).tolist() == [32, 13]
    assert ratio_tiles(nt, 1.0, quest).tolist() == [256, 100]
    assert ratio_tiles(nt, 0.05, quest).tolist() == [0, 0]  # the floor adds sinks + window
    cfg = PrescoreConfig(max_tokens=320, query_aware="quest")
    assert config_budget(cfg, nt, quest).tolist() == [20, 20]


def test_ratio_budgets_give_the_window_what_the_ranking_cannot_buy() -> None:
    """The default (no pre-scores read): a row ranks when keep_ratio's bytes less the side
    data buy a tile beyond sinks + window (12 tiles); else it reads no side data and gets
    ceil(n x ratio) tiles (sinks + most recent: StreamingLLM at equal bytes). A config that
    reads pre-scores, and a ratio of 1, keep the plain rule."""
    from prescore_backend.selection import ratio_budgets

    cfg = PrescoreConfig()  # 2 sink + 10 window tiles
    nt = torch.tensor([256, 150, 100, 40])
    ratios = torch.tensor([0.0625, 0.125, 0.125, 1.0], dtype=torch.float64)
    budget, ranks = ratio_budgets(cfg, nt, ratios, 0.03)
    # 256 x (1/16 - 0.03) = 8.3 -> 9 <= 12: no room, 16 tiles; 150 x 0.095 = 14.25 -> 15 > 12
    assert budget.tolist() == [16, 15, 13, 40] and ranks.tolist() == [False, True, False, True]
    assert cfg.streams_without_room
    fill = cfg.replace(query_cap_ratio=0.5)
    assert not fill.streams_without_room
    budget, ranks = ratio_budgets(fill, nt, ratios, 0.03)
    assert budget.tolist() == [9, 15, 10, 40] and bool(ranks.all())
    assert not PrescoreConfig(low_tier_bits=3).streams_without_room


def test_score_jobs_skip_the_scorer_when_nothing_reads_the_pre_scores() -> None:
    """With the defaults (the sparq4 ranking picks every tile beyond sinks and window) the
    pre-scores are never read, so the jobs skip the scorer: full blocks' tiles score their
    position (not a stale -inf), the 4-bit key copy is written as with scoring, the tail stays
    unscored."""
    cfg = PrescoreConfig()
    assert not cfg.reads_prescores
    assert cfg.replace(query_cap_ratio=0.5).reads_prescores
    assert all(PrescoreConfig(query_aware=m).reads_prescores for m in ("none", "lsh", "lsh_quest"))
    assert not PrescoreConfig(low_tier_bits=3, query_cap_ratio=0.5).reads_prescores
    B, hkv, d, n = 128, 3, 64, 300
    case = make_paged_case([n], hkv, 3, d, B, seed=5, poison=None)
    job = ScoreJob(block_ids=case.block_tables[0, :-(-n // B)].long(), seq_len=n, first_pos=0,
                   per_token=False, blocks_done=(0, n // B))
    sides = []
    for scores in (True, False):
        side = SideData.allocate(case.key_cache.shape[0], hkv, B // 16, block_size=B,
                                 key_copy_dim=d)

        def scorer_for(_m, scores=scores):
            assert scores, "the scorer ran although nothing reads its scores"
            return get_scorer("leverage")

        run_score_jobs(side, [job], case.key_cache, scorer_for=scorer_for, tile_size=16,
                       aggregate="max", lsh=None, lsh_bits=7, scores=scores)
        sides.append(side)
    scored, skipped = sides
    full, tail = job.block_ids[: n // B], job.block_ids[n // B]
    assert torch.isfinite(scored.scores[full]).all() and bool((scored.scores[full] != 0).any())
    # their positions: a fill by pre-score is the most recent tiles
    pos = torch.arange(n // B * (B // 16), dtype=torch.float32).view(-1, 1, B // 16)
    assert torch.equal(skipped.scores[full], pos.expand(-1, hkv, -1))
    assert torch.equal(scored.kq, skipped.kq) and torch.equal(scored.kz, skipped.kz)
    assert bool((skipped.scores[tail, :, (n % B) // 16 + 1:] == float("-inf")).all())
    # A row that skips the ranking (query cap 0, selection.ratio_budgets) in the fused CPU
    # call: the sink, the window and then the most recent tiles: StreamingLLM's selection.
    from prescore_backend.kernels.dispatch import cpu_kernels_available
    from prescore_backend.kernels.select_decode import select_and_decode

    if cpu_kernels_available():
        nt = torch.tensor([-(-n // 16)])  # 19 tiles
        *_, sel, _ = select_and_decode(
            case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens,
            skipped.scores, nt, torch.tensor([7]), tile_size=16, scale=0.125, sink_tiles=1,
            window_tiles=3, sparq4_in_place=(skipped.kq, skipped.kz, torch.tensor([0]), 8),
            paged_scores=True, kv_layout=case.kv_layout, impl="cpp")
        assert sel.tiles[0].tolist() == [[0, 13, 14, 15, 16, 17, 18]] * hkv


@pytest.mark.parametrize("first_pos,blocks_done", [(255, (1, 2)), (200, (1, 2)), (300, (2, 2))])
def test_score_jobs_without_scores_read_only_the_blocks_they_write(first_pos, blocks_done):
    """Without the scorer (the defaults), a job reads only the blocks it writes: a decode row
    that fills a block (first_pos 255), a prefill chunk crossing a block end (200), a chunk
    inside the last block (300). The row's earlier blocks poisoned with NaN change nothing
    (before, every job gathered the whole prefix: O(context) per job and layer)."""
    B, hkv, d, T = 128, 2, 64, 16
    n = 256 if first_pos < 256 else 320
    case = make_paged_case([n], hkv, 2, d, B, seed=3, poison=None)
    lo = min(blocks_done[0], first_pos // B)
    job = ScoreJob(block_ids=case.block_tables[0, :-(-n // B)].long(), seq_len=n,
                   first_pos=first_pos, per_token=True, blocks_done=blocks_done)
    gathered: list[int] = []

    class Spy(torch.Tensor):  # records the blocks each gather of the cache reads
        def __getitem__(self, idx):
            if isinstance(idx, torch.Tensor):
                gathered.append(idx.numel())
            return super().__getitem__(idx).as_subclass(torch.Tensor)

    sides = []
    for poison in (False, True):
        cache = case.key_cache.clone()
        if poison:
            cache[job.block_ids[:lo]] = float("nan")
        side = SideData.allocate(cache.shape[0], hkv, B // T, head_dim=d, block_size=B,
                                 key_copy_dim=d)
        run_score_jobs(side, [job], cache.as_subclass(Spy), scorer_for=lambda m: None,
                       tile_size=T, aggregate="max", lsh=None, lsh_bits=7, scores=False)
        sides.append(side)
    assert gathered == [len(job.block_ids) - lo] * 2, gathered
    clean, poisoned = sides
    for name in ("scores", "kmin", "kmax", "kq", "kz"):
        a, b = getattr(clean, name), getattr(poisoned, name)
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and not b.isnan().any(), name
