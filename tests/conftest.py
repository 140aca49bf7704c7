"""Shared fixtures: a real prescore-serve process on 127.0.0.1 (one per test module)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = float(os.environ.get("PRESCORE_TEST_STARTUP_TIMEOUT", "300"))

# vLLM's CPU worker keeps one core per rank for its scheduler process; on a 2-core CI host
# that leaves the model one core. Every engine the tests start (servers, benchmarks, the
# interpreter engine) inherits this and uses all cores: a 3.8k-token fp32 prefill took 15 s
# instead of 29-34 s on an AVX2 host. The tests assert behaviour, not speed.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _own_a_share_of_the_cores() -> None:
    """Under pytest-xdist (``make test`` runs two workers, one test module at a time each)
    every worker keeps an equal share of the allowed cores. Its servers, benchmarks and
    interpreter runs inherit the affinity, and vLLM binds its OpenMP threads within it, so two
    engines never share a core: most of a serial run leaves one core idle (engine starts,
    imports and the Triton interpreter are single-threaded)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus, i = sorted(os.sched_getaffinity(0)), int(worker[2:])
    share = cpus[i * len(cpus) // count:(i + 1) * len(cpus) // count] or [cpus[i % len(cpus)]]
    os.sched_setaffinity(0, share)
    if "torch" in sys.modules:  # its thread pool may already be sized for every core
        sys.modules["torch"].set_num_threads(len(share))


_own_a_share_of_the_cores()


def pytest_collection_modifyitems(session, config, items) -> None:
    """Modules that start engines (a test marked ``e2e``) run first, in file order, then the
    rest: with two workers taking whole modules, the short ones fill in at the end instead of
    one long engine module running alone."""
    engine_modules = {item.module for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.module not in engine_modules)  # stable


def doc_text(n_chars: int, topic: str = "specialnames", offset: int = 0) -> str:
    """Real English text shipped with CPython (the Python reference's topic pages)."""
    from pydoc_data.topics import topics

    return topics[topic][offset:offset + n_chars]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A prescore-serve subprocess; ``url`` is its base URL."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def start(self) -> "Server":
        fd, path = tempfile.mkstemp(prefix="prescore-serve-", suffix=".log")
        self.log_path = Path(path)
        env = {**os.environ, **self.env}
        cmd = [str(BIN / "prescore-serve"), *self.args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        os.close(fd)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{self.log()[-6000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def model_path() -> str:
    from prescore_backend.server.models import is_prepared, model_dir

    if not is_prepared("smollm2-135m"):
        pytest.fail("embedded model not prepared: run `make model` (make test does it)")
    return str(model_dir("smollm2-135m"))


@pytest.fixture(scope="session")
def qwen_path() -> str:
    """The long-context model (Qwen2.5-Coder-0.5B-Instruct, 32k), prepared by `make test`."""
    from prescore_backend.server.models import is_prepared, model_dir

    if not is_prepared("qwen2.5-coder-0.5b"):
        pytest.fail("long-context model not prepared: run `prescore-models prepare "
                    "qwen2.5-coder-0.5b` (make test does it)")
    return str(model_dir("qwen2.5-coder-0.5b"))
