"""Fused CPU upkeep of per-tile side data for decode tokens (C++: ``csrc/side.h``).

Each decode step writes one key per sequence; the tile it lands in must get its Quest key
bounds widened (or reset when the key starts the tile) and its pre-score marked "unscored"
(-inf) when the key starts a new tile. In torch that is ~12 small indexing ops per layer
(~0.25 ms at batch 1, as much as the sparse read at 4k context); here it is one pass over the
new keys. Tensors in, tensors out; nothing here imports vLLM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpu_ext import extension as _ext

__all__ = ["cpu_record_bounds"]


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
