"""What this CPU can do: model name, vector ISA and native bf16, read in one place.

The project runs on Intel Xeons with AVX-512 and AMX, on AMD EPYCs with AVX-512 (and
``avx512_bf16``) but no AMX, and on AMD EPYCs with AVX2 only (no AVX-512, no native bf16).
Defaults that depend on the host (the serving dtype, which of vLLM's cache layouts exists,
which benchmark columns can run) and every timing's label come from here.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["cpu_model", "cpu_flags", "isa", "has_amx", "has_native_bf16", "describe"]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
            if model and flags:
                break
    except OSError:  # not Linux: fall back to what torch and platform know
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC 7B13``."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The kernel's CPU feature flags (empty where ``/proc/cpuinfo`` is missing)."""
    return _cpuinfo()[1]


def has_amx() -> bool:
    """AMX tiles with bf16 (vLLM's "amx" CPU attention and cache layout exist only there)."""
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


def has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (``avx512_bf16`` or AMX): vLLM's oneDNN bf16 matmuls run
    there; elsewhere bf16 linear layers take a slow fallback and fp32 is the better default."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or has_amx())


def isa() -> str:
    """The widest vector ISA: ``"AMX"``, ``"AVX-512"``, ``"AVX2"`` or the architecture name."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return platform.machine()
    if has_amx():
        return "AMX"
    import torch

    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT"
    return {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(cap, cap)


def describe() -> str:
    """One line naming the host for tables and logs, e.g.
    ``AMD EPYC 9B45 (AVX-512, native bf16, 2 CPUs)``."""
    import os

    bf16 = "native bf16" if has_native_bf16() else "no native bf16"
    return f"{cpu_model()} ({isa()}, {bf16}, {os.cpu_count()} CPUs)"
