"""Tensor parallelism with vLLM's own multi-process executor: the prescore side data and the
tile selection are per KV head, so they split with the heads across ranks. The served greedy
text with ``--tensor-parallel-size 3`` equals the one-rank text, sparse decode included.

SmolLM2-135M has 9 query heads and 3 KV heads: 2 does not divide 9 (vLLM refuses TP=2 for
this model), so the test uses 3 ranks, one KV head each. On this 2-core machine prescore-serve
shares the cores among the ranks (VLLM_CPU_OMP_THREADS_BIND), see server/cli.py."""

from __future__ import annotations

import pytest
import requests

from conftest import Server, doc_text

pytestmark = pytest.mark.e2e

# The query-aware part is SparQ here (the default, sparq4, is served in the other e2e modules):
# its key channels are read from each rank's own KV-cache shard in the real engine.
ARGS = ["smollm2-135m", "--dtype", "float32", "--max-model-len", "4096",
        "--prescore-min-seq-len", "256", "--prescore-keep-ratio", "0.125",
        "--prescore-query-aware", "sparq"]
PROMPTS = [doc_text(5200, topic="specialnames"),  # ~1.2k tokens: sparse decode at 1/8
           doc_text(4000, topic="compound", offset=2000),
           "The capital of France is"]


def _serve_and_generate(extra: list[str]) -> tuple[list[str], float, str]:
    srv = Server(args=[*ARGS, *extra]).start()
    try:
        texts = []
        for p in PROMPTS:
            r = requests.post(srv.url + "/v1/completions", timeout=600, json={
                "model": "smollm2-135m", "prompt": p, "max_tokens": 24, "temperature": 0})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        stats = requests.get(srv.url + "/v1/prescore/stats", timeout=30).json()
        return texts, stats["sparse_decode_rows"], srv.log()
    finally:
        srv.stop()


def test_tensor_parallel_3_matches_one_rank():
    one, sparse_one, _ = _serve_and_generate([])
    tp, sparse_tp, log = _serve_and_generate(["--tensor-parallel-size", "3"])
    assert sparse_one > 0 and sparse_tp > 0  # the sparse path ran in both
    assert "'query_aware': 'sparq'" in log  # the SparQ ranking served both
    for rank in (0, 1, 2):
        assert f"Worker_TP{rank}" in log and "Using PRESCORE attention backend" in log
    assert tp == one
    assert one[2].startswith(" Paris")
