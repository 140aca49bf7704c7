"""PRESCORE on vLLM's CPU backend: metadata -> builder -> backend -> impl.

Data path of one engine step (see docs/architecture.md):

* Prefill/extend rows and short decode rows run on vLLM's exact CPU kernel (CPU_ATTN); the
  KV write is vLLM's too (``do_kv_cache_update`` is inherited).
* The builder plans once per step (:class:`PrescorePlan`): which decode rows are sparse (context
  >= ``min_seq_len`` and budget < context), their budgets, the dense subset's scheduler
  metadata, the decode tokens whose LSH bucket must be recorded, and the scoring jobs.
* ``forward`` (once per layer) updates the side data of the keys just written, then serves the
  dense subset with vLLM's kernel and the sparse rows with
  :func:`prescore_backend.kernels.select_decode.select_and_decode_into` (tile selection and sparse decode
  in one C++ call that reads vLLM's query rows and writes its output rows in place; with a
  HyperAttention residual, :func:`~prescore_backend.selection.select_decode_tiles` then
  :func:`prescore_backend.kernels.sparse_decode.sparse_decode`; with two precision tiers,
  :func:`prescore_backend.tiers.decode_two_tiers`).

The vLLM-independent pieces live in modules named for their stage of the data path, which
the quality evaluation calls as well: :mod:`prescore_backend.side_data` (store: side data,
scoring jobs), :mod:`prescore_backend.selection` (select: budgets, the query-aware pick) and
:mod:`prescore_backend.kernels.select_decode` (decode: selection + sparse attention).

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

from prescore_backend.backends.common import (
    PrescorePlan,
    ScoreJob,
    SideData,
    SideDataUpkeep,
    StepPlanner,
    lsh_for,
    read_tokens,
    residual_within_budget,
    logger,
    refuse_unsupported,
    runtime,
)
from prescore_backend.memory import patch_worker
from prescore_backend.selection import scores_and_pick, select_decode_tiles
from prescore_backend.tiers import decode_two_tiers
from prescore_backend.kernels.dispatch import cpu_kernels_available
from prescore_backend.kernels.layouts import VLLM_CPU_ISA_VIEWS
from prescore_backend.kernels.sparse_decode import sparse_decode
from prescore_backend.kernels.select_decode import select_and_decode_into

__all__ = ["PrescoreCPUBackend", "PrescoreCPUImpl", "PrescoreCPUMetadataBuilder",
           "PrescoreCPUMetadata", "PrescorePlan", "ScoreJob", "SideData", "runtime"]

# vLLM's CPU kernels store K per (block, KV head) in an ISA-specific order. Prescore reads two:
# "vec" (K^T [D, block_size], V [block_size, D]: strided views) and "amx" (bf16 on AMX CPUs:
# VNNI-packed, read in place by the C++ kernel, so bf16 prefill keeps vLLM's AMX kernel). Any
# other ISA vLLM would pick is pinned to "vec".
_FALLBACK_ISA = "vec"


# ----------------------------------------------------------------------------- metadata


@dataclass
class PrescoreCPUMetadata(CPUAttentionMetadata):
    plan: PrescorePlan | None = None


# ----------------------------------------------------------------------------- builder


class PrescoreCPUMetadataBuilder(StepPlanner, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.isa == "vec16":
            raise ValueError(
                f"--attention-backend prescore: head size {self.head_dim} uses vLLM's 'vec16' "
                "CPU cache layout, which prescore does not read; use the default backend")
        if self.isa not in VLLM_CPU_ISA_VIEWS:
            self.isa = _FALLBACK_ISA
            self._set_isa_to_layers(layer_names)
        logger.info_once("prescore reads vLLM's %r CPU KV cache layout", self.isa)
        self.init_planner(block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, kv_bytes=self.dtype.itemsize,
                          layer_names=layer_names)
        # Decode rows first: the dense subset is then mostly one contiguous prefill run.
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        self.start_step()
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.is_cross_attention or self.is_encoder_only_attention:
            return PrescoreCPUMetadata(**vars(md))
        return PrescoreCPUMetadata(**vars(md), plan=self.plan_step(common_attn_metadata))

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


class PrescoreCPUImpl(SideDataUpkeep, CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         sinks)
        refuse_unsupported(attn_type, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                           logits_soft_cap=logits_soft_cap, sinks=sinks,
                           kv_cache_dtype=kv_cache_dtype,
                           kv_sharing_target_layer_name=kv_sharing_target_layer_name)
        self.rt = runtime()
        self.side: SideData | None = None
        self._views_key: tuple | None = None  # the cache tensor kv_views last viewed
        # Build/load the fused CPU kernel now (once per process), not on the first request.
        self.fused = cpu_kernels_available()
        logger.info_once("Using PRESCORE attention backend (CPU, %s sparse decode)",
                         "fused C++" if self.fused else "torch")

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
            self.end_layer()

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, plan: PrescorePlan,
                 output):
        side = self.side_for(kv_cache, layer)
        key_cache, value_cache, kv_layout = self.kv_views(kv_cache, layer.isa)
        self.update_side_data(plan, key, key_cache, value_cache, side, kv_layout)

        if plan.num_sparse == 0:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if plan.dense_tok is not None:
            q_dense = query[plan.dense_tok]  # [Nd, Hq, D]
            out_dense = torch.empty_like(q_dense)
            super().forward(layer, q_dense, key, value, kv_cache, plan.dense_md, out_dense)
            output.index_copy_(0, plan.dense_tok, out_dense)
        self._sparse_decode(plan, query, key_cache, value_cache, kv_layout, side, output)
        return output

    def kv_views(self, kv_cache: Tensor, isa: str) -> tuple[Tensor, Tensor, str]:
        """K and V views ``[NB, Hkv, B, D]`` of the layer's cache (packed order for "amx") and
        their layout, for the ISA the builder settled on; made once per cache tensor, not per
        step (a few view ops, ~25 us per layer and step at batch 1). The views hold the cache's
        storage until a later call views another tensor."""
        key = (kv_cache.data_ptr(), kv_cache.shape, isa)
        if self._views_key != key:
            views, kv_layout = VLLM_CPU_ISA_VIEWS[isa]
            self._views = (*views(kv_cache), kv_layout)
            self._views_key = key
        return self._views

    def _sparse_decode(self, plan: PrescorePlan, query: Tensor, key_cache: Tensor,
                       value_cache: Tensor, kv_layout: str, side: SideData,
                       output: Tensor) -> None:
        cfg, stats = self.rt.config, self.rt.stats
        t0 = time.perf_counter()
        bt = plan.sparse_bt64  # [Rs, MB]
        lsh = lsh_for(self.head_size) if cfg.uses_lsh else None
        if cfg.uses_low_tier:  # two precision tiers: C++ pick, exact + low-bit decode, merge
            q = query[plan.sparse_tok]  # [Rs, Hq, D]
            out, read, sel = decode_two_tiers(
                cfg, q, key_cache, value_cache, side, bt, plan.sparse_seq_lens, plan.num_tiles,
                plan.budget, plan.tier_budget, self.scale, kv_layout=kv_layout)
            output.index_copy_(0, plan.sparse_tok, out.to(output.dtype))
            stats.decode_counts.add_(torch.cat([read.sum().round().long().view(1),
                                                sel.source_counts]))
            stats.selection_s += time.perf_counter() - t0
            return
        if cfg.residual_tiles == 0:  # the common case: selection and decode in one call
            if self.fused and cfg.query_aware in ("lsh", "sparq4"):
                # The query-aware part inside the fused call, on vLLM's query rows: the LSH
                # match (the query hashed, the tiles' bucket sets read through the block table)
                # or the sparq4 ranking (the key copy read through it), and the pre-scores
                # read in place: no torch op and no second C++ call per layer for them.
                scores, pick_kw = side.scores, dict(paged_scores=True)
                if cfg.query_aware == "lsh":
                    pick_kw["lsh_in_place"] = (lsh.proj, side.masks, plan.query_caps)
                else:
                    pick_kw["sparq4_in_place"] = (side.kq, side.kz, plan.query_caps,
                                                 plan.rank_channels)
            else:
                q = query[plan.sparse_tok]  # [Rs, Hq, D] for the query-aware pick
                scores, pick = scores_and_pick(cfg, q, side, bt, plan.num_tiles,
                                               plan.query_caps, lsh=lsh, key_cache=key_cache,
                                               kv_layout=kv_layout, max_cap=plan.max_cap,
                                               caps_uniform=plan.caps_uniform)
                pick_kw = dict(lsh_match=pick, lsh_cap=plan.max_cap if pick is not None else 0)
            pick_s = time.perf_counter() - t0
            # query rows read and output rows written in place, tokens read and tiles per
            # source added to the step's counters: no tensor made per layer on the CPU path
            sel_s = select_and_decode_into(
                query, key_cache, value_cache, plan.sparse_block_table, plan.sparse_seq_lens,
                scores, plan.num_tiles, plan.budget, output, rows=plan.sparse_tok,
                stats=stats.decode_counts, tile_size=cfg.tile_size, scale=self.scale,
                sink_tiles=cfg.sink_tiles, window_tiles=cfg.window_tiles, kv_layout=kv_layout,
                **pick_kw)
            stats.selection_s += pick_s + sel_s
            return
        q = query[plan.sparse_tok]  # [Rs, Hq, D]
        sel, res_tiles, res_w = select_decode_tiles(
            cfg, q, side, bt, plan.num_tiles, plan.budget, plan.query_caps, lsh=lsh,
            generator=self.rt.generator, key_cache=key_cache, kv_layout=kv_layout)
        res_tiles, res_w = residual_within_budget(plan, res_tiles, res_w)
        stats.selection_s += time.perf_counter() - t0
        out, _ = sparse_decode(q, key_cache, value_cache, plan.sparse_block_table,
                               plan.sparse_seq_lens, sel.tiles, cfg.tile_size, self.scale,
                               impl="auto", residual_tiles=res_tiles, residual_weight=res_w,
                               kv_layout=kv_layout)
        output.index_copy_(0, plan.sparse_tok, out.to(output.dtype))
        stats.decode_counts.add_(torch.cat([
            read_tokens(sel.tiles, res_tiles, plan.sparse_seq_lens, cfg.tile_size),
            sel.source_counts]))


def _budget_side_data() -> None:
    """The CPU worker reports KV + side data within vLLM's KV-cache budget (memory.py)."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    patch_worker(CPUWorker)


_budget_side_data()  # imported in the worker when the model's layers get this backend
