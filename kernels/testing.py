"""Helpers for tests and benchmarks: paged KV caches in vLLM's layouts and dense oracles.

Not used on the serving path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layouts import LAYOUTS, amx_pack, amx_unpack_blocks

__all__ = ["PagedCase", "make_paged_case", "cache_views", "dense_attention", "all_tiles"]


@dataclass
class PagedCase:
    """A batch of decode rows over a paged cache.

    query ``[R, Hq, D]``; cache: the per-layer cache in one of the layouts of
    :mod:`~prescore_backend.kernels.layouts` (vLLM CPU ``[num_blocks, Hkv, B, 2D]`` with K
    transposed per block, the same with K row-major, or GPU ``[num_blocks, 2, B, Hkv, D]``);
    key_cache / value_cache: ``[num_blocks, Hkv, B, D]`` views of it (for "cpu_amx", the packed
    regions: pass ``kv_layout=case.kv_layout`` to the kernels); block_tables
    ``[R, max_blocks]`` int32 (shuffled physical blocks, unused entries 0); seq_lens ``[R]``
    int32; keys / values: per row the contiguous ``[Hkv, n_r, D]`` sequence that was written.
    """

    query: Tensor
    cache: Tensor
    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    keys: list[Tensor]
    values: list[Tensor]
    block_size: int
    kv_layout: str = "strided"

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[1]

    def strided(self) -> tuple[Tensor, Tensor, Tensor]:
        """(key_cache, value_cache, block_tables) as strided views, for code that reads only
        those (the oracle): unpacked copies of the referenced blocks for "amx"."""
        if self.kv_layout == "strided":
            return self.key_cache, self.value_cache, self.block_tables
        return amx_unpack_blocks(self.key_cache, self.value_cache, self.block_tables)


def cache_views(cache: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """K and V ``[num_blocks, Hkv, B, D]`` views of a per-layer cache in ``layout`` (see
    :data:`~prescore_backend.kernels.layouts.LAYOUTS`: "cpu", "cpu_amx", "cpu_rowmajor", "gpu")."""
    return LAYOUTS[layout][1](cache)


def make_paged_case(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int,
                    block_size: int, *, layout: str = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0, extra_blocks: int = 2, poison: float | None = float("nan"),
                    keys: list[Tensor] | None = None, device: str | torch.device = "cpu") -> PagedCase:
    """Random queries/keys/values written into a shuffled paged cache.

    Physical blocks are a random permutation (plus ``extra_blocks`` unused ones); every cache
    slot that no sequence covers (tails of partial blocks, unused blocks) holds ``poison``
    (NaN by default) so a kernel that reads past seq_len is caught. ``keys`` overrides the
    random keys (list of ``[Hkv, n_r, D]``).
    """
    gen = torch.Generator().manual_seed(seed)
    R, Hkv, D, B = len(seq_lens), num_kv_heads, head_dim, block_size
    nblk = [-(-n // B) for n in seq_lens]
    total = sum(nblk) + extra_blocks
    shape = LAYOUTS[layout][0](total, Hkv, B, D)
    fill = 0.0 if poison is None else poison
    cache = torch.full(shape, fill, dtype=dtype)
    amx = LAYOUTS[layout][2] == "amx"
    if amx:  # written plain into scratch K/V, packed at the end
        kc, vc = (torch.full((total, Hkv, B, D), fill, dtype=dtype) for _ in range(2))
    else:
        kc, vc = cache_views(cache, layout)
    perm = torch.randperm(total, generator=gen)
    max_blocks = max(nblk) + 1
    bt = torch.zeros(R, max_blocks, dtype=torch.int32)
    ks, vs = [], []
    start = 0
    for r, n in enumerate(seq_lens):
        blocks = perm[start : start + nblk[r]]
        start += nblk[r]
        bt[r, : nblk[r]] = blocks.to(torch.int32)
        k = keys[r].to(dtype) if keys is not None else torch.randn(Hkv, n, D, generator=gen).to(dtype)
        v = torch.randn(Hkv, n, D, generator=gen).to(dtype)
        ks.append(k)
        vs.append(v)
        pad = nblk[r] * B - n
        for src, dst in ((k, kc), (v, vc)):
            full = torch.cat([src, torch.full((Hkv, pad, D), fill, dtype=dtype)], 1)  # [Hkv, nb*B, D]
            dst[blocks] = full.view(Hkv, nblk[r], B, D).transpose(0, 1)  # writes through the view
    if amx:
        kraw, vraw = cache_views(cache, layout)
        kraw.copy_(amx_pack(kc, vc)[0])
        vraw.copy_(amx_pack(kc, vc)[1])
    q = torch.randn(R, Hkv * group, D, generator=gen).to(dtype)
    cache = cache.to(device)
    kc, vc = cache_views(cache, layout)
    dev = cache.device
    return PagedCase(query=q.to(dev), cache=cache, key_cache=kc,
                     value_cache=vc, block_tables=bt.to(dev),
                     seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                     keys=ks, values=vs, block_size=B, kv_layout=LAYOUTS[layout][2])


def dense_attention(query: Tensor, keys: Tensor, values: Tensor, scale: float,
                    dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Plain softmax attention of one row: query ``[Hq, D]``, keys/values ``[Hkv, n, D]`` ->
    (out ``[Hq, D]``, lse ``[Hq]``) in ``dtype``; query head h uses KV head h // G."""
    Hq, Hkv = query.shape[0], keys.shape[0]
    k = keys.to(dtype).repeat_interleave(Hq // Hkv, 0)  # [Hq, n, D]
    v = values.to(dtype).repeat_interleave(Hq // Hkv, 0)
    logits = scale * torch.einsum("hd,hnd->hn", query.to(dtype), k)  # [Hq, n]
    return torch.einsum("hn,hnd->hd", torch.softmax(logits, -1), v), torch.logsumexp(logits, -1)


def all_tiles(seq_lens: Tensor, num_kv_heads: int, tile_size: int) -> Tensor:
    """Every valid tile of every row: ``[R]`` -> ``[R, Hkv, max_tiles]`` int32, -1 padded."""
    nt = (seq_lens.long() + tile_size - 1) // tile_size  # [R]
    M = int(nt.max()) if len(nt) else 0
    idx = torch.arange(M, device=seq_lens.device)
    t = torch.where(idx < nt.unsqueeze(-1), idx, -1)  # [R, M]
    return t.unsqueeze(1).expand(-1, num_kv_heads, -1).to(torch.int32).contiguous()
