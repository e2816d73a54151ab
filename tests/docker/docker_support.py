"""Helpers shared by the docker tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMAGES_ENV = ROOT / "build" / "docker" / "images.env"  # written by docker/offline/build-images.sh
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
# the host ports the compose file publishes (each a variable): a test stack gets free ones
STACK_PORTS = (
    "MILVUS_PORT",
    "MILVUS_HTTP_PORT",
    "MINIO_PORT",
    "MINIO_CONSOLE_PORT",
    "TB_GRPC_PORT",
    "TB_HTTP_PORT",
    "TB_METRICS_PORT",
)


def docker_required() -> bool:
    """``make test-docker`` sets TB_REQUIRE_DOCKER=1: what it set up must be there."""
    return os.environ.get("TB_REQUIRE_DOCKER", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    if docker_required():
        pytest.fail(reason)
    pytest.skip(reason)


def image_overrides() -> dict[str, str]:
    """TB_*_IMAGE from the environment, else from build/docker/images.env (the stand-ins)."""
    values: dict[str, str] = {}
    if IMAGES_ENV.exists():
        for line in IMAGES_ENV.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip():
                values[name.strip()] = value.strip()
    for name in list(values) + [
        "TB_ETCD_IMAGE",
        "TB_MINIO_IMAGE",
        "TB_MC_IMAGE",
        "TB_MILVUS_IMAGE",
        "TB_RERANKER_IMAGE",
        "TB_RAY_IMAGE",
    ]:
        if os.environ.get(name):
            values[name] = os.environ[name]
    return values


def missing_images(images: list[str]) -> list[str]:
    import docker

    client = docker.from_env(timeout=30)
    try:
        missing = []
        for image in images:
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                missing.append(image)
        return missing
    finally:
        client.close()


def compose_variables() -> set[str]:
    """The variables the compose file reads (``${NAME...}``)."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(names: Iterable[str]) -> dict[str, int]:
    return {name: free_port() for name in names}


def private_stack_env(
    mp: pytest.MonkeyPatch, project: str, checkpoint: Path, ports: dict[str, int]
) -> None:
    """Patch this process's environment for a private compose project: its name (``down
    --volumes`` must never touch a user's own tb-reranker stack), the compose file's own defaults
    (no variable the file reads is inherited from this shell: TB_COLLECTION, MINIO_*, ...), the
    images ``make images`` built, the checkpoint and free host ports."""
    mp.setenv("COMPOSE_PROJECT_NAME", project)
    for name in compose_variables():
        mp.delenv(name, raising=False)
    for name, value in image_overrides().items():
        mp.setenv(name, value)
    mp.setenv("TB_CHECKPOINT_DIR", str(checkpoint))
    for name, port in ports.items():
        mp.setenv(name, str(port))


def project_containers(project: str) -> dict[str, object]:
    """A compose project's containers (all, running or not) by service name (docker SDK)."""
    import docker

    client = docker.from_env(timeout=60)
    found = client.containers.list(
        all=True, filters={"label": f"com.docker.compose.project={project}"}
    )
    return {c.labels["com.docker.compose.service"]: c for c in found}
