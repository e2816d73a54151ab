"""The one way tb talks to S3: ``s3://bucket/key`` parsing and a boto3 client configured from the
environment (``TB_S3_ENDPOINT`` for MinIO/Ceph/moto, the usual ``AWS_*`` variables for
credentials and region). The frame store, bulk-import staging and ``s3://`` ingest inputs all
use it, so an endpoint set once reaches all three."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from tb_reranker.errors import InvalidInputError, printable

__all__ = ["is_s3_url", "make_client", "split_url"]


def is_s3_url(text: object) -> bool:
    """Whether ``text`` is an ``s3://`` url (a str or path-like naming one)."""
    return isinstance(text, str) and text.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")`` (the key without a leading slash;
    "" for the bucket root).

    Raises:
        InvalidInputError: not an ``s3://`` url, or no bucket.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidInputError(f"not an s3://bucket/prefix url: {printable(url)}")
    return parsed.netloc, parsed.path.lstrip("/")


def make_client(
    endpoint_url: str | None = None,
    *,
    region_name: str | None = None,
    pool: int = 10,
    attempts: int = 3,
) -> Any:
    """A boto3 S3 client: ``endpoint_url`` (default ``TB_S3_ENDPOINT``; None: AWS's own
    resolution), ``region_name`` (default ``AWS_DEFAULT_REGION``, else us-east-1), ``pool``
    connections, ``attempts`` tries per request (botocore's standard retry mode)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("TB_S3_ENDPOINT") or None,
        region_name=region_name or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            retries={"max_attempts": attempts, "mode": "standard"},
            max_pool_connections=pool,
        ),
    )
