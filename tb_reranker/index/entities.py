"""Rows as Milvus takes and gives them: a row checked before an upsert, an entity flattened after
a read (its ``$meta`` dynamic fields merged in, its vector dropped unless asked for, and the
segment fields of a row written before segments filled in: segment 0 of the video of its id)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError
from tb_reranker.index import schema as milvus_schema
from tb_reranker.stores.record import split_key, validate_record_key

__all__ = ["ROW_FIELDS", "BATCH", "OUTPUT_FIELDS", "prepare_rows", "flatten"]

# fields every row carries (besides dynamic metadata)
ROW_FIELDS = ("id", "cls", *milvus_schema.SCALAR_FIELDS, *milvus_schema.SEGMENT_FIELDS)
BATCH = 1000  # rows per upsert / ids per get/delete request
# what reads return: the scalar and segment fields + "$meta" (every dynamic field), not the
# D-float vector; Milvus Lite 3.x and the 2.3 server accept this list for schema 1 (the segment
# fields are dynamic there) and 2 alike
OUTPUT_FIELDS = (*milvus_schema.SCALAR_FIELDS, *milvus_schema.SEGMENT_FIELDS, "$meta")


def _vector(value: Any, dim: int | None, what: str) -> list[float]:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != 1 or (dim is not None and array.shape[0] != dim):
        raise InvalidInputError(f"{what}: vector must have shape [{dim}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{what}: vector contains NaN/inf")
    return array.tolist()


def _row(row: Mapping[str, Any], dim: int | None) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise InvalidInputError(f"a row must be a dict, got {type(row).__name__}")
    video_id = validate_record_key(row.get("id"))
    out = dict(row)
    out["cls"] = _vector(row.get("cls"), dim, f"row {video_id!r}")
    out["uri"] = str(row.get("uri", ""))
    duration = float(row.get("duration_s", 0.0))
    if not math.isfinite(duration) or duration < 0:
        raise InvalidInputError(f"row {video_id!r}: bad duration_s {duration!r}")
    out["duration_s"] = duration
    out["num_frames"] = int(row.get("num_frames", 0))
    out["content_hash"] = str(row.get("content_hash", ""))
    _segment_fields(out, video_id, duration)
    if len(out["uri"].encode()) > milvus_schema.URI_MAX_LENGTH:
        raise InvalidInputError(
            f"row {video_id!r}: uri longer than {milvus_schema.URI_MAX_LENGTH} bytes"
        )
    for key, value in out.items():
        if key.startswith("$"):
            raise InvalidInputError(f"row {video_id!r}: field name {key!r} is reserved")
        if isinstance(value, np.generic):
            out[key] = value.item()
    return out


def _segment_fields(out: dict[str, Any], key: str, duration: float) -> None:
    """``video_id``/``segment`` from the key (a row that gives them must agree), ``start_s`` 0
    and ``end_s`` the duration unless given; ``InvalidInputError`` for a span that is not one."""
    video_id, segment = split_key(key)
    if out.get("video_id", video_id) != video_id or out.get("segment", segment) != segment:
        raise InvalidInputError(
            f"row {key!r}: video_id {out.get('video_id')!r} / segment {out.get('segment')!r} "
            f"disagree with its key (segment {segment} of {video_id!r})"
        )
    start = float(out.get("start_s", 0.0))
    end = float(out.get("end_s", duration))
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end):
        raise InvalidInputError(f"row {key!r}: bad segment span [{start!r}, {end!r}]")
    out.update(video_id=video_id, segment=segment, start_s=start, end_s=end)


def prepare_rows(rows: Iterable[Mapping[str, Any]], dim: int | None) -> list[dict[str, Any]]:
    """Rows checked and converted for an upsert (``cls`` of ``dim`` finite floats, the scalar
    fields typed, ids valid and distinct); ``InvalidInputError`` for the first bad one."""
    prepared = [_row(r, dim) for r in rows]
    ids = [r["id"] for r in prepared]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise InvalidInputError(f"duplicate ids in one upsert: {dupes[:10]}")
    return prepared


def flatten(entity: Mapping[str, Any], drop_vector: bool = True) -> dict[str, Any]:
    """An entity as one flat dict: its ``$meta`` fields merged in, ``cls`` dropped unless
    ``drop_vector`` is False. A row written before segments (it has an ``id`` and no
    ``video_id``) reads as segment 0 of the video of its id, ``[0, duration_s]`` (``end_s`` only
    when ``duration_s`` was read)."""
    out: dict[str, Any] = {}
    for key, value in entity.items():
        if key == "$meta" and isinstance(value, Mapping):
            out.update(value)
        elif key == "cls" and drop_vector:
            continue
        else:
            out[key] = value
    if "id" in out and out.get("video_id") is None:
        out.update(video_id=str(out["id"]), segment=0, start_s=0.0)
        if "duration_s" in out:
            out["end_s"] = float(out["duration_s"])
    return out
