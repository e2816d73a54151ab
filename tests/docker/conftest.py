"""Docker tests: skipped, with the reason, unless a Docker engine answers a ping.

Every test in ``tests/docker`` gets the ``docker`` marker (``pytest -m "not docker"`` leaves them
out) and an autouse check: no ``docker`` Python package or no reachable engine (``ping`` fails)
→ ``pytest.skip`` with the reason, never an error. The compose tests also need
``docker compose`` (checked in their module).

Session fixture ``tiny_checkpoint``: a ``TokenBinderConfig.tiny()`` checkpoint in a directory
the container's unprivileged user (uid 10001) can read, mounted into the sidecar.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


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
