"""HTTP routes added to vLLM's OpenAI server through a ``vllm.endpoint_plugins`` entry point.

* ``GET /v1/prescore/config``: the active prescore settings (what the workers run with).
* ``GET /v1/prescore/stats``: aggregates since start, read from the same Prometheus
  multiprocess files that feed ``/metrics`` (the backend runs in the worker processes).

Neither route sees requests or prompts, so neither can reveal prompt text. vLLM loads endpoint
plugins only when they are named in ``VLLM_PLUGINS``; ``prescore-serve`` adds ``prescore``
there. Both routes live under ``/v1``, so vLLM's ``--api-key`` protects them.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, Field

from prescore_backend.config import ConfigError, PrescoreConfig, field_docs

PLUGIN_NAME = "prescore"


class PrescoreConfigResponse(BaseModel):
    """The prescore settings in effect (see ``prescore-serve --help=prescore``)."""

    settings: dict[str, Any] = Field(description="Setting name -> value.")
    docs: dict[str, str] = Field(description="Setting name -> what it does.")


class PrescoreStatsResponse(BaseModel):
    """Backend counters since the server started, summed over worker processes."""

    decode_context_tokens: float = Field(
        description="Context tokens of sparse-decoded rows, summed over (row, layer, KV head).")
    decode_read_tokens: float = Field(description="Tokens the sparse decode read, same units.")
    keep_ratio: float | None = Field(
        description="(read + side) / context: the share of the KV bytes the sparse decode read "
        "(the side data in the cache's dtype: keep_ratio charges it against a bf16 KV, so on a "
        "float32 cache its share halves, e.g. ~0.11 at keep 1/8); null before any sparse step.")
    decode_side_tokens: float = Field(
        description="Side data the selection read (the 4-bit key copy's channels and scales, "
        "Quest bounds, SparQ channels, PQ codes, pre-scores, LSH bits), in KV-token "
        "equivalents, same units.")
    sparse_decode_rows: float = Field(description="Decode rows (per layer) served sparsely.")
    dense_fallback_rows: float = Field(description="Decode rows (per layer) served exactly.")
    selected_tiles: dict[str, float] = Field(description="Tiles selected, by source.")
    scoring_seconds: float = Field(description="Total time spent pre-scoring keys.")
    scoring_steps: float = Field(description="Engine steps that pre-scored keys.")
    selection_seconds: float = Field(description="Total time spent selecting tiles.")


def collect_stats() -> PrescoreStatsResponse:
    """Sum the ``prescore_*`` samples of every process (multiprocess mode) or of this one."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    values: dict[str, float] = {}
    tiles: dict[str, float] = {}
    for metric in registry.collect():
        if not metric.name.startswith("prescore_"):
            continue
        for s in metric.samples:
            if s.name == "prescore_selected_tiles_total":
                tiles[s.labels.get("source", "")] = tiles.get(s.labels.get("source", ""), 0.0) + s.value
            elif not s.labels or set(s.labels) == {"pid"}:
                values[s.name] = values.get(s.name, 0.0) + s.value
    ctx = values.get("prescore_decode_context_tokens_total", 0.0)
    read = values.get("prescore_decode_read_tokens_total", 0.0)
    side = values.get("prescore_decode_side_tokens_total", 0.0)
    return PrescoreStatsResponse(
        decode_context_tokens=ctx, decode_read_tokens=read,
        keep_ratio=(read + side) / ctx if ctx else None,
        decode_side_tokens=side,
        sparse_decode_rows=values.get("prescore_sparse_decode_rows_total", 0.0),
        dense_fallback_rows=values.get("prescore_dense_fallback_rows_total", 0.0),
        selected_tiles=tiles,
        scoring_seconds=values.get("prescore_scoring_seconds_sum", 0.0),
        scoring_steps=values.get("prescore_scoring_seconds_count", 0.0),
        selection_seconds=values.get("prescore_selection_seconds_sum", 0.0))


def served_config(model: str | None) -> PrescoreConfig:
    """The settings the workers run with: the environment's, with the start-time choices the
    workers make applied (``query_aware="pq"`` without the model's codebooks ranks with
    ``quest``: :func:`prescore_backend.pq.resolve_codebooks`)."""
    from prescore_backend.pq import resolve_codebooks

    try:
        cfg = PrescoreConfig.from_env()
    except ConfigError as e:  # the server would not have started; be explicit anyway
        raise ValueError(str(e)) from e
    try:
        return resolve_codebooks(cfg, model)[1]
    except ValueError:  # a missing codebook file stops the workers' start: not reached
        return cfg


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1/prescore", tags=["prescore"])

    @router.get("/config", response_model=PrescoreConfigResponse,
                summary="Active prescore settings")
    async def get_config(request: Request) -> PrescoreConfigResponse:
        state = request.app.state
        cfg = getattr(state, "prescore_config", None) or served_config(
            getattr(state, "prescore_model", None))
        return PrescoreConfigResponse(settings=cfg.to_dict(), docs=field_docs())

    @router.get("/stats", response_model=PrescoreStatsResponse,
                summary="prescore counters since start (no request content)")
    async def get_stats() -> PrescoreStatsResponse:
        return collect_stats()

    return router


class PrescoreEndpoints:
    """The ``vllm.endpoint_plugins`` object: attaches the routes above."""

    name = PLUGIN_NAME
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())

    async def init_state(self, engine_client, state, args) -> None:
        # the settings resolved against the model once, at start, as the workers resolve them
        state.prescore_model = getattr(args, "model", None) or getattr(args, "model_tag", None)
        state.prescore_config = served_config(state.prescore_model)
