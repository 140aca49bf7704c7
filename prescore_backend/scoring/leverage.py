"""Leverage-score scorers (LevAttention, arXiv 2410.05462; used as a pre-score in 2505.11040).

For f(x) = |x|^p with p = 2, every attention entry >= eps lies in a universal set of keys whose
leverage score is >= eps, |U| <= d / eps, independent of n and of the queries. The ridge
leverage of key k_j in K = [k_1 .. k_n]^T is tau_j = k_j^T (K^T K + lambda I)^-1 k_j
(sum_j tau_j <= rank <= d).

The pre-scoring authors' code scored keys by what it called "lev", which is in fact the squared
key norm (a random orthogonal projection does not change norms): offered honestly as
``key_norm``; ``leverage`` is the true ridge leverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Scorer, register_scorer

__all__ = ["LeverageScorer", "KeyNormScorer", "ridge_leverage", "sketched_leverage"]


def _ridge_cholesky(gram: Tensor, ridge: float) -> Tensor:
    """Cholesky factor of gram + lambda I, lambda = ridge * trace / D (scale-free): ``[H, D, D]``.

    Factored in float64 (D x D, cheap) so that fp32 rounding of large Grams cannot make the
    ridge-regularized matrix indefinite. A Gram that still does not factor (non-finite keys,
    seen with positions past a model's trained length) must not take the engine down: its
    factor becomes sqrt(lambda') I with lambda' = trace / D (or 1), which turns the score into
    the scaled squared key norm for that head - a documented fallback, not an exact leverage.
    """
    D = gram.shape[-1]
    g = gram.double()
    eye = torch.eye(D, dtype=g.dtype, device=g.device)
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)  # [H]
    lam = ridge * trace / D + 1e-30
    L, info = torch.linalg.cholesky_ex(g + lam.view(-1, 1, 1) * eye)
    bad = info != 0  # [H]
    if bool(bad.any()):
        scale = torch.where(torch.isfinite(trace) & (trace > 0), trace / D,
                            torch.ones_like(trace))
        L = torch.where(bad.view(-1, 1, 1), scale.sqrt().view(-1, 1, 1) * eye,
                        torch.nan_to_num(L))
    return L.to(gram.dtype)


def ridge_leverage(keys: Tensor, ridge: float = 1e-3) -> Tensor:
    """Exact ridge leverage in fp32: keys ``[H, n, D]`` -> ``[H, n]``. Cost O(n D^2)."""
    k = keys.float()
    L = _ridge_cholesky(torch.bmm(k.transpose(1, 2), k), ridge)  # [H, D, D]
    z = torch.linalg.solve_triangular(L, k.transpose(1, 2), upper=False)  # [H, D, n] = L^-1 k_j
    return (z * z).sum(1)


def sketched_leverage(keys: Tensor, ridge: float, sketch_rows: int, jl_dim: int | None,
                      gen: torch.Generator) -> Tensor:
    """Approximate ridge leverage: keys ``[H, n, D]`` -> ``[H, n]``.

    Two classic sketches (Drineas et al., "Fast approximation of matrix coherence", 2012):
    a CountSketch S (each key added with a random sign into one of ``sketch_rows`` rows, O(nD))
    gives K^T S^T S K ~ K^T K; a Gaussian JL map Pi ``[D, jl_dim]`` then approximates
    ||L^-1 k_j||^2 by ||Pi^T L^-1 k_j||^2, so scoring costs O(n D jl_dim) instead of O(n D^2).
    ``jl_dim=None`` skips the JL step (exact whitening with the sketched Gram): the JL noise,
    relative ~sqrt(2 / jl_dim), can swamp the spread of leverage scores of near-isotropic keys.
    """
    k = keys.float()
    H, n, D = k.shape
    m = max(D, min(sketch_rows, n))
    gdev = gen.device
    rows = torch.randint(m, (H, n), generator=gen, device=gdev).to(k.device)  # [H, n]
    signs = (torch.randint(2, (H, n, 1), generator=gen, device=gdev).to(k.device) * 2 - 1).to(k.dtype)
    sk = torch.zeros(H, m, D, dtype=k.dtype, device=k.device).scatter_add_(
        1, rows.unsqueeze(-1).expand(H, n, D), k * signs)  # [H, m, D]
    L = _ridge_cholesky(torch.bmm(sk.transpose(1, 2), sk), ridge)  # [H, D, D]
    if jl_dim is None:
        z = torch.linalg.solve_triangular(L, k.transpose(1, 2), upper=False)  # [H, D, n]
        return (z * z).sum(1)
    pi = torch.randn(H, D, jl_dim, generator=gen, device=gdev).to(k.device) / jl_dim ** 0.5
    w = torch.linalg.solve_triangular(L.transpose(1, 2), pi, upper=True)  # [H, D, p] = L^-T Pi
    z = torch.bmm(k, w)  # [H, n, p]
    return (z * z).sum(-1)


@register_scorer("leverage")
@dataclass
class LeverageScorer(Scorer):
    """True ridge leverage scores (2410.05462), exact (Cholesky, fp32) or sketched.

    ``ridge``: lambda relative to the mean eigenvalue of K^T K (trace / D), so the score does not
    depend on the key scale. ``method``: "exact", "sketch", or "auto" (sketch when
    n > ``sketch_threshold``). Exact costs O(n D^2) and is cheap at D = 64, so "auto" only
    sketches very long sequences.
    """

    ridge: float = 1e-3
    method: str = "auto"
    sketch_threshold: int = 65536
    sketch_rows: int = 4096
    jl_dim: int | None = None

    def score(self, keys: Tensor) -> Tensor:
        method = self.method
        if method == "auto":
            method = "sketch" if keys.shape[1] > self.sketch_threshold else "exact"
        if method == "exact":
            return ridge_leverage(keys, self.ridge)
        if method == "sketch":
            return sketched_leverage(keys, self.ridge, self.sketch_rows, self.jl_dim,
                                     self.generator(keys.device))
        raise ValueError(f"unknown leverage method {self.method!r}; valid: auto, exact, sketch")

    def score_prefixes(self, keys: Tensor, start: int, ends: list[int],
                       grain: int | None = None) -> Tensor:
        """Streaming exact ridge leverage (the two-pass form LevAttention notes for streams).

        Gram matrices are accumulated segment by segment from position 0 in a fixed order, so
        the score of a segment does not depend on how the sequence was chunked; each segment
        is whitened by its own prefix Gram (one D x D Cholesky per segment) and divided by the
        prefix's mean leverage trace((G + lambda I)^-1 G) / e. Cost O(n D^2 + segments D^3).
        Sketching is not used here: prefixes in serving stay far below sketch_threshold.
        ``grain``: the Gram of ``[0, start)`` is summed in pieces of this many keys (the KV block
        size in the backend), so the summation order is the same whatever ``start`` is.
        """
        k = keys.float()
        H, _, D = k.shape
        head = list(range(0, start, grain or start)) if start > 0 else []
        bounds = [*head, start, *ends] if start > 0 else [0, *ends]
        # Per-segment Grams from 0, accumulated in order: [nseg_all, H, D, D].
        grams = torch.stack([torch.bmm(k[:, a:b].transpose(1, 2), k[:, a:b])
                             for a, b in zip(bounds[:-1], bounds[1:])])
        cum = grams.cumsum(0)[-len(ends):]  # [S, H, D, D] prefix Grams at each end
        L = _ridge_cholesky(cum.reshape(-1, D, D), self.ridge).view(len(ends), H, D, D)
        eye = torch.eye(D, dtype=k.dtype, device=k.device).expand(H, D, D)
        out, prev = [], start
        for i, e in enumerate(ends):
            z = torch.linalg.solve_triangular(L[i], k[:, prev:e].transpose(1, 2), upper=False)
            tau = (z * z).sum(1)  # [H, e - prev]
            # trace((G + lam I)^-1 G) = ||L^-1 K^T||_F^2 = sum of the prefix's leverages.
            linv = torch.linalg.solve_triangular(L[i], eye, upper=False)  # [H, D, D]
            total = (linv @ cum[i] * linv).sum((-2, -1))  # [H]
            out.append(tau * (e / total.clamp_min(1e-30)).unsqueeze(-1))
            prev = e
        return torch.cat(out, dim=-1)


@register_scorer("key_norm")
@dataclass
class KeyNormScorer(Scorer):
    """Squared key norm ||k_j||^2: what the pre-scoring authors' code called "lev" (2505.11040)."""

    def score(self, keys: Tensor) -> Tensor:
        k = keys.float()
        return (k * k).sum(-1)
