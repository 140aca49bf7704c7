"""A low-bit copy of K and V beside the paged cache, and attention over tiles read from it.

Two precision tiers (``low_tier_bits > 0``): the best tiles of a decode step are attended
exactly, the next ones in the same ranking from this copy, and the two parts are merged by
log-sum-exp into one softmax (:func:`~.sparse_decode.merge_attn_states`). At equal bytes a
3-bit token costs ~0.21 of a bf16 one, so the same budget covers several times the tokens.

Quantization follows KIVI (Liu et al., arXiv 2402.02750): K per (block, KV head, channel) over
the block's tokens (keys have outlier channels), V per (block, KV head, token) over its
channels; round to nearest, ``bits`` levels, min and step in fp16. Departures, and why: KIVI
keeps the newest tokens in full precision and quantizes groups as they fill; here a copy is
written once per full KV block (the same rule as the pre-scores and the 4-bit key copy, so
prefix caching and preemption give the same copy), and the recent window is always read
exactly anyway. Mixing exact and low-bit tokens by importance is MiKV's idea (Yang et al.,
arXiv 2402.18096); the importance here is the per-step query-aware ranking.

Layout (bit planes, so any ``bits`` in 1..8 packs exactly ``bits`` bits per value and a plane's
byte widens to 8 consecutive values):

* ``kc [NB, Hkv, D, bits, B/8]`` uint8: per channel and plane, byte j bit i = that plane's bit
  of token 8j + i; ``kz [NB, Hkv, 2, D]`` fp16: each channel's (min, step) in the block.
* ``vc [NB, Hkv, B, bits, D/8]`` uint8: per token and plane, byte j bit i = that plane's bit
  of channel 8j + i; ``vz [NB, Hkv, B, 2]`` fp16: each token's (min, step).

A code c stands for min + c * step. Tensors in, tensors out: nothing here imports vLLM.
Shapes: ``R`` rows, ``Hq``/``Hkv`` query/KV heads, ``G`` = Hq / Hkv, ``D`` head dim, ``B`` block
size, ``T`` tile size, ``S`` selected tiles per (row, KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dispatch import resolve
from .sparse_decode import merge_attn_states, sparse_decode

__all__ = ["LowBitCopy", "bytes_per_token", "pack_k", "pack_v", "unpack_k", "unpack_v",
           "lowbit_decode", "lowbit_decode_ref", "two_tier_decode"]

_MIN_STEP = 1e-6  # a constant channel / token: any step decodes it to its min


def bytes_per_token(bits: int, head_dim: int, block_size: int) -> float:
    """Bytes one token of the copy costs per KV head: K and V codes, V's per-token (min,
    step), K's per-block (min, step) per channel spread over the block's tokens."""
    return 2 * bits * head_dim / 8 + 2 * 2 + 2 * 2 * head_dim / block_size


def _quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes ``uint8`` (x's shape), min and step (fp16, ``dim`` kept as size 1) over ``dim``."""
    levels = (1 << bits) - 1
    lo = x.amin(dim, keepdim=True).half()
    step = ((x.amax(dim, keepdim=True) - lo.float()) / levels).clamp_min(_MIN_STEP).half()
    c = ((x - lo.float()) / step.float()).round_().clamp_(0, levels).to(torch.uint8)
    return c, lo, step


