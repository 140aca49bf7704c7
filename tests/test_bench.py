"""Smoke runs of the benchmarks: the kernel micro-benchmark runs, writes its JSON, and on the
same cache the fused kernel over every tile equals vLLM's own CPU attention op; the engine
breakdown and the end-to-end decode benchmark run real engines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_sparse_decode_smoke(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernels" / "bench_sparse_decode.py"), "--contexts", "1024",
         "--batches", "1,2", "--keeps", "4", "--iters", "3", "--working-set-mb", "8",
         "--kernel-column", "--out", str(out), "--report", str(tmp_path / "rep")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["thp"] is True and data["meta"]["k_layout"] == "vllm"
    rows = data["results"]
    assert [(r["ctx"], r["batch"], r["keep"]) for r in rows] == [(1024, 1, "1/4"), (1024, 2, "1/4")]
    for r in rows:
        for k in ("vllm_ms", "dense_ms", "select_ms", "sparse_ms", "sparse_torch_ms",
                  "sparse_lsh_ms", "sparse_quest_ms", "kernel_ms"):
            assert r[k] > 0, k
        assert r["max_abs_diff_vs_vllm"] < 1e-4  # fp32: our all-tiles decode == vLLM's op
    assert "speedup_vs_vllm" in proc.stdout
    md = (tmp_path / "rep" / "kernels.md").read_text()
    assert "| 1024 | 2 | 1/4 |" in md and "--report" in md
    assert json.loads((tmp_path / "rep" / "kernels.json").read_text()) == data


def test_bench_sparse_decode_amx_layout_smoke(tmp_path: Path) -> None:
    """bf16 on vLLM's packed "amx" layout: every column runs, and where the CPU has AMX (vLLM's
    op needs it) the fused kernel over every tile equals vLLM's AMX kernel to bf16 rounding."""
    import torch

    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernels" / "bench_sparse_decode.py"), "--contexts", "1024",
         "--batches", "2", "--keeps", "4", "--iters", "3", "--working-set-mb", "8",
         "--k-layout", "amx", "--dtype", "bfloat16", "--out", str(out), "--report",
         str(tmp_path / "rep"), "--report-name", "kernels_amx", "--floor-column"],
        capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["k_layout"] == "amx" and data["meta"]["dtype"] == "bfloat16"
    (r,) = data["results"]
    for k in ("dense_ms", "select_ms", "sparse_ms", "sparse_torch_ms", "sparse_lsh_ms",
              "sparse_quest_ms"):
        assert r[k] > 0, k
    if torch.cpu._is_amx_tile_supported():
        assert r["vllm_ms"] > 0 and r["max_abs_diff_vs_vllm"] < 4e-3  # outputs are bf16
        assert r["floor_ms"] > 0 and r["readall_ms"] > 0  # AMX CPUs have AVX-512
        assert r["floor_speedup_vs_vllm"] == r["vllm_ms"] / r["floor_ms"]
    assert "bfloat16" in (tmp_path / "rep" / "kernels_amx.md").read_text()
    bad = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernels" / "bench_sparse_decode.py"), "--k-layout", "amx"],
        capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--dtype bfloat16" in bad.stderr


