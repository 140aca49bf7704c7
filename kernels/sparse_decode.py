"""Sparse paged decode attention over selected KV tiles, with a plain-torch oracle.

One decode query per row attends, per KV head, to the union of the tiles selected for that
(row, KV head); the softmax is exact over that union (unselected keys are *masked*, not zeroed:
the pre-scoring authors' code zeroed them, so each still added e^0 to the denominator).

Layouts are served by passing strided ``[num_blocks, Hkv, B, D]`` views (nothing is copied up
front; see :mod:`.layouts`):
  * vLLM CPU_ATTN: per (block, head) K stored transposed ``[D, B]`` then V row-major ``[B, D]``
    (:func:`~.layouts.vllm_cpu_kv_views`); the torch path gathers whole tiles for both.
  * K and V both row-major (:func:`~.layouts.rowmajor_cpu_kv_views`): same fast path.
  * vLLM CPU_ATTN "amx" ISA (bf16 on AMX CPUs): K and V packed in VNNI pairs, which no strided
    view expresses (:func:`~.layouts.vllm_cpu_amx_kv_views`): pass ``kv_layout="amx"``. The
    C++ kernel reads it in place (a 16-token K tile is one contiguous run there); the other
    paths unpack the batch's blocks first (:func:`~.layouts.amx_unpack_blocks`).
  * GPU (vLLM's Triton backend): the logical ``[num_blocks, Hkv, B, 2D]`` cache sliced into K
    and V (:func:`~.layouts.vllm_triton_kv_views`; generic gather on CPU tensors, the Triton
    kernel takes any strides).

A logical tile t of a row covers token positions [t*T, t*T + T); it lives in physical block
``block_tables[row, t*T // B]`` at in-block rows ``(t*T) % B ...``. T must divide B.

Implementations behind :func:`sparse_decode` (one table, ``_IMPLS``): ``"torch"`` (vectorized,
any device), ``"cpp"`` (fused C++ CPU kernel, :mod:`.cpu_sparse_decode`), ``"triton"`` (GPU
kernel in :mod:`.triton_sparse_decode`, also runs under ``TRITON_INTERPRET=1``), ``"ref"``
(:func:`sparse_decode_ref`, loops, float64); ``"auto"`` is resolved by :mod:`.dispatch`.

Extras: :func:`merge_attn_states` (log-sum-exp merge, HyperAttention 2310.05869), the
HyperAttention residual (uniformly sampled unselected tiles, weight n_u/m). A Top-theta /
SparQ-style mean-value term for the unselected keys was removed: even with their exact
mass it made perplexity worse (docs/results/selection-probes.md).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from .decode_inputs import check_decode_inputs
from .dispatch import resolve
from .layouts import KV_LAYOUTS, amx_unpack_blocks

__all__ = [
    "sparse_decode",
    "sparse_decode_ref",
    "merge_attn_states",
    "expand_kv_heads",
]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- helpers


def expand_kv_heads(x: Tensor, num_query_heads: int) -> Tensor:
    """Broadcast a per-KV-head tensor to query heads (query head h uses KV head h // G).

    ``[R, Hkv, ...]`` -> ``[R, Hq, ...]``; a tensor already ``[R, Hq, ...]`` is returned as is.
    """
    hkv = x.shape[1]
    if hkv == num_query_heads:
        return x
    if num_query_heads % hkv:
        raise ValueError(f"{num_query_heads} query heads is not a multiple of {hkv} KV heads")
    return x.repeat_interleave(num_query_heads // hkv, dim=1)


# ----------------------------------------------------------------------------- torch path


def _tile_view(cache: Tensor, tile_size: int) -> tuple[Tensor, int, int, int, bool] | None:
    """A flat view of whole tiles over the cache's storage, or None if the strides forbid.

    Two layouts gather whole tiles with one ``index_select`` (faster than advanced indexing
    over (block, head, row) index tensors; docs/cpu-kernels.md):
      * row-major tiles (token stride D, unit dim stride; V in vLLM's CPU cache): view
        ``[N, T, D]``, each tile one contiguous T*D chunk;
      * token-contiguous tiles (unit token stride, dim stride B'; K in vLLM's CPU cache, stored
        ``[D, B]`` per block): view ``[N, D, T]``, each tile D runs of T contiguous elements.
    Block and head strides must be multiples of the flat row pitch (T*D, resp. T). Tile j of
    (block b, head h) is row ``base + b*s0t + h*s1t + j`` of the view.
    Returns (view, base, s0t, s1t, token_contiguous).
    """
    D = cache.shape[-1]
    T = tile_size
    s0, s1, s2, s3 = cache.stride()
    n_el = cache.untyped_storage().nbytes() // cache.element_size()
    off = cache.storage_offset()
    if s2 == D and (s3 == 1 or D == 1):
        pitch, size, stride, tc = T * D, (T, D), (D, 1), False
        span = T * D
    elif s2 == 1 and s3 >= T:
        pitch, size, stride, tc = T, (D, T), (s3, 1), True
        span = (D - 1) * s3 + T  # elements touched by one tile
    else:
        return None
    if s0 % pitch or s1 % pitch:
        return None
    rem = off % pitch
    ntiles = (n_el - rem - span) // pitch + 1
    view = torch.as_strided(cache, (ntiles, *size), (pitch, *stride), rem)  # [N, T, D] or [N, D, T]
    return view, off // pitch, s0 // pitch, s1 // pitch, tc


def _gather_tiles(cache: Tensor, blk: Tensor, tiles: Tensor, tile_size: int) -> tuple[Tensor, bool]:
    """Gather tiles; blk (physical block) and tiles (logical tile, clamped >= 0) ``[R, Hkv, S]``.

    Returns (``[R, Hkv, S, T, D]``, False) or, for token-contiguous caches,
    (``[R, Hkv, S, D, T]``, True); cache dtype.
    """
    R, Hkv, S = blk.shape
    B, D = cache.shape[2], cache.shape[3]
    T = tile_size
    head = torch.arange(Hkv, device=cache.device).view(1, Hkv, 1)
    j = tiles % (B // T)  # tile index inside its block
    tv = _tile_view(cache, T)
    if tv is not None:
        view, base, s0t, s1t, tc = tv
        flat = (blk * s0t).add_(head * s1t).add_(j, alpha=1).add_(base)  # [R, Hkv, S]
        g = view.index_select(0, flat.view(-1))
        return g.view(R, Hkv, S, *view.shape[1:]), tc
    # Generic strides (e.g. the GPU layout on CPU tensors): advanced indexing.
    rows = (j * T).unsqueeze(-1) + torch.arange(T, device=cache.device)  # [R, Hkv, S, T]
    return cache[blk.unsqueeze(-1), head.unsqueeze(-1), rows], False  # [R, Hkv, S, T, D]


_WORKSPACE: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
#: scratch kept between calls per (name, dtype, device) at most; larger requests are one-off
WORKSPACE_MAX_BYTES = 256 * 1024**2


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable scratch tensor (grown on demand up to WORKSPACE_MAX_BYTES; larger ones are
    allocated for the call and freed after it, so the kept memory stays bounded).

    Large per-step gathers (100+ MB at 64k x 8 rows) freshly allocated each call are mmap'ed
    and page-faulted every time; reusing them removed most of the system time measured.
    Single-threaded use per process (one vLLM worker per process).
    """
    numel = math.prod(shape)
    if numel * torch.empty((), dtype=dtype).element_size() > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (name, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: str) -> Tensor:
    """Cached ``arange(n)`` (int64): saves an op per call on the latency-bound decode path."""
    return torch.arange(n, device=device)


def _torch_core(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                seq_lens: Tensor, tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    """Vectorized CPU path; returns out ``[R, Hq, D]`` fp32 and lse ``[R, Hq]`` fp32.

    About 40 small torch ops per decode step and layer whatever R and Hkv: K and V tiles
    gathered with one index_select each, scores and output by batched matmuls, masked fp32
    softmax. On a 2-core CPU the cost is (1) the two gathers (in vLLM's CPU cache a K tile is
    D runs of T elements because K is stored [D, B] per block, slower per byte than a V tile,
    one contiguous T*D run) and (2) per-op dispatch with the caches cold after the previous
    layer: op count is kept low on purpose. What was tried and dropped: docs/cpu-kernels.md.
    """
    R, Hq, Hkv, D, B = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens,
                                     tiles, tile_size)
    G = Hq // Hkv
    S = tiles.shape[-1]
    T = tile_size
    RH = R * Hkv
    dev = query.device
    if S == 0:
        return (torch.zeros(R, Hq, D, dtype=torch.float32, device=dev),
                torch.full((R, Hq), _NEG_INF, dtype=torch.float32, device=dev))

    kv_ = _tile_view(key_cache, T)
    vv_ = _tile_view(value_cache, T)
    tiles = tiles.long()
    t0 = tiles.clamp_min(0)  # [R, Hkv, S]; padding reads tile 0, then is masked
    lblk = (t0 // (B // T)).clamp_max_(block_tables.shape[1] - 1)  # logical block
    blk = block_tables.long().gather(1, lblk.view(R, Hkv * S)).view(R, Hkv, S)  # physical
    # Masked token positions: beyond seq_len (partial last tile) or in a padding tile.
    room = torch.where(tiles >= 0, seq_lens.to(dev).long().view(R, 1, 1) - t0 * T, 0)  # [R, Hkv, S]
    bad = (_arange(T, str(dev)) >= room.unsqueeze(-1)).view(RH, 1, S * T)
    q = (query.float() * scale).view(RH, G, D)  # [RH, G, D]; scale folded into the query

    fast = (kv_ is not None and vv_ is not None and kv_[2:4] == (vv_[2] * D, vv_[3] * D)
            and kv_[4] and not vv_[4])
    if fast:  # vLLM CPU layout: K token-contiguous, V row-major, same block/head strides
        j = t0 % (B // T)
        c = blk * vv_[2] + _arange(Hkv, str(dev)).view(1, Hkv, 1) * vv_[3]  # [R, Hkv, S] V tiles
        kbuf = _workspace("k", (RH * S, D, T), key_cache.dtype, dev)
        vbuf = _workspace("v", (RH * S, T, D), value_cache.dtype, dev)
        k = torch.index_select(kv_[0], 0, (c * D).add_(j).add_(kv_[1]).view(-1), out=kbuf)  # [RH*S, D, T]
        v = torch.index_select(vv_[0], 0, c.add_(j).add_(vv_[1]).view(-1), out=vbuf)  # [RH*S, T, D]
        k_tc = True
    else:
        k, k_tc = _gather_tiles(key_cache, blk, t0, T)
        v, v_tc = _gather_tiles(value_cache, blk, t0, T)
        if v_tc:  # a token-contiguous V: [R, Hkv, S, D, T] -> [R, Hkv, S, T, D]
            v = v.transpose(-1, -2)
    k = k.float()  # no-op for fp32 caches; bf16 is computed in fp32
    if k_tc:  # k [.., D, T]: one small GEMM per tile, then [G, S*T] order
        s = torch.matmul(q.unsqueeze(1), k.view(RH, S, D, T))  # [RH, S, G, T]
        s = s.transpose(1, 2).reshape(RH, G, S * T)  # [RH, G, S*T]
    else:  # k [.., T, D]
        s = torch.bmm(q, k.reshape(RH, S * T, D).transpose(1, 2))  # [RH, G, S*T]
    s.masked_fill_(bad, _NEG_INF)

    # Softmax in fp32 from the log-sum-exp. An empty row has lse = -inf; clamping it to the
    # most negative float keeps exp(-inf - lse) = 0 instead of NaN, so its output is 0.
    lse = torch.logsumexp(s, -1, keepdim=True)  # [RH, G, 1]
    p = s.sub_(lse.clamp_min(torch.finfo(torch.float32).min)).exp_()  # [RH, G, S*T]

    v = v.float().reshape(RH * S * T, D)  # a fresh gather: writable
    # Masked V rows must be exactly 0: p = 0 there, but 0 * NaN (a never-written cache slot
    # past seq_len) is NaN. Only the masked rows are touched (few: tails and padding).
    idx = bad.view(-1).nonzero().squeeze(1)
    if idx.numel():
        v.index_fill_(0, idx, 0.0)
    o = torch.bmm(p, v.view(RH, S * T, D))  # [RH, G, D]
    return o.view(R, Hq, D), lse.view(R, Hq)


# ----------------------------------------------------------------------------- reference


def sparse_decode_ref(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                      seq_lens: Tensor, tiles: Tensor, tile_size: int, scale: float, *,
                      dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Oracle: plain loops over rows, KV heads and tokens, computed in ``dtype``.

    Same inputs as :func:`sparse_decode`; returns out ``[R, Hq, D]`` and lse ``[R, Hq]``, both
    in ``dtype``. Tiles must be unique per (row, head) (select_tiles guarantees it); -1 entries
    are padding; positions >= seq_len are skipped. Empty selection: out 0, lse -inf.
    """
    R, Hq, Hkv, D, B = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens,
                                     tiles, tile_size)
    G = Hq // Hkv
    out = torch.zeros(R, Hq, D, dtype=dtype)
    lse = torch.full((R, Hq), _NEG_INF, dtype=dtype)
    for r in range(R):
        n = int(seq_lens[r])
        for h in range(Hkv):
            sel = [int(t) for t in tiles[r, h].tolist() if t >= 0]
            if len(set(sel)) != len(sel):
                raise ValueError(f"duplicate tiles for row {r}, head {h}: {sel}")
            positions = [t * tile_size + i for t in sel for i in range(tile_size)
                         if t * tile_size + i < n]
            if not positions:
                continue
            ks = torch.stack([key_cache[int(block_tables[r, p // B]), h, p % B] for p in positions])
            vs = torch.stack([value_cache[int(block_tables[r, p // B]), h, p % B] for p in positions])
            ks, vs = ks.to("cpu", dtype), vs.to("cpu", dtype)  # [n_sel, D]
            for g in range(G):
                qh = h * G + g
                logits = scale * (ks @ query[r, qh].to("cpu", dtype))  # [n_sel]
                lse[r, qh] = torch.logsumexp(logits, 0)
                out[r, qh] = torch.softmax(logits, 0) @ vs
    return out, lse


def _ref_core(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
              seq_lens: Tensor, tiles: Tensor, tile_size: int, scale: float) -> tuple[Tensor, Tensor]:
    o, lse = sparse_decode_ref(query, key_cache, value_cache, block_tables, seq_lens, tiles,
                               tile_size, scale)
    return o.float().to(query.device), lse.float().to(query.device)


def _triton_core(*args, **kw) -> tuple[Tensor, Tensor]:
    from .triton_sparse_decode import triton_sparse_decode as core  # lazy: triton is optional

    return core(*args, **kw)


def _cpp_core(*args, kv_layout: str = "strided",
              out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    from .cpu_sparse_decode import cpu_sparse_decode

    check_decode_inputs(*args[:7])
    return cpu_sparse_decode(*args, kv_layout=kv_layout, out_dtype=out_dtype)


_IMPLS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "torch": _torch_core,
    "cpp": _cpp_core,
    "ref": _ref_core,
    "triton": _triton_core,
}


def _core_for(impl: str, kv_layout: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The core of ``impl`` for caches in ``kv_layout``."""
    core = _IMPLS[impl]
    if kv_layout == "strided":
        return core
    if impl == "cpp":  # reads the packed layout in place
        return functools.partial(_cpp_core, kv_layout=kv_layout)

    def unpacked(query, key_cache, value_cache, block_tables, *rest, **kw):
        return core(query, *amx_unpack_blocks(key_cache, value_cache, block_tables), *rest, **kw)

    return unpacked


# ----------------------------------------------------------------------------- merging


def merge_attn_states(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two attention states over disjoint key sets (HyperAttention's log-sum-exp rule).

    o1/o2 ``[..., D]``, lse1/lse2 ``[...]`` -> (o ``[..., D]`` in o1's dtype, lse ``[...]`` fp32).
    o = c*o1 + (1-c)*o2 with c = 1/(1 + exp(lse2 - lse1)); lse = log(e^lse1 + e^lse2).
    Either side may be -inf (empty); both -inf gives o = 0, lse = -inf.
    """
    l1, l2 = lse1.float(), lse2.float()
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)  # [...]
    tot = w1 + w2
    safe = tot.clamp_min(torch.finfo(torch.float32).tiny)
    o = (o1.float() * (w1 / safe).unsqueeze(-1) + o2.float() * (w2 / safe).unsqueeze(-1))
    return o.to(o1.dtype), tot.log() + m


# ----------------------------------------------------------------------------- launcher


def sparse_decode(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                  seq_lens: Tensor, tiles: Tensor, tile_size: int, scale: float, *,
                  impl: str = "auto", residual_tiles: Tensor | None = None,
                  residual_weight: Tensor | None = None, out: Tensor | None = None,
                  kv_layout: str = "strided") -> tuple[Tensor, Tensor]:
    """Exact softmax attention of each decode query over its selected KV tiles.

    Args:
        query: ``[R, Hq, D]``; query head h uses KV head h // G, G = Hq / Hkv.
        key_cache, value_cache: ``[num_blocks, Hkv, B, D]`` strided views (see module doc).
        block_tables: ``[R, max_blocks]`` int32 physical block ids.
        seq_lens: ``[R]`` int32 tokens in each row's sequence (positions >= seq_len masked).
        tiles: ``[R, Hkv, S]`` int32 logical tile indices, unique per (row, head), -1 = padding.
        tile_size: T, divides B.
        scale: softmax scale (usually D ** -0.5).
        impl: "torch", "cpp" (fused C++ CPU kernel, :mod:`.cpu_sparse_decode`), "triton",
            "ref" or "auto" (:mod:`.dispatch`: triton for CUDA tensors, cpp on CPU when it
            compiles, else torch).
        residual_tiles: optional ``[R, Hkv, m]`` HyperAttention residual sample (disjoint from
            ``tiles``, -1 pad), with residual_weight ``[R, Hkv]`` = #unselected / #sampled: its
            part is computed by the same kernel, its lse shifted by log(weight) and merged.
        out: optional ``[R, Hq, D]`` tensor written in place (and returned).
        kv_layout: "strided" (the caches are views with the semantic indexing) or "amx"
            (the packed regions of :func:`~.layouts.vllm_cpu_amx_kv_views`).

    Returns:
        out ``[R, Hq, D]`` in query dtype, lse ``[R, Hq]`` fp32 (natural log of the softmax
        denominator of scale * q.k over the selected union). A row with no valid selected token
        gets out 0 and lse -inf.
    """
    impl, _ = resolve("sparse_decode", impl, query, _IMPLS)
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"unknown kv_layout {kv_layout!r}; valid: {', '.join(KV_LAYOUTS)}")
    core = _core_for(impl, kv_layout)
    args = (query, key_cache, value_cache, block_tables, seq_lens, tiles, tile_size, scale)
    if impl in ("cpp", "triton") and residual_tiles is None:  # the kernel casts: one op less
        o, lse = core(*args, out_dtype=query.dtype)
    else:
        o, lse = core(*args)
    if residual_tiles is not None:
        if residual_weight is None:
            raise ValueError("residual_tiles needs residual_weight")
        o2, lse2 = core(query, key_cache, value_cache, block_tables, seq_lens, residual_tiles,
                        tile_size, scale)
        shift = expand_kv_heads(residual_weight.float().log(), query.shape[1])  # [R, Hq]; log 0 = -inf
        o, lse = merge_attn_states(o, lse, o2, lse2 + shift)
    if out is None:
        return o.to(query.dtype), lse
    out.copy_(o)
    return out, lse

