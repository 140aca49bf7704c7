"""Scorers: registry, determinism, exact formulas, and the planted-subspace guarantee."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from prescore_backend.kernels import sparse_decode
from prescore_backend.kernels.testing import all_tiles, make_paged_case
from prescore_backend.scoring import SCORERS, Scorer, available_scorers, get_scorer, register_scorer
from prescore_backend.scoring.kmeans import _cluster_medians
from prescore_backend.kernels.select import select_tiles
from prescore_backend.scoring.tiles import aggregate_tiles

REQUIRED = ["kernel_kmeans", "key_norm", "kmeans", "kmedian", "leverage", "random"]
FAST = dict(kmeans=dict(num_clusters=16), kernel_kmeans=dict(num_clusters=16),
            kmedian=dict(num_clusters=16))


def test_registry():
    assert set(REQUIRED) <= set(available_scorers())
    assert available_scorers() == sorted(SCORERS)
    with pytest.raises(ValueError, match="kmeans"):
        get_scorer("nope")
    s = get_scorer("kmeans", num_clusters=7, iters=2, seed=3)
    assert (s.num_clusters, s.iters, s.seed, s.name) == (7, 2, 3, "kmeans")

    @register_scorer("_test_first_coord")
    @dataclass
    class FirstCoord(Scorer):
        def score(self, keys):
            return keys[..., 0].float()

    try:
        k = torch.randn(2, 5, 4)
        assert torch.equal(get_scorer("_test_first_coord").score(k), k[..., 0])
    finally:
        SCORERS.pop("_test_first_coord")


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_determinism(name, dtype):
    keys = torch.randn(3, 300, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    a = get_scorer(name, seed=5, **FAST.get(name, {})).score(keys)
    b = get_scorer(name, seed=5, **FAST.get(name, {})).score(keys)
    assert a.shape == (3, 300) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    state = torch.random.get_rng_state()
    get_scorer(name, **FAST.get(name, {})).score(keys)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    if name == "random":
        assert not torch.equal(a, get_scorer(name, seed=6).score(keys))


def test_key_norm_is_squared_norm():
    k = torch.randn(2, 10, 8)
    torch.testing.assert_close(get_scorer("key_norm").score(k), (k * k).sum(-1))


def test_exact_leverage_formula():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 200, 16, generator=g) * torch.linspace(0.1, 3, 16)  # anisotropic
    ridge = 1e-2
    got = get_scorer("leverage", ridge=ridge, method="exact").score(k)
    kd = k.double()
    gram = kd.transpose(1, 2) @ kd
    lam = ridge * gram.diagonal(dim1=1, dim2=2).sum(-1) / 16
    inv = torch.linalg.inv(gram + lam.view(-1, 1, 1) * torch.eye(16, dtype=torch.float64))
    want = torch.einsum("hnd,hde,hne->hn", kd, inv, kd)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (got.sum(-1) <= 16 + 1e-3).all()  # sum of ridge leverages <= d


def test_sketched_leverage_tracks_exact_and_auto_switch():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 6000, 32, generator=g) * torch.linspace(0.2, 2, 32)
    k[:, :20] *= 4  # a few heavy keys
    exact = get_scorer("leverage", method="exact").score(k)
    sk = get_scorer("leverage", method="sketch", sketch_rows=1024).score(k)
    for h in range(2):
        assert torch.corrcoef(torch.stack([exact[h], sk[h]]))[0, 1] > 0.95
    jl = get_scorer("leverage", method="sketch", sketch_rows=1024, jl_dim=32).score(k)
    assert set(jl[0].topk(20).indices.tolist()) & set(range(20))
    auto = get_scorer("leverage", method="auto", sketch_threshold=5000, sketch_rows=1024).score(k)
    assert torch.equal(auto, sk)
    with pytest.raises(ValueError):
        get_scorer("leverage", method="svd").score(k)


def test_cluster_medians():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 50, 3, generator=g)
    assign = torch.randint(4, (2, 50), generator=g)
    assign[:, :4] = torch.arange(4)  # no empty cluster
    counts = torch.zeros(2, 4).scatter_add_(1, assign, torch.ones(2, 50))
    sx, order = x.sort(dim=1)
    got = _cluster_medians(sx, order, assign, counts)
    for h in range(2):
        for c in range(4):
            want = x[h, assign[h] == c].median(dim=0).values  # lower median, like ours
            torch.testing.assert_close(got[h, c], want)


@pytest.mark.parametrize("name", ["kmeans", "kernel_kmeans", "kmedian"])
def test_cluster_scores_outliers_and_singletons(name):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 16, generator=g) * 10
    x = (centres.repeat_interleave(50, 0) + 0.3 * torch.randn(200, 16, generator=g)).unsqueeze(0)
    x[0, 7] += 4.0  # an outlier of blob 0
    s = get_scorer(name, num_clusters=4).score(x)[0]
    assert int(s.argmax()) == 7
    assert (s <= 1 + 1e-5).all() and (s > 0).all()
    # A singleton cluster (an isolated key) scores 1, the maximum.
    y = torch.cat([x, 100 + torch.zeros(1, 1, 16)], 1)
    s = get_scorer(name, num_clusters=5).score(y)[0]
    assert int(s.argmax()) == 200 and abs(float(s[200]) - 1) < 1e-4


def planted_keys(seed: int, H: int = 2, n: int = 1024, D: int = 64, s: int = 4, p: int = 3,
                 norm: float = 8.0, noise: float = 0.01):
    """Keys from an s-dim subspace plus p planted off-subspace keys at random positions.

    Returns keys ``[H, n, D]`` and the planted positions ``[H, p]``.
    """
    g = torch.Generator().manual_seed(seed)
    keys, pos = [], []
    for _ in range(H):
        basis, _ = torch.linalg.qr(torch.randn(D, s + p, generator=g))  # orthonormal [D, s+p]
        k = torch.randn(n, s, generator=g) @ basis[:, :s].T + noise * torch.randn(n, D, generator=g)
        where = torch.randperm(n, generator=g)[:p]
        k[where] = norm * basis[:, s:].T  # orthogonal to the subspace and to each other
        keys.append(k)
        pos.append(where.sort().values)
    return torch.stack(keys), torch.stack(pos)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,kwargs", [
    ("leverage", {}),
    ("kmeans", dict(num_clusters=5)),  # k = s + 1
])
def test_planted_subspace_keys_rank_on_top(seed, name, kwargs):
    """The guarantee of 2505.11040: leverage and k-means with k = s + 1 rank the planted keys on top."""
    keys, pos = planted_keys(seed)
    scores = get_scorer(name, seed=seed, **kwargs).score(keys)
    top = scores.topk(pos.shape[1], dim=-1).indices.sort(-1).values
    assert torch.equal(top, pos)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["kernel_kmeans", "kmedian"])
def test_planted_subspace_keys_near_top(seed, name):
    """No exact guarantee for these (the bounded kernel distance saturates, 3 median steps can
    leave tiny bulk clusters scoring ~1): the planted keys must still be in the top 3p."""
    keys, pos = planted_keys(seed)
    scores = get_scorer(name, seed=seed, num_clusters=5).score(keys)
    rank = (scores.unsqueeze(-1) > scores.gather(1, pos).unsqueeze(1)).sum(1)  # [H, p]
    assert (rank < 3 * pos.shape[1]).all()


def test_leverage_finds_planted_keys_that_key_norm_misses():
    keys, pos = planted_keys(0, norm=2.0)  # same norm as the bulk (sqrt(s) = 2)
    p = pos.shape[1]
    lev = get_scorer("leverage").score(keys).topk(p, -1).indices.sort(-1).values
    assert torch.equal(lev, pos)
    kn = get_scorer("key_norm").score(keys).topk(p, -1).indices.sort(-1).values
    assert not torch.equal(kn, pos)


@pytest.mark.parametrize("name,kwargs", [("leverage", {}), ("kmeans", dict(num_clusters=5))])
def test_query_aligned_with_planted_key_recovers_its_mass(name, kwargs):
    """Pre-scored selection at a small budget keeps the tiles a planted-aligned query needs."""
    T, B, G = 16, 64, 3
    keys, pos = planted_keys(4, H=2, n=1000)
    case = make_paged_case([1000], 2, G, 64, B, keys=[keys], seed=1)
    # Each query head looks along one planted key of its KV head.
    planted = keys[torch.arange(2).repeat_interleave(G), pos.repeat_interleave(G, 0)[:, 0]]
    query = (2.0 * planted / planted.norm(dim=-1, keepdim=True)).unsqueeze(0)  # [1, Hq, D]
    args = (query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens)
    _, full_lse = sparse_decode(*args, all_tiles(case.seq_lens, 2, T), T, 1.0)

    def recovered(scorer_name, **kw):
        ts = aggregate_tiles(get_scorer(scorer_name, **kw).score(keys), T).unsqueeze(0)  # [1, 2, M]
        sel = select_tiles(ts, torch.tensor([ts.shape[-1]]), torch.tensor([6]), sink_tiles=1,
                           window_tiles=1)
        _, lse = sparse_decode(*args, sel.tiles, T, 1.0)
        return (lse - full_lse).exp()  # share of the softmax mass inside the selection [1, Hq]

    assert (recovered(name, **kwargs) > 0.9).all()
    assert (recovered("random") < 0.9).any()  # the budget is tight: a blind choice fails


def test_leverage_survives_non_finite_or_degenerate_keys():
    """A Gram that cannot be factored (non-finite keys) must not raise inside the engine:
    that head falls back to scaled key norms; other heads keep exact leverage."""
    from prescore_backend.scoring import get_scorer
    from prescore_backend.scoring.leverage import ridge_leverage

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 256, 64, generator=g)
    bad = keys.clone()
    bad[1, 7, 3] = float("inf")
    scorer = get_scorer("leverage")
    out = scorer.score_prefixes(bad, 0, [128, 256], grain=128)  # must not raise
    assert out.shape == (3, 256)
    good = scorer.score_prefixes(keys, 0, [128, 256], grain=128)
    torch.testing.assert_close(out[0], good[0])
    torch.testing.assert_close(out[2], good[2])
    assert torch.isfinite(ridge_leverage(torch.zeros(2, 16, 8))).all()  # all-zero keys too


def test_recency_scores_positions_across_blocks():
    """recency: later keys always score higher, also across blocks scored with prefix fits of
    different lengths (score_prefixes keeps absolute positions), so pre-score ranking fills the
    budget with the most recent tiles."""
    from prescore_backend.scoring.tiles import aggregate_tiles

    s = get_scorer("recency")
    keys = torch.randn(2, 384, 8)
    full = s.score(keys)
    assert torch.equal(full[0], torch.arange(1, 385, dtype=torch.float32))
    pre = s.score_prefixes(keys, 128, [256, 384], grain=128)
    assert torch.equal(pre, full[:, 128:])
    tiles = aggregate_tiles(pre, 16, "max")
    assert bool((tiles[:, 1:] > tiles[:, :-1]).all())
