"""End-to-end smoke: `prescore-serve` on the embedded model answers over real HTTP."""

from __future__ import annotations

import pytest
import requests

from conftest import Server, doc_text


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
    assert 0.05 < after["keep_ratio"] < 0.25
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
