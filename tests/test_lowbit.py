"""Two precision tiers: the low-bit K/V copy (kernels/lowbit.py), the budget split and the
tiers' tiles (prescore_backend/tiers.py), the copy's life cycle (score jobs), the settings.

The decode op is checked against its float64 oracle and against exact attention over the
original cache (8 bits), over shuffled block tables, MHA and GQA, ragged lengths and empty
selections; the tiers' decode against an independent re-derivation (quantize, mask, one
softmax) on a cache written by the score jobs as the backend writes it."""

from __future__ import annotations

import pytest
import torch

from prescore_backend.config import ConfigError, PrescoreConfig
from prescore_backend.keycopy import sparq4_tile_rank
from prescore_backend.kernels.layouts import amx_unpack_blocks
from prescore_backend.kernels.lowbit import (LowBitCopy, bytes_per_token, lowbit_decode,
                                             lowbit_decode_ref, pack_k, pack_v, two_tier_decode,
                                             unpack_k, unpack_v)
from prescore_backend.kernels.select import select_tiles
from prescore_backend.kernels.sparse_decode import sparse_decode
from prescore_backend.kernels.testing import dense_attention, make_paged_case
from prescore_backend.scoring import get_scorer
from prescore_backend.selection import side_read_fraction
from prescore_backend.side_data import ScoreJob, SideData, run_score_jobs
from prescore_backend.tiers import (decode_two_tiers, low_token_cost, select_two_tiers,
                                    tier_budgets)

B, T = 128, 16


