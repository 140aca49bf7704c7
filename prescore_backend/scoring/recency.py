"""Recency: a key's score is its position, so pre-score ranking keeps the most recent tiles."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Scorer, register_scorer

__all__ = ["RecencyScorer"]


@register_scorer("recency")
@dataclass
class RecencyScorer(Scorer):
    """Score = position in the sequence (StreamingLLM's rule, arXiv 2309.17453, as a
    pre-score). With a query-aware part, the budget left after sinks, window and the query's
    picks extends the recent window instead of going to query-independent importance."""

    def score(self, keys: Tensor) -> Tensor:
        H, n, _ = keys.shape
        return torch.arange(1, n + 1, dtype=torch.float32, device=keys.device).expand(H, n)

    def score_prefixes(self, keys: Tensor, start: int, ends: list[int],
                       grain: int | None = None) -> Tensor:
        """Absolute positions of ``[start, ends[-1])``, not normalized per fit (the base
        class divides each segment by its fit's mean, which would break the order across
        blocks): later blocks always rank higher."""
        H = keys.shape[0]
        pos = torch.arange(start + 1, ends[-1] + 1, dtype=torch.float32, device=keys.device)
        return pos.expand(H, -1).clone()
