"""Product-quantized key codes (query_aware="pq"): codebooks, codes, ranking, C++ pick,
the codebook file's life cycle and how a serving process finds it."""

from __future__ import annotations

import logging

import pytest
import torch

from prescore_backend.config import PrescoreConfig
from prescore_backend.selection import query_aware_pick, side_read_fraction
from prescore_backend.side_data import SideData, record_codes
from prescore_backend.pq import (
    LayerCodebook,
    PQCodebooks,
    codebook_path,
    fit_codebook,
    pq_encode,
    pq_tile_rank,
    resolve_codebooks,
    rotary_pair_dims,
)


def _book(hkv: int, d: int, m: int, seed: int = 0) -> LayerCodebook:
    g = torch.Generator().manual_seed(seed)
    return fit_codebook(torch.randn(hkv, 600, d, generator=g), m, iters=3, seed=seed,
                        queries=torch.randn(hkv, 50, d, generator=g) * torch.linspace(0.1, 3, d))


def _decode(book: LayerCodebook, codes: torch.Tensor, h: int) -> torch.Tensor:
    """Keys rebuilt from their codes ``[N, m]`` (KV head h), channels in model order."""
    out = torch.zeros(codes.shape[0], book.weights.shape[1])
    for j in range(book.subspaces):
        out[:, book.dims[j]] = book.centroids[h, j, codes[:, j].long()]
    return out


def test_rotary_pair_dims_keep_rotated_channels_together() -> None:
    dims = rotary_pair_dims(64, 4)
    assert dims.shape == (4, 16)
    assert sorted(dims.flatten().tolist()) == list(range(64))
    for j in range(4):
        lo = dims[j, :8]
        assert torch.equal(dims[j, 8:], lo + 32)  # (i, i + D/2): one rotary pair
    with pytest.raises(ValueError, match="must divide the head dim"):
        rotary_pair_dims(64, 3)


