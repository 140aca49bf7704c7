"""Scorer base class and registry (kvpress style: one small dataclass per method).

A scorer maps the keys of one sequence, per KV head, to one query-independent importance score
per key (arXiv 2505.11040, pre-scoring): ``keys [Hkv, n, D]`` (any float dtype, computed in fp32)
-> ``scores [Hkv, n]`` float32, higher = keep. Randomness comes only from a local
``torch.Generator`` seeded with ``seed``: same inputs and seed, same scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, TypeVar

import torch
from torch import Tensor

__all__ = ["Scorer", "SCORERS", "register_scorer", "get_scorer", "available_scorers"]

SCORERS: dict[str, type["Scorer"]] = {}

_S = TypeVar("_S", bound=type["Scorer"])


def register_scorer(name: str) -> Callable[[_S], _S]:
    """Class decorator: register a :class:`Scorer` subclass under ``name``."""

    def deco(cls: _S) -> _S:
        if name in SCORERS and SCORERS[name] is not cls:
            raise ValueError(f"scorer {name!r} already registered by {SCORERS[name].__name__}")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return deco


def available_scorers() -> list[str]:
    """Registered scorer names, sorted."""
    return sorted(SCORERS)


def get_scorer(name: str, **kwargs: object) -> "Scorer":
    """Instantiate the scorer registered as ``name`` with ``kwargs`` (its dataclass fields)."""
    try:
        cls = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(available_scorers())}") from None
    return cls(**kwargs)


@dataclass
class Scorer:
    """Base class: override :meth:`score` only."""

    seed: int = 0
    name: ClassVar[str] = ""

    def score(self, keys: Tensor) -> Tensor:
        """keys ``[Hkv, n, D]`` -> scores ``[Hkv, n]`` float32, higher = keep."""
        raise NotImplementedError

    def __call__(self, keys: Tensor) -> Tensor:
        return self.score(keys)

    def score_prefixes(self, keys: Tensor, start: int, ends: list[int],
                       grain: int | None = None) -> Tensor:
        """Score consecutive segments, each with a fit on the whole prefix up to its end.

        keys ``[Hkv, n, D]``, ``start < ends[0] < ... <= n`` -> ``[Hkv, ends[-1] - start]``:
        segment ``[e_{i-1}, e_i)`` (``e_{-1} = start``) is scored by ``score(keys[:, :e_i])``
        and divided by that fit's mean score, so segments fitted at different lengths compare
        (scores are positive for every registered scorer). The backend calls this once per
        full KV block, making a block's scores a function of its prefix alone (what prefix
        caching and preemption need). Subclasses may override it with a faster equivalent
        (``grain`` is a hint for them: the granularity of ``ends``).
        """
        out, prev = [], start
        for e in ends:
            full = self.score(keys[:, :e])  # [Hkv, e]
            mean = full.mean(-1, keepdim=True).abs().clamp_min(1e-30)
            out.append(full[:, prev:e] / mean)
            prev = e
        return torch.cat(out, dim=-1)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator seeded with ``seed`` (never the global RNG)."""
        return torch.Generator(device=device).manual_seed(self.seed)
