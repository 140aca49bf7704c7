"""Shape checks shared by every sparse-decode implementation (torch, C++, Triton)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_decode_inputs"]


def check_decode_inputs(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                        seq_lens: Tensor, tiles: Tensor,
                        tile_size: int) -> tuple[int, int, int, int, int]:
    """Validate a sparse decode call's shapes; returns (R, Hq, Hkv, D, B)."""
    if query.dim() != 3 or key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("expected query [R, Hq, D] and key/value caches [num_blocks, Hkv, B, D]")
    R, Hq, D = query.shape
    _, Hkv, B, Dk = key_cache.shape
    if Dk != D:
        raise ValueError(f"head dim mismatch: query {D}, cache {Dk}")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads is not a multiple of {Hkv} KV heads")
    if B % tile_size:
        raise ValueError(f"tile size {tile_size} must divide block size {B}")
    if tiles.dim() != 3 or tiles.shape[:2] != (R, Hkv):
        raise ValueError(f"tiles must be [R={R}, Hkv={Hkv}, S], got {tuple(tiles.shape)}")
    if block_tables.shape[0] != R or seq_lens.shape != (R,):
        raise ValueError("block_tables must be [R, max_blocks] and seq_lens [R]")
    return R, Hq, Hkv, D, B
