"""Video index (Milvus: schema and rows) and the ingest / delete / check pipeline.

The frame stores live in :mod:`tb_reranker.stores`. ``tb_reranker.index`` still answers for
their names (``from tb_reranker.index import FrameRecord, open_store``) as deprecated aliases:
the first use of each warns ``DeprecationWarning``; import them from ``tb_reranker.stores``.
Nothing heavy loads at import: pymilvus, lmdb, boto3 and torch are imported on first use.
"""

from __future__ import annotations

import warnings
from typing import Any

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

__all__ = [
    "VideoIndex",
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

# the store names this package re-exported before the stores had their own package
_MOVED_TO_STORES = frozenset(
    {"FrameRecord", "FrameStore", "LmdbFrameStore", "open_store", "validate_video_id"}
)


def __getattr__(name: str) -> Any:
    """The deprecated store aliases: warns once per name, then the name is a plain attribute."""
    if name not in _MOVED_TO_STORES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import tb_reranker.stores

    warnings.warn(
        f"tb_reranker.index.{name} is deprecated: import it from tb_reranker.stores",
        DeprecationWarning,
        stacklevel=2,
    )
    value = getattr(tb_reranker.stores, name)
    globals()[name] = value  # found directly from now on: one warning per name and process
    return value
