"""End-to-end checks of the PRESCORE backend on the real embedded model, over real HTTP.

Each fixture starts one server, runs everything it needs, and stops it before the next
starts (the machine has 2 cores). All runs are greedy and in float32, so exactness checks do
not hinge on bf16 rounding; bf16 (vLLM's AMX-packed cache on AMX CPUs) is served in
test_serving_e2e.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import re

import pytest
import requests

from conftest import Server, doc_text
from prescore_backend.config import TESTING_EXACT_VIA_SPARSE_ENV

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
# 1024-token steps: prompts over 1024 tokens are prefilled in several chunks.
COMMON = ["--dtype", "float32", "--max-model-len", "8192", "--max-num-seqs", "8",
          "--max-num-batched-tokens", "1024"]
GEN_TOKENS = 24


# ~750 tokens per 3k characters of this text with SmolLM2's tokenizer.
LONG_CHUNKED = doc_text(11000) + "\n\nIn summary, the special method names described above"
LONG_4K = doc_text(16000, offset=20000) + "\n\nTo summarize this section in one sentence:"
# ~4k-token prompts of three kinds for the repetition check (LONG_4K among them)
LONG_SET = [LONG_4K, doc_text(16000, "compound", offset=30000) + "\n\nIn short,",
            doc_text(16000, "string-methods") + "\n\nThe method used most often is"]
SHORT = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a"]
MIXED = [*SHORT, doc_text(3000, "typesseq") + "\nThe list type", doc_text(6000, "compound")]
SHARED_PREFIX = doc_text(12000, "types")
PREFIX_PAIR = [SHARED_PREFIX + "\n\nQuestion: which types are mutable? Answer:",
               SHARED_PREFIX + "\n\nQuestion: what is a method? Answer:"]


def prompt_ids(text: str, n: int) -> list[int]:
    """The first ``n`` token ids of ``text`` with the model's tokenizer."""
    from tokenizers import Tokenizer

    from prescore_backend.server.models import model_dir

    ids = Tokenizer.from_file(str(model_dir(MODEL) / "tokenizer.json")).encode(text).ids
    assert len(ids) >= n
    return ids[:n]


# Prompts of 1 + a multiple of the CPU block size (128) past min_seq_len (1024), sharing no
# prefix with the others: 1025 tokens are prefilled as 1024 + 1 (the step budget), 1281 as
# 1024 + 257 cold and as its last token alone after a prefix-cache hit (1280 tokens cached).
ONE_TOKEN_CHUNK_PROMPTS = {"1025": (doc_text(8000, "debugger"), 1025),
                           "1281": (doc_text(9000, "formatstrings"), 1281)}


def first_logprobs(srv: Server) -> dict[str, tuple[float, list[int]]]:
    """Per prompt of ONE_TOKEN_CHUNK_PROMPTS (1281 twice: cold, then from the prefix cache):
    the first generated token's logprob and 8 greedy tokens."""
    out = {}
    for key in ("1025", "1281", "1281-cached"):
        text, n = ONE_TOKEN_CHUNK_PROMPTS[key.split("-")[0]]
        r = requests.post(srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": prompt_ids(text, n), "max_tokens": 8, "temperature": 0,
            "logprobs": 1, "return_token_ids": True}, timeout=600)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        out[key] = (c["logprobs"]["token_logprobs"][0], token_ids(c))
    return out


def complete(srv: Server, prompt, max_tokens: int = GEN_TOKENS,
             xargs: dict | None = None) -> list[dict]:
    r = requests.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "return_token_ids": True, **({"vllm_xargs": xargs} if xargs else {}),
    }, timeout=600)
    assert r.status_code == 200, r.text
    return sorted(r.json()["choices"], key=lambda c: c["index"])


def token_ids(choice: dict) -> list[int]:
    ids = choice.get("token_ids")
    assert ids, "server did not return token ids"
    return list(ids)


