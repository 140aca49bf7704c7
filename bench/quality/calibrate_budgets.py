"""Fit a per-(layer, KV head) budget profile on the calibration text (Macbeth), never on an
evaluation text: exact prefills of ``--windows`` windows of ``--context`` tokens, the exact
attention of ``--queries`` queries per window (the last positions, every ``--stride``-th) ->
:class:`head_budgets.BudgetProfile` (bench/quality/head_budgets.py).

    .venv/bin/python bench/quality/calibrate_budgets.py --out /tmp/profile.pt
    .venv/bin/python bench/quality/eval_selection.py --budget-profile /tmp/profile.pt \\
        --methods dense,streaming,oracle,heads:oracle

Prints, per layer, the share of a 1/8 budget of a ``--context`` context each KV head gets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_selection import load_text  # noqa: E402

from prescore_backend.config import PrescoreConfig  # noqa: E402
from head_budgets import ProfileAccumulator  # noqa: E402
from prescore_backend.llama_ref import Llama  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--free", action="store_true",
                   help="curves of the free oracle (no forced sinks and window)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from prescore_backend.server.models import resolve_model

    cfg = PrescoreConfig.from_env()
    model_path = Path(resolve_model(args.model))
    model = Llama(model_path)
    s = model.spec
    toks, source = load_text(model_path, "calibration")
    acc = ProfileAccumulator(s.layers, s.kv_heads, cfg.tile_size,
                             sink_tiles=0 if args.free else cfg.sink_tiles,
                             window_tiles=0 if args.free else cfg.window_tiles)
    step = (toks.numel() - args.context) // max(args.windows - 1, 1)
    pos = torch.arange(args.context - 1 - args.stride * (args.queries - 1), args.context,
                       args.stride)
    keys: dict[int, torch.Tensor] = {}
    for w in range(args.windows):
        ids = toks[w * step: w * step + args.context]
        print(f"window {w + 1}/{args.windows}: tokens {w * step}..{w * step + args.context}",
              file=sys.stderr, flush=True)
        model.prefill(ids, on_kv=lambda i, k, v: keys.__setitem__(i, k),
                      on_q=lambda i, q: acc.add(i, q[:, pos], keys[i], pos, model.scale),
                      logits="none")
    prof = acc.profile(model=args.model, text=source, context=args.context,
                       windows=args.windows, queries=args.queries, stride=args.stride,
                       tile_size=cfg.tile_size, forced=not args.free)
    prof.save(args.out)
    n = args.context // cfg.tile_size
    b = prof.budgets(-(-n // 8), n, cfg.sink_tiles + cfg.window_tiles)
    print(f"tiles per KV head at keep 1/8 of {n} tiles (uniform {-(-n // 8)}):")
    for layer in range(s.layers):
        print(f"  layer {layer:2d}: " + " ".join(f"{int(x):4d}" for x in b[layer]))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
