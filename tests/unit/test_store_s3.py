"""S3 frame-token store against a real local S3 endpoint (moto's threaded server on loopback:
the ``s3_endpoint`` / ``s3_env`` fixtures of ``tests/conftest.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from tb_reranker.errors import InvalidInputError, StoreError
from tb_reranker.stores import FrameRecord, open_store

pytest.importorskip("moto.server", reason="moto[server] is not installed")


@pytest.fixture
def bucket(s3_env: str, request: pytest.FixtureRequest) -> str:
    import boto3

    name = "tb-" + request.node.name.replace("_", "-").lower()[:50]
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


def record(seed: int, frames: int = 3, dim: int = 8) -> FrameRecord:
    rng = np.random.default_rng(seed)
    return FrameRecord(
        tokens=rng.standard_normal((frames, dim)).astype(np.float32),
        timestamps=np.linspace(0, 1, frames, dtype=np.float32),
        content_hash=f"h{seed}",
    )


def test_s3_round_trip_list_delete(bucket: str, s3_env: str) -> None:
    import boto3

    store = open_store(f"s3://{bucket}/frames/v1")
    try:
        store.put_many({f"vid{i}": record(i) for i in range(5)})
        got = store.get_many(["vid0", "vid3", "nope"])
        assert sorted(got) == ["vid0", "vid3"]
        assert got["vid3"].tokens.dtype == np.float16
        np.testing.assert_allclose(got["vid3"].tokens, record(3).tokens, atol=2e-3)
        assert got["vid3"].content_hash == "h3"
        assert sorted(store.list_ids()) == [f"vid{i}" for i in range(5)]
        assert len(store) == 5 and store.contains("vid1") and not store.contains("zz")
        assert store.delete_many(["vid1", "vid2", "zz"]) == 2
        assert sorted(store.list_ids()) == ["vid0", "vid3", "vid4"]
        keys = sorted(
            o["Key"]
            for o in boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=bucket)[
                "Contents"
            ]
        )
        assert keys[0] == "frames/v1/vi/vid0.safetensors"
    finally:
        store.close()


def test_s3_bad_ids_and_corruption(bucket: str, s3_env: str) -> None:
    import boto3

    store = open_store(f"s3://{bucket}/p")
    try:
        for bad in ["../x", "/abs", "a/b", "", "a\x00"]:
            with pytest.raises(InvalidInputError):
                store.put_many({bad: record(0)})
        boto3.client("s3", endpoint_url=s3_env).put_object(
            Bucket=bucket, Key="p/br/broken.safetensors", Body=b"garbage"
        )
        with pytest.raises(StoreError, match="'broken'"):
            store.get_many(["broken"])
    finally:
        store.close()


def test_s3_missing_bucket_is_store_error(s3_env: str) -> None:
    store = open_store("s3://no-such-bucket-tb/x")
    try:
        with pytest.raises(StoreError):
            store.put_many({"a": record(0)})
    finally:
        store.close()
