"""Product-quantized key codes: the estimator behind ``query_aware="pq"``.

PQCache (Zhang et al., arXiv 2407.12820) estimates q.k at decode from product-quantized key
codes. Here, per layer and KV head, the head dim is split into ``m`` subspaces of ``D / m``
channels with 256 centroids each, so every cached key carries ``m`` uint8 codes (``m`` bytes
per token and KV head: 1/64 of a bf16 K+V at m=4, D=64) and a tile is ranked by the largest
estimate over its tokens. Departures from the paper, and why:

* the codebooks are fitted **once per model** on a calibration text (``prescore-models
  calibrate``), not per request at prefill: a key's code is then a function of the key alone,
  so prefix caching, chunked prefill and preemption give the same codes, and nothing is
  fitted while serving;
* the estimate is made for the GQA group's **summed** query (one lookup table per KV head,
  not one per query head): on the calibration text it ranked tiles as well as the max over
  the group's heads, for 1/G of the lookups;
* PQCache retrieves tokens; prescore ranks 16-token tiles (max over the tile) and keeps its
  sinks and recent window forced, as for the other estimators.

Shapes: ``Hkv`` KV heads, ``D`` head dim, ``m`` subspaces, ``C`` centroids (256),
``d = D / m``; codebook ``[Hkv, m, C, d]`` fp32; codes ``[..., Hkv, m]`` uint8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

__all__ = ["CENTROIDS", "PQCodebooks", "codebook_path", "fit_codebook", "pq_encode",
           "pq_tile_rank"]

CENTROIDS = 256  # one uint8 code per subspace


def fit_codebook(keys: Tensor, subspaces: int, *, centroids: int = CENTROIDS, iters: int = 16,
                 seed: int = 0) -> Tensor:
    """k-means per (KV head, subspace): keys ``[Hkv, n, D]`` -> codebook ``[Hkv, m, C, d]``.

    Lloyd iterations from ``centroids`` distinct keys drawn at random (n >= C); an empty
    cluster keeps its previous centroid."""
    hkv, n, dim = keys.shape
    if dim % subspaces:
        raise ValueError(f"pq subspaces {subspaces} must divide the head dim {dim}")
    if n < centroids:
        raise ValueError(f"{n} calibration keys are fewer than {centroids} centroids")
    d = dim // subspaces
    x = keys.float().reshape(hkv, n, subspaces, d).permute(0, 2, 1, 3).reshape(-1, n, d)
    g = torch.Generator().manual_seed(seed)
    h = x.shape[0]
    init = torch.stack([torch.randperm(n, generator=g)[:centroids] for _ in range(h)])
    c = torch.gather(x, 1, init.unsqueeze(-1).expand(h, centroids, d)).clone()
    ones = torch.ones(h, n)
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(-1)  # [h, n]
        s = torch.zeros(h, centroids, d).scatter_add_(1, a.unsqueeze(-1).expand(h, n, d), x)
        cnt = torch.zeros(h, centroids).scatter_add_(1, a, ones).unsqueeze(-1)
        c = torch.where(cnt > 0, s / cnt.clamp_min(1), c)
    return c.view(hkv, subspaces, centroids, d)


def pq_encode(keys: Tensor, codebook: Tensor) -> Tensor:
    """Nearest centroid per subspace: keys ``[N, Hkv, D]`` -> codes ``[N, Hkv, m]`` uint8."""
    n, hkv, dim = keys.shape
    m, c, d = codebook.shape[1:]
    sub = keys.float().reshape(n, hkv, m, d).permute(1, 2, 0, 3)  # [Hkv, m, N, d]
    return torch.cdist(sub, codebook).argmin(-1).permute(2, 0, 1).to(torch.uint8)


def pq_tile_rank(q: Tensor, codes: Tensor, bt: Tensor, codebook: Tensor,
                 tile_size: int) -> Tensor:
    """Estimated max of q.k per tile: ``[Rs, Hkv, M]`` fp32, M = MB * B / T (plain torch).

    q ``[Rs, Hq, D]``; codes ``[NB, Hkv, B, m]`` uint8 (per token, beside the KV cache); bt
    ``[Rs, MB]`` int64; codebook ``[Hkv, m, C, d]``. The group's summed query against each
    subspace's centroids gives a lookup table ``[Rs, Hkv, m, C]``; a token's estimate is the
    sum of its m entries. Tokens past a row's length hold stale codes: callers rank only full
    tiles outside the window."""
    rs, hq, dim = q.shape
    hkv, m, c, d = codebook.shape
    qs = q.float().view(rs, hkv, hq // hkv, m, d).sum(2)  # [Rs, Hkv, m, d]
    lut = torch.einsum("rhmd,hmcd->rhmc", qs, codebook.float())  # [Rs, Hkv, m, C]
    cd = codes[bt].permute(0, 2, 1, 3, 4).reshape(rs, hkv, -1, m).long()  # [Rs, Hkv, N, m]
    est = torch.gather(lut, 3, cd.transpose(2, 3)).sum(2)  # [Rs, Hkv, N]
    return est.view(rs, hkv, -1, tile_size).amax(-1)


def codebook_path(model_dir: str | Path, subspaces: int) -> Path:
    """Where ``prescore-models calibrate`` writes a model's codebooks."""
    return Path(model_dir) / f"prescore_pq{subspaces}.pt"


