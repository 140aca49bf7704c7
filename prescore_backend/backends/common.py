"""What the CPU and CUDA backends share: the per-process runtime, the step plan the builder
makes once per step, and the side-data upkeep each layer does before it attends.

Both backends read vLLM's per-layer cache as a logical ``[num_blocks, Hkv, B, 2 * D]`` tensor
(the CPU one in its ISA's packed order, the Triton one with any physical strides), so the side
data, its life cycle and the plan are the same on both; only the dense subset's metadata (each
backend's own kernel) and the decode kernels differ. See ``backends/cpu.py`` for the rules
that keep the side data valid through prefix caching, chunked prefill and preemption.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from prescore_backend.config import PrescoreConfig, testing_exact_via_sparse
from prescore_backend.selection import (
    CHARGE_KV_BYTES,
    config_budget,
    floor_budget,
    query_caps,
    ratio_budgets,
    side_read_fraction,
)
from prescore_backend.side_data import (
    ScoreJob,
    SideData,
    record_codes,
    record_decode_tokens,
    run_score_jobs,
)
from prescore_backend.kernels.lsh import AngularLSH
from prescore_backend.kernels.select import tokens_read
from prescore_backend.metrics import PrescoreStats, get_metrics
from prescore_backend.pq import LayerCodebook, PQCodebooks, resolve_codebooks
from prescore_backend.requests import ROWS
from prescore_backend.scoring import Scorer, get_scorer
from prescore_backend.tiers import tier_budgets

__all__ = ["PrescorePlan", "ScoreJob", "SideData", "SideDataUpkeep", "StepPlanner",
           "refuse_unsupported", "runtime"]

# A child of vLLM's logger, so lines show with vLLM's format and level.
logger = logging.getLogger("vllm.prescore")


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
    num_layers: int = 0  # attention layers run per step: over every KV-cache group's builder
    group_layers: dict = field(default_factory=dict)  # a builder's layer names -> their count
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


def job_scorer(method: str | None) -> Scorer:
    """The scorer of a side-data job: the request's own, or the configured one."""
    return runtime().scorer if method is None else _scorer(method)


