"""Numerical kernels: cache layouts, LSH, tile selection (:mod:`.select`), sparse paged decode
(:mod:`.sparse_decode`) and both fused (:mod:`.select_decode`); C++ for CPUs (``csrc/``),
Triton for GPUs (imported lazily), each beside a plain-torch ``*_ref`` oracle. "auto"
implementation choice: :mod:`.dispatch`.

Tensors in, tensors out: nothing here imports vLLM or ``prescore_backend``.
"""

from .layouts import rowmajor_cpu_kv_views, vllm_cpu_kv_views, vllm_gpu_kv_views
from .lsh import AngularLSH, bucket_masks, masks_intersect, num_words
from .sparse_decode import (
    expand_kv_heads,
    merge_attn_states,
    sparse_decode,
    sparse_decode_ref,
)

__all__ = [
    "rowmajor_cpu_kv_views",
    "vllm_cpu_kv_views",
    "vllm_gpu_kv_views",
    "AngularLSH",
    "bucket_masks",
    "masks_intersect",
    "num_words",
    "expand_kv_heads",
    "merge_attn_states",
    "sparse_decode",
    "sparse_decode_ref",
]
