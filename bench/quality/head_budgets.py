"""Probe: per-(layer, KV head) decode budgets from a calibration profile (Ada-KV / PyramidKV
style). Not in the backend: on SmolLM2-135M the split was worth under a point of perplexity
(docs/results/selection-probes.md); the eval's ``heads:<method>`` variants use it.

One keep ratio for every layer and KV head spends the same bytes on a head whose attention sits
in a few tiles as on one that spreads it over the whole context. A *budget profile* records,
per (layer, KV head), how much true attention mass the best tiles hold as a function of the
fraction of tiles kept (the oracle's curve, averaged over calibration queries). For a context
of ``n`` tiles and a uniform budget ``b`` (what ``keep_ratio`` gives), :meth:`BudgetProfile.budgets`
hands the same total ``L * Hkv * b`` tiles to the (layer, head) pairs whose next tile adds the
most mass (greedy on concave curves, which is optimal for their sum), every pair keeping at
least the forced sinks + window. Bytes read per step stay at the configured ratio.

Departures from the papers: Ada-KV (Feng et al., 2407.11550) splits one layer's budget across
its heads from the current query's attention, PyramidKV (Cai et al., 2406.02069) fixes a
per-layer pyramid; both evict at prefill. Here the split is across layers *and* heads, fitted
once offline on a calibration text (no attention weights exist on the sparse decode path to
adapt it per step), and nothing is evicted: the budget only bounds what each decode step reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BudgetProfile", "ProfileAccumulator"]


@dataclass(frozen=True, eq=False)
class BudgetProfile:
    """curves ``[L, Hkv, K + 1]`` float64: mean attention mass (of the KV head's group, in
    [0, 1]) held by the best ``round(j / K * n)`` tiles of an ``n``-tile context, j = 0..K."""

    curves: Tensor
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return self.curves.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.curves.shape[1]

    def save(self, path: str | Path) -> None:
        torch.save({"curves": self.curves, "meta": self.meta}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "BudgetProfile":
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        curves = d["curves"].double()
        if curves.dim() != 3 or curves.shape[2] < 2:
            raise ValueError(f"{path}: curves must be [layers, kv_heads, K + 1], got "
                             f"{tuple(curves.shape)}")
        return cls(curves, d.get("meta", {}))

    def mass_at(self, num_tiles: int) -> Tensor:
        """``[L, Hkv, n + 1]``: the curves at k = 0..n tiles of an n-tile context."""
        K = self.curves.shape[2] - 1
        x = torch.arange(num_tiles + 1, dtype=torch.float64) * (K / max(num_tiles, 1))
        lo = x.floor().long().clamp_max(K - 1)
        w = x - lo
        c = self.curves
        return c[..., lo] * (1 - w) + c[..., lo + 1] * w

    @functools.lru_cache(maxsize=4096)
    def budgets(self, budget: int, num_tiles: int, floor: int) -> Tensor:
        """``[L, Hkv]`` int64 tiles per (layer, KV head) summing to ``L * Hkv * budget``
        (``budget`` >= ``floor``, the forced sinks + window), each in [min(floor, n), n]."""
        L, H = self.layers, self.kv_heads
        n = num_tiles
        f = min(floor, n)
        if budget >= n or budget <= f:
            return torch.full((L, H), min(budget, n), dtype=torch.int64)
        m = self.mass_at(n)
        gains = (m[..., f + 1:] - m[..., f:-1]).reshape(-1)  # [L * H * (n - f)], k = f..n-1
        extra = L * H * (budget - f)
        top = gains.topk(extra).indices  # concave curves: each pair's picks are a prefix
        counts = torch.bincount(top // (n - f), minlength=L * H).view(L, H)
        return f + counts


class ProfileAccumulator:
    """Builds a :class:`BudgetProfile` from exact attention on calibration queries."""

    def __init__(self, layers: int, kv_heads: int, tile_size: int, grid: int = 256, *,
                 sink_tiles: int = 0, window_tiles: int = 0) -> None:
        self.T, self.K = tile_size, grid
        self.sink, self.window = sink_tiles, window_tiles
        self.sum = torch.zeros(layers, kv_heads, grid + 1, dtype=torch.float64)
        self.count = torch.zeros(layers, dtype=torch.int64)

    def add(self, layer: int, q: Tensor, k: Tensor, pos: Tensor, scale: float) -> None:
        """q ``[Hq, Nq, D]`` queries at positions pos ``[Nq]``; k ``[Hkv, n, D]`` the keys
        (causal: query i sees keys 0..pos[i])."""
        hkv, n, d = k.shape
        g, nq = q.shape[0] // hkv, q.shape[1]
        logits = torch.matmul(q.float().view(hkv, g * nq, d), k.float().transpose(1, 2))
        logits = logits.view(hkv, g, nq, n) * scale
        logits.masked_fill_(torch.arange(n) > pos.view(1, 1, nq, 1), float("-inf"))
        probs = torch.softmax(logits, -1)
        M = -(-n // self.T)
        probs = torch.nn.functional.pad(probs, (0, M * self.T - n))
        mass = probs.view(hkv, g, nq, M, self.T).sum((1, 4)).double() / g  # [Hkv, Nq, M]
        tiles = (pos + self.T) // self.T  # [Nq] valid tiles per query
        # The selection's order: the forced sinks and window first, then the best other tiles
        # (a perfect ranking): the curve's gains past the forced count are what extra tiles add.
        idx = torch.arange(M).view(1, M)
        forced = (idx < self.sink) | ((idx >= tiles.view(-1, 1) - self.window)
                                      & (idx < tiles.view(-1, 1)))  # [Nq, M]
        order = (mass + 2.0 * forced).argsort(-1, descending=True)
        cum = torch.cat([torch.zeros(hkv, nq, 1, dtype=torch.float64),
                         mass.gather(-1, order).cumsum(-1)], -1)  # [Hkv, Nq, M + 1]
        x = torch.arange(self.K + 1, dtype=torch.float64).view(1, -1) / self.K * tiles.view(-1, 1)
        lo = x.floor().long().clamp_max(M - 1)  # [Nq, K + 1]
        w = x - lo
        at = (cum.gather(-1, lo.expand(hkv, -1, -1)) * (1 - w)
              + cum.gather(-1, (lo + 1).expand(hkv, -1, -1)) * w)  # [Hkv, Nq, K + 1]
        self.sum[layer] += at.sum(1)
        self.count[layer] += nq

    def profile(self, **meta) -> BudgetProfile:
        if bool((self.count == 0).any()):
            raise ValueError("every layer needs calibration queries")
        return BudgetProfile(self.sum / self.count.view(-1, 1, 1).double(), dict(meta))
