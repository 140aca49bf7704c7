"""Every setting PrescoreConfig accepts decodes, or the start refuses it (issue: no valid
setting may crash the engine mid-serving).

Property-based: hypothesis draws a configuration (every field, over the values each accepts
and some it does not), a model shape vLLM's CPU backend hands over (head dim, GQA group,
block size, dtype) and the path (the fused C++ call or the torch ops). Then either
validation refuses it (``PrescoreConfig`` or the builder/impl construction, i.e. at the
start, with a message naming the setting), or prefill and decode steps through
PrescoreCPUImpl on a paged cache run: prompt tokens equal vLLM's CPU_ATTN on the same cache
(prefill stays exact), decode outputs are finite, and a budget that covers the context
decodes exactly.

Seam: the CPU builder and impl run as vLLM's model runner runs them (``build`` once per step
from ``CommonAttentionMetadata``, ``do_kv_cache_update`` then ``forward`` per layer), with
vLLM's own CPU_ATTN impl as the reference on the same cache; the engine is not started.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LAYER = "model.layers.0.self_attn.attn"
#: outcomes of the sweep's examples (the test after it checks that most cases decoded)
TALLY = {"refused_config": 0, "refused_start": 0, "decoded": 0}


class CPUEngine:
    """One attention layer stepped like vLLM's CPU model runner: PrescoreCPUImpl and vLLM's
    CPUAttentionBackendImpl on one paged cache ``[NB, Hkv, B, 2D]`` in vLLM's layout."""

    def __init__(self, tmp_path, mp, heads: int, kv_heads: int, head_dim: int, block: int,
                 dtype: torch.dtype, fused: bool, num_blocks: int = 96) -> None:
        from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from prescore_backend.backends import common
        from prescore_backend.backends.cpu import PrescoreCPUImpl, PrescoreCPUMetadataBuilder

        (tmp_path / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": heads * head_dim, "head_dim": head_dim,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 256,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "torch_dtype": str(dtype).split(".")[1]}))
        mp.setattr("vllm.distributed.get_tensor_model_parallel_world_size", lambda: 1)
        mp.setattr("vllm.distributed.get_tensor_model_parallel_rank", lambda: 0)
        common.runtime.cache_clear()
        self.vc = VllmConfig(model_config=ModelConfig(model=str(tmp_path), dtype=dtype,
                                                      skip_tokenizer_init=True))
        with set_current_vllm_config(self.vc):
            spec = FullAttentionSpec(block_size=block, num_kv_heads=kv_heads,
                                     head_size=head_dim, dtype=dtype)
            self.builder = PrescoreCPUMetadataBuilder(spec, [LAYER], self.vc,
                                                      torch.device("cpu"))
            scale = head_dim ** -0.5
            self.impl = PrescoreCPUImpl(heads, head_dim, scale, kv_heads, None, None, "auto")
            self.ref = CPUAttentionBackendImpl(heads, head_dim, scale, kv_heads, None, None,
                                               "auto")
        self.impl.fused = self.impl.fused and fused
        self.rt = common.runtime()
        self.layer = SimpleNamespace(layer_name=LAYER, isa=self.builder.isa,
                                     _k_scale_float=1.0, _v_scale_float=1.0,
                                     _k_scale=torch.ones(()), _v_scale=torch.ones(()),
                                     _q_scale=torch.ones(()))
        self.kv = torch.zeros(num_blocks, kv_heads, block, 2 * head_dim, dtype=dtype)
        self.heads, self.kv_heads, self.D, self.B, self.dtype = (heads, kv_heads, head_dim,
                                                                   block, dtype)
        g = torch.Generator().manual_seed(0)
        self.bt = torch.randperm(num_blocks, generator=g).view(2, -1)  # shuffled, 2 rows
        self.gen = g

    def step(self, rows: list[tuple[int, int, int]], prefilling: list[bool] | None = None):
        """rows: (block-table row, query_len, seq_len), decode rows first; prefilling: vLLM's
        ``is_prefilling`` per row (default: more than one query token). Returns (prescore
        output, CPU_ATTN output) ``[N, Hq, D]`` and the plan."""
        from vllm.config import set_current_vllm_config
        from vllm.v1.attention.backend import CommonAttentionMetadata

        B = self.B
        ql = torch.tensor([q for _, q, _ in rows])
        qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
        torch.cumsum(ql, 0, out=qsl[1:])
        bt = self.bt[[r for r, _, _ in rows]].to(torch.int32)
        slots = torch.cat([bt[i, torch.arange(s - q, s) // B].long() * B
                           + torch.arange(s - q, s) % B for i, (_, q, s) in enumerate(rows)])
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl,
            seq_lens=torch.tensor([s for _, _, s in rows], dtype=torch.int32),
            num_reqs=len(rows), num_actual_tokens=int(ql.sum()), max_query_len=int(ql.max()),
            max_seq_len=max(s for _, _, s in rows), block_table_tensor=bt,
            slot_mapping=slots, causal=True,
            is_prefilling=torch.tensor(prefilling if prefilling is not None else
                                       [q > 1 for _, q, _ in rows]))
        n = cm.num_actual_tokens
        q, k, v = (torch.randn(n, h, self.D, generator=self.gen).to(self.dtype)
                   for h in (self.heads, self.kv_heads, self.kv_heads))
        with set_current_vllm_config(self.vc):
            md = self.builder.build(0, cm)
            self.impl.do_kv_cache_update(self.layer, k, v, self.kv, slots)
            out = torch.full_like(q, float("nan"))
            self.impl.forward(self.layer, q, k, v, self.kv, md, out)
            ref = torch.full_like(q, float("nan"))
            self.ref.forward(self.layer, q, k, v, self.kv, md, ref)
        return out, ref, md.plan


def _refusal_names_the_setting(e: Exception) -> bool:
    msg = str(e)
    return "PRESCORE_" in msg or "--prescore-" in msg or "--attention-backend" in msg


@st.composite
def _settings(draw):
    tile = draw(st.sampled_from([8, 16, 32, 64]))
    block = draw(st.sampled_from([32, 64, 128]))
    env = {
        "PRESCORE_METHOD": draw(st.sampled_from(["leverage", "recency", "kmeans", "key_norm",
                                                 "kmedian", "kernel_kmeans", "random"])),
        "PRESCORE_KEEP_RATIO": str(draw(st.sampled_from([1.0, 0.5, 0.25, 0.125, 0.0625,
                                                         0.01]))),
        "PRESCORE_MAX_TOKENS": str(draw(st.sampled_from([0, 0, 0, 48, 300]))),
        "PRESCORE_TILE_SIZE": str(tile),
        "PRESCORE_SINK_TOKENS": str(tile * draw(st.integers(0, 2))),
        "PRESCORE_WINDOW_TOKENS": str(draw(st.sampled_from([block + tile, 2 * block,
                                                            block]))),
        "PRESCORE_QUERY_AWARE": draw(st.sampled_from(["sparq4", "sparq4", "sparq", "quest",
                                                      "lsh", "lsh_quest", "pq", "none"])),
        "PRESCORE_QUERY_CHANNELS": str(draw(st.sampled_from([0, 0, 2, 8, 16, 64]))),
        "PRESCORE_PQ_SUBSPACES": str(draw(st.sampled_from([2, 4, 8]))),
        "PRESCORE_QUERY_CAP_RATIO": str(draw(st.sampled_from([1.0, 0.5, 0.0]))),
        "PRESCORE_LSH_BITS": str(draw(st.sampled_from([3, 7]))),
        "PRESCORE_RESIDUAL_TILES": str(draw(st.sampled_from([0, 0, 0, 2]))),
        "PRESCORE_LOW_TIER_BITS": str(draw(st.sampled_from([0, 0, 2, 3, 4, 8]))),
        "PRESCORE_LOW_TIER_SHARE": str(draw(st.sampled_from([0.75, 0.3, 1.0]))),
        "PRESCORE_MIN_SEQ_LEN": str(draw(st.sampled_from([0, 64, 256]))),
        "PRESCORE_AGGREGATE": draw(st.sampled_from(["max", "sum", "mean", "topk_count"])),
    }
    shape = dict(
        kv_heads=draw(st.sampled_from([1, 2, 4])),
        group=draw(st.sampled_from([1, 2, 7, 16])),
        head_dim=draw(st.sampled_from([64, 128, 32])),
        block=block,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        fused=draw(st.booleans()),
        lens=(draw(st.integers(1, 1500)), draw(st.integers(1, 1500))),
    )
    if draw(st.integers(0, 3)):  # mostly coherent draws (the rest test the refusals)
        if env["PRESCORE_LOW_TIER_BITS"] != "0":
            env["PRESCORE_QUERY_AWARE"], env["PRESCORE_RESIDUAL_TILES"] = "sparq4", "0"
        if env["PRESCORE_QUERY_AWARE"] == "sparq4" and tile < 16:
            env["PRESCORE_TILE_SIZE"] = env["PRESCORE_SINK_TOKENS"] = "16"
        env["PRESCORE_WINDOW_TOKENS"] = str(2 * block)
    return env, shape


def _run_case(tmp_path, env: dict[str, str], shape: dict) -> str:
    """Validation refuses ``env`` (naming the setting), the start refuses it with this
    ``shape``, or prefill and decode run as :func:`_prefill_then_decode` checks. Returns
    which, and counts it in :data:`TALLY`."""
    from prescore_backend.backends import common
    from prescore_backend.config import PrescoreConfig

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            PrescoreConfig.from_env()
        except ValueError as e:
            assert _refusal_names_the_setting(e), e
            outcome = "refused_config"
        else:
            try:
                e = CPUEngine(tmp_path, mp, shape["kv_heads"] * shape["group"],
                              shape["kv_heads"], shape["head_dim"], shape["block"],
                              shape["dtype"], shape["fused"])
            except ValueError as err:  # refused at start, naming what to change
                assert _refusal_names_the_setting(err), err
                outcome = "refused_start"
            else:
                try:
                    _prefill_then_decode(e, *shape["lens"])
                finally:
                    common.runtime.cache_clear()
                outcome = "decoded"
    TALLY[outcome] += 1
    return outcome


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=_settings())
def test_every_accepted_setting_decodes_or_is_refused_at_start(tmp_path, case):
    _run_case(tmp_path, *case)


