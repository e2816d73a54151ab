"""Where a video's bytes come from: a local file, or an object under an ``s3://`` prefix.

Ingest takes ``s3://bucket/prefix`` inputs beside files and directories. :func:`list_videos`
lists the video objects under a prefix (or the one object a url names), :func:`s3_content_hash`
hashes an object by streaming it (the same sha256 the same bytes have on disk, so a library moved
from disk to S3 is still unchanged), and :func:`local_copy` gives the decoder a local file: PyAV
needs to seek (an MP4's index is often at its end), so an object is downloaded to a temporary file
for the length of its decode and removed after. A new video is therefore read twice (hash, then
decode), an unchanged one once, exactly as from disk. The endpoint is ``TB_S3_ENDPOINT``
(MinIO/Ceph) or AWS's own; credentials are the usual ``AWS_*`` variables or the instance's role,
on every process that decodes (each Ray worker reads its objects itself).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from tb_reranker.errors import VideoDecodeError
from tb_reranker.s3 import is_s3_url, make_client, split_url

__all__ = [
    "VIDEO_EXTENSIONS",
    "ListingError",
    "list_videos",
    "local_copy",
    "s3_content_hash",
    "uri_of",
]

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ts",
        ".flv",
        ".wmv",
        ".3gp",
        ".gif",
    }
)
_CHUNK = 1 << 20


class ListingError(Exception):
    """An ``s3://`` input that cannot be listed (no bucket, no access, endpoint down)."""


@functools.lru_cache(maxsize=4)
def _client(endpoint: str | None) -> Any:
    return make_client(endpoint, pool=16)


def client(endpoint: str | None = None) -> Any:
    """This process's S3 client for inputs at ``endpoint`` (default ``TB_S3_ENDPOINT``; one per
    endpoint, boto3 clients being thread-safe)."""
    return _client(endpoint or os.environ.get("TB_S3_ENDPOINT") or None)


def _reason(exc: Exception) -> str:
    """A botocore error as one line: its code and message, or the exception's own text."""
    error = (getattr(exc, "response", None) or {}).get("Error") or {}
    if error:
        return f"{error.get('Code', '?')}: {error.get('Message') or 'no message'}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def uri_of(path: str) -> str:
    """Where a video lives, as its row's ``uri`` records it: an ``s3://`` url as it is, a local
    path made absolute (symlinks resolved)."""
    return path if is_s3_url(path) else str(Path(path).resolve())


def is_video_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in VIDEO_EXTENSIONS


def list_videos(url: str) -> list[str]:
    """The ``s3://`` urls of the video objects ``url`` names: the object itself when it is one,
    else every object under ``url`` as a prefix (a folder: ``prefix/``) whose name has a video
    extension, sorted by key.

    Raises:
        InvalidInputError: not an ``s3://bucket/...`` url.
        ListingError: the bucket cannot be listed (missing, denied, endpoint unreachable).
    """
    bucket, key = split_url(url)
    s3 = client()
    try:
        if key and not key.endswith("/") and is_video_key(key):
            with contextlib.suppress(Exception):
                s3.head_object(Bucket=bucket, Key=key)
                return [f"s3://{bucket}/{key}"]
        prefix = key if not key or key.endswith("/") else key + "/"
        found: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found.extend(
                item["Key"]
                for item in page.get("Contents", ())
                if not item["Key"].endswith("/") and is_video_key(item["Key"])
            )
    except Exception as exc:  # noqa: BLE001 - botocore raises many types
        raise ListingError(f"cannot list the bucket: {_reason(exc)}") from None
    return [f"s3://{bucket}/{k}" for k in sorted(found)]


def s3_content_hash(url: str) -> str:
    """Hex sha256 of an object's bytes, streamed in chunks.

    Raises:
        VideoDecodeError: the object cannot be read (missing, denied, endpoint down).
    """
    bucket, key = split_url(url)
    digest = hashlib.sha256()
    try:
        body = client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
    except Exception as exc:  # noqa: BLE001 - botocore raises many types
        raise VideoDecodeError(url, f"cannot read S3 object: {_reason(exc)}") from None
    return digest.hexdigest()


@contextlib.contextmanager
def local_copy(path: str, *, endpoint: str | None = None) -> Iterator[str]:
    """A local file holding ``path``'s bytes for the length of the block: ``path`` itself when
    it is local, else a temporary download of the object from ``endpoint`` (default
    ``TB_S3_ENDPOINT``), removed on leaving.

    Raises:
        VideoDecodeError: the object cannot be downloaded.
    """
    if not is_s3_url(path):
        yield path
        return
    bucket, key = split_url(path)
    fd, local = tempfile.mkstemp(prefix="tb-s3-", suffix=PurePosixPath(key).suffix)
    os.close(fd)
    try:
        try:
            client(endpoint).download_file(bucket, key, local)
        except Exception as exc:  # noqa: BLE001 - botocore/s3transfer raise many types
            raise VideoDecodeError(path, f"cannot download S3 object: {_reason(exc)}") from None
        yield local
    finally:
        with contextlib.suppress(OSError):
            os.unlink(local)
