"""Uniform random scores: the baseline every pre-scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Scorer, register_scorer

__all__ = ["RandomScorer"]


@register_scorer("random")
@dataclass
class RandomScorer(Scorer):
    """i.i.d. uniform scores from a generator seeded with ``seed`` (a random tile subset)."""

    def score(self, keys: Tensor) -> Tensor:
        H, n, _ = keys.shape
        gen = self.generator(keys.device)
        return torch.rand(H, n, generator=gen, device=gen.device).to(keys.device)
