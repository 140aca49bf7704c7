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
* a subspace holds whole **rotary pairs** (channels i and i + D/2, rotated together by RoPE's
  rotate-half convention) of neighbouring frequencies, not D/m consecutive channels, and the
  k-means distance weighs each channel by the calibration queries' RMS on it (the error of
  q.k is sum_i q_i (k_i - c_i), so channels the queries load heavily need finer centroids);
  both raised the attention mass the ranking recalls (docs/results/selection-recall.md);
* the estimate is made for the GQA group's **summed** query (one lookup table per KV head,
  not one per query head): it ranked tiles as well as the max over the group's heads, for
  1/G of the lookups;
* PQCache retrieves tokens; prescore ranks 16-token tiles (max over the tile) and keeps its
  sinks and recent window forced, as for the other estimators.

Shapes: ``Hkv`` KV heads, ``D`` head dim, ``m`` subspaces, ``C`` centroids (256),
``d = D / m``; a :class:`LayerCodebook` per layer; codes ``[..., Hkv, m]`` uint8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

__all__ = ["CENTROIDS", "LayerCodebook", "PQCodebooks", "codebook_path", "fit_codebook",
           "kmeans", "pq_encode", "pq_tile_rank", "rotary_pair_dims"]

CENTROIDS = 256  # one uint8 code per subspace


def rotary_pair_dims(head_dim: int, subspaces: int) -> Tensor:
    """Channels of each subspace ``[m, D / m]`` int64: subspace j holds the rotary pairs
    (p, p + D/2) for p in [j * D / 2m, (j + 1) * D / 2m). Needs 2m to divide D."""
    half, per = head_dim // 2, head_dim // (2 * subspaces)
    if head_dim % (2 * subspaces):
        raise ValueError(f"pq subspaces {subspaces}: 2 x subspaces must divide the head dim "
                         f"{head_dim}")
    p = torch.arange(subspaces * per).view(subspaces, per)
    return torch.cat([p, p + half], 1)


@dataclass
class LayerCodebook:
    """One layer's codebook: centroids ``[Hkv, m, C, d]`` fp32 in key units, the channels of
    each subspace ``dims [m, d]`` int64, and the per-channel weights of the encoding distance
    ``weights [Hkv, D]`` fp32."""

    centroids: Tensor
    dims: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        # [Hkv, m, d, C]: what the C++ pick reads (one contiguous pass per channel)
        self.centroids_t = self.centroids.transpose(-1, -2).contiguous()
        # The encoder's constants (pq_encode): weights per subspace [Hkv, m, d], weighted
        # centroids transposed [Hkv * m, d, C] and their squared norms [Hkv * m, 1, C].
        hkv, m, c, d = self.centroids.shape
        self.enc_w = self.weights[:, self.dims]
        wc = self.centroids * self.enc_w.unsqueeze(2)  # [Hkv, m, C, d]
        self.enc_ct = wc.transpose(-1, -2).reshape(hkv * m, d, c).contiguous()
        self.enc_cn = (wc * wc).sum(-1).view(hkv * m, 1, c)

    @property
    def subspaces(self) -> int:
        return self.centroids.shape[1]

    def to(self, device: torch.device | str) -> "LayerCodebook":
        """The same codebook on ``device``."""
        return LayerCodebook(self.centroids.to(device), self.dims.to(device),
                             self.weights.to(device))

    def heads(self, first: int, n: int) -> "LayerCodebook":
        """The codebook of KV heads [first, first + n) (a tensor-parallel rank's heads)."""
        return LayerCodebook(self.centroids[first:first + n], self.dims,
                             self.weights[first:first + n])


def kmeans(x: Tensor, centroids: int, *, iters: int, seed: int) -> Tensor:
    """Lloyd's k-means, one problem per leading index: x ``[h, n, d]`` -> ``[h, C, d]``.

    Starts from ``centroids`` distinct points drawn at random; an empty cluster keeps its
    previous centroid."""
    h, n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    init = torch.stack([torch.randperm(n, generator=g)[:centroids] for _ in range(h)])
    c = torch.gather(x, 1, init.unsqueeze(-1).expand(h, centroids, d)).clone()
    ones = torch.ones(h, n)
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(-1)  # [h, n]
        s = torch.zeros(h, centroids, d).scatter_add_(1, a.unsqueeze(-1).expand(h, n, d), x)
        cnt = torch.zeros(h, centroids).scatter_add_(1, a, ones).unsqueeze(-1)
        c = torch.where(cnt > 0, s / cnt.clamp_min(1), c)
    return c


def fit_codebook(keys: Tensor, subspaces: int, *, queries: Tensor | None = None,
                 centroids: int = CENTROIDS, iters: int = 16, seed: int = 0) -> LayerCodebook:
    """k-means per (KV head, subspace) on the calibration keys ``[Hkv, n, D]``.

    Subspaces are :func:`rotary_pair_dims`; with ``queries`` ``[Hkv, nq, D]`` (the GQA groups'
    summed calibration queries) each channel is weighted by the queries' RMS on it (unweighted
    without). Lloyd iterations from ``centroids`` distinct keys drawn at random (n >= C); an
    empty cluster keeps its previous centroid."""
    hkv, n, dim = keys.shape
    if n < centroids:
        raise ValueError(f"{n} calibration keys are fewer than {centroids} centroids")
    dims = rotary_pair_dims(dim, subspaces)
    d = dims.shape[1]
    w = (queries.float().pow(2).mean(1).sqrt().clamp_min(1e-6) if queries is not None
         else torch.ones(hkv, dim))  # [Hkv, D]
    xw = keys.float() * w.unsqueeze(1)
    x = xw[:, :, dims.flatten()].view(hkv, n, subspaces, d).permute(0, 2, 1, 3).reshape(-1, n, d)
    c = kmeans(x, centroids, iters=iters, seed=seed)
    ws = w[:, dims]  # [Hkv, m, d]
    return LayerCodebook(c.view(hkv, subspaces, centroids, d) / ws.unsqueeze(2), dims, w)


