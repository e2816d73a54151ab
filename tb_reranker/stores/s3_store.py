"""Frame-token store on an S3-compatible object store (AWS S3, MinIO, Ceph, moto...).

Layout: ``s3://<bucket>/<prefix>/<id[:2]>/<id>.safetensors`` (the two-character fan-out keeps
listings and per-prefix request rates even). Each object is one safetensors record, exactly as in
the LMDB backend. ``put_many`` is *not* atomic across ids (S3 has no transactions); each object
write is atomic, and the ingest pipeline's store-first ordering plus ``tb check`` cover the rest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError, StoreError
from tb_reranker.s3 import make_client, split_url
from tb_reranker.stores.base import FrameStore
from tb_reranker.stores.record import (
    FrameRecord,
    decode_record,
    encode_record,
    validate_record_key,
    validate_record_keys,
)

__all__ = ["S3FrameStore"]

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"


class S3FrameStore(FrameStore):
    """Frame tokens as objects in ``bucket`` under ``prefix``.

    Args:
        bucket: bucket name (must exist).
        prefix: key prefix ("" for the bucket root).
        endpoint_url: S3 endpoint (``http://127.0.0.1:9000``); None = AWS default resolution.
        dtype: token dtype written (float16 default).
        max_workers: threads for batched gets/puts.
        client: a ready ``boto3`` S3 client (overrides ``endpoint_url``).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        dtype: str = "float16",
        max_workers: int = 8,
        client: Any = None,
        region_name: str | None = None,
    ) -> None:
        if not bucket:
            raise InvalidInputError("S3 store needs a bucket name")
        if dtype not in ("float16", "float32"):
            raise InvalidInputError(f"store dtype must be float16 or float32, got {dtype!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.dtype = np.dtype(dtype)
        self.endpoint_url = endpoint_url
        if client is None:
            client = make_client(
                endpoint_url, region_name=region_name, pool=max(10, max_workers * 2)
            )
        self._client = client
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tb-s3")

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, **options: Any) -> S3FrameStore:
        bucket, prefix = split_url(url)
        endpoint = endpoint_url or os.environ.get("TB_S3_ENDPOINT") or None
        return cls(bucket, prefix, endpoint_url=endpoint, **options)

    def __repr__(self) -> str:
        return f"S3FrameStore('s3://{self.bucket}/{self.prefix}')"

    def _key(self, video_id: str) -> str:
        validate_record_key(video_id)
        name = f"{video_id[:2]}/{video_id}{_SUFFIX}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _error(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"S3 store s3://{self.bucket}/{self.prefix} {what} failed: {exc}")

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        response = getattr(exc, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound")

    def put_many(self, records: Mapping[str, FrameRecord]) -> None:
        items = []
        for video_id, record in records.items():
            key = self._key(video_id)
            if not isinstance(record, FrameRecord):
                raise InvalidInputError(f"value for {video_id!r} is not a FrameRecord")
            items.append((key, encode_record(record, self.dtype)))

        def put(item: tuple[str, bytes]) -> None:
            self._client.put_object(Bucket=self.bucket, Key=item[0], Body=item[1])

        try:
            list(self._pool.map(put, items))
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
            raise self._error("put", exc) from exc

    def _get_one(self, video_id: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(video_id))
            return response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if self._is_missing(exc):
                return None
            raise self._error(f"get {video_id!r}", exc) from exc

    def get_many(self, ids: Iterable[str]) -> dict[str, FrameRecord]:
        wanted = validate_record_keys(ids)
        blobs = (
            list(self._pool.map(self._get_one, wanted))
            if len(wanted) > 1
            else [self._get_one(i) for i in wanted]
        )
        return {
            video_id: decode_record(video_id, blob)
            for video_id, blob in zip(wanted, blobs, strict=True)
            if blob is not None
        }

    def delete_many(self, ids: Iterable[str]) -> int:
        wanted = validate_record_keys(ids)
        existing = [
            i
            for i, present in zip(wanted, self._pool.map(self.contains, wanted), strict=True)
            if present
        ]
        try:
            for start in range(0, len(existing), 1000):
                chunk = existing[start : start + 1000]
                self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(i)} for i in chunk], "Quiet": True},
                )
        except Exception as exc:  # noqa: BLE001
            raise self._error("delete", exc) from exc
        return len(existing)

    def contains(self, video_id: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(video_id))
            return True
        except Exception as exc:  # noqa: BLE001
            if self._is_missing(exc):
                return False
            raise self._error(f"head {video_id!r}", exc) from exc

    def list_ids(self) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) :]
                    fan, _, file_name = name.partition("/")
                    if not file_name.endswith(_SUFFIX) or "/" in file_name:
                        continue
                    video_id = file_name[: -len(_SUFFIX)]
                    if video_id[:2] == fan:
                        yield video_id
        except InvalidInputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._error("list", exc) from exc

    def __len__(self) -> int:
        return sum(1 for _ in self.list_ids())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
