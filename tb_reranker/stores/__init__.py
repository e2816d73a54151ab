"""Frame stores: per-segment frame tokens ``[T, D]`` + timestamps, keyed by record key
(``segment_key(video_id, n)``: the video id for segment 0, ``<video id>~<n>`` after it).

- :mod:`~tb_reranker.stores.record`: :class:`FrameRecord`, its bytes (safetensors, no pickle)
  and the video-id rule every layer shares;
- :mod:`~tb_reranker.stores.base`: the :class:`FrameStore` interface and :class:`StoreScan`;
- :mod:`~tb_reranker.stores.lmdb_store`: :class:`LmdbFrameStore` (local default), read by
  ``tb check`` through the crash-proof child-process scanner :mod:`~tb_reranker.stores.lmdb_scan`;
- :mod:`~tb_reranker.stores.s3_store`: :class:`S3FrameStore` (any S3-compatible service);
- :func:`open_store`: the backend from a spec string (a directory or ``s3://bucket/prefix``).

Nothing heavy loads at import: lmdb, boto3 and safetensors are imported on first use.
"""

from __future__ import annotations

from tb_reranker.stores.base import FrameStore, StoreScan
from tb_reranker.stores.lmdb_store import LmdbFrameStore
from tb_reranker.stores.record import (
    MAX_SEGMENTS,
    VIDEO_ID_PATTERN,
    FrameRecord,
    decode_record,
    encode_record,
    segment_key,
    split_key,
    validate_record_key,
    validate_record_keys,
    validate_video_id,
    validate_video_ids,
)
from tb_reranker.stores.s3_store import S3FrameStore
from tb_reranker.stores.spec import open_store

__all__ = [
    "FrameRecord",
    "FrameStore",
    "StoreScan",
    "LmdbFrameStore",
    "S3FrameStore",
    "open_store",
    "validate_video_id",
    "validate_video_ids",
    "validate_record_key",
    "validate_record_keys",
    "segment_key",
    "split_key",
    "MAX_SEGMENTS",
    "encode_record",
    "decode_record",
    "VIDEO_ID_PATTERN",
]
