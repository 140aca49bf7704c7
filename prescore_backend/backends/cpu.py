"""PRESCORE on vLLM's CPU backend: metadata -> builder -> backend -> impl.

Data path of one engine step (see docs/architecture.md):

* Prefill/extend rows and short decode rows run on vLLM's exact CPU kernel (CPU_ATTN); the
  KV write is vLLM's too (``do_kv_cache_update`` is inherited).
* The builder plans once per step (:class:`PrescorePlan`): which decode rows are sparse (context
  >= ``min_seq_len`` and budget < context), their budgets, the dense subset's scheduler
  metadata, the decode tokens whose LSH bucket must be recorded, and the scoring jobs.
* ``forward`` (once per layer) updates the side data of the keys just written, then serves the
  dense subset with vLLM's kernel and the sparse rows with
  :func:`prescore_backend.kernels.sparse_decode.sparse_decode`.

Side data (:class:`SideData`), per layer, preallocated beside the KV cache for every physical
block: a score per (block, KV head, tile), plus what the query-aware part needs (the tile's
key min/max for Quest, a bitmask of its keys' LSH buckets for HyperAttention).
Rules that keep it valid through vLLM's request lifecycle:

* A KV block's tiles are scored once, when the block becomes full, with all keys of the
  sequence up to the block's end (pre-scoring is global: the fit sees the whole prefix; see
  ``Scorer.score_prefixes``). A full block's side data is therefore a function of its prefix
  alone, however the prompt was chunked or batched: blocks shared through prefix caching are
  never rewritten and hold what the request that computed them wrote, and a preempted
  request recomputes the same side data. Departure from "rescore everything after every
  chunk": that would rewrite shared blocks and make outputs depend on scheduling.
* Tiles of the sequence's last, incomplete block are unscored (score -inf) - a prefill chunk
  or a decode token starting a tile resets them - and always attended, because the window
  is at least one block plus one tile (checked at start). So no tile is silently never
  selectable. The query-aware data (per-tile key min/max for Quest, LSH bucket bits) is
  recorded for every token as it is written, so decode tiles are matchable at once.
* A reused physical block is rewritten by whatever writes it next; nothing is kept per
  request, so nothing grows with finished requests.

Unsupported (fail loudly at start): sliding window, ALiBi, logits soft-cap, attention sinks,
quantized (fp8) KV cache, head sizes whose CPU layout is not "vec". Encoder and cross attention
layers fall back to exact CPU attention. MLA models are refused at backend selection.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from prescore_backend.config import PrescoreConfig
from prescore_backend.kernels.cpu_sparse_decode import available as cpu_kernel_available
from prescore_backend.kernels.layouts import vllm_cpu_kv_views
from prescore_backend.kernels.lsh import AngularLSH, bucket_masks, masks_intersect, num_words
from prescore_backend.kernels.sparse_decode import sparse_decode
from prescore_backend.metrics import CONTEXT, DENSE_ROWS, READ, SPARSE_ROWS, SRC0, PrescoreStats, get_metrics
from prescore_backend.requests import ROWS
from prescore_backend.scoring import Scorer, get_scorer
from prescore_backend.selection import aggregate_tiles, residual_sample, select_tiles

# A child of vLLM's logger, so lines show with vLLM's format and level.
logger = logging.getLogger("vllm.prescore")

# vLLM's CPU kernels store K per (block, KV head) in an ISA-specific order ("amx" packs bf16
# pairs VNNI-style). We pin the "vec" ISA, whose K tile is K^T ([D, block_size]) and V tile
# [block_size, D], and read it through strided views. Cost: no AMX for bf16 prefill.
_PINNED_ISA = "vec"


@dataclass
class _Runtime:
    """Per-process objects built once from the config."""

    config: PrescoreConfig
    scorer: Scorer
    lsh: AngularLSH | None
    stats: PrescoreStats
    generator: torch.Generator
    logged_side: bool = False
    num_layers: int = 0  # attention layers run per step (set by the builder)
    layers_done: int = 0  # layers run so far in this step


@functools.lru_cache(maxsize=1)
def runtime() -> _Runtime:
    cfg = PrescoreConfig.from_env()
    logger.info("prescore settings: %s", cfg.to_dict())
    try:
        get_metrics().config_info.labels(method=cfg.method, keep_ratio=str(cfg.keep_ratio),
                                         tile_size=str(cfg.tile_size),
                                         query_aware=cfg.query_aware).set(1)
    except Exception:  # metrics must never stop serving
        logger.exception("prescore: could not publish prescore_config_info")
    gen = torch.Generator().manual_seed(cfg.seed)
    return _Runtime(config=cfg, scorer=get_scorer(cfg.method, seed=cfg.seed), lsh=None,
                    stats=PrescoreStats(), generator=gen)


@functools.lru_cache(maxsize=None)
def _scorer(method: str) -> Scorer:
    """A request's own scorer (prescore_method control), built once per process."""
    return get_scorer(method, seed=runtime().config.seed)


