"""prescore: a vLLM attention backend with query-independent pre-scoring and sparse decode.

Importing this package is cheap and does not import vLLM: ``register()`` (the
``vllm.general_plugins`` entry point) imports lazily.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: register the PRESCORE attention backend.

    Runs in the API server, the engine core and every worker, possibly several times;
    idempotent and cheap.
    """
    from prescore_backend.platform import register as _register

    _register()
