"""Registration with vLLM: idempotent, spawn-safe, honoured by the CPU platform."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import prescore_backend
from prescore_backend import platform as plat


@pytest.fixture(scope="module")
def member():
    prescore_backend.register()
    prescore_backend.register()  # idempotent
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum["PRESCORE"]


def _selector(**kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto",
                                   block_size=128, **kw)


def test_register_is_idempotent(member):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    names = [m for m in AttentionBackendEnum._member_names_ if m == "PRESCORE"]
    assert names == ["PRESCORE"]
    assert member.get_path() == plat.CPU_BACKEND_PATH
    assert member.get_class().get_name() == "PRESCORE"


def test_member_survives_unpickling_in_a_fresh_process(member):
    """Engine core and workers unpickle the config before loading plugins (spawn)."""
    payload = pickle.dumps({"backend": member})
    code = ("import pickle, sys\n"
            "obj = pickle.loads(sys.stdin.buffer.read())\n"
            "print(obj['backend'].name, obj['backend'].get_path())")
    out = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True,
                         check=True).stdout.decode().split()
    assert out == ["PRESCORE", plat.CPU_BACKEND_PATH]


def test_cpu_platform_honours_prescore_and_delegates_the_rest(member):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert CpuPlatform.get_attn_backend_cls(member, _selector()) == plat.CPU_BACKEND_PATH
    cpu_attn = AttentionBackendEnum.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == cpu_attn
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, _selector()) == cpu_attn
    plat.patch_cpu_platform()  # a second patch must not wrap twice
    assert CpuPlatform.get_attn_backend_cls(member, _selector()) == plat.CPU_BACKEND_PATH


@pytest.mark.parametrize("flag,name", [("use_mla", "MLA"), ("has_sliding_window", "sliding-window"),
                                       ("has_sink", "sinks")])
def test_unsupported_features_fail_loudly(member, flag, name):
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(ValueError, match=name):
        CpuPlatform.get_attn_backend_cls(member, _selector(**{flag: True}))


def test_cpu_cache_views_match_vllm_vec_layout():
    """The K/V views the sparse decode reads are exactly what vLLM's "vec" write stored."""
    from vllm import _custom_ops as ops

    from prescore_backend.kernels.layouts import vllm_cpu_kv_views as cache_views

    nb, hkv, bs, d, n = 4, 3, 32, 64, 100
    kv = torch.zeros(nb, hkv, bs, 2 * d, dtype=torch.float32)
    halves = kv.view(nb, hkv, 2 * bs, d)
    kc, vc = halves.chunk(2, dim=2)
    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:n]
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    kview, vview = cache_views(kv)
    assert kview.shape == vview.shape == (nb, hkv, bs, d)
    blk, off = slots // bs, slots % bs
    torch.testing.assert_close(kview[blk, :, off], key, rtol=0, atol=0)
    torch.testing.assert_close(vview[blk, :, off], value, rtol=0, atol=0)


def _amx_layout_case():
    """Two ragged sequences in shuffled blocks, written by vLLM's "vec" cache write; returns
    (vec cache, plain K/V, slots, block table, seq lens, shapes)."""
    from vllm import _custom_ops as ops

    nb, hkv, g, bs, d = 6, 2, 3, 64, 64
    lens = [150, 77]  # ragged, both ending inside a 16-token chunk
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(nb, generator=gen)
    bt = torch.stack([perm[:3], perm[3:]]).to(torch.int32)  # [2, 3] shuffled blocks
    slots = torch.cat([bt[r, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
                       for r, n in enumerate(lens)])
    n = sum(lens)
    key = torch.randn(n, hkv, d, generator=gen).to(torch.bfloat16)
    value = torch.randn(n, hkv, d, generator=gen).to(torch.bfloat16)
    q = torch.randn(2, hkv * g, d, generator=gen).to(torch.bfloat16)
    vec = torch.zeros(nb, hkv, bs, 2 * d, dtype=torch.bfloat16)
    kc, vc = vec.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, "vec", k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return dict(vec=vec, key=key, value=value, q=q, slots=slots, bt=bt,
                seq_lens=torch.tensor(lens, dtype=torch.int32), nb=nb, hkv=hkv, bs=bs, d=d)


def test_our_amx_packing_read_in_place_equals_vllm_vec_attention():
    """The packed "amx" layout (what vLLM writes for bf16 on AMX CPUs), built here by
    ``amx_pack`` so it runs on every host: unpacking gives back exactly the tokens written, and
    the fused kernel reading the packed cache in place (all tiles selected) equals vLLM's own
    exact attention over the same tokens (its "vec" kernel, which runs on any x86 CPU)."""
    from vllm import _custom_ops as ops

    from prescore_backend.kernels import sparse_decode
    from prescore_backend.kernels.layouts import (amx_pack, amx_unpack, vllm_cpu_amx_kv_views,
                                                  vllm_cpu_kv_views)
    from prescore_backend.kernels.testing import all_tiles

    c = _amx_layout_case()
    nb, hkv, bs, d, bt, seq_lens, q = (c[k] for k in ("nb", "hkv", "bs", "d", "bt", "seq_lens",
                                                        "q"))
    kplain, vplain = (t.contiguous() for t in vllm_cpu_kv_views(c["vec"]))
    packed = torch.zeros_like(c["vec"])
    kraw, vraw = vllm_cpu_amx_kv_views(packed)
    kpk, vpk = amx_pack(kplain, vplain)
    kraw.copy_(kpk)
    vraw.copy_(vpk)
    kp, vp = amx_unpack(kraw, vraw)  # [nb, Hkv, B, D] plain
    blk, off = c["slots"] // bs, c["slots"] % bs
    assert torch.equal(kp[blk, :, off], c["key"]) and torch.equal(vp[blk, :, off], c["value"])

    ours, _ = sparse_decode(q, kraw, vraw, bt, seq_lens, all_tiles(seq_lens, hkv, 16), 16,
                            d ** -0.5, impl="cpp", kv_layout="amx")
    qsl = torch.arange(3, dtype=torch.int32)
    md = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=2, num_heads=q.shape[1], num_kv_heads=hkv, head_dim=d, seq_lens=seq_lens,
        dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1,
        isa="vec", enable_kv_split=False)
    ref = torch.empty_like(q)
    kc, vc = c["vec"].view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=kc, value_cache=vc, output=ref, query_start_loc=qsl,
        seq_lens=seq_lens, scale=d ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=bt, softcap=0.0, scheduler_metadata=md, s_aux=None)
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-3, rtol=1.6e-2)


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                    reason="needs AMX (amx_tile/amx_bf16): vLLM's 'amx' cache write exists only "
                    "on AMX CPUs (the packed layout itself is tested everywhere above)")
