"""How the 4-bit key copy's design choices rank tiles: recall of the exact top tiles.

    .venv/bin/python bench/quality/eval_keycopy_recall.py                 # calibration text
    .venv/bin/python bench/quality/eval_keycopy_recall.py --text play --out /tmp/r.json

For 64 consecutive queries after ``--context`` tokens of a text (Macbeth, the calibration
text, by default), every ``--layer-step``-th layer: the tiles beyond sinks (2) and window (10)
ranked by the exact max over the tile and the GQA group's heads of q.k (the ranking the probes
in docs/results/selection-probes.md found within 1 point of the oracle), and the share of its
top tiles (the keep-1/8 budget) that each estimate's ranking also picks. Estimates: q.k on the
query group's r largest-|q| channels, with exact keys or a quantized copy (``b4``: 4 bits),
channels chosen one by one or as rotary pairs (i, i + D/2), quantized per (128-token block,
channel) with the block's min and step (``block``, what ``prescore_backend.keycopy`` does) or
per channel with the context's absmax (``context``, one symmetric scale).

Further estimates (``--more``; docs/results/selection-probes.md), with key statistics from the
calibration text's first 4096 tokens (disjoint from the default window at 10000):

* ``loki``: Loki's estimate, q.k on the r leading principal components of the keys (per layer
  and KV head), the rotated keys at 4 bits per block;
* ``|q|*sd``: SparQ's channels chosen by |q| times the channel's key standard deviation;
* ``+ centroid``: SparQ's r channels plus, for the other channels, q against the tile's mean
  key (D - r more values per 16-token tile, 8 bits each with one scale per tile);
* ``b-bit``: SparQ with r channels at b bits per block (min and step) for the same bytes per
  token as r=8 at 4 bits (and twice that): more channels at fewer bits;
* ``rotated``: SparQ in a calibrated basis, q.k = (q A_q).(k A_k): the queries' principal
  axes (``qpca``, A_q = A_k = their eigenvectors) or the basis that whitens the queries and
  diagonalizes the keys' covariance seen by them (``cross``: A_q = S_q^-1/2 V,
  A_k = S_q^1/2 V, V the eigenvectors of S_q^1/2 S_k S_q^1/2; channels by |q'| times the
  rotated keys' spread), keys rotated then quantized at 4 bits per block.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_core import Llama  # noqa: E402
from eval_quality import machine  # noqa: E402
from eval_selection import load_text  # noqa: E402
from prescore_backend.keycopy import pack_blocks, unpack_blocks  # noqa: E402
from prescore_backend.server.models import resolve_model  # noqa: E402

T, B, SINK, WINDOW = 16, 128, 2, 10


def quant_context(k: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """One symmetric scale per (head, channel) over the context: k ``[Hkv, n, D]``."""
    top = 2 ** (bits - 1) - 1
    s = (k.abs().amax(1, keepdim=True) / top).clamp_min(1e-8)
    return (k / s).round().clamp(-top - 1, top) * s


def quant_block(k: torch.Tensor) -> torch.Tensor:
    """prescore's copy: per (128-token block, head, channel) min and step, 16 levels."""
    h, n, d = k.shape
    blocks = k.view(h, n // B, B, d).transpose(0, 1)  # [nblk, Hkv, B, D]
    return unpack_blocks(*pack_blocks(blocks)).transpose(0, 1).reshape(h, n, d)


def recall(q: torch.Tensor, k: torch.Tensor, est_keys: torch.Tensor, r: int, pairs: bool,
           g: int) -> float:
    """q ``[Hq, nq, D]``, k / est_keys ``[Hkv, n, D]``: the share of the exact top tiles
    (max over tile and group) that the r-channel estimate also ranks in its top."""
    hkv, n, d = k.shape
    qg = q.view(hkv, g, -1, d)
    mag = qg.abs().sum(1)  # [Hkv, nq, D]
    if pairs:
        top = (mag[..., : d // 2] + mag[..., d // 2:]).topk(r // 2, -1).indices
        ch = torch.cat([top, top + d // 2], -1)
    else:
        ch = mag.topk(r, -1).indices
    mask = torch.zeros_like(mag).scatter_(-1, ch, 1.0).unsqueeze(1)
    return recall_est(q, k, torch.einsum("hgqd,hnd->hgqn", qg * mask, est_keys), g)


def recall_est(q: torch.Tensor, k: torch.Tensor, est: torch.Tensor, g: int) -> float:
    """As :func:`recall` for any estimate ``est`` ``[Hkv, G, nq, n]`` of the logits."""
    hkv, n, d = k.shape
    mt = n // T
    budget = mt // 8 - SINK - WINDOW
    exact = torch.einsum("hgqd,hnd->hgqn", q.view(hkv, g, -1, d), k).amax(1).view(hkv, -1, mt, T).amax(-1)
    e = est.amax(1).view(hkv, -1, mt, T).amax(-1)
    exact, e = exact[..., SINK:mt - WINDOW], e[..., SINK:mt - WINDOW]
    truth = exact.topk(budget, -1).indices
    picked = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, e.topk(budget, -1).indices, True)
    return float(picked.gather(-1, truth).float().mean())


def quant_bits(k: torch.Tensor, bits: int) -> torch.Tensor:
    """Per (128-token block, head, channel) min and step with 2^bits levels: k ``[Hkv, n, D]``."""
    h, n, d = k.shape
    b = k.view(h, n // B, B, d)
    lo, hi = b.amin(2, keepdim=True), b.amax(2, keepdim=True)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    return (((b - lo) / step).round() * step + lo).view(h, n, d)


def sparq_est(qg: torch.Tensor, keys: torch.Tensor, r: int,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """q.k on the group's r largest |q| channels (times ``weight`` [Hkv, D] if given):
    qg ``[Hkv, G, nq, D]``, keys ``[Hkv, n, D]`` -> ``[Hkv, G, nq, n]``."""
    w = qg.abs().sum(1) if weight is None else qg.abs().sum(1) * weight.unsqueeze(1)
    mask = torch.zeros_like(w).scatter_(-1, w.topk(r, -1).indices, 1.0).unsqueeze(1)
    return torch.einsum("hgqd,hnd->hgqn", qg * mask, keys)


def trade_and_rotation_rows(q: torch.Tensor, k: torch.Tensor, calib_k: torch.Tensor,
                            calib_q: torch.Tensor, g: int) -> dict:
    """The ``b-bit`` and ``rotated`` estimates of one layer: name -> (bytes, estimate)."""
    hkv, n, d = k.shape
    qg = q.view(hkv, g, -1, d)
    out = {f"sparq r={r} ({bits}-bit)": (r * bits / 8, sparq_est(qg, quant_bits(k, bits), r))
           for r, bits in ((16, 2), (32, 1), (12, 3), (32, 2), (64, 1))}
    cq = calib_q.reshape(hkv, -1, d)  # the group's heads pooled
    mu = calib_k.mean(1, keepdim=True)
    s_k = torch.einsum("hnd,hne->hde", calib_k - mu, calib_k - mu) / calib_k.shape[1]
    s_q = torch.einsum("hnd,hne->hde", cq, cq) / cq.shape[1]
    e, u = torch.linalg.eigh(s_q)
    e = e.clamp_min(e.amax(-1, keepdim=True) * 1e-6)
    half = u @ torch.diag_embed(e.sqrt()) @ u.transpose(-1, -2)
    v = torch.linalg.eigh(half @ s_k @ half)[1]
    inv_half = u @ torch.diag_embed(e.rsqrt()) @ u.transpose(-1, -2)
    for name, a_q, a_k, spread in (("qpca", u, u, False), ("cross", inv_half @ v, half @ v, True)):
        qr = torch.einsum("hgqd,hde->hgqe", qg, a_q)
        kr = torch.einsum("hnd,hde->hne", k, a_k)
        sd = torch.einsum("hnd,hde->hne", calib_k, a_k).std(1) if spread else None
        for r in (8, 16):
            out[f"sparq r={r} (4-bit) rotated: {name}"] = (r / 2, sparq_est(qr, quant_block(kr), r, sd))
    return out


def more_rows(q: torch.Tensor, k: torch.Tensor, calib_k: torch.Tensor, g: int) -> dict:
    """The ``--more`` estimates of one layer: name -> (bytes per token and KV head, recall)."""
    hkv, n, d = k.shape
    qg = q.view(hkv, g, -1, d)
    mu = calib_k.mean(1, keepdim=True)
    cov = torch.einsum("hnd,hne->hde", calib_k - mu, calib_k - mu) / calib_k.shape[1]
    basis = torch.linalg.eigh(cov)[1].flip(-1)  # [Hkv, D, D], leading components first
    sd = calib_k.std(1)  # [Hkv, D]
    kb = quant_block(k)
    cent = k.view(hkv, n // T, T, d).mean(2)  # [Hkv, tiles, D], then 8 bits per value
    sc = cent.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    cent = (cent / sc).round() * sc
    out = {}
    for r in (8, 16):
        kp = quant_block(torch.einsum("hnd,hde->hne", k, basis[..., :r].contiguous()))
        qp = torch.einsum("hgqd,hde->hgqe", qg, basis[..., :r])
        out[f"loki r={r} (4-bit)"] = (r / 2, torch.einsum("hgqe,hne->hgqn", qp, kp))
        for name, w in (("", qg.abs().sum(1)), (" |q|*sd", qg.abs().sum(1) * sd.unsqueeze(1))):
            mask = torch.zeros_like(w).scatter_(-1, w.topk(r, -1).indices, 1.0).unsqueeze(1)
            est = torch.einsum("hgqd,hnd->hgqn", qg * mask, kb)
            out[f"sparq{name} r={r} (4-bit)"] = (r / 2, est)
            if not name:
                rest = torch.einsum("hgqd,hmd->hgqm", qg * (1 - mask), cent)
                out[f"sparq r={r} (4-bit) + centroid (8-bit)"] = (
                    r / 2 + (d - r) / T, est + rest.repeat_interleave(T, -1))
    return {name: (b, recall_est(q, k, est, g)) for name, (b, est) in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default="calibration")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--start", type=int, default=10000, help="first token of the window")
    p.add_argument("--layer-step", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--more", action="store_true",
                   help="also Loki's principal components, |q|*sd channels, tile centroids")
    p.add_argument("--out", default=None, help="JSON with the table")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    mp = Path(resolve_model("smollm2-135m"))
    model = Llama(mp)
    toks, source = load_text(mp, a.text)
    ids = toks[a.start:a.start + a.context + 64]
    keys, queries = {}, {}
    model.prefill(ids, on_kv=lambda i, k, v: keys.__setitem__(i, k.float()),
                  on_q=lambda i, q: queries.__setitem__(i, q[:, a.context:].float()),
                  logits="none")
    g = model.spec.heads // model.spec.kv_heads
    variants = {  # name -> (channels, rotary pairs, key copy)
        "exact r=8": (8, False, "exact"), "exact r=8 rotary pairs": (8, True, "exact"),
        "4-bit per block r=8 (prescore)": (8, False, "block"),
        "4-bit per block r=8 rotary pairs": (8, True, "block"),
        "4-bit per context r=8": (8, False, "context"),
        "exact r=16": (16, False, "exact"), "4-bit per block r=16": (16, False, "block"),
        "exact r=4": (4, False, "exact"),
    }
    layers = list(range(0, model.spec.layers, a.layer_step))
    rows = {}
    for name, (r, pairs, kind) in variants.items():
        per = []
        for L in layers:
            k = keys[L][:, : a.context]
            kk = {"exact": k, "block": quant_block(k), "context": quant_context(k)}[kind]
            per.append(recall(queries[L], k, kk, r, pairs, g))
        rows[name] = {"bytes_per_token": r * (4 if kind != "exact" else 16) / 8,
                      "mean": sum(per) / len(per), "per_layer": per}
    if a.more:
        calib, calib_q = {}, {}
        ctoks, _ = load_text(mp, "calibration")
        model.prefill(ctoks[:4096], on_kv=lambda i, k, v: calib.__setitem__(i, k.float()),
                      on_q=lambda i, q: calib_q.__setitem__(i, q[:, ::4].float()),
                      logits="none")
        for L in layers:
            k = keys[L][:, : a.context]
            more = more_rows(queries[L], k, calib[L], g)
            more.update({name: (b, recall_est(queries[L], k, est, g)) for name, (b, est)
                         in trade_and_rotation_rows(queries[L], k, calib[L], calib_q[L],
                                                    g).items()})
            for name, (b, rec) in more.items():
                row = rows.setdefault(name, {"bytes_per_token": b, "per_layer": []})
                row["per_layer"].append(rec)
        for name, row in rows.items():
            row["mean"] = sum(row["per_layer"]) / len(row["per_layer"])
    print(f"{a.text} ({source}), context {a.context}, 64 queries, layers {layers}; "
          f"host {machine()['cpu']}")
    print(f"{'estimate':40s} {'bytes/token':>11s} {'recall':>7s}")
    for name, row in rows.items():
        print(f"{name:40s} {row['bytes_per_token']:>11.1f} {row['mean']:>7.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"text": a.text, "source": source,
                                           "context": a.context, "layers": layers,
                                           "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
