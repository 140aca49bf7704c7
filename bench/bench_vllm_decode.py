"""Decode speed through vLLM: PRESCORE vs CPU_ATTN, side by side in one run.

For each backend (one engine each, started one after the other in a child process) and each
(prompt length, batch): time to first token (prefill of the whole batch) and decode time per
step, from vLLM's per-request timestamps (``ignore_eos``), plus the greedy agreement of
PRESCORE's tokens with CPU_ATTN's. Prompts are real English text (CPython's reference
topics, shipped with every Python). Prints a table and writes JSON.

    .venv/bin/python bench/bench_vllm_decode.py --contexts 2048,4096,8000 --batches 1,8

Environment: PRESCORE_* settings apply to the PRESCORE engine (e.g. PRESCORE_KEEP_RATIO).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path


def _text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _prompts(tok, n_tokens: int, batch: int) -> list[list[int]]:
    ids = tok(_text())["input_ids"]
    step = max(1, (len(ids) - n_tokens) // max(batch, 1))
    return [ids[i * step: i * step + n_tokens] for i in range(batch)]


def _worker(backend: str, args: dict, q) -> None:
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.set_num_threads(args["threads"])
    tok = AutoTokenizer.from_pretrained(args["model"])
    llm = LLM(args["model"], attention_backend=backend, enforce_eager=True, dtype=args["dtype"],
              max_model_len=args["max_model_len"], kv_cache_memory_bytes=args["kv_bytes"],
              max_num_seqs=max(args["batches"]), enable_prefix_caching=False,
              # One step prefills the whole batch, so every later step is a pure decode step
              # for all rows and the per-request timestamps measure decode alone.
              max_num_batched_tokens=max(args["contexts"]) * max(args["batches"]) + 64,
              disable_log_stats=False)
    llm.generate([TokensPrompt(prompt_token_ids=_prompts(tok, 256, 1)[0])],
                 SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    rows = []
    for ctx in args["contexts"]:
        for batch in args["batches"]:
            prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts(tok, ctx, batch)]
            params = SamplingParams(temperature=0, max_tokens=args["decode_tokens"],
                                    ignore_eos=True)
            outs = llm.generate(prompts, params, use_tqdm=False)
            # vLLM's per-request timestamps: time to first token (the batch's prefill step) and
            # the mean time per later token (one decode step for the whole batch).
            ttft = [o.metrics.first_token_latency for o in outs]
            step = [(o.metrics.last_token_ts - o.metrics.first_token_ts)
                    / max(1, len(o.outputs[0].token_ids) - 1) for o in outs]
            per_tok = sum(step) / len(step)
            rows.append(dict(backend=backend, ctx=ctx, batch=batch, ttft_s=max(ttft),
                             decode_ms_per_step=per_tok * 1e3, decode_tok_s=batch / per_tok,
                             tokens=[list(o.outputs[0].token_ids) for o in outs]))
            print(f"  {backend:9s} ctx={ctx:5d} batch={batch}: ttft {max(ttft):7.2f} s, "
                  f"decode {per_tok * 1e3:7.1f} ms/step ({batch / per_tok:6.1f} tok/s)",
                  flush=True)
    llm.llm_engine.engine_core.shutdown()  # stop the engine processes before leaving
    q.put(rows)
    q.close()
    q.join_thread()
    os._exit(0)  # a normal interpreter exit can hang in vLLM's teardown


def _agreement(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def main(argv: list[str] | None = None) -> int:
    from prescore_backend.server.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", default="2048,4096,8000")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", default="CPU_ATTN,PRESCORE")
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",")]
    args = dict(model=resolve_model(a.model), contexts=contexts,
                batches=[int(x) for x in a.batches.split(",")], decode_tokens=a.decode_tokens,
                dtype=a.dtype, threads=a.threads, kv_bytes=int(a.kv_gib * 1024**3),
                max_model_len=max(contexts) + a.decode_tokens + 8)
    results: dict[str, list[dict]] = {}
    ctx_mp = mp.get_context("spawn")
    for backend in a.backends.split(","):
        print(f"# {backend}", flush=True)
        q = ctx_mp.Queue()
        proc = ctx_mp.Process(target=_worker, args=(backend, args, q))
        proc.start()
        results[backend] = q.get()
        proc.join()

    base = {(r["ctx"], r["batch"]): r for r in results.get("CPU_ATTN", [])}
    print("\n| ctx | batch | backend | TTFT s | decode ms/step | tok/s | speedup | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|")
    table = []
    for backend, rows in results.items():
        for r in rows:
            b = base.get((r["ctx"], r["batch"]))
            r["speedup_vs_cpu_attn"] = b["decode_ms_per_step"] / r["decode_ms_per_step"] if b else None
            if b and backend != "CPU_ATTN":
                agree = [_agreement(x, y) for x, y in zip(r["tokens"], b["tokens"])]
                r["greedy_agreement_min"] = min(agree)
                r["greedy_agreement_mean"] = sum(agree) / len(agree)
            table.append(r)
            sp = f"{r['speedup_vs_cpu_attn']:.2f}x" if r["speedup_vs_cpu_attn"] else "-"
            ag = (f"{r['greedy_agreement_mean']:.1f} of {len(r['tokens'][0])} (min "
                  f"{r['greedy_agreement_min']})") if "greedy_agreement_min" in r else "-"
            print(f"| {r['ctx']} | {r['batch']} | {backend} | {r['ttft_s']:.2f} | "
                  f"{r['decode_ms_per_step']:.1f} | {r['decode_tok_s']:.1f} | {sp} | {ag} |")
    out = Path(a.out or f"bench/out/vllm_decode_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("PRESCORE_")}
    out.write_text(json.dumps(dict(machine=platform.processor() or platform.machine(),
                                   cpus=os.cpu_count(), args=args, prescore_env=env,
                                   rows=table), indent=1))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