@pytest.mark.e2e
def test_bench_breakdown_smoke(tmp_path: Path, model_path) -> None:
    """The engine-internal breakdown runs on a real PRESCORE engine and sees every phase: the
    prefill's scoring jobs inside its attention, and one side-data update and one fused
    selection + sparse attention per layer and decode step; with the default query-aware part
    (sparq4) that call ranks the tiles itself: no separate gather of the selection's inputs.
    With ``--shared-prefix`` two batch sizes run on one engine after one prefill of the shared
    prefix; each batch then prefills only its rows' tails (one chunk)."""
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serving" / "bench_breakdown.py"), "--backend", "PRESCORE",
         "--context", "2304", "--batch", "1,2", "--shared-prefix", "--decode-tokens", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads(out.read_text())
    assert [d["batch"] for d in cells] == [1, 2] and all(d["shared_prefix"] for d in cells)
    assert cells[0]["ttft_s"] == cells[1]["ttft_s"] > 0  # the one shared prefill, timed
    for d in cells:
        layers = d["calls"]["attention_prefill"]
        assert layers == 30  # SmolLM2-135M: the batch's tails in one prefill step
        # the shared prefix's prefill (2304 tokens, its full blocks scored), once
        assert 0 < d["prefill_s"]["scoring_jobs"] < d["prefill_s"]["attention_prefill"]
        # decode steps: 2 (+1 token from the prefill step's sampling, not counted as decode)
        n = d["calls"]["selection_and_sparse_attention"]
        assert d["calls"]["selection_and_decode"] == n
        assert d["calls"].get("selection_inputs", 0) == 0  # ranked inside the fused call
        assert n % layers == 0 and n >= 2 * layers
        ms = d["decode_ms_per_step"]
        assert 0 < ms["selection_and_decode"] < ms["attention_decode"]
        # The ledger: decode steps only, every part non-negative (nested timers differenced),
        # the parts summing to the engine step, attention inside it.
        led = d["ledger_ms_per_step"]
        assert led["decode_steps"] == 2
        parts = {k: v for k, v in led.items() if k not in ("step", "attention", "decode_steps")}
        assert all(v >= -0.01 for v in parts.values()), parts
        assert sum(parts.values()) == pytest.approx(led["step"], abs=0.05)
        assert 0 < led["attention"] < led["step"]
        assert led["attention: fused selection + sparse attention"] > 0


def test_bench_ledger_amdahl_limit_and_table() -> None:
    """The ledger's cell: the Amdahl limit is CPU_ATTN's step with its attention scaled to the
    bytes PRESCORE reads; the share of the attainable gain and the table follow from it."""
    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import bench_ledger

    cpu = {"ledger_ms_per_step": {"step": 100.0, "attention": 60.0, "model outside attention": 40.0,
                                  "decode_steps": 4}, "dtype": "float32", "host": "test host"}
    pre = {"ledger_ms_per_step": {"step": 70.0, "attention": 30.0, "model outside attention": 40.0,
                                  "decode_steps": 4}, "dtype": "float32", "host": "test host"}
    row = bench_ledger.cell_row(8000, 8, cpu, pre, read=0.25)
    assert row["amdahl_limit_ms"] == pytest.approx(55.0)  # 100 - 60 * 0.75
    assert row["speedup"] == pytest.approx(100 / 70, abs=1e-3)
    assert row["share_of_attainable_gain"] == pytest.approx(30 / 45, abs=1e-3)
    assert row["attention_share"] == pytest.approx(30 / 45, abs=1e-3)  # same model time here
    # planned as the backend plans: the side data inside keep 1/8's bytes (charged against a
    # bf16 KV on every host; an fp32 cache reads the same codes, half the fraction)
    tiles, side = bench_ledger.read_fraction(32000, "bfloat16")
    assert 0 < side < 0.05 and tiles + side == pytest.approx(0.125, abs=16 / 32001 + 1e-9)
    assert bench_ledger.read_fraction(32000, "float32") == (tiles, side / 2)
    # no room to rank beyond sinks and window (2048 tokens): no side data read, the bytes
    # go to tiles (StreamingLLM's selection)
    tiles, side = bench_ledger.read_fraction(2048, "bfloat16")
    assert side == 0.0 and tiles == pytest.approx(17 * 16 / 2049)
    md = bench_ledger.markdown([row], SimpleNamespace(decode_tokens=4), "--cells 8000x8")
    assert "test host" in md and "| 8000 | 8 | 100.0 (60.0) | 70.0 (30.0) | 1.43x" in md
    # over rounds: each part its median, and the per-round shares in the table
    slow = {"ledger_ms_per_step": {"step": 90.0, "attention": 30.0, "model outside attention": 60.0,
                                   "decode_steps": 4}, "dtype": "float32", "host": "test host"}
    fast = {"ledger_ms_per_step": {"step": 60.0, "attention": 20.0, "model outside attention": 40.0,
                                   "decode_steps": 4}, "dtype": "float32", "host": "test host"}
    both = bench_ledger.combine([slow, pre, fast])
    assert both["rounds"] == 3 and both["ledger_ms_per_step"]["step"] == 70.0
    assert both["ledger_ms_per_step"]["attention"] == 30.0
    assert both["ledger_ms_per_step"]["model outside attention"] == 40.0
    row = bench_ledger.rounds_row(8000, 8, [cpu] * 3, [slow, pre, fast], read=0.25)
    assert row["prescore"] == both["ledger_ms_per_step"] and len(row["round_ledgers"]) == 3
    md = bench_ledger.markdown([row], SimpleNamespace(decode_tokens=4, rounds=3), "--rounds 3")
    assert "| 67% (22%, 67%, 89%) | 67% |" in md and "3 round(s) per cell" in md
    # a slower model outside attention moves the step's share, not the attention share
    slow_model = bench_ledger.cell_row(8000, 8, cpu, slow, read=0.25)
    assert slow_model["share_of_attainable_gain"] == pytest.approx(10 / 45, abs=1e-3)
    assert slow_model["attention_share"] == pytest.approx(30 / 45, abs=1e-3)
    # engines: one per cell, or with a shared prefix one per context for its batch sizes
    cells = [(16000, 1), (16000, 4), (32000, 1), (32000, 4)]
    assert bench_ledger.engine_groups(cells, False) == [(c, [b]) for c, b in cells]
    assert bench_ledger.engine_groups(cells, True) == [(16000, [1, 4]), (32000, [1, 4])]
    # time to first token (shared prefix): the median over rounds, one line per context
    t = lambda r, s: dict(r, ttft_s=s)  # noqa: E731
    rows = [bench_ledger.rounds_row(16000, b, [t(cpu, 10.0), t(cpu, 12.0), t(cpu, 30.0)],
                                    [t(pre, 11.0), t(pre, 13.0), t(pre, 9.0)], read=0.25)
            for b in (1, 4)]
    assert rows[0]["ttft_s"] == dict(cpu_attn=12.0, prescore=11.0)
    md = bench_ledger.markdown(rows, SimpleNamespace(decode_tokens=4, rounds=3), "--rounds 3")
    assert md.count("| 16000 | 12.0 | 11.0 | 0.92x |") == 1


