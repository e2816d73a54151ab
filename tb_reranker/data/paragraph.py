"""Paragraph-to-video datasets (CLIP4Clip protocol): DiDeMo and ActivityNet Captions.

Every sentence of a video is joined, in annotation order, into one paragraph: each video has
exactly one text, and retrieval is paragraph <-> whole video.

DiDeMo (LocalizingMoments files): ``train_data.json`` / ``val_data.json`` / ``test_data.json``,
a list of ``{"video": "<file name>", "description": str, "times": [[s, e], ...],
"annotation_id", ...}`` (several entries per video); optional ``<split>_list.txt`` restricts
the split to the ids it lists, as in CLIP4Clip. The ``video`` value is the original file
name with its extension (``.mov``, ``.avi``, ``.mp4``, ...); a converted copy such as
``<video>.mp4`` or ``<stem>.mp4`` is found too.

ActivityNet Captions: ``train.json`` / ``val_1.json``: ``{"v_<id>": {"duration": s,
"timestamps": [[s, e], ...], "sentences": [...]}}``; optional ``train_ids.json`` /
``val_ids.json`` (lists of keys) restrict the split. ``val`` and ``test`` both read
``val_1.json`` (the usual paragraph-retrieval test set). Videos ``v_<id>.mp4`` (official
downloader) or ``<id>.mp4`` (CLIP4Clip's copies), any known extension.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tb_reranker.data.base import (
    VIDEO_EXTENSIONS,
    DatasetLoader,
    VideoEntry,
    clean_caption,
    malformed,
    read_id_list,
    read_json,
    video_candidates,
)

__all__ = ["DIDEMO", "ACTIVITYNET"]

logger = logging.getLogger(__name__)


def _restrict(order: list[str], listed: list[str] | None, split: str, name: str) -> list[str]:
    """Ids of ``listed`` (in its order) that have texts; all of ``order`` without a list."""
    if listed is None:
        return order
    known = set(order)
    kept = [video_id for video_id in listed if video_id in known]
    if len(kept) < len(listed):
        logger.info(
            "%s %s: %d listed video(s) have no annotation and are skipped",
            name,
            split,
            len(listed) - len(kept),
        )
    return kept


def _didemo_candidates(videos_dir: Path, video: str) -> tuple[Path, ...]:
    candidates = [videos_dir / video, *video_candidates(videos_dir, video)]
    suffix = Path(video).suffix
    if suffix.lower() in VIDEO_EXTENSIONS or suffix.lower() in (".mpeg4", ".m2ts"):
        candidates += video_candidates(videos_dir, video[: -len(suffix)])
    return tuple(dict.fromkeys(candidates))


def _read_didemo(root: Path, split: str, videos_dir: Path) -> list[VideoEntry]:
    path = root / f"{split}_data.json"
    data = read_json(path)
    if not isinstance(data, list):
        raise malformed(path, "expected a list of moment annotations")
    sentences: dict[str, list[str]] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise malformed(path, f"item {i} is not an object")
        video = item.get("video")
        if not isinstance(video, str) or not video.strip():
            raise malformed(path, f'item {i} has no "video" file name')
        if "description" not in item:
            raise malformed(path, f'item {i} has no "description"')
        text = clean_caption(path, item["description"], f"item {i}")
        texts = sentences.setdefault(video.strip(), [])
        if text:
            texts.append(text)
    order = [video for video, texts in sentences.items() if texts]
    list_path = root / f"{split}_list.txt"
    listed = read_id_list(list_path) if list_path.is_file() else None
    order = _restrict(order, listed, split, "didemo")
    return [
        VideoEntry(
            video_id=video,
            captions=(" ".join(sentences[video]),),
            candidates=_didemo_candidates(videos_dir, video),
        )
        for video in order
    ]


_ACTIVITYNET_FILES = {"train": ("train.json", "train_ids.json")}
_ACTIVITYNET_FILES["val"] = _ACTIVITYNET_FILES["test"] = ("val_1.json", "val_ids.json")


def _read_activitynet(root: Path, split: str, videos_dir: Path) -> list[VideoEntry]:
    captions_name, ids_name = _ACTIVITYNET_FILES[split]
    path = root / captions_name
    data = read_json(path)
    if not isinstance(data, dict):
        raise malformed(path, 'expected an object mapping "v_<id>" to annotations')
    paragraphs: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(value, dict) or not isinstance(value.get("sentences"), list):
            raise malformed(path, f'{key}: expected an object with a "sentences" list')
        texts = [
            clean_caption(path, sentence, f"{key}.sentences[{i}]")
            for i, sentence in enumerate(value["sentences"])
        ]
        paragraph = " ".join(text for text in texts if text)
        if paragraph:
            paragraphs[key] = paragraph
        duration = value.get("duration")
        if duration is not None and not isinstance(duration, (int, float)):
            raise malformed(path, f"{key}: duration must be a number")
    ids_path = root / ids_name
    listed = None
    if ids_path.is_file():
        listed = read_json(ids_path)
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise malformed(ids_path, "expected a list of video id strings")
        listed = list(dict.fromkeys(listed))
    order = _restrict(list(paragraphs), listed, split, "activitynet")
    entries: list[VideoEntry] = []
    for key in order:
        stems = [key] + ([key[2:]] if key.startswith("v_") else [f"v_{key}"])
        candidates = tuple(p for stem in stems for p in video_candidates(videos_dir, stem))
        entries.append(VideoEntry(video_id=key, captions=(paragraphs[key],), candidates=candidates))
    return entries


DIDEMO = DatasetLoader(
    name="didemo",
    read=_read_didemo,
    videos_dirs=("videos", "DiDeMo_Videos"),
    description="DiDeMo paragraph-to-video (train/val/test_data.json, optional <split>_list.txt)",
)

ACTIVITYNET = DatasetLoader(
    name="activitynet",
    read=_read_activitynet,
    videos_dirs=("videos", "Activity_Videos"),
    description="ActivityNet Captions paragraph-to-video (train.json, val_1.json)",
)
