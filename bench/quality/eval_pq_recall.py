"""Recall of PQ codebook variants at equal bytes: how much attention mass the tiles a PQ
ranking selects hold, against the oracle, StreamingLLM and the exact estimate.

    .venv/bin/python bench/quality/eval_pq_recall.py calibration 4    # text kind(s), subspaces

Codebooks are fitted on the calibration tokens of ``prescore-models calibrate`` (CPython
stdlib source) in four variants: D/m consecutive channels ("base"), whole rotary pairs per
subspace ("pair"), channels weighted by the calibration queries' RMS ("wt"), both
("pair+wt", what ``prescore_backend.pq`` fits). On ``ctx`` tokens of the text, for 32
queries per layer (every 4th of the last 128 positions) at keep 1/8 of the bytes (the codes'
m / 256 of a bf16 KV taken from the tile budget; sinks 2 and window 10 tiles forced), prints
the mean recall over the layers (and layer 0, 1, the deep half). "exactsum" ranks by the exact
q.k of the group's summed query: the limit of any estimator of that ranking.
"""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_core import Llama
from eval_selection import load_text
from prescore_backend.server.models import resolve_model, calibration_tokens
from prescore_backend.pq import kmeans
from prescore_backend.kernels.select import select_tiles

# k-means on D/m consecutive channels of already permuted/weighted keys: the variants that
# prescore_backend.pq.fit_codebook (pairs, query weights always) does not offer.
def fit_codebook(keys, m, iters=12, seed=0, centroids=256):
    hkv, n, dim = keys.shape
    d = dim // m
    x = keys.float().reshape(hkv, n, m, d).permute(0, 2, 1, 3).reshape(-1, n, d)
    return kmeans(x, centroids, iters=iters, seed=seed).view(hkv, m, centroids, d)
torch.set_num_threads(2)
mp = Path(resolve_model("smollm2-135m"))
model = Llama(mp)
S = model.spec
T = 16
Hkv, D = S.kv_heads, S.head_dim
g = S.heads // Hkv
cal = calibration_tokens(mp, 8192)
calk, calq = {}, {}
model.prefill(cal, on_kv=lambda i, k, v: calk.__setitem__(i, k.clone()),
              on_q=lambda i, q: calq.__setitem__(i, q.view(Hkv, g, -1, D).sum(1).clone()), logits="none")
m = int(sys.argv[2]) if len(sys.argv) > 2 else 4
pairperm = torch.cat([torch.cat([torch.arange(j * 32 // m, (j + 1) * 32 // m), torch.arange(j * 32 // m, (j + 1) * 32 // m) + 32]) for j in range(m)])
ident = torch.arange(D)
VARS = {"base": (ident, False), "pair": (pairperm, False), "wt": (ident, True), "pair+wt": (pairperm, True)}
books = {}
t0 = time.time()
for L in range(S.layers):
    k = calk[L]
    w = calq[L].pow(2).mean(1).sqrt()  # [Hkv, D]
    for name, (perm, wt) in VARS.items():
        ww = w[:, perm] if wt else torch.ones(Hkv, D)
        kk = k[:, :, perm] * ww.unsqueeze(1)
        books[(name, L)] = (perm, ww, fit_codebook(kk, m, iters=12))
print("fit", time.time() - t0, flush=True)

def run(kind, ctx=4096, nq=32, stride=4, ratio=0.125):
    toks, _ = load_text(mp, kind)
    start = (toks.numel() - ctx) // 2
    toks = toks[start:start + ctx]
    qs, ks = {}, {}
    model.prefill(toks, on_kv=lambda i, k, v: ks.__setitem__(i, k.clone()),
                  on_q=lambda i, q: qs.__setitem__(i, q.clone()), logits="none")
    qpos = torch.arange(ctx - 1 - stride * (nq - 1), ctx, stride)
    seq = qpos + 1
    M = ctx // T
    ntile = (seq + T - 1) // T
    res = {}
    for L in range(S.layers):
        k = ks[L]
        q = qs[L][:, qpos].transpose(0, 1).reshape(nq, Hkv, g, D)
        logits = torch.einsum("rhgd,hnd->rhgn", q, k) * model.scale
        mask = torch.arange(ctx) >= seq.view(-1, 1, 1, 1)
        logits = logits.masked_fill(mask, float("-inf"))
        p = torch.softmax(logits, -1)
        mass = p.view(nq, Hkv, g, M, T).sum((2, 4)) / g
        def rec(score, side=0.0, sink=2, win=10):
            b = torch.maximum(torch.ceil(ntile.double() * (ratio - side)).long(), torch.full_like(ntile, sink + win))
            sel = select_tiles(score.float().contiguous(), ntile, b, sink_tiles=sink, window_tiles=win)
            t = sel.tiles.long()
            hit = torch.zeros(nq, Hkv, M + 1)
            hit.scatter_(-1, torch.where(t >= 0, t, M), 1.0)
            return float((mass * hit[..., :M]).sum(-1).mean())
        def tilemax(est):  # [nq, Hkv, n]
            return est.masked_fill(mask[:, :, 0], float("-inf")).view(nq, Hkv, M, T).amax(-1)
        out = {"oracle": rec(mass, 0, 0, 0), "streaming": rec(torch.arange(M).float().expand(nq, Hkv, M))}
        qsum = q.sum(2)  # [nq, Hkv, D]
        ex = torch.einsum("rhd,hnd->rhn", qsum, k)
        out["exactsum"] = rec(tilemax(ex), side=m / 256)

        def tilelse(est):
            return (est * model.scale / g).masked_fill(mask[:, :, 0], float("-inf")).view(nq, Hkv, M, T).logsumexp(-1)

        for name in VARS:
            perm, ww, book = books[(name, L)]
            kk = k[:, :, perm] * ww.unsqueeze(1)
            d = D // m
            sub = kk.view(Hkv, ctx, m, d).permute(0, 2, 1, 3)
            codes = torch.cdist(sub, book).argmin(-1)  # [Hkv, m, n]
            qq = qsum[:, :, perm] / ww.unsqueeze(0)
            lut = torch.einsum("rhmd,hmcd->rhmc", qq.view(nq, Hkv, m, d), book)
            est = torch.zeros(nq, Hkv, ctx)
            for j in range(m):
                est += torch.gather(lut[:, :, j], -1, codes[:, j].unsqueeze(0).expand(nq, Hkv, ctx))
            out[name] = rec(tilemax(est), side=m / 256)

        res[L] = out
    return res

for kind in sys.argv[1].split(","):
    r = run(kind)
    print(f"== {kind}")
    for nm in r[0]:
        v = [r[L][nm] for L in range(S.layers)]
        print(f"{nm:10s} {sum(v)/len(v):.3f} L0 {v[0]:.3f} L1 {v[1]:.3f} deep {sum(v[15:])/15:.3f}", flush=True)
