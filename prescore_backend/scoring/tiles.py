"""Score: per-key pre-scores -> per-tile scores (one registered aggregator per rule).

Keys are grouped in tiles of T tokens (T divides the KV block size); a tile's pre-score
(arXiv 2505.11040's key scores, aggregated) is what the selection ranks the tiles the
query-aware part did not pick by.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["AGGREGATORS", "aggregate_tiles", "register_aggregator"]

AGGREGATORS: dict[str, Callable[..., Tensor]] = {}


def register_aggregator(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn(tiled [..., ntiles, T], valid [..., ntiles, T], **kw) -> [..., ntiles]``."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        AGGREGATORS[name] = fn
        return fn

    return deco


@register_aggregator("max")
def _agg_max(tiled: Tensor, valid: Tensor, **_: object) -> Tensor:
    return tiled.masked_fill(~valid, float("-inf")).amax(-1)


@register_aggregator("sum")
def _agg_sum(tiled: Tensor, valid: Tensor, **_: object) -> Tensor:
    return tiled.masked_fill(~valid, 0.0).sum(-1)


@register_aggregator("mean")
def _agg_mean(tiled: Tensor, valid: Tensor, **_: object) -> Tensor:
    # Empty tiles (beyond valid_len) get -inf: they must never be preferred.
    cnt = valid.sum(-1)
    mean = tiled.masked_fill(~valid, 0.0).sum(-1) / cnt.clamp_min(1)
    return mean.masked_fill(cnt == 0, float("-inf"))


@register_aggregator("topk_count")
def _agg_topk_count(tiled: Tensor, valid: Tensor, *, k: int | None = None, **_: object) -> Tensor:
    """Number of the tile's keys that are in the global top-k keys of their head."""
    if k is None:
        raise ValueError("how='topk_count' needs k")
    flat = tiled.masked_fill(~valid, float("-inf")).flatten(-2)  # [..., ntiles*T]
    k = max(0, min(int(k), int(valid.sum(dim=(-2, -1)).min())))
    hit = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        hit.scatter_(-1, flat.topk(k, dim=-1).indices, True)
    return hit.view_as(tiled).sum(-1).float()


def aggregate_tiles(key_scores: Tensor, tile_size: int, how: str = "max",
                    valid_len: int | None = None, k: int | None = None) -> Tensor:
    """Per-key scores -> per-tile scores.

    key_scores ``[..., n]`` (e.g. ``[Hkv, n]``) -> ``[..., ceil(n / T)]`` float32. The partial last
    tile aggregates only its real keys; keys at positions >= ``valid_len`` are ignored (a tile
    with no valid key scores -inf for max/mean, 0 for sum/topk_count). ``how``: one of
    :data:`AGGREGATORS` ("max", "sum", "mean", "topk_count" with ``k`` = the global top-k size).
    """
    try:
        fn = AGGREGATORS[how]
    except KeyError:
        raise ValueError(f"unknown aggregation {how!r}; valid: {sorted(AGGREGATORS)}") from None
    n = key_scores.shape[-1]
    nt = -(-n // tile_size)
    pad = nt * tile_size - n
    x = torch.nn.functional.pad(key_scores.float(), (0, pad))  # [..., nt*T]
    limit = n if valid_len is None else min(n, int(valid_len))
    valid = torch.arange(nt * tile_size, device=x.device) < limit  # [nt*T]
    tiled = x.view(*x.shape[:-1], nt, tile_size)  # [..., nt, T]
    valid = valid.view(nt, tile_size).expand_as(tiled)
    return fn(tiled, valid, k=k)
