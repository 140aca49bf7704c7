#!/bin/sh
# Entrypoint of the prescore images (Dockerfile, Dockerfile.cpu):
#
#     docker run IMAGE [MODEL] [any vllm serve / prescore-serve flag]
#
# runs `prescore-serve [MODEL] [flags]` (vLLM's `serve` with the PRESCORE backend), plus:
#   * --host 0.0.0.0 unless --host is given (prescore-serve's own default is 127.0.0.1,
#     unreachable from outside a container) and --port ${PORT:-8000} unless --port is given;
#   * an embedded model (MODEL, default smollm2-135m) that is missing from $PRESCORE_CACHE,
#     e.g. on an empty bind-mounted volume, is prepared first (the package index must be
#     reachable then; the images ship it prepared).
# Everything else passes through unchanged.
set -eu

model=smollm2-135m
case "${1:-}" in
    "" | -*) ;;
    *) model=$1 ;;
esac
host_given=no
port_given=no
for arg in "$@"; do
    case "$arg" in
        --host | --host=*) host_given=yes ;;
        --port | --port=*) port_given=yes ;;
        --model | --model=*) model="" ;;
        -h | --help | --help=*) model="" ;;
    esac
done
if [ "$host_given" = no ]; then
    set -- "$@" --host 0.0.0.0
fi
if [ "$port_given" = no ]; then
    set -- "$@" --port "${PORT:-8000}"
fi

if [ -n "$model" ] && prescore-models list | cut -f1 | grep -qx -e "$model"; then
    prescore-models prepare "$model"
fi
exec prescore-serve "$@"
