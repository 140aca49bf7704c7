"""The 4-bit key copy (query_aware="sparq4"): packing, channel pairs, ranking against the
dequantized keys, the C++ pick against the torch ranking, bytes read, and how a serving
process finds the key scales."""

from __future__ import annotations

import pytest
import torch

from prescore_backend.config import PrescoreConfig
from prescore_backend.decode import SideData, query_aware_pick, record_codes, side_read_fraction
from prescore_backend.keycopy import (key_scale, pack_keys, pair_channels, sparq4_tile_rank,
                                      unpack_keys)
from prescore_backend.pq import (PQCodebooks, codebook_path, fit_codebook, resolve_codebooks,
                                 rotary_pair_dims)


def test_pack_round_trip_within_half_a_step_and_clamped_beyond() -> None:
    g = torch.Generator().manual_seed(0)
    amax = torch.rand(3, 64, generator=g) * 4 + 0.1
    s = key_scale(amax)
    keys = (torch.rand(500, 3, 64, generator=g) * 2 - 1) * amax  # inside the range
    packed = pack_keys(keys, s)
    assert packed.dtype == torch.uint8 and packed.shape == (500, 3, 32)
    back = unpack_keys(packed, s)
    assert bool(((back - keys).abs() <= s / 2 + 1e-6).all())
    # channel i in the low nibble, i + D/2 in the high one
    codes = (keys / s).round().clamp(-8, 7) + 8
    assert torch.equal((packed & 15).float(), codes[..., :32])
    assert torch.equal((packed >> 4).float(), codes[..., 32:])
    big = pack_keys(amax.expand(2, 3, 64) * torch.tensor([3.0, -3.0]).view(2, 1, 1), s)
    assert torch.equal(unpack_keys(big, s)[0], 7 * s) and torch.equal(unpack_keys(big, s)[1], -8 * s)


def test_pair_channels_are_the_group_s_largest_rotary_pairs() -> None:
    q = torch.zeros(1, 4, 8)  # 2 KV heads x 2 query heads, D = 8: pairs (i, i + 4)
    q[0, 0, 1] = 3.0  # head group 0: pair 1 by |q_1| ...
    q[0, 1, 6] = -2.5  # ... and pair 2 by |q_6| of the other head in the group
    q[0, 2, 3] = 1.0
    q[0, 3, 7] = 1.0  # group 1: pair 3 twice
    q[0, 2, 0] = 0.5
    pairs = pair_channels(q, 2, 4)
    assert pairs.tolist() == [[[1, 2], [0, 3]]]
    tie = pair_channels(torch.ones(1, 1, 8), 1, 4)  # all equal: the lowest pairs
    assert tie.tolist() == [[[0, 1]]]