def _tolerance(lo, step, bits):
    # half a step, plus fp16 rounding of min and step (amplified by the top code)
    return step * (0.5 + ((1 << bits) - 1) / 1024) + lo.abs() / 1024 + 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip_within_half_a_step(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 2, B, 64, generator=g) * torch.linspace(0.1, 5, 64)
    kc, kz = pack_k(x, bits)
    vc, vz = pack_v(x, bits)
    assert kc.shape == (3, 2, 64, bits, B // 8) and kc.dtype == torch.uint8
    assert vc.shape == (3, 2, B, bits, 8) and vz.shape == (3, 2, B, 2)
    assert kz.dtype == vz.dtype == torch.float16
    k, v = unpack_k(kc, kz), unpack_v(vc, vz)
    lo, st = kz[:, :, 0].float().unsqueeze(2), kz[:, :, 1].float().unsqueeze(2)
    assert bool(((k - x).abs() <= _tolerance(lo, st, bits)).all())
    lo, st = vz[..., 0:1].float(), vz[..., 1:2].float()
    assert bool(((v - x).abs() <= _tolerance(lo, st, bits)).all())
    # bit planes: kc[blk, h, c, p, j] bit i is bit p of token 8j + i's code in channel c
    code = ((x[1, 0, :, 5] - kz[1, 0, 0, 5].float()) / kz[1, 0, 1, 5].float()).round()
    code = code.clamp(0, (1 << bits) - 1).long()
    for p in range(bits):
        byte = int(kc[1, 0, 5, p, 2])
        assert [(byte >> i) & 1 for i in range(8)] == [(int(c) >> p) & 1 for c in code[16:24]]
    flat = torch.ones(1, 1, 16, 8)  # constant: exact, no division by zero
    assert torch.equal(unpack_k(*pack_k(flat, 3)), flat) and torch.equal(unpack_v(*pack_v(flat, 3)), flat)


def test_bytes_per_token() -> None:
    assert bytes_per_token(3, 64, 128) == 24 + 24 + 4 + 2  # codes, V scales, K scales
    copy = LowBitCopy.allocate(5, 3, 128, 64, 3)
    per_token = sum(t[0].numel() * t.element_size() for t in copy.tensors()) / 128
    assert per_token == 3 * bytes_per_token(3, 64, 128)
    cfg = PrescoreConfig(low_tier_bits=3)
    assert low_token_cost(cfg, 64) == pytest.approx(54 / 256)  # charged as bf16 on every host


def _copy_of(case, bits):
    """The low-bit copy of every full block of a paged case (as the score jobs write it)."""
    k, v, _ = case.strided()
    nb, hkv = case.key_cache.shape[:2]
    copy = LowBitCopy.allocate(nb, hkv, B, case.key_cache.shape[-1], bits)
    for r, n in enumerate(case.seq_lens.tolist()):
        full = n // B
        if full:
            ids = case.block_tables[r, :full].long()
            if case.kv_layout == "amx":  # strided() renumbered the blocks: row r's come first
                src = case.block_tables.shape[1] * r + torch.arange(full)
                copy.write(ids, k[src].float(), v[src].float())
            else:
                copy.write(ids, k[ids].float(), v[ids].float())
    return copy


def _random_full_tiles(lens, hkv, S, g):
    """Per (row, head) up to S distinct tiles of full blocks, ascending, -1 pad; the last
    row gets none."""
    out = torch.full((len(lens), hkv, S), -1, dtype=torch.int32)
    for r, n in enumerate(lens[:-1]):
        m = (n // B) * (B // T)
        for h in range(hkv):
            k = int(torch.randint(1, min(S, m) + 1, (1,), generator=g))
            out[r, h, :k] = torch.randperm(m, generator=g)[:k].sort().values.int()
    return out


@pytest.mark.parametrize("impl", ["cpp", "torch"])
@pytest.mark.parametrize("hkv,group,d,bits", [(2, 1, 64, 3), (3, 3, 64, 4), (2, 4, 128, 2),
                                              (1, 8, 64, 8), (1, 16, 64, 3)])
def test_lowbit_decode_matches_oracle(hkv: int, group: int, d: int, bits: int, impl: str) -> None:
    lens = [700, 1031, 256, 300]  # ragged; the last row selects nothing
    case = make_paged_case(lens, hkv, group, d, B, seed=hkv + d)
    copy = _copy_of(case, bits)
    tiles = _random_full_tiles(lens, hkv, 24, torch.Generator().manual_seed(1))
    scale = d ** -0.5
    out, lse = lowbit_decode(case.query, copy, case.block_tables, case.seq_lens, tiles, T, scale,
                             impl=impl)
    ref_o, ref_l = lowbit_decode_ref(case.query, copy, case.block_tables, case.seq_lens, tiles,
                                     T, scale)
    assert torch.allclose(out, ref_o, atol=2e-5, rtol=1e-4)
    assert torch.allclose(lse, ref_l, atol=2e-5, rtol=1e-5)
    assert bool(torch.isneginf(lse[-1]).all()) and bool((out[-1] == 0).all())
    empty = lowbit_decode(case.query, copy, case.block_tables, case.seq_lens, tiles[..., :0],
                          T, scale, impl=impl)
    assert bool((empty[0] == 0).all()) and bool(torch.isneginf(empty[1]).all())


@pytest.mark.parametrize("layout", ["cpu", "cpu_amx"])
def test_eight_bits_is_close_to_exact_attention(layout: str) -> None:
    lens = [640, 1024]
    case = make_paged_case(lens, 2, 3, 64, B, layout=layout, seed=3)
    copy = _copy_of(case, 8)
    tiles = _random_full_tiles(lens + [0], 2, 40, torch.Generator().manual_seed(2))[:2]
    out, lse = lowbit_decode(case.query, copy, case.block_tables, case.seq_lens, tiles, T, 0.125)
    for r in range(2):
        for h in range(2):
            idx = torch.cat([torch.arange(t * T, t * T + T) for t in tiles[r, h].tolist() if t >= 0])
            q = case.query[r, 3 * h:3 * h + 3]
            o, l = dense_attention(q, case.keys[r][h:h + 1, idx], case.values[r][h:h + 1, idx], 0.125)
            assert torch.allclose(out[r, 3 * h:3 * h + 3].double(), o, atol=2e-2)
            assert torch.allclose(lse[r, 3 * h:3 * h + 3].double(), l, atol=2e-2)


def _ascending(tiles):
    """Tiles ascending, -1 padding last."""
    t = torch.where(tiles >= 0, tiles, 1 << 30).sort(-1).values
    return torch.where(t < (1 << 30), t, -1).int()


def test_two_tiers_merge_into_one_softmax() -> None:
    """Exact tiles from the cache + 8-bit tiles from the copy ~ exact attention over the
    union; with no low-bit tiles, exactly the sparse decode."""
    lens = [1100, 900]
    case = make_paged_case(lens, 2, 2, 64, B, seed=5)
    copy = _copy_of(case, 8)
    g = torch.Generator().manual_seed(4)
    union = _random_full_tiles(lens + [0], 2, 30, g)[:2]
    exact = _ascending(torch.where(torch.arange(30) % 2 == 0, union, -1))
    low = _ascending(torch.where(torch.arange(30) % 2 == 1, union, -1))
    out = two_tier_decode(case.query, case.key_cache, case.value_cache, copy, case.block_tables,
                          case.seq_lens, exact, low, T, 0.125)
    ref, _ = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                           case.seq_lens, union.sort(-1).values.int(), T, 0.125, impl="torch")
    assert torch.allclose(out, ref, atol=2e-2)
    none = two_tier_decode(case.query, case.key_cache, case.value_cache, copy, case.block_tables,
                           case.seq_lens, union, union[..., :0], T, 0.125)
    only, _ = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                            case.seq_lens, union, T, 0.125)
    assert torch.equal(none, only.float())


