"""End-to-end smoke: `prescore-serve` on the embedded model answers over real HTTP."""

from __future__ import annotations

import pytest
import requests

from conftest import Server


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
