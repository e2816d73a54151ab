"""Helpers shared by the docker tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
IMAGES_ENV = ROOT / "build" / "docker" / "images.env"  # written by docker/offline/build-images.sh


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
