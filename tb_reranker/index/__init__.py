"""Video index (Milvus), frame-token store (LMDB / S3) and the ingest pipeline.

Nothing heavy loads at import: pymilvus, lmdb, boto3 and torch are imported on first use.
"""

from __future__ import annotations

from tb_reranker.index.ingest import CheckReport, IngestReport, check, delete, ingest
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.index.store import (
    FrameRecord,
    FrameStore,
    LmdbFrameStore,
    open_store,
    validate_video_id,
)

__all__ = [
    "VideoIndex",
    "FrameRecord",
    "FrameStore",
    "LmdbFrameStore",
    "open_store",
    "validate_video_id",
    "ingest",
    "delete",
    "check",
    "IngestReport",
    "CheckReport",
]