@dataclass
class PQCodebooks:
    """One codebook per attention layer: centroids ``[L, Hkv, m, C, d]`` fp32, and how they
    were fitted (``meta``: calibration text, tokens, seed)."""

    centroids: Tensor
    meta: dict

    @property
    def subspaces(self) -> int:
        return self.centroids.shape[2]

    def layer(self, i: int) -> Tensor:
        return self.centroids[i]

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".partial")
        torch.save({"centroids": self.centroids.contiguous(), "meta": json.dumps(self.meta)}, tmp)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> "PQCodebooks":
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(blob["centroids"].float(), json.loads(blob["meta"]))

    def check(self, num_layers: int, num_kv_heads: int, head_dim: int, where: str) -> None:
        """Raise ValueError unless the codebooks fit this model's attention shapes."""
        L, hkv, m, _, d = self.centroids.shape
        if (L, hkv, m * d) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(
                f"{where}: codebooks for {L} layers x {hkv} KV heads x head dim {m * d}, but "
                f"the model has {num_layers} x {num_kv_heads} x {head_dim}; run "
                "`prescore-models calibrate` for this model")

    @classmethod
    def fit(cls, layer_keys: Callable[[Callable[[int, Tensor], None]], None], num_layers: int,
            subspaces: int, *, seed: int = 0, meta: dict | None = None,
            progress: Callable[[int], None] | None = None) -> "PQCodebooks":
        """Fit from ``layer_keys(on_keys)``, which calls ``on_keys(layer, keys [Hkv, n, D])``
        once per layer (e.g. a reference forward over the calibration text)."""
        books: list[Tensor | None] = [None] * num_layers

        def on_keys(i: int, k: Tensor) -> None:
            books[i] = fit_codebook(k, subspaces, seed=seed + i)
            if progress is not None:
                progress(i)

        layer_keys(on_keys)
        if any(b is None for b in books):
            raise ValueError("the calibration forward did not visit every layer")
        return cls(torch.stack(books), dict(meta or {}, subspaces=subspaces, seed=seed))


def resolve_codebooks(cfg, model_dir: str | Path | None) -> tuple["PQCodebooks | None", object, str]:
    """The codebooks a serving process uses under ``cfg`` (a PrescoreConfig), once at start.

    Returns (codebooks or None, the config to serve with, a log line or ""). Only for
    ``query_aware="pq"``: ``cfg.pq_codebook`` names the file (missing: ValueError naming the
    setting); unset, the model directory's ``prescore_pq<m>.pt`` is used, and where the model
    has none the config falls back to ``query_aware="quest"`` with a warning line."""
    if not cfg.uses_codes:
        return None, cfg, ""
    if cfg.pq_codebook:
        path = Path(cfg.pq_codebook)
        if not path.is_file():
            raise ValueError(f"prescore pq_codebook={cfg.pq_codebook!r} (PRESCORE_PQ_CODEBOOK / "
                             "--prescore-pq-codebook): no such file; write one with "
                             "`prescore-models calibrate MODEL`")
    else:
        path = codebook_path(model_dir, cfg.pq_subspaces) if model_dir else None
        if path is None or not path.is_file():
            return None, cfg.replace(query_aware="quest"), (
                f"prescore: query_aware='pq' needs PQ codebooks and {model_dir} has no "
                f"prescore_pq{cfg.pq_subspaces}.pt; ranking with 'quest' instead (run "
                "`prescore-models calibrate MODEL` or set pq_codebook)")
    books = PQCodebooks.load(path)
    if books.subspaces != cfg.pq_subspaces:
        raise ValueError(f"prescore: {path} has {books.subspaces} subspaces but pq_subspaces="
                         f"{cfg.pq_subspaces} (PRESCORE_PQ_SUBSPACES / --prescore-pq-subspaces)")
    return books, cfg, f"prescore: PQ codebooks from {path}"
