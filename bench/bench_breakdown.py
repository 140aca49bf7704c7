"""Where a step's attention time goes inside the engine: prefill vs decode, scoring, selection.

Runs one vLLM engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the embedded
model, wraps the attention implementation's methods with wall-clock timers, prefills a batch
of real-text prompts once, then decodes 16 tokens, and prints (and writes as JSON) the time per
phase: for PRESCORE the prefill attention with the scoring jobs inside it, and per decode step
the side-data upkeep, the selection's inputs (pre-scores gathered through the block table, the
query-aware pick) and the fused selection + sparse attention; for CPU_ATTN its attention
forward. One
backend per process; compare two runs side by side:

    .venv/bin/python bench/bench_breakdown.py --backend PRESCORE --context 4096
    .venv/bin/python bench/bench_breakdown.py --backend CPU_ATTN --context 4096

Wall-clock (the engine's threads share the process); a diagnostic, not a speed claim.
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
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto",
                   help="auto = bfloat16 where the CPU has native bf16, else float32")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as prescore-serve

    import torch

    torch.set_num_threads(1)
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.attention.backends import cpu_attn

    from prescore_backend.backends import cpu as pc
    from prescore_backend.server.models import resolve_model

    secs: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)

    def timed(owner, name: str, key: str, by_phase: bool = False) -> None:
        fn = getattr(owner, name)

        def wrapper(*args, **kw):
            k = key
            if by_phase:  # forward(self, layer, query, ...): decode steps have one token per row
                k += "_decode" if args[2].shape[0] <= a.batch else "_prefill"
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                secs[k] += time.perf_counter() - t0
                calls[k] += 1

        setattr(owner, name, wrapper)

    if a.backend == "PRESCORE":
        timed(pc.PrescoreCPUImpl, "forward", "attention", by_phase=True)
        timed(pc.PrescoreCPUImpl, "_run_score_jobs", "scoring_jobs")
        timed(pc.PrescoreCPUImpl, "_record_decode_tokens", "decode_side_data")
        timed(pc.PrescoreCPUImpl, "_sparse_decode", "selection_and_sparse_attention")
        # module globals: _sparse_decode's lookups. The selection itself runs inside the fused
        # select_and_decode_into call; its inputs (pre-scores gathered, query-aware pick) before it.
        timed(pc, "scores_and_pick", "selection_inputs")
        timed(pc, "select_and_decode_into", "selection_and_decode")
    else:
        timed(cpu_attn.CPUAttentionBackendImpl, "forward", "attention", by_phase=True)

    model = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok("\n\n".join(topics[k] for k in sorted(topics)))["input_ids"]
    step = max(1, (len(ids) - a.context) // max(a.batch, 1))
    prompts = [TokensPrompt(prompt_token_ids=ids[i * step:i * step + a.context]) for i in range(a.batch)]
    from prescore_backend.kernels import host

    dtype = a.dtype if a.dtype != "auto" else (
        "bfloat16" if host.has_native_bf16() else "float32")  # fp32 where bf16 is emulated
    llm = LLM(model, attention_backend=a.backend, enforce_eager=True, dtype=dtype,
              max_model_len=a.context + a.decode_tokens + 64, kv_cache_memory_bytes=2 << 30,
              max_num_seqs=a.batch, enable_prefix_caching=False,
              max_num_batched_tokens=a.context * a.batch + 64)
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)  # warm-up
    secs.clear(), calls.clear()
    llm.generate(prompts, SamplingParams(max_tokens=a.decode_tokens + 1, ignore_eos=True),
                 use_tqdm=False)
    steps = a.decode_tokens
    out = dict(backend=a.backend, context=a.context, batch=a.batch, decode_steps=steps,
               prefill_s={k: round(v, 3) for k, v in secs.items() if k in ("attention_prefill", "scoring_jobs")},
               decode_ms_per_step={k: round(1e3 * v / steps, 2) for k, v in secs.items()
                                   if k not in ("attention_prefill", "scoring_jobs")},
               calls=dict(calls))
    print(json.dumps(out, indent=1))
    path = Path(a.out or f"bench/out/breakdown_{a.backend}_{a.context}x{a.batch}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"# wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