def test_bench_ledger_recompute_derives_the_limit_again(tmp_path: Path) -> None:
    """``--recompute DIR``: a stored run's read fraction, limits and shares derived again
    under the current planning, its measured ledgers, title and command kept."""
    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import bench_ledger

    led = lambda step, att: {"ledger_ms_per_step": {  # noqa: E731
        "step": step, "attention": att, "model outside attention": step - att, "decode_steps": 4},
        "dtype": "bfloat16", "host": "test host", "model": "qwen2.5-coder-0.5b"}
    row = bench_ledger.rounds_row(32000, 4, [led(190.0, 130.0), led(180.0, 120.0)],
                                  [led(110.0, 40.0), led(100.0, 35.0)], read=0.25)  # wrong read
    (tmp_path / "ledger.json").write_text(json.dumps({"rows": [row], "cmd": "32000x4"}))
    (tmp_path / "ledger.md").write_text("# Decode step ledger (2026-12-06)\n\nCommand: `python "
                                        "bench/serving/bench_ledger.py --cells 32000x4 --rounds 2`.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRESCORE_")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serving" / "bench_ledger.py"),
                           "--recompute", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (new,) = json.loads((tmp_path / "ledger.json").read_text())["rows"]
    read = sum(bench_ledger.read_fraction(32000, "bfloat16"))
    assert new["read_fraction"] == round(read, 4) and abs(read - 0.125) < 1e-3
    assert new["cpu_attn"] == row["cpu_attn"] and new["prescore"] == row["prescore"]
    assert new["round_ledgers"] == row["round_ledgers"]
    assert new["amdahl_limit_ms"] == pytest.approx(185.0 - 125.0 * (1 - read), abs=0.01)
    gain = [190.0 - 130.0 * (1 - read), 180.0 - 120.0 * (1 - read)]
    assert new["round_shares"] == [round((c - p_) / (c - g), 3) for c, p_, g in
                                   zip((190.0, 180.0), (110.0, 100.0), gain)]
    md = (tmp_path / "ledger.md").read_text()
    assert md.startswith("# Decode step ledger (2026-12-06)") and "--cells 32000x4 --rounds 2" in md
    assert "derived again" in md and f"| {read:.3f} |" in md and "| 0.250 |" not in md


