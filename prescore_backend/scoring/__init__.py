"""Query-independent key pre-scorers (arXiv 2505.11040), registered by name.

>>> scorer = get_scorer("kmeans", num_clusters=64)
>>> scores = scorer.score(keys)  # keys [Hkv, n, D] -> scores [Hkv, n] fp32, higher = keep
"""

from .base import SCORERS, Scorer, available_scorers, get_scorer, register_scorer
from .kmeans import KernelKMeansScorer, KMeansScorer, KMedianScorer
from .leverage import KeyNormScorer, LeverageScorer
from .random import RandomScorer
from .recency import RecencyScorer

__all__ = [
    "SCORERS",
    "Scorer",
    "available_scorers",
    "get_scorer",
    "register_scorer",
    "KMeansScorer",
    "KernelKMeansScorer",
    "KMedianScorer",
    "LeverageScorer",
    "KeyNormScorer",
    "RandomScorer",
    "RecencyScorer",
]
