"""Step-time ledger: where every millisecond of a decode step goes, PRESCORE vs CPU_ATTN, and
each cell's Amdahl limit.

For each (context, batch) cell the two backends run one after the other, in alternating order
from round to round and cell to cell (A B, B A, ...), each in its own process
(``bench/serving/bench_breakdown.py``: one in-process engine, timers around the engine step,
the scheduler, the metadata builder, the model, the attention and its parts, and the
sampler). The **Amdahl limit** of a cell is CPU_ATTN's step
with its attention time scaled to the bytes PRESCORE reads (selected tiles + side data, as a
fraction of the KV): what a sparse decode at vLLM's own bytes per second would reach if
everything else stayed as it is.

    .venv/bin/python bench/serving/bench_ledger.py --cells 4096x1,8000x1,4096x8,8000x8 \\
        --report docs/results/ledger_avx-512
    .venv/bin/python bench/serving/bench_ledger.py --model qwen2.5-coder-0.5b --threads 2 \\
        --shared-prefix --cells 16000x1,16000x4,32000x1,32000x4 --report docs/results/ledger_qwen

Prints a table and writes ``ledger.json`` / ``ledger.md`` under ``--report``. Wall-clock
timers inside a 2-core engine drift between runs (the model's time outside attention most of
all; see docs/results/speed-targets.md), so ``--rounds N`` runs each cell N times: each part is
its median over the rounds (with two rounds, the mean), and the table gives the range of the
per-round shares of the attainable gain. With ``--shared-prefix`` the report also gives each
context's time to first token per backend (its shared prefix's chunked prefill).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def read_fraction(context: int, dtype: str, head_dim: int = 64,
                  block_size: int = 128) -> tuple[float, float]:
    """(tile fraction, side-data fraction) of the KV bytes a PRESCORE decode step reads at
    ``context`` tokens under the ``PRESCORE_*`` settings of this process, planned as the
    backend plans it: the side data is taken out of keep_ratio's bytes (charged against a bf16
    KV, ``ratio_budgets``), and a row with no room to rank reads no side data. The side
    fraction is in the run's cache dtype (an fp32 cache halves it). ``head_dim`` 64: both
    embedded models."""
    from prescore_backend.config import PrescoreConfig
    from prescore_backend.selection import (CHARGE_KV_BYTES, config_budget, floor_budget,
                                            ratio_budgets, side_read_fraction)
    import torch

    cfg = PrescoreConfig.from_env()
    n = torch.tensor([-(-(context + 1) // cfg.tile_size)])
    charge = side_read_fraction(cfg, head_dim, CHARGE_KV_BYTES, block_size)
    if cfg.max_tokens > 0:
        budget, ranks = config_budget(cfg, n), torch.tensor([True])
    else:
        budget, ranks = ratio_budgets(cfg, n, torch.tensor([cfg.keep_ratio], dtype=torch.float64),
                                      charge)
    tiles = int(floor_budget(cfg, budget)[0])
    side = side_read_fraction(cfg, head_dim, 2 if dtype == "bfloat16" else 4, block_size)
    return (min(tiles * cfg.tile_size, context + 1) / (context + 1),
            float(side) if bool(ranks[0]) else 0.0)


def combine(runs: list[dict]) -> dict:
    """One backend's ``bench_breakdown.py`` results over rounds -> one result whose ledger holds
    each part's median over the rounds (the parts of a median no longer sum to the step
    exactly; the step is the median of the steps)."""
    import statistics

    led = {k: round(statistics.median(r["ledger_ms_per_step"][k] for r in runs), 3)
           for k in runs[0]["ledger_ms_per_step"]}
    ttft = [r["ttft_s"] for r in runs if r.get("ttft_s") is not None]
    return dict(runs[0], ledger_ms_per_step=led, rounds=len(runs),
                ttft_s=round(statistics.median(ttft), 2) if ttft else None)


def cell_row(ctx: int, batch: int, cpu_run: dict, pre_run: dict, read: float) -> dict:
    """One cell from the two backends' ``bench_breakdown.py`` results: ``read`` is the fraction
    of the KV bytes PRESCORE reads; the Amdahl limit scales CPU_ATTN's attention by it."""
    cpu, pre = cpu_run["ledger_ms_per_step"], pre_run["ledger_ms_per_step"]
    limit = cpu["step"] - cpu["attention"] * (1 - read)
    gain = cpu["step"] - limit
    return dict(context=ctx, batch=batch, cpu_attn=cpu, prescore=pre,
                read_fraction=round(read, 4), amdahl_limit_ms=round(limit, 2),
                speedup=round(cpu["step"] / pre["step"], 3),
                limit_speedup=round(cpu["step"] / limit, 3),
                share_of_attainable_gain=round((cpu["step"] - pre["step"]) / gain, 3)
                if gain > 0 else None,
                # the same share of attention alone: blind to the model's time outside
                # attention, which drifts between engines and runs on a shared host
                attention_share=round((cpu["attention"] - pre["attention"]) / gain, 3)
                if gain > 0 else None,
                # time to first token of the cell's shared prefix (--shared-prefix only)
                ttft_s=dict(cpu_attn=cpu_run.get("ttft_s"), prescore=pre_run.get("ttft_s")),
                dtype=pre_run["dtype"], host=pre_run["host"],
                model=pre_run.get("model", "smollm2-135m"), threads=pre_run.get("threads", 1),
                shared_prefix=pre_run.get("shared_prefix", False))


