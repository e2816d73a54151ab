"""Segment rows grouped by video: what a grouped broad search returns, and its helpers.

A video is stored as segments (one Milvus row each, ``id`` = the segment key, ``video_id`` = the
video). A grouped search returns, per query, the segment rows of the top ``limit`` videos (ranked
by their best segment), at most ``per_video`` segments each, best first: one flat list, videos in
order, each video's segments together.

Rows written before segments carry no ``video_id``: :func:`segment_fields` reads such a row as
segment 0 of the video of its id, spanning ``[0, duration_s]``. Pure Python: no pymilvus here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "END_TOLERANCE_S",
    "first_read",
    "group_by_video",
    "is_complete",
    "segment_fields",
    "video_filter",
]

Row = dict[str, Any]
END_TOLERANCE_S = 1e-3  # a segment ending this close to the video's end is its last
FIRST_READ = (4, 256)  # segment numbers a fill-in by key asks for first, at least and at most


def segment_fields(row: Mapping[str, Any]) -> Row:
    """``row`` with ``video_id``, ``segment``, ``start_s`` and ``end_s`` set: a row without
    ``video_id`` (written before segments) is segment 0 of its own video, ``[0, duration_s]``."""
    out = dict(row)
    if out.get("video_id") in (None, ""):
        out["video_id"] = str(out["id"])
        out.setdefault("segment", 0)
        out.setdefault("start_s", 0.0)
        out.setdefault("end_s", out.get("duration_s") or 0.0)
    out["video_id"] = str(out["video_id"])
    out["segment"] = int(out.get("segment") or 0)
    out["start_s"] = float(out.get("start_s") or 0.0)
    end = out.get("end_s")
    out["end_s"] = float(end if end is not None else out.get("duration_s") or 0.0)
    return out


def group_by_video(
    rows: Iterable[Mapping[str, Any]], limit: int, per_video: int
) -> list[list[Row]]:
    """The first ``limit`` videos of ``rows`` in order of their best row (ties: first seen),
    each with its rows best first (ties: first seen), at most ``per_video``."""
    ordered = sorted((segment_fields(r) for r in rows), key=lambda r: -float(r["score"]))
    groups: dict[str, list[Row]] = {}
    for row in ordered:
        group = groups.get(row["video_id"])
        if group is None:
            if len(groups) >= limit:
                continue
            group = groups[row["video_id"]] = []
        if len(group) < per_video:
            group.append(row)
    return list(groups.values())


def is_complete(group: Sequence[Mapping[str, Any]], per_video: int) -> bool:
    """Whether ``group`` (one video's rows found so far) holds all ``per_video`` best segments
    the video can give: it is full, or it holds every segment of the video (numbers 0..n, the
    last ending at the video's end; a short clip is segment 0 of ``[0, duration]``)."""
    if len(group) >= per_video:
        return True
    numbers = sorted(int(row["segment"]) for row in group)
    if numbers != list(range(len(numbers))):
        return False
    last = max(group, key=lambda row: int(row["segment"]))
    duration = float(last.get("duration_s") or 0.0)
    return math.isfinite(duration) and float(last["end_s"]) >= duration - END_TOLERANCE_S


def first_read(group: Sequence[Mapping[str, Any]]) -> int:
    """How many segment numbers (``0..n-1``) a fill-in by key first asks for of the video of
    ``group``: its duration over its shortest segment found, one more for a shorter last one,
    past the highest number found (within :data:`FIRST_READ`)."""
    duration = float(group[0].get("duration_s") or 0.0)
    spans = [float(row["end_s"]) - float(row["start_s"]) for row in group]
    shortest = min((span for span in spans if span > 0), default=0.0)
    guess = math.ceil(duration / shortest) + 1 if shortest > 0 and math.isfinite(duration) else 0
    highest = max(int(row["segment"]) for row in group) + 2
    low, high = FIRST_READ
    return min(max(guess, highest, low), high)


def video_filter(video_ids: Sequence[str], base: str = "") -> str:
    """A Milvus filter matching the segments of ``video_ids`` (within ``base`` when given)."""
    expr = f"video_id in [{', '.join(json.dumps(v) for v in video_ids)}]"
    return f"({base}) and {expr}" if base else expr
