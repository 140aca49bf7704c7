"""Long-context task accuracy through a real server: dense vs prescore at several keep ratios.

    python bench/serving/eval_longctx.py [--lengths 8192 16384 32768] [--contexts 3]
        [--keep-ratios 0.25 0.125 0.0625] [--url URL] [--out docs/results/longctx.json]

Without ``--url`` it starts ``prescore-serve qwen2.5-coder-0.5b`` (the 32k model; prepare it
first with ``prescore-models prepare qwen2.5-coder-0.5b``) and stops it at the end. The tasks
are :mod:`longctx_tasks` (RULER-style, generated locally with fixed seeds): per length,
``--contexts`` haystacks with nine questions each, each context ``HEADROOM`` tokens short
of the length (room for the template, the question and the answer). Each question is asked once per method on
the same server, the method chosen per request (``vllm_xargs``): ``prescore_dense`` (exact
attention through vLLM's kernel) and ``prescore_keep_ratio`` r (prescore's default ranking
at that share of the bytes, side data included). Questions and methods of one context share
its prefill through the prefix cache: the first question is asked alone, the rest together.
Greedy, chat template. Writes JSON and a Markdown table (accuracy, Wilson 95% intervals, the
paired difference to dense with a bootstrap interval over questions).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from longctx_tasks import (chat_messages, make_code_context, make_context,  # noqa: E402
                           make_words_context)

#: task suites: ``needles`` (nine distinct needles per context), ``code`` (calls to
#: functions defined far back in a long Python file) and ``words`` (common-word extraction)
SUITES = {"needles": make_context, "code": make_code_context, "words": make_words_context}

MODEL = "qwen2.5-coder-0.5b"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def paired_diff(a: list[bool], b: list[bool], reps: int = 2000, seed: int = 0):
    """Mean of a - b (accuracy points) with a bootstrap 95% interval over questions."""
    d = [int(x) - int(y) for x, y in zip(a, b)]
    if not d:
        return 0.0, (0.0, 0.0)
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(d) for _ in d) / len(d) for _ in range(reps))
    return sum(d) / len(d), (means[int(0.025 * reps)], means[int(0.975 * reps) - 1])


def methods(keep_ratios: list[float], streaming_ratios: list[float] = (),
            label: str = "") -> dict[str, dict]:
    """Method name -> the request's ``vllm_xargs``: dense, the server's selection at each keep
    ratio (named ``"{label}keep r"``; the label tells another server configuration's rows
    apart), and StreamingLLM (sinks + most recent tiles, ``prescore_streaming``) at the same
    bytes."""
    out = {"dense": {"prescore_dense": True}}
    for r in keep_ratios:
        out[f"{label}keep {r:g}"] = {"prescore_keep_ratio": r}
    for r in streaming_ratios:
        out[f"streaming {r:g}"] = {"prescore_keep_ratio": r, "prescore_streaming": True}
    return out


def ask(url: str, messages: list[dict], xargs: dict, max_tokens: int) -> tuple[str, int]:
    r = requests.post(url + "/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "vllm_xargs": xargs}, timeout=3600)
    r.raise_for_status()
    j = r.json()
    return j["choices"][0]["message"]["content"], j["usage"]["prompt_tokens"]


#: a task is kept at a length when dense attention answers at least this share of it
KEEP_TASK = 0.8
#: tokens a context leaves of its length for the chat template, the question and the answer
#: (a 32768-token cell fits the model's 32768-token context)
HEADROOM = 200


def run(url: str, lengths: list[int], n_contexts: int, meth: dict[str, dict], seed: int,
        tokenizer, workers: int, rows: list[dict] | None = None,
        checkpoint=lambda rows: None, suite: str = "needles") -> list[dict]:
    """Every (length, context)'s questions under every method of ``meth`` (:func:`methods`);
    ``rows``: results of an earlier run (the methods a (length, context) already has are
    skipped there); ``checkpoint(rows)`` after each context."""
    rows = list(rows or [])
    all_meth = meth
    for length in lengths:
        for c in range(n_contexts):
            have = {r["method"] for r in rows if r["length"] == length and r["context"] == c}
            meth = {n: x for n, x in all_meth.items() if n not in have}
            if not meth:
                continue
            ctx = SUITES[suite](tokenizer, length - HEADROOM, c, seed)
            jobs = [(qi, q, name, xargs) for qi, q in enumerate(ctx.questions)
                    for name, xargs in meth.items()]
            t0 = time.perf_counter()
            first = jobs[0]  # prefills the context; the rest hit the prefix cache
            results = {(first[0], first[2]): ask(url, chat_messages(ctx, first[1]), first[3], 64)}
            ttft = time.perf_counter() - t0
            with cf.ThreadPoolExecutor(workers) as pool:
                futs = {pool.submit(ask, url, chat_messages(ctx, q), xargs, 64): (qi, name)
                        for qi, q, name, xargs in jobs[1:]}
                for f in cf.as_completed(futs):
                    results[futs[f]] = f.result()
            for qi, q, name, _ in jobs:
                reply, ptoks = results[(qi, name)]
                rows.append({"length": length, "context": c, "question": qi, "task": q.task,
                             "method": name, "prompt_tokens": ptoks, "reply": reply,
                             "answers": q.answers, "correct": q.correct(reply)})
            acc = {n: sum(r["correct"] for r in rows if r["length"] == length and
                          r["context"] == c and r["method"] == n) for n in meth}
            print(f"[longctx] {length} tokens, context {c}: first request {ttft:.0f} s, "
                  f"all {time.perf_counter() - t0:.0f} s; correct of {len(ctx.questions)}: "
                  f"{acc}", flush=True)
            checkpoint(rows)
    return rows


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    lengths = sorted({r["length"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    for length in lengths:
        sub = [r for r in rows if r["length"] == length]
        key = lambda r: (r["context"], r["question"])  # noqa: E731
        dense = {key(r): r["correct"] for r in sub if r["method"] == "dense"}
        cell: dict = {}
        for name in names:
            rs = [r for r in sub if r["method"] == name]
            k, n = sum(r["correct"] for r in rs), len(rs)
            d, ci = paired_diff([r["correct"] for r in rs], [dense[key(r)] for r in rs])
            cell[name] = {"correct": k, "n": n, "accuracy": k / n if n else 0.0,
                          "wilson95": wilson(k, n), "vs_dense": d, "vs_dense95": ci,
                          "by_task": {t: [sum(r["correct"] for r in rs if r["task"] == t),
                                          sum(r["task"] == t for r in rs)] for t in tasks}}
        for name, c in cell.items():  # the ranking against StreamingLLM at equal bytes
            base = "streaming " + name.split("keep ")[-1]
            if "keep " in name and base in cell:
                rs = sorted((r for r in sub if r["method"] == name), key=key)
                st = {key(r): r["correct"] for r in sub if r["method"] == base}
                c["vs_streaming"], c["vs_streaming95"] = paired_diff(
                    [r["correct"] for r in rs if key(r) in st], [st[key(r)] for r in rs
                                                                  if key(r) in st])
        out[str(length)] = cell
    return out


def markdown(summary: dict, meta: dict) -> str:
    tasks = list(next(iter(next(iter(summary.values())).values()))["by_task"])
    lines = [f"# Long-context task accuracy ({meta['model']}, {meta['dtype']})", "",
             f"Host: {meta['host']}. Command: `{meta['command']}`.", ""]
    for run in meta.get("more_runs", []):  # another server configuration's labelled rows
        lines += [f"More rows from another server: `{run['command']}`.", ""]
    lines += ["Accuracy over all questions of a length (Wilson 95% interval); vs dense: the paired "
             "difference in points (bootstrap 95% interval over questions; negative = worse than "
             "dense). Per task: correct / asked.", "",
             "| context | method | accuracy | 95% CI | vs dense | " +
             " | ".join(tasks) + " |", "|---|---|---|---|---|" + "---|" * len(tasks)]
    for length, cell in summary.items():
        for name, c in cell.items():
            lo, hi = c["wilson95"]
            d, (dlo, dhi) = c["vs_dense"], c["vs_dense95"]
            per_task = " | ".join(f"{k}/{n}" for k, n in c["by_task"].values())
            lines.append(f"| {length} | {name} | {100 * c['accuracy']:.1f}% ({c['correct']}/"
                         f"{c['n']}) | [{100 * lo:.0f}, {100 * hi:.0f}] | "
                         f"{100 * d:+.1f} [{100 * dlo:+.0f}, {100 * dhi:+.0f}] | {per_task} |")
    vs = [(length, name, c) for length, cell in summary.items() for name, c in cell.items()
          if "vs_streaming" in c]
    if vs:
        lines += ["", "The default ranking against StreamingLLM (`prescore_streaming`: sinks and "
                  "the most recent tiles) reading the same bytes per step, paired over the same "
                  "questions (positive = the ranking answered more):", "",
                  "| context | method | ranking | StreamingLLM | ranking - StreamingLLM "
                  "(95% CI) | dense |", "|---|---|---|---|---|---|"]
        for length, name, c in vs:
            st, de = summary[length]["streaming " + name.split("keep ")[-1]], summary[length]["dense"]
            d, (lo, hi) = c["vs_streaming"], c["vs_streaming95"]
            lines.append(f"| {length} | {name} | {c['correct']}/{c['n']} | "
                         f"{st['correct']}/{st['n']} | {100 * d:+.1f} [{100 * lo:+.0f}, "
                         f"{100 * hi:+.0f}] | {de['correct']}/{de['n']} |")
    lines += ["", f"Tasks kept per length: those dense answers at least {KEEP_TASK:.0%} of (a "
              "task the model cannot do with exact attention says nothing about the "
              "selection). Accuracy on the kept tasks:", "",
              "| context | kept tasks | dropped (dense accuracy) | " +
              " | ".join(next(iter(summary.values())).keys()) + " |",
              "|---|---|---|" + "---|" * len(next(iter(summary.values())))]
    for length, cell in summary.items():
        dense = cell["dense"]["by_task"]
        kept = [t for t, (k, n) in dense.items() if n and k / n >= KEEP_TASK]
        dropped = ", ".join(f"{t} ({k}/{n})" for t, (k, n) in dense.items()
                            if n and t not in kept) or "-"
        accs = []
        for c in cell.values():
            k = sum(c["by_task"][t][0] for t in kept)
            n = sum(c["by_task"][t][1] for t in kept)
            accs.append(f"{100 * k / n:.1f}% ({k}/{n})" if n else "-")
        lines.append(f"| {length} | {', '.join(kept) or '-'} | {dropped} | {' | '.join(accs)} |")
    return "\n".join(lines) + "\n"


def speed_points(speed: dict) -> dict[tuple[int, int], list[tuple[float, float]]]:
    """(context, batch) -> sorted (keep ratio, decode speedup over CPU_ATTN) from a
    ``bench_vllm_decode.py`` JSON (rows ``PRESCORE@<keep ratio>``) or a ``bench_ledger.py``
    JSON (one keep ratio per run: its ``keep_ratio``, else the default setting's)."""
    pts: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for r in speed["rows"]:
        if "ctx" in r:  # bench_vllm_decode
            if "@" not in r["backend"] or not r.get("speedup_vs_cpu_attn"):
                continue
            key, pt = (r["ctx"], r["batch"]), (float(r["backend"].split("@")[1]),
                                               r["speedup_vs_cpu_attn"])
        else:  # bench_ledger
            from prescore_backend.config import PrescoreConfig

            keep = r.get("keep_ratio") or PrescoreConfig().keep_ratio
            key, pt = (r["context"], r["batch"]), (float(keep), r["speedup"])
        pts.setdefault(key, []).append(pt)
    return {k: sorted(v) for k, v in sorted(pts.items())}


def plot(summary: dict, meta: dict, path: Path, speed: dict | None = None) -> None:
    """Accuracy against keep ratio per context length (dense at 1), and, with ``speed`` (a
    bench_vllm_decode.py or bench_ledger.py JSON), decode speedup over CPU_ATTN against keep
    ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(10 if speed else 5.5, 4))
    ax = axes[0] if speed else axes
    for length, cell in summary.items():
        pts = sorted((1.0 if n == "dense" else float(n.split()[1]), 100 * c["accuracy"],
                      100 * c["wilson95"][0], 100 * c["wilson95"][1]) for n, c in cell.items()
                     if n == "dense" or n.startswith("keep "))
        x, y, lo, hi = zip(*pts)
        line = ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)],
                                       [b - a for a, b in zip(y, hi)]],
                           marker="o", capsize=3, label=f"{int(length) // 1024}k tokens")
        st = sorted((float(n.split()[1]), 100 * c["accuracy"]) for n, c in cell.items()
                    if n.startswith("streaming"))
        if st:
            ax.plot(*zip(*st), linestyle="--", marker="x", color=line[0].get_color(),
                    label=f"{int(length) // 1024}k, StreamingLLM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("keep ratio (share of KV bytes read per step; 1 = dense)")
    ax.set_ylabel("questions answered (%), 95% CI")
    ax.set_title(f"Long-context tasks, {meta['model']}")
    ax.legend(fontsize=8)
    if speed:
        ax2 = axes[1]
        for (ctx, batch), pts in speed_points(speed).items():
            ax2.plot(*zip(*([(1.0, 1.0)] + pts)), marker="o",
                     label=f"{round(ctx / 1000)}k tokens, batch {batch}")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("keep ratio (1 = vLLM's exact CPU attention)")
        ax2.set_ylabel("decode speedup vs CPU_ATTN (x)")
        ax2.set_title("Decode step through vLLM")
        ax2.legend(fontsize=8)
    fig.suptitle(f"{meta['host']}, {meta['dtype']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--contexts", type=int, default=3, help="haystacks per length (9 questions each)")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.25, 0.125, 0.0625])
    p.add_argument("--streaming-ratios", type=float, nargs="*", default=[0.125, 0.0625],
                   help="StreamingLLM at these keep ratios' bytes (prescore_streaming)")
    p.add_argument("--suite", choices=sorted(SUITES), default="needles",
                   help="the task suite (longctx_tasks.py): needles, or code (complete a call "
                        "to a function defined far back in a long Python file)")
    p.add_argument("--label", default="",
                   help="prefix of the keep-ratio rows' names (another server configuration "
                        "added to --out with --resume, e.g. 'tiers ')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8, help="requests in flight per context")
    p.add_argument("--url", help="a running server (else prescore-serve is started)")
    p.add_argument("--dtype", default=None, help="--dtype of the started server (default: host's)")
    p.add_argument("--serve-args", default="--max-num-batched-tokens 4096",
                   help="extra flags of the started server")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "longctx.json")
    p.add_argument("--plot", action="store_true",
                   help="only redraw the table and plot of --out (with --speed: the decode "
                        "speedup beside the accuracy)")
    p.add_argument("--speed", type=Path,
                   help="a bench_vllm_decode.py or bench_ledger.py JSON for the plot")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out (or its .partial.json) and run the rest")
    args = p.parse_args(argv)
    if args.plot:
        data = json.loads(args.out.read_text())
        speed = json.loads(args.speed.read_text()) if args.speed else None
        summary = summarize(data["rows"])
        plot(summary, data["meta"], args.out.with_suffix(".png"), speed)
        args.out.with_suffix(".md").write_text(markdown(summary, data["meta"]))
        return 0
    partial = args.out.with_suffix(".partial.json")
    done: list[dict] = []
    old_meta: dict | None = None
    if args.resume:
        for f in (partial, args.out):
            if f.is_file():
                done = json.loads(f.read_text())["rows"]
                break
        if args.out.is_file():
            old_meta = json.loads(args.out.read_text()).get("meta")

    def checkpoint(rows: list[dict]) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"rows": rows}))

    from tokenizers import Tokenizer

    from prescore_backend.kernels import host
    from prescore_backend.server.models import model_dir, resolve_model

    tokenizer = Tokenizer.from_file(str(Path(resolve_model(MODEL)) / "tokenizer.json"))
    srv = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import Server

        extra = args.serve_args.split() + (["--dtype", args.dtype] if args.dtype else [])
        srv = Server(args=[MODEL, *extra]).start()
        url = srv.url
    try:
        t0 = time.perf_counter()
        rows = run(url, args.lengths, args.contexts,
                   methods(args.keep_ratios, args.streaming_ratios, args.label), args.seed,
                   tokenizer, args.workers, done, checkpoint, args.suite)
        cfg = requests.get(url + "/v1/prescore/config", timeout=30).json()
    finally:
        log = srv.log() if srv else ""
        if srv:
            srv.stop()
    dtype = args.dtype or ("bfloat16" if host.has_native_bf16() else "float32")
    for line in log.splitlines():
        if "dtype=" in line and "Initializing" in line:
            dtype = line.split("dtype=")[1].split(",")[0]
            break
    meta = {"model": MODEL, "model_dir": str(model_dir(MODEL)), "dtype": dtype,
            "host": f"{host.cpu_model()} ({host.isa()}), {platform.machine()}",
            "prescore_config": cfg, "seconds": round(time.perf_counter() - t0),
            "command": "python bench/serving/eval_longctx.py " + shlex.join(argv or sys.argv[1:])}
    if old_meta is not None and old_meta.get("prescore_config") != cfg:
        # rows of another server configuration added: the first run's settings stay the
        # file's, each later one is listed with its own
        meta = {**old_meta, "more_runs": old_meta.get("more_runs", []) + [
            {k: meta[k] for k in ("prescore_config", "seconds", "command")}]}
    summary = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    md = markdown(summary, meta)
    args.out.with_suffix(".md").write_text(md)
    plot(summary, meta, args.out.with_suffix(".png"))
    partial.unlink(missing_ok=True)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
