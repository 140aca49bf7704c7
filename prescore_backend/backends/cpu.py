"""PRESCORE on vLLM's CPU backend: metadata -> builder -> backend -> impl.

Prefill and the KV write stay on vLLM's exact CPU kernel (CPU_ATTN).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

# A child of vLLM's logger, so lines show with vLLM's format and level.
logger = logging.getLogger("vllm.prescore")

# vLLM's CPU kernels store K per (block, KV head) in an ISA-specific order. We pin the
# "vec" ISA, whose K tile is K^T ([D, block_size]) and V tile [block_size, D], so that the
# sparse decode can read tiles without knowing AMX's VNNI packing.
_PINNED_ISA = "vec"


@dataclass
class PrescoreCPUMetadata(CPUAttentionMetadata):
    pass


class PrescoreCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.isa not in ("vec", "vec16"):
            self.isa = _PINNED_ISA
            self._set_isa_to_layers(layer_names)


class PrescoreCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "PRESCORE"

    @staticmethod
    def get_impl_cls() -> type["PrescoreCPUImpl"]:
        return PrescoreCPUImpl

    @staticmethod
    def get_builder_cls() -> type["PrescoreCPUMetadataBuilder"]:
        return PrescoreCPUMetadataBuilder


class PrescoreCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        logger.info("Using PRESCORE attention backend (CPU)")
