"""Decode speed through vLLM: PRESCORE vs CPU_ATTN, side by side in one run.

For each backend (one engine each, in a child process) and each (prompt length, batch): time
to first token (prefill of the whole batch) and decode time per step, from vLLM's per-request
timestamps (``ignore_eos``), plus the greedy agreement of PRESCORE's tokens with CPU_ATTN's.
Prompts are real English text (CPython's reference topics, shipped with every Python). Prints
a table and writes JSON; every table names the host's CPU and instruction set.

The engines alternate over ``--rounds`` rounds (A B, then B A, ...: these machines drift 2x
within an hour), and each cell reports the median and the range over rounds. Prefill is
chunked (``--prefill-chunk`` tokens per step, so no step of a long batch can run past vLLM's
RPC timeout): each batch is first prefilled with ``max_tokens=1`` (its TTFT), then decoded
from the prefix cache, so every timed step is a pure decode step for all rows.

    .venv/bin/python bench/serving/bench_vllm_decode.py --contexts 2048,4096,8000 --batches 1,8 \
        --keep-ratios 0.125,0.0625 --rounds 2 --report docs/results

Environment: PRESCORE_* settings apply to the PRESCORE engines; ``--keep-ratios`` runs one
PRESCORE engine per keep ratio (labelled ``PRESCORE@r``). ``--report DIR`` also writes
``DIR/speed.json``, ``DIR/speed.md`` and ``DIR/speed_vs_context.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path


def _text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _prompts(tok, n_tokens: int, batch: int, shared_suffix: int = 0) -> list[list[int]]:
    """``batch`` prompts of ``n_tokens`` tokens; with ``shared_suffix`` > 0 they share all
    but their last ``shared_suffix`` tokens (one prefill for every row, by the prefix cache)."""
    ids = tok(_text())["input_ids"]
    if shared_suffix:
        base = n_tokens - shared_suffix
        while len(ids) < n_tokens + batch * shared_suffix:  # a 32k context needs the text twice
            ids = ids + ids
        return [ids[:base] + ids[n_tokens + i * shared_suffix: n_tokens + (i + 1) * shared_suffix]
                for i in range(batch)]
    while len(ids) < n_tokens:
        ids = ids + ids
    step = max(1, (len(ids) - n_tokens) // max(batch, 1))
    return [ids[i * step: i * step + n_tokens] for i in range(batch)]


def _worker(label: str, args: dict, q) -> None:
    backend, _, ratio = label.partition("@")
    if ratio:
        os.environ["PRESCORE_KEEP_RATIO"] = ratio
    # as prescore-serve does on CPU, for both backends: the KV cache in transparent huge pages
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    torch.set_num_threads(args["threads"])
    tok = AutoTokenizer.from_pretrained(args["model"])
    llm = LLM(args["model"], attention_backend=backend, enforce_eager=True, dtype=args["dtype"],
              max_model_len=args["max_model_len"], kv_cache_memory_bytes=args["kv_bytes"],
              max_num_seqs=max(args["batches"]),
              # Chunked prefill (no step past the RPC timeout); the prefix cache lets the timed
              # call start from the prefilled batch, so its steps are pure decode steps.
              enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=args["prefill_chunk"], disable_log_stats=False)
    llm.generate([TokensPrompt(prompt_token_ids=_prompts(tok, 256, 1)[0])],
                 SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    rows = []
    for ctx in args["contexts"]:
        for batch in args["batches"]:
            if ctx * (1 if args["shared_prefix"] else batch) > args["max_batch_tokens"]:
                continue
            shared = args["shared_prefix"]
            prompts = [TokensPrompt(prompt_token_ids=p)
                       for p in _prompts(tok, ctx, batch, 32 if shared else 0)]
            if not shared or batch == args["batches"][0]:
                llm.reset_prefix_cache()  # the cell prefills from scratch
            # The batch's prefill, in chunks: time to first token of its last row.
            pre = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1),
                               use_tqdm=False)
            ttft = [o.metrics.first_token_latency for o in pre]
            # The same prompts again: prefix-cache hits but for each row's last partial
            # block, recomputed in one step; then the mean time per later token (one decode
            # step for the whole batch).
            params = SamplingParams(temperature=0, max_tokens=args["decode_tokens"],
                                    ignore_eos=True)
            outs = llm.generate(prompts, params, use_tqdm=False)
            step = [(o.metrics.last_token_ts - o.metrics.first_token_ts)
                    / max(1, len(o.outputs[0].token_ids) - 1) for o in outs]
            per_tok = sum(step) / len(step)
            rows.append(dict(backend=label, ctx=ctx, batch=batch, ttft_s=max(ttft),
                             decode_ms_per_step=per_tok * 1e3, decode_tok_s=batch / per_tok,
                             tokens=[list(o.outputs[0].token_ids) for o in outs]))
            print(f"  {label:9s} ctx={ctx:5d} batch={batch}: ttft {max(ttft):7.2f} s, "
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
    p.add_argument("--dtype", default="auto",
                   help="model dtype; auto = bfloat16 where the CPU has native bf16 "
                        "(avx512_bf16 / AMX), else float32 (prescore-serve's default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backends", default="CPU_ATTN,PRESCORE")
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--keep-ratios", default="",
                   help="comma-separated keep ratios: one PRESCORE engine each")
    p.add_argument("--max-batch-tokens", type=int, default=40000,
                   help="skip (context, batch) pairs whose prefill exceeds this many tokens")
    p.add_argument("--rounds", type=int, default=2,
                   help="engine runs per backend, alternating the order (A B, B A, ...)")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="tokens per prefill step (vLLM's max_num_batched_tokens)")
    p.add_argument("--shared-prefix", action="store_true",
                   help="a context's rows share all but their last 32 tokens, so one prefill "
                        "(the first batch size's cell) serves every batch size of the context "
                        "through the prefix cache; the later cells' TTFT is then a cache hit's")
    p.add_argument("--out", default=None)
    p.add_argument("--report", default=None, help="directory for speed.{json,md,png}")
    a = p.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",")]
    if a.dtype == "auto":
        from prescore_backend.kernels import host

        a.dtype = "bfloat16" if host.has_native_bf16() else "float32"
        print(f"[bench] dtype {a.dtype} on {host.describe()}", file=sys.stderr)
    args = dict(model=resolve_model(a.model), contexts=contexts,
                batches=[int(x) for x in a.batches.split(",")], decode_tokens=a.decode_tokens,
                dtype=a.dtype, threads=a.threads, kv_bytes=int(a.kv_gib * 1024**3),
                max_model_len=max(contexts) + a.decode_tokens + 8,
                max_batch_tokens=a.max_batch_tokens, prefill_chunk=a.prefill_chunk,
                shared_prefix=a.shared_prefix)
    ctx_mp = mp.get_context("spawn")
    labels = a.backends.split(",")
    if a.keep_ratios:
        labels = [b for b in labels if b != "PRESCORE"] + [
            f"PRESCORE@{r}" for r in a.keep_ratios.split(",")]
    runs: dict[str, list[list[dict]]] = {b: [] for b in labels}  # backend -> rounds -> rows
    for rnd, backend in engine_order(labels, a.rounds):
        print(f"# round {rnd + 1}/{a.rounds}: {backend}", flush=True)
        q = ctx_mp.Queue()
        proc = ctx_mp.Process(target=_worker, args=(backend, args, q))
        proc.start()
        runs[backend].append(q.get())
        proc.join()
    table = aggregate(runs)
    print(f"\nHost: {host_line(a.threads)}; medians [range] over {a.rounds} rounds")
    print("| ctx | batch | backend | TTFT s | decode ms/step | tok/s | speedup | greedy agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        sp = (f"{r['speedup_vs_cpu_attn']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}]"
              if r.get("speedup_vs_cpu_attn") else "-")
        ag = (f"{r['greedy_agreement_mean']:.1f} of {len(r['tokens'][0])} (min "
              f"{r['greedy_agreement_min']})") if "greedy_agreement_min" in r else "-"
        print(f"| {r['ctx']} | {r['batch']} | {r['backend']} | {r['ttft_s']:.2f} | "
              f"{r['decode_ms_per_step']:.1f} [{r['decode_ms_min']:.1f}, "
              f"{r['decode_ms_max']:.1f}] | {r['decode_tok_s']:.1f} | {sp} | {ag} |")
    out = Path(a.out or f"bench/out/vllm_decode_{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k.startswith("PRESCORE_") or k == "THP_MEM_ALLOC_ENABLE"}
    from prescore_backend.kernels import host

    data = dict(machine=host.describe(), cpus=os.cpu_count(), rounds=a.rounds,
                args=args, prescore_env=env, command="python bench/serving/bench_vllm_decode.py "
                + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=table)
    out.write_text(json.dumps(data, indent=1))
    print(f"# wrote {out}")
    if a.report:
        print(f"# wrote {write_report(data, Path(a.report))}")
    return 0


def engine_order(labels: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, backend) in run order: A B, then B A, ... (drift hits both sides alike)."""
    return [(rnd, b) for rnd in range(rounds) for b in (labels if rnd % 2 == 0 else labels[::-1])]


