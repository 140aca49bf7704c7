"""Angular LSH, bucket bitmasks and their use for decode-time HyperAttention matches."""

from __future__ import annotations

import pytest
import torch

from prescore_backend.kernels import AngularLSH, bucket_masks, masks_intersect, num_words
from prescore_backend.kernels.select import select_tiles


@pytest.mark.parametrize("num_bits", [1, 4, 7, 8])
def test_hash_range_shape_and_determinism(num_bits):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    a = AngularLSH(num_bits, 64, seed=1)
    h = a.hash(x)
    assert h.shape == (3, 5) and h.dtype == torch.int64
    assert ((h >= 0) & (h < 2 ** num_bits)).all()
    assert torch.equal(h, AngularLSH(num_bits, 64, seed=1).hash(x))  # same seed, same hash
    assert a.hash(x.to(torch.bfloat16)).shape == (3, 5)
    if num_bits >= 7:
        assert not torch.equal(a.proj, AngularLSH(num_bits, 64, seed=2).proj)


def test_identical_and_positively_scaled_vectors_share_buckets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 64, generator=g)
    lsh = AngularLSH(7, 64, seed=3)
    assert torch.equal(lsh.hash(x), lsh.hash(x.clone()))
    assert torch.equal(lsh.hash(x), lsh.hash(3.5 * x))  # angular: scale-free
    # Antipodal vectors get complementary codes.
    assert torch.equal(lsh.hash(-x), (2 ** 7 - 1) - lsh.hash(x))
    # Random vectors spread over buckets.
    assert lsh.hash(x).unique().numel() > 30


def test_num_words():
    assert [num_words(r) for r in (1, 5, 6, 7, 8, 10)] == [1, 1, 1, 2, 4, 16]


def _mask_ref(buckets: list[int], nw: int) -> list[int]:
    words = [0] * nw
    for b in buckets:
        words[b // 64] |= 1 << (b % 64)
    # Two's complement view of the unsigned 64-bit word.
    return [w - (1 << 64) if w >= 1 << 63 else w for w in words]


@pytest.mark.parametrize("num_bits", [3, 7, 8])
def test_bucket_masks_match_python_bitsets(num_bits):
    g = torch.Generator().manual_seed(num_bits)
    nb = 2 ** num_bits
    b = torch.randint(nb, (2, 5, 16), generator=g)
    b[0, 0] = 63  # the sign bit of word 0
    b[0, 1, :3] = torch.tensor([63, 64, nb - 1])  # word boundaries
    b = b % nb
    m = bucket_masks(b, num_bits)  # [2, 5, W]
    nw = num_words(num_bits)
    assert m.shape == (2, 5, nw) and m.dtype == torch.int64
    for i in range(2):
        for j in range(5):
            assert m[i, j].tolist() == _mask_ref(b[i, j].tolist(), nw)
    # valid=False entries set no bit.
    valid = torch.zeros_like(b, dtype=torch.bool)
    valid[..., 0] = True
    mv = bucket_masks(b, num_bits, valid)
    assert mv.tolist() == bucket_masks(b[..., :1], num_bits).tolist()


def test_masks_intersect_broadcast():
    a = bucket_masks(torch.tensor([[63], [5], [70]]), 7)  # [3, W]
    b = bucket_masks(torch.tensor([[63, 1], [70, 2]]), 7)  # [2, W]
    hit = masks_intersect(a[:, None], b[None])  # [3, 2]
    assert hit.tolist() == [[True, False], [False, False], [False, True]]


def test_query_bucket_found_in_tiles_holding_copies_of_the_query():
    """Keys equal to (a positive multiple of) the query share its bucket, so the tiles holding
    them are LSH matches; select_tiles then gives them LSH priority within the cap."""
    g = torch.Generator().manual_seed(0)
    R, Hkv, G, D, T, n = 2, 3, 3, 64, 16, 400
    lsh = AngularLSH(7, D, seed=0)
    keys = torch.randn(R, Hkv, n, D, generator=g)
    q = torch.randn(R, Hkv * G, D, generator=g)
    planted = {}  # (r, h) -> tiles holding a copy of query head h*G + 1
    for r in range(R):
        for h in range(Hkv):
            pos = torch.randperm(n, generator=g)[:2]
            keys[r, h, pos] = 2.0 * q[r, h * G + 1]
            planted[r, h] = set((pos // T).tolist())
    nt = -(-n // T)
    kb = lsh.hash(keys)  # [R, Hkv, n]
    kb = torch.nn.functional.pad(kb, (0, nt * T - n))
    valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, nt * T - n))
    tile_masks = bucket_masks(kb.view(R, Hkv, nt, T), 7, valid.view(nt, T).expand(R, Hkv, nt, T))
    qmask = bucket_masks(lsh.hash(q).view(R, Hkv, G), 7)  # [R, Hkv, W]
    match = masks_intersect(tile_masks, qmask.unsqueeze(2))  # [R, Hkv, nt]
    for (r, h), tiles in planted.items():
        assert all(match[r, h, t] for t in tiles)
    # With low scores on the planted tiles, LSH priority still selects them.
    scores = torch.rand(R, Hkv, nt, generator=g)
    for (r, h), tiles in planted.items():
        scores[r, h, list(tiles)] = -1.0
    cap = int(match.sum(-1).max())
    sel = select_tiles(scores, torch.full((R,), nt), torch.full((R,), 2 + cap), sink_tiles=1,
                       window_tiles=1, lsh_match=match, lsh_cap=cap)
    for (r, h), tiles in planted.items():
        assert tiles <= set(sel.tiles[r, h].tolist())
    assert sel.source_counts[2] > 0
