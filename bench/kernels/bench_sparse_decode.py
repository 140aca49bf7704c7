"""Micro-benchmark: sparse paged decode vs exact paged decode on vLLM's CPU cache layout.

For each context length, batch size and keep ratio, one decode step of one layer
(R rows x Hq = Hkv * G query heads, D, block size B, tile T; fp32, or bf16 with ``--dtype
bfloat16``) is timed with:
  * vllm:     vLLM's own CPU attention op (``ops.cpu_attention_with_kv_cache``) on the cache,
              scheduler metadata built once per step as vLLM does (not counted per layer);
  * dense:    plain torch over the paged cache: gather the row's blocks, then SDPA;
  * sparse:   ``select_and_decode_into`` (the backend's per-layer call): the tile selection
              on random tile scores (its cost included) + the sparse kernel on the same cache
              (``--impl``, default the fused C++ path: both in one call), the output rows and
              the counters written in place, as vLLM's op writes its preallocated output;
              ``select`` is the selection alone (``select_tiles``), ``sparse_torch`` the same
              step with the torch code; ``sparse_ret`` (``--returning-column``) the same with
              ``select_and_decode``, which returns the output and the Selection as tensors;
  * sp+lsh:   as sparse, plus the decode-time LSH part: hash the queries, OR their buckets per
              GQA group, intersect with per-tile bucket masks, LSH priority capped at budget/4
              (with the fused C++ path all inside the call, the masks read through the block
              table: ``lsh_in_place``, as the backend's "lsh" mode; torch ops otherwise);
  * sp+quest: Quest bounds of q.k ranked over per-tile key min/max (read through the block
              table), up to half the budget, then pre-scores; ``sparse_sparq`` /
              ``sparse_pq`` / ``sparse_sparq4`` the same with SparQ on the KV cache's
              channels, PQ codes, or SparQ on the 4-bit key copy (``--sparq``, ``--pq``,
              ``--sparq4``; random codes: the cost, not the quality), each ``*_over_quest``
              the ratio of the per-layer call to Quest's, side by side; ``sparse_sparq4w``
              (``--sparq4-wide R``) the sparq4 call ranking on R channels,
              ``sparq4w_over_sparq4`` its ratio to ``sparse_sparq4``; each column's keep ratio
              counts the copy's bytes read as the backend does (``--sparq4-budget tiles``:
              not, as the backend did before query_channels followed the budget);
  * tiers:    (``--tiers BITS``) the backend's two-tier call (``prescore_backend.tiers``:
              the sparq4 ranking in torch over every tile, the exact tier on the fused kernel,
              the next tiles from a BITS-bit K/V copy in torch, merged), the budget split as
              the backend splits it (75% of the free bytes to the copy); ``tiers_over_sparq4``
              its ratio to ``sparse_sparq4`` (today's default), side by side;
  * kernel:   (``--kernel-column``) the sparse kernel alone on the same selection made ahead:
              sparse minus kernel is what the selection costs inside the fused call;
  * floor:    (``--floor-column``, bf16 "amx") ``read_floor.py`` reading the selection's K and V
              lines with the kernel's prefetches and no arithmetic, and ``readall`` every line
              vLLM's op reads: vllm / floor bounds what any kernel reading those tiles reaches.
Cache layouts (``--k-layout``): ``vllm`` is CPU_ATTN's "vec" ISA (K^T per block), ``amx`` its
"amx" ISA (bf16 on AMX CPUs: VNNI-packed K and V, what vLLM picks for bf16 there; vLLM's op
then runs its AMX kernel), ``rowmajor`` a what-if with K row-major.
Several copies of the cache ("layers") are cycled so the working set exceeds the last-level
cache, as in a real model (30 layers); a single-layer run would flatter the sparse path.

Usage: python bench/kernels/bench_sparse_decode.py [--threads 1] [--quick] [--out bench/out/x.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path


def _pin_omp_threads() -> None:
    """Pin OpenMP threads before torch/vLLM load (vLLM's CPU op uses OpenMP)."""
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            os.environ.setdefault("OMP_NUM_THREADS", sys.argv[i + 1])
        elif a.startswith("--threads="):
            os.environ.setdefault("OMP_NUM_THREADS", a.split("=", 1)[1])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Transparent huge pages for torch's large CPU allocations (the caches here, vLLM's KV
    # cache under prescore-serve): scattered tile reads otherwise pay a TLB miss per 4 KiB.
    if "--no-thp" not in sys.argv:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_pin_omp_threads()

import torch  # noqa: E402

from prescore_backend.kernels import (  # noqa: E402
    AngularLSH,
    bucket_masks,
    masks_intersect,
    rowmajor_cpu_kv_views,
    sparse_decode,
    vllm_cpu_kv_views,
)
from prescore_backend.kernels.cpu_select import (cpu_pq_pick, cpu_quest_pick,  # noqa: E402
                                                 cpu_sparq4_pick, cpu_sparq_pick)
from prescore_backend.pq import rotary_pair_dims  # noqa: E402
from prescore_backend.config import PrescoreConfig  # noqa: E402
from prescore_backend.selection import side_read_fraction  # noqa: E402
from prescore_backend.kernels.lowbit import LowBitCopy  # noqa: E402
from prescore_backend.side_data import SideData  # noqa: E402
from prescore_backend.tiers import decode_two_tiers, tier_budgets  # noqa: E402
from prescore_backend.kernels.layouts import (  # noqa: E402
    amx_unpack_k,
    amx_unpack_v,
    vllm_cpu_amx_kv_views,
)
from prescore_backend.kernels.select import select_tiles  # noqa: E402
from prescore_backend.kernels.select_decode import (  # noqa: E402
    select_and_decode,
    select_and_decode_into,
)

import read_floor  # noqa: E402  (bench/, the script's directory, is on sys.path)


def _vllm_ops():
    try:
        from vllm import _custom_ops as ops  # bench/ may import vLLM; kernels/ never does
    except Exception as e:  # noqa: BLE001
        print(f"[bench] vLLM CPU ops unavailable ({e}); skipping the vllm column", file=sys.stderr)
        return None
    return ops


def _timeit_interleaved(fns: dict[str, object], iters: int, warmup: int = 2) -> dict[str, float]:
    """Median time in ms of each fn(i), the functions timed round-robin.

    Cold caches: call number i reads layer i % layers, so a layer comes back only after every
    other layer was read (run_config sizes the cycle past the last-level cache and past a
    full sweep by vLLM's op). An earlier version gave all the methods of a round the same
    layer: vLLM's op swept it into L3 (a 12.6 MB layer at 16k x batch 1 fits in this
    machine's 105 MB), and the keep-1/8 read found the tiles that the keep-1/4 read before
    it had just brought in, which flattered the sparse path.

    The order is shuffled every round: the call right after vLLM's op (a sweep of the whole
    layer) starts with the interpreter's and the extension's code and data evicted and pays
    ~0.1 ms more at 16k (measured: an empty sparse call 0.03 ms after the selection, 0.1-0.4 ms
    after vLLM's op); a fixed order gave that slot to the same method every round.

    Interleaving makes every method see the same background load: this 2-core machine is
    shared with running vLLM engines and single runs drift by 2-3x. Thread CPU time by
    default (ignores time spent preempted; memory contention still shows); ``--wall``
    switches to wall-clock. Every op timed here runs on this thread (torch and vLLM's op both
    use the intra-op pool, 1 thread by default, OMP_NUM_THREADS pinned before import).
    """
    clock = time.perf_counter if _WALL else time.thread_time
    calls = itertools.count()
    for _ in range(warmup):
        for fn in fns.values():
            fn(next(calls))
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(iters):
        rng.shuffle(order)  # each method follows each other one equally often (see below)
        for k in order:
            fn = fns[k]
            c = next(calls)  # every call reads the next layer: the one read longest ago
            t0 = clock()
            fn(c)
            times[k].append(clock() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


_WALL = False


def run_config(ctx: int, batch: int, keeps: list[int], args, ops) -> list[dict]:
    Hkv, G, D, B, T = args.kv_heads, args.group, args.head_dim, args.block_size, args.tile
    Hq = Hkv * G
    scale = D ** -0.5
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    amx = args.k_layout == "amx"
    kvl = "amx" if amx else "strided"  # how the kernels must read the views
    nblk = -(-ctx // B)
    blocks = batch * nblk + 1
    layer_bytes = blocks * Hkv * B * 2 * D * dtype.itemsize
    # Every timed call reads the next layer (see _timeit_interleaved). Enough layers that a
    # layer comes back only after --working-set-mb of other reads, and after at least one full
    # sweep by vLLM's op (n_fns calls per round); capped by --max-layers and --max-gb.
    n_fns = 1 + args.floor_column + len(keeps) * (
        2 + (args.impl != "torch") + args.lsh + args.quest + bool(args.sparq) + bool(args.pq)
        + bool(args.sparq4) + bool(args.sparq4_wide) + bool(args.tiers)
        + args.kernel_column
        + args.returning_column + args.floor_column)
    layers = max(n_fns + 1, math.ceil(args.working_set_mb * 2 ** 20 / layer_bytes))
    layers = max(1, min(layers, args.max_layers, int(args.max_gb * 2 ** 30 // layer_bytes)))
    base = torch.randn(blocks, Hkv, B, 2 * D, generator=gen).to(dtype)  # vLLM CPU
    caches = [base] + [base.clone() for _ in range(layers - 1)]  # same values, own memory
    view_fn = {"vllm": vllm_cpu_kv_views, "rowmajor": rowmajor_cpu_kv_views,
               "amx": vllm_cpu_amx_kv_views}[args.k_layout]
    views = [view_fn(c) for c in caches]
    plain_k = amx_unpack_k if amx else (lambda k: k)  # K with semantic [.., token, dim] indexing
    # Shuffled physical blocks per row.
    perm = torch.randperm(blocks, generator=gen)[: batch * nblk].view(batch, nblk).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    query = torch.randn(batch, Hq, D, generator=gen).to(dtype)
    M = -(-ctx // T)
    num_tiles = torch.full((batch,), M)
    tile_scores = [torch.randn(batch, Hkv, M, generator=gen) for _ in range(layers)]
    lsh = AngularLSH(args.lsh_bits, D, seed=0)
    # Quest per-tile key bounds per layer (as the backend's side data): [blocks, Hkv, B/T, D]
    # (the layers hold the same values: side data computed once, copied per layer)
    kbounds = []
    if args.quest:
        kt = plain_k(views[0][0]).reshape(blocks, Hkv, B // T, T, D)  # K tiles
        kb0 = (kt.amin(3).contiguous(), kt.amax(3).contiguous())
        kbounds = [kb0] + [(a.clone(), b.clone()) for a, b in [kb0] * (layers - 1)]
    # PQ codes per layer [blocks, Hkv, B, m] uint8 and one codebook (random: the ranking's cost)
    pq_codes, pq_book, pq_dims = [], None, None
    if args.pq:
        c0 = torch.randint(0, 256, (blocks, Hkv, B, args.pq), generator=gen, dtype=torch.uint8)
        pq_codes = [c0] + [c0.clone() for _ in range(layers - 1)]
        pq_book = torch.randn(Hkv, args.pq, D // args.pq, 256, generator=gen)  # transposed
        pq_dims = rotary_pair_dims(D, args.pq)
    # the 4-bit key copy per layer [blocks, Hkv, D, B/2] uint8 and its per-block (min, step)
    # [blocks, Hkv, 2, D] (random codes: the ranking's cost, not its quality)
    kq_copy, kq_scale = [], []
    if args.sparq4:
        q0 = torch.randint(0, 256, (blocks, Hkv, D, B // 2), generator=gen, dtype=torch.uint8)
        z0 = torch.rand(blocks, Hkv, 2, D, generator=gen)
        kq_copy = [q0] + [q0.clone() for _ in range(layers - 1)]
        kq_scale = [z0] + [z0.clone() for _ in range(layers - 1)]
    # two tiers: the 4-bit key copy above plus a low-bit K/V copy per layer (random codes)
    tier_sides = []
    if args.tiers:
        low0 = LowBitCopy.allocate(blocks, Hkv, B, D, args.tiers)
        for t in low0.tensors():
            t.copy_(torch.randint(0, 256, t.shape, generator=gen).to(t.dtype) if t.dtype == torch.uint8
                    else torch.rand(t.shape, generator=gen).to(t.dtype))
        for li in range(layers):
            low = low0 if li == 0 else LowBitCopy(*(t.clone() for t in low0.tensors()))
            tier_sides.append(SideData(scores=torch.zeros(blocks, Hkv, B // T), masks=None,
                                       kmin=None, kmax=None,
                                       kq=kq_copy[li], kz=kq_scale[li], low=low))
    tile_masks = block_masks = None
    if args.lsh:
        tm0 = bucket_masks(lsh.hash(plain_k(views[0][0][perm.long()].flatten(0, 1)).reshape(
            batch, nblk, Hkv, B, D).transpose(1, 2).reshape(batch, Hkv, M, T, D).float()),
            args.lsh_bits)  # [R, Hkv, M, W]
        tile_masks = [tm0] + [tm0.clone() for _ in range(layers - 1)]
        # the backend's side data: bucket sets per physical block [blocks, Hkv, B/T, W]
        bm0 = bucket_masks(lsh.hash(plain_k(views[0][0]).float().reshape(
            blocks, Hkv, B // T, T, D)), args.lsh_bits).contiguous()
        block_masks = [bm0] + [bm0.clone() for _ in range(layers - 1)]
    iters = args.iters if args.iters else max(5, int(args.iter_budget * 16384 / max(ctx, 1)))

    fns: dict[str, object] = {}
    extra: dict[str, float] = {}
    floor = args.floor_column and amx and dtype == torch.bfloat16 and read_floor.available()
    # vLLM's exact CPU attention.
    if ops is not None:
        qsl = torch.arange(batch + 1, dtype=torch.int32)
        md = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch, num_heads=Hq, num_kv_heads=Hkv, head_dim=D, seq_lens=seq_lens,
            dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1,
            isa="amx" if amx else "vec", enable_kv_split=True)
        out = torch.empty(batch, Hq, D, dtype=dtype)

        def vllm_fn(i: int) -> None:
            kv = caches[i % layers].view(blocks, Hkv, 2 * B, D)
            kc, vc = kv.chunk(2, dim=2)
            ops.cpu_attention_with_kv_cache(
                query=query, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl,
                seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=perm, softcap=0.0, scheduler_metadata=md,
                s_aux=None)

        fns["vllm_ms"] = vllm_fn
        if args.k_layout != "rowmajor":  # correctness: our dense-over-all-tiles equals vLLM's
            vllm_fn(0)
            allt = torch.arange(M, dtype=torch.int32).view(1, 1, M).expand(batch, Hkv, M)
            ours, _ = sparse_decode(query, *views[0], perm, seq_lens, allt, T, scale,
                                    kv_layout=kvl)
            extra["max_abs_diff_vs_vllm"] = float((ours.float() - out.float()).abs().max())

    # Plain torch dense: gather the row's blocks into a contiguous sequence, then SDPA.
    def dense_fn(i: int) -> None:
        kc, vc = views[i % layers]
        idx = perm.long()  # [R, nblk]
        if amx:  # unpack the row's blocks (part of what plain torch pays on this layout)
            kc, vc = (u(c[idx.flatten()]).unflatten(0, idx.shape) for u, c in
                      ((amx_unpack_k, kc), (amx_unpack_v, vc)))
        else:
            kc, vc = kc[idx], vc[idx]  # [R, nblk, Hkv, B, D]
        k = kc.transpose(1, 2).reshape(batch, Hkv, nblk * B, D)[:, :, :ctx]  # [R, Hkv, n, D]
        v = vc.transpose(1, 2).reshape(batch, Hkv, nblk * B, D)[:, :, :ctx]
        torch.nn.functional.scaled_dot_product_attention(
            query.unsqueeze(2), k, v, scale=scale, enable_gqa=True)  # [R, Hq, 1, D]

    # Dense torch is slow: time it on its own, a few iterations.
    extra["dense_ms"] = _timeit_interleaved({"d": dense_fn}, max(3, iters // 4), warmup=1)["d"]

    out_buf = torch.empty(batch, Hq, D, dtype=dtype)  # as vLLM's output for the layer
    rows = torch.arange(batch)  # the decode tokens' rows in it
    stats = torch.zeros(8, dtype=torch.int64)  # the backend's counters

    def make_sparse(keep: int, with_lsh: bool, impl: str = args.impl, quest: bool = False,
                    returning: bool = False, sparq: int = 0, pq: int = 0, sparq4: int = 0,
                    tiers: int = 0, bytes_budget: bool = False, cap_ratio: float = 0.5):
        budget = torch.full((batch,), max(1, M // keep))
        if sparq:  # keep_ratio counts the channels SparQ reads: fewer tiles for the same bytes
            budget = torch.full((batch,), max(1, math.ceil(M * (1 / keep - sparq / (2 * D)))))
        if sparq4 and bytes_budget:  # keep_ratio counts the key copy's reads, as the backend
            side = side_read_fraction(PrescoreConfig(query_channels=sparq4), D, block_size=B)
            budget = torch.full((batch,), max(3, math.ceil(M * (1 / keep - side))))
        cap = max(1, M // keep // 4)
        # the backend's query_caps: cap_ratio of the budget, at most what sinks + window leave
        caps = torch.full((batch,), max(1, min(int(int(budget[0]) * cap_ratio), int(budget[0]) - 3)))
        bt64 = perm.long()
        lsh_caps = torch.full((batch,), cap)
        if tiers:  # 1 sink tile, 2 window tiles, as the other columns
            tier_cfg = PrescoreConfig(low_tier_bits=tiers, tile_size=T, sink_tokens=T,
                                      window_tokens=2 * T, query_channels=args.sparq4 or 8)
            t_exact, t_total = tier_budgets(tier_cfg, budget, num_tiles, D, B)

        def sparse_fn(i: int) -> None:
            li = i % layers
            if tiers:  # the backend's two-tier call, its output copied into vLLM's rows
                o, _, _ = decode_two_tiers(tier_cfg, query, *views[li], tier_sides[li], bt64,
                                           seq_lens, num_tiles, t_exact, t_total, scale,
                                           kv_layout=kvl)
                out_buf.copy_(o)
                return
            match, cap_i, in_place = None, 0, None
            if with_lsh and impl != "torch":  # the backend's "lsh" mode: hashed in the call
                in_place = (lsh.proj, block_masks[li], lsh_caps)
            elif sparq:  # SparQ-ranked tiles up to half the budget, channels read in place
                match = cpu_sparq_pick(query, views[li][0], bt64, num_tiles, caps,
                                       num_tile_slots=M, channels=sparq,
                                       tile_size=T, sink_tiles=1, window_tiles=2, kv_layout=kvl)
                cap_i = int(caps.max())
            elif sparq4:  # SparQ on the 4-bit key copy, up to half the budget
                match = cpu_sparq4_pick(query, kq_copy[li], kq_scale[li], bt64, num_tiles, caps,
                                        num_tile_slots=M, channels=sparq4, tile_size=T,
                                        sink_tiles=1, window_tiles=2)
                cap_i = int(caps.max())
            elif pq:  # PQ-ranked tiles up to half the budget, codes read in place
                match = cpu_pq_pick(query, pq_codes[li], bt64, pq_book, pq_dims, num_tiles, caps,
                                    num_tile_slots=M, tile_size=T, sink_tiles=1, window_tiles=2)
                cap_i = int(caps.max())
            elif quest:  # Quest-ranked tiles up to half the budget
                match = cpu_quest_pick(query, *kbounds[li], bt64, num_tiles, caps,
                                       num_tile_slots=M, sink_tiles=1, window_tiles=2)
                cap_i = int(caps.max())
            elif with_lsh:
                qb = bucket_masks(lsh.hash(query).view(batch, Hkv, G), args.lsh_bits)  # [R, Hkv, W]
                match = masks_intersect(tile_masks[li], qb.unsqueeze(2))  # [R, Hkv, M]
                cap_i = cap
            if returning:  # the API that returns out, lse and the Selection as tensors
                select_and_decode(query, *views[li], perm, seq_lens, tile_scores[li],
                                  num_tiles, budget, tile_size=T, scale=scale, sink_tiles=1,
                                  window_tiles=2, lsh_match=match, lsh_cap=cap_i,
                                  lsh_in_place=in_place, kv_layout=kvl, impl=impl)
                return
            # the backend's call: output rows and counters written in place
            select_and_decode_into(query, *views[li], perm, seq_lens, tile_scores[li], num_tiles,
                                   budget, out_buf, rows=rows, stats=stats, tile_size=T,
                                   scale=scale, sink_tiles=1, window_tiles=2, lsh_match=match,
                                   lsh_cap=cap_i, lsh_in_place=in_place, kv_layout=kvl,
                                   impl=impl)

        def select_fn(i: int) -> None:
            select_tiles(tile_scores[i % layers], num_tiles, budget, sink_tiles=1, window_tiles=2)

        return sparse_fn, select_fn

    for keep in keeps:
        sp, se = make_sparse(keep, False)
        fns[f"sparse_ms/{keep}"] = sp
        fns[f"select_ms/{keep}"] = se
        if args.impl != "torch":
            fns[f"sparse_torch_ms/{keep}"] = make_sparse(keep, False, "torch")[0]
        if args.lsh:
            fns[f"sparse_lsh_ms/{keep}"] = make_sparse(keep, True)[0]
        if args.quest:
            fns[f"sparse_quest_ms/{keep}"] = make_sparse(keep, False, quest=True)[0]
        if args.sparq:
            fns[f"sparse_sparq_ms/{keep}"] = make_sparse(keep, False, sparq=args.sparq)[0]
        if args.pq:
            fns[f"sparse_pq_ms/{keep}"] = make_sparse(keep, False, pq=args.pq)[0]
        if args.sparq4:
            fns[f"sparse_sparq4_ms/{keep}"] = make_sparse(
                keep, False, sparq4=args.sparq4, bytes_budget=args.sparq4_budget == "bytes",
                cap_ratio=args.sparq4_cap)[0]
        if args.sparq4_wide:
            fns[f"sparse_sparq4w_ms/{keep}"] = make_sparse(
                keep, False, sparq4=args.sparq4_wide,
                bytes_budget=args.sparq4_wide_budget == "bytes", cap_ratio=args.sparq4_wide_cap)[0]
        if args.tiers:
            fns[f"sparse_tiers_ms/{keep}"] = make_sparse(keep, False, tiers=args.tiers)[0]
        if args.returning_column:
            fns[f"sparse_ret_ms/{keep}"] = make_sparse(keep, False, returning=True)[0]
        if args.kernel_column:  # the kernel alone, on the same selection made ahead
            budget = torch.full((batch,), max(1, M // keep))
            pre = [select_tiles(tile_scores[li], num_tiles, budget, sink_tiles=1,
                                window_tiles=2).tiles for li in range(layers)]

            def kernel_fn(i: int, pre=pre) -> None:
                li = i % layers
                sparse_decode(query, *views[li], perm, seq_lens, pre[li], T, scale,
                              kv_layout=kvl)

            fns[f"kernel_ms/{keep}"] = kernel_fn
        if floor:  # the bytes alone: the same selection's lines read, no arithmetic
            budget = torch.full((batch,), max(1, M // keep))
            pre_f = [select_tiles(tile_scores[li], num_tiles, budget, sink_tiles=1,
                                  window_tiles=2).tiles.contiguous() for li in range(layers)]

            def floor_fn(i: int, pre=pre_f) -> None:
                li = i % layers
                read_floor.read_selected_amx(*views[li], perm, seq_lens, pre[li], T)

            fns[f"floor_ms/{keep}"] = floor_fn
    if floor:
        fns["readall_ms"] = lambda i: read_floor.read_all_amx(*views[i % layers], perm, seq_lens)
    med = _timeit_interleaved(fns, iters)

    results = []
    for keep in keeps:
        r = dict(ctx=ctx, batch=batch, keep=f"1/{keep}", layers=layers, iters=iters, **extra)
        for k in ("vllm_ms", "readall_ms"):
            if k in med:
                r[k] = med[k]
        for k in ("select_ms", "sparse_torch_ms", "sparse_ms", "sparse_ret_ms", "sparse_lsh_ms",
                  "sparse_quest_ms", "sparse_sparq_ms", "sparse_pq_ms", "sparse_sparq4_ms",
                  "sparse_sparq4w_ms", "sparse_tiers_ms", "kernel_ms", "floor_ms"):
            if f"{k}/{keep}" in med:
                r[k] = med[f"{k}/{keep}"]
        if "vllm_ms" in r:
            r["speedup_vs_vllm"] = r["vllm_ms"] / r["sparse_ms"]
            if "sparse_quest_ms" in r:
                r["quest_speedup_vs_vllm"] = r["vllm_ms"] / r["sparse_quest_ms"]
            if "floor_ms" in r:  # the most any kernel reading these bytes could reach now
                r["floor_speedup_vs_vllm"] = r["vllm_ms"] / r["floor_ms"]
        if "sparse_sparq_ms" in r and "sparse_quest_ms" in r:  # the per-layer call, side by side
            r["sparq_over_quest"] = r["sparse_sparq_ms"] / r["sparse_quest_ms"]
        if "sparse_pq_ms" in r and "sparse_quest_ms" in r:
            r["pq_over_quest"] = r["sparse_pq_ms"] / r["sparse_quest_ms"]
        if "sparse_sparq4_ms" in r and "sparse_quest_ms" in r:
            r["sparq4_over_quest"] = r["sparse_sparq4_ms"] / r["sparse_quest_ms"]
        if "sparse_sparq4w_ms" in r and "sparse_sparq4_ms" in r:
            r["sparq4w_over_sparq4"] = r["sparse_sparq4w_ms"] / r["sparse_sparq4_ms"]
        if "sparse_tiers_ms" in r and "sparse_sparq4_ms" in r:
            r["tiers_over_sparq4"] = r["sparse_tiers_ms"] / r["sparse_sparq4_ms"]
        r["speedup_vs_dense"] = r["dense_ms"] / r["sparse_ms"]
        results.append(r)
        print(_fmt_row(r), flush=True)
    del caches, views
    return results


_COLS = [("ctx", "{:>6}"), ("batch", "{:>5}"), ("keep", "{:>5}"), ("vllm_ms", "{:>8.3f}"),
         ("dense_ms", "{:>9.3f}"), ("select_ms", "{:>9.3f}"), ("sparse_torch_ms", "{:>15.3f}"),
         ("sparse_ms", "{:>9.3f}"), ("sparse_ret_ms", "{:>13.3f}"), ("kernel_ms", "{:>9.3f}"),
         ("sparse_lsh_ms", "{:>13.3f}"), ("sparse_quest_ms", "{:>15.3f}"),
         ("sparse_sparq_ms", "{:>15.3f}"), ("sparq_over_quest", "{:>16.2f}"),
         ("sparse_pq_ms", "{:>12.3f}"), ("pq_over_quest", "{:>13.2f}"),
         ("sparse_sparq4_ms", "{:>16.3f}"), ("sparq4_over_quest", "{:>17.2f}"),
         ("sparse_sparq4w_ms", "{:>17.3f}"), ("sparq4w_over_sparq4", "{:>19.2f}"),
         ("sparse_tiers_ms", "{:>15.3f}"), ("tiers_over_sparq4", "{:>17.2f}"),
         ("floor_ms", "{:>8.3f}"), ("readall_ms", "{:>10.3f}"),
         ("speedup_vs_vllm", "{:>15.2f}"), ("quest_speedup_vs_vllm", "{:>21.2f}"),
         ("floor_speedup_vs_vllm", "{:>21.2f}"),
         ("speedup_vs_dense", "{:>16.2f}")]


def _fmt_row(r: dict) -> str:
    out = []
    for k, f in _COLS:
        w = int(f.split(">")[1].split(".")[0].rstrip("}"))
        out.append(f.format(r[k]) if k in r else " " * (w - 1) + "-")
    return " ".join(out)


def write_report(data: dict, out_dir: Path, command: str, name: str = "kernels") -> Path:
    """``out_dir/<name>.json`` and ``<name>.md`` (machine, command, table) from a run's data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=1))
    m = data["meta"]
    lines = [
        "# Sparse decode kernel vs vLLM's CPU attention op (one layer, one decode step)", "",
        f"Machine: {m['machine']}, {m['cpus']} CPUs, {m['threads']} thread(s); "
        f"{m.get('dtype', 'float32')}, Hkv "
        f"{m['kv_heads']}, G {m['group']}, D {m['head_dim']}, block {m['block_size']}, tile "
        f"{m['tile']}, K layout {m['k_layout']}, transparent huge pages {'on' if m.get('thp') else 'off'}; "
        f"median {m['clock']} time per layer-step, all methods timed round-robin in one run "
        "(order shuffled every round), each call on the next of enough cache copies that a "
        "layer comes back cold; random tile scores"
        f"{'; denormals flushed to zero (FTZ/DAZ)' if m.get('flush_denormal') else ''}.",
        "", f"Command: `{command}`", "",
        "Columns: *sparse*: pre-score selection + the sparse kernel (`select_and_decode_into`, "
        "the backend's call: one C++ call, output rows and counters written in place); "
        "*sparse + Quest*: the backend's default (Quest bound over per-tile key min/max up to "
        "half the budget, then `select_and_decode_into`); *select*: the pre-score "
        "selection alone (`select_tiles`); *torch path*: sparse with the torch selection and "
        "the vectorized torch kernel; *floor* (`--floor-column`, bf16 \"amx\" only): "
        "`bench/kernels/read_floor.py` reading the same selection's K and V lines with the kernel's "
        "prefetches and no arithmetic, so *vLLM / floor* bounds what any kernel reading those "
        "bytes could reach in that run.", "",
        "| ctx | batch | keep | vLLM op ms | sparse ms | sparse + Quest ms | select ms | torch path ms "
        "| floor ms | speedup vs vLLM | speedup vs vLLM (+ Quest) | vLLM / floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, fmt: format(r[k], fmt) if k in r else "-"  # noqa: E731
    x = lambda r, k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
    for r in data["results"]:
        lines.append(f"| {r['ctx']} | {r['batch']} | {r['keep']} | {f(r, 'vllm_ms', '.3f')} | "
                     f"{f(r, 'sparse_ms', '.3f')} | {f(r, 'sparse_quest_ms', '.3f')} | "
                     f"{f(r, 'select_ms', '.3f')} | {f(r, 'sparse_torch_ms', '.3f')} | "
                     f"{f(r, 'floor_ms', '.3f')} | {x(r, 'speedup_vs_vllm')} | "
                     f"{x(r, 'quest_speedup_vs_vllm')} | {x(r, 'floor_speedup_vs_vllm')} |")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,16384,65536")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--keeps", default="4,8,16", help="keep ratios 1/k")
    p.add_argument("--threads", type=int, default=1, help="torch threads (vLLM serves with 1 per worker here)")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--group", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tile", type=int, default=16)
    p.add_argument("--k-layout", choices=["vllm", "amx", "rowmajor"], default="vllm",
                   help="vllm: K stored [D, B] per block (vLLM CPU_ATTN 'vec'); amx: vLLM's "
                        "VNNI-packed 'amx' layout (bf16, AMX CPUs); rowmajor: K [B, D] "
                        "(what a row-major shadow copy of K would give; vLLM's op then reads "
                        "garbage K but costs the same)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--report-name", default="kernels",
                   help="file stem of the --report files (kernels.json, kernels.md)")
    p.add_argument("--lsh-bits", type=int, default=7)
    p.add_argument("--impl", default="auto", choices=["auto", "cpp", "torch"],
                   help="sparse kernel (auto = fused C++ when it compiles); the torch path is "
                   "always timed too, as sparse_torch_ms")
    p.add_argument("--no-lsh", dest="lsh", action="store_false")
    p.add_argument("--kernel-column", action="store_true",
                   help="also time the sparse kernel alone on a selection made ahead (kernel_ms)")
    p.add_argument("--floor-column", action="store_true",
                   help="bf16 'amx' layout: also time read_floor.py's pure reads of the selected "
                        "tiles (floor_ms) and of the whole cache (readall_ms)")
    p.add_argument("--returning-column", action="store_true",
                   help="also time select_and_decode, which returns tensors (sparse_ret_ms)")
    p.add_argument("--sparq", type=int, default=4, metavar="R",
                   help="sparse_sparq column: SparQ ranking on R key channels + selection + "
                        "decode, the tile budget less the channels' bytes (0 = skip)")
    p.add_argument("--pq", type=int, default=4, metavar="M",
                   help="sparse_pq column: PQ ranking on M one-byte codes per token (random "
                        "codes and codebook: the cost, not the quality) + selection + decode, "
                        "the same tile budget as sparse_quest (0 = skip)")
    p.add_argument("--sparq4", type=int, default=8, metavar="R",
                   help="sparse_sparq4 column: SparQ ranking on R channels of the 4-bit key copy "
                        "(random codes: the cost, not the quality) + selection + decode, its "
                        "budget per --sparq4-budget and --sparq4-cap (0 = skip)")
    p.add_argument("--sparq4-wide", type=int, default=0, metavar="R",
                   help="sparse_sparq4w column: the same call ranking on R channels, "
                        "sparq4w_over_sparq4 its ratio to sparse_sparq4, side by side")
    for col in ("sparq4", "sparq4-wide"):
        p.add_argument(f"--{col}-cap", type=float, default=1.0,
                       help=f"the {col} column's query_cap_ratio (the rest: pre-scores)")
        p.add_argument(f"--{col}-budget", choices=["tiles", "bytes"], default="bytes",
                       help=f"the {col} column's keep ratio: of the tiles (side data read on "
                            "top), or of the bytes read, the key copy's channels and scales "
                            "included (as the backend's keep_ratio)")
    p.add_argument("--tiers", type=int, default=0, metavar="BITS",
                   help="also time the two-tier call with a BITS-bit K/V copy (0: off)")
    p.add_argument("--no-quest", dest="quest", action="store_false",
                   help="skip the sparse_quest column (Quest ranking + selection + decode)")
    p.add_argument("--iters", type=int, default=0, help="fixed iterations (default: scaled by context)")
    p.add_argument("--iter-budget", type=float, default=40.0, help="iterations at 16k (scaled 1/ctx)")
    p.add_argument("--working-set-mb", type=float, default=1024.0,
                   help="bytes read between two uses of a layer (past the LLC)")
    p.add_argument("--max-layers", type=int, default=1000)
    p.add_argument("--max-gb", type=float, default=8.0, help="memory for the layers' caches")
    p.add_argument("--quick", action="store_true", help="4k and 16k, batch 1 only")
    p.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    p.add_argument("--no-thp", action="store_true",
                   help="4 KiB pages for the caches (default: THP_MEM_ALLOC_ENABLE=1, as prescore-serve)")
    p.add_argument("--out", default=None, help="JSON path (default bench/out/sparse_decode_<time>.json)")
    p.add_argument("--report", default=None, help="directory for kernels.{json,md} (docs/results)")
    args = p.parse_args(argv)
    if args.k_layout == "amx" and args.dtype != "bfloat16":
        p.error("--k-layout amx is vLLM's bf16 layout: add --dtype bfloat16")
    torch.set_num_threads(args.threads)
    # Denormals flushed to zero (FTZ/DAZ) for every method. vLLM's CPU op ran 4x slower in some
    # processes (fp32, "vec", 4k to 64k: e.g. 4.6 instead of 1.1 ms at 4k, batch 1, every cell
    # of the run) and at its usual speed with FTZ/DAZ on, which points at denormal operands
    # (uninitialized scratch, depending on the process's allocation history). Our kernels
    # produce none (exp inputs clamped at -87), so this only keeps vLLM's op at its fast speed.
    torch.set_flush_denormal(True)
    global _WALL
    _WALL = args.wall or args.threads > 1  # thread CPU time is meaningless with a pool
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    if args.quick:
        contexts, batches = [c for c in contexts if c <= 16384], [1]
    keeps = [int(x) for x in args.keeps.split(",")]
    ops = _vllm_ops()
    if ops is not None and args.k_layout == "amx":
        if not torch.cpu._is_amx_tile_supported():
            print("[bench] no AMX on this CPU: vLLM's amx op cannot run; skipping the vllm "
                  "column", file=sys.stderr)
            ops = None
        else:
            torch.cpu._init_amx()  # the process must ask the kernel for AMX state first
    from prescore_backend.kernels import host

    header = " ".join(f"{k:>{int(f.split('>')[1].split('.')[0].rstrip('}'))}}" for k, f in _COLS)
    print(f"# host: {host.describe()}")
    print(f"# threads={args.threads} Hkv={args.kv_heads} G={args.group} D={args.head_dim} "
          f"B={args.block_size} T={args.tile} K-layout={args.k_layout} {args.dtype}; median {'wall' if _WALL else 'thread CPU'} ms "
          "per layer-step")
    print(header)
    results = []
    for ctx in contexts:
        for batch in batches:
            results.extend(run_config(ctx, batch, keeps, args, ops))
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "out" / f"sparse_decode_{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(thp=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", flush_denormal=True,
                k_layout=args.k_layout,
                dtype=args.dtype, clock="wall" if _WALL else "thread_cpu", threads=args.threads, kv_heads=args.kv_heads, group=args.group, head_dim=args.head_dim,
                block_size=args.block_size, tile=args.tile, torch=torch.__version__,
                machine=host.describe(), cpus=os.cpu_count())
    data = dict(meta=meta, results=results)
    out.write_text(json.dumps(data, indent=1))
    print(f"# wrote {out}")
    if args.report:
        cmd = "python bench/kernels/bench_sparse_decode.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        print(f"# wrote {write_report(data, Path(args.report), cmd, args.report_name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
