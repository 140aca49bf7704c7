"""`prescore-serve` on the embedded model over real HTTP: completions, chat, streaming,
prescore routes and metrics, per-request controls, bad input. One server for the module."""

from __future__ import annotations

import pytest
import requests

from conftest import Server, doc_text

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(model_path):
    srv = Server(args=["smollm2-135m"]).start()
    yield srv
    srv.stop()


def test_completion_capital_of_france(server):
    r = requests.post(server.url + "/v1/completions", json={
        "model": "smollm2-135m", "prompt": "The capital of France is",
        "max_tokens": 8, "temperature": 0,
    }, timeout=120)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.startswith(" Paris"), text


def test_served_with_prescore_backend(server):
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["smollm2-135m"]
    assert "Using PRESCORE attention backend" in server.log()


def test_bf16_keeps_vllms_amx_cache_layout_where_the_cpu_has_amx(server):
    """prescore-serve's dtype fits the host (bf16 where the CPU has native bf16, else fp32;
    said in the log). In bf16 on AMX CPUs vLLM's CPU_ATTN packs the cache for AMX, and prescore
    reads that layout (so prefill keeps vLLM's AMX kernel); elsewhere "vec". The long-request
    tests below then decode sparsely from whichever layout this is."""
    from prescore_backend.kernels import host

    log = server.log()
    if host.has_native_bf16():
        assert "has native bf16" in log and "dtype=torch.bfloat16" in log
    else:
        assert "prescore-serve: dtype float32" in log and "dtype=torch.float32" in log
    want = "amx" if host.has_amx() else "vec"
    assert f"prescore reads vLLM's '{want}' CPU KV cache layout" in server.log()


