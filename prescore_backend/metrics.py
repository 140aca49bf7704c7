"""Prometheus metrics of the backend, created once per process (in the vLLM worker).

With ``PROMETHEUS_MULTIPROC_DIR`` set before launch (``prescore-serve`` does it), the values
written here in the worker appear on the API server's ``/metrics`` beside ``vllm:*``.

Units: token counts are summed over (decode row, layer, KV head), so
``prescore_decode_read_tokens_total / prescore_decode_context_tokens_total`` is the fraction of
the KV cache the sparse decode reads; ``prescore_decode_side_tokens_total`` adds, in the same
units, the side data the selection reads to choose the tiles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prescore_backend.kernels.select import SOURCES

# Counter slots accumulated in a tensor during a step (see PrescoreStats): first those a layer
# adds from the step's plan, then those the sparse decode call adds (tokens read, tiles chosen
# per source), each group contiguous so one in-place add per layer fills it.
CONTEXT, SPARSE_ROWS, DENSE_ROWS, SIDE = 0, 1, 2, 3
READ = 4
SRC0 = 5  # then one slot per selection source, in SOURCES order
NUM_SLOTS = SRC0 + len(SOURCES)
# kernels.select.SOURCES calls the query-aware slot "lsh"; in the backend it also holds Quest picks.
_SOURCE_LABELS = tuple("query" if s == "lsh" else s for s in SOURCES)


@dataclass(frozen=True)
class Metrics:
    context_tokens: object
    read_tokens: object
    side_tokens: object
    sparse_rows: object
    dense_rows: object
    selected_tiles: object
    scoring_seconds: object
    selection_seconds: object
    config_info: object


@functools.lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    buckets = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    return Metrics(
        context_tokens=Counter(
            "prescore_decode_context_tokens", "Context tokens of sparse-decoded rows, summed "
            "over (row, layer, KV head)."),
        read_tokens=Counter(
            "prescore_decode_read_tokens", "Tokens the sparse decode read (selected tiles and "
            "HyperAttention's residual sample), "
            "summed over (row, layer, KV head)."),
        side_tokens=Counter(
            "prescore_decode_side_tokens", "Side data the query-aware selection read (the 4-bit "
            "key copy's channels and scales, Quest bounds, SparQ key channels, PQ codes, "
            "pre-scores, LSH bits), in KV-token equivalents "
            "(bytes / bytes of one token's K and V), summed over (row, layer, KV head)."),
        sparse_rows=Counter(
            "prescore_sparse_decode_rows", "Decode rows (per layer) served by the sparse path."),
        dense_rows=Counter(
            "prescore_dense_fallback_rows", "Decode rows (per layer) served by exact attention: "
            "the context is shorter than min_seq_len, the budget covers it, or the request "
            "asked for prescore_dense."),
        selected_tiles=Counter(
            "prescore_selected_tiles", "Tiles selected, by source: sink, window, query (the "
            "query-aware ranking), prescore.",
            ["source"]),
        scoring_seconds=Histogram(
            "prescore_scoring_seconds", "Time spent pre-scoring keys in one engine step "
            "(all layers).", buckets=buckets),
        selection_seconds=Histogram(
            "prescore_selection_seconds", "Time spent selecting tiles in one engine step "
            "(all layers).", buckets=buckets),
        config_info=Gauge(
            "prescore_config_info", "Active prescore settings (value 1).",
            ["method", "keep_ratio", "tile_size", "query_aware"], multiprocess_mode="mostrecent"),
    )


class PrescoreStats:
    """Per-process accumulator: layers add tensors, the builder flushes once per step.

    Adding into a tensor keeps ``.item()``-style host syncs out of the per-layer path; the
    flush does one ``tolist()`` per step.
    """

    def __init__(self) -> None:
        import torch

        self.counts = torch.zeros(NUM_SLOTS, dtype=torch.int64)
        # [4] context tokens, sparse rows, dense rows, side data read (in KV tokens)
        self.layer_counts = self.counts[:READ]
        self.decode_counts = self.counts[READ:]  # [5] tokens read, then tiles per source
        self.scoring_s = 0.0
        self.selection_s = 0.0

    def to(self, device) -> "PrescoreStats":
        """Accumulate on ``device`` (the KV cache's): layers then add without a host sync."""
        self.counts = self.counts.to(device)
        self.layer_counts = self.counts[:READ]
        self.decode_counts = self.counts[READ:]
        return self

    def flush(self) -> None:
        vals = self.counts.tolist()
        if any(vals) or self.scoring_s or self.selection_s:
            m = get_metrics()
            if vals[CONTEXT]:
                m.context_tokens.inc(vals[CONTEXT])
                m.read_tokens.inc(vals[READ])
                m.side_tokens.inc(vals[SIDE])
            if vals[SPARSE_ROWS]:
                m.sparse_rows.inc(vals[SPARSE_ROWS])
            if vals[DENSE_ROWS]:
                m.dense_rows.inc(vals[DENSE_ROWS])
            for i, src in enumerate(_SOURCE_LABELS):
                if vals[SRC0 + i]:
                    m.selected_tiles.labels(source=src).inc(vals[SRC0 + i])
            if self.scoring_s:
                m.scoring_seconds.observe(self.scoring_s)
            if self.selection_s:
                m.selection_seconds.observe(self.selection_s)
            self.counts.zero_()
            self.scoring_s = 0.0
            self.selection_s = 0.0