def host_line(threads: int) -> str:
    from prescore_backend.kernels import host

    return f"{host.describe()}, {threads} thread(s) per engine"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def aggregate(runs: dict[str, list[list[dict]]]) -> list[dict]:
    """Per (backend, context, batch) over the rounds: median TTFT and decode ms/step with
    their ranges, the speedup of medians against CPU_ATTN and its range over the rounds'
    paired ratios (round i of both), and the greedy agreement of round 1's tokens."""
    cells: dict[tuple, list[dict]] = {}
    for backend, rounds in runs.items():
        for rows in rounds:
            for r in rows:
                cells.setdefault((backend, r["ctx"], r["batch"]), []).append(r)
    table = []
    for (backend, ctx, batch), rs in cells.items():
        ms = [r["decode_ms_per_step"] for r in rs]
        row = dict(backend=backend, ctx=ctx, batch=batch, rounds=len(rs),
                   ttft_s=_median([r["ttft_s"] for r in rs]),
                   ttft_min=min(r["ttft_s"] for r in rs), ttft_max=max(r["ttft_s"] for r in rs),
                   decode_ms_per_step=_median(ms), decode_ms_min=min(ms), decode_ms_max=max(ms),
                   decode_ms_rounds=ms, tokens=rs[0]["tokens"])
        row["decode_tok_s"] = batch / (row["decode_ms_per_step"] / 1e3)
        base = cells.get(("CPU_ATTN", ctx, batch))
        if base:
            bm = [r["decode_ms_per_step"] for r in base]
            row["speedup_vs_cpu_attn"] = _median(bm) / row["decode_ms_per_step"]
            paired = [x / y for x, y in zip(bm, ms)]
            row["speedup_min"], row["speedup_max"] = min(paired), max(paired)
            row["ttft_vs_cpu_attn"] = row["ttft_s"] / _median([r["ttft_s"] for r in base])
            if backend != "CPU_ATTN":
                agree = [_agreement(x, y) for x, y in zip(row["tokens"], base[0]["tokens"])]
                row["greedy_agreement_min"] = min(agree)
                row["greedy_agreement_mean"] = sum(agree) / len(agree)
        table.append(row)
    return table


