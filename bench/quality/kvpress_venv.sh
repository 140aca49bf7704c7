#!/usr/bin/env bash
# Create kvpress's own virtual environment (kvpress 0.5.5 pins transformers < 5.3, older than
# the project's .venv), used by bench/quality/eval_kvpress.py for the kvpress baselines of
# `make results`. Idempotent: does nothing when the venv already imports kvpress 0.5.5.
#
#   bench/quality/kvpress_venv.sh            # -> ${PRESCORE_CACHE:-~/.cache/prescore}/kvpress-venv
#   KVPRESS_VENV=/some/dir PIP_OPTS="--extra-index-url https://download.pytorch.org/whl/cpu" \
#       bench/quality/kvpress_venv.sh
#
# torch is the CPU build the project's .venv uses (torch==2.13.0+cpu; where the configured
# indexes lack it, the install retries with PyTorch's CPU index, TORCH_CPU_INDEX, as `make setup`).
set -euo pipefail
PYTHON=${PYTHON:-python3}
CACHE=${PRESCORE_CACHE:-$HOME/.cache/prescore}
VENV=${KVPRESS_VENV:-$CACHE/kvpress-venv}
PIP_OPTS=${PIP_OPTS:-}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    "import importlib.metadata as m, sys; sys.exit(m.version('kvpress') != '0.5.5')" 2>/dev/null; then
  echo "$VENV"; exit 0
fi
# pip's output goes to stderr: stdout carries only the venv path (for $(...) in the Makefile).
"$PYTHON" -m venv "$VENV" >&2
"$VENV/bin/pip" install -q --upgrade pip >&2
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $PIP_OPTS "torch==2.13.0+cpu" >&2 || {
  echo "retrying with PyTorch's CPU index for torch==2.13.0+cpu ($TORCH_CPU_INDEX)" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $PIP_OPTS --extra-index-url "$TORCH_CPU_INDEX" "torch==2.13.0+cpu" >&2
}
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $PIP_OPTS "kvpress==0.5.5" "safetensors>=0.4" >&2
# Same reason as in the Makefile: builds pulled in beside the CPU torch break imports.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 2>/dev/null || true
"$VENV/bin/python" -c "import kvpress, transformers, torch; print('kvpress ok', transformers.__version__, torch.__version__)" >&2
echo "$VENV"