def pq_encode(keys: Tensor, book: LayerCodebook) -> Tensor:
    """Nearest centroid per subspace under the weighted distance: keys ``[N, Hkv, D]`` ->
    codes ``[N, Hkv, m]`` uint8."""
    hkv, m, _, d = book.centroids.shape
    n = keys.shape[0]
    sub = keys.float()[:, :, book.dims].permute(1, 2, 0, 3) * book.enc_w.unsqueeze(2)
    # argmin_c |x - c|^2 = argmin_c (|c|^2 - 2 x.c): one batched matmul, no square roots
    # (cheaper than torch.cdist)
    dist = torch.baddbmm(book.enc_cn, sub.reshape(hkv * m, n, d), book.enc_ct, alpha=-2)
    return dist.argmin(-1).view(hkv, m, n).permute(2, 0, 1).to(torch.uint8)


def pq_tile_rank(q: Tensor, codes: Tensor, bt: Tensor, book: LayerCodebook,
                 tile_size: int) -> Tensor:
    """Estimated max of q.k per tile: ``[Rs, Hkv, M]`` fp32, M = MB * B / T (plain torch).

    q ``[Rs, Hq, D]``; codes ``[NB, Hkv, B, m]`` uint8 (per token, beside the KV cache); bt
    ``[Rs, MB]`` int64. The group's summed query against each subspace's centroids gives a
    lookup table ``[Rs, Hkv, m, C]``; a token's estimate is the sum of its m entries. Tokens
    past a row's length hold stale codes: callers rank only full tiles outside the window."""
    rs, hq, dim = q.shape
    hkv, m = book.centroids.shape[:2]
    qs = q.float().view(rs, hkv, hq // hkv, dim).sum(2)[:, :, book.dims]  # [Rs, Hkv, m, d]
    lut = torch.einsum("rhmd,hmcd->rhmc", qs, book.centroids)  # [Rs, Hkv, m, C]
    cd = codes[bt].permute(0, 2, 1, 3, 4).reshape(rs, hkv, -1, m).long()  # [Rs, Hkv, N, m]
    est = torch.gather(lut, 3, cd.transpose(2, 3)).sum(2)  # [Rs, Hkv, N]
    return est.view(rs, hkv, -1, tile_size).amax(-1)


def codebook_path(model_dir: str | Path, subspaces: int) -> Path:
    """Where ``prescore-models calibrate`` writes a model's codebooks."""
    return Path(model_dir) / f"prescore_pq{subspaces}.pt"


@dataclass
class PQCodebooks:
    """One :class:`LayerCodebook` per attention layer, stacked: centroids ``[L, Hkv, m, C, d]``,
    weights ``[L, Hkv, D]``, dims ``[m, d]``; ``meta``: calibration text, tokens, seed."""

    centroids: Tensor
    weights: Tensor
    dims: Tensor
    meta: dict

    @property
    def subspaces(self) -> int:
        return self.centroids.shape[2]

    def layer(self, i: int) -> LayerCodebook:
        return LayerCodebook(self.centroids[i], self.dims, self.weights[i])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(".partial")
        torch.save({"centroids": self.centroids.contiguous(), "weights": self.weights.contiguous(),
                    "dims": self.dims.contiguous(), "meta": json.dumps(self.meta)}, tmp)
        tmp.rename(path)

    @classmethod
    def load(cls, path: str | Path) -> "PQCodebooks":
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(blob["centroids"].float(), blob["weights"].float(), blob["dims"].long(),
                   json.loads(blob["meta"]))

    def check(self, num_layers: int, num_kv_heads: int, head_dim: int, where: str) -> None:
        """Raise ValueError unless the codebooks fit this model's attention shapes (all its KV
        heads, not one tensor-parallel rank's)."""
        L, hkv, m, _, d = self.centroids.shape
        if (L, hkv, m * d) != (num_layers, num_kv_heads, head_dim):
            raise ValueError(
                f"{where}: codebooks for {L} layers x {hkv} KV heads x head dim {m * d}, but "
                f"the model has {num_layers} x {num_kv_heads} x {head_dim}; run "
                "`prescore-models calibrate` for this model")

    @classmethod
    def fit(cls, layer_kq: Callable[[Callable[[int, Tensor, Tensor], None]], None],
            num_layers: int, subspaces: int, *, seed: int = 0, meta: dict | None = None,
            progress: Callable[[int], None] | None = None) -> "PQCodebooks":
        """Fit from ``layer_kq(on_layer)``, which calls ``on_layer(layer, keys [Hkv, n, D],
        summed queries [Hkv, n, D])`` once per layer (a reference forward over the calibration
        text)."""
        books: list[LayerCodebook | None] = [None] * num_layers

        def on_layer(i: int, k: Tensor, q: Tensor) -> None:
            books[i] = fit_codebook(k, subspaces, queries=q, seed=seed + i)
            if progress is not None:
                progress(i)

        layer_kq(on_layer)
        if any(b is None for b in books):
            raise ValueError("the calibration forward did not visit every layer")
        return cls(torch.stack([b.centroids for b in books]),
                   torch.stack([b.weights for b in books]), books[0].dims,
                   dict(meta or {}, subspaces=subspaces, seed=seed))


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
