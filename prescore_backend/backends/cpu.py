"""PRESCORE on vLLM's CPU backend: metadata -> builder -> backend -> impl.

Data path of one engine step (see docs/architecture.md):

* Prefill/extend rows and short decode rows run on vLLM's exact CPU kernel (CPU_ATTN); the
  KV write is vLLM's too (``do_kv_cache_update`` is inherited).
* The builder plans once per step (:class:`PrescorePlan`): which decode rows are sparse (context
  >= ``min_seq_len`` and budget < context), their budgets, the dense subset's scheduler
  metadata, the decode tokens whose LSH bucket must be recorded, and the scoring jobs.
* ``forward`` (once per layer) updates the side data of the keys just written, then serves the
  dense subset with vLLM's kernel and the sparse rows with
  :func:`prescore_backend.selection.select_and_decode_into` (tile selection and sparse decode
  in one C++ call that reads vLLM's query rows and writes its output rows in place; with a
  HyperAttention residual, :func:`~prescore_backend.decode.select_decode_tiles` then
  :func:`prescore_backend.kernels.sparse_decode.sparse_decode`).

The vLLM-independent pieces (side data, scoring jobs, the query-aware pick, the selection
call) live in :mod:`prescore_backend.decode`, which the quality evaluation calls as well.

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
quantized (fp8) KV cache, head sizes whose CPU layout is "vec16". Encoder and cross attention
layers fall back to exact CPU attention. MLA models are refused at backend selection.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from prescore_backend.config import PrescoreConfig, testing_exact_via_sparse
from prescore_backend.kernels.cpu_sparse_decode import available as cpu_kernel_available
from prescore_backend.kernels.layouts import VLLM_CPU_ISA_VIEWS
from prescore_backend.decode import (
    ScoreJob,
    SideData,
    config_budget,
    floor_budget,
    ratio_tiles,
    side_read_fraction,
    gather_tile_scores,
    query_caps,
    record_codes,
    record_decode_tokens,
    run_score_jobs,
    scores_and_pick,
    select_decode_tiles,
)
from prescore_backend.kernels.lsh import AngularLSH, num_words
from prescore_backend.kernels.sparse_decode import sparse_decode
from prescore_backend.metrics import PrescoreStats, get_metrics
from prescore_backend.pq import LayerCodebook, PQCodebooks, resolve_codebooks
from prescore_backend.requests import ROWS
from prescore_backend.selection import select_and_decode_into, tokens_read
from prescore_backend.scoring import Scorer, get_scorer

__all__ = ["PrescoreCPUBackend", "PrescoreCPUImpl", "PrescoreCPUMetadataBuilder",
           "PrescoreCPUMetadata", "PrescorePlan", "ScoreJob", "SideData"]

# A child of vLLM's logger, so lines show with vLLM's format and level.
logger = logging.getLogger("vllm.prescore")

# vLLM's CPU kernels store K per (block, KV head) in an ISA-specific order. Prescore reads two:
# "vec" (K^T [D, block_size], V [block_size, D]: strided views) and "amx" (bf16 on AMX CPUs:
# VNNI-packed, read in place by the C++ kernel, so bf16 prefill keeps vLLM's AMX kernel). Any
# other ISA vLLM would pick is pinned to "vec".
_FALLBACK_ISA = "vec"


@dataclass
class _Runtime:
    """Per-process objects built once from the config."""

    config: PrescoreConfig
    scorer: Scorer
    lsh: AngularLSH | None
    stats: PrescoreStats
    generator: torch.Generator
    pq: PQCodebooks | None = None  # per-layer PQ codebooks (query_aware="pq")
    total_kv_heads: int = 0  # the model's KV heads over all tensor-parallel ranks
    logged_side: bool = False
    num_layers: int = 0  # attention layers run per step (set by the builder)
    layers_done: int = 0  # layers run so far in this step
    exact_via_sparse: bool = False  # tests only: config.testing_exact_via_sparse()


@functools.lru_cache(maxsize=1)
def runtime() -> _Runtime:
    cfg = PrescoreConfig.from_env()
    # built inside vLLM's model construction (first attention impl), where the config is set
    model_config = get_current_vllm_config().model_config
    books, cfg, msg = resolve_codebooks(cfg, getattr(model_config, "model", None))
    if msg:
        (logger.info if books is not None else logger.warning)(msg)
    logger.info("prescore settings: %s", cfg.to_dict())
    try:
        get_metrics().config_info.labels(method=cfg.method, keep_ratio=str(cfg.keep_ratio),
                                         tile_size=str(cfg.tile_size),
                                         query_aware=cfg.query_aware).set(1)
    except Exception:  # metrics must never stop serving
        logger.exception("prescore: could not publish prescore_config_info")
    gen = torch.Generator().manual_seed(cfg.seed)
    return _Runtime(config=cfg, scorer=get_scorer(cfg.method, seed=cfg.seed), lsh=None,
                    stats=PrescoreStats(), generator=gen, pq=books,
                    total_kv_heads=model_config.get_total_num_kv_heads() if books else 0,
                    exact_via_sparse=testing_exact_via_sparse())


@functools.lru_cache(maxsize=None)
def _scorer(method: str) -> Scorer:
    """A request's own scorer (prescore_method control), built once per process."""
    return get_scorer(method, seed=runtime().config.seed)


