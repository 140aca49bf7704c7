"""Fused CPU upkeep of side data for new keys (C++: ``csrc/side.h``): per-tile data of decode
tokens (:func:`cpu_record_bounds`) and the PQ codes of every key written (:func:`cpu_record_codes`).

Each decode step writes one key per sequence; the tile it lands in must get its Quest key
bounds widened (or reset when the key starts the tile) and its pre-score marked "unscored"
(-inf) when the key starts a new tile; every new key gets its PQ codes. In torch those are
a dozen small ops per layer and step; here each is one pass over the new keys. Tensors in,
tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpu_ext import extension as _ext

__all__ = ["cpu_record_bounds", "cpu_record_codes"]


def cpu_record_bounds(keys: Tensor, block: Tensor, tile: Tensor, reset: Tensor, scores: Tensor,
                      kmin: Tensor | None, kmax: Tensor | None) -> None:
    """In place: for each new key ``keys[i]`` ``[Nk, Hkv, D]`` in (block[i], tile[i]): if
    ``reset[i]`` (it starts the tile) the tile's score becomes -inf and its bounds the key;
    otherwise the bounds widen to include it. scores ``[num_blocks, Hkv, tpb]`` fp32 and
    kmin/kmax ``[num_blocks, Hkv, tpb, D]`` (or None) must be contiguous. Keys are rounded to
    the bounds' dtype first, as the torch path does."""
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    empty = torch.empty(0)
    _ext().record_bounds_cpu(keys, block.long(), tile.long(), reset.bool(), scores,
                             kmin if kmin is not None else empty,
                             kmax if kmax is not None else empty)


def cpu_record_codes(keys: Tensor, block: Tensor, offset: Tensor, codes: Tensor, dims: Tensor,
                     weights: Tensor, centroids_t: Tensor, norms: Tensor) -> None:
    """In place: ``codes[block[i], h, offset[i], j]`` = the nearest weighted centroid of key i's
    subspace j (``prescore_backend.pq.pq_encode``'s rule) for keys ``[N, Hkv, D]``; codes
    ``[NB, Hkv, B, m]`` uint8; dims ``[m, d]``; weights ``[Hkv, m, d]``, centroids_t
    ``[Hkv * m, d, C]`` and norms ``[Hkv * m, 1, C]`` fp32 (the codebook's encoder constants)."""
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    _ext().record_codes_cpu(keys, block.long(), offset.long(), codes, dims.long(),
                            weights.float().contiguous(), centroids_t.float().contiguous(),
                            norms.float().contiguous())