_BASE = {"PRESCORE_KEEP_RATIO": "0.125", "PRESCORE_MIN_SEQ_LEN": "64",
         "PRESCORE_METHOD": "leverage"}


def _covering_cases():
    """Every pair of the axes that choose a kernel or a code path: the ranking x tile size x
    fused/torch (with and without pre-scores read), two tiers' bits x GQA group x tile, and
    dtype x head dim x block size x group. Random draws rarely meet a narrow pair (e.g.
    sparq4 with 8-token tiles on the fused path, which crashed the engine)."""
    cases = []
    for qa in ("sparq4", "sparq", "quest", "lsh", "lsh_quest", "pq", "none"):
        for tile in (8, 16, 32):
            for fused in (True, False):
                cap = "0.5" if (tile + fused) % 2 else "1.0"
                env = {**_BASE, "PRESCORE_QUERY_AWARE": qa, "PRESCORE_TILE_SIZE": str(tile),
                       "PRESCORE_SINK_TOKENS": str(tile), "PRESCORE_WINDOW_TOKENS": "128",
                       "PRESCORE_QUERY_CAP_RATIO": cap}
                cases.append((f"{qa}-tile{tile}-{'fused' if fused else 'torch'}-cap{cap}", env,
                              dict(kv_heads=2, group=4, head_dim=64, block=64,
                                   dtype=torch.float32, fused=fused, lens=(700, 517))))
    for bits in (2, 3, 4, 8):
        for group in (1, 7, 16):
            for tile in (16, 32):
                env = {**_BASE, "PRESCORE_QUERY_AWARE": "sparq4", "PRESCORE_TILE_SIZE": str(tile),
                       "PRESCORE_SINK_TOKENS": str(tile), "PRESCORE_WINDOW_TOKENS": "128",
                       "PRESCORE_LOW_TIER_BITS": str(bits), "PRESCORE_KEEP_RATIO": "0.25"}
                cases.append((f"tiers{bits}-g{group}-tile{tile}", env,
                              dict(kv_heads=1 if group == 16 else 2, group=group, head_dim=64,
                                   block=64, dtype=torch.bfloat16, fused=True,
                                   lens=(640, 1001))))
    for i, (dtype, head_dim) in enumerate((d, h) for d in (torch.float32, torch.bfloat16)
                                          for h in (32, 64, 128, 96)):
        d, h = divmod(i, 4)  # every pair of the four axes in 8 cases
        block, group = (32, 128)[(h % 2 + d) % 2], (1, 8)[(h // 2 + d) % 2]
        env = {**_BASE, "PRESCORE_WINDOW_TOKENS": str(2 * block)}
        cases.append((f"{str(dtype)[6:]}-d{head_dim}-b{block}-g{group}", env,
                      dict(kv_heads=2, group=group, head_dim=head_dim, block=block,
                           dtype=dtype, fused=True, lens=(1100, 800))))
    return cases


@pytest.mark.parametrize("env,shape", [c[1:] for c in _covering_cases()],
                         ids=[c[0] for c in _covering_cases()])
def test_kernel_choosing_pairs_decode_or_are_refused_at_start(tmp_path, env, shape):
    _run_case(tmp_path, env, shape)


def test_the_sweep_decoded_most_of_its_cases():
    """The sweep is not passing by refusing: most drawn settings were accepted and decoded."""
    if not sum(TALLY.values()):
        pytest.skip("run with the sweep")
    assert TALLY["decoded"] >= max(20, sum(TALLY.values()) // 3), TALLY


def _prefill_then_decode(e: CPUEngine, n0: int, n1: int) -> None:
    cfg = e.rt.config
    tol = (dict(atol=2e-5, rtol=1e-4) if e.dtype == torch.float32
           else dict(atol=2e-2, rtol=2e-2))
    # prefill: row 1 in two chunks (the second a one-token chunk when n1 allows), row 0 whole
    first = max(1, n1 - 1)
    out, ref, plan = e.step([(0, n0, n0), (1, first, first)])
    torch.testing.assert_close(out.float(), ref.float(), **tol)  # prompt tokens: exact
    if first < n1:
        out, ref, plan = e.step([(1, 1, n1)], [True])  # a one-token prompt chunk: exact
        torch.testing.assert_close(out.float(), ref.float(), **tol)
    lens = [n0, n1]
    for _ in range(3):  # decode steps, a block filled on the way for some lengths
        lens = [n + 1 for n in lens]
        out, ref, plan = e.step([(0, 1, lens[0]), (1, 1, lens[1])])
        assert torch.isfinite(out.float()).all()
        covered = (plan is None or plan.num_sparse == 0)
        if covered or (cfg.keep_ratio >= 1.0 and cfg.max_tokens == 0):
            torch.testing.assert_close(out.float(), ref.float(), **tol)
