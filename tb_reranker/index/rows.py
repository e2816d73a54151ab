"""The Milvus row of a stored segment, and the user metadata it carries (shared by ingest and
check)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError
from tb_reranker.index.milvus_index import ROW_FIELDS, VideoIndex
from tb_reranker.stores import FrameRecord, split_key, validate_video_ids

__all__ = [
    "READ_BATCH",
    "video_row",
    "video_rows",
    "user_fields",
    "same_metadata",
    "check_metadata",
]

READ_BATCH = 512  # ids per store/index lookup
IDS_PER_FILTER = 100  # video ids per `video_id in [...]` expression
_RESERVED = frozenset(ROW_FIELDS) | {"score"}  # ROW_FIELDS holds the segment fields too


def video_row(
    key: str, record: FrameRecord, cls: np.ndarray, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The Milvus row of ``record`` stored under ``key`` (``segment_key(video_id, n)``): its
    [CLS] vector ``cls``, scalar fields, segment fields (video id and segment from the key, the
    span from the record) and ``metadata``."""
    video_id, segment = split_key(key)
    if segment != record.segment:
        raise InvalidInputError(
            f"record {key!r} says it is segment {record.segment}, its key says {segment}"
        )
    row: dict[str, Any] = dict(metadata or {})
    row.update(
        id=key,
        cls=np.asarray(cls, dtype=np.float32),
        uri=record.uri,
        duration_s=float(record.duration_s),
        num_frames=record.num_real_frames,
        content_hash=record.content_hash,
        video_id=video_id,
        segment=segment,
        start_s=float(record.start_s),
        end_s=record.end,
    )
    return row


def video_rows(
    index: VideoIndex, video_ids: Sequence[str], fields: Sequence[str] = ("content_hash",)
) -> dict[str, list[dict[str, Any]]]:
    """Every Milvus row (``fields`` and the segment fields) of each of ``video_ids`` that has
    rows, in segment order: the rows whose ``video_id`` is one of them, and those written before
    segments (no ``video_id``) whose id is."""
    wanted = list(dict.fromkeys(validate_video_ids(video_ids)))
    out: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(wanted), IDS_PER_FILTER):
        quoted = ", ".join(f'"{i}"' for i in wanted[start : start + IDS_PER_FILTER])
        expr = f"video_id in [{quoted}] or id in [{quoted}]"  # ids hold no quote or backslash
        for row in index.iter_rows(fields, filter=expr):
            out.setdefault(str(row["video_id"]), []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: int(r["segment"]))
    return out


MAX_METADATA_DEPTH = 32  # lists/objects nested deeper are refused (JSON parsers recurse)
_INT64 = 1 << 63
_JSON_TYPES = "strings, finite numbers, booleans, null, lists and objects"


def check_metadata(metadata: Mapping[str, Any] | None) -> None:
    """Refuse metadata that is not ``{id or path: {field: value}}``, uses a reserved field, or
    holds a value Milvus's JSON cannot keep as given: NaN/inf (stored as null), an int outside
    int64, a non-string object key, or a non-JSON type (anywhere inside nested values)."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(
            "metadata must be a dict {video id or path: {field: value}}, got "
            f"{type(metadata).__name__}"
        )
    for key, value in metadata.items():
        if not isinstance(value, Mapping):
            raise InvalidInputError(
                f"metadata for {key!r} must be a dict, got {type(value).__name__}"
            )
        if not all(isinstance(k, str) and k for k in value):
            raise InvalidInputError(
                f"metadata for {key!r}: field names must be non-empty strings, got "
                f"{[k for k in value if not (isinstance(k, str) and k)][:5]!r}"
            )
        clash = set(value) & _RESERVED
        if clash or any(str(k).startswith("$") for k in value):
            raise InvalidInputError(
                f"metadata for {key!r} uses reserved field names {sorted(clash) or list(value)}"
            )
        for name, item in value.items():
            problem = _json_problem(item, 0)
            if problem:
                raise InvalidInputError(f"metadata for {key!r}: field {name!r} {problem}")


def _json_problem(value: Any, depth: int) -> str:
    """Why ``value`` cannot be stored as JSON exactly ("" when it can)."""
    if value is None or isinstance(value, bool | str):
        return ""
    if isinstance(value, int):
        return "" if -_INT64 <= value < _INT64 else f"holds {value}, outside the int64 range"
    if isinstance(value, float):
        return "" if math.isfinite(value) else f"holds {value!r}: use finite numbers (or null)"
    if depth >= MAX_METADATA_DEPTH:
        return f"is nested deeper than {MAX_METADATA_DEPTH} levels"
    if isinstance(value, list | tuple):
        return next((p for p in (_json_problem(v, depth + 1) for v in value) if p), "")
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            return "holds an object with non-string keys"
        return next((p for p in (_json_problem(v, depth + 1) for v in value.values()) if p), "")
    return f"holds a {type(value).__name__}: use JSON values ({_JSON_TYPES})"


def user_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The user metadata of a Milvus row (everything but the row's own fields and the score)."""
    return {k: v for k, v in row.items() if k not in _RESERVED}


def same_metadata(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal user metadata (compared as canonical JSON: Milvus returns what was written)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
