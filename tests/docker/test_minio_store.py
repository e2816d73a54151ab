"""The S3 frame-token store against the real S3 server container the compose stack runs.

That is MinIO (the compose file's pin), or the image TB_MINIO_IMAGE names (``make images``
writes the offline stand-in, SeaweedFS behind MinIO's command line, to build/docker/images.env).
The unit tests cover the S3 backend with moto; this checks the same calls against that server:
round trip of fp16 tokens, missing ids absent, listing, delete, and a corrupt object reported
as ``StoreError`` naming the id. Skipped (conftest) where no Docker engine is reachable.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from docker_support import image_overrides, missing_images, skip_or_fail

USER = PASSWORD = "minioadmin"
COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "docker-compose.yml"

pytestmark = [pytest.mark.timeout(600)]


def _minio_image() -> str:
    """TB_MINIO_IMAGE (env or build/docker/images.env), else the pin in docker-compose.yml."""
    override = image_overrides().get("TB_MINIO_IMAGE")
    if override:
        return override
    compose = yaml.safe_load(COMPOSE.read_text())
    image = compose["services"]["minio"]["image"]  # ${TB_MINIO_IMAGE:-minio/minio:...}
    return re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", image)


@pytest.fixture(scope="module")
def minio_endpoint() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    image = _minio_image()
    missing = missing_images([image])
    if missing:
        skip_or_fail(f"image {image} not present (run `make images`; no registry to pull from)")
    # a network of our own: an engine run with --bridge=none (ours) has no default bridge to
    # publish ports from
    network = Network().create()
    container = (
        DockerContainer(image)
        .with_network(network)
        .with_env("MINIO_ROOT_USER", USER)
        .with_env("MINIO_ROOT_PASSWORD", PASSWORD)
        .with_command("server /data")
        .with_exposed_ports(9000)
    )
    try:
        container.start()
    except BaseException:
        if container._container is not None:  # created but not started: removed too
            container.stop()
        network.remove()
        raise
    try:
        endpoint = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(9000)}"
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=USER,
            aws_secret_access_key=PASSWORD,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 60
        while True:  # S3 itself answering, whichever server it is
            try:
                s3.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"{image} did not answer S3 calls within 60 s")
                time.sleep(0.5)
        yield endpoint
    finally:
        container.stop()
        network.remove()


@pytest.fixture
def store(minio_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    import boto3

    from tb_reranker.stores import open_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", USER)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PASSWORD)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("TB_S3_ENDPOINT", minio_endpoint)
    bucket = f"tb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=minio_endpoint).create_bucket(Bucket=bucket)
    opened = open_store(f"s3://{bucket}/frames")
    try:
        yield opened, bucket
    finally:
        opened.close()


def _record(seed: int, T: int = 12, D: int = 64):
    from tb_reranker.stores import FrameRecord

    rng = np.random.default_rng(seed)
    return FrameRecord(
        tokens=rng.standard_normal((T, D)).astype(np.float16),
        timestamps=np.linspace(0.0, 5.5, T, dtype=np.float32),
        content_hash=f"{seed:064x}",
    )


def test_round_trip_list_and_delete(store):
    frames, _ = store
    records = {f"vid-{i}": _record(i) for i in range(5)}
    frames.put_many(records)
    got = frames.get_many([*records, "never-stored"])
    assert set(got) == set(records)  # missing ids are absent, not errors
    for video_id, record in records.items():
        np.testing.assert_array_equal(got[video_id].tokens, record.tokens)
        np.testing.assert_allclose(got[video_id].timestamps, record.timestamps)
        assert got[video_id].content_hash == record.content_hash
    assert sorted(frames.list_ids()) == sorted(records)
    assert frames.contains("vid-0") and not frames.contains("never-stored")
    assert frames.delete_many(["vid-0", "vid-1", "never-stored"]) == 2
    assert sorted(frames.list_ids()) == ["vid-2", "vid-3", "vid-4"]


def test_corrupt_object_is_a_store_error_naming_the_id(store, minio_endpoint):
    import boto3

    from tb_reranker.errors import StoreError

    frames, bucket = store
    frames.put_many({"good": _record(1), "bad": _record(2)})
    client = boto3.client("s3", endpoint_url=minio_endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    bad_key = next(k for k in keys if k.endswith("/bad.safetensors"))
    client.put_object(Bucket=bucket, Key=bad_key, Body=b"not a safetensors file")
    with pytest.raises(StoreError, match="bad"):
        frames.get_many(["good", "bad"])
    assert set(frames.get_many(["good"])) == {"good"}
