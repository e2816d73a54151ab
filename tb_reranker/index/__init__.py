"""Video index (Milvus: schema and rows) and the ingest / delete / check pipeline.

The frame stores live in :mod:`tb_reranker.stores`; their public names are re-exported here
(``from tb_reranker.index import FrameRecord, open_store`` keeps working).
Nothing heavy loads at import: pymilvus, lmdb, boto3 and torch are imported on first use.
"""

from __future__ import annotations

from tb_reranker.index.ingest import IngestOptions, IngestReport, ingest
from tb_reranker.index.maintenance import (
    CheckReport,
    DeleteReport,
    MigrateReport,
    check,
    delete,
    migrate,
)
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.stores import (
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
    "migrate",
    "MigrateReport",
    "IngestOptions",
    "IngestReport",
    "CheckReport",
    "DeleteReport",
]