def test_engine_kv_cache_uses_huge_pages(server):
    """prescore-serve sets THP_MEM_ALLOC_ENABLE: the engine process (a child of the API server)
    holds its KV cache in transparent huge pages, unless the host disabled THP."""
    import pathlib

    import psutil

    mode = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages disabled on this host")
    huge = {}
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            text = pathlib.Path(f"/proc/{child.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kib = [int(x.split()[1]) for x in text.splitlines() if x.startswith("AnonHugePages:")]
        huge[child.pid] = kib[0] if kib else 0
    # the KV cache alone is hundreds of MiB; 64 MiB of huge pages rules out incidental ones
    assert max(huge.values(), default=0) >= 64 * 1024, huge


def _prescore_samples(server) -> dict[str, float]:
    out = {}
    for line in requests.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("prescore_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_prescore_routes_and_metrics_move_after_a_long_request(server):
    cfg = requests.get(server.url + "/v1/prescore/config", timeout=10)
    assert cfg.status_code == 200, cfg.text
    settings = cfg.json()["settings"]
    assert settings["method"] == "leverage" and settings["keep_ratio"] == 0.125
    assert settings["query_aware"] == "sparq4" and settings["query_channels"] == 0  # auto
    before = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    metrics_before = _prescore_samples(server)

    long_prompt = doc_text(11000)  # ~2.5k tokens: above the default min_seq_len of 2048
    r = requests.post(server.url + "/v1/completions", json={
        "model": "smollm2-135m", "prompt": long_prompt, "max_tokens": 16, "temperature": 0,
    }, timeout=300)
    assert r.status_code == 200, r.text

    after = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    assert after["sparse_decode_rows"] > before["sparse_decode_rows"]
    assert after["decode_context_tokens"] > before["decode_context_tokens"]
    # keep 1/8 of the bytes: the tiles plus the ranking's side data (charged against a bf16
    # KV: an fp32 cache reads the same codes, a smaller share), within a tile of rounding
    delta = {k: after[k] - before[k] for k in ("decode_context_tokens", "decode_read_tokens",
                                                "decode_side_tokens")}
    share = (delta["decode_read_tokens"] + delta["decode_side_tokens"]) / delta["decode_context_tokens"]
    assert delta["decode_side_tokens"] > 0 and 0.08 < share <= 0.125 + 16 / 2400, delta
    assert after["keep_ratio"] == pytest.approx(
        (after["decode_read_tokens"] + after["decode_side_tokens"]) / after["decode_context_tokens"])
    assert after["scoring_steps"] > before["scoring_steps"]
    metrics_after = _prescore_samples(server)
    for name in ("prescore_decode_context_tokens_total", "prescore_decode_read_tokens_total",
                 "prescore_sparse_decode_rows_total", "prescore_scoring_seconds_count"):
        assert metrics_after[name] > metrics_before.get(name, 0.0), name
    assert any(k.startswith("prescore_config_info{") for k in metrics_after)
    # The routes never carry request content.
    assert long_prompt[:40] not in str(after) and "prompt" not in str(after).lower()


def test_prescore_routes_are_in_the_openapi_schema(server):
    paths = requests.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    assert "get" in paths["/v1/prescore/config"] and "get" in paths["/v1/prescore/stats"]


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=300)


def test_openai_client_completions_chat_and_streaming(server, client):
    assert [m.id for m in client.models.list()] == ["smollm2-135m"]
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    c = client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert c.choices[0].text.startswith(" Paris")
    chunks = list(client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                            max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
    chat = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0)
    # Served text, well-formed: not one host's greedy numerics (the reply differs between
    # bf16 on AMX CPUs and fp32 on AVX2 hosts; greedy equality with CPU_ATTN on the same host
    # and dtype is tested in test_backend_e2e.py).
    assert chat.choices[0].message.content.strip()
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 16
    assert (chat.choices[0].finish_reason == "length") == (chat.usage.completion_tokens == 16)
    stream = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == chat.choices[0].message.content


def _ratio_of_one_request(server, client, extra: dict | None, side: bool = False):
    """Share of the context one request's sparse decode read in tiles (with ``side``: and
    in side data)."""
    before = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    client.completions.create(model="smollm2-135m", prompt=doc_text(11000, offset=500),
                              max_tokens=8, temperature=0,
                              extra_body={"vllm_xargs": extra} if extra else None)
    after = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    ctx = after["decode_context_tokens"] - before["decode_context_tokens"]
    tiles = (after["decode_read_tokens"] - before["decode_read_tokens"]) / ctx if ctx else 1.0
    if not side:
        return tiles
    return tiles, (after["decode_side_tokens"] - before["decode_side_tokens"]) / ctx


def test_streaming_request_reads_its_bytes_as_recent_tiles(server, client):
    """prescore_streaming: the request's keep ratio read in tiles (sinks and the most recent)
    and no side data; the default at the same ratio spends part of it on the ranking's side
    data (and so reads fewer tiles)."""
    st_tiles, st_side = _ratio_of_one_request(
        server, client, {"prescore_keep_ratio": 0.125, "prescore_streaming": True}, side=True)
    tiles, side = _ratio_of_one_request(server, client, {"prescore_keep_ratio": 0.125},
                                        side=True)
    from prescore_backend.kernels import host

    assert st_side == 0.0 and side > 0.01, (st_side, side)
    assert 0.12 < st_tiles < 0.14, st_tiles
    # the budget charges the side data against a bf16 KV; the counter counts it in the
    # cache's dtype (float32 where the host has no native bf16: half the share)
    charged = side * (1 if host.has_native_bf16() else 2)
    assert tiles < st_tiles and 0.11 < tiles + charged < 0.14, (tiles, side, charged)


def test_per_request_keep_ratio_changes_tokens_read(server, client):
    default = _ratio_of_one_request(server, client, None)
    half = _ratio_of_one_request(server, client, {"prescore_keep_ratio": 0.5})
    dense_rows_before = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    exact = _ratio_of_one_request(server, client, {"prescore_dense": True})
    dense_rows_after = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    assert 0.08 < default < 0.2, default
    assert 0.45 < half < 0.6, half
    assert exact == 1.0  # no sparse decode step at all for that request
    assert dense_rows_after["dense_fallback_rows"] > dense_rows_before["dense_fallback_rows"]


def _assert_openai_error(r: requests.Response, status: int = 400, needle: str = "") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert needle in err["message"], err["message"]


@pytest.mark.parametrize("xargs,needle", [
    ({"prescore_method": "magic"}, "prescore_method must be one of"),
    ({"prescore_keep_ratio": 1.5}, "prescore_keep_ratio must be a number in (0, 1]"),
    ({"prescore_keep_ratio": 0}, "prescore_keep_ratio"),
    ({"prescore_budget": 3}, "unknown prescore control"),
])
def test_invalid_controls_get_400_and_server_keeps_serving(server, xargs, needle):
    r = requests.post(server.url + "/v1/completions", json={
        "model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4, "vllm_xargs": xargs,
    }, timeout=60)
    _assert_openai_error(r, 400, needle)
    ok = requests.post(server.url + "/v1/completions", json={
        "model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_bad_controls_on_streams_and_json_booleans_get_400(server):
    """prescore-serve's guard reads the raw body: a stream's bad control is a 400 (vLLM
    alone answers 200 and puts the error inside the stream), a JSON true is not a ratio of 1
    (vLLM's request model alone reads it as 1), contradicting controls are refused; the chat
    route too. Good controls still stream."""
    url = server.url + "/v1/completions"
    for xargs, needle in (({"prescore_keep_ratio": 5}, "prescore_keep_ratio"),
                          ({"prescore_keep_ratio": True}, "prescore_keep_ratio"),
                          ({"prescore_dense": True, "prescore_keep_ratio": 0.5}, "contradict")):
        for stream in (True, False):
            _assert_openai_error(requests.post(url, json={
                "model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2, "stream": stream,
                "vllm_xargs": xargs}, timeout=60), 400, needle)
    _assert_openai_error(requests.post(server.url + "/v1/chat/completions", json={
        "model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2, "stream": True, "vllm_xargs": {"prescore-keep-ratio": 0.5}},
        timeout=60), 400, "did you mean 'prescore_keep_ratio'")
    r = requests.post(url, json={"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 2,
                                 "stream": True, "vllm_xargs": {"prescore_keep_ratio": 0.5}},
                      timeout=60, stream=True)
    events = [line for line in r.iter_lines() if line.startswith(b"data: ")]
    assert r.status_code == 200 and events[-1] == b"data: [DONE]"
    assert not any(b'"error"' in e for e in events), events


def test_bad_input_gets_4xx_and_server_keeps_serving(server):
    url = server.url + "/v1/completions"
    r = requests.post(url, data="{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    too_long = doc_text(62000) * 2  # far beyond the 8192-token context
    _assert_openai_error(requests.post(url, json={"model": "smollm2-135m", "prompt": too_long,
                                                  "max_tokens": 4}, timeout=120), 400)
    r = requests.post(url, json={"model": "no-such-model", "prompt": "Hi", "max_tokens": 2},
                      timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    ok = requests.post(url, json={"model": "smollm2-135m", "prompt": "The capital of France is",
                                  "max_tokens": 4, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(" Paris")


def test_retrieval_benchmark_runs_both_modes(server, client, tmp_path):
    """Smoke configuration of bench/serving/eval_retrieval.py: one ~2.4k-token passkey prompt
    (above min_seq_len, so the prescore answer is sparse-decoded) sent in both modes, and its
    report. Whether prescore keeps the answers right is asserted on a model that retrieves
    (SmolLM2-135M misses most passkeys even with exact attention): test_long_model_e2e.py."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "serving"))
    import eval_retrieval

    before = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    rows = eval_retrieval.run(client, "smollm2-135m", [2400], [0.5], trials=1, seed=1)
    after = requests.get(server.url + "/v1/prescore/stats", timeout=10).json()
    assert [r["mode"] for r in rows] == ["exact", "prescore"]
    assert all(r["tokens"] > 2048 for r in rows)
    assert after["sparse_decode_rows"] > before["sparse_decode_rows"]
    path = eval_retrieval.write(rows, {"machine": "test", "model": "smollm2-135m",
                                       "settings": {}, "command": "pytest"}, tmp_path)
    assert "| ~2400 |" in path.read_text()
    saved = __import__("json").loads((tmp_path / "retrieval.json").read_text())
    assert set(saved["accuracy"]) == {"exact", "prescore"} and len(saved["rows"]) == 2