def residual_within_budget(plan: "PrescorePlan", tiles: Tensor | None,
                           weight: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """HyperAttention's residual sample ``[Rs, Hkv, m]`` and weight ``[Rs, Hkv]`` kept only on
    the rows whose budget holds it (``plan.residual_rows``): elsewhere no tile (-1), weight 0."""
    if tiles is None or plan.residual_rows is None:
        return tiles, weight
    keep = plan.residual_rows.to(tiles.device)
    return (torch.where(keep.view(-1, 1, 1), tiles, -1),
            torch.where(keep.view(-1, 1), weight, 0.0))


def read_tokens(tiles: Tensor, residual: Tensor | None, seq_lens: Tensor,
                tile_size: int) -> Tensor:
    """KV tokens a sparse decode read, ``[1]`` int64: the selected tiles ``[Rs, Hkv, S]`` and
    HyperAttention's residual sample ``[Rs, Hkv, m]`` (-1 pad; None without one)."""
    n = tokens_read(tiles, seq_lens, tile_size).sum()
    if residual is not None:
        n = n + tokens_read(residual, seq_lens, tile_size).sum()
    return n.view(1)


def lsh_for(head_dim: int) -> AngularLSH:
    rt = runtime()
    if rt.lsh is None:
        rt.lsh = AngularLSH(rt.config.lsh_bits, head_dim, seed=rt.config.seed)
    return rt.lsh


def refuse_unsupported(attn_type: str, *, sliding_window, alibi_slopes, logits_soft_cap,
                       sinks, kv_cache_dtype: str, kv_sharing_target_layer_name,
                       **more: bool) -> None:
    """Stop the start, naming every model feature of a decoder layer the backend cannot serve
    (an impl's constructor arguments; ``more``: backend-specific ones, name -> present)."""
    unsupported = {
        "sliding-window attention": sliding_window is not None,
        "ALiBi": alibi_slopes is not None,
        "logits soft-cap": bool(logits_soft_cap),
        "attention sinks": sinks is not None,
        f"kv cache dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        "KV-cache sharing between layers": kv_sharing_target_layer_name is not None,
        **more,
    }
    found = [name for name, bad in unsupported.items() if bad]
    if found and attn_type == AttentionType.DECODER:
        raise ValueError(
            f"--attention-backend prescore does not support {', '.join(found)}; serve this "
            "model with the default attention backend")


# ----------------------------------------------------------------------------- plan


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
    budget: Tensor  # [Rs] int64 tiles per (row, KV head) (with two tiers: the exact tier's)
    query_caps: Tensor  # [Rs] int64 query-aware tiles per (row, KV head) at most
    # Exact rows served by the backend's own kernel when sparse rows exist (None: all rows
    # are sparse), with that kernel's metadata for them.
    dense_tok: Tensor | None  # [Nd] int64
    dense_md: object | None
    # Per-token side data of decode tokens written this step.
    dec_tok: Tensor  # [Nk] int64 token index
    dec_block: Tensor  # [Nk] int64 physical block
    dec_tile: Tensor  # [Nk] int64 tile within the block
    dec_reset: Tensor  # [Nk] bool: the token starts its tile
    score_jobs: list[ScoreJob]
    # Every token written this step (query_aware="pq" codes them), else None.
    write_block: Tensor | None = None  # [N] int64 physical block
    write_off: Tensor | None = None  # [N] int64 offset in the block
    write_tok: Tensor | None = None  # [N] int64 their tokens, None: the step's first N
    # Host-side facts of the step, so forward never reads a device tensor's value.
    num_sparse: int = 0
    max_budget: int = 0  # the largest min(budget, num_tiles) of the sparse rows
    max_cap: int = 0  # the largest query cap of the sparse rows
    caps_uniform: bool = True  # every sparse row has that cap
    rank_channels: int = 8  # key channels of the SparQ rankings (config.ranking_channels)
    # the decode tokens' per-token side data changes something this step: a token starts a
    # tile (its pre-score becomes -inf until the block is scored), or LSH bucket sets or
    # Quest bounds are kept per token; else the upkeep is skipped (15 of 16 decode steps with
    # the default, which keeps neither)
    dec_upkeep: bool = True
    # two precision tiers: exact + low-bit tiles per (row, KV head), [Rs] int64; else None
    tier_budget: Tensor | None = None
    max_low: int = 0  # the largest tier_budget - budget of the sparse rows (low-bit slots)
    # residual_tiles > 0: the sparse rows whose budget holds the residual sample beside sinks
    # and window ([Rs] bool; the others read none), else None
    residual_rows: Tensor | None = None

    def to(self, device: torch.device) -> "PrescorePlan":
        """The plan with every tensor a layer reads on ``device`` (once per step, in build)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                setattr(self, f.name, v.to(device, non_blocking=True))
        for job in self.score_jobs:
            job.block_ids = job.block_ids.to(device, non_blocking=True)
        return self


class StepPlanner:
    """Mixin of a backend's metadata builder: the step's plan (:meth:`plan_step`).

    The builder calls :meth:`init_planner` in its ``__init__`` and implements
    :meth:`_dense_subset` (its own kernel's metadata for the rows served exactly).
    """

    def init_planner(self, *, block_size: int, num_kv_heads: int, head_dim: int,
                     kv_bytes: int, layer_names: list[str]) -> None:
        rt = runtime()
        self.config = rt.config
        self.exact_via_sparse = rt.exact_via_sparse  # tests only
        # one builder per KV-cache group: the step's last layer is the last of all groups
        rt.group_layers[tuple(layer_names)] = len(layer_names)
        rt.num_layers = sum(rt.group_layers.values())
        self.planner_block_size = block_size
        self.planner_kv_heads = num_kv_heads
        self.planner_head_dim = head_dim
        # what the selection reads besides the tiles, per KV byte: counted in the cache's
        # dtype, and taken out of keep_ratio's budget charged against a bf16 KV (as the
        # evaluation counts it, the same tiles on every host)
        self.side_fraction = side_read_fraction(self.config, head_dim, kv_bytes, block_size)
        self.budget_side = side_read_fraction(self.config, head_dim, CHARGE_KV_BYTES, block_size)
        self.rank_channels = self.config.ranking_channels(head_dim)
        if block_size % self.config.tile_size:
            raise ValueError(
                f"prescore tile_size={self.config.tile_size} must divide the KV block size "
                f"{block_size} (PRESCORE_TILE_SIZE / --prescore-tile-size, or --block-size)")
        if self.config.window_tokens < block_size + self.config.tile_size:
            raise ValueError(
                f"prescore window_tokens={self.config.window_tokens} must be at least the KV "
                f"block size plus one tile ({block_size + self.config.tile_size}): set "
                "PRESCORE_WINDOW_TOKENS / --prescore-window-tokens, or a smaller --block-size")

    def start_step(self) -> None:
        rt = runtime()
        rt.stats.flush()  # anything a partial step left (normally flushed by the last layer)
        rt.layers_done = 0

    def _dense_subset(self, cm, rows: Tensor, query_lens: Tensor,
                      first_tok: Tensor) -> tuple[Tensor, object]:
        """Token indices ``[Nd]`` int64 and the backend kernel's metadata of the exact rows."""
        raise NotImplementedError

    def plan_step(self, cm) -> PrescorePlan:
        cfg, T, B = self.config, self.config.tile_size, self.planner_block_size
        qsl = cm.query_start_loc_cpu  # [R + 1]
        num_reqs = cm.num_reqs
        seq_lens = cm.seq_lens[:num_reqs].to("cpu", torch.int64)  # [R]
        query_lens = (qsl[1:] - qsl[:-1]).to(torch.int64)  # [R]
        # A decode row generates: one query token and the prompt already computed. A row with
        # one query token may also be a prompt's chunk (a prefix-cache hit recomputes only
        # the prompt's last token; a chunk budget can leave one token): such prompt tokens
        # stay exact, or the same prompt would give other K/V with and without a cache hit.
        # vLLM's runners mark those rows (num_computed_tokens < num_prompt_tokens).
        is_decode = query_lens == 1  # [R]
        prefilling = getattr(cm, "is_prefilling", None)
        if prefilling is not None:
            is_decode &= ~prefilling[:num_reqs].to("cpu", torch.bool)
        first_tok = qsl[:-1].to(torch.int64)  # [R]
        slots = cm.slot_mapping[: cm.num_actual_tokens].to("cpu", torch.int64)  # [N]
        written = slots >= 0  # padded tokens (CUDA-graph capture, dummy runs) write nothing
        block_table = cm.block_table_tensor[:num_reqs]  # [R, max_blocks]

        num_tiles = (seq_lens + T - 1) // T  # [R]
        controls = ROWS.for_batch(num_reqs, getattr(cm, "req_idx", None))
        budget, ranks, forced_dense = self._budgets(num_tiles, num_reqs, controls)
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

        # Per-token side data of every decode token (prefill tokens get theirs from their
        # scoring job).
        dec_tok = first_tok[is_decode]
        dec_tok = dec_tok[written[dec_tok]]
        dec_slot = slots[dec_tok]
        dec_off = dec_slot % B
        dec_reset = dec_off % T == 0
        dec_upkeep = bool(dec_tok.numel()) and (cfg.uses_lsh or cfg.uses_bounds
                                                 or bool(dec_reset.any()))

        # Side-data jobs: every prefill/extend chunk, and decode rows that just filled a block.
        jobs: list[ScoreJob] = []
        job_rows = ((~is_decode) | (seq_lens % B == 0)).nonzero().flatten().tolist()
        if job_rows:
            sl_list, ql_list = seq_lens.tolist(), query_lens.tolist()
            dec_list = is_decode.tolist()
            for r in job_rows:  # a few rows per step, never on the per-layer path
                s, first = sl_list[r], sl_list[r] - ql_list[r]
                ctl = controls.get(r)
                jobs.append(ScoreJob(block_ids=block_table[r, :(s + B - 1) // B].to(torch.int64),
                                     seq_len=s, first_pos=first, per_token=not dec_list[r],
                                     blocks_done=(first // B, s // B),
                                     method=ctl.method if ctl is not None else None))

        sp_budget, sp_ranks = budget[sparse_rows], ranks[sparse_rows]
        sp_lens, sp_tiles = seq_lens[sparse_rows], num_tiles[sparse_rows]
        residual_rows = None
        if cfg.residual_tiles > 0:  # HyperAttention's residual sample, read within the budget
            residual_rows = sp_budget - cfg.residual_tiles >= cfg.sink_tiles + cfg.window_tiles
            sp_budget = torch.where(residual_rows, sp_budget - cfg.residual_tiles, sp_budget)
        # the selection's own reads, in KV tokens (rows whose budget covers the context have
        # nothing to choose, and rows that skip the ranking read none: not charged)
        side_tokens = (sp_lens[(sp_budget < sp_tiles) & sp_ranks].double()
                       * self.side_fraction).round().long().sum()
        num_sparse = int(sparse_rows.numel())
        # The block table's columns the sparse rows need (rounded up to a power of two, so
        # the tile-slot count M takes few values), not max_model_len's: every per-tile
        # tensor of the selection is [Rs, Hkv, M].
        cols = block_table.shape[1]
        if num_sparse:
            need = -(-int(sp_lens.max()) // B)
            cols = min(cols, 1 << (need - 1).bit_length())
        sp_bt = block_table[sparse_rows, :cols]
        caps = torch.where(sp_ranks, query_caps(cfg, sp_budget), 0)  # 0: the ranking skipped
        tier_budget = None
        if cfg.uses_low_tier:  # the budget's bytes split between exact and low-bit tiles
            sp_budget, tier_budget = tier_budgets(cfg, sp_budget, sp_tiles,
                                                  self.planner_head_dim, B)
        return PrescorePlan(
            sparse_tok=first_tok[sparse_rows],
            sparse_seq_lens=sp_lens.to(torch.int32),
            sparse_block_table=sp_bt,
            sparse_bt64=sp_bt.long(),
            num_tiles=sp_tiles,
            layer_counts=torch.stack([sp_lens.long().sum() * self.planner_kv_heads,
                                      torch.tensor(num_sparse),
                                      (is_decode & ~sparse).sum(),
                                      side_tokens * self.planner_kv_heads]),
            budget=sp_budget,
            query_caps=caps,
            dense_tok=dense_tok,
            dense_md=dense_md,
            dec_tok=dec_tok,
            dec_block=dec_slot // B,
            dec_tile=dec_off // T,
            dec_reset=dec_reset,
            dec_upkeep=dec_upkeep,
            score_jobs=jobs,
            write_block=slots[written] // B if cfg.uses_codes else None,
            write_off=slots[written] % B if cfg.uses_codes else None,
            write_tok=(None if not cfg.uses_codes or bool(written.all())
                       else written.nonzero().flatten()),
            num_sparse=num_sparse,
            max_budget=int(torch.minimum(sp_budget, sp_tiles).max()) if num_sparse else 0,
            max_cap=int(caps.max()) if num_sparse else 0,
            caps_uniform=bool((caps == caps.max()).all()) if num_sparse else True,
            tier_budget=tier_budget,
            max_low=(int((tier_budget - sp_budget).clamp_min(0).max())
                     if tier_budget is not None and num_sparse else 0),
            residual_rows=residual_rows,
            rank_channels=self.rank_channels,
        )

    def _budgets(self, num_tiles: Tensor, num_reqs: int,
                 controls: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """Tiles per row ``[R]``, whether each row ranks (``selection.ratio_budgets``) and
        the rows that asked for exact decode (None: no controls), honouring per-request
        controls (batch row -> controls, only the rows that sent some)."""
        cfg, T = self.config, self.config.tile_size
        ratios = torch.full((num_reqs,), cfg.keep_ratio, dtype=torch.float64)
        own_ratio = torch.zeros(num_reqs, dtype=torch.bool)
        fixed: dict[int, int] = {}  # row -> tiles of a request's absolute budget
        dense = torch.zeros(num_reqs, dtype=torch.bool) if controls else None
        streaming: list[int] = []  # rows that asked for StreamingLLM's selection
        for r, c in controls.items():
            if c.max_tokens is not None:
                fixed[r] = -(-c.max_tokens // T)
            elif c.keep_ratio is not None:
                ratios[r], own_ratio[r] = c.keep_ratio, True
            dense[r] = c.dense
            if c.streaming:
                streaming.append(r)
        budget, ranks = ratio_budgets(cfg, num_tiles, ratios, self.budget_side)
        if cfg.max_tokens > 0:  # an absolute budget, but for rows that sent a keep ratio
            budget = torch.where(own_ratio, budget, config_budget(cfg, num_tiles))
            ranks |= ~own_ratio
        for r, tiles in fixed.items():
            budget[r], ranks[r] = tiles, True
        for r in streaming:  # no side data read: the whole budget buys tiles
            ranks[r] = False
            if r not in fixed and (cfg.max_tokens <= 0 or own_ratio[r]):
                budget[r] = int(torch.ceil(num_tiles[r].double() * ratios[r]))
        return budget, ranks, dense


# ----------------------------------------------------------------------------- side data


class SideDataUpkeep:
    """Mixin of a backend's attention impl: the layer's side data, allocated on first use
    beside the KV cache, and what each step writes into it (:meth:`update_side_data`).

    Needs ``self.rt`` (:func:`runtime`), ``self.num_kv_heads``, ``self.head_size`` and
    ``self.side`` (None until the first step)."""

    #: implementation of the per-token side-data writes ("auto": C++ on CPU when it compiles)
    side_impl = "auto"

    def side_for(self, kv_cache: Tensor, layer) -> SideData:
        """The layer's side data; kv_cache ``[NB, Hkv, B, 2 * D]`` (logical shape). Made again
        when the cache is another tensor (vLLM's GPU worker profiles CUDA-graph memory on a
        small cache it then frees, before it allocates the real one)."""
        key = (kv_cache.data_ptr(), kv_cache.shape[0], kv_cache.device)
        if self.side is None or getattr(self, "_side_cache", None) != key:
            self._side_cache = key
            cfg = self.rt.config
            nb, _, bs, _ = kv_cache.shape
            books = None
            if cfg.uses_codes:
                books = self._rank_codebook(layer).to(kv_cache.device)
            self.side = SideData.for_config(cfg, nb, self.num_kv_heads, self.head_size, bs,
                                            kv_cache.dtype, codebook=books,
                                            device=kv_cache.device)
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
        if not plan.dec_upkeep:
            return
        cfg = self.rt.config
        record_decode_tokens(side, key[plan.dec_tok], plan.dec_block, plan.dec_tile,
                             plan.dec_reset, lsh=lsh_for(self.head_size) if cfg.uses_lsh else None,
                             lsh_bits=cfg.lsh_bits, impl=self.side_impl)

    def _run_score_jobs(self, plan: PrescorePlan, key_cache: Tensor, value_cache: Tensor,
                        side: SideData, kv_layout: str) -> None:
        cfg = self.rt.config
        run_score_jobs(side, plan.score_jobs, key_cache, scorer_for=job_scorer,
                       tile_size=cfg.tile_size, aggregate=cfg.aggregate,
                       lsh=lsh_for(self.head_size) if cfg.uses_lsh else None,
                       lsh_bits=cfg.lsh_bits, kv_layout=kv_layout, value_cache=value_cache,
                       scores=cfg.reads_prescores)

    def update_side_data(self, plan: PrescorePlan, key: Tensor, key_cache: Tensor,
                         value_cache: Tensor, side: SideData, kv_layout: str) -> None:
        """Side data of the keys written this step (key ``[N, Hkv, D]``, already in the
        cache ``key_cache`` / ``value_cache`` ``[NB, Hkv, B, D]``), and this layer's
        counters."""
        stats = self.rt.stats
        t0 = time.perf_counter()
        self._record_decode_tokens(plan, key, side)
        if plan.write_block is not None:  # PQ codes of every key written this step
            keys = (key[: plan.write_block.numel()] if plan.write_tok is None
                    else key[plan.write_tok])
            record_codes(side, keys, plan.write_block, plan.write_off, impl=self.side_impl)
        if plan.score_jobs:
            self._run_score_jobs(plan, key_cache, value_cache, side, kv_layout)
            stats.scoring_s += time.perf_counter() - t0
        stats.layer_counts.add_(plan.layer_counts)  # one op: built per step by the builder

    def end_layer(self) -> None:
        """Count the layer done; the step's last layer sends the counters out."""
        rt = self.rt
        rt.layers_done += 1
        if rt.layers_done == rt.num_layers:
            rt.stats.flush()
