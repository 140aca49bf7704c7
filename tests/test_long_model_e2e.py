"""The long-context model (Qwen2.5-Coder-0.5B-Instruct, 32k) served by prescore-serve over real
HTTP: its context and chat template, vLLM's logits against the reference forward, and long-
context answers that stay right with prescore's sparse decode.

One server, float32 on every host (the logits check compares against the float32 reference
forward; bf16 serving is covered by test_serving_e2e.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
from pathlib import Path

import pytest
import requests
import torch

from conftest import REPO, Server, doc_text

sys.path.insert(0, str(REPO / "bench" / "serving"))
from longctx_tasks import chat_messages, make_context  # noqa: E402

pytestmark = pytest.mark.e2e

MODEL = "qwen2.5-coder-0.5b"
# Next-token logprobs of vLLM (float32) and of prescore_backend.llama_ref (float32 torch) on the
# same prompt: both exact, different kernels and summation orders.
LOGPROB_TOL = 2e-3
RETRIEVAL_TOKENS = 2600  # above the default min_seq_len (2048): decoded sparsely


@pytest.fixture(scope="module")
def server(qwen_path):
    srv = Server(args=[MODEL, "--dtype", "float32", "--max-num-batched-tokens", "2048"]).start()
    yield srv
    srv.stop()


def _chat(srv: Server, messages: list[dict], xargs: dict | None = None,
          max_tokens: int = 48) -> str:
    r = requests.post(srv.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "vllm_xargs": xargs or {}}, timeout=900)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_served_with_its_32k_context_and_chat_template(server):
    models = requests.get(server.url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [MODEL] and models[0]["max_model_len"] == 32768
    reply = _chat(server, [{"role": "user", "content": "What is the capital of France? "
                                                       "Answer in one word."}], max_tokens=8)
    assert "Paris" in reply, reply


def test_logits_match_the_reference_forward(server, qwen_path):
    """q/k/v biases, RoPE theta 1e6 and GQA 7:1 in prescore's reference forward (the
    evaluation harness's model) give vLLM's next-token logprobs within LOGPROB_TOL."""
    from tokenizers import Tokenizer

    from prescore_backend.llama_ref import Llama

    tok = Tokenizer.from_file(str(Path(qwen_path) / "tokenizer.json"))
    ids = tok.encode(doc_text(1500, "execmodel")).ids[:300]
    r = requests.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 5},
        timeout=300)
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]  # token text -> logprob
    model = Llama(qwen_path)
    s = model.spec
    assert (s.heads, s.kv_heads, s.head_dim, s.rope_theta) == (14, 2, 64, 1e6)
    assert model.layer_w[0]["qkv_bias"] is not None
    with torch.no_grad():
        ref = torch.log_softmax(model.prefill(torch.tensor(ids)), -1)
    want = {tok.decode([int(i)]): float(ref[i]) for i in ref.topk(5).indices}
    assert set(want) == set(top), (want, top)
    err = max(abs(want[t] - top[t]) for t in top)
    print(f"max |logprob difference| vLLM vs reference forward: {err:.2e}")
    assert err < LOGPROB_TOL, (want, top)


def test_long_context_answers_stay_right_with_sparse_decode(server):
    """Nine questions over one ~2.6k-token haystack (nine distinct needles: numbers, words,
    UUIDs, a passkey; bench/serving/longctx_tasks.py), asked with exact attention and with
    prescore at keep 1/4 on the same server (the context prefilled once, shared through the
    prefix cache): the model retrieves (exact gets most right), and prescore answers every
    question exact answers."""
    from tokenizers import Tokenizer

    from prescore_backend.server.models import model_dir

    tok = Tokenizer.from_file(str(model_dir(MODEL) / "tokenizer.json"))
    ctx = make_context(tok, RETRIEVAL_TOKENS, index=0, seed=7)
    before = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    _chat(server, chat_messages(ctx, ctx.questions[0]), max_tokens=1)  # one prefill
    modes = {"exact": {"prescore_dense": True}, "prescore": {"prescore_keep_ratio": 0.25}}
    with cf.ThreadPoolExecutor(6) as pool:
        futs = {(m, i): pool.submit(_chat, server, chat_messages(ctx, q), x)
                for m, x in modes.items() for i, q in enumerate(ctx.questions)}
        replies = {k: f.result() for k, f in futs.items()}
    after = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    assert after["sparse_decode_rows"] > before["sparse_decode_rows"]
    right = {m: [q.correct(replies[(m, i)]) for i, q in enumerate(ctx.questions)]
             for m in modes}
    print({m: sum(v) for m, v in right.items()}, replies)
    assert sum(right["exact"]) >= 7, replies
    missed = [ctx.questions[i].task for i, (e, p) in enumerate(zip(right["exact"],
                                                                   right["prescore"])) if e and not p]
    assert not missed, (missed, replies)