def test_bench_vllm_decode_orders_engines_a_b_b_a_and_reports_ranges() -> None:
    """The end-to-end benchmark alternates the backends' engines over rounds (A B, B A, A B)
    and reports per cell the median and range over rounds and the paired speedup range."""
    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import bench_vllm_decode as bvd

    assert bvd.engine_order(["CPU_ATTN", "PRESCORE"], 3) == [
        (0, "CPU_ATTN"), (0, "PRESCORE"), (1, "PRESCORE"), (1, "CPU_ATTN"),
        (2, "CPU_ATTN"), (2, "PRESCORE")]

    def rows(ms: float, ttft: float, tokens: list[int]) -> list[dict]:
        return [dict(ctx=600, batch=1, decode_ms_per_step=ms, ttft_s=ttft, tokens=[tokens])]

    table = bvd.aggregate({"CPU_ATTN": [rows(100, 1.0, [1, 2, 3]), rows(120, 1.2, [1, 2, 3]),
                                        rows(110, 1.1, [1, 2, 3])],
                           "PRESCORE": [rows(50, 1.1, [1, 2, 4]), rows(80, 1.3, [1, 2, 4]),
                                        rows(55, 1.0, [1, 2, 4])]})
    cell = {r["backend"]: r for r in table}
    ps = cell["PRESCORE"]
    assert ps["rounds"] == 3 and ps["decode_ms_rounds"] == [50, 80, 55]
    assert (ps["decode_ms_per_step"], ps["decode_ms_min"], ps["decode_ms_max"]) == (55, 50, 80)
    assert ps["speedup_vs_cpu_attn"] == pytest.approx(110 / 55)
    assert (ps["speedup_min"], ps["speedup_max"]) == pytest.approx((1.5, 2.0))  # per round
    assert ps["ttft_vs_cpu_attn"] == pytest.approx(1.1 / 1.1)
    assert ps["greedy_agreement_min"] == 2  # the first 2 of 3 tokens agree
    assert cell["CPU_ATTN"]["speedup_vs_cpu_attn"] == pytest.approx(1.0)


@pytest.mark.e2e
def test_bench_vllm_decode_runs_real_engines(tmp_path: Path, model_path) -> None:
    """One round of the end-to-end benchmark with real engines (the order and the statistics
    over rounds are checked above): prefills in chunks, decodes from the prefix cache, and
    reports per cell the speedup, the greedy agreement and the host."""
    out = tmp_path / "v.json"
    env = dict(os.environ, PRESCORE_MIN_SEQ_LEN="256")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serving" / "bench_vllm_decode.py"), "--contexts", "600",
         "--batches", "1,2", "--decode-tokens", "6", "--rounds", "1", "--prefill-chunk", "256",
         "--kv-gib", "0.5", "--dtype", "float32", "--out", str(out),
         "--report", str(tmp_path / "rep")],
        capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    order = re.findall(r"# round (\d)/1: (\w+)", proc.stdout)
    assert order == [("1", "CPU_ATTN"), ("1", "PRESCORE")]
    d = json.loads(out.read_text())
    assert d["rounds"] == 1 and d["args"]["prefill_chunk"] == 256
    rows = {(r["backend"], r["batch"]): r for r in d["rows"]}
    assert set(rows) == {(b, n) for b in ("CPU_ATTN", "PRESCORE") for n in (1, 2)}
    for r in rows.values():
        assert r["rounds"] == 1 and len(r["decode_ms_rounds"]) == 1
        assert r["decode_ms_min"] <= r["decode_ms_per_step"] <= r["decode_ms_max"]
        assert r["speedup_min"] <= r["speedup_vs_cpu_attn"] * 1.0001
        assert all(len(t) == 6 for t in r["tokens"])  # every row decoded its tokens
    assert rows[("CPU_ATTN", 1)]["speedup_vs_cpu_attn"] == pytest.approx(1.0)
    # the agreement is the first differing position of each row against CPU_ATTN's tokens
    ref, got = rows[("CPU_ATTN", 2)]["tokens"], rows[("PRESCORE", 2)]["tokens"]
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), 6)
              for x, y in zip(got, ref)]
    assert rows[("PRESCORE", 2)]["greedy_agreement_min"] == min(firsts)
    md = (tmp_path / "rep" / "speed.md").read_text()
    assert "round(s) (A B" in md and "CPUs" in md and "4-bit key copy" in md


