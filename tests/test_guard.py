"""Unit tests of prescore-serve's request guard, CPU rank binding and /v1/prescore/config (no
engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from prescore_backend.server import cli
from prescore_backend.server.middleware import RequestGuard


async def _echo(request):
    body = await request.body()
    return JSONResponse({"len": len(body)})


def _client(api_key=None, limit=None) -> TestClient:
    app = Starlette(routes=[Route(p, _echo, methods=["GET", "POST"])
                            for p in ("/health", "/metrics", "/v1/x")])
    app.state.args = SimpleNamespace(api_key=api_key, max_request_body_bytes=limit)
    app.add_middleware(RequestGuard)
    return TestClient(app)


def test_api_key_required_everywhere_but_probes(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    c = _client(api_key=["k1", "k2"])
    assert c.get("/health").status_code == 200
    for path in ("/metrics", "/v1/x"):
        r = c.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get(path, headers={"Authorization": "Basic k1"}).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer k2"}).status_code == 200


def test_no_key_configured_means_open(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert _client().get("/metrics").status_code == 200
    monkeypatch.setenv("VLLM_API_KEY", "envkey")  # vLLM's other source of the key
    c = _client()
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"Authorization": "Bearer envkey"}).status_code == 200


def test_body_limit_announced_and_streamed():
    c = _client(limit=1000)
    assert c.post("/v1/x", content=b"x" * 1000).json() == {"len": 1000}
    r = c.post("/v1/x", content=b"x" * 1001)
    assert r.status_code == 413 and "--max-request-body-bytes" in r.json()["error"]["message"]
    r = c.post("/v1/x", content=(b"x" * 300 for _ in range(4)))  # chunked, no Content-Length
    assert r.status_code == 413
    assert c.post("/v1/x", content=(b"x" * 300 for _ in range(3))).json() == {"len": 900}


def test_body_limit_holds_for_json_requests():
    """JSON POSTs are read whole for the controls check: the limit still applies."""
    c = _client(limit=1000)
    head = {"content-type": "application/json"}
    assert c.post("/v1/x", content=b" " * 990 + b"{}", headers=head).json() == {"len": 992}
    r = c.post("/v1/x", content=(b" " * 300 for _ in range(4)), headers=head)
    assert r.status_code == 413


@pytest.mark.parametrize("xargs,needle", [
    ({"prescore_keep_ratio": True}, "prescore_keep_ratio must be a number"),  # JSON true != 1
    ({"prescore_max_tokens": True}, "prescore_max_tokens must be an integer"),
    ({"prescore_max_tokens": 2**64 - 1}, "prescore_max_tokens must be an integer in [1, "),
    ({"prescore_keep_ratio": 0.5, "prescore_max_tokens": 64}, "contradict"),
    ({"prescore_dense": True, "prescore_streaming": True}, "contradict"),
    ({"prescore-keep-ratio": 0.25}, "did you mean 'prescore_keep_ratio'"),
    ({"PRESCORE_KEEP_RATIO": 0.25}, "unknown prescore control"),
    ({"prescore_keep_ratio": 2}, "(0, 1]"),
])
def test_controls_refused_before_the_app_reads_the_body(xargs, needle):
    """Bad controls get the OpenAI-schema 400 from the raw JSON body, streaming or not, and
    the app never runs; good ones (and bodies that are not JSON objects) pass unchanged."""
    c = _client()
    for stream in (False, True):
        r = c.post("/v1/x", json={"prompt": "hi", "stream": stream, "vllm_xargs": xargs})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "BadRequestError", err


def test_valid_controls_and_other_bodies_reach_the_app():
    c = _client()
    for body in ({"prompt": "hi", "vllm_xargs": {"prescore_keep_ratio": 0.25,
                                                  "prescore_streaming": True}},
                 {"prompt": "hi", "vllm_xargs": {"prescore_dense": 1, "other_arg": 3}},
                 {"prompt": "hi", "vllm_xargs": "not a dict"}, [1, 2]):
        r = c.post("/v1/x", json=body)
        assert r.status_code == 200 and r.json()["len"] > 0, (body, r.text)
    r = c.post("/v1/x", content=b"{not json", headers={"content-type": "application/json"})
    assert r.json() == {"len": 9}  # vLLM answers malformed JSON itself
    # the key escaped, or the body in UTF-16: json.loads reads both, so the guard does too
    escaped = b'{"prompt": "hi", "vllm\\u005fxargs": {"prescore_keep_ratio": 3}}'
    assert c.post("/v1/x", content=escaped).status_code == 400
    utf16 = '{"vllm_xargs": {"prescore_keep_ratio": true}}'.encode("utf-16")
    assert c.post("/v1/x", content=utf16).status_code == 400
    huge = b'{"vllm_xargs": {"prescore_keep_ratio": 1' + b"0" * 400 + b"}}"
    r = c.post("/v1/x", content=huge)
    assert r.status_code == 400 and "prescore_keep_ratio" in r.json()["error"]["message"]
    deep = b'{"vllm_xargs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert c.post("/v1/x", content=deep).json() == {"len": len(deep)}  # no 500 from the guard


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8",
                                          "application/vnd.api+json"])
def test_controls_checked_wherever_the_app_reads_json(content_type):
    """FastAPI reads a body as JSON without a content type too, and for any json subtype."""
    import json

    body = json.dumps({"prompt": "hi", "vllm_xargs": {"prescore_keep_ratio": 3}}).encode()
    head = {} if content_type is None else {"content-type": content_type}
    r = _client().post("/v1/x", content=body, headers=head)
    assert r.status_code == 400 and "prescore_keep_ratio" in r.json()["error"]["message"]
    r = _client().post("/v1/x", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 200  # not read as JSON by the app: passed through


@pytest.mark.parametrize("argv,cpus,nodes,want", [
    ([], [0, 1], 1, None),                                          # one rank: vLLM's default
    (["--tensor-parallel-size", "2"], [0, 1, 2, 3], 1, "0,1|2,3"),
    (["-tp", "3"], [0, 1], 1, "0|1|0"),                             # fewer cores than ranks
    (["--tensor-parallel-size=2", "--pipeline-parallel-size", "2"], list(range(8)), 1,
     "0,1|2,3|4,5|6,7"),
    (["--tensor-parallel-size", "2"], [0, 1, 2, 3], 2, None),       # a NUMA node per rank
])
def test_cpu_thread_binding(argv, cpus, nodes, want):
    assert cli.cpu_thread_binding(argv, cpus, nodes) == want


def test_build_argv_adds_the_guard(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESCORE_CACHE", str(tmp_path))
    argv = cli.build_argv(["/some/model"])
    assert argv[argv.index("--middleware") + 1] == cli.GUARD


def test_config_route_reports_what_the_workers_run(monkeypatch, tmp_path):
    """``/v1/prescore/config`` applies the workers' start-time choice: ``query_aware="pq"``
    on a model without PQ codebooks ranks with ``quest`` (as the workers log and
    ``prescore_config_info`` says), with them ``pq``; the model comes from the server's args."""
    import asyncio

    import torch
    from fastapi import FastAPI

    from prescore_backend.pq import PQCodebooks, fit_codebook
    from prescore_backend.server.routes import PrescoreEndpoints

    monkeypatch.setenv("PRESCORE_QUERY_AWARE", "pq")
    monkeypatch.setenv("PRESCORE_PQ_SUBSPACES", "4")
    app = FastAPI()
    plugin = PrescoreEndpoints()
    plugin.attach_router(app)
    client = TestClient(app)
    for has_books, want in ((False, "quest"), (True, "pq")):
        model = tmp_path / ("with" if has_books else "without")
        model.mkdir()
        if has_books:  # as `prescore-models calibrate` writes them beside the model
            book = fit_codebook(torch.randn(2, 256, 64), 4, seed=0)
            PQCodebooks(book.centroids[None], book.weights[None], book.dims, {}).save(
                model / "prescore_pq4.pt")
        asyncio.run(plugin.init_state(None, app.state, SimpleNamespace(model=str(model))))
        r = client.get("/v1/prescore/config")
        assert r.status_code == 200, r.text
        assert r.json()["settings"]["query_aware"] == want, (has_books, r.json()["settings"])
