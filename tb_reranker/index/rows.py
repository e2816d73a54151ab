"""The Milvus row of a stored video, and the user metadata it carries (shared by ingest and check)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError
from tb_reranker.index.milvus_index import ROW_FIELDS
from tb_reranker.stores import FrameRecord

__all__ = ["READ_BATCH", "video_row", "user_fields", "same_metadata", "check_metadata"]

READ_BATCH = 512  # ids per store/index lookup
_RESERVED = frozenset(ROW_FIELDS) | {"score"}


def video_row(
    video_id: str, record: FrameRecord, cls: np.ndarray, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The Milvus row of ``record``: its [CLS] vector ``cls``, scalar fields and ``metadata``."""
    row: dict[str, Any] = dict(metadata or {})
    row.update(
        id=video_id,
        cls=np.asarray(cls, dtype=np.float32),
        uri=record.uri,
        duration_s=float(record.duration_s),
        num_frames=record.num_real_frames,
        content_hash=record.content_hash,
    )
    return row


def check_metadata(metadata: Mapping[str, Any] | None) -> None:
    """Refuse metadata that is not ``{id or path: {field: value}}`` or uses a reserved field."""
    for key, value in (metadata or {}).items():
        if not isinstance(value, Mapping):
            raise InvalidInputError(
                f"metadata for {key!r} must be a dict, got {type(value).__name__}"
            )
        clash = set(value) & _RESERVED
        if clash or any(str(k).startswith("$") for k in value):
            raise InvalidInputError(
                f"metadata for {key!r} uses reserved field names {sorted(clash) or list(value)}"
            )


def user_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The user metadata of a Milvus row (everything but the row's own fields and the score)."""
    return {k: v for k, v in row.items() if k not in _RESERVED}


def same_metadata(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal user metadata (compared as canonical JSON: Milvus returns what was written)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
