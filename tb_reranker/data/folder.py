"""The project's own dataset folder format (written by ``tb synth``).

``<root>/captions.jsonl``: one JSON object a line, one line per video::

    {"video_id": "synth_00012", "path": "videos/synth_00012.mp4",
     "captions": ["a red square moves left", ...], "split": "train"|"val"|"test"}

``path`` is relative to ``root`` (default ``videos/<video_id>.mp4``); optional ``start_s`` /
``end_s`` (seconds) describe a segment of the file. With ``videos_dir`` given, files are
looked up as ``<videos_dir>/<file name of path>`` instead. Split ``all`` loads every line.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from tb_reranker.data.base import (
    DatasetLoader,
    VideoEntry,
    clean_captions,
    malformed,
    read_text,
)

__all__ = ["FOLDER", "CAPTIONS_FILE"]

CAPTIONS_FILE = "captions.jsonl"


def _time(path: Path, line: int, record: dict, key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise malformed(path, f"line {line}: {key!r} must be a number of seconds >= 0")
    return float(value)


def _read(root: Path, split: str, videos_dir: Path | None) -> list[VideoEntry]:
    path = root / CAPTIONS_FILE
    entries: list[VideoEntry] = []
    seen: set[str] = set()
    for line_number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise malformed(path, f"line {line_number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise malformed(path, f"line {line_number}: expected a JSON object")
        video_id = record.get("video_id")
        if not isinstance(video_id, str) or not video_id.strip():
            raise malformed(path, f'line {line_number}: "video_id" must be a non-empty string')
        if video_id in seen:
            raise malformed(path, f"line {line_number}: duplicate video_id {video_id!r}")
        seen.add(video_id)
        record_split = record.get("split")
        if not isinstance(record_split, str):
            raise malformed(path, f'line {line_number}: "split" must be a string')
        captions = clean_captions(
            path,
            record.get("captions"),
            f"line {line_number} captions",
            f'line {line_number}: "captions" must be a list of strings',
        )
        if not captions:
            raise malformed(path, f"line {line_number}: video {video_id!r} has no caption")
        relative = record.get("path", f"videos/{video_id}.mp4")
        if not isinstance(relative, str) or not relative:
            raise malformed(path, f'line {line_number}: "path" must be a non-empty string')
        posix = PurePosixPath(relative.replace("\\", "/"))
        if posix.is_absolute() or ".." in posix.parts:
            raise malformed(path, f"line {line_number}: path {relative!r} must stay inside {root}")
        start_s = _time(path, line_number, record, "start_s")
        end_s = _time(path, line_number, record, "end_s")
        if start_s is not None and end_s is not None and end_s <= start_s:
            raise malformed(path, f"line {line_number}: end_s must be greater than start_s")
        if split != "all" and record_split != split:
            continue
        file_path = root.joinpath(*posix.parts) if videos_dir is None else videos_dir / posix.name
        entries.append(
            VideoEntry(video_id, tuple(captions), (file_path,), start_s=start_s, end_s=end_s)
        )
    return entries


FOLDER = DatasetLoader(
    name="generic",
    splits=("train", "val", "test", "all"),
    read=_read,
    videos_dirs=(),  # paths come from captions.jsonl
    description="tb_reranker folder format (captions.jsonl + videos/), as written by `tb synth`",
)