def _job_scorer(method: str | None) -> Scorer:
    """The scorer of a side-data job: the request's own, or the configured one."""
    return runtime().scorer if method is None else _scorer(method)


def _lsh(head_dim: int) -> AngularLSH:
    rt = runtime()
    if rt.lsh is None:
        rt.lsh = AngularLSH(rt.config.lsh_bits, head_dim, seed=rt.config.seed)
    return rt.lsh


# ----------------------------------------------------------------------------- metadata


@dataclass
class PrescorePlan:
    """What every layer does this step; built once per step by the builder."""

    # Sparse decode rows.
    sparse_tok: Tensor  # [Rs] int64 token index of each sparse row in the batch
    sparse_seq_lens: Tensor  # [Rs] int32
    sparse_block_table: Tensor  # [Rs, max_blocks] int32
    sparse_bt64: Tensor  # [Rs, max_blocks] int64 (the same, for indexing side data)
    num_tiles: Tensor  # [Rs] int64
    # [4] int64 what each layer adds to PrescoreStats.layer_counts: context tokens of the
    # sparse rows times the KV heads, sparse rows, exact decode rows, side data the selection
    # reads (in KV tokens, times the KV heads)
    layer_counts: Tensor
    budget: Tensor  # [Rs] int64 tiles per (row, KV head)
    query_caps: Tensor  # [Rs] int64 query-aware tiles per (row, KV head) at most
    # Exact rows served by vLLM's kernel when sparse rows exist (None: all rows are sparse).
    dense_tok: Tensor | None  # [Nd] int64
    dense_md: CPUAttentionMetadata | None
    # LSH bits of decode tokens written this step.
    dec_tok: Tensor  # [Nk] int64 token index
    dec_block: Tensor  # [Nk] int64 physical block
    dec_tile: Tensor  # [Nk] int64 tile within the block
    dec_reset: Tensor  # [Nk] bool: the token starts its tile
    score_jobs: list[ScoreJob]
    # Every token written this step (query_aware="pq" codes them), else None.
    write_block: Tensor | None = None  # [N] int64 physical block
    write_off: Tensor | None = None  # [N] int64 offset in the block

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
        self.exact_via_sparse = runtime().exact_via_sparse  # tests only
        runtime().num_layers = len(layer_names)
        if self.isa == "vec16":
            raise ValueError(
                f"--attention-backend prescore: head size {self.head_dim} uses vLLM's 'vec16' "
                "CPU cache layout, which prescore does not read; use the default backend")
        if self.isa not in VLLM_CPU_ISA_VIEWS:
            self.isa = _FALLBACK_ISA
            self._set_isa_to_layers(layer_names)
        logger.info_once("prescore reads vLLM's %r CPU KV cache layout", self.isa)
        # what the selection reads besides the tiles, per KV byte (counted, not budgeted)
        self.side_fraction = side_read_fraction(self.config, self.head_dim, self.dtype.itemsize,
                                                self.block_size)
        if self.block_size % self.config.tile_size:
            raise ValueError(
                f"prescore tile_size={self.config.tile_size} must divide the KV block size "
                f"{self.block_size} (PRESCORE_TILE_SIZE / --prescore-tile-size, or --block-size)")
        if self.config.window_tokens < self.block_size + self.config.tile_size:
            raise ValueError(
                f"prescore window_tokens={self.config.window_tokens} must be at least the KV "
                f"block size plus one tile ({self.block_size + self.config.tile_size}): set "
                "PRESCORE_WINDOW_TOKENS / --prescore-window-tokens, or a smaller --block-size")
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
        budget = floor_budget(cfg, budget)
        covers = budget >= num_tiles
        sparse = is_decode & (seq_lens >= cfg.min_seq_len) & (~covers | self.exact_via_sparse)
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
        sp_lens, sp_tiles = seq_lens[sparse_rows], num_tiles[sparse_rows]
        # the selection's own reads, in KV tokens (rows whose budget covers the context have
        # nothing to choose and are not charged)
        side_tokens = (sp_lens[sp_budget < sp_tiles].double()
                       * self.side_fraction).round().long().sum()
        sp_bt = block_table[sparse_rows]
        return PrescorePlan(
            sparse_tok=first_tok[sparse_rows],
            sparse_seq_lens=sp_lens.to(torch.int32),
            sparse_block_table=sp_bt,
            sparse_bt64=sp_bt.long(),
            num_tiles=sp_tiles,
            layer_counts=torch.stack([sp_lens.long().sum() * self.num_kv_heads,
                                      torch.tensor(int(sparse_rows.numel())),
                                      (is_decode & ~sparse).sum(),
                                      side_tokens * self.num_kv_heads]),
            budget=sp_budget,
            query_caps=query_caps(cfg, sp_budget),
            dense_tok=dense_tok,
            dense_md=dense_md,
            dec_tok=dec_tok,
            dec_block=dec_slot // B,
            dec_tile=dec_off // T,
            dec_reset=dec_off % T == 0,
            score_jobs=jobs,
            write_block=slots // B if cfg.uses_codes else None,
            write_off=slots % B if cfg.uses_codes else None,
        )

    def _budgets(self, num_tiles: Tensor) -> Tensor:
        """Tiles per (row, KV head) from the global budget settings: ``[R]`` int64."""
        return config_budget(self.config, num_tiles)

    def _budgets_with_controls(self, num_tiles: Tensor, num_reqs: int) -> tuple[Tensor, Tensor]:
        """Budgets honouring per-request controls; also the rows that asked for exact decode."""
        T = self.config.tile_size
        budget = self._budgets(num_tiles)  # [R]
        dense = torch.zeros(num_reqs, dtype=torch.bool)
        for r, c in ROWS.rows.items():  # only the rows that sent controls
            if r >= num_reqs:
                continue
            if c.max_tokens is not None:
                budget[r] = -(-c.max_tokens // T)
            elif c.keep_ratio is not None:
                budget[r] = int(ratio_tiles(num_tiles[r:r + 1], c.keep_ratio))
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
        self.fused = cpu_kernel_available()
        logger.info_once("Using PRESCORE attention backend (CPU, %s sparse decode)",
                         "fused C++" if self.fused else "torch")

    # --------------------------------------------------------------------- side data
    def _side(self, kv_cache: Tensor, layer) -> SideData:
        if self.side is None:
            cfg = self.rt.config
            nb, _, bs, _ = kv_cache.shape
            books = None
            if cfg.uses_codes:
                books = self._rank_codebook(layer)
            self.side = SideData.allocate(
                nb, self.num_kv_heads, bs // cfg.tile_size,
                lsh_words=num_words(cfg.lsh_bits) if cfg.uses_lsh else 0,
                head_dim=self.head_size if cfg.uses_bounds else 0, dtype=kv_cache.dtype,
                block_size=bs, codebook=books,
                key_copy_dim=self.head_size if cfg.uses_key_copy else 0)
            if not self.rt.logged_side:
                self.rt.logged_side = True
                logger.info("prescore side data: %.2f bytes per token per layer",
                            self.side.bytes_per_token(bs))
        return self.side

    def _rank_codebook(self, layer) -> LayerCodebook:
        """This layer's PQ codebook for the KV heads of this tensor-parallel rank (vLLM's
        split: contiguous heads per rank, or one replicated head when ranks outnumber them)."""
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        total = self.rt.total_kv_heads
        self.rt.pq.check(self.rt.num_layers, total, self.head_size, "prescore pq_codebook")
        tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        first = rank // (tp // total) if tp >= total else rank * self.num_kv_heads
        return self.rt.pq.layer(extract_layer_index(layer.layer_name)).heads(
            first, self.num_kv_heads)

    def _record_decode_tokens(self, plan: PrescorePlan, key: Tensor, side: SideData) -> None:
        """Per-token side data of decode keys just written (one token per row and tile)."""
        if plan.dec_tok.numel() == 0:
            return
        cfg = self.rt.config
        record_decode_tokens(side, key[plan.dec_tok], plan.dec_block, plan.dec_tile,
                             plan.dec_reset, lsh=_lsh(self.head_size) if cfg.uses_lsh else None,
                             lsh_bits=cfg.lsh_bits)

    def _run_score_jobs(self, plan: PrescorePlan, key_cache: Tensor, side: SideData,
                        kv_layout: str) -> None:
        cfg = self.rt.config
        run_score_jobs(side, plan.score_jobs, key_cache, scorer_for=_job_scorer,
                       tile_size=cfg.tile_size, aggregate=cfg.aggregate,
                       lsh=_lsh(self.head_size) if cfg.uses_lsh else None, lsh_bits=cfg.lsh_bits,
                       kv_layout=kv_layout)

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
        side = self._side(kv_cache, layer)
        views, kv_layout = VLLM_CPU_ISA_VIEWS[layer.isa]  # the ISA the builder settled on
        key_cache, value_cache = views(kv_cache)  # [nb, Hkv, B, D] each (packed order for amx)
        stats = self.rt.stats

        t0 = time.perf_counter()
        self._record_decode_tokens(plan, key, side)
        if plan.write_block is not None:  # PQ codes of every key written this step
            record_codes(side, key[: plan.write_block.numel()], plan.write_block, plan.write_off)
        if plan.score_jobs:
            self._run_score_jobs(plan, key_cache, side, kv_layout)
            stats.scoring_s += time.perf_counter() - t0
        stats.layer_counts.add_(plan.layer_counts)  # one op: built per step by the builder

        if plan.num_sparse == 0:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if plan.dense_tok is not None:
            q_dense = query[plan.dense_tok]  # [Nd, Hq, D]
            out_dense = torch.empty_like(q_dense)
            super().forward(layer, q_dense, key, value, kv_cache, plan.dense_md, out_dense)
            output.index_copy_(0, plan.dense_tok, out_dense)
        self._sparse_decode(plan, query, key_cache, value_cache, kv_layout, side, output)
        return output

    def _sparse_decode(self, plan: PrescorePlan, query: Tensor, key_cache: Tensor,
                       value_cache: Tensor, kv_layout: str, side: SideData,
                       output: Tensor) -> None:
        cfg, stats = self.rt.config, self.rt.stats
        t0 = time.perf_counter()
        bt = plan.sparse_bt64  # [Rs, MB]
        lsh = _lsh(self.head_size) if cfg.uses_lsh else None
        if cfg.residual_tiles == 0:  # the common case: selection and decode in one call
            if cfg.query_aware == "lsh" and self.fused:
                # HyperAttention's match inside the fused call: the query hashed and the
                # tiles' bucket sets read through the block table there (~15 torch ops less)
                scores, lsh_kw = gather_tile_scores(side, bt), dict(
                    lsh_in_place=(lsh.proj, side.masks, plan.query_caps))
            else:
                q = query[plan.sparse_tok]  # [Rs, Hq, D] for the query-aware pick
                scores, pick = scores_and_pick(cfg, q, side, bt, plan.num_tiles,
                                               plan.query_caps, lsh=lsh, key_cache=key_cache,
                                               kv_layout=kv_layout)
                lsh_kw = dict(lsh_match=pick, lsh_cap=int(plan.query_caps.max())
                              if pick is not None else 0)
            pick_s = time.perf_counter() - t0
            # query rows read and output rows written in place, tokens read and tiles per
            # source added to the step's counters: no tensor made per layer on the CPU path
            sel_s = select_and_decode_into(
                query, key_cache, value_cache, plan.sparse_block_table, plan.sparse_seq_lens,
                scores, plan.num_tiles, plan.budget, output, rows=plan.sparse_tok,
                stats=stats.decode_counts, tile_size=cfg.tile_size, scale=self.scale,
                sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles, kv_layout=kv_layout,
                **lsh_kw)
            stats.selection_s += pick_s + sel_s
            return
        q = query[plan.sparse_tok]  # [Rs, Hq, D]
        sel, res_tiles, res_w = select_decode_tiles(
            cfg, q, side, bt, plan.num_tiles, plan.budget, plan.query_caps, lsh=lsh,
            generator=self.rt.generator, key_cache=key_cache, kv_layout=kv_layout)
        stats.selection_s += time.perf_counter() - t0
        out, _ = sparse_decode(q, key_cache, value_cache, plan.sparse_block_table,
                               plan.sparse_seq_lens, sel.tiles, cfg.tile_size, self.scale,
                               impl="auto", residual_tiles=res_tiles, residual_weight=res_w,
                               kv_layout=kv_layout)
        output.index_copy_(0, plan.sparse_tok, out.to(output.dtype))
        stats.decode_counts.add_(torch.cat([
            tokens_read(sel.tiles, plan.sparse_seq_lens, cfg.tile_size).sum().view(1),
            sel.source_counts]))