def test_bench_triton_decode_smoke(tmp_path: Path) -> None:
    """The GPU check/benchmark script runs on CPU under the Triton interpreter (tiny shapes):
    its check passes against its float64 oracle and every timing column is written (the
    two-tier step's too)."""
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "kernels" / "bench_triton_decode.py"), "--device", "cpu",
         "--check", "--keeps", "8", "--tiers", "3", "--out", str(out)], capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["interpreted"] is True
    assert data["check"]["cases"] >= 8 and data["check"]["failed"] == 0
    assert {r["splits"] for r in data["check"]["rows"]} == {"plan", 3}
    rows = data["results"]
    assert [(r["ctx"], r["batch"], r["keep"]) for r in rows] == [(256, 2, "1/8")]
    for r in rows:
        for k in ("dense_ms", "sdpa_ms", "sparse_ms", "select_ms", "step_ms", "select_torch_eager_ms",
                  "rank_ms", "rank_torch_eager_ms", "tiers_eager_ms", "default_ms"):
            assert r[k] > 0, k
        assert 0 < r["default_read_fraction"] <= 1 / 8 + 1e-9 and r["default_channels"] == 16
        assert r["max_abs_diff_dense_vs_sdpa"] < 2e-2  # bf16: our dense kernel == SDPA
        assert r["select_matches_ref"] is True


