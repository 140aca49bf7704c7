"""The 4-bit key copy (query_aware="sparq4"): per-block packing, channel choice, ranking
against the dequantized keys, the C++ pick against the torch ranking, bytes read, and the
copy's life cycle (written when a block is full, by the score jobs)."""

from __future__ import annotations

import pytest
import torch

from prescore_backend.config import PrescoreConfig
from prescore_backend.selection import query_aware_pick, side_read_fraction
from prescore_backend.side_data import ScoreJob, SideData, run_score_jobs
from prescore_backend.keycopy import (pack_blocks, sparq4_tile_rank, top_channels,
                                      unpack_blocks)
from prescore_backend.scoring import get_scorer


def test_pack_round_trip_within_half_a_step() -> None:
    """Per (block, head, channel): codes 0..15 between the block's min and max, dequantized
    within half a step; a chunk's bytes hold token i low and token i + 8 high."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 128, 64, generator=g) * torch.linspace(0.1, 5, 64)
    kq, kz = pack_blocks(keys)
    assert kq.dtype == torch.uint8 and kq.shape == (3, 2, 64, 64) and kz.shape == (3, 2, 2, 64)
    assert torch.equal(kz[:, :, 0], keys.amin(2))
    back = unpack_blocks(kq, kz)
    assert back.shape == keys.shape
    assert bool(((back - keys).abs() <= kz[:, :, 1].unsqueeze(2) / 2 + 1e-5).all())
    codes = ((keys - kz[:, :, 0].unsqueeze(2)) / kz[:, :, 1].unsqueeze(2)).round()  # [.., B, D]
    c0 = codes[1, 0, :16, 5]  # first chunk of channel 5
    byte = kq[1, 0, 5, :8]
    assert torch.equal((byte & 15).float(), c0[:8]) and torch.equal((byte >> 4).float(), c0[8:])
    flat = pack_blocks(torch.ones(1, 1, 16, 4))  # a constant channel: exact, no division by 0
    assert torch.equal(unpack_blocks(*flat), torch.ones(1, 1, 16, 4))


def test_top_channels_are_the_group_s_largest() -> None:
    q = torch.zeros(1, 4, 8)  # 2 KV heads x 2 query heads, D = 8
    q[0, 0, 1] = 3.0
    q[0, 1, 6] = -2.5  # the other head of group 0
    q[0, 2, 3] = 1.0
    q[0, 3, 3] = 1.0  # group 1: channel 3 twice
    q[0, 2, 0] = 0.5
    assert top_channels(q, 2, 2).tolist() == [[[1, 6], [0, 3]]]
    assert top_channels(torch.ones(1, 1, 8), 1, 4).tolist() == [[[0, 1, 2, 3]]]  # ties: lowest


def _paged_copy(lens, hkv, d, B, seed):
    """Rows' keys in a paged cache (shuffled blocks); the copy written by the score jobs of
    one prefill per row (as the backend does) -> side, bt, keys, key_cache."""
    g = torch.Generator().manual_seed(seed)
    mb = max(-(-n // B) for n in lens)
    nb = len(lens) * mb + 3
    bt = torch.randperm(nb, generator=g)[: len(lens) * mb].view(len(lens), mb)
    side = SideData.allocate(nb, hkv, B // 16, block_size=B, key_copy_dim=d)
    assert side.codes is None and side.kq.shape == (nb, hkv, d, B // 2)
    cache = torch.zeros(nb, hkv, B, d)
    keys = []
    for r, n in enumerate(lens):
        k = torch.randn(n, hkv, d, generator=g) * torch.linspace(0.2, 3, d)
        pos = torch.arange(n)
        cache[bt[r, pos // B], :, pos % B] = k
        job = ScoreJob(block_ids=bt[r, : -(-n // B)], seq_len=n, first_pos=0, per_token=True,
                       blocks_done=(0, n // B))
        run_score_jobs(side, [job], cache, scorer_for=lambda _m: get_scorer("random"),
                       tile_size=16, aggregate="max", lsh=None, lsh_bits=4)
        keys.append(k)
    return side, bt, keys, cache


@pytest.mark.parametrize("group", [1, 3, 10])
def test_rank_and_cpp_pick_match_the_dequantized_keys(group) -> None:
    """sparq4_tile_rank = max over the tile and the group's heads of q.k on the chosen
    channels of each full block's dequantized copy, per row through a shuffled block table (MHA,
    GQA, and a group of 10 heads: the C++ ranks it in slices of 8; ragged rows); the C++ pick
    marks the same tiles, per-row caps, sinks and window left out."""
    lens, hkv, d, B = [1500, 700, 1100], 2, 64, 128
    side, bt, keys, cache = _paged_copy(lens, hkv, d, B, seed=group)
    q = torch.randn(len(lens), hkv * group, d)
    rank = sparq4_tile_rank(q, side.kq, side.kz, bt, 8, 16)
    M = bt.shape[1] * B // 16
    assert rank.shape == (len(lens), hkv, M)
    ch = top_channels(q, hkv, 8)
    for r, n in enumerate(lens):
        full = n // B  # blocks with a copy
        kd = unpack_blocks(*pack_blocks(cache[bt[r, :full]]))  # [full, Hkv, B, D]
        for h in range(hkv):
            kh = kd[:, h].reshape(-1, d)[:, ch[r, h]]
            est = (q[r, h * group:(h + 1) * group][:, ch[r, h]] @ kh.T).amax(0)
            want = est.view(-1, 16).amax(-1)
            torch.testing.assert_close(rank[r, h, : full * B // 16], want, rtol=1e-5, atol=1e-4)
    cfg = PrescoreConfig(query_aware="sparq4", query_cap_ratio=1.0)
    nt = torch.tensor([-(-n // 16) for n in lens])
    caps = torch.tensor([7, 3, 5])
    scores = torch.zeros(len(lens), hkv, M)
    picks = {impl: query_aware_pick(cfg, q, side, bt, scores, nt, caps, lsh=None, impl=impl)
             for impl in ("torch", "cpp")}
    assert torch.equal(picks["torch"], picks["cpp"])
    assert torch.equal(picks["cpp"].sum(-1), caps.view(-1, 1).expand(-1, hkv))
    for r, n in enumerate(nt.tolist()):
        idx = picks["cpp"][r].nonzero()[:, 1]
        assert bool((idx >= cfg.sink_tiles).all()) and bool((idx < n - cfg.window_tiles).all())


def test_cpp_pick_finds_the_planted_tile() -> None:
    """A key aligned with the query in one far tile: the 8-channel estimate ranks that tile
    first (what the estimator is for), through the C++ pick."""
    lens, hkv, d, B = [2048], 1, 64, 128
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2048, hkv, d, generator=g)
    keys[700, 0, 3], keys[700, 0, 40] = 6.0, -6.0
    q = torch.zeros(1, 2, d)
    q[0, :, 3], q[0, :, 40] = 2.0, -2.0
    side = SideData.allocate(16, hkv, B // 16, block_size=B, key_copy_dim=d)
    side.kq[:], side.kz[:] = pack_blocks(keys.view(16, B, hkv, d).transpose(1, 2))
    cfg = PrescoreConfig(query_aware="sparq4", query_cap_ratio=1.0)
    pick = query_aware_pick(cfg, q, side, torch.arange(16).view(1, 16), torch.zeros(1, 1, 128),
                            torch.tensor([128]), torch.tensor([1]), lsh=None, impl="cpp")
    assert pick[0, 0].nonzero().flatten().tolist() == [700 // 16]


def test_key_copy_bytes_read_and_held() -> None:
    """8 channels of 4 bits: 4 bytes per token and KV head read per step, plus each block's
    min and step of those channels (8 x 2 x 4 bytes per 128 tokens): 4.5 / 256 of a bf16 K+V
    at D = 64; the copy held beside the cache is D / 2 bytes per token and KV head plus
    2 x D x 4 bytes per block."""
    cfg = PrescoreConfig(query_aware="sparq4", query_cap_ratio=1.0, query_channels=8)
    assert side_read_fraction(cfg, 64) == pytest.approx(4.5 / 256)
    assert side_read_fraction(cfg.replace(query_channels=16), 64, 4, 64) == pytest.approx(
        (8 + 2) / 512)
    side = SideData.allocate(4, 3, 8, block_size=128, key_copy_dim=64)
    assert side.bytes_per_token(128) == pytest.approx(
        (3 * 8 * 4 + 3 * 64 * 64 + 3 * 2 * 64 * 4) / 128)


def test_copy_is_written_when_a_block_fills_and_only_then() -> None:
    """Decode-style jobs: a block's copy appears in the job that completes it (from all its
    keys), never for an incomplete block; a block rewritten by a later job gets a new copy."""
    hkv, d, B = 1, 16, 32
    side = SideData.allocate(3, hkv, B // 16, block_size=B, key_copy_dim=d)
    cache = torch.randn(3, hkv, B, d)
    rnd = lambda _m: get_scorer("random")  # noqa: E731
    part = ScoreJob(block_ids=torch.tensor([2, 0]), seq_len=B + 5, first_pos=B + 4,
                    per_token=False, blocks_done=(0, 0))
    run_score_jobs(side, [part], cache, scorer_for=rnd, tile_size=16, aggregate="max",
                   lsh=None, lsh_bits=4)
    assert int(side.kq.count_nonzero()) == 0  # nothing full yet
    done = ScoreJob(block_ids=torch.tensor([2, 0]), seq_len=2 * B, first_pos=2 * B - 1,
                    per_token=False, blocks_done=(1, 2))
    run_score_jobs(side, [done], cache, scorer_for=rnd, tile_size=16, aggregate="max",
                   lsh=None, lsh_bits=4)
    kq, kz = pack_blocks(cache[[0]])
    assert torch.equal(side.kq[0], kq[0]) and torch.equal(side.kz[0], kz[0])
    assert int(side.kq[[1, 2]].count_nonzero()) == 0  # block 2 was done in an earlier job


@pytest.mark.skipif("avx512f" not in __import__("prescore_backend.kernels.host",
                                               fromlist=["cpu_flags"]).cpu_flags(),
                    reason="needs AVX-512F (an AVX2-only host builds these paths by default)")
def test_avx2_build_picks_the_same_tiles() -> None:
    """The C++ built without AVX-512 (the code AVX2-only hosts run: the ranking in explicit
    ymm pairs) picks the tiles the torch ranking does."""
    from prescore_backend.kernels.cpu_ext import build
    from test_pq import AVX2_ONLY

    avx2 = build(AVX2_ONLY)
    lens, hkv, d, B, group = [1500, 700, 1100], 3, 64, 128, 3
    side, bt, _, _ = _paged_copy(lens, hkv, d, B, seed=11)
    q = torch.randn(len(lens), hkv * group, d)
    nt = torch.tensor([-(-n // 16) for n in lens])
    caps = torch.tensor([9, 4, 6])
    M = bt.shape[1] * B // 16
    cfg = PrescoreConfig(query_aware="sparq4", query_cap_ratio=1.0, query_channels=8)
    want = query_aware_pick(cfg, q, side, bt, torch.zeros(len(lens), hkv, M), nt, caps,
                            lsh=None, impl="torch")
    got = avx2.sparq4_pick_cpu(q, side.kq, side.kz, bt, nt, caps, 8, M, 16, cfg.sink_tiles,
                               cfg.window_tiles)
    assert torch.equal(got, want)