def run_cells(backend: str, ctx: int, batches: list[int], a) -> list[dict]:
    """One engine (``bench_breakdown.py``) for ``backend`` at ``ctx`` tokens: one result per
    batch size (several only with ``--shared-prefix``, which prefills the context once)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "b.json"
        cmd = [sys.executable, str(REPO / "bench" / "serving" / "bench_breakdown.py"), "--backend", backend,
               "--context", str(ctx), "--batch", ",".join(map(str, batches)), "--decode-tokens",
               str(a.decode_tokens), "--dtype", a.dtype, "--model", a.model,
               "--threads", str(a.threads), "--out", str(out)]
        if a.shared_prefix:
            cmd += ["--shared-prefix", "--prefill-chunk", str(a.prefill_chunk)]
        print(f"[ledger] {backend} {ctx}x{','.join(map(str, batches))}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        return res if isinstance(res, list) else [res]


def engine_groups(cells: list[tuple[int, int]], shared_prefix: bool) -> list[tuple[int, list[int]]]:
    """The engines a run starts, in order: one per cell, or with a shared prefix one per context
    for all of its batch sizes (its prefill is the cost at 16k-32k tokens)."""
    if not shared_prefix:
        return [(c, [b]) for c, b in cells]
    groups: dict[int, list[int]] = {}
    for c, b in cells:
        groups.setdefault(c, []).append(b)
    return list(groups.items())


def rounds_row(ctx: int, batch: int, cpu_runs: list[dict], pre_runs: list[dict],
               read: float) -> dict:
    """One cell over rounds (round i: ``cpu_runs[i]`` and ``pre_runs[i]``): :func:`cell_row` of
    the per-part medians, plus each round's share of the attainable gain and its ledgers."""
    row = cell_row(ctx, batch, combine(cpu_runs), combine(pre_runs), read)
    row["round_shares"] = [cell_row(ctx, batch, c, p_, read)["share_of_attainable_gain"]
                           for c, p_ in zip(cpu_runs, pre_runs)]
    row["round_ledgers"] = [dict(cpu_attn=c["ledger_ms_per_step"], prescore=p_["ledger_ms_per_step"])
                            for c, p_ in zip(cpu_runs, pre_runs)]
    return row