def test_cpu_amx_layout_matches_vllm_amx_write():
    """vLLM's own "amx" write (bf16 on AMX CPUs) produces exactly ``amx_pack`` of the tokens:
    the layout prescore reads in place is the one vLLM writes."""
    from vllm import _custom_ops as ops

    from prescore_backend.kernels.layouts import amx_pack, vllm_cpu_amx_kv_views, vllm_cpu_kv_views

    c = _amx_layout_case()
    nb, hkv, bs, d = c["nb"], c["hkv"], c["bs"], c["d"]
    amx = torch.zeros_like(c["vec"])
    kc, vc = amx.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(c["key"], c["value"], kc, vc, c["slots"], "amx", k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    kraw, vraw = vllm_cpu_amx_kv_views(amx)
    kpk, vpk = amx_pack(*(t.contiguous() for t in vllm_cpu_kv_views(c["vec"])))
    blk = c["bt"].flatten().long()  # only the blocks the sequences use were written
    assert torch.equal(kraw[blk], kpk[blk]) and torch.equal(vraw[blk], vpk[blk])


def test_side_data_memory_is_small():
    from prescore_backend.backends.cpu import SideData

    side = SideData.allocate(num_blocks=8, num_kv_heads=3, tiles_per_block=128 // 16, lsh_words=2)
    # 3 heads x (4 B score + 16 B mask) per 16-token tile = 3.75 B per token per layer.
    assert side.bytes_per_token(128) == pytest.approx(3.75)
    assert torch.isinf(side.scores).all() and (side.masks == 0).all() and side.kmin is None
    quest = SideData.allocate(8, 3, 8, head_dim=64, dtype=torch.bfloat16)
    # + 3 heads x (min + max) x 64 bf16 per 16-token tile = 48 B per token per layer.
    assert quest.masks is None and quest.bytes_per_token(128) == pytest.approx(0.75 + 48)


def test_cuda_backend_imports_validates_and_is_selected_on_cuda(member, monkeypatch):
    import types

    # vllm-cpu lacks the compiled CUDA op library that vllm.platforms.cuda imports for its
    # side effects; an empty stand-in lets the real CudaPlatform class load on this machine.
    monkeypatch.setitem(sys.modules, "vllm._C_stable_libtorch",
                        types.ModuleType("vllm._C_stable_libtorch"))
    from vllm.platforms.cuda import CudaPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import register_backend

    from prescore_backend.backends.cuda import PrescoreCUDABackend

    cap = DeviceCapability(9, 0)
    sel = _selector()._asdict()
    assert PrescoreCUDABackend.get_name() == "PRESCORE"
    assert PrescoreCUDABackend.validate_configuration(device_capability=cap, **sel) == []
    bad = PrescoreCUDABackend.validate_configuration(
        device_capability=cap, **{**sel, "has_sliding_window": True, "kv_cache_dtype": "fp8"})
    assert bad and any("sliding" in r for r in bad)

    # On a CUDA process the plugin registers the CUDA class path; emulate that here.
    register_backend(member, plat.CUDA_BACKEND_PATH)
    monkeypatch.setattr(CudaPlatform, "get_device_capability", classmethod(lambda cls, device_id=0: cap))
    try:
        path = CudaPlatform.get_attn_backend_cls(member, _selector())
    finally:
        member.clear_override()
    assert path == plat.CUDA_BACKEND_PATH
    assert member.get_path() == plat.CPU_BACKEND_PATH


def test_unsupported_model_features_stop_the_start_by_name():
    """Both backends refuse, through one check, every decoder feature they cannot serve,
    naming each; encoder layers pass (they run the exact kernel)."""
    from prescore_backend.backends.common import refuse_unsupported

    ok = dict(sliding_window=None, alibi_slopes=None, logits_soft_cap=None, sinks=None,
              kv_cache_dtype="auto", kv_sharing_target_layer_name=None)
    refuse_unsupported("decoder", **ok)
    bad = dict(ok, sliding_window=4096, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"sliding-window attention, kv cache dtype fp8, "
                                         r"chunked-lookback attention; serve this model"):
        refuse_unsupported("decoder", **bad, **{"chunked-lookback attention": True})
    refuse_unsupported("encoder_only", **bad)
    with pytest.raises(ValueError, match="KV-cache sharing between layers; serve"):
        refuse_unsupported("decoder", **dict(ok, kv_sharing_target_layer_name="model.layers.0"))
