"""The side data inside vLLM's KV-cache memory budget.

vLLM sizes the KV cache from the bytes a worker reports (``determine_available_memory``: the
explicit ``--kv-cache-memory-bytes`` / ``VLLM_CPU_KVCACHE_SPACE``, or what profiling leaves of
``--gpu-memory-utilization`` on a GPU). prescore keeps side data per physical KV block (the
4-bit key copy, pre-scores, the two tiers' low-bit copy, ...), allocated beside the cache at
the first forward. So the worker of a PRESCORE engine reports that budget times
KV / (KV + side data) per token: the cache gets fewer blocks, and the KV cache and the side
data together stay within what the user set. The split is logged at start.
"""

from __future__ import annotations

import functools
import logging

import torch

from prescore_backend.config import PrescoreConfig
from prescore_backend.side_data import SideData

logger = logging.getLogger("vllm.prescore")

_PATCHED = "_prescore_side_data_budget"


def side_bytes_per_token(cfg: PrescoreConfig, num_kv_heads: int, head_dim: int,
                         block_size: int, dtype: torch.dtype) -> float:
    """Side data bytes per token and layer under ``cfg`` (sized on the meta device)."""
    side = SideData.for_config(cfg, 1, num_kv_heads, head_dim, block_size, dtype,
                               device="meta")
    return side.bytes_per_token(block_size)


def kv_and_side_per_token(vllm_config, cfg: PrescoreConfig) -> tuple[float, float]:
    """(KV bytes, side data bytes) per token and attention layer on this rank."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    hkv = mc.get_num_kv_heads(vllm_config.parallel_config)
    d = mc.get_head_size()
    dtype = mc.dtype if cc.cache_dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[cc.cache_dtype]
    kv = 2 * hkv * d * torch.empty((), dtype=dtype).element_size()
    return float(kv), side_bytes_per_token(cfg, hkv, d, cc.block_size, dtype)


def _uses_prescore(vllm_config) -> bool:
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    return getattr(backend, "name", None) == "PRESCORE"


def patch_worker(worker_cls) -> None:
    """Make ``worker_cls.determine_available_memory`` leave room for the side data when the
    engine serves PRESCORE (idempotent)."""
    if getattr(worker_cls, _PATCHED, False):
        return
    original = worker_cls.determine_available_memory

    @functools.wraps(original)
    def determine_available_memory(self) -> int:
        budget = original(self)
        if not _uses_prescore(self.vllm_config):
            return budget
        from prescore_backend.backends.common import runtime

        cfg = runtime().config if runtime.cache_info().currsize else PrescoreConfig.from_env()
        kv, side = kv_and_side_per_token(self.vllm_config, cfg)
        kv_budget = int(budget * kv / (kv + side))
        logger.info("prescore: KV cache budget %.2f GiB = %.2f GiB of KV cache + %.2f GiB of "
                    "side data (%g bytes per token and layer beside %g of KV, +%.1f%%)",
                    budget / 2**30, kv_budget / 2**30, (budget - kv_budget) / 2**30, side, kv,
                    100 * side / kv)
        return kv_budget

    worker_cls.determine_available_memory = determine_available_memory
    setattr(worker_cls, _PATCHED, True)