def recompute(d: Path) -> tuple[list[dict], str]:
    """A stored run (``DIR/ledger.json`` and the command in ``DIR/ledger.md``) with its read
    fraction, Amdahl limits and shares derived again from its measured ledgers, planned under
    this process's ``PRESCORE_*`` settings and today's defaults (sinks, window, channels): they
    must be the run's (its ``keep_ratio`` is checked when stored). -> (rows, command)."""
    import re

    from prescore_backend.config import PrescoreConfig

    data = json.loads((d / "ledger.json").read_text())
    m = re.search(r"Command: `python bench/serving/bench_ledger.py ([^`]*)`",
                  (d / "ledger.md").read_text())
    keep = PrescoreConfig.from_env().keep_ratio
    rows = []
    for r in data["rows"]:
        if r.get("keep_ratio") not in (None, keep):
            raise SystemExit(f"{d}: the run's keep_ratio is {r['keep_ratio']}: set "
                             f"PRESCORE_KEEP_RATIO={r['keep_ratio']}")
        read = sum(read_fraction(r["context"], r["dtype"]))
        ttft = r.get("ttft_s") or {}
        meta = {k: r[k] for k in ("dtype", "host", "model", "threads", "shared_prefix") if k in r}
        runs = [(dict(ledger_ms_per_step=c["cpu_attn"]),
                 dict(meta, ledger_ms_per_step=c["prescore"])) for c in r.get("round_ledgers", [])]
        row = cell_row(r["context"], r["batch"],
                       dict(ledger_ms_per_step=r["cpu_attn"], ttft_s=ttft.get("cpu_attn")),
                       dict(meta, ledger_ms_per_step=r["prescore"], ttft_s=ttft.get("prescore")),
                       read)
        if runs:
            row["round_shares"] = [cell_row(r["context"], r["batch"], c, p_, read)
                                   ["share_of_attainable_gain"] for c, p_ in runs]
            row["round_ledgers"] = r["round_ledgers"]
        row["keep_ratio"] = keep
        rows.append(row)
    return rows, (m.group(1) if m else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default="2048x1,4096x1,8000x1,2048x4,4096x4,8000x4,"
                                      "2048x8,4096x8,8000x8", help="CONTEXTxBATCH,...")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--report", default=None, metavar="DIR")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs per cell and backend, alternating the order (A B, B A, ...)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--shared-prefix", action="store_true",
                   help="one engine per context and backend for all its batch sizes, the rows "
                        "sharing a prefix prefilled once (what makes 16k-32k cells affordable)")
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--recompute", default=None, metavar="DIR",
                   help="derive a stored run's read fraction, limits and shares again (its "
                        "ledgers as measured) and rewrite DIR/ledger.{json,md}; no engine runs")
    a = p.parse_args(argv)
    if a.recompute:
        d = Path(a.recompute)
        rows, args = recompute(d)
        a.decode_tokens = int(rows[0]["cpu_attn"]["decode_steps"])
        a.rounds = max(len(rows[0].get("round_ledgers", [])), 1)
        cmd = json.loads((d / "ledger.json").read_text()).get("cmd")
        title = (d / "ledger.md").read_text().splitlines()[0]
        md = markdown(rows, a, args, title=title, note=(
            f"Read fraction, Amdahl limits and shares derived again on "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d} from the measured ledgers (`python "
            f"bench/serving/bench_ledger.py --recompute {d}`), with the side data inside "
            "keep_ratio's bytes as the backend plans it."))
        (d / "ledger.json").write_text(json.dumps(dict(rows=rows, cmd=cmd), indent=1) + "\n")
        (d / "ledger.md").write_text(md + "\n")
        print(md)
        return 0
    cells = [tuple(int(x) for x in c.split("x")) for c in a.cells.split(",") if c]
    rows = []
    for i, (ctx, batches) in enumerate(engine_groups(cells, a.shared_prefix)):
        order = ["CPU_ATTN", "PRESCORE"] if i % 2 == 0 else ["PRESCORE", "CPU_ATTN"]
        res: dict[str, list[list[dict]]] = {"CPU_ATTN": [], "PRESCORE": []}
        for k in range(a.rounds):
            for b in (order if k % 2 == 0 else order[::-1]):
                res[b].append(run_cells(b, ctx, batches, a))
        read = sum(read_fraction(ctx, res["PRESCORE"][0][0]["dtype"]))
        for j, batch in enumerate(batches):
            rows.append(rounds_row(ctx, batch, [r[j] for r in res["CPU_ATTN"]],
                                   [r[j] for r in res["PRESCORE"]], read))
    md = markdown(rows, a, " ".join(sys.argv[1:] if argv is None else argv))
    print(md)
    if a.report:
        d = Path(a.report)
        d.mkdir(parents=True, exist_ok=True)
        from prescore_backend.config import PrescoreConfig

        keep = PrescoreConfig.from_env().keep_ratio  # the run's, for readers of the JSON
        for r in rows:
            r["keep_ratio"] = keep
        (d / "ledger.json").write_text(json.dumps(dict(rows=rows, cmd=a.cells), indent=1) + "\n")
        (d / "ledger.md").write_text(md + "\n")
        print(f"# wrote {d}/ledger.{{json,md}}", file=sys.stderr)
    return 0