def test_tier_budgets_spend_the_budget_s_bytes() -> None:
    cfg = PrescoreConfig(low_tier_bits=3, low_tier_share=0.75)  # 2 sink + 10 window tiles
    budget = torch.tensor([12, 40, 100, 300])
    num_tiles = torch.tensor([500, 500, 500, 300])
    exact, total = tier_budgets(cfg, budget, num_tiles, 64)
    c = 54 / 256
    assert exact.tolist()[:3] == [12, 12 + 7, 12 + 22]
    for e, t, b in zip(exact.tolist()[:3], total.tolist()[:3], budget.tolist()[:3]):
        assert e + c * (t - e) <= b + 1e-9 and e + c * (t - e + 1) > b - 1 - 1e-9
    assert exact[3] == total[3] == 300  # covers the context: everything exact
    e4, t4 = tier_budgets(cfg.replace(low_tier_bits=4), budget, num_tiles, 64)
    assert torch.equal(e4, exact) and bool((t4[1:3] < total[1:3]).all())  # dearer tokens


def _scored_case(lens, bits, seed, layout="cpu"):
    """A paged case whose side data (scores, 4-bit key copy, low-bit copy) the score jobs
    wrote, one prefill job per row, as the backend's forward does."""
    case = make_paged_case(lens, 3, 3, 64, B, layout=layout, seed=seed, poison=None)
    nb = case.key_cache.shape[0]
    side = SideData.allocate(nb, 3, B // T, block_size=B, key_copy_dim=64, low_bits=bits)
    scorer = get_scorer("random")
    for r, n in enumerate(lens):
        job = ScoreJob(block_ids=case.block_tables[r, :-(-n // B)].long(), seq_len=n,
                       first_pos=0, per_token=True, blocks_done=(0, n // B))
        run_score_jobs(side, [job], case.key_cache, value_cache=case.value_cache,
                       scorer_for=lambda _m: scorer, tile_size=T, aggregate="max", lsh=None,
                       lsh_bits=7, kv_layout=case.kv_layout)
    return case, side


@pytest.mark.parametrize("layout", ["cpu", "cpu_amx"])
def test_score_jobs_write_the_copy_of_full_blocks(layout: str) -> None:
    case, side = _scored_case([1000, 384], 3, 6, layout)
    for r, n in enumerate([1000, 384]):
        ids = case.block_tables[r, : n // B].long()
        k = case.keys[r][:, : (n // B) * B].reshape(3, -1, B, 64).transpose(0, 1)
        v = case.values[r][:, : (n // B) * B].reshape(3, -1, B, 64).transpose(0, 1)
        kc, kz = pack_k(k, 3)
        vc, vz = pack_v(v, 3)
        assert torch.equal(side.low.kc[ids], kc) and torch.equal(side.low.kz[ids], kz)
        assert torch.equal(side.low.vc[ids], vc) and torch.equal(side.low.vz[ids], vz)
    last = case.block_tables[0, 1000 // B].long()  # the incomplete block: no copy yet
    assert int(side.low.kc[last].sum()) == 0
    with pytest.raises(ValueError, match="value_cache"):
        run_score_jobs(side, [ScoreJob(case.block_tables[1, :3].long(), 384, 0, False, (0, 3))],
                       case.key_cache, scorer_for=lambda _m: get_scorer("random"),
                       tile_size=T, aggregate="max", lsh=None, lsh_bits=7)


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_two_tiers_pick_in_ranking_order_and_decode_as_rederived(impl: str) -> None:
    """The tiers' tiles: exact = sinks + window + the best of the sparq4 ranking, low-bit =
    the next ones, disjoint; the decode equals one softmax over the exact keys of the first
    and the dequantized keys of the second, derived here from the cache, not the copy."""
    lens = [2048, 1500]
    case, side = _scored_case(lens, 3, 7)
    cfg = PrescoreConfig(low_tier_bits=3, query_aware="sparq4")
    bt = case.block_tables.long()
    num_tiles = (case.seq_lens.long() + T - 1) // T
    budget = torch.tensor([20, 16])
    exact_b, total_b = tier_budgets(cfg, budget, num_tiles, 64)
    sel, low = select_two_tiers(cfg, case.query, side, bt, num_tiles, exact_b, total_b,
                                impl=impl)
    est = sparq4_tile_rank(case.query, side.kq, side.kz, bt, cfg.ranking_channels(64), T)
    both = select_tiles(est, num_tiles, total_b, sink_tiles=2, window_tiles=10)
    for r in range(2):
        for h in range(3):
            e = {t for t in sel.tiles[r, h].tolist() if t >= 0}
            lo = {t for t in low[r, h].tolist() if t >= 0}
            assert not e & lo and e | lo == {t for t in both.tiles[r, h].tolist() if t >= 0}
            n = int(num_tiles[r])
            assert {0, 1, *range(n - 10, n)} <= e
            assert len(e) == int(exact_b[r]) and len(lo) == int(total_b[r] - exact_b[r]) > 0
            assert int(sel.num_selected[r, h]) == len(e)
            free = e - {0, 1, *range(n - 10, n)}
            assert min(est[r, h, list(free)]) >= max(est[r, h, list(lo)])
    out, read, _ = decode_two_tiers(cfg, case.query, case.key_cache, case.value_cache, side, bt,
                                    case.seq_lens, num_tiles, exact_b, total_b, 0.125, impl=impl)
    for r in range(2):
        n = int(case.seq_lens[r])
        for h in range(3):
            k, v = case.keys[r][h], case.values[r][h]  # [n, D]
            kb = k[: (n // B) * B].view(-1, B, 64)
            lo_k = kb.amin(1, keepdim=True).half().float()
            st_k = ((kb.amax(1, keepdim=True) - lo_k) / 7).half().float()
            kq = (lo_k + ((kb - lo_k) / st_k).round().clamp(0, 7) * st_k).view(-1, 64)
            lo_v = v.amin(1, keepdim=True).half().float()
            st_v = ((v.amax(1, keepdim=True) - lo_v) / 7).half().float()
            vq = lo_v + ((v - lo_v) / st_v).round().clamp(0, 7) * st_v
            ie = torch.tensor([p for t in sel.tiles[r, h].tolist() if t >= 0
                               for p in range(t * T, min(t * T + T, n))])
            il = torch.tensor([p for t in low[r, h].tolist() if t >= 0
                               for p in range(t * T, t * T + T)])
            keys = torch.cat([k[ie], kq[il]]).double()
            vals = torch.cat([v[ie], vq[il]]).double()
            assert float(read[r, h]) == pytest.approx(len(ie) + 54 / 256 * len(il))
            q = case.query[r, 3 * h:3 * h + 3].double()
            ref = torch.softmax(0.125 * q @ keys.T, -1) @ vals
            assert torch.allclose(out[r, 3 * h:3 * h + 3].double(), ref, atol=1e-4)


def test_settings_of_the_two_tiers() -> None:
    cfg = PrescoreConfig(low_tier_bits=3)
    assert cfg.uses_low_tier and not PrescoreConfig().uses_low_tier
    with pytest.raises(ConfigError, match="PRESCORE_LOW_TIER_BITS.*--prescore-low-tier-bits"):
        PrescoreConfig(low_tier_bits=1)
    with pytest.raises(ConfigError, match="sparq4"):
        PrescoreConfig(low_tier_bits=3, query_aware="quest")
    with pytest.raises(ConfigError, match="residual_tiles"):
        PrescoreConfig(low_tier_bits=3, residual_tiles=2)
    with pytest.raises(ConfigError, match="tile_size"):
        PrescoreConfig(low_tier_bits=3, tile_size=4, sink_tokens=4, window_tokens=160)
    with pytest.raises(ConfigError, match="low_tier_share"):
        PrescoreConfig(low_tier_bits=3, low_tier_share=0.0)
    # no pre-scores read with two tiers: only the ranking's channels of the key copy
    one = side_read_fraction(PrescoreConfig(query_cap_ratio=1.0, query_channels=8), 64)
    assert side_read_fraction(cfg, 64) == one < side_read_fraction(
        PrescoreConfig(query_cap_ratio=0.5, query_channels=8), 64)
    assert PrescoreConfig.from_env({"PRESCORE_LOW_TIER_BITS": "4"}).low_tier_bits == 4


def test_tiers_pick_cpp_matches_torch() -> None:
    """The C++ tiers' pick == its torch twin on many rows (ragged, shuffled blocks, budgets
    from none to more than the eligible tiles); the exact picks are a subset of the total."""
    from prescore_backend.tiers import _marks_cpp, _marks_torch

    lens = [3000, 2100, 1300, 4096, 2500]
    case, side = _scored_case(lens, 3, 11)
    cfg = PrescoreConfig(low_tier_bits=3)
    bt = case.block_tables.long()
    nt = (case.seq_lens.long() + T - 1) // T
    te, tt = torch.tensor([0, 5, 3, 40, 400]), torch.tensor([0, 50, 3, 200, 400])
    M = bt.shape[1] * (B // T)
    a = _marks_cpp(cfg, case.query, side, bt, nt, te, tt, M)
    b = _marks_torch(cfg, case.query, side, bt, nt, te, tt, M)
    assert torch.equal(a, b)
    for r in range(5):
        elig = int(nt[r]) - 12
        assert int((a[r] == 1).sum(-1).max()) == min(int(te[r]), elig)
        assert int((a[r] > 0).sum(-1).max()) == min(int(tt[r]), elig)
