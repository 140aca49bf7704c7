"""PRESCORE on vLLM's Triton backend (CUDA GPUs): metadata -> builder -> backend -> impl.

Data path of one engine step, as on CPU (``backends/cpu.py``; the plan, the side data and
their life cycle are shared, ``backends/common.py``):

* The KV write is vLLM's (``do_kv_cache_update``, inherited); prefill/extend rows and short
  decode rows run on vLLM's ``unified_attention``, through metadata the builder makes for
  that subset.
* The builder plans once per step (:class:`~prescore_backend.backends.common.PrescorePlan`,
  moved to the GPU in ``build``), including the host-side numbers the kernels' launch needs
  (sparse rows, largest budget and query cap), so ``forward`` reads no tensor's value for
  the plan itself.
* ``forward`` (once per layer) updates the side data of the keys just written (batched
  torch on the GPU: scoring jobs, PQ codes, per-tile bounds), ranks tiles with the
  query-aware estimate (torch), selects them with one Triton launch
  (:mod:`prescore_backend.kernels.triton_select`) and attends exactly to them with the
  Triton split-K sparse decode (:mod:`prescore_backend.kernels.triton_sparse_decode`).

CUDA graphs: the builder declares ``AttentionCGSupport.NEVER``, so vLLM captures the rest
of the model in piecewise graphs and runs attention eagerly between them (its own
``--compilation-config`` handling; nothing for the user to set). The step's plan is host
data rebuilt every step and host-side numbers (the step's largest budget and query cap) size
the kernels' launches, which a captured graph could not replay. Full-graph
capture needs the plan in persistent device buffers: not done.

What was verified where is in the README's support matrix: this file runs in the test suite
on CPU tensors under the Triton interpreter (``tests/test_cuda_backend.py``, against
``TritonAttentionImpl`` at full budget and the plain-torch oracles when sparse);
``bench/kernels/gpu_check.sh`` runs the same tests on a GPU.

Unsupported (fail loudly at start): sliding window, ALiBi, logits soft-cap, attention sinks,
quantized KV cache, chunked-lookback attention, KV-cache sharing between layers, prefix-LM
multimodal ranges. Encoder and cross attention layers run vLLM's Triton attention unchanged.

Known costs, not yet addressed: the side data is allocated beside the cache after vLLM has
sized it (Quest bounds add 1/16 of the KV bytes, PQ codes 1/64; leave room with
``--gpu-memory-utilization``); the leverage scorer fits a block with one small matmul per
block of the prefix; the builder reads the step's sequence lengths and slots on the host.
Under pipeline parallelism with Model Runner V2 only the last stage sees per-request
controls.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from prescore_backend.backends.common import (
    PrescorePlan,
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
from prescore_backend.selection import scores_and_pick
from prescore_backend.tiers import decode_two_tiers
from prescore_backend.kernels.layouts import vllm_triton_kv_views
from prescore_backend.kernels.sparse_decode import sparse_decode
from prescore_backend.kernels.select import residual_sample, select_tiles

__all__ = ["PrescoreCUDABackend", "PrescoreCUDAImpl", "PrescoreCUDAMetadata",
           "PrescoreCUDAMetadataBuilder"]


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass
class PrescoreCUDAMetadata(TritonAttentionMetadata):
    plan: PrescorePlan | None = None


# ----------------------------------------------------------------------------- builder


class PrescoreCUDAMetadataBuilder(StepPlanner, TritonAttentionMetadataBuilder):
    # The plan is host data rebuilt each step: attention runs eagerly between piecewise
    # CUDA graphs (see the module docstring).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    # A speculative draft step must get a fresh plan (Triton's in-place update is a no-op).
    supports_draft_decode_metadata_update = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.init_planner(block_size=self.block_size, num_kv_heads=self.num_heads_kv,
                          head_dim=self.headdim, kv_bytes=kv_cache_spec.dtype.itemsize,
                          layer_names=layer_names)
        from prescore_backend.kernels.triton_select import MAX_TILES

        max_len = vllm_config.model_config.max_model_len
        if -(-max_len // self.config.tile_size) > MAX_TILES:  # refused now, not mid-serving
            raise ValueError(
                f"--attention-backend prescore on GPUs selects among at most {MAX_TILES} tiles "
                f"per sequence: --max-model-len {max_len} needs tiles of at least "
                f"{-(-max_len // MAX_TILES)} tokens (--prescore-tile-size / "
                "PRESCORE_TILE_SIZE), or a smaller --max-model-len")
        runtime().stats.to(device)  # layers add their counts on the GPU, flushed per step
        # Decode rows first: the dense subset is then mostly one contiguous prefill run.
        self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        self.start_step()
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        fields = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)}
        plan = self.plan_step(common_attn_metadata).to(self.device)
        return PrescoreCUDAMetadata(**fields, plan=plan)

    def _dense_subset(self, cm, rows: Tensor, query_lens: Tensor, first_tok: Tensor):
        """Token indices ``[Nd]`` and Triton metadata of the rows served exactly: vLLM's own
        build on the subset of the step's common metadata."""
        ql = query_lens[rows]  # [Rd]
        tok = torch.cat([torch.arange(int(f), int(f) + int(n)) for f, n in
                         zip(first_tok[rows].tolist(), ql.tolist())])  # [Nd]
        qsl = torch.zeros(rows.numel() + 1, dtype=torch.int32)
        torch.cumsum(ql, 0, out=qsl[1:])
        dev = cm.seq_lens.device
        rows_d, tok_d = rows.to(dev), tok.to(dev)
        seq_lens = cm.seq_lens[rows_d]
        sub = dataclasses.replace(
            cm, query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq_lens,
            num_reqs=int(rows.numel()), num_actual_tokens=int(tok.numel()),
            max_query_len=int(ql.max()), max_seq_len=int(seq_lens.max()),
            block_table_tensor=cm.block_table_tensor[rows_d], slot_mapping=cm.slot_mapping[tok_d],
            logits_indices_padded=None, num_logits_indices=None, max_logits_per_req=None,
            positions=None, is_prefilling=None, seq_lens_cpu_upper_bound=None, req_idx=None,
            mm_req_doc_ranges=None)
        return tok_d, TritonAttentionMetadataBuilder.build(self, 0, sub)


