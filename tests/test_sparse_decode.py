"""Sparse paged decode: torch path and oracle vs dense attention, merging, residual."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from prescore_backend.kernels import (
    vllm_cpu_kv_views,
    merge_attn_states,
    sparse_decode,
    sparse_decode_ref,
)
from prescore_backend.kernels.sparse_decode import _tile_view
from prescore_backend.kernels.testing import all_tiles, dense_attention, make_paged_case

B, T = 32, 16
SEQ_LENS = [37, 64, 130, 5]  # partial tile, exact blocks, partial block, shorter than a tile
HKV = 2

# bf16 inputs are exact bf16 values computed in fp32; the output is rounded to bf16 (2^-8 rel).
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def random_tiles(seq_lens: list[int], hkv: int, seed: int, p: float = 0.4,
                 empty_row: int | None = None) -> torch.Tensor:
    """Random unique tiles per (row, head) in shuffled order, -1 sprinkled in: ``[R, Hkv, S]``."""
    g = torch.Generator().manual_seed(seed)
    M = max(-(-n // T) for n in seq_lens)
    S = M + 3
    out = torch.full((len(seq_lens), hkv, S), -1, dtype=torch.int32)
    for r, n in enumerate(seq_lens):
        nt = -(-n // T)
        for h in range(hkv):
            if r == empty_row:
                continue
            keep = torch.nonzero(torch.rand(nt, generator=g) < p).flatten()
            slots = torch.randperm(S, generator=g)[: len(keep)]
            out[r, h, slots] = keep.to(torch.int32)
    return out


def dense_rows(case, scale):
    outs, lses = zip(*(dense_attention(case.query[r], case.keys[r], case.values[r], scale)
                       for r in range(len(case.keys))))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("impl", ["torch", "cpp", "ref", "auto"])
@pytest.mark.parametrize("layout", ["cpu", "cpu_amx", "cpu_rowmajor", "gpu"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tiles_is_dense_attention(impl, layout, group, head_dim, dtype):
    case = make_paged_case(SEQ_LENS, HKV, group, head_dim, B, layout=layout, dtype=dtype,
                           seed=head_dim + group)
    scale = head_dim ** -0.5
    tiles = all_tiles(case.seq_lens, HKV, T)
    out = torch.full_like(case.query, float("nan"))  # poisoned: every element must be written
    o, lse = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                           case.seq_lens, tiles, T, scale, impl=impl, out=out,
                           kv_layout=case.kv_layout)
    assert o is out and o.dtype == dtype and lse.dtype == torch.float32
    ref_o, ref_lse = dense_rows(case, scale)
    torch.testing.assert_close(o.double(), ref_o, **TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("layout", ["cpu", "cpu_amx", "cpu_rowmajor", "gpu"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_match_ref_on_random_selections(impl, layout, group, head_dim, dtype):
    case = make_paged_case(SEQ_LENS, HKV, group, head_dim, B, layout=layout, dtype=dtype, seed=7)
    scale = head_dim ** -0.5
    tiles = random_tiles(SEQ_LENS, HKV, seed=head_dim, empty_row=1)
    o, lse = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                           case.seq_lens, tiles, T, scale, impl=impl, kv_layout=case.kv_layout)
    ref_o, ref_lse = sparse_decode_ref(case.query, *case.strided(), case.seq_lens, tiles, T,
                                       scale)
    assert not o.isnan().any()
    torch.testing.assert_close(o.double(), ref_o, **TOL[dtype])
    # Empty (row 1) and any empty (row, head) give out 0, lse -inf on both paths.
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (o[1] == 0).all() and (lse[1] == float("-inf")).all()
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tile,group,dtype", [
    (32, 2, torch.float32), (32, 4, torch.bfloat16), (16, 8, torch.float32),
    (16, 5, torch.float16), (16, 6, torch.bfloat16),  # G > 4: one q.k line per step
    (16, 9, torch.float32),  # G > 8: the generic C++ loop
    (8, 3, torch.bfloat16),  # T not a multiple of 16: the generic C++ loop
])
@pytest.mark.parametrize("layout", ["cpu", "cpu_amx"])
def test_cpp_kernel_tiles_groups_dtypes(tile, group, dtype, layout):
    """The fused kernel's 16-token vector paths (T = 16k, G <= 8; "vec" layout any dtype,
    packed "amx" layout bf16) and its generic fallback (a packed cache unpacked first) against
    the oracle: ragged lengths ending inside a 16-token chunk, poisoned cache slots."""
    lens = [37, 64, 130, 5, 200]
    bs = 64
    case = make_paged_case(lens, HKV, group, 64, bs, layout=layout, dtype=dtype, seed=tile + group)
    g = torch.Generator().manual_seed(group)
    M = max(-(-n // tile) for n in lens)
    tiles = torch.full((len(lens), HKV, M), -1, dtype=torch.int32)
    for r, n in enumerate(lens):
        for h in range(HKV):
            keep = torch.nonzero(torch.rand(-(-n // tile), generator=g) < 0.6).flatten()
            keep = torch.cat([keep, torch.tensor([-(-n // tile) - 1])]).unique()  # last, partial
            tiles[r, h, : len(keep)] = keep.to(torch.int32)
    o, lse = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                           case.seq_lens, tiles, tile, 0.125, impl="cpp", kv_layout=case.kv_layout)
    ref_o, ref_lse = sparse_decode_ref(case.query, *case.strided(), case.seq_lens, tiles, tile,
                                       0.125)
    tol = TOL.get(dtype, dict(atol=2e-3, rtol=2e-3))
    torch.testing.assert_close(o.double(), ref_o, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16),
                                          ("cpu_amx", torch.bfloat16)])
def test_cpp_kernel_running_max_jumps(layout, dtype):
    """The vector paths raise their softmax reference only when a chunk's max passes it by more
    than 8 (lazy rescaling). Scores that climb chunk after chunk (many rescales), fall (later
    probabilities far below the reference, some underflowing) or stay level must all give the
    dense oracle's output and LSE."""
    n, D, G, scale = 300, 64, 3, 0.125
    gen = torch.Generator().manual_seed(7)
    ramp = torch.linspace(0, 1, n).view(1, n, 1)
    norms = [1 + 6 * ramp, 7 - 6 * ramp, torch.ones(1, n, 1)]  # per-token key norm factors
    keys = [torch.randn(HKV, n, D, generator=gen) * f for f in norms]
    case = make_paged_case([n] * 3, HKV, G, D, 64, layout=layout, dtype=dtype, seed=3, keys=keys)
    query = (case.query.float() * 6).to(dtype)  # score std ~6 x the key norm factor
    out, lse = sparse_decode(query, case.key_cache, case.value_cache, case.block_tables,
                             case.seq_lens, all_tiles(case.seq_lens, HKV, T), T, scale,
                             impl="cpp", kv_layout=case.kv_layout)
    refs = [dense_attention(query[r], case.keys[r], case.values[r], scale) for r in range(3)]
    torch.testing.assert_close(out.double(), torch.stack([o for o, _ in refs]), **TOL[dtype])
    torch.testing.assert_close(lse.double(), torch.stack([x for _, x in refs]), atol=1e-4,
                               rtol=1e-5)
    # The cases are what they claim: many rescales past the first chunk where scores climb,
    # few where they fall, and probabilities below e^-87 (clamped to 0) there.
    rescales = []
    for r in range(3):
        k = case.keys[r].double().repeat_interleave(G, 0)  # [Hq, n, D]
        s = scale * torch.einsum("hd,hnd->hn", query[r].double(), k)  # [Hq, n]
        cmax = torch.stack([c.amax(-1) for c in s.split(16, -1)], -1)  # [Hq, chunks]
        count = 0
        for row in cmax:
            m = row[0]
            for c in row[1:]:
                if c > m + 8:
                    count, m = count + 1, c
        rescales.append(count)
        if r == 1:
            assert (s - s.amax(-1, keepdim=True)).min() < -87
    assert rescales[0] >= 10 and rescales[0] > 3 * rescales[1], rescales