def _paged_copy(lens, hkv, d, B, seed):
    g = torch.Generator().manual_seed(seed)
    mb = max(-(-n // B) for n in lens)
    nb = len(lens) * mb + 3
    bt = torch.randperm(nb, generator=g)[: len(lens) * mb].view(len(lens), mb)
    spread = torch.linspace(0.2, 3, d)
    book = fit_codebook(torch.randn(hkv, 600, d, generator=g) * spread, 4, iters=2)
    side = SideData.allocate(nb, hkv, B // 16, block_size=B, codebook=book, pq_codes=False,
                             key_copy=True)
    assert side.codes is None and side.kq.shape == (nb, hkv, d // 2, B)
    keys = []
    for r, n in enumerate(lens):
        k = torch.randn(n, hkv, d, generator=g) * spread
        pos = torch.arange(n)
        record_codes(side, k, bt[r, pos // B], pos % B)
        keys.append(k)
    return side, bt, keys


@pytest.mark.parametrize("group", [1, 3])
def test_rank_and_cpp_pick_match_the_dequantized_keys(group) -> None:
    """sparq4_tile_rank = max over the tile and the group's heads of q.k on the chosen rotary
    pairs of the dequantized copy, per row through a shuffled block table (MHA and GQA, ragged
    rows); the C++ pick marks the same tiles, per-row caps, sinks and window left out."""
    lens, hkv, d, B = [1500, 700, 1100], 2, 64, 128
    side, bt, keys = _paged_copy(lens, hkv, d, B, seed=group)
    q = torch.randn(len(lens), hkv * group, d)
    rank = sparq4_tile_rank(q, side.kq, side.kscale, bt, 8, 16)
    M = bt.shape[1] * B // 16
    assert rank.shape == (len(lens), hkv, M)
    pairs = pair_channels(q, hkv, 8)
    for r, n in enumerate(lens):
        kd = unpack_keys(pack_keys(keys[r], side.kscale), side.kscale)  # [n, Hkv, D]
        for h in range(hkv):
            ch = torch.cat([pairs[r, h], pairs[r, h] + d // 2])
            est = (q[r, h * group:(h + 1) * group][:, ch] @ kd[:, h, ch].T).amax(0)
            full = n // 16
            want = est[: full * 16].view(full, 16).amax(-1)
            torch.testing.assert_close(rank[r, h, :full], want, rtol=1e-5, atol=1e-4)
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
    side, bt, keys = _paged_copy(lens, hkv, d, B, seed=5)
    q = torch.zeros(1, 2, d)
    q[0, :, 3], q[0, :, 3 + d // 2] = 2.0, -2.0
    k = keys[0][700:701].clone()
    k[0, 0, 3], k[0, 0, 3 + d // 2] = 8.0, -8.0  # clamps to the range: still the largest
    record_codes(side, k, bt[0, 700 // B].view(1), torch.tensor([700 % B]))
    cfg = PrescoreConfig(query_aware="sparq4", query_cap_ratio=1.0)
    pick = query_aware_pick(cfg, q, side, bt, torch.zeros(1, 1, 128), torch.tensor([128]),
                            torch.tensor([1]), lsh=None, impl="cpp")
    assert pick[0, 0].nonzero().flatten().tolist() == [700 // 16]


def test_key_copy_bytes_read_and_held() -> None:
    """8 channels of 4 bits: 4 bytes per token and KV head read per step, 1/64 of a bf16 K+V
    at D = 64; the copy held beside the cache is D / 2 bytes per token and KV head."""
    cfg = PrescoreConfig(query_aware="sparq4", query_cap_ratio=1.0, query_channels=8)
    assert side_read_fraction(cfg, 64) == pytest.approx(1 / 64)
    assert side_read_fraction(cfg.replace(query_channels=16), 64, 4) == pytest.approx(8 / 512)
    book = fit_codebook(torch.randn(3, 300, 64), 4, iters=1)
    side = SideData.allocate(4, 3, 8, block_size=128, codebook=book, pq_codes=False,
                             key_copy=True)
    assert side.bytes_per_token(128) == pytest.approx((3 * 8 * 4 + 3 * 32 * 128) / 128)


def test_calibration_file_carries_key_scales(tmp_path) -> None:
    """fit_codebook keeps the keys' absmax per (KV head, channel); the file round-trips it and
    a tensor-parallel rank's slice of heads keeps its own."""
    keys = torch.randn(2, 400, 16) * torch.linspace(0.5, 4, 16)
    book = fit_codebook(keys, 2, iters=1)
    assert torch.equal(book.key_absmax, keys.abs().amax(1))
    assert torch.equal(book.heads(1, 1).key_absmax, book.key_absmax[1:])
    books = PQCodebooks(book.centroids[None], book.weights[None], book.dims, {"t": 1},
                        book.key_absmax[None])
    books.save(codebook_path(tmp_path, 2))
    back = PQCodebooks.load(codebook_path(tmp_path, 2))
    assert torch.equal(back.layer(0).key_absmax, book.key_absmax)


def test_resolve_for_sparq4_falls_back_to_exact_channels_or_names_the_setting(tmp_path) -> None:
    """sparq4 reads the key scales of the model's calibration file: without a file, or with an
    older one that has none, it falls back to 'sparq' with a line naming the command; an
    explicit pq_codebook without scales is an error naming the setting."""
    cfg = PrescoreConfig(query_aware="sparq4")
    books, used, msg = resolve_codebooks(cfg, tmp_path)
    assert books is None and used.query_aware == "sparq" and "prescore-models calibrate" in msg
    old = PQCodebooks(torch.randn(1, 1, 4, 256, 16), torch.rand(1, 1, 64),
                      rotary_pair_dims(64, 4), {"text": "x"})
    old.save(codebook_path(tmp_path, 4))
    books, used, msg = resolve_codebooks(cfg, tmp_path)
    assert books is None and used.query_aware == "sparq" and "--force" in msg
    with pytest.raises(ValueError, match="PRESCORE_PQ_CODEBOOK"):
        resolve_codebooks(cfg.replace(pq_codebook=str(codebook_path(tmp_path, 4))), tmp_path)
    new = PQCodebooks(old.centroids, old.weights, old.dims, old.meta, torch.rand(1, 1, 64))
    new.save(codebook_path(tmp_path, 4))
    books, used, msg = resolve_codebooks(cfg, tmp_path)
    assert books is not None and used.query_aware == "sparq4"
    assert books.layer(0).key_absmax.shape == (1, 64)


def test_prepared_model_ships_key_scales(model_path) -> None:
    """`prescore-models prepare` (make model) writes the key scales sparq4 reads."""
    books = PQCodebooks.load(codebook_path(model_path, 4))
    assert books.key_absmax is not None and bool((books.key_absmax > 0).all())
    assert books.key_absmax.shape == books.weights.shape
