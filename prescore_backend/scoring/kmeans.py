"""Clustering scorers of the pre-scoring paper (arXiv 2505.11040): k-means, kernel k-means, k-median.

Score of a key = its distance to its own centroid divided by the summed distances of its
cluster: outliers, and keys of small clusters, score high. Under the paper's planted-subspace
model, k = d + 1 clusters recover the same heavy keys as leverage scores.

Departures from the authors' code (a fork of the HyperAttention repo), all deliberate:
  * Per-head clustering, batched over heads (bmm distances, scatter updates; no loop over
    heads). The authors pooled centroids across heads and refreshed them every 50 calls.
  * Cost control for the serving path (thousands of keys x KV heads x layers per prompt on a
    2-core CPU): k-means++ seeding runs on a random sample of ``init_sample`` keys per head,
    Lloyd on a sample of ``fit_sample`` keys (stopping early once no assignment changes), and
    a single pass then assigns and scores every key. The cluster count defaults to the
    authors' max(1, min(256, top_k // 4)); set ``num_clusters`` lower for cheaper scoring
    (``bench/kernels/bench_scorers.py`` measures the cost).
  * A singleton cluster gives 0/0 in the authors' formula; we smooth it,
    (d + eps) / (sum d + eps * |cluster|), so an isolated key scores 1 (the maximum), in line
    with "keys of small clusters score high".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Scorer, register_scorer

__all__ = ["KMeansScorer", "KernelKMeansScorer", "KMedianScorer", "kmeans_pp_init", "lloyd"]


def _sq_dists(x: Tensor, c: Tensor, xn: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances: x ``[H, n, D]``, c ``[H, C, D]`` -> ``[H, n, C]`` (>= 0).

    ||x||^2 - 2 x.c + ||c||^2 in one baddbmm (a broadcast (x - c)^2 is several times slower on CPU).
    """
    if xn is None:
        xn = (x * x).sum(-1, keepdim=True)  # [H, n, 1]
    cn = (c * c).sum(-1).unsqueeze(1)  # [H, 1, C]
    return torch.baddbmm(cn, x, c.transpose(1, 2), alpha=-2).add_(xn).clamp_min_(0)


