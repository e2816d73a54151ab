"""MSR-VTT in the CLIP4Clip layout.

Files under ``root``:

- ``MSRVTT_data.json``: ``{"videos": [{"video_id": "video0", "split": "train"|"validate"|"test",
  "url", "start time", "end time", "category", "id"}, ...], "sentences": [{"video_id",
  "caption", "sen_id"}, ...]}`` - 20 captions per video.
- ``MSRVTT_train.9k.csv`` / ``MSRVTT_train.7k.csv``: one column ``video_id``.
- ``MSRVTT_JSFUSION_test.csv``: columns ``key,vid_key,video_id,sentence``; the 1k-A test split,
  one caption per video (its ``sentence`` column).

Videos: ``<videos_dir>/<video_id>.mp4`` (CLIP4Clip falls back to ``.webm``).

Splits: ``train`` (= ``train9k``, every caption of the 9k videos), ``train7k``, ``test``
(1k-A: 1,000 videos, one caption each), ``val`` (the official 497 ``validate`` videos) and
``test_full`` (the official 2,990 ``test`` videos, 20 captions each).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tb_reranker.data.base import (
    DatasetLoader,
    VideoEntry,
    clean_caption,
    malformed,
    read_csv_rows,
    read_json,
    video_candidates,
)

__all__ = ["MSRVTT"]

_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")
_TRAIN_CSV = {"train": "MSRVTT_train.9k.csv", "train9k": "MSRVTT_train.9k.csv"}
_TRAIN_CSV["train7k"] = "MSRVTT_train.7k.csv"
_OFFICIAL_SPLIT = {"val": "validate", "test_full": "test"}


def _read_data_json(path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """(videos records, captions by video id) of ``MSRVTT_data.json``."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise malformed(path, 'expected an object with a "sentences" list')
    videos = data.get("videos", [])
    if not isinstance(videos, list):
        raise malformed(path, '"videos" must be a list')
    captions: dict[str, list[str]] = defaultdict(list)
    for i, sentence in enumerate(data["sentences"]):
        if not isinstance(sentence, dict) or not isinstance(sentence.get("video_id"), str):
            raise malformed(path, f'sentences[{i}] has no string "video_id"')
        if "caption" not in sentence:
            raise malformed(path, f'sentences[{i}] has no "caption"')
        caption = clean_caption(path, sentence["caption"], f"sentences[{i}]")
        if caption:
            captions[sentence["video_id"]].append(caption)
    for i, video in enumerate(videos):
        if not isinstance(video, dict) or not isinstance(video.get("video_id"), str):
            raise malformed(path, f'videos[{i}] has no string "video_id"')
    return videos, captions


def _read(root: Path, split: str, videos_dir: Path) -> list[VideoEntry]:
    if split == "test":  # 1k-A: the CSV alone, one caption per row
        path = root / "MSRVTT_JSFUSION_test.csv"
        rows = read_csv_rows(path, required=("video_id", "sentence"))
        order: list[str] = []
        captions: dict[str, list[str]] = defaultdict(list)
        for line, row in enumerate(rows, start=2):
            video_id = row["video_id"].strip()
            if not video_id:
                raise malformed(path, f"line {line}: empty video_id")
            caption = clean_caption(path, row["sentence"], f"line {line}")
            if not caption:
                raise malformed(path, f"line {line}: empty sentence")
            if video_id not in captions:
                order.append(video_id)
            captions[video_id].append(caption)
    else:
        data_path = root / "MSRVTT_data.json"
        if split in _TRAIN_CSV:
            csv_path = root / _TRAIN_CSV[split]
            rows = read_csv_rows(csv_path, required=("video_id",))
            order = list(dict.fromkeys(row["video_id"].strip() for row in rows if row["video_id"]))
            if not order:
                raise malformed(csv_path, "no video ids")
            _, captions = _read_data_json(data_path)
        else:
            videos, captions = _read_data_json(data_path)
            wanted = _OFFICIAL_SPLIT[split]
            order = list(dict.fromkeys(v["video_id"] for v in videos if v.get("split") == wanted))
            if not order:
                raise malformed(data_path, f'no videos with "split": "{wanted}"')
        absent = [video_id for video_id in order if not captions.get(video_id)]
        if absent:
            source = f" (listed in {root / _TRAIN_CSV[split]})" if split in _TRAIN_CSV else ""
            raise malformed(
                data_path,
                f"{len(absent)} video(s) of split {split!r}{source} have no caption: {absent[:5]}",
            )
    return [
        VideoEntry(
            video_id=video_id,
            captions=tuple(captions[video_id]),
            candidates=video_candidates(videos_dir, video_id, _EXTENSIONS),
        )
        for video_id in order
    ]


MSRVTT = DatasetLoader(
    name="msrvtt",
    splits=("train", "train9k", "train7k", "test", "val", "test_full"),
    read=_read,
    videos_dirs=("MSRVTT_Videos", "videos/all", "videos", "TrainValVideo"),
    description="MSR-VTT, CLIP4Clip files (MSRVTT_data.json, MSRVTT_train.9k.csv, "
    "MSRVTT_JSFUSION_test.csv); test = 1k-A",
)