def test_fit_codebook_places_centroids_on_the_clusters() -> None:
    """k-means per (KV head, subspace): keys drawn around 16 known points per subspace are
    coded back to within the noise, with or without query weights, and a fit is
    deterministic for its seed."""
    g = torch.Generator().manual_seed(1)
    hkv, d, m = 2, 8, 2
    dims = rotary_pair_dims(d, m)
    centers = torch.randn(hkv, m, 16, d // m, generator=g) * 10
    pick = torch.randint(0, 16, (hkv, 4000, m), generator=g)
    keys = torch.zeros(hkv, 4000, d)
    for h in range(hkv):
        for j in range(m):
            keys[h][:, dims[j]] = centers[h, j, pick[h, :, j]]
    keys += 0.01 * torch.randn(hkv, 4000, d, generator=g)
    queries = torch.randn(hkv, 100, d, generator=g) * torch.tensor([1.0, 5, 1, 1, 0.2, 1, 1, 1])
    for qs in (None, queries):
        book = fit_codebook(keys, m, iters=30, seed=0, queries=qs)
        assert book.centroids.shape == (hkv, m, 256, d // m) and torch.equal(book.dims, dims)
        again = fit_codebook(keys, m, iters=30, seed=0, queries=qs)
        assert torch.equal(book.centroids, again.centroids)
        codes = pq_encode(keys.transpose(0, 1), book)  # [N, Hkv, m]
        for h in range(hkv):
            err = (_decode(book, codes[:, h], h) - keys[h]).norm(dim=-1).median()
            assert err < 0.1, err  # every cluster holds initial centroids: keys land in their own
    assert book.weights[0, 1] > 3 * book.weights[0, 0] > 9 * book.weights[0, 4]
    with pytest.raises(ValueError, match="fewer than 256"):
        fit_codebook(keys[:, :100], 2)


def test_pq_encode_is_the_nearest_centroid_under_the_query_weights() -> None:
    book = _book(2, 16, 4)
    keys = torch.randn(50, 2, 16)
    codes = pq_encode(keys, book)
    assert codes.dtype == torch.uint8 and codes.shape == (50, 2, 4)
    for h in range(2):
        for j in range(4):
            c = book.dims[j]
            w = book.weights[h, c]
            dist = (((keys[:, h, None, c] - book.centroids[h, j][None]) * w) ** 2).sum(-1)
            assert torch.equal(codes[:, h, j].long(), dist.argmin(-1))


def _paged_codes(lens, hkv, d, m, B, seed):
    """Per-row keys written through record_codes into shuffled blocks -> side, bt, keys."""
    g = torch.Generator().manual_seed(seed)
    mb = max(-(-n // B) for n in lens)
    nb = len(lens) * mb + 3
    perm = torch.randperm(nb, generator=g)
    bt = perm[: len(lens) * mb].view(len(lens), mb)
    book = _book(hkv, d, m, seed)
    side = SideData.allocate(nb, hkv, B // 16, block_size=B, codebook=book)
    keys = []
    for r, n in enumerate(lens):
        k = torch.randn(n, hkv, d, generator=g)
        pos = torch.arange(n)
        record_codes(side, k, bt[r, pos // B], pos % B)
        keys.append(k)
    return side, bt, keys, book


@pytest.mark.parametrize("group", [1, 3])
def test_pq_rank_and_cpp_pick_match_the_decoded_keys(group) -> None:
    """pq_tile_rank = max over the tile of (the group's summed query) . (the key rebuilt from
    its codes), per row through a shuffled block table (MHA and GQA, ragged rows); the C++
    pick marks the same tiles as ranking it, per-row caps, sinks and window left out."""
    lens, hkv, d, m, B = [1500, 700, 1100], 2, 64, 4, 128
    side, bt, keys, book = _paged_codes(lens, hkv, d, m, B, seed=3)
    q = torch.randn(len(lens), hkv * group, d)
    rank = pq_tile_rank(q, side.codes, bt, book, 16)
    M = bt.shape[1] * B // 16
    assert rank.shape == (len(lens), hkv, M)
    for r, n in enumerate(lens):
        pos = torch.arange(n)
        codes = side.codes[bt[r, pos // B], :, pos % B]  # [n, Hkv, m] as written
        for h in range(hkv):
            est = _decode(book, codes[:, h], h) @ q[r, h * group:(h + 1) * group].sum(0)
            full = n // 16
            want = est[: full * 16].view(full, 16).amax(-1)
            torch.testing.assert_close(rank[r, h, :full], want, rtol=1e-5, atol=1e-4)
    cfg = PrescoreConfig(query_aware="pq", query_cap_ratio=1.0)
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


def test_pq_side_data_and_read_fraction() -> None:
    """Codes cost pq_subspaces bytes per token and KV head: 4 / (2 x 64 x 2) = 1/64 of a bf16
    K+V (plus the pre-scores when they fill part of the budget)."""
    f = side_read_fraction(PrescoreConfig(query_aware="pq", query_cap_ratio=1.0), 64)
    assert f == pytest.approx(1 / 64)
    f8 = side_read_fraction(PrescoreConfig(query_aware="pq", pq_subspaces=8,
                                           query_cap_ratio=1.0), 64, 4)
    assert f8 == pytest.approx(8 / 512)
    side = SideData.allocate(4, 3, 8, block_size=128, codebook=_book(3, 64, 4))
    assert side.codes.shape == (4, 3, 128, 4) and side.codes.dtype == torch.uint8
    assert side.bytes_per_token(128) == pytest.approx((3 * 8 * 4 + 3 * 128 * 4) / 128)


def _books(L: int, hkv: int, m: int, d: int) -> PQCodebooks:
    return PQCodebooks(torch.randn(L, hkv, m, 256, d // m), torch.rand(L, hkv, d),
                       rotary_pair_dims(d, m), {"text": "x"})


def test_codebook_file_round_trip_and_shape_check(tmp_path) -> None:
    books = _books(2, 3, 4, 64)
    path = codebook_path(tmp_path, 4)
    books.save(path)
    back = PQCodebooks.load(path)
    assert torch.equal(back.centroids, books.centroids) and back.meta == {"text": "x"}
    assert torch.equal(back.weights, books.weights) and torch.equal(back.dims, books.dims)
    assert back.subspaces == 4 and back.layer(1).centroids.shape == (3, 4, 256, 16)
    back.check(2, 3, 64, "here")
    with pytest.raises(ValueError, match="prescore-models calibrate"):
        back.check(30, 3, 64, "here")


def test_resolve_codebooks_finds_falls_back_or_names_the_setting(tmp_path) -> None:
    """The model directory's codebooks are used; a model without any falls back to Quest with a
    warning line; an explicit pq_codebook that is missing, or has other subspaces, is an error
    naming the setting."""
    cfg = PrescoreConfig(query_aware="pq")
    assert resolve_codebooks(PrescoreConfig(query_aware="quest"), tmp_path)[0] is None
    books, used, msg = resolve_codebooks(cfg, tmp_path)
    assert books is None and used.query_aware == "quest" and "prescore-models calibrate" in msg
    _books(1, 1, 4, 64).save(codebook_path(tmp_path, 4))
    books, used, msg = resolve_codebooks(cfg, tmp_path)
    assert books is not None and used.query_aware == "pq" and str(tmp_path) in msg
    with pytest.raises(ValueError, match="PRESCORE_PQ_CODEBOOK"):
        resolve_codebooks(cfg.replace(pq_codebook=str(tmp_path / "nope.pt")), tmp_path)
    with pytest.raises(ValueError, match="PRESCORE_PQ_SUBSPACES"):
        resolve_codebooks(cfg.replace(pq_codebook=str(codebook_path(tmp_path, 4)),
                                      pq_subspaces=8), tmp_path)


def test_prepared_model_ships_codebooks_that_fit_it(model_path) -> None:
    """`prescore-models prepare` (make model) calibrates the embedded model: its codebooks
    exist, fit its attention shapes, and say what they were fitted on."""
    from prescore_backend.llama_ref import LlamaSpec
    import json
    from pathlib import Path

    spec = LlamaSpec.from_config(json.loads((Path(model_path) / "config.json").read_text()))
    books = PQCodebooks.load(codebook_path(model_path, 4))
    books.check(spec.layers, spec.kv_heads, spec.head_dim, model_path)
    assert "stdlib" in books.meta["text"] and books.meta["tokens"] >= 4096
    assert bool(torch.isfinite(books.centroids).all())


def test_calibrate_rejects_a_non_llama_directory(tmp_path, capsys) -> None:
    from prescore_backend.server.models import main

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    assert main(["calibrate", str(tmp_path)]) == 1
    assert "Llama" in capsys.readouterr().err


#: Flags that turn an AVX-512 (or AMX) host's -march=native build into its AVX2 code paths.
def _assert_codes_match(got: torch.Tensor, want: torch.Tensor, keys: torch.Tensor,
                        book: LayerCodebook) -> None:
    """Codes ``[N, Hkv, m]`` equal, except where the two centroids are equally near (the C++
    and the batched matmul sum in different orders)."""
    diff = (got != want).nonzero().tolist()
    assert len(diff) <= max(1, got.numel() // 1000), len(diff)
    for n, h, j in diff:
        x = keys[n, h, book.dims[j]].float() * book.weights[h, book.dims[j]]
        c = book.centroids[h, j] * book.weights[h, book.dims[j]]
        d2 = ((x - c) ** 2).sum(-1)
        a, b = d2[int(got[n, h, j])], d2[int(want[n, h, j])]
        assert abs(float(a - b)) <= 1e-5 * float(max(a, b)), (n, h, j, float(a), float(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_record_codes_writes_what_pq_encode_gives(dtype) -> None:
    """The C++ encoder (decode.record_codes' CPU path) writes, at each key's shuffled block and
    offset, the code pq_encode gives (torch), for fp32 and bf16 keys, GQA-sized heads."""
    hkv, d, m, B, n = 3, 64, 4, 128, 900
    book = _book(hkv, d, m, seed=11)
    g = torch.Generator().manual_seed(11)
    keys = (torch.randn(n, hkv, d, generator=g) * 2).to(dtype)
    nb = 12
    slots = torch.randperm(nb * B, generator=g)[:n]
    block, off = slots // B, slots % B
    side = {i: SideData.allocate(nb, hkv, B // 16, block_size=B, codebook=book)
            for i in ("cpp", "torch")}
    for impl, sd in side.items():
        record_codes(sd, keys, block, off, impl=impl)
    assert torch.equal(side["torch"].codes[block, :, off], pq_encode(keys, book))
    _assert_codes_match(side["cpp"].codes[block, :, off], side["torch"].codes[block, :, off],
                        keys, book)
    untouched = torch.ones(nb, B, dtype=torch.bool)
    untouched[block, off] = False
    assert int(side["cpp"].codes.permute(0, 2, 1, 3)[untouched].abs().sum()) == 0


AVX2_ONLY = ("-mno-avx512f", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")


@pytest.mark.skipif("avx512f" not in __import__("prescore_backend.kernels.host",
                                               fromlist=["cpu_flags"]).cpu_flags(),
                    reason="needs AVX-512F (an AVX2-only host builds these paths by default)")
def test_avx2_build_picks_the_same_tiles() -> None:
    """The C++ built without AVX-512 (the code AVX2-only hosts run) ranks with PQ codes and
    Quest bounds exactly as the host's own build and the torch ranking do."""
    from prescore_backend.kernels.cpu_ext import build

    avx2 = build(AVX2_ONLY)
    lens, hkv, d, m, B, group = [1500, 700, 1100], 3, 64, 4, 128, 3
    side, bt, _, book = _paged_codes(lens, hkv, d, m, B, seed=7)
    q = torch.randn(len(lens), hkv * group, d)
    nt = torch.tensor([-(-n // 16) for n in lens])
    caps = torch.tensor([9, 4, 6])
    M = bt.shape[1] * B // 16
    cfg = PrescoreConfig(query_aware="pq", query_cap_ratio=1.0)
    want = query_aware_pick(cfg, q, side, bt, torch.zeros(len(lens), hkv, M), nt, caps,
                            lsh=None, impl="torch")
    got = avx2.pq_pick_cpu(q, side.codes, bt, book.centroids_t, book.dims, nt, caps, M, 16,
                           cfg.sink_tiles, cfg.window_tiles)
    assert torch.equal(got, want)
    nb = side.codes.shape[0]
    kmin, kmax = torch.randn(nb, hkv, 8, d), torch.randn(nb, hkv, 8, d)
    kmin, kmax = torch.minimum(kmin, kmax), torch.maximum(kmin, kmax)
    from prescore_backend.kernels.cpu_select import cpu_quest_pick

    host = cpu_quest_pick(q, kmin, kmax, bt, nt, caps, num_tile_slots=M, sink_tiles=2,
                          window_tiles=10)
    cand = torch.empty(0, dtype=torch.bool)
    assert torch.equal(avx2.quest_pick_cpu(q, kmin, kmax, bt, nt, caps, cand, M, 2, 10), host)
    # the PQ encoder of new keys
    keys = torch.randn(300, hkv, d).bfloat16()
    block, off = torch.arange(300) // B, torch.arange(300) % B
    codes = torch.zeros_like(side.codes)
    avx2.record_codes_cpu(keys, block, off, codes, book.dims, book.enc_w, book.enc_ct,
                          book.enc_cn)
    _assert_codes_match(codes[block, :, off], pq_encode(keys, book), keys, book)