def _lsh(head_dim: int) -> AngularLSH:
    rt = runtime()
    if rt.lsh is None:
        rt.lsh = AngularLSH(rt.config.lsh_bits, head_dim, seed=rt.config.seed)
    return rt.lsh


# ----------------------------------------------------------------------------- metadata


@dataclass
class ScoreJob:
    """Side-data work for one row's tokens written this step (prefill chunk or decode)."""

    block_ids: Tensor  # [ceil(seq_len / B)] int64 physical blocks of the row, in order
    seq_len: int
    first_pos: int  # first position written this step
    per_token: bool  # record per-token side data of [first_pos, seq_len) (prefill chunks)
    blocks_done: tuple[int, int]  # logical blocks [b0, b1) that became full: score them
    method: str | None = None  # the request's prescore_method control, if any


@dataclass
class PrescorePlan:
    """What every layer does this step; built once per step by the builder."""

    # Sparse decode rows.
    sparse_tok: Tensor  # [Rs] int64 token index of each sparse row in the batch
    sparse_seq_lens: Tensor  # [Rs] int32
    sparse_block_table: Tensor  # [Rs, max_blocks] int32
    num_tiles: Tensor  # [Rs] int64
    budget: Tensor  # [Rs] int64 tiles per (row, KV head)
    query_cap: int  # query-aware tiles per (row, KV head) at most
    # Exact rows served by vLLM's kernel when sparse rows exist (None: all rows are sparse).
    dense_tok: Tensor | None  # [Nd] int64
    dense_md: CPUAttentionMetadata | None
    num_dense_decode_rows: int
    # LSH bits of decode tokens written this step.
    dec_tok: Tensor  # [Nk] int64 token index
    dec_block: Tensor  # [Nk] int64 physical block
    dec_tile: Tensor  # [Nk] int64 tile within the block
    dec_reset: Tensor  # [Nk] bool: the token starts its tile
    score_jobs: list[ScoreJob]

    @property
    def num_sparse(self) -> int:
        return int(self.sparse_tok.numel())


@dataclass
class PrescoreCPUMetadata(CPUAttentionMetadata):
    plan: PrescorePlan | None = None


# ----------------------------------------------------------------------------- builder


class PrescoreCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = runtime().config
        runtime().num_layers = len(layer_names)
        if self.isa == "vec16":
            raise ValueError(
                f"--attention-backend prescore: head size {self.head_dim} uses vLLM's 'vec16' "
                "CPU cache layout, which prescore does not read; use the default backend")
        if self.isa != _PINNED_ISA:
            self.isa = _PINNED_ISA
            self._set_isa_to_layers(layer_names)
        if self.block_size % self.config.tile_size:
            raise ValueError(
                f"prescore tile_size={self.config.tile_size} must divide the KV block size "
                f"{self.block_size} (PRESCORE_TILE_SIZE / --prescore-tile-size, or --block-size)")
        if self.config.window_tokens < self.block_size + self.config.tile_size:
            raise ValueError(
                f"prescore window_tokens={self.config.window_tokens} must be at least the KV "
                f"block size plus one tile ({self.block_size + self.config.tile_size}): set "
                "PRESCORE_WINDOW_TOKENS / --prescore-window-tokens, or a smaller --block-size")
        if self.config.compensation != "none":
            raise ValueError(
                "prescore compensation (PRESCORE_COMPENSATION / --prescore-compensation) is "
                "available in prescore_backend.kernels but not wired into the backend yet; "
                "use 'none'")
        # Decode rows first: the dense subset is then mostly one contiguous prefill run.
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        rt = runtime()
        rt.stats.flush()  # anything a partial step left (normally flushed by the last layer)
        rt.layers_done = 0
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.is_cross_attention or self.is_encoder_only_attention:
            return PrescoreCPUMetadata(**vars(md))
        plan = self._plan(common_attn_metadata)
        return PrescoreCPUMetadata(**vars(md), plan=plan)

    def _plan(self, cm) -> PrescorePlan:
        cfg, T, B = self.config, self.config.tile_size, self.block_size
        qsl = cm.query_start_loc_cpu  # [R + 1]
        num_reqs = cm.num_reqs
        seq_lens = cm.seq_lens[:num_reqs].to("cpu", torch.int64)  # [R]
        query_lens = (qsl[1:] - qsl[:-1]).to(torch.int64)  # [R]
        is_decode = query_lens == 1  # [R]
        first_tok = qsl[:-1].to(torch.int64)  # [R]
        slots = cm.slot_mapping[: cm.num_actual_tokens].to("cpu", torch.int64)  # [N]
        block_table = cm.block_table_tensor[:num_reqs]  # [R, max_blocks]

        num_tiles = (seq_lens + T - 1) // T  # [R]
        if ROWS.rows:  # per-request controls (vllm_xargs) of some rows
            budget, forced_dense = self._budgets_with_controls(num_tiles, num_reqs)
        else:
            budget, forced_dense = self._budgets(num_tiles), None
        budget = torch.maximum(budget, torch.full_like(budget, cfg.sink_tiles + cfg.window_tiles))
        covers = budget >= num_tiles
        sparse = is_decode & (seq_lens >= cfg.min_seq_len) & (~covers | cfg.exact_via_sparse)
        if forced_dense is not None:
            sparse &= ~forced_dense
        sparse_rows = sparse.nonzero().flatten()  # [Rs]
        dense_rows = (~sparse).nonzero().flatten()  # [Rd]

        dense_tok, dense_md = None, None
        if sparse_rows.numel() and dense_rows.numel():
            dense_tok, dense_md = self._dense_subset(cm, dense_rows, query_lens, first_tok)

        # LSH bits of every decode token (prefill tokens get theirs from their scoring job).
        dec_rows = is_decode.nonzero().flatten()
        dec_tok = first_tok[dec_rows]
        dec_slot = slots[dec_tok]
        dec_off = dec_slot % B

        # Side-data jobs: every prefill/extend chunk, and decode rows that just filled a block.
        jobs: list[ScoreJob] = []
        job_rows = ((~is_decode) | (seq_lens % B == 0)).nonzero().flatten().tolist()
        if job_rows:
            sl_list, ql_list = seq_lens.tolist(), query_lens.tolist()
            for r in job_rows:  # a few rows per step, never on the per-layer path
                s, first = sl_list[r], sl_list[r] - ql_list[r]
                ctl = ROWS.get(r)
                jobs.append(ScoreJob(block_ids=block_table[r, :(s + B - 1) // B].to(torch.int64),
                                     seq_len=s, first_pos=first, per_token=ql_list[r] > 1,
                                     blocks_done=(first // B, s // B),
                                     method=ctl.method if ctl is not None else None))

        sp_budget = budget[sparse_rows]
        max_budget = int(sp_budget.max()) if sparse_rows.numel() else 0
        return PrescorePlan(
            sparse_tok=first_tok[sparse_rows],
            sparse_seq_lens=seq_lens[sparse_rows].to(torch.int32),
            sparse_block_table=block_table[sparse_rows],
            num_tiles=num_tiles[sparse_rows],
            budget=sp_budget,
            query_cap=int(cfg.query_cap_ratio * max_budget),
            dense_tok=dense_tok,
            dense_md=dense_md,
            num_dense_decode_rows=int((is_decode & ~sparse).sum()),
            dec_tok=dec_tok,
            dec_block=dec_slot // B,
            dec_tile=dec_off // T,
            dec_reset=dec_off % T == 0,
            score_jobs=jobs,
        )

    def _budgets(self, num_tiles: Tensor) -> Tensor:
        """Tiles per (row, KV head) from the global budget settings: ``[R]`` int64."""
        cfg, T = self.config, self.config.tile_size
        if cfg.max_tokens > 0:
            return torch.full_like(num_tiles, -(-cfg.max_tokens // T))
        return torch.ceil(num_tiles.double() * cfg.keep_ratio).long()

    def _budgets_with_controls(self, num_tiles: Tensor, num_reqs: int) -> tuple[Tensor, Tensor]:
        """Budgets honouring per-request controls; also the rows that asked for exact decode."""
        T = self.config.tile_size
        budget = self._budgets(num_tiles)  # [R]
        dense = torch.zeros(num_reqs, dtype=torch.bool)
        nt = num_tiles.tolist()
        for r, c in ROWS.rows.items():  # only the rows that sent controls
            if r >= num_reqs:
                continue
            if c.max_tokens is not None:
                budget[r] = -(-c.max_tokens // T)
            elif c.keep_ratio is not None:
                budget[r] = math.ceil(nt[r] * c.keep_ratio)
            dense[r] = c.dense
        return budget, dense

    def _dense_subset(self, cm, rows: Tensor, query_lens: Tensor, first_tok: Tensor):
        """Token indices and CPU_ATTN metadata of the rows served exactly."""
        ql = query_lens[rows]  # [Rd]
        tok = torch.cat([torch.arange(int(f), int(f) + int(n)) for f, n in
                         zip(first_tok[rows].tolist(), ql.tolist())])  # [Nd]
        qsl = torch.zeros(rows.numel() + 1, dtype=torch.int32)
        torch.cumsum(ql, 0, out=qsl[1:])
        seq_lens = cm.seq_lens[rows]
        sched = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=int(rows.numel()), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype, query_start_loc=qsl,
            causal=True, sliding_window_size=self.window_size, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
            kv_cache_dtype=self.kv_cache_dtype)
        md = CPUAttentionMetadata(
            num_actual_tokens=int(tok.numel()), max_query_len=int(ql.max()),
            query_start_loc=qsl, max_seq_len=int(seq_lens.max()), seq_lens=seq_lens,
            block_table=cm.block_table_tensor[rows], slot_mapping=cm.slot_mapping[tok],
            scheduler_metadata=sched, causal=True)
        return tok, md


# ----------------------------------------------------------------------------- backend


class PrescoreCPUBackend(CPUAttentionBackend):
    """CPU_ATTN with pre-scoring at prefill and sparse decode."""

    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "PRESCORE"

    @staticmethod
    def get_impl_cls() -> type["PrescoreCPUImpl"]:
        return PrescoreCPUImpl

    @staticmethod
    def get_builder_cls() -> type["PrescoreCPUMetadataBuilder"]:
        return PrescoreCPUMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False


# ----------------------------------------------------------------------------- impl


@dataclass
class SideData:
    """Per-layer tile data beside the KV cache, one entry per physical block.

    Only the parts the configured selection needs are allocated.
    """

    scores: Tensor  # [num_blocks, Hkv, tiles_per_block] fp32, -inf = not scored yet
    masks: Tensor | None  # [num_blocks, Hkv, tiles_per_block, W] int64 LSH bucket bitmask
    kmin: Tensor | None  # [num_blocks, Hkv, tiles_per_block, D] cache dtype, per-tile key min
    kmax: Tensor | None  # [num_blocks, Hkv, tiles_per_block, D] cache dtype, per-tile key max

    @classmethod
    def allocate(cls, num_blocks: int, num_kv_heads: int, tiles_per_block: int, *,
                 lsh_words: int = 0, head_dim: int = 0,
                 dtype: torch.dtype = torch.float32) -> "SideData":
        shape = (num_blocks, num_kv_heads, tiles_per_block)
        bounds = head_dim > 0
        return cls(
            scores=torch.full(shape, float("-inf")),
            masks=torch.zeros((*shape, lsh_words), dtype=torch.int64) if lsh_words else None,
            kmin=torch.zeros((*shape, head_dim), dtype=dtype) if bounds else None,
            kmax=torch.zeros((*shape, head_dim), dtype=dtype) if bounds else None)

    def bytes_per_token(self, block_size: int) -> float:
        parts = [t for t in (self.scores, self.masks, self.kmin, self.kmax) if t is not None]
        return sum(t[0].numel() * t.element_size() for t in parts) / block_size


class PrescoreCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         sinks)
        unsupported = {
            "sliding-window attention": sliding_window is not None,
            "ALiBi": alibi_slopes is not None,
            "logits soft-cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"kv cache dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        found = [name for name, bad in unsupported.items() if bad]
        if found and attn_type == AttentionType.DECODER:
            raise ValueError(
                f"--attention-backend prescore does not support {', '.join(found)}; serve this "
                "model with the default attention backend")
        self.rt = runtime()
        self.side: SideData | None = None
        # Build/load the fused CPU kernel now (once per process), not on the first request.
        fused = cpu_kernel_available()
        logger.info("Using PRESCORE attention backend (CPU, %s sparse decode)",
                    "fused C++" if fused else "torch")

    # --------------------------------------------------------------------- side data
    def _side(self, kv_cache: Tensor) -> SideData:
        if self.side is None:
            cfg = self.rt.config
            nb, _, bs, _ = kv_cache.shape
            self.side = SideData.allocate(
                nb, self.num_kv_heads, bs // cfg.tile_size,
                lsh_words=num_words(cfg.lsh_bits) if cfg.uses_lsh else 0,
                head_dim=self.head_size if cfg.uses_bounds else 0, dtype=kv_cache.dtype)
            if not self.rt.logged_side:
                self.rt.logged_side = True
                logger.info("prescore side data: %.2f bytes per token per layer",
                            self.side.bytes_per_token(bs))
        return self.side

    def _record_decode_tokens(self, plan: PrescorePlan, key: Tensor, side: SideData) -> None:
        """Per-token side data of decode keys just written (one token per row and tile)."""
        if plan.dec_tok.numel() == 0:
            return
        blk, tile, reset = plan.dec_block, plan.dec_tile, plan.dec_reset
        k = key[plan.dec_tok]  # [Nk, Hkv, D]
        # A tile begun by a decode token is unscored until its block is full.
        side.scores[blk[reset], :, tile[reset]] = float("-inf")
        r3 = reset.view(-1, 1, 1)
        if side.masks is not None:
            new = bucket_masks(_lsh(self.head_size).hash(k).unsqueeze(-1),
                               self.rt.config.lsh_bits)  # [Nk, Hkv, W]
            old = side.masks[blk, :, tile]  # [Nk, Hkv, W]
            side.masks[blk, :, tile] = torch.where(r3, new, old | new)
        if side.kmin is not None:
            kk = k.to(side.kmin.dtype)
            side.kmin[blk, :, tile] = torch.where(r3, kk, torch.minimum(side.kmin[blk, :, tile], kk))
            side.kmax[blk, :, tile] = torch.where(r3, kk, torch.maximum(side.kmax[blk, :, tile], kk))

    def _run_score_jobs(self, plan: PrescorePlan, key_cache: Tensor, side: SideData) -> None:
        cfg, T = self.rt.config, self.rt.config.tile_size
        bs = key_cache.shape[2]
        tpb = bs // T
        hkv, d = self.num_kv_heads, self.head_size
        for job in plan.score_jobs:
            s = job.seq_len
            keys = key_cache[job.block_ids]  # [nblk, Hkv, B, D]
            keys = keys.permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :s]  # [Hkv, s, D]
            b0, b1 = job.blocks_done
            if b1 > b0:  # full blocks: final scores, fitted on the prefix up to each block end
                ends = [(b + 1) * bs for b in range(b0, b1)]
                scorer = self.rt.scorer if job.method is None else _scorer(job.method)
                ks = scorer.score_prefixes(keys.float(), b0 * bs, ends, grain=bs)
                tiles = aggregate_tiles(ks, T, cfg.aggregate)  # [Hkv, (b1 - b0) * tpb]
                side.scores[job.block_ids[b0:b1]] = tiles.view(hkv, b1 - b0, tpb).transpose(0, 1)
            if s > b1 * bs:  # tiles this step wrote in the incomplete last block: unscored
                t = torch.arange(max(b1 * bs, job.first_pos) // T, (s + T - 1) // T)
                side.scores[job.block_ids[(t * T) // bs], :, t % tpb] = float("-inf")
            if job.per_token:
                self._record_chunk_tokens(job, keys, side)

    def _record_chunk_tokens(self, job: ScoreJob, keys: Tensor, side: SideData) -> None:
        """Per-token side data (LSH bits, key bounds) of the tiles a prefill chunk touched."""
        cfg, T, s = self.rt.config, self.rt.config.tile_size, job.seq_len
        hkv, d = self.num_kv_heads, self.head_size
        t_lo, t_hi = job.first_pos // T, (s + T - 1) // T
        seg = keys[:, t_lo * T:]  # [Hkv, L, D]: the first tile's earlier keys included
        pad = (t_hi - t_lo) * T - seg.shape[1]
        t = torch.arange(t_lo, t_hi)
        bs = side.scores.shape[2] * T
        blk, j = job.block_ids[(t * T) // bs], t % (bs // T)
        valid = torch.ones(hkv, seg.shape[1], dtype=torch.bool)
        valid = torch.nn.functional.pad(valid, (0, pad)).view(hkv, -1, T)  # [Hkv, nt, T]
        if side.masks is not None:
            buckets = torch.nn.functional.pad(_lsh(d).hash(seg), (0, pad))  # [Hkv, nt*T]
            m = bucket_masks(buckets.view(hkv, -1, T), cfg.lsh_bits, valid=valid)  # [Hkv, nt, W]
            side.masks[blk, :, j] = m.transpose(0, 1)
        if side.kmin is not None:
            x = torch.nn.functional.pad(seg.float(), (0, 0, 0, pad)).view(hkv, -1, T, d)
            v4 = valid.unsqueeze(-1)  # [Hkv, nt, T, 1]
            kmin = x.masked_fill(~v4, float("inf")).amin(2)  # [Hkv, nt, D]
            kmax = x.masked_fill(~v4, float("-inf")).amax(2)
            side.kmin[blk, :, j] = kmin.transpose(0, 1).to(side.kmin.dtype)
            side.kmax[blk, :, j] = kmax.transpose(0, 1).to(side.kmax.dtype)

    # --------------------------------------------------------------------- forward
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "plan", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        try:
            return self._forward(layer, query, key, value, kv_cache, attn_metadata, plan, output)
        finally:
            rt = self.rt
            rt.layers_done += 1
            if rt.layers_done == rt.num_layers:  # the step's last layer: counters out now
                rt.stats.flush()

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, plan: PrescorePlan,
                 output):
        side = self._side(kv_cache)
        key_cache, value_cache = vllm_cpu_kv_views(kv_cache)  # [nb, Hkv, B, D] each
        stats = self.rt.stats

        t0 = time.perf_counter()
        self._record_decode_tokens(plan, key, side)
        if plan.score_jobs:
            self._run_score_jobs(plan, key_cache, side)
            stats.scoring_s += time.perf_counter() - t0
        stats.counts[DENSE_ROWS] += plan.num_dense_decode_rows

        if plan.num_sparse == 0:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if plan.dense_tok is not None:
            q_dense = query[plan.dense_tok]  # [Nd, Hq, D]
            out_dense = torch.empty_like(q_dense)
            super().forward(layer, q_dense, key, value, kv_cache, plan.dense_md, out_dense)
            output.index_copy_(0, plan.dense_tok, out_dense)
        self._sparse_decode(plan, query, key_cache, value_cache, side, output)
        return output

    def _query_aware(self, plan: PrescorePlan, q: Tensor, side: SideData, bt: Tensor,
                     tile_scores: Tensor) -> Tensor | None:
        """Tiles the query-aware part picks: ``[Rs, Hkv, M]`` bool, at most ``query_cap`` each.

        q ``[Rs, Hq, D]``; bt ``[Rs, MB]`` int64; tile_scores ``[Rs, Hkv, M]`` pre-scores.
        """
        cfg = self.rt.config
        rs, hkv, cap = q.shape[0], self.num_kv_heads, plan.query_cap
        if cfg.query_aware == "none" or cap == 0:
            return None
        M = tile_scores.shape[-1]
        cand = None
        if side.masks is not None:  # HyperAttention: the query's buckets (union over the group)
            qmask = bucket_masks(_lsh(self.head_size).hash(q).view(rs, hkv, -1), cfg.lsh_bits)
            tmask = side.masks[bt].permute(0, 2, 1, 3, 4).reshape(rs, hkv, M, -1)
            cand = masks_intersect(tmask, qmask.unsqueeze(2))  # [Rs, Hkv, M]
        if side.kmin is not None:  # Quest: upper bound of q.k over the tile, max over the group
            d = self.head_size
            qg = q.float().view(rs * hkv, -1, d)  # [Rs*Hkv, G, D]
            kmin = side.kmin[bt].permute(0, 2, 1, 3, 4).reshape(rs * hkv, M, d).float()
            kmax = side.kmax[bt].permute(0, 2, 1, 3, 4).reshape(rs * hkv, M, d).float()
            bound = (torch.bmm(qg.clamp_min(0), kmax.transpose(1, 2))
                     + torch.bmm(qg.clamp_max(0), kmin.transpose(1, 2)))  # [Rs*Hkv, G, M]
            rank = bound.amax(1).view(rs, hkv, M)
        else:
            rank = tile_scores.clone()  # LSH matches ranked by pre-score
        idx = torch.arange(M)
        n = plan.num_tiles.view(rs, 1, 1)
        elig = (idx < n) & (idx >= cfg.sink_tiles) & (idx < n - cfg.window_tiles)
        if cand is not None:
            elig = elig & cand
        rank = rank.masked_fill(~elig, float("-inf"))
        top = rank.topk(min(cap, M), dim=-1)  # [Rs, Hkv, cap]
        pick = torch.zeros(rs, hkv, M, dtype=torch.bool)
        return pick.scatter_(-1, top.indices, torch.isfinite(top.values))

    def _sparse_decode(self, plan: PrescorePlan, query: Tensor, key_cache: Tensor,
                       value_cache: Tensor, side: SideData, output: Tensor) -> None:
        cfg, stats = self.rt.config, self.rt.stats
        t0 = time.perf_counter()
        rs, hkv = plan.num_sparse, self.num_kv_heads
        bt = plan.sparse_block_table.long()  # [Rs, MB]
        q = query[plan.sparse_tok]  # [Rs, Hq, D]
        scores = side.scores[bt].permute(0, 2, 1, 3).reshape(rs, hkv, -1)  # [Rs, Hkv, M]
        pick = self._query_aware(plan, q, side, bt, scores)
        sel = select_tiles(scores, plan.num_tiles, plan.budget, sink_tiles=cfg.sink_tiles,
                           window_tiles=cfg.window_tiles, lsh_match=pick,
                           lsh_cap=plan.query_cap if pick is not None else 0)
        res_tiles = res_w = None
        if cfg.residual_tiles > 0:
            res_tiles, res_w = residual_sample(sel.tiles, plan.num_tiles, cfg.residual_tiles,
                                               generator=self.rt.generator)
        stats.selection_s += time.perf_counter() - t0

        out, _ = sparse_decode(q, key_cache, value_cache, plan.sparse_block_table,
                               plan.sparse_seq_lens, sel.tiles, cfg.tile_size, self.scale,
                               impl="auto", residual_tiles=res_tiles, residual_weight=res_w)
        output.index_copy_(0, plan.sparse_tok, out.to(output.dtype))

        # Tokens read: selected tiles, the last one possibly partial.
        T = cfg.tile_size
        tiles = sel.tiles.long()  # [Rs, Hkv, S]
        lens = plan.sparse_seq_lens.long().view(rs, 1, 1)
        read = ((lens - tiles * T).clamp(0, T) * (tiles >= 0)).sum()
        stats.counts[READ] += read
        stats.counts[CONTEXT] += plan.sparse_seq_lens.long().sum() * hkv
        stats.counts[SPARSE_ROWS] += rs
        stats.counts[SRC0:] += sel.source_counts
