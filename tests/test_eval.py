"""The quality evaluation (bench/eval_*.py): model parity, decode-faithful harness, smoke runs.

The full runs (`make results`) are not run here; a tiny configuration of each is.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "quality"))

import eval_core  # noqa: E402
import eval_quality  # noqa: E402
import eval_report  # noqa: E402
from prescore_backend.llama_ref import Llama  # noqa: E402

CTX = 512  # a multiple of the KV block (128)


@pytest.fixture(scope="module")
def model(model_path: str) -> Llama:
    torch.set_num_threads(1)
    return Llama(model_path)


@pytest.fixture(scope="module")
def tokens(model_path: str) -> torch.Tensor:
    return eval_core.text_tokens(model_path, "hamlet_gut")


def test_llama_matches_transformers(model: Llama, model_path: str, tokens: torch.Tensor) -> None:
    """The evaluation's forward equals transformers' LlamaForCausalLM on real text.

    Both run fp32; they differ only in operation order (fused q/k/v and gate/up matmuls, SDPA
    vs eager attention), i.e. by rounding: ~1e-4 on logits of magnitude ~30 after 30 layers.
    2e-3 absolute on log-probabilities is ~20x that and far below any effect measured.
    """
    from transformers import LlamaForCausalLM

    ids = tokens[1000:1064]
    hf = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                          attn_implementation="eager").eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids[None]).logits[0], -1)
    ours = torch.log_softmax(model.prefill(ids, logits="all"), -1)
    assert (ours - ref).abs().max().item() < 2e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_decode_steps_keep_all_and_equal_budgets(model: Llama, tokens: torch.Tensor) -> None:
    """Teacher-forced decode steps reproduce the exact prefill; every method at keep 1 (all
    tiles selected, through the sparse kernel) equals dense; at keep 1/2 every method reads
    the same number of tiles (the backend's budget).

    Tokens read are equal too, except that the oracle, which has no forced window, may swap the
    partial last tile for a full one (at most T - 1 more tokens per row, head and step).
    """
    n = 4
    seq = tokens[2000:2000 + CTX + n + 1]
    methods = ["dense", "prescore_leverage", "quest", "pq", "sparq4", "hyper_lsh", "streaming",
               "oracle", "random_tiles"]
    res = eval_core.run_context(model, seq, CTX, n, methods, [1.0, 0.5], log=lambda s: None)
    logits = model.prefill(seq[: CTX + n], logits="all")[CTX:]  # predicts tokens CTX+1 ..
    ref = -torch.log_softmax(logits.double(), -1).gather(1, seq[CTX + 1: CTX + n + 1, None])[:, 0]
    dense = torch.tensor(res.token_nll[("dense", 1.0)], dtype=torch.float64)
    assert (dense - ref).abs().max().item() < 1e-3
    for m in methods[1:]:
        got = torch.tensor(res.token_nll[(m, 1.0)], dtype=torch.float64)
        assert (got - dense).abs().max().item() < 1e-4, m
        assert res.read[(m, 1.0)] == res.total[(m, 1.0)], m  # keep 1 reads everything
    reads = {m: res.read[(m, 0.5)] for m in methods[1:]}
    assert len({v for m, v in reads.items() if m != "oracle"}) == 1, reads
    assert 0 <= reads["oracle"] - reads["streaming"] <= 15 * n * 30 * 3, reads
    assert reads["streaming"] < 0.6 * res.total[("streaming", 0.5)]


def test_smoke_quality_and_report(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    assert eval_quality.main(["--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert run["context"] == CTX and data["meta"]["new_tokens"] == 16
    rows = {(r["method"], r["ratio"]): r for r in run["rows"]}
    assert set(rows) == {("dense", 1.0), ("prescore_leverage", 0.25)}
    assert 0 < rows[("prescore_leverage", 0.25)]["read_fraction"] < 1
    assert all(len(r["token_nll"]) == 16 for r in rows.values())
    fid = run["fidelity"][0]
    assert len(fid["recall"]) == 30 and all(0 < x <= 1 for x in fid["recall"])
    assert eval_report.main(["--quality", str(out), "--kvpress", str(tmp_path / "none.json"),
                             "--tuning", str(tmp_path / "none.json"),
                             "--out-dir", str(tmp_path)]) == 0
    report = (tmp_path / "quality.md").read_text()
    assert eval_core.method("prescore_leverage").label in report and "1 thread" in report
    for png in ("quality_ppl.png", "quality_fidelity.png", "quality_fidelity_layers.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def _kvpress_python() -> Path:
    env = os.environ.get("KVPRESS_VENV")
    venv = Path(env) if env else eval_core.cache_dir() / "kvpress-venv"
    return venv / "bin" / "python"


@pytest.mark.skipif(not _kvpress_python().exists(),
                    reason="kvpress venv not made (bench/quality/kvpress_venv.sh; make results makes it)")
def test_smoke_kvpress(tmp_path: Path) -> None:
    spec = tmp_path / "quality.json"
    spec.write_text(json.dumps({"meta": {
        "model": "smollm2-135m", "text": "hamlet_gut", "contexts": [CTX], "ratios": [0.25],
        "new_tokens": 4, "eval_start": CTX}}))
    out = tmp_path / "kvpress.json"
    env = {**os.environ, "PRESCORE_CACHE": str(eval_core.cache_dir())}
    proc = subprocess.run([str(_kvpress_python()), str(REPO / "bench" / "quality" / "eval_kvpress.py"),
                           "--spec", str(spec), "--out", str(out),
                           "--presses", "kvpress_snapkv"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["check_max_abs_nll_diff"] < 1e-3
    rows = {r["method"]: r for r in run["rows"]}
    # Equal budget: the compressed prefix plus the decoded tokens average the keep ratio.
    assert rows["kvpress_snapkv"]["kept_tokens"] < CTX // 4
    assert abs(rows["kvpress_snapkv"]["read_fraction"] - 0.25) < 0.005


def test_harness_base_config_follows_prescore_env() -> None:
    """``PRESCORE_TILE_SIZE=32`` evaluates 32-token tiles (``make results-tile32``): the harness's
    base config and every prescore method follow the server's variables."""
    code = ("import eval_core as e; m = e.METHODS['prescore_leverage']; "
            "print(e.TILE, e.BASE.tile_size, m.cfg.tile_size)")
    env = dict(os.environ, PRESCORE_TILE_SIZE="32")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO / "bench" / "quality", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["32", "32", "32"]


def test_side_read_fraction_counts_each_estimator() -> None:
    """Bytes of side data per KV byte: Quest's bounds are 2 x D per 16-token tile (1/16),
    SparQ's r channels of 2 x D values per token (r / 128 at D = 64), pre-scores 4 bytes per
    tile; StreamingLLM and the oracle read none."""
    from prescore_backend.config import PrescoreConfig

    f = eval_core.side_read_fraction
    score = 4 / (2 * 16 * 64 * 2)
    assert f(PrescoreConfig(query_aware="quest", query_cap_ratio=1.0), 64) == pytest.approx(
        1 / 16)  # no pre-scored fill: no pre-scores read
    assert f(PrescoreConfig(query_aware="quest", query_cap_ratio=0.5), 64) == pytest.approx(
        1 / 16 + score)
    # default at keep 1/8: 16 channels x 4 bits per token + each block's 16 x 2 fp32 scales
    # per 128 tokens, no pre-scores (the ranking alone); at 1/16, 8 channels
    assert f(PrescoreConfig(), 64) == pytest.approx(9 / 256)
    assert f(PrescoreConfig(keep_ratio=1 / 16), 64) == pytest.approx(4.5 / 256)
    assert f(PrescoreConfig(query_channels=8, query_cap_ratio=0.5), 64) == pytest.approx(
        4.5 / 256 + score)  # the previous default
    # the harness's methods charge the channels of the row's own keep ratio
    m = eval_core.method("sparq4")
    assert m.side_read_fraction(64, 0.125) == pytest.approx(9 / 256)
    assert m.side_read_fraction(64, 0.0625) == pytest.approx(4.5 / 256)
    assert f(PrescoreConfig(query_aware="pq", query_cap_ratio=0.5), 64) == pytest.approx(
        4 / 256 + score)  # 4 codes
    assert f(PrescoreConfig(query_aware="sparq", query_channels=4, query_cap_ratio=0.5),
             64) == pytest.approx(4 / 128 + score)
    assert f(PrescoreConfig(query_aware="sparq", query_cap_ratio=1.0, query_channels=16),
             64) == pytest.approx(16 / 128)
    assert f(PrescoreConfig(query_aware="none"), 64) == pytest.approx(score)
    assert f(PrescoreConfig(query_aware="none", query_cap_ratio=0.5), 64) == pytest.approx(score)
    assert eval_core.method("streaming").side_read_fraction(64) == 0.0


def test_equal_bytes_funds_side_data_from_the_tile_budget(model: Llama,
                                                          tokens: torch.Tensor) -> None:
    """With equal_bytes, a method's tile budget is the ratio less its side data, and what it
    reads (tiles + side data, in KV-token units) stays near the ratio: Quest (1/16 of side data)
    reads fewer tiles than StreamingLLM at the same budget but about as many bytes."""
    n, ctx = 2, 2048
    seq = tokens[4000:4000 + ctx + n + 1]
    ms = ["dense", "streaming", "quest", "sparq@query_channels=4"]
    res = eval_core.run_context(model, seq, ctx, n, ms, [0.25], equal_bytes=True,
                                log=lambda s: None)
    frac = {m: res.read[(m, 0.25)] / res.total[(m, 0.25)] for m in ms[1:]}
    assert all(0.2 < v < 0.3 for v in frac.values()), frac
    plain = eval_core.run_context(model, seq, ctx, n, ms, [0.25], log=lambda s: None)
    tiles_quest = res.read[("quest", 0.25)] - res.total[("quest", 0.25)] / 16
    assert tiles_quest < 0.8 * plain.read[("quest", 0.25)]


def test_default_with_no_room_to_rank_is_streamingllm(model: Llama,
                                                       tokens: torch.Tensor) -> None:
    """2k tokens (128 tiles) at keep 1/8 and 1/16: the default's side data leaves no tile
    beyond sinks + window (12) for the ranking, so it reads none and spends the bytes as
    StreamingLLM does: the same tiles, the same losses, the same bytes (at 1/8 the window gets
    the ranking's share: 16 tiles, not 12). At keep 1/4 it ranks again."""
    n, ctx = 2, 2048
    seq = tokens[6000:6000 + ctx + n + 1]
    ms = ["streaming", "prescore_leverage"]
    assert eval_core.method("prescore_leverage").cfg.streams_without_room  # the default
    res = eval_core.run_context(model, seq, ctx, n, ms, [0.25, 0.125, 0.0625], equal_bytes=True,
                                log=lambda s: None)
    for r in (0.125, 0.0625):
        assert res.token_nll[("prescore_leverage", r)] == res.token_nll[("streaming", r)], r
        assert res.read[("prescore_leverage", r)] == res.read[("streaming", r)], r
    assert res.read[("streaming", 0.125)] > res.read[("streaming", 0.0625)]
    assert res.token_nll[("prescore_leverage", 0.25)] != res.token_nll[("streaming", 0.25)]


def test_selection_eval_smoke_has_paired_intervals(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quality" / "eval_selection.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    cell = data["summary"]["pooled|prescore_leverage|0.25"]
    assert cell["tokens"] == 64 and len(cell["vs_dense_pct"]) == 3
    lo, hi = cell["vs_streaming_pct"][1:]
    assert lo <= cell["vs_streaming_pct"][0] <= hi
    assert "| StreamingLLM" in out.with_suffix(".md").read_text()
    import eval_selection

    mean, lo, hi = eval_selection.block_bootstrap(torch.full((64,), 0.1))
    assert mean == pytest.approx(100 * (2.718281828 ** 0.1 - 1), rel=1e-6) and lo == hi == mean
    # --merge: a run merged with itself is the run (paired intervals recomputed alike); a run
    # whose tokens differ is refused
    merged = tmp_path / "m.json"
    assert eval_selection.main(["--merge", f"{out},{out}", "--out", str(merged)]) == 0
    m = json.loads(merged.read_text())
    assert m["summary"].keys() == data["summary"].keys()
    for key, c in data["summary"].items():
        assert m["summary"][key]["ppl"] == pytest.approx(c["ppl"])
        assert m["summary"][key]["read_fraction"] == pytest.approx(c["read_fraction"])
    other = json.loads(out.read_text())
    key = next(k for k in other["token_nll"] if "|dense|" in k)
    other["token_nll"][key][0] += 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differs"):
        eval_selection.main(["--merge", f"{out},{bad}", "--out", str(tmp_path / "x.json")])
    # --plot draws a run's pooled rows
    png = tmp_path / "s.png"
    assert eval_selection.main(["--plot", str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selection_targets_are_judged_per_text() -> None:
    """The report's targets table: within +3% of dense at 1/8 and ahead of StreamingLLM with an
    interval below zero count as met, per evaluation text; the calibration text is left out."""
    import eval_selection

    def cell(d, s):
        return {"vs_dense_pct": d, "vs_streaming_pct": s}

    summary = {"play|prescore_leverage|0.125": cell((2.9, 1.0, 5.0), (-4.0, -6.0, -1.0)),
               "code|prescore_leverage|0.125": cell((3.1, 1.0, 5.0), (-4.0, -6.0, 0.5)),
               "calibration|prescore_leverage|0.125": cell((50.0, 1, 99), (9.0, 1, 20))}
    rows = eval_selection.targets(summary, ["play", "code", "calibration"], [0.125])
    assert rows[2] == "| play | 1/8 | +2.9 (<= +3) | yes | -4.0 [-6.0, -1.0] | yes |"
    assert rows[3] == "| code | 1/8 | +3.1 (<= +3) | **no** | -4.0 [-6.0, +0.5] | **no** |"
    assert len(rows) == 4  # header, rule, play, code
    assert eval_selection.targets(summary, ["prose"], [0.125]) == []  # no such cells


def test_stale_probe_reuses_the_scan_of_an_earlier_step(model: Llama,
                                                        tokens: torch.Tensor) -> None:
    """``probe_stale<N>_maxlogit`` (docs/results/selection-probes.md): rescanned every step it
    is the exact max-logit ranking; rescanned every N it picks at the scan step what the exact
    ranking picks and is charged half the KV once per N steps."""
    eval_core.register(eval_core.EstimatorProbe("probe_stale1_maxlogit", "stale1",
                                                scorer="random", estimator="stale1_maxlogit"))
    assert eval_core.method("probe_stale16_maxlogit").side_read_fraction(64) == 0.5 / 16
    steps, ctx = 3, 2048  # 128 tiles: 32 at 1/4, 20 of them picked beyond sinks + window
    seq = tokens[5000:5000 + ctx + steps + 1]
    ms = ["probe_exact_maxlogit", "probe_stale1_maxlogit", "probe_stale64_maxlogit"]
    res = eval_core.run_context(model, seq, ctx, steps, ms, [0.25], log=lambda s: None)
    exact = res.token_nll[("probe_exact_maxlogit", 0.25)]
    assert res.token_nll[("probe_stale1_maxlogit", 0.25)] == exact
    stale = res.token_nll[("probe_stale64_maxlogit", 0.25)]
    assert stale[:1] == exact[:1] and stale != exact  # later steps reuse the first scan


def test_tier_and_mean_value_probes(model: Llama, tokens: torch.Tensor) -> None:
    """``comp_xx`` (a probe of docs/results/selection-probes.md) merges the unselected keys'
    exact weighted values into the selection's softmax: dense attention again (a check of the
    merge the other ``comp_`` modes use). ``tier<b>v<b>s<pct>`` is the backend's two tiers
    (``low_tier_bits``, prescore_backend/tiers.py): at 8 bits with every free byte in the low
    tier and a budget whose bytes buy every tile, nearly exact values (dense to a small
    tolerance); at 3 bits with 75% of the free bytes in the low tier it reads the budget's
    bytes (side data and the low tier's cost included), and picks differently from the
    one-tier ranking."""
    steps, ctx = 2, 2048  # 128 tiles: 32 at 1/4, 20 beyond sinks + window
    seq = tokens[7000:7000 + ctx + steps + 1]
    ms = ["dense", "sparq4", "comp_xx:sparq4", "tier8v8s100"]
    res = eval_core.run_context(model, seq, ctx, steps, ms, [0.25, 0.6], log=lambda s: None)
    dense = torch.tensor(res.token_nll[("dense", 1.0)])
    for m, r, tol in (("comp_xx:sparq4", 0.25, 1e-4), ("tier8v8s100", 0.6, 2e-2)):
        got = torch.tensor(res.token_nll[(m, r)])
        assert torch.allclose(got, dense, atol=tol), (m, got, dense)
    assert res.read[("tier8v8s100", 0.6)] <= 0.6 * res.total[("tier8v8s100", 0.6)]
    assert res.token_nll[("sparq4", 0.25)] != res.token_nll[("dense", 1.0)]
    # prescore_leverage's side data comes first: the tiers' side data ("random") is a range
    # of blocks apart from the KV cache's, read through its own block table
    res = eval_core.run_context(model, seq, ctx, steps, ["prescore_leverage", "sparq4",
                                                         "tier3v3s75"], [0.25],
                                equal_bytes=True, log=lambda s: None)
    assert all(math.isfinite(x) for x in res.token_nll[("tier3v3s75", 0.25)])
    frac = res.read[("tier3v3s75", 0.25)] / res.total[("tier3v3s75", 0.25)]
    assert 0.23 <= frac <= 0.25, frac
    assert res.token_nll[("tier3v3s75", 0.25)] != res.token_nll[("sparq4", 0.25)]
    for bad in ("tier3v3", "tier3v4s50"):
        with pytest.raises(KeyError, match="tier"):
            eval_core.method(bad)


def test_repetition_scores_find_loops_and_agreement() -> None:
    """The greedy-repetition report (bench/quality/eval_repetition.py): a looping generation
    scores repeated 4-grams and a loop, a varied one none; agreement counts the tokens before
    the first difference from dense; the paired difference against dense is per generation."""
    import eval_repetition as er

    varied = list(range(16))
    loop = [1, 2, 3, 4] + [7, 8] * 6
    s = er.scores(loop, varied)
    assert s["loop"] and s["repeated_4grams"] == pytest.approx(7 / 13) and s["agree"] == 0
    v = er.scores(varied, varied)
    assert not v["loop"] and v["repeated_4grams"] == 0 and v["distinct"] == 1 and v["agree"] == 16
    summ = er.summarize({"dense|1": [varied, varied], "streaming|0.125": [loop, varied]})
    assert summ["streaming|0.125"]["loops"] == 1 and summ["dense|1"]["loops"] == 0
    mean, lo, hi = summ["streaming|0.125"]["repeated_4grams_vs_dense"]
    assert mean == pytest.approx(7 / 26) and lo <= mean <= hi
    assert "| 1 of 2 |" in er.markdown(summ, {"date": "d", "model": "m", "context": 1,
                                              "windows": 1, "texts": ["t"], "new_tokens": 16,
                                              "machine": {"cpu": "c"}, "command": "x",
                                              "git_commit": "g"})


def test_greedy_rows_generate_their_own_tokens(model: Llama, tokens: torch.Tensor) -> None:
    """run_context(greedy=True): the dense row's tokens are the exact model's greedy ones (one
    full prefill per step as reference), each row feeds back its own argmax, and the NLLs are
    of the generated tokens."""
    n = 4
    seq = tokens[6000:6000 + CTX + n + 1]
    res = eval_core.run_context(model, seq, CTX, n, ["dense", "streaming"], [0.25],
                                greedy=True, log=lambda s: None)
    ids = seq[: CTX + 1].clone()
    want = []
    for _ in range(n):
        nxt = int(model.prefill(ids, logits="all")[-1].argmax())
        want.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    assert res.generated[("dense", 1.0)] == want
    assert len(res.generated[("streaming", 0.25)]) == n
    assert all(x >= 0 for x in res.token_nll[("dense", 1.0)])


def test_long_context_tasks_are_deterministic_and_planted(model_path: str) -> None:
    """bench/serving/longctx_tasks.py: a context of about the asked length, every needle in it
    once, nine questions whose answers are the needles' values; the same seed gives the same
    context, another index another one; replies are scored by containment."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import longctx_tasks

    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    a, b = (longctx_tasks.make_context(tok, 3000, 0, seed=1) for _ in range(2))
    c = longctx_tasks.make_context(tok, 3000, 1, seed=1)
    assert a.text == b.text and a.text != c.text
    assert 2900 <= len(tok.encode(a.text).ids) <= 3100
    assert [q.task for q in a.questions].count("niah_number") == 4 and len(a.questions) == 9
    assert {q.task for q in a.questions} == set(longctx_tasks.TASKS)
    for q in a.questions:
        assert a.text.count(q.answers[0]) == (2 if q.task == "passkey" else 1), q
        assert q.correct(f"It is {q.answers[0]}.") and not q.correct("I do not know.")
    assert len({q.prompt for q in a.questions}) == 9  # every question names its own subject
    msgs = longctx_tasks.chat_messages(a, a.questions[0])
    assert msgs[0]["content"].startswith(a.text) and msgs[0]["content"].endswith(
        a.questions[0].prompt)


def test_code_task_plants_each_function_once_far_from_its_call(model_path: str) -> None:
    """The long-file code task: a Python file of about the asked length (the standard
    library's source), nine functions of unique names planted once each at top-level
    boundaries, each question a call to complete, answered by the parameter names of that
    function's definition (all of them needed); deterministic per seed."""
    from tokenizers import Tokenizer

    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import longctx_tasks

    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    a, b = (longctx_tasks.make_code_context(tok, 6000, 0, seed=1) for _ in range(2))
    assert a.text == b.text != longctx_tasks.make_code_context(tok, 6000, 1, seed=1).text
    assert 5800 <= len(tok.encode(a.text).ids) <= 6200
    assert len(a.questions) == 9 and {q.task for q in a.questions} == {"code_call"}
    for q in a.questions:
        name = q.prompt.rsplit("result = ", 1)[1].rstrip("(")
        head = f"def {name}({', '.join(q.answers)}):"
        assert a.text.count(f"def {name}(") == 1 and head in a.text
        assert a.text.index(head) == 0 or a.text[a.text.index(head) - 1] == "\n"
        assert q.correct(f"{name}({'=1, '.join(q.answers)}=1)")
        assert not q.correct(f"{name}({q.answers[0]}=1)")


def test_common_word_task_counts_and_choices(model_path: str) -> None:
    """Common-word extraction: a numbered word list of about the asked length in which each
    question's answer occurs ``common_freq`` times and each of its four other options
    ``rare_freq`` times; a reply naming the answer alone is correct, one naming another
    option too (or instead) is not; deterministic per seed."""
    import re
    from collections import Counter

    from tokenizers import Tokenizer

    sys.path.insert(0, str(REPO / "bench" / "serving"))
    import longctx_tasks

    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    a, b = (longctx_tasks.make_words_context(tok, 6000, 0, seed=1) for _ in range(2))
    assert a.text == b.text != longctx_tasks.make_words_context(tok, 6000, 1, seed=1).text
    assert 5700 <= len(tok.encode(a.text).ids) <= 6000
    lines = a.text.split("\n")[1:]
    assert [int(x.split(". ")[0]) for x in lines] == list(range(1, len(lines) + 1))
    counts = Counter(x.split(". ", 1)[1] for x in lines)
    assert set(counts.values()) == {30, 3}
    assert len(a.questions) == 9 and {q.task for q in a.questions} == {"common_word"}
    assert len({q.answers[0] for q in a.questions}) == 9
    for q in a.questions:
        opts = re.search(r": (.*)\? Answer", q.prompt).group(1).split(", ")
        assert sorted(opts) == sorted(q.answers + q.wrong) and len(opts) == 5
        assert counts[q.answers[0]] == 30 and all(counts[w] == 3 for w in q.wrong)
        assert q.correct(q.answers[0].capitalize() + ".")
        assert not q.correct(f"{q.answers[0]}, {q.wrong[0]}")
        assert not q.correct(q.wrong[1])
