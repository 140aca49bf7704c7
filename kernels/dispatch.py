"""One rule for ``impl="auto"``: which implementation of an op runs, decided once per process.

Every op that has several implementations keeps a small table from implementation name to
function and resolves its ``impl`` argument here: "auto" is "triton" for CUDA tensors and, on
CPU, "cpp" when the C++ kernels compile and load on this machine (checked once per process),
else "torch". An op without the automatic choice in its table falls back to its "torch" entry.
"""

from __future__ import annotations

import functools
import logging
from typing import Mapping, TypeVar

from torch import Tensor

from .cpu_ext import extension

__all__ = ["auto_impl", "cpu_kernels_available", "resolve"]

logger = logging.getLogger(__name__)

F = TypeVar("F")


@functools.lru_cache(maxsize=1)
def cpu_kernels_available() -> bool:
    """Compile (once per machine, cached by torch) and report whether the C++ kernels load."""
    try:
        extension()
        return True
    except Exception as e:  # no compiler, no headers: the torch paths still work
        logger.warning("prescore: C++ CPU kernels unavailable (%s); using the torch paths", e)
        return False


def auto_impl(x: Tensor) -> str:
    """The implementation "auto" means for tensors like ``x``: "triton" on CUDA, else "cpp"
    when :func:`cpu_kernels_available`, else "torch"."""
    if x.is_cuda:
        return "triton"
    return "cpp" if cpu_kernels_available() else "torch"


def resolve(op: str, impl: str, x: Tensor, table: Mapping[str, F]) -> tuple[str, F]:
    """``(name, function)`` of ``impl`` in ``op``'s ``table``; "auto" by :func:`auto_impl`
    (the table's "torch" entry where the automatic choice is not in it). Unknown names raise
    a ValueError that lists the valid ones."""
    if impl == "auto":
        impl = auto_impl(x)
        if impl not in table:
            impl = "torch"
    try:
        return impl, table[impl]
    except KeyError:
        raise ValueError(f"{op}: unknown impl {impl!r}; valid: auto, "
                         f"{', '.join(sorted(table))}") from None
