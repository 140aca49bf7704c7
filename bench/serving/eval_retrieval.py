"""Passkey retrieval through a running server, prescore vs exact attention.

    python bench/serving/eval_retrieval.py [--lengths 2000 4000 7500] [--depths 0.1 0.3 0.5 0.7 0.9]
                                   [--url http://127.0.0.1:8000]   # else starts prescore-serve

A five-digit pass key is planted at a given depth of real English text (the Python language
reference shipped with CPython), and the model is asked for it at the end (the passkey test of
Landmark Attention, arXiv 2305.16300, and of "needle in a haystack"). Every prompt is sent
twice through the OpenAI client to the same server: once with the PRESCORE sparse decode (the
server's settings) and once with ``vllm_xargs={"prescore_dense": true}``, i.e. exact attention
through vLLM's kernel. The two share the prompt's KV blocks (prefix caching), so the
comparison isolates the decode-time selection. Accuracy = the key's digits appear in the
answer. Writes ``docs/results/retrieval.json`` and ``docs/results/retrieval.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "results"
CHARS_PER_TOKEN = 4.3  # measured for the SmolLM2 tokenizer on this text, roughly


def haystack(n_chars: int, offset: int = 0) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset:offset + n_chars]


def passkey_prompt(n_tokens: int, depth: float, key: int, offset: int = 0) -> str:
    """About ``n_tokens`` tokens of text with the key sentence at ``depth`` (0 = start)."""
    body = haystack(int(n_tokens * CHARS_PER_TOKEN), offset)
    cut = body.rfind("\n", 0, int(len(body) * depth) + 1)
    cut = cut if cut > 0 else int(len(body) * depth)
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    return ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize "
            "it.\n\n" + body[:cut] + needle + body[cut:]
            + "\n\nWhat is the pass key? The pass key is")


def run(client, model: str, lengths: list[int], depths: list[float], trials: int,
        seed: int = 0) -> list[dict]:
    """One row per (length, depth, trial, mode) with the answer and whether it was right."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        for depth in depths:
            for t in range(trials):
                key = rng.randrange(10000, 100000)
                prompt = passkey_prompt(n, depth, key, offset=rng.randrange(0, 100_000))
                for mode, xargs in (("exact", {"prescore_dense": True}), ("prescore", {})):
                    t0 = time.perf_counter()
                    out = client.completions.create(
                        model=model, prompt=prompt, max_tokens=8, temperature=0,
                        extra_body={"vllm_xargs": xargs} if xargs else None)
                    answer = out.choices[0].text
                    rows.append({"tokens": out.usage.prompt_tokens, "target_tokens": n,
                                 "depth": depth, "trial": t, "mode": mode, "key": key,
                                 "answer": answer, "correct": str(key) in answer,
                                 "seconds": time.perf_counter() - t0})
    return rows


def summarize(rows: list[dict]) -> dict:
    acc: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        cell = acc.setdefault(r["mode"], {}).setdefault(str(r["target_tokens"]), [])
        cell.append(int(r["correct"]))
    return {m: {n: sum(v) / len(v) for n, v in by.items()} for m, by in acc.items()}


def agreement(rows: list[dict]) -> float:
    """Fraction of prompts where prescore answered exactly as exact attention did."""
    by = {}
    for r in rows:
        by.setdefault((r["target_tokens"], r["depth"], r["trial"]), {})[r["mode"]] = r["answer"]
    pairs = [v for v in by.values() if len(v) == 2]
    return sum(v["exact"] == v["prescore"] for v in pairs) / max(1, len(pairs))


def write(rows: list[dict], meta: dict, out_dir: Path = OUT) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    (out_dir / "retrieval.json").write_text(json.dumps(
        {"meta": meta, "accuracy": summary, "agreement": agreement(rows), "rows": rows},
        indent=1))
    lengths = sorted({r["target_tokens"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    lines = ["# Passkey retrieval: prescore vs exact attention", "",
             f"Machine: {meta['machine']}. Model: {meta['model']}. Server settings: "
             f"{meta['settings']}. Text: the Python language reference (CPython's pydoc "
             f"topics). Command: `{meta['command']}`.", "",
             "| prompt tokens | " + " | ".join(f"depth {d:g}" for d in depths)
             + " | accuracy exact | accuracy prescore |", "|---|" + "---|" * (len(depths) + 2)]
    for n in lengths:
        cells = []
        for d in depths:
            got = {m: [r["correct"] for r in rows if r["target_tokens"] == n
                       and r["depth"] == d and r["mode"] == m] for m in ("exact", "prescore")}
            cells.append(f"{sum(got['exact'])}/{len(got['exact'])} vs "
                         f"{sum(got['prescore'])}/{len(got['prescore'])}")
        lines.append(f"| ~{n} | " + " | ".join(cells)
                     + f" | {summary['exact'][str(n)]:.0%} | {summary['prescore'][str(n)]:.0%} |")
    lines += ["", "Cells: correct answers exact vs prescore. Identical answers (prescore == "
              f"exact, text for text): {agreement(rows):.0%} of prompts. Prompts shorter than "
              "the server's `min_seq_len` decode exactly in both modes.", ""]
    path = out_dir / "retrieval.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2500, 4000, 7500])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--url", default=None, help="a running server; default: start one")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    import requests
    from openai import OpenAI

    srv = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import Server

        srv = Server(args=["smollm2-135m", "--max-model-len", "8192"]).start()
        url = srv.url
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=900)
        settings = requests.get(url + "/v1/prescore/config", timeout=30).json()["settings"]
        rows = run(client, "smollm2-135m", args.lengths, args.depths, args.trials)
    finally:
        log = srv.log() if srv is not None else ""
        if srv is not None:
            srv.stop()
    # the started server's dtype from its log (prescore-serve picks the host's); a server
    # given by --url: unknown here
    dtype = next((line.split("dtype=")[1].split(",")[0] for line in log.splitlines()
                  if "dtype=" in line and "Initializing" in line), "the server's dtype")
    meta = {"machine": f"{platform.machine()} CPU, {len(__import__('os').sched_getaffinity(0))}"
                       " cores, no GPU",
            "model": f"SmolLM2-135M-Instruct (embedded), vLLM CPU, {dtype}",
            "settings": {k: settings[k] for k in ("method", "keep_ratio", "query_aware",
                                                  "query_channels", "query_cap_ratio",
                                                  "min_seq_len", "tile_size", "low_tier_bits",
                                                  "low_tier_share") if k in settings},
            "command": "python bench/serving/eval_retrieval.py " + " ".join(argv or sys.argv[1:])}
    path = write(rows, meta, Path(args.out))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
