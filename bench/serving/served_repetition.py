"""Greedy repetition through real servers: the windows of bench/quality/eval_repetition.py
(the play, prose and code texts, ``--windows`` per text, ``--context`` tokens each) sent as
token-id prompts in one request to a ``prescore-serve`` per configuration, one server at a
time: exact attention (CPU_ATTN) and prescore at ``--keep`` with each ``--query-aware``
ranking (the other settings at their defaults; ``min_seq_len`` 1024). Scored as in
eval_repetition.py: repeated 4-grams per generation, paired against exact attention with a 95%
bootstrap interval, distinct tokens, loops, tokens equal to exact attention's. fp32.

Usage: python bench/serving/served_repetition.py --out docs/results/repetition_served.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench" / "quality")]
from conftest import Server  # noqa: E402
from eval_quality import git_commit, machine  # noqa: E402
from eval_repetition import summarize, write_report  # noqa: E402
from eval_selection import load_text  # noqa: E402

MODEL = "smollm2-135m"


def prompts(model_dir: Path, texts: list[str], windows: int, context: int) -> list[list[int]]:
    """eval_repetition.py's windows: ``windows`` evenly spaced spans of ``context`` tokens."""
    out = []
    for t in texts:
        toks, _ = load_text(model_dir, t)
        step = (toks.numel() - context - 1) // max(windows - 1, 1) if windows > 1 else 0
        out += [toks[w * step: w * step + context].tolist() for w in range(windows)]
    return out


def generate(env: dict[str, str], extra: list[str], batch: list[list[int]], new_tokens: int,
             context: int) -> list[list[int]]:
    args = [MODEL, "--dtype", "float32", "--max-model-len", str(context + new_tokens + 16),
            "--max-num-seqs", str(len(batch)), "--max-num-batched-tokens", "2048",
            "--kv-cache-memory-bytes", str(3 * 1024**3), *extra]
    srv = Server(args=args, env=env).start()
    try:
        r = requests.post(srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": batch, "max_tokens": new_tokens, "temperature": 0,
            "return_token_ids": True}, timeout=3600)
        r.raise_for_status()
        return [list(c["token_ids"]) for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
    finally:
        srv.stop()


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Greedy repetition through the server ({meta['date']})", "",
             f"Model {meta['model']}, fp32, context {meta['context']}, {meta['windows']} windows x "
             f"{len(meta['texts'])} texts ({', '.join(meta['texts'])}), {meta['new_tokens']} greedy "
             f"tokens each, one request per server; host {meta['machine']['cpu']}; command "
             f"`{meta['command']}` (commit {meta['git_commit']}).", "",
             "| configuration | repeated 4-grams | vs exact [95% CI] | distinct tokens | loops "
             "| tokens equal to exact's |", "|---|---|---|---|---|---|"]
    for label, r in summary.items():
        name = "exact (CPU_ATTN)" if label == "dense|1" else (
            f"prescore keep 1/{round(1 / float(label.rsplit('|', 1)[1]))}, "
            f"query_aware={label.rsplit('|', 1)[0]}")
        vs = ("{:+.3f} [{:+.3f}, {:+.3f}]".format(*r["repeated_4grams_vs_dense"])
              if "repeated_4grams_vs_dense" in r else "-")
        lines.append(f"| {name} | {r['repeated_4grams']:.3f} | {vs} | {r['distinct']:.3f} "
                     f"| {r['loops']} of {r['generations']} | {r['agree']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", default="play,prose,code")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--keep", type=float, default=0.125)
    p.add_argument("--query-aware", default="pq,sparq4")
    p.add_argument("--out", required=True, help="JSON (and .md beside it)")
    a = p.parse_args(argv)
    from prescore_backend.server.models import resolve_model

    texts = a.texts.split(",")
    batch = prompts(Path(resolve_model(MODEL)), texts, a.windows, a.context)
    t0 = time.perf_counter()
    gens = {"dense|1": generate({}, ["--attention-backend", "CPU_ATTN"], batch, a.new_tokens,
                                a.context)}
    for qa in a.query_aware.split(","):
        env = {"PRESCORE_KEEP_RATIO": str(a.keep), "PRESCORE_MIN_SEQ_LEN": "1024",
               "PRESCORE_QUERY_AWARE": qa}
        gens[f"{qa}|{a.keep:g}"] = generate(env, [], batch, a.new_tokens, a.context)
        print(f"{qa} done", file=sys.stderr, flush=True)
    summary = summarize(gens)
    meta = {"model": MODEL, "context": a.context, "windows": a.windows,
            "new_tokens": a.new_tokens, "texts": texts, "machine": machine(),
            "git_commit": git_commit(), "wall_s": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/serving/served_repetition.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    write_report(a.out, gens, summary, meta, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
