"""Where a step's attention time goes inside the engine: prefill vs decode, scoring, selection.

Runs one vLLM engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the embedded
model, wraps the attention implementation's methods with wall-clock timers, prefills a batch
of real-text prompts once, then decodes 16 tokens, and prints (and writes as JSON) the time per
phase: for PRESCORE the prefill attention with the scoring jobs inside it, and per decode step
the side-data upkeep, the selection's inputs (pre-scores gathered through the block table, the
query-aware pick) and the fused selection + sparse attention; for CPU_ATTN its attention
forward. One
backend per process; compare two runs side by side:

    .venv/bin/python bench/serving/bench_breakdown.py --backend PRESCORE --context 4096
    .venv/bin/python bench/serving/bench_breakdown.py --backend CPU_ATTN --context 4096

Wall-clock (the engine's threads share the process); a diagnostic, not a speed claim.

Long contexts (``--model qwen2.5-coder-0.5b --context 32000``): ``--batch 1,4`` runs several
batch sizes on one engine, and ``--shared-prefix`` gives a batch's rows all but their last 32
tokens in common, prefilled once (chunked, ``--prefill-chunk``) and then served from vLLM's
prefix cache to every batch size, as ``bench_vllm_decode.py --shared-prefix`` does: one
32k-token prefill per engine instead of one per row and cell.

With ``--shared-prefix``, ``ttft_s`` is the shared prefix's time to first token: one prompt of
``--context`` tokens prefilled in chunks on an idle engine.

``ledger_ms_per_step`` attributes 100% of a decode step's wall time (``LLMEngine.step``, decode
steps only) to: the frontend (output processing), the scheduler and bookkeeping, the metadata
builder (prescore's per-step plan), the model outside attention (embeddings, linear layers,
norms, rotary, KV write), attention (for PRESCORE split into side-data upkeep, the selection's
inputs, the fused selection + sparse attention and the forward's Python glue) and the sampler.
``bench/serving/bench_ledger.py`` runs both backends and adds each cell's Amdahl limit.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="PRESCORE", choices=["PRESCORE", "CPU_ATTN"])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batch", default="1", help="batch size, or several (1,4): one engine")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto",
                   help="auto = bfloat16 where the CPU has native bf16, else float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    p.add_argument("--shared-prefix", action="store_true",
                   help="rows share all but their last 32 tokens (one prefill, prefix cache)")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="tokens per prefill step with --shared-prefix")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    batches = [int(b) for b in str(a.batch).split(",") if b]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as prescore-serve

    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends import cpu_attn

    from prescore_backend.backends import cpu as pc
    from prescore_backend.server.models import resolve_model

    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    secs: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    step_secs: dict[str, float] = collections.defaultdict(float)  # decode steps only
    phase = {"decode": False, "batch": batches[0]}  # set by the model runner each step

    def timed(owner, name: str, key: str, by_phase: bool = False) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kw):
            k = key
            if by_phase:  # forward(self, layer, query, ...): decode steps have one token per row
                k += "_decode" if args[2].shape[0] <= phase["batch"] else "_prefill"
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                dt = time.perf_counter() - t0
                secs[k] += dt
                calls[k] += 1
                if phase["decode"]:
                    step_secs[key] += dt

        setattr(owner, name, wrapper)

    run_model = CPUModelRunner.execute_model

    def execute_model(self, scheduler_output, *args, **kw):
        # A decode step schedules one token per running request and nothing else.
        phase["decode"] = 0 < scheduler_output.total_num_scheduled_tokens <= phase["batch"]
        if phase["decode"]:
            step_secs["decode_steps"] += 1
        return run_model(self, scheduler_output, *args, **kw)

    CPUModelRunner.execute_model = execute_model
    timed(LLMEngine, "step", "engine_step")
    timed(EngineCore, "step", "engine_core_step")
    timed(EngineCore, "step_with_batch_queue", "engine_core_step")
    timed(CPUModelRunner, "execute_model", "model_execute")
    timed(CPUModelRunner, "sample_tokens", "sample")

    if a.backend == "PRESCORE":
        timed(pc.PrescoreCPUImpl, "forward", "attention", by_phase=True)
        timed(pc.PrescoreCPUImpl, "_run_score_jobs", "scoring_jobs")
        timed(pc.PrescoreCPUImpl, "_record_decode_tokens", "decode_side_data")
        timed(pc.PrescoreCPUImpl, "_sparse_decode", "selection_and_sparse_attention")
        # module globals: _sparse_decode's lookups. The selection itself runs inside the fused
        # select_and_decode_into call; its inputs (pre-scores gathered, query-aware pick) before
        # it, except with sparq4 and lsh on CPU, which the fused call computes itself.
        timed(pc, "scores_and_pick", "selection_inputs")
        timed(pc, "select_and_decode_into", "selection_and_decode")
        timed(pc.PrescoreCPUMetadataBuilder, "build", "builder")
    else:
        timed(cpu_attn.CPUAttentionBackendImpl, "forward", "attention", by_phase=True)
        timed(cpu_attn.CPUAttentionMetadataBuilder, "build", "builder")

    model = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(model)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_vllm_decode import _prompts

    from prescore_backend.kernels import host

    dtype = a.dtype if a.dtype != "auto" else (
        "bfloat16" if host.has_native_bf16() else "float32")  # fp32 where bf16 is emulated
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model)
    per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * (
        hf.hidden_size // hf.num_attention_heads) * (2 if dtype == "bfloat16" else 4)
    nb = max(batches)
    tail = 32 if a.shared_prefix else 0
    held = (a.context + nb * (tail + a.decode_tokens + 256) if a.shared_prefix
            else nb * (a.context + a.decode_tokens + 64))
    kv_bytes = max(2 << 30, int(1.3 * held * per_token))
    llm = LLM(model, attention_backend=a.backend, enforce_eager=True, dtype=dtype,
              max_model_len=a.context + a.decode_tokens + 64, kv_cache_memory_bytes=kv_bytes,
              max_num_seqs=nb, enable_prefix_caching=a.shared_prefix,
              enable_chunked_prefill=a.shared_prefix,
              max_num_batched_tokens=(a.prefill_chunk if a.shared_prefix
                                      else a.context * nb + 64))
    # warm-up (extension loads, first-call costs) on a short prompt: the timed run prefills anew
    llm.generate([TokensPrompt(prompt_token_ids=_prompts(tok, 512, 1)[0])],
                 SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    prefill_s: dict[str, float] = {}
    ttft_s = None  # the shared prefix's time to first token (its whole chunked prefill)
    if a.shared_prefix:  # the shared prefix, once, before any timed batch
        secs.clear()
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=_prompts(tok, a.context, 1, tail)[0])],
                     SamplingParams(max_tokens=1), use_tqdm=False)
        ttft_s = round(time.perf_counter() - t0, 2)
        prefill_s = {k: round(v, 3) for k, v in secs.items()
                     if k in ("attention_prefill", "scoring_jobs")}
    results = []
    for batch in batches:
        phase["batch"] = batch
        prompts = [TokensPrompt(prompt_token_ids=p) for p in _prompts(tok, a.context, batch, tail)]
        secs.clear(), calls.clear(), step_secs.clear()
        llm.generate(prompts, SamplingParams(max_tokens=a.decode_tokens + 1, ignore_eos=True),
                     use_tqdm=False)
        steps = a.decode_tokens
        step_kinds = ("engine_step", "engine_core_step", "model_execute", "sample", "builder")
        prefill = ("attention_prefill", "scoring_jobs")
        results.append(dict(
            backend=a.backend, model=a.model, context=a.context, batch=batch,
            decode_steps=steps, dtype=dtype, threads=a.threads, shared_prefix=a.shared_prefix,
            host=host.describe(),
            ttft_s=ttft_s,
            prefill_s=prefill_s or {k: round(v, 3) for k, v in secs.items() if k in prefill},
            decode_ms_per_step={k: round(1e3 * v / steps, 2) for k, v in secs.items()
                                if k not in (*prefill, *step_kinds)},
            ledger_ms_per_step=ledger(step_secs, a.backend),
            calls=dict(calls)))
    out = results[0] if len(results) == 1 else results
    print(json.dumps(out, indent=1))
    path = Path(a.out or f"bench/out/breakdown_{a.backend}_{a.context}x{a.batch}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"# wrote {path}", file=sys.stderr)
    return 0


def ledger(t: dict[str, float], backend: str) -> dict[str, float]:
    """Decode-step wall time by part, ms per step (the parts sum to ``step``): nested timers
    (``LLMEngine.step`` > ``EngineCore.step`` > the model runner > attention > its parts)
    differenced, so each part is its own time only."""
    n = max(t.get("decode_steps", 0), 1)
    ms = {k: 1e3 * v / n for k, v in t.items() if k != "decode_steps"}
    g = lambda k: ms.get(k, 0.0)  # noqa: E731
    attn = g("attention")
    parts = {"frontend (output processing)": g("engine_step") - g("engine_core_step"),
             "scheduler and bookkeeping": g("engine_core_step") - g("model_execute") - g("sample"),
             "metadata builder (per-step plan)": g("builder"),
             "model outside attention": g("model_execute") - g("builder") - attn,
             "sampler": g("sample")}
    if backend == "PRESCORE":
        inner = {"attention: side-data upkeep": g("decode_side_data") + g("scoring_jobs"),
                 "attention: selection inputs (query-aware pick)": g("selection_inputs"),
                 "attention: fused selection + sparse attention": g("selection_and_decode")}
        parts.update(inner)
        parts["attention: forward glue (Python, dense rows)"] = attn - sum(inner.values())
    else:
        parts["attention (vLLM's CPU op)"] = attn
    out = {k: round(v, 3) for k, v in parts.items()}
    out["step"] = round(g("engine_step"), 3)
    out["attention"] = round(attn, 3)
    out["decode_steps"] = int(t.get("decode_steps", 0))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
