"""Triton sparse decode kernel, run on CPU tensors by the Triton interpreter.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own jitted
helpers and our @triton.jit kernel read it when they are defined). It is set here at import;
if triton was already imported in this process without it (e.g. by a module that imports
vLLM), these tests re-run in a fresh subprocess instead. Triton is a test dependency: a missing
triton fails, it does not skip.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

_PRE_IMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (must import: no skip)

tsd = importlib.import_module("prescore_backend.kernels.triton_sparse_decode")

from prescore_backend.kernels import sparse_decode, sparse_decode_ref  # noqa: E402
from prescore_backend.kernels.testing import all_tiles, dense_attention, make_paged_case  # noqa: E402

B, T = 32, 16
HKV = 2
SEQ_LENS = [37, 64, 5]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.fixture(autouse=True)
def _in_process_only(request):
    if _PRE_IMPORTED and request.node.name != "test_in_fresh_process":
        pytest.skip("triton was imported without TRITON_INTERPRET: covered by test_in_fresh_process")


def test_in_fresh_process():
    if not _PRE_IMPORTED:
        return  # the tests below run in this process
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_kernel_is_interpreted():
    assert type(tsd._sparse_decode_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("layout,group,head_dim,dtype", [
    ("cpu", 1, 64, torch.float32),
    ("cpu_rowmajor", 3, 64, torch.float32),
    ("cpu", 3, 128, torch.bfloat16),
    ("gpu", 3, 64, torch.float32),
    ("gpu", 1, 128, torch.bfloat16),
])
def test_triton_all_tiles_is_dense(layout, group, head_dim, dtype):
    case = make_paged_case(SEQ_LENS, HKV, group, head_dim, B, layout=layout, dtype=dtype, seed=head_dim)
    scale = head_dim ** -0.5
    out = torch.full_like(case.query, float("nan"))  # poisoned
    o, lse = tsd.triton_sparse_decode(case.query, case.key_cache, case.value_cache,
                                      case.block_tables, case.seq_lens,
                                      all_tiles(case.seq_lens, HKV, T), T, scale, out=out)
    assert o is out
    for r in range(len(SEQ_LENS)):
        ro, rl = dense_attention(case.query[r], case.keys[r], case.values[r], scale)
        torch.testing.assert_close(o[r].double(), ro, **TOL[dtype])
        torch.testing.assert_close(lse[r].double(), rl, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout,group", [("cpu", 3), ("gpu", 1)])
def test_triton_matches_ref_on_random_selection(layout, group):
    case = make_paged_case(SEQ_LENS, HKV, group, 64, B, layout=layout, seed=5)
    g = torch.Generator().manual_seed(group)
    # Row 1 head 0 selects nothing; -1 padding interleaved; tiles in arbitrary order.
    tiles = torch.tensor([[[2, -1, 0], [1, -1, -1]],
                          [[-1, -1, -1], [3, 0, -1]],
                          [[-1, 0, -1], [-1, -1, -1]]], dtype=torch.int32)
    tiles = tiles[:, :, torch.randperm(3, generator=g)]
    args = (case.query, case.key_cache, case.value_cache, case.block_tables, case.seq_lens, tiles, T, 0.125)
    o, lse = sparse_decode(*args, impl="triton")
    ro, rl = sparse_decode_ref(*args)
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse[fin].double(), rl[fin], atol=1e-4, rtol=1e-5)
    # The torch path agrees too, including the residual merge.
    w = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.5, 1.0]])
    res = torch.tensor([[[1], [0]], [[0], [2]], [[-1], [0]]], dtype=torch.int32)
    ot, lt = sparse_decode(*args, impl="triton", residual_tiles=res, residual_weight=w)
    oc, lc = sparse_decode(*args, impl="torch", residual_tiles=res, residual_weight=w)
    torch.testing.assert_close(ot, oc, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lt, lc, atol=1e-5, rtol=1e-5)