def _pack_planes(codes: Tensor, bits: int) -> Tensor:
    """codes ``[..., n]`` uint8 (n % 8 == 0) -> ``[..., bits, n/8]`` uint8 bit planes."""
    c = codes.view(*codes.shape[:-1], 1, codes.shape[-1] // 8, 8)
    planes = (c >> torch.arange(bits, device=codes.device, dtype=torch.uint8).view(-1, 1, 1)) & 1
    return (planes << torch.arange(8, device=codes.device, dtype=torch.uint8)).sum(
        -1, dtype=torch.uint8)


def _unpack_planes(packed: Tensor) -> Tensor:
    """``[..., bits, n/8]`` uint8 bit planes -> codes ``[..., n]`` as fp32."""
    bits = packed.shape[-2]
    b = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    w = (1 << torch.arange(bits, device=packed.device)).view(-1, 1, 1).float()
    return (b.float() * w).sum(-3).flatten(-2)


def pack_k(keys: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """keys ``[nblk, Hkv, B, D]`` (full blocks) -> (kc ``[nblk, Hkv, D, bits, B/8]`` uint8, kz
    ``[nblk, Hkv, 2, D]`` fp16), quantized per (block, head, channel)."""
    c, lo, step = _quantize(keys.float(), bits, dim=2)  # lo, step [nblk, Hkv, 1, D]
    return _pack_planes(c.transpose(2, 3), bits), torch.cat([lo, step], 2)


def pack_v(values: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """values ``[nblk, Hkv, B, D]`` -> (vc ``[nblk, Hkv, B, bits, D/8]`` uint8, vz
    ``[nblk, Hkv, B, 2]`` fp16), quantized per (block, head, token)."""
    c, lo, step = _quantize(values.float(), bits, dim=3)  # lo, step [nblk, Hkv, B, 1]
    return _pack_planes(c, bits), torch.cat([lo, step], 3)


def unpack_k(kc: Tensor, kz: Tensor) -> Tensor:
    """The dequantized keys of :func:`pack_k`: -> ``[nblk, Hkv, B, D]`` fp32."""
    c = _unpack_planes(kc)  # [nblk, Hkv, D, B]
    return (kz[:, :, 0:1].float().transpose(2, 3) + c * kz[:, :, 1:2].float().transpose(2, 3)
            ).transpose(2, 3)


def unpack_v(vc: Tensor, vz: Tensor) -> Tensor:
    """The dequantized values of :func:`pack_v`: -> ``[nblk, Hkv, B, D]`` fp32."""
    return vz[..., 0:1].float() + _unpack_planes(vc) * vz[..., 1:2].float()


@dataclass
class LowBitCopy:
    """The copy of one layer, one entry per physical KV block (see the module doc)."""

    kc: Tensor  # [NB, Hkv, D, bits, B/8] uint8
    kz: Tensor  # [NB, Hkv, 2, D] fp16
    vc: Tensor  # [NB, Hkv, B, bits, D/8] uint8
    vz: Tensor  # [NB, Hkv, B, 2] fp16

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 bits: int, device: torch.device | str = "cpu") -> "LowBitCopy":
        if block_size % 8 or head_dim % 8 or not 1 <= bits <= 8:
            raise ValueError(f"low-bit copy needs block size and head dim multiples of 8 and "
                             f"1..8 bits, got {block_size}, {head_dim}, {bits}")
        nb, h = num_blocks, num_kv_heads
        u8 = dict(dtype=torch.uint8, device=device)
        return cls(torch.zeros(nb, h, head_dim, bits, block_size // 8, **u8),
                   torch.zeros(nb, h, 2, head_dim, dtype=torch.float16, device=device),
                   torch.zeros(nb, h, block_size, bits, head_dim // 8, **u8),
                   torch.zeros(nb, h, block_size, 2, dtype=torch.float16, device=device))

    def write(self, blocks: Tensor, keys: Tensor, values: Tensor) -> None:
        """The copy of full blocks: physical ids ``[nblk]`` int64, their keys and values
        ``[nblk, Hkv, B, D]``."""
        bits = self.kc.shape[3]
        self.kc[blocks], self.kz[blocks] = pack_k(keys, bits)
        self.vc[blocks], self.vz[blocks] = pack_v(values, bits)

    def slice(self, start: int, n: int) -> "LowBitCopy":
        return LowBitCopy(*(t[start:start + n] for t in (self.kc, self.kz, self.vc, self.vz)))

    def tensors(self) -> tuple[Tensor, ...]:
        return self.kc, self.kz, self.vc, self.vz


def _gather_tiles(copy: LowBitCopy, block_tables: Tensor, tiles: Tensor,
                  tile_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dequantized K and V of the selected tiles, ``[R, Hkv, S, T, D]`` fp32 each, and each
    token's position ``[R, Hkv, S, T]`` int64 (-1 for padding tiles)."""
    T = tile_size
    nb, hkv, d, bits, b8 = copy.kc.shape
    B = 8 * b8
    tpb = B // T
    t = tiles.long()
    tc = t.clamp_min(0)
    blk = block_tables.long().gather(1, (tc // tpb).flatten(1)).view(t.shape)  # [R, Hkv, S]
    j = tc % tpb
    h = torch.arange(hkv, device=t.device).view(1, -1, 1)
    # K: [NB, Hkv, D, bits, tpb, T/8] -> [NB, Hkv, tpb, D, bits, T/8], one tile per index
    kc = copy.kc.view(nb, hkv, d, bits, tpb, T // 8).permute(0, 1, 4, 2, 3, 5)[blk, h, j]
    kz = copy.kz[blk, h].float()  # [R, Hkv, S, 2, D]
    k = kz[..., 0:1, :] + _unpack_planes(kc).transpose(-1, -2) * kz[..., 1:2, :]
    vc = copy.vc.view(nb, hkv, tpb, T, bits, d // 8)[blk, h, j]  # [R, Hkv, S, T, bits, D/8]
    vz = copy.vz.view(nb, hkv, tpb, T, 2)[blk, h, j].float()  # [R, Hkv, S, T, 2]
    v = vz[..., 0:1] + _unpack_planes(vc) * vz[..., 1:2]
    pos = torch.where(t.unsqueeze(-1) >= 0,
                      t.unsqueeze(-1) * T + torch.arange(T, device=t.device), -1)
    return k, v, pos


def _lowbit_torch(query: Tensor, copy: LowBitCopy, block_tables: Tensor, seq_lens: Tensor,
                  tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Plain torch: gathers and dequantizes only the selected tiles."""
    R, hq, d = query.shape
    hkv = tiles.shape[1]
    g = hq // hkv
    if tiles.shape[-1] == 0:
        return (torch.zeros(R, hq, d, device=query.device),
                torch.full((R, hq), float("-inf"), device=query.device))
    k, v, pos = _gather_tiles(copy, block_tables, tiles, tile_size)
    n = pos.shape[2] * pos.shape[3]
    k, v, pos = k.reshape(R, hkv, n, d), v.reshape(R, hkv, n, d), pos.reshape(R, hkv, 1, n)
    q = query.float().view(R, hkv, g, d) * scale
    logits = torch.matmul(q, k.transpose(-1, -2))  # [R, Hkv, G, n]
    ok = (pos >= 0) & (pos < seq_lens.view(R, 1, 1, 1).long())
    logits = logits.masked_fill(~ok, float("-inf"))
    lse = logits.logsumexp(-1)  # [R, Hkv, G]
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    out = torch.matmul(p, v)  # [R, Hkv, G, D]
    return out.view(R, hq, d), lse.view(R, hq)


def _lowbit_cpp(query: Tensor, copy: LowBitCopy, block_tables: Tensor, seq_lens: Tensor,
                tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    from .cpu_ext import extension

    if query.shape[1] > 8 * copy.kc.shape[1]:  # the C++ loop keeps GQA groups of 1 to 8
        return _lowbit_torch(query, copy, block_tables, seq_lens, tiles, tile_size, scale)
    o, lse = extension().lowbit_decode_cpu(query, *copy.tensors(), block_tables, seq_lens,
                                           tiles, int(tile_size), float(scale))
    return o, lse


def _lowbit_triton(query: Tensor, copy: LowBitCopy, block_tables: Tensor, seq_lens: Tensor,
                   tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    from .triton_lowbit import triton_lowbit_decode  # lazy: triton is optional

    return triton_lowbit_decode(query, *copy.tensors(), block_tables, seq_lens, tiles,
                                tile_size, scale)


_IMPLS = {"torch": _lowbit_torch, "cpp": _lowbit_cpp, "triton": _lowbit_triton}


def lowbit_decode(query: Tensor, copy: LowBitCopy, block_tables: Tensor, seq_lens: Tensor,
                  tiles: Tensor, tile_size: int, scale: float, *,
                  impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax attention of each decode query over tiles read from the low-bit copy.

    query ``[R, Hq, D]``; block_tables ``[R, MB]`` int; seq_lens ``[R]``; tiles ``[R, Hkv, S]``
    int32 logical tile ids (-1 pad) of full blocks. Returns out ``[R, Hq, D]`` fp32 and lse
    ``[R, Hq]`` fp32 (natural log of the softmax denominator over those tokens; -inf and out 0
    where none), ready for :func:`~.sparse_decode.merge_attn_states`. ``impl``: "cpp" (one
    C++ task per (row, KV head): the block's K scales folded into the query, codes widened 8
    at a time from their bit planes, online softmax; ``csrc/lowbit.h``), "torch", "triton"
    (one kernel launch reading the planes through the block table, :mod:`.triton_lowbit`) or
    "auto" (:mod:`.dispatch`)."""
    _, fn = resolve("lowbit_decode", impl, query, _IMPLS)
    return fn(query, copy, block_tables, seq_lens, tiles, tile_size, scale)


def lowbit_decode_ref(query: Tensor, copy: LowBitCopy, block_tables: Tensor, seq_lens: Tensor,
                      tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Oracle of :func:`lowbit_decode`: a loop over rows, KV heads and the selected tiles'
    tokens, each token's codes read bit by bit from its plane bytes (K: byte pos // 8 of each
    channel's plane, bit pos % 8; V: byte c // 8 of the token's plane, bit c % 8), dequantized
    and attended in float64."""
    R, hq, d = query.shape
    hkv = tiles.shape[1]
    g = hq // hkv
    bits = copy.kc.shape[3]
    B = 8 * copy.kc.shape[4]
    kc, kz, vc, vz = (t.cpu() for t in copy.tensors())
    ch = torch.arange(d)
    w = (1 << torch.arange(bits)).view(-1, 1)  # [bits, 1] each plane's weight
    out = torch.zeros(R, hq, d, dtype=torch.float64)
    lse = torch.full((R, hq), float("-inf"), dtype=torch.float64)
    for r in range(R):
        n = int(seq_lens[r])
        for h in range(hkv):
            ks, vs = [], []
            for t in tiles[r, h].tolist():
                for pos in range(int(t) * tile_size, (int(t) + 1) * tile_size):
                    if t < 0 or pos >= n:
                        continue
                    blk, off = int(block_tables[r, pos // B]), pos % B
                    kb = (kc[blk, h, :, :, off // 8].long() >> (off % 8)) & 1  # [D, bits]
                    kcode = (kb * w.view(1, -1)).sum(1).double()
                    ks.append(kz[blk, h, 0].double() + kcode * kz[blk, h, 1].double())
                    vb = (vc[blk, h, off][:, ch // 8].long() >> (ch % 8)) & 1  # [bits, D]
                    vcode = (vb * w).sum(0).double()
                    vs.append(vz[blk, h, off, 0].double() + vcode * vz[blk, h, off, 1].double())
            if not ks:
                continue
            k, v = torch.stack(ks), torch.stack(vs)  # [n_sel, D]
            for gi in range(g):
                lg = k @ (query[r, h * g + gi].double().cpu() * scale)
                lse[r, h * g + gi] = torch.logsumexp(lg, 0)
                out[r, h * g + gi] = torch.softmax(lg, 0) @ v
    return out.float(), lse.float()


def two_tier_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, copy: LowBitCopy,
                    block_tables: Tensor, seq_lens: Tensor, exact_tiles: Tensor,
                    low_tiles: Tensor, tile_size: int, scale: float, *,
                    kv_layout: str = "strided", impl: str = "auto",
                    copy_block_tables: Tensor | None = None) -> Tensor:
    """One softmax over exact tiles (read from the cache, :func:`~.sparse_decode.sparse_decode`)
    and low-bit tiles (from ``copy``, :func:`lowbit_decode`), disjoint: -> out ``[R, Hq, D]``
    fp32. block_tables ``[R, MB]`` int32 (of the cache, and of the copy unless
    ``copy_block_tables`` is given: the copy indexed apart from the cache); other arguments as
    the two calls'."""
    o1, lse1 = sparse_decode(query, key_cache, value_cache, block_tables, seq_lens, exact_tiles,
                             tile_size, scale, impl=impl, kv_layout=kv_layout)
    cbt = block_tables if copy_block_tables is None else copy_block_tables
    o2, lse2 = lowbit_decode(query, copy, cbt, seq_lens, low_tiles, tile_size, scale, impl=impl)
    o, _ = merge_attn_states(o1.float(), lse1, o2, lse2)
    return o
