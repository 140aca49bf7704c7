"""Micro-benchmark: cost of each registered scorer per 1k tokens (all KV heads of a layer at once).

Keys ``[Hkv, n, D]`` (fp32, random with a few heavy directions, like real keys) are scored as
the backend does after prefill, once per layer. Prints a table (ms per call, ms per 1k keys,
and the projected seconds for a prompt of n tokens over ``--layers`` layers) and writes JSON.

Usage: python bench/kernels/bench_scorers.py [--n 4096,8192] [--threads 1] [--out bench/out/x.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prescore_backend.scoring import available_scorers, get_scorer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="4096,8192", help="keys per head")
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=30, help="for the per-prompt projection")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scorers", default=",".join(available_scorers()))
    p.add_argument("--extra", default="kmeans:num_clusters=64",
                   help="extra configurations name:key=value[;...], comma separated")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter

    configs: list[tuple[str, str, dict]] = [(s, s, {}) for s in args.scorers.split(",") if s]
    for spec in filter(None, args.extra.split(",")):
        name, _, kv = spec.partition(":")
        kw = {k: int(v) for k, v in (x.split("=") for x in kv.split(";") if x)}
        configs.append((spec, name, kw))

    gen = torch.Generator().manual_seed(0)
    results = []
    print(f"# threads={args.threads} Hkv={args.kv_heads} D={args.head_dim}; "
          f"{'thread CPU' if args.threads == 1 else 'wall'} time, median of {args.repeats}")
    print(f"{'scorer':>24} {'n':>6} {'ms/call':>9} {'ms/1k tok':>11} {'s/prompt':>9}")
    for n in (int(x) for x in args.n.split(",")):
        scale = torch.linspace(0.2, 2.0, args.head_dim)  # anisotropic, as real keys
        keys = torch.randn(args.kv_heads, n, args.head_dim, generator=gen) * scale
        keys[:, :: max(1, n // 32)] *= 4  # a few heavy keys
        for label, name, kw in configs:
            scorer = get_scorer(name, **kw)
            scorer.score(keys)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = clock()
                scorer.score(keys)
                times.append(clock() - t0)
            ms = 1e3 * statistics.median(times)
            per_1k = ms / (n / 1000)
            r = dict(scorer=label, n=n, kv_heads=args.kv_heads, ms=ms, ms_per_1k_tokens=per_1k,
                     s_per_prompt=ms * args.layers / 1e3)
            results.append(r)
            print(f"{label:>24} {n:>6} {ms:>9.2f} {per_1k:>11.3f} {r['s_per_prompt']:>9.2f}", flush=True)
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "out" / f"scorers_{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=vars(args), results=results), indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