# ----------------------------------------------------------------------------- backend


class PrescoreCUDABackend(TritonAttentionBackend):
    """vLLM's Triton attention with pre-scoring at prefill and sparse decode."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "PRESCORE"

    @staticmethod
    def get_impl_cls() -> type["PrescoreCUDAImpl"]:
        return PrescoreCUDAImpl

    @staticmethod
    def get_builder_cls() -> type["PrescoreCUDAMetadataBuilder"]:
        return PrescoreCUDAMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_rswa(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False  # the dense subset's metadata does not carry prefix-LM ranges


# ----------------------------------------------------------------------------- impl


class PrescoreCUDAImpl(SideDataUpkeep, TritonAttentionImpl):
    side_impl = "torch"  # the same torch code on CUDA tensors and, in tests, on CPU ones

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, use_alibi_sqrt=False,
                 chunk_lookback=-1) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                         sinks, use_alibi_sqrt, chunk_lookback)
        refuse_unsupported(attn_type, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                           logits_soft_cap=logits_soft_cap, sinks=sinks,
                           kv_cache_dtype=kv_cache_dtype,
                           kv_sharing_target_layer_name=kv_sharing_target_layer_name,
                           **{"chunked-lookback attention": chunk_lookback != -1})
        self.rt = runtime()
        self.side: SideData | None = None
        logger.info_once("Using PRESCORE attention backend (Triton sparse decode; attention "
                         "runs between piecewise CUDA graphs)")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        plan = getattr(attn_metadata, "plan", None)
        if plan is None or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("prescore: fused output quantization is not supported")
        try:
            return self._forward(layer, query, key, value, kv_cache, attn_metadata, plan, output)
        finally:
            self.end_layer()

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, plan: PrescorePlan,
                 output):
        side = self.side_for(kv_cache, layer)
        key_cache, value_cache = vllm_triton_kv_views(kv_cache, self.head_size)  # [NB,Hkv,B,D]
        self.update_side_data(plan, key, key_cache, value_cache, side, "strided")
        if plan.num_sparse == 0:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if plan.dense_tok is not None:
            q_dense = query[plan.dense_tok]  # [Nd, Hq, D]
            out_dense = torch.empty_like(q_dense)
            super().forward(layer, q_dense, key, value, kv_cache, plan.dense_md, out_dense)
            output.index_copy_(0, plan.dense_tok, out_dense.to(output.dtype))
        self._sparse_decode(plan, query, key_cache, value_cache, side, output)
        return output

    def _sparse_decode(self, plan: PrescorePlan, query: Tensor, key_cache: Tensor,
                       value_cache: Tensor, side: SideData, output: Tensor) -> None:
        cfg = self.rt.config
        q = query[plan.sparse_tok]  # [Rs, Hq, D]
        if cfg.uses_low_tier:  # two precision tiers: the ranking, pick and both decodes in Triton
            out, read, sel = decode_two_tiers(
                cfg, q, key_cache, value_cache, side, plan.sparse_bt64, plan.sparse_seq_lens,
                plan.num_tiles, plan.budget, plan.tier_budget, self.scale, impl="triton",
                num_slots=plan.max_budget, low_slots=plan.max_low)
            output.index_copy_(0, plan.sparse_tok, out.to(output.dtype))
            self.rt.stats.decode_counts.add_(torch.cat([read.sum().round().long().view(1),
                                                        sel.source_counts]))
            return
        lsh = lsh_for(self.head_size).to(q.device) if cfg.uses_lsh else None
        scores, pick = scores_and_pick(cfg, q, side, plan.sparse_bt64, plan.num_tiles,
                                       plan.query_caps, lsh=lsh, impl="triton",
                                       key_cache=key_cache, kv_layout="strided",
                                       max_cap=plan.max_cap, caps_uniform=plan.caps_uniform)
        sel = select_tiles(scores, plan.num_tiles, plan.budget, sink_tiles=cfg.sink_tiles,
                           window_tiles=cfg.window_tiles, lsh_match=pick,
                           lsh_cap=plan.max_cap if pick is not None else 0, impl="triton",
                           num_slots=plan.max_budget)
        res_tiles = res_w = None
        if cfg.residual_tiles > 0:  # HyperAttention's residual sample
            res_tiles, res_w = residual_within_budget(plan, *residual_sample(
                sel.tiles, plan.num_tiles, cfg.residual_tiles, generator=self.rt.generator))
        out, _ = sparse_decode(q, key_cache, value_cache, plan.sparse_block_table,
                               plan.sparse_seq_lens, sel.tiles, cfg.tile_size, self.scale,
                               impl="triton", residual_tiles=res_tiles, residual_weight=res_w)
        output.index_copy_(0, plan.sparse_tok, out.to(output.dtype))
        self.rt.stats.decode_counts.add_(torch.cat([
            read_tokens(sel.tiles, res_tiles, plan.sparse_seq_lens, cfg.tile_size),
            sel.source_counts]))


def _budget_side_data() -> None:
    """The GPU worker reports KV + side data within vLLM's KV-cache budget (memory.py)."""
    from vllm.v1.worker.gpu_worker import Worker

    patch_worker(Worker)


_budget_side_data()  # imported in the worker when the model's layers get this backend