def test_amx_pack_roundtrip_and_layout_formula():
    """amx_pack/unpack invert each other and place token t, dim d where vLLM's "amx" write does
    (K: (t//16)*16*D + (d//2)*32 + (t%16)*2 + d%2; V: (d//16)*16*B + (t//2)*32 + (d%16)*2 + t%2)."""
    from prescore_backend.kernels.layouts import amx_pack, amx_unpack

    n, h, b, d = 2, 3, 32, 48
    k = torch.randn(n, h, b, d)
    v = torch.randn(n, h, b, d)
    kp, vp = amx_pack(k, v)
    assert all(torch.equal(x, y) for x, y in zip(amx_unpack(kp, vp), (k, v)))
    t, dd = 21, 37
    assert kp.reshape(n, h, -1)[1, 2, (t // 16) * 16 * d + (dd // 2) * 32 + (t % 16) * 2 + dd % 2] == k[1, 2, t, dd]
    assert vp.reshape(n, h, -1)[1, 2, (dd // 16) * 16 * b + (t // 2) * 32 + (dd % 16) * 2 + t % 2] == v[1, 2, t, dd]


def test_unknown_kv_layout_is_refused():
    case = make_paged_case([40], 2, 1, 64, B)
    with pytest.raises(ValueError, match="kv_layout"):
        sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                      case.seq_lens, all_tiles(case.seq_lens, 2, T), T, 0.125, kv_layout="vnni")


def test_fast_path_strides():
    cpu = make_paged_case([40], 2, 1, 64, B, layout="cpu")
    rm = make_paged_case([40], 2, 1, 64, B, layout="cpu_rowmajor")
    gpu = make_paged_case([40], 2, 1, 64, B, layout="gpu")
    assert _tile_view(cpu.key_cache, T)[-1] is True  # vLLM CPU K: [D, B] per block
    assert _tile_view(cpu.value_cache, T)[-1] is False
    assert _tile_view(rm.key_cache, T)[-1] is False
    assert _tile_view(rm.value_cache, T) is not None  # storage offset B*D is a tile multiple
    assert _tile_view(gpu.key_cache, T) is None  # token rows are strided: generic gather


def test_vllm_cpu_layout_views():
    """K is stored [D, B] per (block, head), V [B, D] (as vLLM's cpu_attn_reshape_and_cache)."""
    NB, H, Bs, D = 3, 2, 8, 4
    cache = torch.arange(NB * H * Bs * 2 * D, dtype=torch.float32).view(NB, H, Bs, 2 * D)
    k, v = vllm_cpu_kv_views(cache)
    flat = cache.view(NB, H, -1)
    for b, h, j, d in [(0, 0, 0, 0), (1, 1, 5, 3), (2, 0, 7, 2)]:
        assert k[b, h, j, d] == flat[b, h, d * Bs + j]
        assert v[b, h, j, d] == flat[b, h, Bs * D + j * D + d]
    assert k.data_ptr() == cache.data_ptr()  # views, no copies


def test_empty_selection_shape():
    case = make_paged_case([20, 50], HKV, 3, 64, B)
    tiles = torch.empty(2, HKV, 0, dtype=torch.int32)
    for impl in ("torch", "cpp", "ref"):
        o, lse = sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                               case.seq_lens, tiles, T, 0.125, impl=impl)
        assert (o == 0).all() and (lse == float("-inf")).all()


def test_fused_cpu_kernel_compiles_here():
    """The fused kernel is what "auto" serves with on CPU; it must build on our machines."""
    from prescore_backend.kernels.cpu_sparse_decode import available

    assert available()


def test_setup_step_builds_the_cpu_kernels_and_never_fails(capsys, monkeypatch):
    """`make cpu-kernels` (part of `make serve` / `make test`): names the built extension, and
    where the compiler is missing says so and exits 0 (the torch paths serve)."""
    from prescore_backend.kernels import cpu_ext

    assert cpu_ext.main() == 0
    assert f"{cpu_ext.ext_name()} ready for" in capsys.readouterr().out

    def no_compiler():
        raise RuntimeError("no c++ compiler")

    monkeypatch.setattr(cpu_ext, "extension", no_compiler)
    assert cpu_ext.main() == 0
    assert "not built (RuntimeError: no c++ compiler)" in capsys.readouterr().out


def test_the_environment_s_own_ninja_is_found_without_activation(monkeypatch, tmp_path):
    """torch's loader runs `ninja` from PATH; an environment used without activation (make's
    `.venv/bin/...` calls) has its ninja beside its interpreter, not on PATH."""
    import shutil

    from prescore_backend.kernels import cpu_ext

    bindir, elsewhere = tmp_path / "venv" / "bin", tmp_path / "usr-bin"
    bindir.mkdir(parents=True)
    elsewhere.mkdir()
    (bindir / "ninja").write_text("#!/bin/sh\n")
    (bindir / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert shutil.which("ninja") is None
    cpu_ext.ninja_on_path()
    assert shutil.which("ninja") == str(bindir / "ninja")
    monkeypatch.setenv("PATH", str(elsewhere))  # a ninja on PATH already: PATH left as it is
    (elsewhere / "ninja").write_text("#!/bin/sh\n")
    (elsewhere / "ninja").chmod(0o755)
    cpu_ext.ninja_on_path()
    assert os.environ["PATH"] == str(elsewhere)


def test_unknown_impl():
    case = make_paged_case([20], HKV, 1, 64, B)
    with pytest.raises(ValueError, match="torch"):
        sparse_decode(case.query, case.key_cache, case.value_cache, case.block_tables,
                      case.seq_lens, all_tiles(case.seq_lens, HKV, T), T, 0.1, impl="cuda")


def _split(tiles: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a selection into two disjoint halves (same shape, -1 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    coin = torch.rand(tiles.shape, generator=g) < 0.5
    return torch.where(coin, tiles, -1), torch.where(coin, -1, tiles)


@pytest.mark.parametrize("group", [1, 3])
def test_merge_of_disjoint_parts_is_union(group):
    case = make_paged_case(SEQ_LENS, HKV, group, 64, B, seed=3)
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens)
    tiles = all_tiles(case.seq_lens, HKV, T)
    a, b = _split(tiles, seed=group)
    o1, l1 = sparse_decode(*args, a, T, 0.125)
    o2, l2 = sparse_decode(*args, b, T, 0.125)
    o, lse = merge_attn_states(o1, l1, o2, l2)
    ref_o, ref_lse = sparse_decode(*args, tiles, T, 0.125)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    # The residual path with weight 1 is the same merge.
    w = torch.ones(len(SEQ_LENS), HKV)
    o3, l3 = sparse_decode(*args, a, T, 0.125, residual_tiles=b, residual_weight=w)
    torch.testing.assert_close(o3, ref_o, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(l3, ref_lse, atol=1e-5, rtol=1e-5)


def test_merge_handles_empty_sides():
    o = torch.randn(2, 3, 4)
    lse = torch.randn(2, 3)
    ninf = torch.full_like(lse, float("-inf"))
    for mo, ml in (merge_attn_states(o, lse, torch.randn_like(o), ninf),
                   merge_attn_states(torch.randn_like(o), ninf, o, lse)):
        torch.testing.assert_close(mo, o)
        torch.testing.assert_close(ml, lse)
    mo, ml = merge_attn_states(o, ninf, o, ninf)
    assert (mo == 0).all() and (ml == float("-inf")).all()
    # c = 1 / (1 + exp(lse2 - lse1))
    o2, l2 = torch.randn_like(o), torch.randn_like(lse)
    mo, ml = merge_attn_states(o, lse, o2, l2)
    c = (1 / (1 + torch.exp(l2 - lse))).unsqueeze(-1)
    torch.testing.assert_close(mo, c * o + (1 - c) * o2)
    torch.testing.assert_close(ml, torch.logaddexp(lse, l2))


def test_residual_weight_shifts_lse():
    case = make_paged_case([96, 70], HKV, 3, 64, B, seed=11)
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens)
    a, b = _split(all_tiles(case.seq_lens, HKV, T), seed=5)
    w = torch.tensor([[2.0, 0.0], [0.5, 3.0]])  # weight 0 drops the residual part
    o, lse = sparse_decode(*args, a, T, 0.125, residual_tiles=b, residual_weight=w)
    o1, l1 = sparse_decode(*args, a, T, 0.125)
    o2, l2 = sparse_decode(*args, b, T, 0.125)
    shift = w.log().repeat_interleave(3, 1)
    eo, el = merge_attn_states(o1, l1, o2, l2 + shift)
    torch.testing.assert_close(o, eo)
    torch.testing.assert_close(lse, el)
    torch.testing.assert_close(o[0, 3:], o1[0, 3:])  # KV head 1 of row 0 has weight 0


@pytest.mark.skipif("avx512f" not in __import__("prescore_backend.kernels.host",
                                               fromlist=["cpu_flags"]).cpu_flags(),
                    reason="needs AVX-512F (an AVX2-only host builds these paths by default)")
@pytest.mark.parametrize("group,dtype", [(1, torch.float32), (3, torch.float32),
                                         (4, torch.bfloat16), (8, torch.float32)])
def test_avx2_build_decodes_and_selects_as_the_oracle(group, dtype):
    """The C++ built without AVX-512 (what AVX2-only hosts run: the q.k and PV loops in ymm
    intrinsics, the top-k's counting passes in ymm code) against the oracle on an AVX-512
    host: the fused kernel's "vec" path (ragged lengths, shuffled blocks) and the selection."""
    from prescore_backend.kernels.cpu_ext import build
    from prescore_backend.kernels.select import select_tiles_ref
    from test_pq import AVX2_ONLY

    avx2 = build(AVX2_ONLY)
    lens = [37, 64, 130, 5, 200]
    case = make_paged_case(lens, HKV, group, 64, 64, layout="cpu", dtype=dtype, seed=group)
    tiles = random_tiles(lens, HKV, seed=group, p=0.6)
    o, lse = avx2.sparse_decode_cpu(case.query, case.key_cache, case.value_cache,
                                    case.block_tables, case.seq_lens, tiles, T, 0.125, False,
                                    None)
    ref_o, ref_lse = sparse_decode_ref(case.query, *case.strided(), case.seq_lens, tiles, T,
                                       0.125)
    torch.testing.assert_close(o.double(), ref_o, **TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    g = torch.Generator().manual_seed(group)
    scores = torch.randn(3, HKV, 300, generator=g)
    scores[0, 0, 50:90] = 1.0  # ties: the lower index first
    num_tiles, budget = torch.tensor([300, 120, 17]), torch.tensor([40, 25, 30])
    got = avx2.select_tiles_cpu(scores, num_tiles, budget, 2, 4, None, 0)
    want = select_tiles_ref(scores, num_tiles, budget, sink_tiles=2, window_tiles=4)
    assert torch.equal(got[0], want.tiles.to(got[0].dtype))