def test_read_floor_reads_the_selected_lines() -> None:
    """bench/kernels/read_floor.py, the evidence behind the floor column: its checksum (int32 lanes
    added with wrap-around) equals the sum over exactly the lines the sparse kernel reads for
    the selection (each selected tile's 16-token chunks below seq_len: K one run, V D/16 runs
    in vLLM's "amx" packing), with ragged lengths, a partial last chunk, -1 padding and a
    shuffled block table; ``read_all_amx`` equals the sum over the rows' whole blocks."""
    import torch

    sys.path.insert(0, str(REPO / "bench" / "kernels"))
    import read_floor

    if not read_floor.available():
        import pytest
        pytest.skip("needs a C++ compiler and AVX-512")  # the bench then omits the columns
    from prescore_backend.kernels.layouts import vllm_cpu_amx_kv_views

    g = torch.Generator().manual_seed(3)
    NB, H, B, D, T = 13, 2, 32, 64, 16
    cache = torch.randint(-2 ** 15, 2 ** 15, (NB, H, B, 2 * D), generator=g,
                          dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    kc, vc = vllm_cpu_amx_kv_views(cache)
    bt = torch.randperm(NB, generator=g)[:12].view(2, 6).to(torch.int32)  # [R, nblk]
    seq_lens = torch.tensor([150, 57], dtype=torch.int32)  # ragged, partial chunks
    tiles = torch.tensor([[[0, 3, 9, -1], [2, 5, 7, 4]],
                          [[3, -1, -1, -1], [0, 1, 2, 3]]], dtype=torch.int32)  # [R, H, S]

    def wrap(total: int) -> float:
        return float((total + 2 ** 31) % 2 ** 32 - 2 ** 31)

    def lines(region, blk: int, h: int, lo: int, n: int) -> int:
        return int(region[blk, h].reshape(-1)[lo:lo + n].view(torch.int32).long().sum())

    want = 0
    for r in range(2):
        for h in range(H):
            for t in tiles[r, h].tolist():
                for tok in range(t * T, t * T + T, 16) if t >= 0 else []:
                    if tok >= int(seq_lens[r]):
                        continue
                    blk, off = int(bt[r, tok // B]), tok % B
                    want += lines(kc, blk, h, off * D, 16 * D)
                    want += sum(lines(vc, blk, h, d0 * B + off * 16, 256) for d0 in range(0, D, 16))
    assert read_floor.read_selected_amx(kc, vc, bt, seq_lens, tiles, T) == wrap(want)
    everything = sum(lines(c, int(bt[r, j]), h, 0, B * D) for c in (kc, vc) for r in range(2)
                     for j in range(-(-int(seq_lens[r]) // B)) for h in range(H))
    assert read_floor.read_all_amx(kc, vc, bt, seq_lens) == wrap(everything)
    bogus = tiles.clone()
    bogus[0, 0, 0] = 1  # another tile: a different sum (catches reading the wrong lines)
    assert read_floor.read_selected_amx(kc, vc, bt, seq_lens, bogus, T) != wrap(want)


def test_gpu_check_script_names_what_exists(tmp_path: Path) -> None:
    """bench/kernels/gpu_check.sh (run on GPU machines only) parses, and every test file and script
    its parts run exists in this checkout, each writing under the one output folder."""
    script = REPO / "bench" / "kernels" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--list", str(tmp_path / "g")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    parts = [ln.split(": ", 1) for ln in proc.stdout.splitlines() if ln.startswith("== ")]
    assert [p[0] for p in parts] == ["== pytest_kernels", "== pytest_backend", "== triton_check",
                                     "== triton_decode", "== triton_target"]
    for _, cmd in parts:
        paths = [w for w in cmd.split() if w.startswith(("tests/", "bench/"))]
        assert paths and all((REPO / p).exists() for p in paths), cmd
        outs = [w for w in cmd.split() if w.endswith(".json")]
        assert all(o.startswith(str(tmp_path / "g")) for o in outs), cmd


def test_shared_prefix_prompts_differ_only_in_their_last_tokens() -> None:
    """--shared-prefix: a context's rows share all but their last 32 tokens (one prefill for
    the batch through the prefix cache); contexts longer than the text repeat it."""
    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import bench_vllm_decode

    tok = lambda text: {"input_ids": list(range(5000))}  # noqa: E731
    rows = bench_vllm_decode._prompts(tok, 9000, 4, shared_suffix=32)
    assert [len(r) for r in rows] == [9000] * 4
    assert all(r[:8968] == rows[0][:8968] for r in rows)
    assert len({tuple(r[8968:]) for r in rows}) == 4
    plain = bench_vllm_decode._prompts(tok, 3000, 2)
    assert [len(r) for r in plain] == [3000, 3000] and plain[0] != plain[1]


def test_longctx_summary_intervals_table_and_plot(tmp_path: Path) -> None:
    """eval_longctx.py's report from rows: accuracy with Wilson intervals, the paired
    difference to dense per question, per-task counts, the Markdown table and the plot."""
    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import eval_longctx

    rows = []
    for q in range(10):
        for method, ok in (("dense", q < 9), ("keep 0.125", q < 8), ("keep 0.0625", q < 5),
                           ("streaming 0.125", q < 3), ("tiers keep 0.125", q < 7)):
            rows.append(dict(length=8192, context=0, question=q, task="niah_number",
                             method=method, correct=ok))
    s = eval_longctx.summarize(rows)["8192"]
    assert (s["dense"]["correct"], s["keep 0.125"]["correct"]) == (9, 8)
    lo, hi = s["dense"]["wilson95"]
    assert 0.59 < lo < 0.6 and 0.98 < hi < 0.99  # Wilson 9/10
    assert s["keep 0.125"]["vs_dense"] == pytest.approx(-0.1)
    assert s["keep 0.0625"]["vs_dense95"][1] < 0  # 4 of 10 lost: the interval excludes 0
    assert s["keep 0.125"]["by_task"]["niah_number"] == [8, 10]
    # against StreamingLLM at the same ratio, paired; no StreamingLLM row at 1/16: no pair
    assert s["keep 0.125"]["vs_streaming"] == pytest.approx(0.5)
    assert s["keep 0.125"]["vs_streaming95"][0] > 0 and "vs_streaming" not in s["keep 0.0625"]
    assert s["tiers keep 0.125"]["vs_streaming"] == pytest.approx(0.4)  # another server's rows
    meta = {"model": "m", "dtype": "bf16", "host": "h", "command": "c"}
    md = eval_longctx.markdown({"8192": s}, meta)
    assert "| 8192 | keep 0.125 | 80.0% (8/10) |" in md
    # the kept-task table: niah_number kept (dense 9/10 >= 80%), the others never asked
    assert ("| 8192 | niah_number | - | 90.0% (9/10) | 80.0% (8/10) | 50.0% (5/10) | "
            "30.0% (3/10) | 70.0% (7/10) |") in md
    assert "| 8192 | keep 0.125 | 8/10 | 3/10 | +50.0 [" in md
    assert list(eval_longctx.methods([0.125], [0.125]).values())[-1] == {
        "prescore_keep_ratio": 0.125, "prescore_streaming": True}
    eval_longctx.plot({"8192": s}, meta, tmp_path / "p.png",
                      {"rows": [{"ctx": 8192, "batch": 1, "backend": "PRESCORE@0.125",
                                 "speedup_vs_cpu_attn": 2.0}]})
    assert (tmp_path / "p.png").stat().st_size > 10_000
    # the speed panel reads bench_vllm_decode's rows and bench_ledger's (one keep ratio)
    assert eval_longctx.speed_points({"rows": [
        {"ctx": 8000, "batch": 4, "backend": "PRESCORE@0.0625", "speedup_vs_cpu_attn": 2.5},
        {"ctx": 8000, "batch": 4, "backend": "PRESCORE@0.125", "speedup_vs_cpu_attn": 2.0},
        {"ctx": 8000, "batch": 4, "backend": "CPU_ATTN", "speedup_vs_cpu_attn": None}]}) == {
        (8000, 4): [(0.0625, 2.5), (0.125, 2.0)]}
    assert eval_longctx.speed_points({"rows": [
        {"context": 32000, "batch": 4, "speedup": 2.3},
        {"context": 16000, "batch": 1, "speedup": 1.2, "keep_ratio": 0.25}]}) == {
        (16000, 1): [(0.25, 1.2)], (32000, 4): [(0.125, 2.3)]}


def test_bench_load_shared_documents_and_alternation() -> None:
    """bench_load with --shared-docs: the long prompts are questions about the same few
    documents (one prefill each per server, then prefix-cache hits), each prompt its own
    question; the servers run A B, B A, ... and each number is its median over the rounds."""
    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import bench_load

    docs = bench_load.shared_docs(2, 20_000)
    assert len(docs) == 2 and docs[0] != docs[1] and all(len(d) == 20_000 for d in docs)
    prompts = bench_load.make_prompts(40, 0.5, 20_000, seed=3, docs=docs)
    long = [p for p in prompts if len(p) > 20_000]
    assert 10 < len(long) < 30 and {p[:20_000] for p in long} == set(docs)
    assert len(set(long)) == len(long)  # one question each
    assert bench_load.make_prompts(40, 0.5, 20_000, seed=3) != prompts  # own texts without docs
    assert bench_load.alternate(["A", "B"], 3) == ["A", "B", "B", "A", "A", "B"]
    both = bench_load.combine([{"requests_per_s": 1.0, "itl_p50_ms": 50.0, "backend": "A"},
                               {"requests_per_s": 3.0, "itl_p50_ms": 70.0, "backend": "A"},
                               {"requests_per_s": 2.0, "itl_p50_ms": 90.0, "backend": "A"}])
    assert both["requests_per_s"] == 2.0 and both["itl_p50_ms"] == 70.0
    assert both["rounds"] == 3 and both["requests_per_s_per_round"] == [1.0, 3.0, 2.0]