def _sample_rows(x: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """A uniform sample of ``size`` keys per head (without replacement): ``[H, n, D]`` -> ``[H, size, D]``."""
    H, n, D = x.shape
    if n <= size:
        return x
    pick = torch.rand(H, n, generator=gen, device=gen.device).to(x.device).topk(size, -1).indices
    return x.gather(1, pick.unsqueeze(-1).expand(H, size, D))


def kmeans_pp_init(x: Tensor, num_clusters: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (D^2 sampling) per head: x ``[H, n, D]`` fp32 -> centres ``[H, C, D]``.

    The loop runs over the C seeding steps (inherent to k-means++), batched over heads; pass a
    sample of the keys to bound its cost.
    """
    H, n, D = x.shape
    dev = x.device
    heads = torch.arange(H, device=dev)
    xn = (x * x).sum(-1)  # [H, n]
    cent = torch.empty(H, num_clusters, D, dtype=x.dtype, device=dev)
    first = torch.randint(n, (H,), generator=gen, device=gen.device).to(dev)
    cent[:, 0] = x[heads, first]

    def d2_to(c: Tensor) -> Tensor:  # c [H, D] -> [H, n]
        return (xn - 2 * torch.bmm(x, c.unsqueeze(-1)).squeeze(-1) + (c * c).sum(-1, keepdim=True)).clamp_min_(0)

    mind = d2_to(cent[:, 0])  # [H, n] distance to the nearest chosen centre
    for c in range(1, num_clusters):
        # Inverse-CDF draw from D^2 weights (10x cheaper than torch.multinomial here);
        # all-zero rows (duplicates only) fall back to uniform.
        w = mind + (mind.sum(-1, keepdim=True) <= 0).to(mind.dtype)
        cdf = w.cumsum(-1)  # [H, n]
        u = torch.rand(H, 1, generator=gen, device=gen.device).to(dev) * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp_max_(n - 1)  # [H]
        cent[:, c] = x[heads, nxt]
        mind = torch.minimum(mind, d2_to(cent[:, c]))
    return cent


def lloyd(x: Tensor, cent: Tensor, iters: int, update: str = "mean") -> Tensor:
    """Lloyd iterations, batched over heads; stops early when assignments are stable.

    x ``[H, n, D]``, cent ``[H, C, D]`` -> centres ``[H, C, D]``. ``update``: "mean" (k-means)
    or "median" (coordinate-wise median, k-median). Empty clusters keep their centre.
    """
    H, n, D = x.shape
    C = cent.shape[1]
    xn = (x * x).sum(-1, keepdim=True)
    assign = _sq_dists(x, cent, xn).argmin(-1)  # [H, n]
    sorted_x = order = None
    for _ in range(iters):
        counts = torch.zeros(H, C, dtype=x.dtype, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype))  # [H, C]
        if update == "mean":
            sums = torch.zeros_like(cent).scatter_add_(1, assign.unsqueeze(-1).expand(H, n, D), x)
            new = sums / counts.clamp_min(1).unsqueeze(-1)
        else:
            if sorted_x is None:  # values sorted once per (head, dim); x never changes
                sorted_x, order = x.sort(dim=1)  # [H, n, D]
            new = _cluster_medians(sorted_x, order, assign, counts)
        cent = torch.where(counts.unsqueeze(-1) > 0, new, cent)
        new_assign = _sq_dists(x, cent, xn).argmin(-1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return cent


def _cluster_medians(sorted_x: Tensor, order: Tensor, assign: Tensor, counts: Tensor) -> Tensor:
    """Coordinate-wise (lower) median of each cluster, batched: -> ``[H, C, D]``.

    sorted_x/order ``[H, n, D]``: x sorted along n per (head, dim). A stable sort of the cluster
    ids in that order groups each cluster's values contiguously and still ascending.
    """
    H, n, D = sorted_x.shape
    cl = assign.gather(1, order.reshape(H, n * D)).view(H, n, D)  # cluster of each sorted value
    grp = cl.sort(dim=1, stable=True).indices  # [H, n, D]
    grouped = sorted_x.gather(1, grp)  # [H, n, D] cluster-major, ascending within cluster
    cnt = counts.long()
    starts = cnt.cumsum(-1) - cnt  # [H, C]
    mid = (starts + (cnt - 1).clamp_min(0) // 2).clamp_max(n - 1)  # [H, C]
    return grouped.gather(1, mid.unsqueeze(-1).expand(H, mid.shape[1], D))


def _cluster_normalise(dist: Tensor, assign: Tensor, num_clusters: int) -> Tensor:
    """dist ``[H, n]`` -> (dist + eps) / (cluster sum + eps * cluster size), ``[H, n]``."""
    H = dist.shape[0]
    eps = 1e-6 * dist.mean(-1, keepdim=True) + 1e-30  # relative smoothing
    sums = torch.zeros(H, num_clusters, dtype=dist.dtype, device=dist.device).scatter_add_(1, assign, dist)
    size = torch.zeros_like(sums).scatter_add_(1, assign, torch.ones_like(dist))
    return (dist + eps) / (sums.gather(1, assign) + eps * size.gather(1, assign))


@dataclass
class _ClusterScorer(Scorer):
    """Shared fields of the clustering scorers.

    Cost control (defaults): k-means++ seeding on ``init_sample`` keys per head, Lloyd on
    ``fit_sample`` keys per head, then one assignment pass over all keys gives the scores.
    The cost grows with ``num_clusters`` and ``iters`` (``bench/kernels/bench_scorers.py``
    measures it; docs/cpu-kernels.md); lower them for cheaper scoring.
    """

    num_clusters: int | None = None  # default: max(1, min(256, top_k // 4)), as the authors
    top_k: int = 1024  # key budget the cluster count is derived from (authors: 1024-4096)
    iters: int = 10
    init_sample: int = 1024
    fit_sample: int = 2048

    def clusters(self, n: int) -> int:
        c = self.num_clusters if self.num_clusters is not None else max(1, min(256, self.top_k // 4))
        return max(1, min(c, n))

    def _fit(self, keys: Tensor, update: str = "mean") -> tuple[Tensor, Tensor, int]:
        """keys ``[H, n, D]`` -> (squared distance to own centre ``[H, n]``, assign ``[H, n]``, C)."""
        x = keys.float()
        C = self.clusters(x.shape[1])
        gen = self.generator(x.device)
        fit = _sample_rows(x, max(self.fit_sample, C), gen)  # [H, nf, D]
        cent = kmeans_pp_init(_sample_rows(fit, max(self.init_sample, C), gen), C, gen)
        cent = lloyd(fit, cent, self.iters, update)
        d2 = _sq_dists(x, cent)  # [H, n, C]
        d2, assign = d2.min(-1)
        return d2, assign, C


@register_scorer("kmeans")
@dataclass
class KMeansScorer(_ClusterScorer):
    """k-means score (2505.11040): distance to own centroid / summed distances of the cluster.

    k-means++ seeding (on a sample), ``iters`` Lloyd iterations (default 10, as the authors).
    """

    def score(self, keys: Tensor) -> Tensor:
        d2, assign, C = self._fit(keys)  # [H, n]
        return _cluster_normalise(d2.sqrt(), assign, C)


@register_scorer("kernel_kmeans")
@dataclass
class KernelKMeansScorer(_ClusterScorer):
    """Kernel k-means score (2505.11040) with the Gaussian kernel exp(-d^2 / 2 sigma^2).

    sigma = ``sigma_scale`` (1.3, as the authors) * mean distance to own centroid, per head.
    Direction: the kernel *similarity* is high for typical keys near their centroid, so using it
    raw as "higher = keep" would keep cluster representatives and drop outliers, the opposite of
    the k-means score. We use the kernel-induced distance 1 - exp(-d^2 / 2 sigma^2) (monotone in d,
    bounded, so extreme outliers saturate instead of dominating) and normalise it per cluster like
    :class:`KMeansScorer`. Clusters come from the same input-space Lloyd iterations (as the
    authors' code; a full feature-space kernel k-means would cost O(n^2)).
    """

    sigma_scale: float = 1.3

    def score(self, keys: Tensor) -> Tensor:
        d2, assign, C = self._fit(keys)  # [H, n]
        sigma = self.sigma_scale * d2.sqrt().mean(-1, keepdim=True) + 1e-12  # [H, 1]
        kdist = 1.0 - torch.exp(-d2 / (2 * sigma * sigma))
        return _cluster_normalise(kdist, assign, C)


@register_scorer("kmedian")
@dataclass
class KMedianScorer(_ClusterScorer):
    """k-median score (2505.11040): coordinate-wise median centroids, 3 iterations (authors).

    Same score as k-means. Assignment and the score use Euclidean distance (batched matmul);
    a strict L1 k-median (L1 assignment, for which the coordinate-wise median is the optimal
    centre) would need an L1 cdist, which has no matmul form and is far slower on CPU.
    """

    iters: int = 3

    def score(self, keys: Tensor) -> Tensor:
        d2, assign, C = self._fit(keys, update="median")
        return _cluster_normalise(d2.sqrt(), assign, C)
