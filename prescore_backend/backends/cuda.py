"""PRESCORE on vLLM's Triton backend (CUDA GPUs): metadata -> builder -> backend -> impl.

Status: the backend registers, validates its configuration and is selected on CUDA platforms,
and serves with vLLM's exact Triton attention. The sparse decode on GPU is not wired in yet:
``prescore_backend.kernels.triton_sparse_decode`` (flash-decoding splits) and
``prescore_backend.kernels.triton_select`` (sync-free, graph-capturable selection) are tested
under the Triton interpreter and were validated and timed on an H100 (``docs/results/gpu/``),
but the per-step plan must live in persistent buffers filled in ``build()`` (CUDA graphs replay
``forward`` without running its Python), the prefill must write the side data, and this project
has no CUDA build of vLLM to test that against. Until then every layer logs, once, that it runs exact attention:
nothing is silently approximated or silently skipped.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from prescore_backend.config import PrescoreConfig

logger = logging.getLogger("vllm.prescore")


class PrescoreCUDAMetadata(TritonAttentionMetadata):
    """Same as Triton's until the GPU sparse plan lands."""


class PrescoreCUDAMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.config = PrescoreConfig.from_env()  # validated: bad settings stop the start
        if kv_cache_spec.block_size % self.config.tile_size:
            raise ValueError(
                f"prescore tile_size={self.config.tile_size} must divide the KV block size "
                f"{kv_cache_spec.block_size} (PRESCORE_TILE_SIZE / --prescore-tile-size)")


class PrescoreCUDABackend(TritonAttentionBackend):
    """PRESCORE on CUDA: Triton attention; refuses what the sparse path will not support."""

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


class PrescoreCUDAImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        logger.warning("Using PRESCORE attention backend (CUDA): sparse decode is not wired "
                       "into the CUDA backend yet; this layer runs vLLM's exact Triton attention")
