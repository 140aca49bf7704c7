"""Greedy repetition under sparse decode: does a selection make the model loop?

    .venv/bin/python bench/quality/eval_repetition.py --out /tmp/rep.json
    .venv/bin/python bench/quality/eval_repetition.py --smoke --out /tmp/rep.json   # tests

Perplexity is teacher-forced: it never lets a selection feed the model its own tokens. Here
every (method, budget) row generates greedily from the same exact prefill (``--windows``
windows of ``--context`` tokens per text, the windows of ``eval_selection.py``), and each
generation of ``--new-tokens`` tokens is scored for repetition:

* ``repeated_4grams``: the share of its 4-grams seen earlier in the same generation;
* ``distinct``: distinct tokens / tokens;
* ``loops``: generations whose last half has fewer distinct tokens than a third of its length
  (the degenerate "in detail in detail ..." loops);
* ``agree``: tokens generated before the first one that differs from dense.

Per method: the mean over generations, and the mean difference of ``repeated_4grams``
against dense with a 95% bootstrap interval over generations (paired: same prefixes).
Budgets are fractions of the KV bytes read per step, side data included (``equal_bytes``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_core import Llama, method, run_context  # noqa: E402
from eval_quality import git_commit, machine  # noqa: E402
from eval_selection import load_text  # noqa: E402

DEFAULT_METHODS = "dense,streaming,prescore_leverage,prescore_leverage@query_aware=pq"


def scores(gen: list[int], dense: list[int]) -> dict:
    """Repetition scores of one generation (and its agreement with dense's)."""
    n = len(gen)
    grams = [tuple(gen[i:i + 4]) for i in range(n - 3)]
    seen: set = set()
    rep = 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    tail = gen[n // 2:]
    agree = next((i for i, (a, b) in enumerate(zip(gen, dense)) if a != b), min(n, len(dense)))
    return {"repeated_4grams": rep / max(len(grams), 1), "distinct": len(set(gen)) / n,
            "loop": len(set(tail)) < len(tail) / 3, "agree": agree}


def bootstrap_mean(x: torch.Tensor, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``x`` and its 95% bootstrap interval."""
    g = torch.Generator().manual_seed(seed)
    boots = x.double()[torch.randint(0, x.numel(), (n, x.numel()), generator=g)].mean(1)
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(x.double().mean()), lo, hi


def summarize(gens: dict[str, list[list[int]]]) -> dict:
    """Per row label: means over generations and the paired difference against dense."""
    dense = gens["dense|1"]
    out = {}
    for label, gs in gens.items():
        sc = [scores(g, d) for g, d in zip(gs, dense)]
        row = {"generations": len(sc),
               "repeated_4grams": sum(s["repeated_4grams"] for s in sc) / len(sc),
               "distinct": sum(s["distinct"] for s in sc) / len(sc),
               "loops": sum(s["loop"] for s in sc),
               "agree": sum(s["agree"] for s in sc) / len(sc)}
        if label != "dense|1":
            base = [scores(d, d)["repeated_4grams"] for d in dense]
            row["repeated_4grams_vs_dense"] = bootstrap_mean(
                torch.tensor([s["repeated_4grams"] for s in sc]) - torch.tensor(base))
        out[label] = row
    return out


def write_report(path: str, gens: dict, summary: dict, meta: dict, markdown) -> None:
    """``path`` (JSON: meta, summary, every generation) and its ``.md`` (``markdown``'s
    table, also printed)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "generated": gens}) + "\n")
    md = markdown(summary, meta)
    out.with_suffix(".md").write_text(md)
    print(md)


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Greedy repetition under sparse decode ({meta['date']})", "",
             f"Model {meta['model']}, context {meta['context']}, {meta['windows']} windows x "
             f"{len(meta['texts'])} texts ({', '.join(meta['texts'])}), {meta['new_tokens']} greedy "
             f"tokens each; host {meta['machine']['cpu']}; command `{meta['command']}` "
             f"(commit {meta['git_commit']}).", "",
             "| method | budget | repeated 4-grams | vs dense [95% CI] | distinct tokens | loops "
             "| tokens equal to dense's |", "|---|---|---|---|---|---|---|"]
    for label, r in summary.items():
        m, ratio = label.rsplit("|", 1)
        vs = ("{:+.3f} [{:+.3f}, {:+.3f}]".format(*r["repeated_4grams_vs_dense"])
              if "repeated_4grams_vs_dense" in r else "-")
        lines.append(f"| {method(m).label} | {'-' if m == 'dense' else '1/' + str(round(1 / float(ratio)))} "
                     f"| {r['repeated_4grams']:.3f} | {vs} | {r['distinct']:.3f} "
                     f"| {r['loops']} of {r['generations']} | {r['agree']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", default="play,prose,code")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ratios", default="0.125")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tests: 512 tokens, 1 window, 16 tokens")
    p.add_argument("--out", required=True, help="JSON (and .md beside it)")
    a = p.parse_args(argv)
    if a.smoke:
        a.context, a.windows, a.new_tokens, a.texts = 512, 1, 16, "prose,code"
        a.ratios, a.methods = "0.25", "dense,streaming,prescore_leverage"
    torch.set_num_threads(a.threads)
    from prescore_backend.server.models import resolve_model

    mp = Path(resolve_model(a.model))
    model = Llama(mp)
    methods = [m for m in a.methods.split(",") if m]
    if "dense" not in methods:
        p.error("--methods must include dense (the reference)")
    ratios = [float(r) for r in a.ratios.split(",")]
    gens: dict[str, list[list[int]]] = {}
    t0 = time.perf_counter()
    for t in a.texts.split(","):
        toks, _ = load_text(mp, t)
        span = a.context + 1
        step = (toks.numel() - span) // max(a.windows - 1, 1) if a.windows > 1 else 0
        for w in range(a.windows):
            print(f"{t} window {w}", file=sys.stderr, flush=True)
            res = run_context(model, toks[w * step: w * step + span + a.new_tokens], a.context,
                              a.new_tokens, methods, ratios, text=t, equal_bytes=True,
                              greedy=True, log=lambda x: print(x, file=sys.stderr, flush=True))
            for (m, r), g in res.generated.items():
                gens.setdefault(f"{m}|{r:g}", []).append(g)
    summary = summarize(gens)
    meta = {"model": a.model, "context": a.context, "windows": a.windows,
            "new_tokens": a.new_tokens, "texts": a.texts.split(","), "machine": machine(),
            "git_commit": git_commit(), "wall_s": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/quality/eval_repetition.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    write_report(a.out, gens, summary, meta, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
