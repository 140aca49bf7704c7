"""Score: query-independent key pre-scorers (arXiv 2505.11040), registered by name, and
their aggregation per tile (:mod:`.tiles`).

>>> scorer = get_scorer("kmeans", num_clusters=64)
>>> scores = scorer.score(keys)  # keys [Hkv, n, D] -> scores [Hkv, n] fp32, higher = keep
>>> tiles = aggregate_tiles(scores, tile_size=16)  # -> [Hkv, ceil(n / 16)]
"""

from .base import SCORERS, Scorer, available_scorers, get_scorer, register_scorer
from .kmeans import KernelKMeansScorer, KMeansScorer, KMedianScorer
from .leverage import KeyNormScorer, LeverageScorer
from .random import RandomScorer
from .recency import RecencyScorer
from .tiles import AGGREGATORS, aggregate_tiles, register_aggregator

__all__ = [
    "AGGREGATORS",
    "SCORERS",
    "aggregate_tiles",
    "register_aggregator",
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
