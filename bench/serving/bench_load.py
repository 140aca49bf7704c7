"""Load test of ``prescore-serve``: concurrent streaming and non-streaming clients, mixed prompt
lengths, on 127.0.0.1 only, bounded in request count and time.

    python bench/serving/bench_load.py [--requests 200] [--concurrency 8] [--backends PRESCORE CPU_ATTN]

For each backend in turn (one server at a time, the same request mix, side by side in one
invocation) it reports throughput, TTFT and inter-token latency percentiles, errors, and the
resident memory of the engine's worker processes after a warm-up and after the run (it must
plateau: side data lives beside the KV blocks, nothing grows per request). Prints a table and
writes JSON to ``bench/out/load.json``. ``run_load`` is also used by the bounded load test in
``tests/test_reliability_e2e.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """One request's outcome; times in seconds."""

    ok: bool
    stream: bool
    prompt_chars: int
    status: int = 0
    error: str = ""
    text: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    completion_tokens: int = 0


def english_text(n_chars: int, offset: int = 0) -> str:
    """Real English text shipped with CPython (the language reference's topic pages)."""
    from pydoc_data.topics import topics

    joined = "\n\n".join(topics[k] for k in sorted(topics))
    return joined[offset:offset + n_chars]


def shared_docs(count: int, long_chars: int) -> list[str]:
    """``count`` long documents that the long prompts of ``make_prompts(docs=...)`` share."""
    return [english_text(long_chars, offset=20_000 + 97_000 * k) for k in range(count)]


