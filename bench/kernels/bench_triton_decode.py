"""GPU check and micro-benchmark of the Triton sparse paged decode (vLLM's GPU KV layout).

Two parts, each optional:

``--check``: the Triton kernels against an independent float64 oracle (the contiguous keys and
values that were written, masked to the selected tiles; not the paged cache), over MHA and
GQA (G 1/4/8), head dims 64/128, fp32 and bf16, tiles of 16 and 32, vLLM's GPU cache
layouts (before 0.32 and since), its CPU one, shuffled block tables, ragged lengths with partial last blocks, NaN-poisoned unused
slots, random selections (an empty one included) and every-tile selections, with the launcher's
own split plan and forced split counts. Fails (exit 1) on any mismatch.

Timing (unless ``--no-time``): one decode step of one layer, bf16 by default, per model preset
(``smollm2``: Hkv 3, G 3, D 64, the CPU benchmark's shape; ``llama3-8b``: Hkv 8, G 4, D 128),
context, batch and keep ratio, on a paged cache in vLLM's GPU layout ``[blocks, 2, B, Hkv, D]``
with shuffled blocks (B 16, vLLM's GPU default; T 16):
  * dense:    our kernel over every tile (exact paged flash-decoding, same code path);
  * sdpa:     ``torch.nn.functional.scaled_dot_product_attention`` on contiguous
              ``[R, Hkv, n, D]`` K/V (a vendor kernel without paging; the copy is not timed);
  * sparse:   our kernel over a preselected 1/keep of the tiles (kernel only);
  * select:   the selection kernel (``select_tiles(impl="triton")``, one launch, no host sync:
              random pre-scores, 2 sink + 10 window tiles, the product's defaults);
  * step:     select then sparse: the whole decode step of one layer;
  * sel.static: the same selection as torch ops without host syncs (``select_tiles_static``);
  * sel.torch: the general torch selection (``select_tiles(impl="torch")``, host syncs: eager only);
  * rank:     the default sparq4 ranking's Triton kernel (``triton_sparq4_tile_rank``: the
              4-bit key copy read through the block table) and, eagerly, the torch ops it
              replaced (gather and unpack the chosen channels of every block);
  * default:  the CUDA backend's default step of one layer (budget less the ranking's side
              data, pre-scores gathered, sparq4 ranking in Triton and its top-cap pick, Triton
              selection and sparse decode), its speedup over ``dense``, that speedup's share of
              the bytes-read limit (dense bytes / the default's bytes, side data included), and
              the peak bytes it allocates beyond the cache (CUDA) as a share of the layer's KV;
  * tiers:    (``--tiers BITS``) the two-tier step as the CUDA backend runs it
              (``prescore_backend.tiers.decode_two_tiers(impl="triton")``: the sparq4 ranking,
              the tiers' pick, the exact tier's selection and sparse decode and the low-bit
              decode, all Triton, no host sync), random key copy and BITS-bit K/V copy, the
              backend's budget split; ``tiers_over_step`` its GPU time over ``step``'s.
Several copies of the cache ("layers") are cycled so the working set exceeds the L2 cache.
Each time is the median of ``--rounds`` rounds (methods in shuffled order per round) of
``--iters`` calls between CUDA events: replayed from a CUDA graph (GPU time, what a
graph-captured decode step costs: vLLM captures decode on GPUs) and issued eagerly from Python
(launch overhead included).

Without a GPU (``--device cpu``) it runs under the Triton interpreter on tiny shapes: a smoke
run of the code, its timings meaningless.

Usage: python bench/kernels/bench_triton_decode.py --check [--quick] [--out bench/out/triton.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="cuda, cpu (Triton interpreter) or auto")
    p.add_argument("--check", action="store_true", help="run the correctness sweep")
    p.add_argument("--no-time", action="store_true", help="skip the timing part")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke runs)")
    p.add_argument("--presets", default="smollm2,llama3-8b")
    p.add_argument("--contexts", default="4096,16384,65536")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--keeps", default="4,8,16", help="keep ratios as denominators")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tile", type=int, default=16)
    p.add_argument("--block-n", type=int, default=None,
                   help="tokens per kernel iteration (default: the launcher's, 8192 / D)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--working-set-mb", type=float, default=512.0,
                   help="cycle cache copies until their bytes reach this")
    p.add_argument("--tiers", type=int, default=0, metavar="BITS",
                   help="also time the two-tier step with a BITS-bit K/V copy (0: off)")
    p.add_argument("--out", default="bench/out/triton_decode.json")
    return p.parse_args()


ARGS = _args()

import torch  # noqa: E402  (triton is imported after TRITON_INTERPRET is decided)

DEVICE = ARGS.device if ARGS.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

from prescore_backend.kernels import triton_sparse_decode as tsd  # noqa: E402
from prescore_backend.kernels.testing import all_tiles, make_paged_case  # noqa: E402
from prescore_backend.kernels.select import (  # noqa: E402
    select_tiles,
    select_tiles_ref,
    select_tiles_static,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PRESETS = {"smollm2": (3, 3, 64), "llama3-8b": (8, 4, 128),  # Hkv, G, D
           "qwen2.5-0.5b": (2, 7, 64)}
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
SINK_TILES, WINDOW_TILES = 2, 10  # PrescoreConfig defaults at T=16 (32 and 160 tokens)


# ----------------------------------------------------------------------------- check


def _random_tiles(seq_lens: list[int], hkv: int, tile: int, frac: float, gen: torch.Generator,
                  ) -> torch.Tensor:
    """``[R, Hkv, S]`` int32: ~frac of each row's tiles, unique, random order, -1 padding
    interleaved; (row 0, head 0) selects nothing."""
    nts = [-(-n // tile) for n in seq_lens]
    S = max(1, int(max(nts) * frac)) + 2
    out = torch.full((len(seq_lens), hkv, S), -1, dtype=torch.int32)
    for r, nt in enumerate(nts):
        for h in range(hkv):
            if r == 0 and h == 0:
                continue
            k = max(1, min(nt, int(nt * frac)))
            out[r, h, torch.randperm(S, generator=gen)[:k]] = \
                torch.randperm(nt, generator=gen)[:k].to(torch.int32)
    return out


def masked_ref(case, tiles: torch.Tensor, tile: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 oracle from the contiguous K/V that were written: softmax over the tokens of the
    selected tiles. -> out ``[R, Hq, D]``, lse ``[R, Hq]`` (0 and -inf where nothing is selected)."""
    R, Hq, D = case.query.shape
    Hkv = tiles.shape[1]
    G = Hq // Hkv
    out = torch.zeros(R, Hq, D, dtype=torch.float64)
    lse = torch.full((R, Hq), float("-inf"), dtype=torch.float64)
    t = tiles.cpu().long()
    for r in range(R):
        k, v = case.keys[r].double(), case.values[r].double()  # [Hkv, n, D]
        n = k.shape[1]
        nt = -(-n // tile)
        sel = torch.zeros(Hkv, nt + 1, dtype=torch.bool)
        sel.scatter_(1, torch.where(t[r] >= 0, t[r], nt), True)
        tok = sel[:, :nt].repeat_interleave(tile, 1)[:, :n].repeat_interleave(G, 0)  # [Hq, n]
        logits = scale * torch.einsum("hd,hnd->hn", case.query[r].cpu().double(),
                                      k.repeat_interleave(G, 0))
        logits = logits.masked_fill(~tok, float("-inf"))
        has = tok.any(1)
        lse[r, has] = torch.logsumexp(logits[has], -1)
        out[r, has] = torch.einsum("hn,hnd->hd", torch.softmax(logits[has], -1),
                                   v.repeat_interleave(G, 0)[has])
    return out, lse


def run_checks(quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    if quick:
        lens, cases = [70, 1, 33], [("gpu", 1, 64, torch.float32, 16, 32),
                                    ("triton", 2, 64, torch.float32, 16, 32),
                                    ("cpu", 4, 64, torch.bfloat16, 32, 32)]
        splits = [None, 3]
    else:
        lens = [4100, 1, 777, 2048, 16]
        cases = [(layout, g, d, dt, t, b)
                 for layout in ("gpu", "triton", "cpu")
                 for g, d in ((1, 128), (4, 64), (8, 128))
                 for dt in (torch.float32, torch.bfloat16)
                 for t, b in ((16, 16), (32, 32))]
        cases += [("gpu", 4, 128, torch.float16, 16, 16)]
        splits = [None, 5]
    rows = []
    t0 = time.perf_counter()
    for i, (layout, g, d, dt, t, b) in enumerate(cases):
        case = make_paged_case(lens, 2, g, d, b, layout=layout, dtype=dt, seed=i, device=DEVICE)
        scale = d ** -0.5
        atol, rtol = TOL[dt]
        for sel_name, tiles in (("random", _random_tiles(lens, 2, t, 0.3, gen)),
                                ("all", all_tiles(case.seq_lens.cpu(), 2, t))):
            ro, rl = masked_ref(case, tiles, t, scale)
            for ns in splits:
                o, lse = tsd.triton_sparse_decode(case.query, case.key_cache, case.value_cache,
                                          case.block_tables, case.seq_lens, tiles.to(DEVICE), t,
                                          scale, out_dtype=dt, num_splits=ns)
                o, lse = o.cpu().double(), lse.cpu().double()
                fin = torch.isfinite(rl)
                err = float((o - ro).abs().max())
                lerr = float((lse[fin] - rl[fin]).abs().max()) if bool(fin.any()) else 0.0
                ok = (bool(torch.isclose(o, ro.to(dt).double(), atol=atol, rtol=rtol).all())
                      and bool(torch.equal(torch.isinf(lse), ~fin)) and lerr < 1e-3
                      and not bool(o.isnan().any()))
                rows.append(dict(layout=layout, group=g, head_dim=d, dtype=str(dt).split(".")[-1],
                                 tile=t, block=b, selection=sel_name,
                                 splits="plan" if ns is None else ns, max_abs_err=err,
                                 max_lse_err=lerr, ok=ok))
        print(f"  case {i + 1}/{len(cases)} {layout} G {g} D {d} {dt} T {t} B {b}: "
              f"{'ok' if all(r['ok'] for r in rows) else 'FAILED'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


# ----------------------------------------------------------------------------- timing


def _time_round(fns: dict, layers: int, iters: int, graphs: dict | None = None) -> dict[str, float]:
    """One round: each method ``iters`` calls back to back (cycling layers) between events,
    eagerly; with ``graphs`` (name -> captured CUDA graph of the same calls) also replayed."""
    res = {}
    names = list(fns) + [f"graph:{n}" for n in (graphs or {})]
    random.shuffle(names)
    for name in names:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if name.startswith("graph:"):
                graphs[name[6:]].replay()
            else:
                for i in range(iters):
                    fns[name](i % layers)
            b.record()
            torch.cuda.synchronize()
            res[name] = a.elapsed_time(b) / iters
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                fns[name](i % layers)
            res[name] = (time.perf_counter() - t0) * 1e3 / iters
    return res


def _capture(fn, layers: int, iters: int):
    """A CUDA graph of ``iters`` calls of ``fn`` cycling the layers: replaying it times the GPU
    work alone, without Python's launch overhead (vLLM captures decode steps the same way)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fn(i % layers)
    return g


def _tiers_fn(q, views, bt, seq_lens, num_tiles, budget, M, blocks, Hkv, D, B, T, scale, g):
    """The CUDA backend's two-tier call on random copies (a 4-bit key copy for the ranking and
    an ARGS.tiers-bit K/V copy), one per layer."""
    from prescore_backend.config import PrescoreConfig
    from prescore_backend.kernels.lowbit import LowBitCopy
    from prescore_backend.side_data import SideData
    from prescore_backend.tiers import decode_two_tiers, tier_budgets

    cfg = PrescoreConfig(low_tier_bits=ARGS.tiers, tile_size=T, sink_tokens=SINK_TILES * T,
                         window_tokens=max(WINDOW_TILES * T, B + T))
    exact, total = tier_budgets(cfg, budget, num_tiles, D, B)
    u8 = lambda *s: torch.randint(0, 256, s, generator=g, device=DEVICE, dtype=torch.uint8)  # noqa: E731
    sides = []
    for _ in views:
        low = LowBitCopy(u8(blocks, Hkv, D, ARGS.tiers, B // 8),
                         torch.rand(blocks, Hkv, 2, D, generator=g, device=DEVICE).half(),
                         u8(blocks, Hkv, B, ARGS.tiers, D // 8),
                         torch.rand(blocks, Hkv, B, 2, generator=g, device=DEVICE).half())
        sides.append(SideData(torch.zeros(blocks, Hkv, B // T, device=DEVICE), None, None, None,
                              kq=u8(blocks, Hkv, D, B // 2),
                              kz=torch.rand(blocks, Hkv, 2, D, generator=g, device=DEVICE),
                              low=low))
    bt64 = bt.long()
    # the step's slot counts, host-side as in the backend's plan
    slots, low_slots = int(torch.minimum(exact, num_tiles).max()), int((total - exact).max())

    def fn(li: int):
        return decode_two_tiers(cfg, q, *views[li], sides[li], bt64, seq_lens, num_tiles, exact,
                                total, scale, impl="triton", num_slots=slots,
                                low_slots=low_slots)[0]

    return fn


def _default_fn(keep, q, bt, num_tiles, copies, scores, run, blocks, Hkv, D, B, T):
    """The CUDA backend's default step of one layer at keep 1/keep, as its ``_sparse_decode``
    runs it: the budget less the ranking's side data, the pre-scores gathered, the sparq4
    ranking (Triton) and its top-cap pick, the Triton selection, the sparse decode. -> (fn,
    info: exact tiles per row S and the bytes read per KV byte, side data included)."""
    from prescore_backend.config import PrescoreConfig
    from prescore_backend.selection import (query_caps, ratio_budgets, scores_and_pick,
                                            side_read_fraction)
    from prescore_backend.side_data import SideData

    cfg = PrescoreConfig(keep_ratio=1 / keep)
    frac = side_read_fraction(cfg, D, block_size=B)
    R = q.shape[0]
    budget, ranks = ratio_budgets(cfg, num_tiles.cpu(), torch.full((R,), 1 / keep,
                                  dtype=torch.float64), frac)
    caps = torch.where(ranks, query_caps(cfg, budget), 0)
    slots = int(torch.minimum(budget, num_tiles.cpu()).max())
    max_cap = int(caps.max())
    budget, caps = budget.to(DEVICE), caps.to(DEVICE)
    sides = [SideData(sc.new_zeros(blocks, Hkv, B // T), None, None, None, kq=kq, kz=kz)
             for sc, (kq, kz) in zip(scores, copies)]
    bt64 = bt.long()

    def fn(li: int):
        sc, pick = scores_and_pick(cfg, q, sides[li], bt64, num_tiles, caps, impl="triton",
                                   max_cap=max_cap, caps_uniform=True)
        sel = select_tiles(sc, num_tiles, budget, sink_tiles=cfg.sink_tiles,
                           window_tiles=cfg.window_tiles, lsh_match=pick, lsh_cap=max_cap,
                           impl="triton", num_slots=slots)
        return run(sel.tiles, li)

    n = int(num_tiles.max()) * T
    return fn, dict(S=slots, read=slots * T / n + (frac if bool(ranks.all()) else 0.0),
                    channels=cfg.ranking_channels(D))


def _peak_temp_bytes(fn) -> int | None:
    """Bytes one call allocates beyond what was allocated before it (CUDA), else None."""
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_cell(preset: str, ctx: int, batch: int, keeps: list[int], dtype: torch.dtype) -> list[dict]:
    Hkv, G, D = PRESETS[preset]
    Hq, B, T = Hkv * G, ARGS.block_size, ARGS.tile
    nblk = -(-ctx // B)
    blocks = batch * nblk + 1
    layer_bytes = blocks * 2 * B * Hkv * D * dtype.itemsize
    layers = max(1, min(64, math.ceil(ARGS.working_set_mb * 2**20 / layer_bytes)))
    if DEVICE == "cuda":  # keep the copies (+ contiguous SDPA copies) inside half the free memory
        free = torch.cuda.mem_get_info()[0]
        layers = max(1, min(layers, int(free * 0.4 / (2 * layer_bytes))))
    g = torch.Generator(device=DEVICE).manual_seed(ctx + batch)
    caches = [torch.randn(blocks, 2, B, Hkv, D, generator=g, device=DEVICE, dtype=dtype)
              for _ in range(layers)]  # vLLM's GPU layout
    views = [(c[:, 0].permute(0, 2, 1, 3), c[:, 1].permute(0, 2, 1, 3)) for c in caches]
    bt = torch.randperm(blocks - 1, generator=g, device=DEVICE)[: batch * nblk].view(batch, nblk)
    bt = bt.to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, Hq, D, generator=g, device=DEVICE, dtype=dtype)
    scale = D ** -0.5
    M = -(-ctx // T)
    num_tiles = torch.full((batch,), M, device=DEVICE)
    scores = [torch.randn(batch, Hkv, M, generator=g, device=DEVICE) for _ in range(layers)]
    allt = all_tiles(seq_lens, Hkv, T)
    # Contiguous K/V for SDPA: [R, Hkv, n, D] per layer (the gather is not timed).
    idx = bt.long()

    def contig(c: torch.Tensor) -> torch.Tensor:  # [blocks, B, Hkv, D] -> [R, Hkv, n, D]
        return c[idx].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()

    kv_contig = [(contig(c[:, 0]), contig(c[:, 1])) for c in caches]
    q4 = q.unsqueeze(2)  # [R, Hq, 1, D]

    def run(tiles: torch.Tensor, li: int):
        return tsd.triton_sparse_decode(q, *views[li], bt, seq_lens, tiles, T, scale, out_dtype=dtype,
                                block_n=ARGS.block_n)

    # the default ranking (sparq4 on the 4-bit key copy): the Triton kernel reading the copy
    # through the block table, against the torch ops it replaced (gather + unpack)
    from prescore_backend.config import PrescoreConfig
    from prescore_backend.keycopy import pack_blocks, sparq4_tile_rank, top_channels
    from prescore_backend.kernels.triton_sparq4 import triton_sparq4_tile_rank

    nc = PrescoreConfig().ranking_channels(D)
    copies = [pack_blocks(c[:, 0].permute(0, 2, 1, 3).float()) for c in caches]
    chans = top_channels(q, Hkv, nc)
    bt64 = bt.long()

    fns = {
        "rank_ms": lambda li: triton_sparq4_tile_rank(q, *copies[li], bt, chans, T),
        "rank_torch_ms": lambda li: sparq4_tile_rank(q, *copies[li], bt64, nc, T),
        "dense_ms": lambda li: run(allt, li),
        "sdpa_ms": lambda li: torch.nn.functional.scaled_dot_product_attention(
            q4, *kv_contig[li], scale=scale, enable_gqa=True),
    }
    picks, default_info = {}, {}
    for keep in keeps:
        budget = torch.full((batch,), max(1, M // keep), device=DEVICE)
        kw = dict(num_slots=max(1, M // keep), sink_tiles=SINK_TILES, window_tiles=WINDOW_TILES)
        sel = [select_tiles(s, num_tiles, budget, impl="triton", **kw).tiles for s in scores]
        picks[keep] = sel

        def select(li: int, budget=budget, kw=kw):  # one kernel, sync-free: graph-capturable
            return select_tiles(scores[li], num_tiles, budget, impl="triton", **kw)

        def select_static(li: int, budget=budget, kw=kw):  # torch ops, sync-free
            return select_tiles_static(scores[li], num_tiles, budget, **kw)

        def select_torch(li: int, budget=budget):  # the general torch path (host syncs)
            return select_tiles(scores[li], num_tiles, budget, sink_tiles=SINK_TILES,
                                window_tiles=WINDOW_TILES, impl="torch")

        fns[f"sparse_ms/{keep}"] = lambda li, sel=sel: run(sel[li], li)
        fns[f"default_ms/{keep}"], default_info[keep] = _default_fn(
            keep, q, bt, num_tiles, copies, scores, run, blocks, Hkv, D, B, T)
        fns[f"select_ms/{keep}"] = select
        fns[f"select_static_ms/{keep}"] = select_static
        fns[f"step_ms/{keep}"] = lambda li, select=select: run(select(li).tiles, li)
        fns[f"select_torch_ms/{keep}"] = select_torch
        if ARGS.tiers:
            fns[f"tiers_ms/{keep}"] = _tiers_fn(q, views, bt, seq_lens, num_tiles, budget, M,
                                                blocks, Hkv, D, B, T, scale, g)

    # Correctness on this cell: dense kernel == SDPA; the same for the sparse kernel with a
    # selection of every tile is covered by --check.
    # The sync-free selection on this device == the oracle (small cells: the oracle loops).
    sel_ok = None
    if batch * Hkv * M <= 8 * 1024:
        k0 = keeps[0]
        b0 = torch.full((batch,), max(1, M // k0))
        ref = select_tiles_ref(scores[0].cpu(), num_tiles.cpu(), b0, sink_tiles=SINK_TILES,
                               window_tiles=WINDOW_TILES)
        sel_ok = bool(torch.equal(picks[k0][0].cpu(), ref.tiles))
        if not sel_ok:
            raise SystemExit(f"select_tiles(impl='triton') on {DEVICE} differs from select_tiles_ref")
    od, _ = run(allt, 0)
    ref = fns["sdpa_ms"](0).squeeze(2)
    diff = float((od.float() - ref.float()).abs().max())
    for fn in fns.values():  # warm-up (compiles every specialization)
        fn(0)
    iters = ARGS.iters if DEVICE == "cuda" else 1
    graphs = None
    if DEVICE == "cuda":  # the kernels alone (the selection syncs with the host: eager only)
        graphs = {}
        for k, fn in fns.items():
            if k.startswith("select_torch"):
                continue
            try:
                graphs[k] = _capture(fn, layers, iters)
            except Exception as e:  # noqa: BLE001  (a path that syncs: eager time only)
                print(f"# {k}: not capturable ({type(e).__name__}); eager time only")
    rounds = [_time_round(fns, layers, iters, graphs)
              for _ in range(ARGS.rounds if DEVICE == "cuda" else 1)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    for k in fns:  # without graphs (the interpreter) the GPU-time columns are the eager ones
        if DEVICE != "cuda":
            med.setdefault(f"graph:{k}", med[k])
    tpi = max(1, (ARGS.block_n or max(16, 8192 // D)) // T)
    ns, per = tsd.plan_splits(batch, Hkv, M, tpi, tsd._num_sms(q.device))
    out = []
    for keep in keeps:
        S = picks[keep][0].shape[2]
        ns_k, _ = tsd.plan_splits(batch, Hkv, S, tpi, tsd._num_sms(q.device))
        row = dict(preset=preset, Hkv=Hkv, G=G, D=D, ctx=ctx, batch=batch, keep=f"1/{keep}",
                   layers=layers, S=S,
                   # GPU time (CUDA graph replay)
                   dense_ms=med["graph:dense_ms"], sdpa_ms=med["graph:sdpa_ms"],
                   sparse_ms=med[f"graph:sparse_ms/{keep}"],
                   select_ms=med[f"graph:select_ms/{keep}"],
                   select_static_ms=med[f"graph:select_static_ms/{keep}"],
                   step_ms=med[f"graph:step_ms/{keep}"],
                   # eager: Python launches, as a step without CUDA graphs pays
                   dense_eager_ms=med["dense_ms"], step_eager_ms=med[f"step_ms/{keep}"],
                   select_torch_eager_ms=med[f"select_torch_ms/{keep}"],
                   dense_splits=ns, sparse_splits=ns_k, max_abs_diff_dense_vs_sdpa=diff,
                   select_matches_ref=sel_ok, rank_channels=nc,
                   rank_ms=med["graph:rank_ms"], rank_torch_eager_ms=med["rank_torch_ms"])
        if ARGS.tiers:
            row["tiers_ms"] = med.get(f"graph:tiers_ms/{keep}")
            row["tiers_eager_ms"] = med[f"tiers_ms/{keep}"]
            t = row["tiers_ms"] if row["tiers_ms"] is not None else row["tiers_eager_ms"]
            row["tiers_over_step"] = t / (row["step_ms"] if row["tiers_ms"] is not None
                                          else row["step_eager_ms"])
        info = default_info[keep]
        row["default_ms"] = med[f"graph:default_ms/{keep}"]
        row["default_eager_ms"] = med[f"default_ms/{keep}"]
        row["default_S"], row["default_channels"] = info["S"], info["channels"]
        # the default step (ranking + selection + decode) against the dense kernel, and the
        # bytes-read limit of that ratio: dense reads 1, the default info["read"] of the KV
        row["default_speedup_vs_dense"] = row["dense_ms"] / row["default_ms"]
        row["default_read_fraction"] = info["read"]
        row["default_of_read_limit"] = row["default_speedup_vs_dense"] * info["read"]
        temp = _peak_temp_bytes(fns[f"default_ms/{keep}"])
        row["default_temp_bytes"] = temp
        row["default_temp_of_kv"] = None if temp is None else temp / layer_bytes
        row["kernel_speedup_vs_dense"] = row["dense_ms"] / row["sparse_ms"]
        row["step_speedup_vs_dense"] = row["dense_ms"] / row["step_ms"]
        row["step_speedup_vs_sdpa"] = row["sdpa_ms"] / row["step_ms"]
        row["eager_step_speedup_vs_dense"] = row["dense_eager_ms"] / row["step_eager_ms"]
        # bytes of K+V the kernel reads / its time: how close to the memory's bandwidth
        row["dense_GBps"] = batch * ctx * Hkv * D * 2 * dtype.itemsize / row["dense_ms"] / 1e6
        row["sparse_GBps"] = (batch * S * T * Hkv * D * 2 * dtype.itemsize
                              / row["sparse_ms"] / 1e6)
        out.append(row)
    del caches, views, kv_contig, copies
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    random.seed(0)
    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)",
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                dtype=ARGS.dtype, block_size=ARGS.block_size, tile=ARGS.tile, block_n=ARGS.block_n,
                iters=ARGS.iters, rounds=ARGS.rounds, working_set_mb=ARGS.working_set_mb,
                interpreted=tsd.INTERPRETED, argv=sys.argv[1:],
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    data: dict = dict(meta=meta)
    failed = 0
    if ARGS.check:
        checks = run_checks(ARGS.quick or DEVICE == "cpu")
        failed = sum(not c["ok"] for c in checks)
        data["check"] = dict(cases=len(checks), failed=failed, rows=checks)
        worst = max(checks, key=lambda c: c["max_abs_err"])
        print(f"check: {len(checks)} cases, {failed} failed; largest |err| {worst['max_abs_err']:.2e}"
              f" ({worst['dtype']}, G {worst['group']}, D {worst['head_dim']})")
        for c in checks:
            if not c["ok"]:
                print("  FAILED", c)
    if not ARGS.no_time:
        dtype = DTYPES[ARGS.dtype]
        small = ARGS.quick or DEVICE == "cpu"
        ctxs = [256] if DEVICE == "cpu" else [int(c) for c in ARGS.contexts.split(",")]
        batches = [2] if DEVICE == "cpu" else [int(b) for b in ARGS.batches.split(",")]
        keeps = [int(k) for k in ARGS.keeps.split(",")]
        presets = ARGS.presets.split(",")[:1] if small else ARGS.presets.split(",")
        rows = []
        hdr = (f"{'':25}|{'GPU time (CUDA graphs), ms':^44}|{'kernel':^7}|{'step speedup':^15}|"
               f"{'':7}|{'eager, ms':^26}\n"
               f"{'preset':10} {'ctx':>6} {'b':>2} {'keep':>5}|{'dense':>8} {'sdpa':>8} {'sparse':>8} "
               f"{'select':>8} {'step':>8}|{'x dense':>7}|{'x dense':>7} {'x sdpa':>7}|{'GB/s s':>7}|"
               f"{'dense':>8} {'step':>8} {'sel.torch':>9}")
        print(hdr)
        for preset in presets:
            for ctx in ctxs:
                for batch in batches:
                    for r in time_cell(preset, ctx, batch, keeps, dtype):
                        rows.append(r)
                        print(f"{preset:10} {ctx:6d} {batch:2d} {r['keep']:>5}|{r['dense_ms']:8.4f} "
                              f"{r['sdpa_ms']:8.4f} {r['sparse_ms']:8.4f} {r['select_ms']:8.4f} "
                              f"{r['step_ms']:8.4f}|{r['kernel_speedup_vs_dense']:7.2f}|"
                              f"{r['step_speedup_vs_dense']:7.2f} {r['step_speedup_vs_sdpa']:7.2f}|"
                              f"{r['sparse_GBps']:7.0f}|{r['dense_eager_ms']:8.4f} "
                              f"{r['step_eager_ms']:8.4f} {r['select_torch_eager_ms']:9.4f}",
                              flush=True)
                        tmp = r["default_temp_of_kv"]
                        print(f"{'':25}  default (rank+select+decode, {r['default_channels']} "
                              f"channels): GPU {r['default_ms']:.4f} ms, "
                              f"{r['default_speedup_vs_dense']:.2f}x dense, "
                              f"{r['default_of_read_limit']:.0%} of the bytes-read limit "
                              f"{1 / r['default_read_fraction']:.2f}x; temporaries "
                              f"{'n/a' if tmp is None else f'{tmp:.2%}'} of the layer's KV",
                              flush=True)
                        if ARGS.tiers:
                            print(f"{'':25}  tiers: GPU {r['tiers_ms'] or float('nan'):.4f} ms, "
                                  f"eager {r['tiers_eager_ms']:.4f} ms, "
                                  f"{r['tiers_over_step']:.2f}x the step", flush=True)
        data["results"] = rows
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(data, indent=1))
    print(f"wrote {ARGS.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
