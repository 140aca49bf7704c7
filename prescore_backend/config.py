"""All prescore settings: one validated config object, and the one place env vars are read.

Every knob is a field of :class:`PrescoreConfig`, documented where it is declared. The running
backend reads its settings from environment variables ``PRESCORE_<FIELD>`` (upper case), e.g.
``PRESCORE_KEEP_RATIO=0.125``; the engine's worker processes inherit them. ``prescore-serve``
exposes the same fields as ``--prescore-<field>`` flags and exports them to these variables.
Invalid values stop the start with a :class:`ConfigError` that names the variable (and flag).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "PRESCORE_"
QUERY_AWARE_MODES = ("none", "lsh", "quest", "lsh_quest", "sparq", "sparq4", "pq")
#: query_channels=0 with 'sparq4': the share of the budget's bytes the ranking may read at
#: KV block 128 (fitted on the two calibration texts at 8k tokens: at keep 1/8 16 channels beat 8
#: and were not beaten by 24 or 32, at 1/16 8 beat 16; docs/results/selection_channels.md; the
#: same counts won at block 16, docs/results/selection_channels_block16.md).
AUTO_CHANNEL_SHARE = 0.3


class ConfigError(ValueError):
    """An invalid prescore setting; the message names the setting to fix."""


def cache_dir() -> Path:
    """Root of prescore's on-disk cache: ``$PRESCORE_CACHE`` or ``~/.cache/prescore``."""
    env = os.environ.get("PRESCORE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prescore"


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


#: tile aggregates a server can use (scoring.tiles' topk_count needs the context's global top-k)
SERVER_AGGREGATES = ("max", "sum", "mean")


@dataclass(frozen=True)
class PrescoreConfig:
    """Settings of the PRESCORE attention backend (validated on construction)."""

    method: str = field(default="leverage", metadata=_doc(
        "Query-independent key scorer run at prefill (see `prescore_backend.scoring`); its "
        "scores fill the budget the query-aware part leaves: leverage (the default), "
        "recency (score = position: the fill extends the recent window), kmeans, "
        "kernel_kmeans, kmedian, key_norm, random (the clustering scorers refit per KV block "
        "and cost far more than leverage)."))
    keep_ratio: float = field(default=0.125, metadata=_doc(
        "Fraction of a sequence's KV bytes read per decode step, in (0, 1]; 1 = exact. It "
        "counts everything the step reads: the tiles (sinks, window and picks included) and "
        "the selection's side data (4-bit key channels and scales, pre-scores, Quest bounds, "
        "codes), the side data charged against a bf16 KV on every host, so one setting reads "
        "the same tiles on fp32 and bf16 hosts (docs/results/selection.md counts the same "
        "way); never fewer tiles than sinks + window. Side data read: "
        "prescore_decode_side_tokens_total."))
    max_tokens: int = field(default=0, metadata=_doc(
        "If > 0, an absolute decode budget in tokens per (sequence, KV head) instead of "
        "keep_ratio (rounded up to whole tiles)."))
    tile_size: int = field(default=16, metadata=_doc(
        "Tokens per tile, the unit of scoring and selection; must divide the KV block size."))
    sink_tokens: int = field(default=32, metadata=_doc(
        "First tokens of every sequence always attended (attention sinks); a multiple of "
        "tile_size."))
    window_tokens: int = field(default=160, metadata=_doc(
        "Most recent tokens always attended; a multiple of tile_size and at least one KV "
        "block plus one tile (a block's tiles are scored when the block is full, so the "
        "unscored tail must stay inside the window)."))
    query_aware: str = field(default="sparq4", metadata=_doc(
        "The query-aware part of the selection, recomputed for every decode step: "
        "'lsh' = tiles whose LSH bucket set holds the query's bucket (HyperAttention), ranked "
        "by pre-score; 'quest' = tiles ranked by the upper bound of q.k from per-tile key "
        "min/max (Quest); 'lsh_quest' = LSH matches ranked by that bound; 'sparq' = tiles "
        "ranked by max q.k over the tile estimated on the query's largest channels "
        "(query_channels of them, exact key values; SparQ); 'sparq4' = the same estimate, max "
        "over the GQA group's heads, on a 4-bit copy of the keys kept beside the cache "
        "(query_channels / 2 bytes per token and KV head read per step, plus each block's "
        "scales; head_dim / 2 bytes per token held); 'pq' = tiles ranked by max q.k "
        "estimated from product-quantized key codes (pq_subspaces bytes per token and KV "
        "head; codebooks from `prescore-models calibrate`, see pq_codebook); 'none'."))
    query_channels: int = field(default=0, metadata=_doc(
        "Key channels read per token by query_aware='sparq' / 'sparq4': the query group's "
        "largest |q| channels (in adjacent pairs for 'sparq'); an even number, or 0 (the "
        "default) for a count that follows the budget: with 'sparq4', the most multiples of 8 "
        "(at least 8, at most the head dim) whose bytes (4-bit codes and, at KV block 128, the "
        "blocks' scales) stay within 30% of keep_ratio's bytes: 16 of 64 channels at keep 1/8, "
        "8 at 1/16, 32 at 1/4, at every block size (the share fitted on the calibration texts "
        "at block 128: docs/results/selection_channels.md; at block 16, a GPU's, the scales "
        "cost as much as the codes and are charged to the budget, and 16 channels at keep 1/8 "
        "still beat 8 there: docs/results/selection_channels_block16.md); 8 with 'sparq', "
        "with max_tokens > 0 and with "
        "low_tier_bits (as evaluated). The configured keep_ratio decides: a request's own "
        "prescore_keep_ratio reads the same channels (their bytes taken from its budget)."))
    pq_subspaces: int = field(default=4, metadata=_doc(
        "Subspaces of query_aware='pq': each cached key gets this many one-byte codes per KV "
        "head (256 centroids per subspace); 2 x pq_subspaces must divide the head dim (each "
        "subspace holds whole rotary pairs; `prescore-models calibrate` refuses others)."))
    pq_codebook: str = field(default="", metadata=_doc(
        "Codebook file of query_aware='pq' (written by `prescore-models calibrate MODEL`). "
        "Empty: prescore_pq<pq_subspaces>.pt in the model's directory, and if the model has "
        "none, the backend logs a warning and ranks with 'quest' instead."))
    query_cap_ratio: float = field(default=1.0, metadata=_doc(
        "At most this fraction of a row's budget goes to query-aware tiles (never more than "
        "the budget left after sinks and window); the rest is filled by the highest "
        "pre-scores. 1 (the default) = the query-aware ranking alone picks every tile beyond "
        "sinks and window: with 'sparq4' it beat the leverage fill at every budget on the "
        "calibration texts (docs/results/selection_channels.md); with 'pq' it looped in "
        "greedy generation at 4k tokens (docs/results/selection.md)."))
    lsh_bits: int = field(default=7, metadata=_doc(
        "Bits of the angular LSH (HyperAttention); 2^bits buckets."))
    residual_tiles: int = field(default=0, metadata=_doc(
        "HyperAttention residual: tiles sampled uniformly among the unselected ones, weighted "
        "#unselected/#sampled and merged by log-sum-exp, read within the budget (the "
        "selection gets this many tiles fewer; a row whose budget cannot hold them beside "
        "sinks and window reads no residual). 0 = off (the paper's choice with "
        "pre-scoring)."))
    low_tier_bits: int = field(default=0, metadata=_doc(
        "Two precision tiers (0 = off; 2..8 = on): a copy of K and V at this many bits is "
        "kept beside the cache (KIVI's layout: K per block and channel, V per token; written "
        "when a block fills), and each decode step reads the best tiles of the sparq4 ranking "
        "exactly and the next ones from the copy, merged into one softmax. The budget's bytes "
        "are split between the tiers (low_tier_share), a copy token costing its bytes "
        "(3 bits, head dim 64: 0.21 of a bf16 token), so more tiles are read for the same "
        "bytes. Needs query_aware='sparq4' (the ranking orders every tile beyond sinks and "
        "window; query_cap_ratio and the pre-scores do not apply) and tile_size >= 16; not "
        "with residual_tiles. Memory per token and KV head: 2 x bits x head_dim / 8 bytes of "
        "codes, 4 of V scales and 4 x head_dim / block_size of K scales (3 bits, head dim 64, "
        "block 128: 54 bytes, 21% of a bf16 KV), taken from vLLM's KV-cache budget. "
        "A low-bit token is charged its bytes against a bf16 token on every host. Quality "
        "and cost: docs/results/selection_tiers.md, docs/results/tiers_speed.md (on CPU the "
        "pick and the low-bit decode are C++, several times the default's per-layer cost; on "
        "GPUs Triton kernels, tested under the Triton interpreter, not yet timed on a GPU)."))
    low_tier_share: float = field(default=0.75, metadata=_doc(
        "With low_tier_bits: the fraction of the budget's bytes beyond sinks and window spent "
        "on the low-bit tier, in (0, 1]."))
    min_seq_len: int = field(default=2048, metadata=_doc(
        "Sequences shorter than this decode with vLLM's exact kernel."))
    aggregate: str = field(default="max", metadata=_doc(
        "How key scores become a tile score: max, sum or mean over the tile's keys (the "
        "scoring library's topk_count needs the whole context's top-k, which a block scored "
        "when it fills does not see: not a server setting)."))
    seed: int = field(default=0, metadata=_doc("Seed of the scorers, LSH projections and sampling."))
    def __post_init__(self) -> None:
        from prescore_backend.scoring import available_scorers

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"invalid prescore setting {name}={getattr(self, name)!r} "
                               f"({env_name(name)} / {flag_name(name)}): {why}")

        for f in fields(self):  # sizes beyond any context overflow the plan's int64 tensors
            v, hi = getattr(self, f.name), (SEED_MAX if f.name == "seed" else INT_MAX)
            if str(f.type) != "int":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(f.name, "must be an integer")
            if v > hi:  # lower bounds: each field's own check below
                raise bad(f.name, f"must be an integer of at most {hi}")
        if self.seed < -SEED_MAX - 1:
            raise bad("seed", f"must be at least {-SEED_MAX - 1}")
        if self.method not in available_scorers():
            raise bad("method", f"unknown scorer; valid: {', '.join(available_scorers())}")
        if not (0.0 < self.keep_ratio <= 1.0) or math.isnan(self.keep_ratio):
            raise bad("keep_ratio", "must be in (0, 1]")
        if self.max_tokens < 0:
            raise bad("max_tokens", "must be >= 0")
        if self.tile_size <= 0 or self.tile_size & (self.tile_size - 1):
            raise bad("tile_size", "must be a power of two")
        for name in ("sink_tokens", "window_tokens"):
            v = getattr(self, name)
            if v < 0 or v % self.tile_size:
                raise bad(name, f"must be a non-negative multiple of tile_size={self.tile_size}")
        if self.window_tokens < 2 * self.tile_size:
            raise bad("window_tokens", f"must be at least 2 tiles ({2 * self.tile_size})")
        if self.query_aware not in QUERY_AWARE_MODES:
            raise bad("query_aware", f"valid: {', '.join(QUERY_AWARE_MODES)}")
        if self.query_aware == "sparq4" and self.tile_size < 16:
            # the 4-bit key copy is ranked 16 tokens at a time (two per byte, 8-byte lanes)
            raise bad("tile_size", "query_aware='sparq4' (the default ranking) needs "
                      "tile_size >= 16; raise it, or choose another query_aware")
        if not 0.0 <= self.query_cap_ratio <= 1.0:
            raise bad("query_cap_ratio", "must be in [0, 1]")
        if self.query_channels < 0 or self.query_channels % 2:
            raise bad("query_channels", "must be 0 (follow the budget) or an even number >= 2")
        if self.pq_subspaces < 1 or self.pq_subspaces > 64:
            raise bad("pq_subspaces",
                      "must be in [1, 64] (and 2 x pq_subspaces divide the head dim)")
        if not 1 <= self.lsh_bits <= 10:
            raise bad("lsh_bits", "must be in [1, 10]")
        if self.residual_tiles < 0:
            raise bad("residual_tiles", "must be >= 0")
        if self.low_tier_bits and not 2 <= self.low_tier_bits <= 8:
            raise bad("low_tier_bits", "must be 0 (off) or in [2, 8]")
        if self.low_tier_bits and self.query_aware != "sparq4":
            raise bad("low_tier_bits", "two tiers rank tiles with query_aware='sparq4' "
                      f"(got query_aware={self.query_aware!r})")
        if self.low_tier_bits and self.residual_tiles:
            raise bad("low_tier_bits", "not with residual_tiles > 0 (one tail estimate at a time)")
        if self.low_tier_bits and self.tile_size < 8:
            raise bad("low_tier_bits", f"needs tile_size >= 8 (got {self.tile_size})")
        if not 0.0 < self.low_tier_share <= 1.0:
            raise bad("low_tier_share", "must be in (0, 1]")
        if self.min_seq_len < 0:
            raise bad("min_seq_len", "must be >= 0")
        if self.aggregate not in SERVER_AGGREGATES:
            raise bad("aggregate", f"valid: {', '.join(SERVER_AGGREGATES)}")

    # ------------------------------------------------------------------ derived values
    @property
    def uses_lsh(self) -> bool:
        return self.query_aware in ("lsh", "lsh_quest")

    @property
    def uses_bounds(self) -> bool:
        return self.query_aware in ("quest", "lsh_quest")

    @property
    def uses_keys(self) -> bool:
        """The query-aware part reads key channels from the KV cache (SparQ)."""
        return self.query_aware == "sparq"

    @property
    def uses_codes(self) -> bool:
        """The query-aware part reads per-token product-quantized key codes (PQ)."""
        return self.query_aware == "pq"

    @property
    def uses_key_copy(self) -> bool:
        """The query-aware part reads a 4-bit copy of the keys beside the cache (sparq4)."""
        return self.query_aware == "sparq4"

    @property
    def streams_without_room(self) -> bool:
        """Rows whose budget, less the ranking's side data, buys no tile beyond sinks and
        window skip the ranking and read the most recent tiles with all of the budget
        (StreamingLLM at equal bytes; ``selection.ratio_budgets``): configs whose pre-scores
        are not read (they are then the tiles' positions), other than two tiers."""
        return not self.reads_prescores and not self.uses_low_tier and self.query_aware != "none"

    @property
    def reads_prescores(self) -> bool:
        """The selection reads the pre-scores: they fill what the query-aware part leaves
        (query_cap_ratio < 1), or rank the tiles ('none') and the LSH matches ('lsh',
        'lsh_quest'). Else the prefill skips the scorer (the score jobs still write the key
        copy and the other side data)."""
        return (self.query_aware in ("none", "lsh", "lsh_quest")
                or (self.query_cap_ratio < 1.0 and not self.uses_low_tier))

    @property
    def uses_low_tier(self) -> bool:
        """Two precision tiers: a low-bit K/V copy beside the cache (kernels/lowbit.py)."""
        return self.low_tier_bits > 0

    def ranking_channels(self, head_dim: int) -> int:
        """Key channels per token the 'sparq' / 'sparq4' ranking reads (``query_channels``, or
        with 0 the count that follows the budget: see the setting's doc); the same at every
        KV block size."""
        if self.query_channels:
            return min(self.query_channels, head_dim)
        if (self.query_aware != "sparq4" or self.max_tokens > 0 or self.uses_low_tier
                or self.keep_ratio >= 1.0):
            return min(8, head_dim)
        # bytes per token and KV head: the budget's (K and V charged as bf16), one channel's
        # (a 4-bit code and its block's fp32 min and step) at the block size the share was
        # fitted at (128), whatever the cache's: at block 16 the scales cost 8x more per token
        # (charged to the budget all the same), and counting them there halved the channels
        # where the calibrated count still won (selection_channels_block16.md).
        budget = self.keep_ratio * 2 * head_dim * 2
        per_channel = 0.5 + 8 / 128
        c = 8 * int(AUTO_CHANNEL_SHARE * budget / per_channel // 8)
        return max(8, min(c, head_dim))

    @property
    def sink_tiles(self) -> int:
        return self.sink_tokens // self.tile_size

    @property
    def window_tiles(self) -> int:
        return self.window_tokens // self.tile_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "PrescoreConfig":
        """Build from ``PRESCORE_*`` variables (the only place the backend reads them)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> "PrescoreConfig":
        return dataclasses.replace(self, **changes)


#: Not a setting: the end-to-end tests set it to route long rows whose budget covers the whole
#: context through the sparse kernel instead of vLLM's (validating the sparse path against
#: CPU_ATTN token for token). Not a ``PrescoreConfig`` field, so it has no flag and no docs.
TESTING_EXACT_VIA_SPARSE_ENV = "_PRESCORE_TESTING_EXACT_VIA_SPARSE"


def testing_exact_via_sparse(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the validation switch :data:`TESTING_EXACT_VIA_SPARSE_ENV` is on."""
    environ = os.environ if environ is None else environ
    raw = environ.get(TESTING_EXACT_VIA_SPARSE_ENV, "").strip().lower()
    if raw not in ("", "0", "1", "true", "false", "yes", "no", "on", "off"):
        raise ConfigError(f"{TESTING_EXACT_VIA_SPARSE_ENV}={raw!r}: expected bool")
    return raw in ("1", "true", "yes", "on")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--prescore-" + field_name.replace("_", "-")


#: The largest value of an integer setting (token counts far beyond any context), and of the
#: seed (what ``torch.Generator.manual_seed`` takes, from ``-SEED_MAX - 1``).
INT_MAX = 2**31 - 1
SEED_MAX = 2**63 - 1


def _parse(name: str, type_name: Any, raw: str) -> Any:
    t = str(type_name)
    try:
        if t == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        return raw.strip()
    except ValueError:
        raise ConfigError(f"invalid prescore setting {name}={raw!r} ({env_name(name)} / "
                          f"{flag_name(name)}): expected {t}") from None


def field_docs() -> dict[str, str]:
    """Field name -> documentation (used by ``--help`` and the README)."""
    return {f.name: f.metadata.get("doc", "") for f in fields(PrescoreConfig)}


#: Per-request keys (``vllm_xargs``) of the settings a request may change for itself.
REQUEST_KEYS = {"keep_ratio": "prescore_keep_ratio", "max_tokens": "prescore_max_tokens",
                "method": "prescore_method"}


def reference_markdown() -> str:
    """``docs/configuration.md``: every setting with its flag, variable, per-request key and
    default, from the fields' docs (the source of ``prescore-serve --help=prescore`` too)."""
    import re

    docs, defaults = field_docs(), PrescoreConfig().to_dict()
    out = ["# Configuration reference", "",
           "Generated from `prescore_backend.config.PrescoreConfig` "
           "(`python -m prescore_backend.config > docs/configuration.md`; a test keeps it "
           "current). Every setting is a `prescore-serve` flag and a `PRESCORE_*` environment "
           "variable (plain `vllm serve` and `LLM(...)` read the variables). Precedence: a "
           "request's own key (`vllm_xargs`) over the flag, the flag over the variable, the "
           "variable over the default. An invalid value stops the start with a message naming "
           "the flag and the variable; an invalid per-request value gets HTTP 400.", "",
           "| setting | flag | variable | per request | default | what it does |",
           "|---|---|---|---|---|---|"]
    for name, doc in docs.items():
        first = re.split(r"(?<=\.)\s", doc, maxsplit=1)[0]
        req = f"`{REQUEST_KEYS[name]}`" if name in REQUEST_KEYS else "-"
        out.append(f"| `{name}` | `{flag_name(name)}` | `{env_name(name)}` | {req} | "
                   f"`{defaults[name]!r}` | {first.replace('|', chr(92) + '|')} |")
    out += ["", "Per request only: `prescore_dense` (`true`: exact attention for this request); "
            "`prescore_streaming` (`true`: StreamingLLM's selection, the sinks and the most "
            "recent tiles, at the request's bytes: the recency baseline beside the ranking; "
            "only where `query_cap_ratio` is 1, `low_tier_bits` 0 and `query_aware` one of "
            "`sparq4`, `sparq`, `quest`, `pq`, else HTTP 400).",
            "Contradicting pairs get HTTP 400 rather than one of them ignored: "
            "`prescore_keep_ratio` with `prescore_max_tokens`, and `prescore_dense` with either "
            "or with `prescore_streaming`. So do misspelt keys (`prescore-keep-ratio`, "
            "capitals). `prescore-serve` checks a request body's top-level `vllm_xargs` as sent "
            "(completions, chat, responses), so a streaming request's bad control is a 400 too "
            "and a JSON `true` is no number; plain `vllm serve` checks at admission (a stream "
            "then carries the error inside its 200 response; add "
            "`--middleware prescore_backend.server.middleware.RequestGuard` for the 400).",
            "With the defaults, `prescore_method` changes nothing: the pre-scores it computes "
            "are read only when `query_cap_ratio` < 1 or the ranking is `none`, `lsh` or "
            "`lsh_quest`.", "",
            "## Details", ""]
    for name, doc in docs.items():
        out += [f"### `{name}`", "", doc, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
