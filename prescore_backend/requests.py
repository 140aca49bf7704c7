"""Per-request prescore controls, carried by vLLM's ``vllm_xargs`` extension field.

A request may send ``"vllm_xargs": {"prescore_keep_ratio": 0.25}`` (completions and chat) or
``SamplingParams(extra_args={...})`` offline. Controls:

* ``prescore_keep_ratio`` (float in (0, 1]): this request's decode budget as a fraction of
  its context; ``prescore_max_tokens`` (int > 0): an absolute budget in tokens instead.
* ``prescore_method`` (a scorer name): the scorer for the KV blocks this request fills.
  Blocks it got from the prefix cache keep the scores of the request that computed them
  (scores live with the shared blocks); this is the documented limit of the control.
* ``prescore_dense`` (bool): decode this request with exact attention.

Unknown ``prescore_*`` keys and invalid values are refused at admission (HTTP 400) through a
logits-processor plugin (vLLM's supported seam for per-request parameters): its
``validate_params`` runs in the API server before any work starts, and its ``update_state``
runs in the worker before each step, keeping :data:`ROWS` (persistent-batch row -> controls)
in step with vLLM's batch, after vLLM's decode-first reordering and before the attention
metadata is built. The processor never changes logits.
"""

from __future__ import annotations

import math
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


def _keep_ratio(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0 < v <= 1:
        raise ValueError(f"prescore_keep_ratio must be a number in (0, 1], got {v!r}")
    return float(v)


def _max_tokens(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"prescore_max_tokens must be a positive integer, got {v!r}")
    return v


def _method(v: Any) -> str:
    from prescore_backend.scoring import available_scorers

    if v not in available_scorers():
        raise ValueError(f"prescore_method must be one of {', '.join(available_scorers())}; "
                         f"got {v!r}")
    return v


def _dense(v: Any) -> bool:
    if not isinstance(v, bool) and v not in (0, 1):
        raise ValueError(f"prescore_dense must be true or false, got {v!r}")
    return bool(v)


_PARSERS = {"keep_ratio": _keep_ratio, "max_tokens": _max_tokens, "method": _method,
            "dense": _dense}


def parse_controls(extra_args: dict[str, Any] | None) -> RequestControls | None:
    """The prescore controls in ``extra_args``; None when there are none. Raises ValueError."""
    if not extra_args:
        return None
    found: dict[str, Any] = {}
    for key, value in extra_args.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name not in _PARSERS:
            raise ValueError(f"unknown prescore control {key!r}; valid: "
                             f"{', '.join(PREFIX + n for n in _PARSERS)}")
        found[name] = _PARSERS[name](value)
    return RequestControls(**found) if found else None


class RowControls:
    """Controls of the rows of vLLM's persistent batch in this worker process."""

    def __init__(self) -> None:
        self.rows: dict[int, RequestControls] = {}

    def clear(self) -> None:
        self.rows.clear()

    def get(self, row: int) -> RequestControls | None:
        return self.rows.get(row)


#: The worker's row table, written by the logits-processor plugin, read by the builder.
ROWS = RowControls()


def _processor_class():
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    class PrescoreRequestControls(LogitsProcessor):
        """Admission checks and row bookkeeping for prescore controls (logits unchanged)."""

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            parse_controls(getattr(sampling_params, "extra_args", None))

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
            ROWS.clear()

        def is_argmax_invariant(self) -> bool:
            return True

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            return logits

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
