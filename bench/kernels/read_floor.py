"""Memory floor of a sparse decode step: read the selected tiles' bytes and nothing else.

``read_selected_amx`` loads every 64-byte line of K and V that the sparse kernel reads for a
selection (the same 16-token chunks, clipped at seq_len, in the same order) from a cache in
vLLM's CPU "amx" layout, with the kernel's prefetch schedule (each line of the next chunk
prefetched beside a load of the current one; the first two lines of every run six chunks ahead
touched into L2 to start the hardware streamer), and sums the lines so no load is elided. No
q.k, softmax or p.v. ``read_all_amx`` is the same for every block of every row, in block-table
order (the bytes vLLM's exact op reads). Timed beside vLLM's op and the sparse call in one run
(``bench_sparse_decode.py --floor-column``), vLLM's time over the floor is the speedup that no
kernel reading those bytes on this host could pass at that moment. ``bench/kernels/read_probe.c`` is
the standalone C version with other prefetch schedules (none was faster).

Bench-only (not part of the package): ``bench/kernels/read_floor.cpp``, compiled on first use with
torch's JIT extension loader.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

_CPP = Path(__file__).resolve().with_suffix(".cpp")

_MOD = None


def _mod():
    global _MOD
    if _MOD is None:
        import hashlib

        from torch.utils.cpp_extension import load

        from prescore_backend.kernels.host import cpu_flags, cpu_model

        # -march=native: the name keys the source and the host CPU (a shared cache never
        # serves another CPU's build)
        key = hashlib.sha256(_CPP.read_bytes() + cpu_model().encode()
                             + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
        _MOD = load(name=f"prescore_bench_read_floor_{key}", sources=[str(_CPP)],
                    extra_cflags=["-O3", "-march=native"])
    return _MOD


def available() -> bool:
    """Whether the floor readers build here (x86-64 with AVX-512)."""
    if not torch.cpu._is_avx512_supported():  # the source is AVX-512: don't try to compile
        return False
    try:
        _mod()
        return True
    except Exception:  # noqa: BLE001 - no compiler, no AVX-512: the bench skips the columns
        return False


def read_selected_amx(k: Tensor, v: Tensor, block_table: Tensor, seq_lens: Tensor,
                      tiles: Tensor, tile_size: int) -> float:
    """Read the selected tiles' K and V lines. k, v ``[NB, Hkv, B, D]`` bf16 "amx" views,
    block_table ``[R, nblk]`` int32, seq_lens ``[R]`` int32, tiles ``[R, Hkv, S]`` int32 (-1
    pad) -> a checksum (float)."""
    return _mod().read_selected_amx(k, v, block_table, seq_lens, tiles, tile_size)


def read_all_amx(k: Tensor, v: Tensor, block_table: Tensor, seq_lens: Tensor) -> float:
    """Read every K and V line of every row's blocks up to seq_len (whole blocks) -> checksum."""
    return _mod().read_all_amx(k, v, block_table, seq_lens)


if __name__ == "__main__":  # smoke check: both readers see the same bytes for a full selection
    from prescore_backend.kernels.layouts import vllm_cpu_amx_kv_views
    cache = torch.randint(-1000, 1000, (5, 2, 32, 64), dtype=torch.int16).view(torch.bfloat16)
    kc, vc = vllm_cpu_amx_kv_views(cache)
    bt = torch.tensor([[3, 1]], dtype=torch.int32)
    sl = torch.tensor([64], dtype=torch.int32)
    allt = torch.arange(4, dtype=torch.int32).view(1, 1, 4).expand(1, 2, 4).contiguous()
    a, b = read_selected_amx(kc, vc, bt, sl, allt, 16), read_all_amx(kc, vc, bt, sl)
    print(a, b)
    assert a == b, (a, b)