def make_prompts(n: int, long_fraction: float, long_chars: int, seed: int = 0,
                 docs: list[str] | None = None) -> list[str]:
    """``n`` prompts: short questions and, with probability ``long_fraction``, long documents
    (``long_chars`` characters, about 4.3 characters per token) with a question at the end.
    With ``docs`` the long prompts are questions about those documents (many users asking
    about one long document: after its first prefill, vLLM's prefix cache serves it, and
    the request's cost is its decode over the long context)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        if rng.random() < long_fraction:
            if docs:
                prompts.append(rng.choice(docs) + f"\n\nQuestion {i}: what does this text say "
                               "about the topic of its last paragraph? Answer:")
                continue
            doc = english_text(long_chars, offset=rng.randrange(0, 200_000))
            prompts.append(doc + "\n\nQuestion: what is this text about? Answer:")
        else:
            prompts.append(f"Question {i}: name a colour and a fruit. Answer:")
    return prompts


def one_request(url: str, model: str, prompt: str, stream: bool, max_tokens: int,
                headers: dict[str, str], timeout: float) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    res = Result(ok=False, stream=stream, prompt_chars=len(prompt))
    t0 = time.perf_counter()
    try:
        with requests.post(url + "/v1/completions", json=body, headers=headers, stream=stream,
                           timeout=timeout) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = r.text[:300]
                return res
            if not stream:
                data = r.json()
                res.text = data["choices"][0]["text"]
                res.completion_tokens = data["usage"]["completion_tokens"]
            else:
                last = None
                parts = []
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        res.completion_tokens = chunk["usage"]["completion_tokens"]
                    if not chunk.get("choices"):
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - t0
                    elif last is not None:
                        res.itl.append(now - last)
                    last = now
                    parts.append(chunk["choices"][0]["text"])
                res.text = "".join(parts)
            res.ok = True
    except requests.RequestException as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    res.latency = time.perf_counter() - t0
    return res


def run_load(url: str, model: str, prompts: list[str], *, concurrency: int, max_tokens: int,
             stream_every: int = 2, headers: dict[str, str] | None = None,
             timeout: float = 600.0) -> tuple[list[Result], float]:
    """Send every prompt once from ``concurrency`` client threads; every ``stream_every``-th
    request streams. Returns the results in prompt order and the wall time."""
    headers = headers or {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futs = [pool.submit(one_request, url, model, p, i % stream_every == 0, max_tokens,
                            headers, timeout) for i, p in enumerate(prompts)]
        results = [f.result() for f in futs]
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarize(results: list[Result], wall: float) -> dict:
    ttft = [r.ttft for r in results if r.ttft is not None]
    itl = [x for r in results for x in r.itl]
    toks = sum(r.completion_tokens for r in results)
    return {
        "requests": len(results), "errors": sum(not r.ok for r in results), "wall_s": wall,
        "requests_per_s": len(results) / wall, "output_tokens_per_s": toks / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": None if not itl else 1000 * pct(itl, 50),
        "itl_p90_ms": None if not itl else 1000 * pct(itl, 90),
        "itl_p99_ms": None if not itl else 1000 * pct(itl, 99),
        "latency_mean_s": statistics.fmean(r.latency for r in results),
        "error_samples": [r.error for r in results if not r.ok][:5],
    }


def engine_rss_mb(server_pid: int) -> float:
    """Resident memory (MiB) of the server's descendant processes that hold the model: the
    engine core and its workers (every descendant except tiny helpers is counted)."""
    try:
        kids = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in kids:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _bench_backend(backend: str, args) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import Server  # the same server helper the tests use

    srv = Server(args=[args.model, "--attention-backend", backend, "--max-model-len",
                       str(args.max_model_len), *args.serve_args.split()]).start()
    docs = shared_docs(args.shared_docs, args.long_chars) if args.shared_docs else None
    try:
        for d in docs or []:  # each shared document prefilled once, before the clock starts
            one_request(srv.url, args.model, d, False, 1, {}, 3600.0)
        warm = make_prompts(args.warmup, args.long_fraction, args.long_chars, seed=1, docs=docs)
        run_load(srv.url, args.model, warm, concurrency=args.concurrency,
                 max_tokens=args.max_tokens)
        rss = [engine_rss_mb(srv.proc.pid)]
        prompts = make_prompts(args.requests, args.long_fraction, args.long_chars, seed=2,
                               docs=docs)
        results, wall = [], 0.0
        for i in range(0, len(prompts), args.round):  # RSS sampled after every round
            res, w = run_load(srv.url, args.model, prompts[i:i + args.round],
                              concurrency=args.concurrency, max_tokens=args.max_tokens)
            results += res
            wall += w
            rss.append(engine_rss_mb(srv.proc.pid))
    finally:
        srv.stop()
    out = summarize(results, wall)
    out.update(backend=backend, rss_after_warmup_mb=rss[0], rss_after_run_mb=rss[-1],
               rss_growth_mb=rss[-1] - rss[0], rss_per_round_mb=rss)
    return out


def alternate(backends: list[str], rounds: int) -> list[str]:
    """The order the servers run in: A B, then B A, ... (these hosts drift within an hour)."""
    return [b for k in range(rounds) for b in (backends if k % 2 == 0 else backends[::-1])]


def combine(runs: list[dict]) -> dict:
    """One backend's runs over rounds: each number its median, plus the per-round throughput."""
    out = dict(runs[-1])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and all(
                isinstance(r.get(k), (int, float)) for r in runs):
            out[k] = statistics.median(r[k] for r in runs)
    out["rounds"] = len(runs)
    out["requests_per_s_per_round"] = [r["requests_per_s"] for r in runs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["PRESCORE", "CPU_ATTN"])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--round", type=int, default=40, help="requests between RSS samples")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--long-fraction", type=float, default=0.1)
    ap.add_argument("--long-chars", type=int, default=11000, help="~2.5k tokens")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--serve-args", default="", help="more prescore-serve arguments")
    ap.add_argument("--shared-docs", type=int, default=0, metavar="N",
                    help="long prompts ask about N shared documents (prefilled once per server, "
                         "then served from the prefix cache); 0: each its own text")
    ap.add_argument("--rounds", type=int, default=1,
                    help="servers per backend, alternating the order (A B, B A, ...); "
                         "each number is its median over the rounds")
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "load.json"))
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {b: [] for b in args.backends}
    for b in alternate(args.backends, args.rounds):
        runs[b].append(_bench_backend(b, args))
    rows = [combine(runs[b]) for b in args.backends]
    if len(rows) == 2:
        ratio = [a["requests_per_s"] / b["requests_per_s"]
                 for a, b in zip(runs[args.backends[0]], runs[args.backends[1]])]
        print(f"{args.backends[0]} / {args.backends[1]} requests/s per round: "
              + ", ".join(f"{x:.2f}x" for x in ratio))
        rows[0]["throughput_ratio_per_round"] = ratio
    cols = ["backend", "requests", "errors", "wall_s", "requests_per_s", "output_tokens_per_s",
            "ttft_p50_s", "ttft_p90_s", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms",
            "rss_after_warmup_mb", "rss_after_run_mb", "rss_growth_mb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    for r in rows:
        print(f"{r['backend']}: engine RSS MiB after warm-up and each round of {args.round}: "
              + ", ".join(f"{x:.0f}" for x in r["rss_per_round_mb"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