def scrape(srv: Server, prefix: str = "prescore_") -> dict[str, float]:
    text = requests.get(srv.url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def repeated_4grams(ids: list[int]) -> float:
    """Share of a generation's 4-grams seen earlier in it (bench/quality/eval_repetition.py):
    ~0.4 for exact attention's greedy 48 tokens here, near 1 for "the the the" garbage."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return sum(g in set(grams[:i]) for i, g in enumerate(grams)) / max(len(grams), 1)


def assert_no_more_repetitive(choices: list[dict], exact: list[dict], label: str) -> None:
    """Well-formed texts that repeat themselves not much more than exact attention's on the
    same prompts (mean repeated 4-grams within 0.4; see test_keep_one_eighth_stays_coherent)."""
    texts = [c["text"] for c in choices]
    assert all(t.strip() and "\ufffd" not in t for t in texts), texts
    rep = [repeated_4grams(token_ids(c)) for c in choices]
    ref = [repeated_4grams(token_ids(c)) for c in exact]
    print(f"repeated 4-grams, {label}: {rep}, exact {ref}")
    assert sum(rep) / len(rep) <= sum(ref) / len(ref) + 0.4, (rep, ref, texts)


def _greedy(srv: Server, prompt: str, xargs: dict, n: int = 12) -> tuple[list[str], list[float]]:
    r = requests.post(srv.url + "/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1,
        "ignore_eos": True, "vllm_xargs": xargs}, timeout=600)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return lp["tokens"], lp["token_logprobs"]


#: four requests in flight with other controls (test_concurrent_requests_keep_their_controls)
MAPPING_CONTROLS = [{"prescore_dense": True}, {"prescore_keep_ratio": 0.5},
                    {"prescore_keep_ratio": 0.125, "prescore_streaming": True}, {}]


def controls_mapping(srv: Server) -> dict:
    """Four ~2.7k-token prompts, each with MAPPING_CONTROLS[i]: alone under its own controls
    and under its neighbour's, then all four together, staggered (rows added while others
    decode), with a short request that finishes first (its row removed, the batch condensed)."""
    import time

    prompts = [doc_text(11000, offset=12000 * i) for i in range(4)]
    own = [_greedy(srv, p, c) for p, c in zip(prompts, MAPPING_CONTROLS)]
    other = [_greedy(srv, p, MAPPING_CONTROLS[(i + 1) % 4]) for i, p in enumerate(prompts)]

    def staggered(i: int):
        time.sleep(0.4 * i)
        return _greedy(srv, prompts[i], MAPPING_CONTROLS[i])

    with cf.ThreadPoolExecutor(5) as pool:
        short = pool.submit(_greedy, srv, "The capital of France is", {}, 2)
        together = [f.result() for f in [pool.submit(staggered, i) for i in range(4)]]
        short.result()
    return {"own": own, "other": other, "together": together}


def core_suite(srv: Server, xargs: dict | None = None) -> dict:
    """Short prompts, a chunked prefill, a mixed batch and a ~4k-token prompt; the metrics
    moved by the last one."""
    res = {"short": [token_ids(c) for c in complete(srv, SHORT, xargs=xargs)],
           "chunked": token_ids(complete(srv, LONG_CHUNKED, xargs=xargs)[0]),
           "mixed": [token_ids(c) for c in complete(srv, MIXED, xargs=xargs)]}
    before = scrape(srv)
    choice = complete(srv, LONG_4K, max_tokens=48, xargs=xargs)[0]
    res["long4k"] = token_ids(choice)
    res["long4k_text"] = choice["text"]
    res["metrics_delta"] = {k: v - before.get(k, 0.0) for k, v in scrape(srv).items()}
    return res


def run_suite(srv: Server, *, with_prefix: bool = False, with_long_set: bool = False,
              with_one_token_chunks: bool = False, with_mapping: bool = False,
              with_keep_all: bool = False) -> dict:
    res = {"one_token_chunks": first_logprobs(srv)} if with_one_token_chunks else {}
    if with_mapping:
        res["mapping"] = controls_mapping(srv)
    res |= core_suite(srv)
    if with_long_set:  # one batch of the three long prompts
        res["long_set"] = complete(srv, LONG_SET, max_tokens=48)
    if with_prefix:
        # Each alone first (the second one hits the prefix cache), then both together.
        res["prefix_alone"] = [token_ids(complete(srv, p)[0]) for p in PREFIX_PAIR]
        res["prefix_together"] = [token_ids(c) for c in complete(srv, PREFIX_PAIR)]
    if with_keep_all:  # the same prompts again, each asking for keep 1 (prompts cached)
        res["keep_all"] = core_suite(srv, {"prescore_keep_ratio": 1.0})
    return res


def serve_and_run(env: dict[str, str], extra: list[str] | None = None, **kw) -> dict:
    srv = Server(args=[MODEL, *COMMON, *(extra or [])], env=env).start()
    try:
        res = run_suite(srv, **kw)
        res["log"] = srv.log()
        return res
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(model_path):
    return serve_and_run({}, ["--attention-backend", "CPU_ATTN"], with_long_set=True,
                         with_one_token_chunks=True)


@pytest.fixture(scope="module")
def sparse8(model_path, reference):
    """The default ranking at keep 1/8. The validation switch routes a budget that covers
    its context through the sparse kernel instead of the dense fallback (no row at keep 1/8
    has one): ``keep_all`` is the core prompts again with ``prescore_keep_ratio`` 1 per
    request, every tile of the long rows selected and read by the fused C++ call."""
    return serve_and_run({"PRESCORE_KEEP_RATIO": "0.125", "PRESCORE_MIN_SEQ_LEN": "1024",
                          TESTING_EXACT_VIA_SPARSE_ENV: "1"},
                         with_prefix=True, with_long_set=True, with_one_token_chunks=True,
                         with_mapping=True, with_keep_all=True)


@pytest.fixture(scope="module")
def tiers(model_path, sparse8):
    """Two precision tiers (3-bit copy) at keep 1/8; one request at keep 1 per request, routed
    through the tiers' path by the validation switch (a budget that covers the context stays
    exact there)."""
    srv = Server(args=[MODEL, *COMMON],
                 env={"PRESCORE_KEEP_RATIO": "0.125", "PRESCORE_MIN_SEQ_LEN": "1024",
                      "PRESCORE_LOW_TIER_BITS": "3", TESTING_EXACT_VIA_SPARSE_ENV: "1"}).start()
    try:
        r = requests.post(srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": LONG_CHUNKED, "max_tokens": GEN_TOKENS, "temperature": 0,
            "return_token_ids": True, "vllm_xargs": {"prescore_keep_ratio": 1.0}}, timeout=600)
        assert r.status_code == 200, r.text
        res = {"chunked_keep_all": token_ids(r.json()["choices"][0])}
        before = scrape(srv)
        res["long_set"] = complete(srv, LONG_SET, max_tokens=48)
        res["metrics_delta"] = {k: v - before.get(k, 0.0) for k, v in scrape(srv).items()}
        res["log"] = srv.log()
        return res
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def preempted(model_path, sparse8):
    # A KV cache of ~4.5k tokens (fp32: 46 KB per token) for 2 requests of ~2.6k and ~2.85k
    # tokens that share no prefix: the scheduler must preempt one and recompute it. Prompts
    # are also chunked differently (512-token steps) from the reference run.
    srv = Server(args=[MODEL, *COMMON, "--kv-cache-memory-bytes", str(200 * 1024**2),
                       "--max-model-len", "4096", "--max-num-batched-tokens", "512",
                       # Admit on the first chunk (vLLM's default reserves the whole prompt,
                       # which avoids this preemption instead of exercising it).
                       "--no-scheduler-reserve-full-isl"],
                 env={"PRESCORE_KEEP_RATIO": "0.125", "PRESCORE_MIN_SEQ_LEN": "1024"}).start()
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(complete, srv, p) for p in (LONG_CHUNKED, PREFIX_PAIR[0])]
            outs = [token_ids(f.result()[0]) for f in futs]
        preemptions = sum(v for k, v in scrape(srv, "vllm:num_preemptions").items())
        return {"outs": outs, "log": srv.log(), "preemptions": preemptions}
    finally:
        srv.stop()


def test_prescore_backend_is_used(sparse8, reference):
    assert "Using PRESCORE attention backend" in sparse8["log"]
    assert "Using PRESCORE attention backend" not in reference["log"]


def test_keep_all_budget_is_token_identical_to_cpu_attn(sparse8, reference):
    """Requests at keep 1 (per request) on the keep-1/8 server: rows past min_seq_len (the
    chunked prompt, the mixed batch's longest, the ~4k-token prompt) go through the sparse
    kernel selecting every tile, and their greedy tokens are CPU_ATTN's."""
    keep_all = sparse8["keep_all"]
    for key in ("short", "chunked", "mixed", "long4k"):
        assert keep_all[key] == reference[key], key
    # The sparse kernel really served those rows (not vLLM's kernel).
    d = keep_all["metrics_delta"]
    assert d.get("prescore_sparse_decode_rows_total", 0) > 0
    assert d["prescore_decode_read_tokens_total"] == d["prescore_decode_context_tokens_total"]
    assert d.get('prescore_selected_tiles_total{source="query"}', 0) > 0  # ranked picks made


def test_keep_one_eighth_reads_one_eighth(sparse8, reference):
    d = sparse8["metrics_delta"]
    ctx, read = d["prescore_decode_context_tokens_total"], d["prescore_decode_read_tokens_total"]
    assert ctx > 0
    for src in ("sink", "window", "query"):
        assert d.get(f'prescore_selected_tiles_total{{source="{src}"}}', 0) > 0, src
    # query_cap_ratio 1: the ranking alone picks every tile beyond sinks and window
    assert d.get('prescore_selected_tiles_total{source="prescore"}', 0) == 0
    # The default ranks on the 4-bit key copy; at keep 1/8 and head dim 64 on 16 channels
    # (query_channels=0 follows the budget): 16 x 4 bits per token and KV head plus each
    # block's scales of those channels (16 x 2 x 4 bytes per 128 tokens) against 2 x 64 fp32
    # K and V values (9 / 512), in KV-token equivalents; the pre-scores are not read.
    assert "'query_aware': 'sparq4'" in sparse8["log"]
    side = d["prescore_decode_side_tokens_total"] / ctx
    assert 0.0173 <= side <= 0.0179, side
    # keep_ratio counts the side data, charged against a bf16 KV (twice its fp32 share): the
    # tiles are ceil((1/8 - side) x tiles) per (row, layer, head), at least sinks + window.
    assert 0.115 <= read / ctx + 2 * side <= 0.14, (read / ctx, side)
    assert d.get("prescore_scoring_seconds_count", 0) > 0
    # the fused select+decode call reports its selection time (plus the query-aware pick)
    assert d.get("prescore_selection_seconds_count", 0) > 0
    assert d.get("prescore_selection_seconds_sum", 0) > 0


def test_keep_one_eighth_stays_coherent(sparse8, reference):
    """Keep 1/8 repeats itself not much more than exact attention over three ~4k-token
    prompts. Exact greedy decoding of a small model loops too, and single prompts vary widely
    (docs/results/repetition_served.md: over 12 served generations neither ranking repeats
    more than exact attention), so the margin is ~2.5 standard deviations of a three-prompt
    mean of the paired differences measured there; a broken selection ("the the the") repeats
    near 1 on every prompt and fails it."""
    assert_no_more_repetitive(sparse8["long_set"], reference["long_set"], "keep 1/8")
    agree = next((i for i, (a, b) in enumerate(zip(sparse8["long4k"], reference["long4k"]))
                  if a != b), len(reference["long4k"]))
    print(f"greedy agreement with CPU_ATTN at keep 1/8: first {agree} of "
          f"{len(reference['long4k'])} tokens")
    # Short prompts never reach min_seq_len: exact, identical to CPU_ATTN.
    assert sparse8["short"] == reference["short"]


def test_one_token_prompt_chunks_stay_exact(sparse8, reference):
    """A prompt's last token computed alone (a chunk of one token, or the one token a
    prefix-cache hit leaves) is a prompt token: attended exactly, so the first output token's
    logprob is CPU_ATTN's, cold or from the cache (before the fix, keep 1/8 decoded it
    sparsely: a different logprob, and other K/V for the later layers)."""
    got, ref = sparse8["one_token_chunks"], reference["one_token_chunks"]
    print("first-token logprobs, keep 1/8 vs CPU_ATTN:", got, ref)
    for key in ("1025", "1281", "1281-cached"):
        assert abs(got[key][0] - ref[key][0]) < 1e-3, (key, got[key], ref[key])
    assert abs(got["1281-cached"][0] - got["1281"][0]) < 1e-4, got
    assert got["1281-cached"][1] == got["1281"][1]


def test_side_data_fits_in_the_kv_cache_budget(sparse8, reference):
    """The KV cache and the side data together stay within the KV-cache budget the user set
    (prescore-serve's default 2 GiB here): the worker reports the budget less the side
    data's share, so the cache gets fewer blocks than CPU_ATTN's; the split is logged."""
    from prescore_backend.server.cli import _CPU_KV_CACHE_BYTES as budget

    def tokens(log: str) -> int:
        return int(re.search(r"KV cache size: ([\d,]+) tokens", log).group(1).replace(",", ""))

    layers, kv = 30, 2 * 3 * 64 * 4  # SmolLM2-135M, float32: bytes per token and layer
    side = 108.75  # the default's side data: 4-bit key copy, its scales, the pre-scores
    assert f"of side data ({side} bytes per token and layer beside {kv} of KV" in sparse8["log"]
    used = tokens(sparse8["log"]) * layers * (kv + side)
    assert 0.99 * budget <= used <= budget, (used, budget)
    assert tokens(reference["log"]) * layers * kv <= budget < tokens(reference["log"]) * layers * (kv + side)


def _gap(a, b) -> float:
    """Largest logprob difference over the decode positions (the first token comes from the
    prefill) up to the first differing token; inf if one of the first 3 tokens differs."""
    same = next((i for i, (x, y) in enumerate(zip(a[0], b[0])) if x != y), len(a[0]))
    if same < 3:
        return float("inf")
    return max(abs(x - y) for x, y in zip(a[1][1:same], b[1][1:same]))


def test_concurrent_requests_keep_their_controls(sparse8):
    """The V1 runner's request -> row mapping with several requests in flight (exact, keep
    1/2, StreamingLLM at 1/8, the default; staggered, a short request finishing first): every
    request's decoded logprobs are those it gets alone under its own controls (float32:
    batching moves them by ~1e-5), and far from those under its neighbour's."""
    m = sparse8["mapping"]
    gaps = [(_gap(t, o), _gap(t, x)) for t, o, x in zip(m["together"], m["own"], m["other"])]
    print("logprob gaps (own controls, neighbour's):", gaps)
    for near, far in gaps:
        assert near < 1e-3 and far > 0.05, gaps


def test_shared_prefix_matches_runs_alone(sparse8):
    assert sparse8["prefix_together"] == sparse8["prefix_alone"]


def test_preemption_gives_same_outputs(preempted, sparse8):
    assert preempted["outs"] == [sparse8["chunked"], sparse8["prefix_alone"][0]]
    assert preempted["preemptions"] > 0, "no preemption happened"


def test_two_tiers_serve_one_eighth_of_the_bytes_coherently(tiers, reference):
    """``--prescore-low-tier-bits 3``: the low-bit K/V copy is allocated beside the cache (the
    side data grows by 54 bytes per token and KV head: 3-bit K and V codes, V's per-token and
    K's per-block scales), the bytes read stay 1/8 of the KV (low-bit tokens charged at their
    bytes against a bf16 token, 54/256, on every host), the text stays as coherent as exact attention's, and a
    request whose budget covers its context is token-identical to CPU_ATTN through the tiers'
    path."""
    assert "Using PRESCORE attention backend" in tiers["log"]
    assert "prescore side data: 270.75 bytes per token per layer" in tiers["log"]
    assert tiers["chunked_keep_all"] == reference["chunked"]
    d = tiers["metrics_delta"]
    ctx, read = d["prescore_decode_context_tokens_total"], d["prescore_decode_read_tokens_total"]
    side = d["prescore_decode_side_tokens_total"] / ctx  # the sparq4 ranking on 8 channels
    assert ctx > 0 and 0.115 <= read / ctx + 2 * side <= 0.14, (read / ctx, side)
    assert_no_more_repetitive(tiers["long_set"], reference["long_set"], "two tiers at keep 1/8")
