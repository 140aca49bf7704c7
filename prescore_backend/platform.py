"""Registration of the PRESCORE backend with vLLM, safe under ``spawn``.

Two vLLM facts shape this module (see docs/architecture.md):

* ``AttentionBackendEnum.register`` adds an enum member at run time. vLLM's engine core and
  workers are started with ``spawn`` and unpickle the config *before* loading plugins; enum
  members pickle by value, so a plain dynamic member fails there ("... is not a valid
  AttentionBackendEnum"). The member we add pickles as a call to :func:`_restore_member`,
  which registers it again in the new process first.
* ``CpuPlatform.get_attn_backend_cls`` ignores the requested backend and always returns
  CPU_ATTN. We wrap that classmethod so PRESCORE is honoured and every other case is
  delegated unchanged.
"""

from __future__ import annotations

import logging

BACKEND_NAME = "PRESCORE"
CPU_BACKEND_PATH = "prescore_backend.backends.cpu.PrescoreCPUBackend"
CUDA_BACKEND_PATH = "prescore_backend.backends.cuda.PrescoreCUDABackend"

logger = logging.getLogger(__name__)
_PATCH_FLAG = "_prescore_patched"


def _restore_member():
    """Unpickling target of the PRESCORE enum member: register, then return the member."""
    return register_backend_enum()


def _reduce_member(_protocol: int = 2):
    return (_restore_member, ())


def register_backend_enum():
    """Add ``AttentionBackendEnum.PRESCORE`` once per process; return the member."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    member = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if member is None:
        from vllm.platforms import current_platform

        path = CUDA_BACKEND_PATH if current_platform.is_cuda_alike() else CPU_BACKEND_PATH
        member = AttentionBackendEnum.register(BACKEND_NAME, path)
        # Instance attribute: pickle looks __reduce_ex__ up on the object itself.
        object.__setattr__(member, "__reduce_ex__", _reduce_member)
    return member


def patch_cpu_platform() -> None:
    """Make CpuPlatform's backend selection honour PRESCORE (idempotent)."""
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, _PATCH_FLAG, False):
        return
    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is not None and getattr(selected_backend, "name", None) == BACKEND_NAME:
            unsupported = [name for name, flag in (
                ("MLA", attn_selector_config.use_mla),
                ("sparse (indexer) attention", attn_selector_config.use_sparse),
                ("sliding-window attention", attn_selector_config.has_sliding_window),
                ("attention sinks", attn_selector_config.has_sink),
            ) if flag]
            if unsupported:
                raise ValueError(
                    f"--attention-backend prescore does not support {', '.join(unsupported)}; "
                    "serve this model with the default attention backend")
            return CPU_BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    setattr(CpuPlatform, _PATCH_FLAG, True)


def register() -> None:
    """Everything the plugin does at load: cheap and idempotent."""
    register_backend_enum()
    patch_cpu_platform()