def write_report(data: dict, out_dir: Path) -> Path:
    """speed.json + speed.md (table, TTFT overhead, side-data memory) + speed_vs_context.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = data["rows"]
    slim = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
    (out_dir / "speed.json").write_text(json.dumps({**data, "rows": slim}, indent=1))
    import torch

    from prescore_backend.config import PrescoreConfig
    from prescore_backend.memory import side_bytes_per_token

    model = Path(data["args"]["model"])
    mc = json.loads((model / "config.json").read_text())
    hkv = mc.get("num_key_value_heads", mc["num_attention_heads"])
    d = mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"]
    dtype = getattr(torch, data["args"]["dtype"])
    cfg = PrescoreConfig.from_env(data.get("prescore_env", {}))
    side = side_bytes_per_token(cfg, hkv, d, 128, dtype)
    what = "the 4-bit key copy and its scales, the tiles' pre-scores" if cfg.uses_key_copy else cfg.query_aware
    kv = 2 * hkv * d * torch.empty((), dtype=dtype).element_size()
    machine = f"{data['machine']}, {data['args']['threads']} thread(s) per engine"
    rounds = data.get("rounds", 1)
    lines = ["# Decode speed through vLLM: PRESCORE vs CPU_ATTN", "",
             f"Host: {machine}, no GPU. Model: {model.name}, "
             f"{data['args']['dtype']}, eager. Prompts: CPython's reference text. "
             f"{data['args']['decode_tokens']} decode tokens per request, ignore_eos; each batch "
             f"prefilled in chunks of {data['args'].get('prefill_chunk', '-')} tokens, then "
             f"decoded from the prefix cache. Engines alternated over {rounds} round(s) (A B, "
             f"B A, ...): medians, [min, max] over rounds (speedup: paired per round). "
             f"Date {data['date']}. Command: `{data['command']}`.", "",
             "| context | batch | backend | TTFT s | TTFT vs CPU_ATTN | decode ms/step | tokens/s "
             "| speedup vs CPU_ATTN | greedy agreement (tokens) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["batch"], r["ctx"], r["backend"])):
        ttft_x = f"{r['ttft_vs_cpu_attn']:.2f}x" if r.get("ttft_vs_cpu_attn") else "-"
        sp = (f"{r['speedup_vs_cpu_attn']:.2f}x [{r['speedup_min']:.2f}, {r['speedup_max']:.2f}]"
              if r.get("speedup_vs_cpu_attn") else "-")
        ag = f"{r['greedy_agreement_mean']:.1f}" if "greedy_agreement_mean" in r else "-"
        lines.append(f"| {r['ctx']} | {r['batch']} | {r['backend']} | {r['ttft_s']:.2f} | {ttft_x} "
                     f"| {r['decode_ms_per_step']:.1f} [{r['decode_ms_min']:.1f}, "
                     f"{r['decode_ms_max']:.1f}] | {r['decode_tok_s']:.1f} | {sp} | {ag} |")
    lines += ["", f"Side data per token and layer ({what}, {data['args']['dtype']}"
              f" cache): {side:.2f} bytes, vs {kv} bytes of K and V ({100 * side / kv:.1f}%).",
              "TTFT vs CPU_ATTN is prescore's cost at prefill (both prefill on vLLM's kernels; "
              "prescore also writes the side data of every full KV block).", "",
              "![speedup vs context](speed_vs_context.png)", "",
              f"*Figure: decode speedup of PRESCORE over CPU_ATTN (ms/step ratio) vs context; "
              f"{machine}; {model.name}; `{data['command']}`.*", ""]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({r["backend"] for r in rows} - {"CPU_ATTN"}):
        for batch in sorted({r["batch"] for r in rows}):
            pts = sorted((r["ctx"], r["speedup_vs_cpu_attn"]) for r in rows
                         if r["backend"] == label and r["batch"] == batch
                         and r.get("speedup_vs_cpu_attn"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{label}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("decode speedup vs CPU_ATTN (x)")
    ax.set_title("PRESCORE decode speedup through vLLM")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "speed_vs_context.png", dpi=120)
    plt.close(fig)
    path = out_dir / "speed.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
