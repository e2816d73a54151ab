"""``open_store``: a frame store from a spec string (a directory, or ``s3://bucket/prefix``)."""

from __future__ import annotations

import os
from typing import Any

from tb_reranker.errors import InvalidInputError
from tb_reranker.stores.base import FrameStore
from tb_reranker.stores.lmdb_store import LmdbFrameStore

__all__ = ["open_store"]


def open_store(
    spec: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    dtype: str = "float16",
    **options: Any,
) -> FrameStore:
    """Open a frame-token store from ``spec``.

    ``s3://bucket/prefix`` → :class:`S3FrameStore` (endpoint from ``endpoint_url`` or
    ``TB_S3_ENDPOINT``; credentials from the usual AWS variables); anything else is a local
    directory → :class:`LmdbFrameStore`. ``options`` go to the backend's constructor.
    """
    text = os.fspath(spec)
    if not text:
        raise InvalidInputError("empty frame-token store spec")
    if text.startswith("s3://"):
        from tb_reranker.stores.s3_store import S3FrameStore

        return S3FrameStore.from_url(text, endpoint_url=endpoint_url, dtype=dtype, **options)
    if "://" in text:
        raise InvalidInputError(f"unsupported frame-token store {text!r}: use a directory or s3://")
    return LmdbFrameStore(text, dtype=dtype, **options)
