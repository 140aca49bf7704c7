"""``prescore-serve``: vLLM's OpenAI-compatible server with prescore's defaults.

    prescore-serve [MODEL] [any `vllm serve` flag]

MODEL defaults to the embedded model (``smollm2-135m``, prepared by ``prescore-models
prepare``); a short embedded name or any path / model id vLLM accepts works. Every
``vllm serve`` flag is passed through unchanged. Defaults added only when the flag is absent:
``--attention-backend prescore``, ``--host 127.0.0.1``, ``--enforce-eager`` and ``--kv-cache-memory-bytes 2GiB`` on
CPU (torch.compile warm-up costs minutes on a small CPU machine; vLLM's CPU default reserves 92%
of the memory node), ``--dtype float32`` on CPUs without native bf16 (see
:func:`cpu_default_dtype`; the choice and its reason are logged at start),
``--served-model-name`` = the short name. Always added: ``--middleware
prescore_backend.server.middleware.RequestGuard`` (API key on every route but the probes,
bounded request bodies: ``--max-request-body-bytes``). With more than one rank on CPU
(``--tensor-parallel-size``/``--pipeline-parallel-size``) and fewer NUMA nodes than ranks,
``VLLM_CPU_OMP_THREADS_BIND`` is set to share the allowed cores among the ranks (vLLM's
automatic binding wants one NUMA node per rank and refuses to start otherwise).

Why a wrapper: the ``vllm`` console script of the ``vllm-cpu`` distribution crashes on
``importlib.metadata.version("vllm")``; this builds vLLM's own ``serve`` sub-command parser
and dispatches to it, so behaviour stays vLLM's.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import os
import shutil
import sys
import tempfile

from prescore_backend.server.models import DEFAULT_MODEL, EMBEDDED_MODELS, ModelPrepError, resolve_model


_CPU_KV_CACHE_BYTES = 2 * 1024**3  # ~90k tokens of SmolLM2-135M in bf16
GUARD = "prescore_backend.server.middleware.RequestGuard"


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def build_argv(argv: list[str]) -> list[str]:
    """Return the ``vllm serve`` argument list for prescore-serve's ``argv``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        model, rest = argv[0], argv[1:]
    else:
        model, rest = DEFAULT_MODEL, argv
    if _has_flag(rest, "--model"):  # vLLM also accepts --model; honour it
        model = None
    defaults: list[str] = []
    if model is not None and model in EMBEDDED_MODELS and not _has_flag(rest, "--served-model-name"):
        defaults += ["--served-model-name", EMBEDDED_MODELS[model].served_name]
    resolved = [resolve_model(model)] if model is not None else []
    if not _has_flag(rest, "--attention-backend"):
        defaults += ["--attention-backend", "prescore"]
    if not _has_flag(rest, "--host"):
        defaults += ["--host", "127.0.0.1"]
    if _is_cpu() and not (any(_has_flag(rest, f) for f in ("--kv-cache-memory-bytes",
                                                           "--gpu-memory-utilization"))
                          or os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
        # vLLM's CPU default reserves 92% of the NUMA node's memory and refuses to start when
        # anything else runs; a fixed KV budget is the predictable choice for a CPU host.
        defaults += ["--kv-cache-memory-bytes", str(_CPU_KV_CACHE_BYTES)]
    if _is_cpu() and not _has_flag(rest, "--dtype"):
        dtype, _ = cpu_default_dtype()
        if dtype is not None:
            defaults += ["--dtype", dtype]
    if _is_cpu() and not any(_has_flag(rest, f) for f in ("--enforce-eager", "--no-enforce-eager",
                                                           "--compilation-config", "-cc", "-O")):
        defaults += ["--enforce-eager"]
    defaults += ["--middleware", GUARD]
    return [*resolved, *defaults, *rest]


def cpu_default_dtype() -> tuple[str | None, str]:
    """``--dtype`` to add on this CPU when the user gave none, and why (for the log).

    vLLM's CPU platform serves bf16 by default on every x86 CPU, but only CPUs with native
    bf16 (``avx512_bf16`` or AMX) run its bf16 matmuls in oneDNN; elsewhere (AVX2-only hosts)
    bf16 linear layers take a slow torch fallback, several times slower than fp32, so fp32 is
    the default there. None = leave vLLM's choice."""
    from prescore_backend.kernels import host

    if host.has_native_bf16():
        return None, f"{host.cpu_model()} has native bf16 ({host.isa()})"
    return "float32", f"{host.cpu_model()} has no native bf16 (no avx512_bf16 / AMX)"


def _flag_value(argv: list[str], flag: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
    return default


def cpu_thread_binding(argv: list[str], cpus: list[int], numa_nodes: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a multi-rank CPU server, or None to leave vLLM's.

    Ranks get contiguous, disjoint slices of the allowed cores when there are enough; with
    fewer cores than ranks, cores are shared round-robin (slow, but it serves).
    """
    world = 1
    for flag, short in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp")):
        world *= int(_flag_value(argv, flag, _flag_value(argv, short, "1")))
    if world <= 1 or numa_nodes >= world or not cpus:
        return None
    if len(cpus) >= world:
        per = len(cpus) // world
        parts = [cpus[r * per:(r + 1) * per] for r in range(world)]
    else:
        parts = [[cpus[r % len(cpus)]] for r in range(world)]
    return "|".join(",".join(str(c) for c in p) for p in parts)


def _numa_nodes() -> int:
    import glob

    return max(1, len(glob.glob("/sys/devices/system/node/node[0-9]*")))


def _set_cpu_thread_binding(argv: list[str]) -> None:
    if not _is_cpu() or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        return
    bind = cpu_thread_binding(argv, sorted(os.sched_getaffinity(0)), _numa_nodes())
    if bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        print(f"prescore-serve: VLLM_CPU_OMP_THREADS_BIND={bind} (one slice of cores per rank)",
              file=sys.stderr)


def _enable_huge_pages() -> None:
    """Back torch's large CPU allocations (vLLM's KV cache among them) with transparent huge
    pages (``THP_MEM_ALLOC_ENABLE=1``, read by torch's CPU allocator; inherited by the engine
    processes). Sparse decode reads scattered 16-token tiles, each K tile spread over 8 pages of
    vLLM's K^T layout: with 4 KiB pages nearly every tile read misses the TLB (measured on the
    micro-benchmark: ~20% faster sparse decode; exact decode unchanged within noise). An
    explicit ``THP_MEM_ALLOC_ENABLE`` in the environment wins; GPUs are left alone."""
    if _is_cpu():
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _is_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a dependency
        return True


def _allow_endpoint_plugin() -> None:
    """vLLM loads endpoint plugins only when named in VLLM_PLUGINS (an allowlist that also
    gates general plugins): name ours, and keep every installed general plugin allowed."""
    from importlib.metadata import entry_points

    current = os.environ.get("VLLM_PLUGINS")
    if current is None:
        names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    else:
        names = {n.strip() for n in current.split(",") if n.strip()}
    names.add("prescore")
    os.environ["VLLM_PLUGINS"] = ",".join(sorted(names))


def _setup_prometheus_dir() -> None:
    """Worker-side metrics reach /metrics only through a multiprocess directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="prescore-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def _add_prescore_flags(parser) -> None:
    """``--prescore-<field>`` for every PrescoreConfig field, documented in ``--help``."""
    from prescore_backend.config import PrescoreConfig, field_docs, flag_name

    group = parser.add_argument_group(
        "prescore", "PRESCORE backend settings (exported as PRESCORE_* environment variables "
        "for the engine's workers; defaults in brackets).")
    docs = field_docs()
    for f in dataclasses.fields(PrescoreConfig):
        group.add_argument(flag_name(f.name), dest=f"prescore_{f.name}", default=argparse.SUPPRESS,
                           metavar=str(f.type).upper(),
                           # argparse formats help with %: a literal one must be doubled
                           help=f"{docs[f.name]} Default: {f.default}.".replace("%", "%%"))


def _export_prescore_flags(args) -> None:
    """Validate the prescore flags (with the environment) and export them to the workers."""
    from prescore_backend.config import ConfigError, PrescoreConfig, env_name, flag_name

    for f in dataclasses.fields(PrescoreConfig):
        value = getattr(args, f"prescore_{f.name}", None)
        if hasattr(args, f"prescore_{f.name}"):
            delattr(args, f"prescore_{f.name}")
        if value is not None and not str(value).strip() and f.default != "":
            # exported as "", it would read as unset: the default, silently, whatever the
            # environment said
            print(f"prescore-serve: error: {flag_name(f.name)} needs a value", file=sys.stderr)
            sys.exit(2)
        if value is not None:
            os.environ[env_name(f.name)] = str(value)
    try:
        PrescoreConfig.from_env()
    except ConfigError as e:
        print(f"prescore-serve: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    helping = any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)
    if helping:  # help needs no prepared model
        serve_argv = list(argv)
    else:
        try:
            serve_argv = build_argv(argv)
        except ModelPrepError as e:
            print(f"prescore-serve: error: {e}", file=sys.stderr)
            sys.exit(2)
    if _is_cpu() and not helping and not _has_flag(argv, "--dtype"):
        dtype, why = cpu_default_dtype()
        print(f"prescore-serve: dtype {dtype or 'auto (vLLM: bf16 for fp32 and bf16 models)'}: "
              f"{why}; pass --dtype to choose", file=sys.stderr)
    _setup_prometheus_dir()
    _allow_endpoint_plugin()
    _set_cpu_thread_binding(serve_argv)
    _enable_huge_pages()

    from vllm.entrypoints.cli import serve as serve_cmd
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="prescore-serve")
    subparsers = parser.add_subparsers(dest="subparser")
    cmd = serve_cmd.cmd_init()[0]
    sub = cmd.subparser_init(subparsers)
    sub.usage = "prescore-serve [MODEL] [vllm serve options]"
    sub.set_defaults(dispatch_function=cmd.cmd)
    _add_prescore_flags(sub)
    sub.add_argument("--http-shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                     help="After SIGTERM and the engine's stop (vLLM's --shutdown-timeout: 0 "
                     "aborts running requests, N drains them for up to N s), close HTTP "
                     "connections still open after this many seconds, so the process exits "
                     "in bounded time. Default: 5.")
    sub.add_argument("--max-request-body-bytes", type=int, default=None, metavar="BYTES",
                     help="Refuse request bodies larger than this with HTTP 413 (prescore's "
                     "RequestGuard). Default: 8 MiB.")
    args = parser.parse_args(["serve", *serve_argv])
    _export_prescore_flags(args)
    if args.max_request_body_bytes is not None and args.max_request_body_bytes < 1024:
        print("prescore-serve: error: --max-request-body-bytes must be at least 1024",
              file=sys.stderr)
        sys.exit(2)
    if args.http_shutdown_timeout < 0:
        print("prescore-serve: error: --http-shutdown-timeout must be >= 0", file=sys.stderr)
        sys.exit(2)
    configure_logging_from_args(args)
    cmd.validate(args)
    _bound_http_shutdown(serve_cmd, args.http_shutdown_timeout)
    args.dispatch_function(args)


def _bound_http_shutdown(serve_module, seconds: float) -> None:
    """Give uvicorn a graceful-shutdown timeout. vLLM's single-server path starts uvicorn
    without one: after SIGTERM with the default abort mode the engine is gone, but uvicorn
    waits for every open (streaming) connection to close, i.e. for the clients' own
    timeouts; the process then outlives Kubernetes' grace period and is killed."""
    import functools

    run_server = serve_module.run_server
    serve_module.run_server = functools.partial(run_server, timeout_graceful_shutdown=seconds)


if __name__ == "__main__":
    main()
