#!/usr/bin/env bash
# GPU check of the Triton path, one command, every result under one folder (~5 min on an H100):
#   bash bench/kernels/gpu_check.sh [OUT_DIR]        (default bench/out/gpu_check)
# 1. the Triton kernel tests compiled for the GPU (selection and sparse decode vs *_ref);
# 2. the CUDA backend tests (builder, side data, sparse path vs vLLM's TritonAttentionImpl and
#    the oracles) on CUDA tensors - when vLLM with CUDA is installed, else said so in the log;
# 3. the kernels' correctness sweep against a float64 oracle;
# 4. the kernel benchmark (GPU times replayed from captured CUDA graphs of the selection and
#    sparse decode of one step, the default step with its ranking, and the two-tier step;
#    eager times beside them; the default step's temporaries), then the target cell (32k,
#    batch 16, keep 1/8, Llama-3-8B and Qwen2.5-0.5B shapes).
# The package is imported from this checkout; where it is not installed, it is installed into
# a scratch folder without dependencies (torch and triton must be there). Exit status: the
# number of parts that failed. ``--list`` prints the parts' commands and runs nothing.
set -uo pipefail
cd "$(dirname "$0")/../.."
LIST=""
if [ "${1:-}" = "--list" ]; then LIST=1; shift; fi
OUT=${1:-bench/out/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PRESCORE_TRITON_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
if [ -z "$LIST" ] && ! "$PY" -c "import prescore_backend.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/prescore-site . \
        > "$OUT/install.log" 2>&1 || { echo "install failed: $OUT/install.log"; exit 9; }
    export PYTHONPATH=/tmp/prescore-site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -z "$LIST" ] && (nvidia-smi; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())") \
    > "$OUT/device.txt" 2>&1
failed=0
run() {  # run NAME CMD...: its output in $OUT/NAME.log
    local name=$1; shift
    echo "== $name: $*"
    [ -n "$LIST" ] && return 0
    if "$@" > "$OUT/$name.log" 2>&1; then echo "   ok"; else echo "   FAILED (see $OUT/$name.log)"; failed=$((failed + 1)); fi
}
run pytest_kernels "$PY" -P -m pytest -q -p no:cacheprovider tests/test_triton_sparse_decode.py
if [ -n "$LIST" ] || "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    run pytest_backend "$PY" -P -m pytest -q -p no:cacheprovider tests/test_cuda_backend.py
else
    echo "vLLM (CUDA build) is not installed here: tests/test_cuda_backend.py not run" \
        | tee "$OUT/pytest_backend.log"
fi
run triton_check "$PY" bench/kernels/bench_triton_decode.py --check --no-time --out "$OUT/triton_check.json"
run triton_decode "$PY" bench/kernels/bench_triton_decode.py --contexts 4096,16384 --rounds 3 --tiers 3 \
    --out "$OUT/triton_decode.json"
# the target cell: 32k tokens, batch 16, keep 1/8, Llama-3-8B and Qwen2.5-0.5B shapes
run triton_target "$PY" bench/kernels/bench_triton_decode.py --presets llama3-8b,qwen2.5-0.5b \
    --contexts 32768 --batches 16 --keeps 8 --rounds 3 --tiers 3 --out "$OUT/triton_target.json"
echo "$failed part(s) failed; results in $OUT"
exit "$failed"
