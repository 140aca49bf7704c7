"""Angular LSH for decode-time HyperAttention (arXiv 2310.05869).

HyperAttention's sortLSH hashes queries and keys with r random Gaussian directions (sign bits),
sorts both by bucket and attends exactly inside aligned blocks of the sorted order. At decode
there is one query per head, so the faithful analog is: hash the query, attend to the key
tiles that hold at least one key of the same bucket. For that we only need bucket *equality*,
so bucket ids here are plain binary codes; the authors' Gray-code ordering only matters for
sorting and is not reproduced.

Per tile we store the *set* of buckets its keys fall in as a bitmask of 2^r bits packed into
``num_words(r)`` int64 words (bit b of the bucket set lives in word b // 64, bit b % 64;
bit 63 is the sign bit of int64, which is fine: masks are only ever AND-ed and compared to 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["AngularLSH", "num_words", "bucket_masks", "masks_intersect"]


class AngularLSH:
    """r-bit sign-random-projection hash, deterministic from ``seed``.

    ``proj`` is a ``[D, r]`` fp32 Gaussian matrix drawn on CPU from a local generator (so the
    same seed gives the same hash on every device), then moved to ``device``.
    """

    def __init__(self, num_bits: int, head_dim: int, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        if not 1 <= num_bits <= 16:
            raise ValueError(f"num_bits must be in [1, 16], got {num_bits}")
        self.num_bits = num_bits
        self.head_dim = head_dim
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(head_dim, num_bits, generator=gen, dtype=torch.float32)  # [D, r]
        self.proj = proj.to(device) if device is not None else proj
        self._powers = (2 ** torch.arange(num_bits, dtype=torch.int64)).to(self.proj.device)  # [r]

    @property
    def device(self) -> torch.device:
        return self.proj.device

    def to(self, device: torch.device | str) -> "AngularLSH":
        """Move the projection to ``device`` (in place); returns self."""
        self.proj = self.proj.to(device)
        self._powers = self._powers.to(device)
        return self

    def hash(self, x: Tensor) -> Tensor:
        """Bucket ids of ``x``: ``[..., D]`` (any float dtype) -> ``[...]`` int64 in [0, 2^r)."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"last dim {x.shape[-1]} != head_dim {self.head_dim}")
        proj = self.proj if self.proj.device == x.device else self.proj.to(x.device)
        powers = self._powers if self._powers.device == x.device else self._powers.to(x.device)
        bits = (x.float() @ proj) > 0  # [..., r]; x = 0 hashes to bucket 0
        return (bits.long() * powers).sum(-1)  # [...]


def num_words(num_bits: int) -> int:
    """Number of int64 words of a 2^r-bit bucket set: ceil(2^r / 64)."""
    return max(1, math.ceil((1 << num_bits) / 64))


def bucket_masks(buckets: Tensor, num_bits: int, valid: Tensor | None = None) -> Tensor:
    """OR-reduce one-hot bucket bits over the last dim.

    buckets ``[..., n]`` int64 in [0, 2^r) -> masks ``[..., W]`` int64, W = num_words(r).
    Tiles: pass keys' buckets reshaped ``[..., ntiles, T]`` -> ``[..., ntiles, W]``.
    GQA query group: ``[R, Hkv, G]`` -> ``[R, Hkv, W]``.
    ``valid`` (bool, same shape as ``buckets``, optional): entries that are False set no bit
    (e.g. the padding positions of a partial last tile).
    """
    nw = num_words(num_bits)
    nbits = nw * 64
    idx = buckets.long()
    if valid is not None:
        idx = torch.where(valid, idx, torch.full_like(idx, nbits))  # send to a spill slot
    hit = torch.zeros(*idx.shape[:-1], nbits + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(-1, idx, True)  # every write is True: deterministic with duplicates
    hit = hit[..., :nbits].reshape(*idx.shape[:-1], nw, 64)  # [..., W, 64]
    weights = torch.bitwise_left_shift(
        torch.ones(64, dtype=torch.int64, device=idx.device),
        torch.arange(64, dtype=torch.int64, device=idx.device))  # bit 63 -> -2^63
    # Distinct powers of two never carry, and -2^63 + (sum of the others) stays in range,
    # so the integer sum equals the bitwise OR.
    return (hit.long() * weights).sum(-1)  # [..., W]


def masks_intersect(a: Tensor, b: Tensor) -> Tensor:
    """Whether two bucket sets share a bucket: ``[..., W]`` & ``[..., W]`` (broadcast) -> bool ``[...]``."""
    return (torch.bitwise_and(a, b) != 0).any(-1)