def markdown(rows: list[dict], a, args: str, title: str | None = None,
             note: str | None = None) -> str:
    keep = os.environ.get("PRESCORE_KEEP_RATIO", "the default")
    lines = [title or f"# Decode step ledger: PRESCORE vs CPU_ATTN "
             f"({dt.datetime.now(dt.timezone.utc):%Y-%m-%d})", "",
             f"Host: {rows[0]['host']}; {rows[0]['dtype']}; {rows[0].get('model', 'smollm2-135m')}, "
             f"{rows[0].get('threads', 1)} thread(s) per engine, eager"
             f"{'; rows sharing a prefix prefilled once' if rows[0].get('shared_prefix') else ''}"
             f"; {a.decode_tokens} decode steps per cell; {getattr(a, 'rounds', 1)} round(s) "
             f"per cell (each part: its median over the rounds); keep ratio: {keep}. Command: "
             f"`python bench/serving/bench_ledger.py {args}`.", "",
             *([note, ""] if note else []),
             "Amdahl limit = CPU_ATTN's step with its attention scaled to the bytes PRESCORE "
             "reads (tiles + side data); share = (CPU_ATTN - PRESCORE) / (CPU_ATTN - limit); "
             "attention share = the same with attention times only (CPU_ATTN's attention - "
             "PRESCORE's) / (CPU_ATTN - limit).", "",
             "| context | batch | CPU_ATTN ms/step (attention) | PRESCORE ms/step (attention) "
             "| speedup | read | Amdahl limit ms | limit speedup | share of attainable gain "
             "(per round) | attention share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "-" if x is None else f"{x:.0%}"  # noqa: E731
    for r in rows:
        c, p_ = r["cpu_attn"], r["prescore"]
        share = pct(r["share_of_attainable_gain"])
        if len(r.get("round_shares", [])) > 1:
            share += " (" + ", ".join(pct(x) for x in r["round_shares"]) + ")"
        lines.append(f"| {r['context']} | {r['batch']} | {c['step']:.1f} ({c['attention']:.1f}) "
                     f"| {p_['step']:.1f} ({p_['attention']:.1f}) | {r['speedup']:.2f}x "
                     f"| {r['read_fraction']:.3f} | {r['amdahl_limit_ms']:.1f} "
                     f"| {r['limit_speedup']:.2f}x | {share} | {pct(r.get('attention_share'))} |")
    if all(r.get("ttft_s", {}).get("prescore") is not None for r in rows):
        lines += ["", "Time to first token of each context's shared prefix (one prompt, chunked "
                  "prefill, idle engine; s, median over the rounds):", "",
                  "| context | CPU_ATTN TTFT s | PRESCORE TTFT s | PRESCORE / CPU_ATTN |",
                  "|---|---|---|---|"]
        for r in rows:
            if r["batch"] != min(x["batch"] for x in rows if x["context"] == r["context"]):
                continue  # one prefill per context: its batch sizes share it
            c, p_ = r["ttft_s"]["cpu_attn"], r["ttft_s"]["prescore"]
            lines.append(f"| {r['context']} | {c:.1f} | {p_:.1f} | {p_ / c:.2f}x |")
    lines += ["", "Where a decode step's time goes (ms per step; with one round the parts sum to the "
              "step, over rounds each is its own median):", ""]
    keys = [k for k in rows[0]["prescore"] if k not in ("step", "attention", "decode_steps")]
    ckeys = [k for k in rows[0]["cpu_attn"] if k not in ("step", "attention", "decode_steps")]
    lines += ["| part | " + " | ".join(f"{r['context']}x{r['batch']}" for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for who, key, ks in (("CPU_ATTN", "cpu_attn", ckeys), ("PRESCORE", "prescore", keys)):
        lines.append(f"| **{who}** step | " + " | ".join(
            f"**{r[key]['step']:.1f}**" for r in rows) + " |")
        for k in ks:
            lines.append(f"| {who}: {k} | " + " | ".join(f"{r[key][k]:.1f}" for r in rows) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
