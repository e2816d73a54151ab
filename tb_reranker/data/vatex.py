"""VATEX (English captions).

Files under ``root``: ``vatex_training_v1.0.json`` and ``vatex_validation_v1.0.json``, each a
list of ``{"videoID": "<youtube id>_<start 6 digits>_<end 6 digits>", "enCap": [10 English
captions], "chCap": [10 Chinese captions]}``.

Splits: ``train`` reads the training file, ``val`` and ``test`` the validation file (the
official test set has no public English captions). When ``<split>_list.txt`` exists (the
HGR / CLIP4Clip-derived retrieval split: ``train_list.txt``, ``val_list.txt``,
``test_list.txt``, ids drawn from both official files) the split is exactly the ids it lists,
with captions from either file.

Videos: ``<videos_dir>/<videoID>.mp4`` (clips already cut to the 10-second segment).
"""

from __future__ import annotations

from pathlib import Path

from tb_reranker.data.base import (
    DatasetLoader,
    VideoEntry,
    clean_captions,
    malformed,
    read_id_list,
    read_json,
    video_candidates,
)

__all__ = ["VATEX"]

_FILES = {
    "train": "vatex_training_v1.0.json",
    "val": "vatex_validation_v1.0.json",
    "test": "vatex_validation_v1.0.json",
}


def _read_file(path: Path) -> dict[str, list[str]]:
    """English captions by video id, in file order."""
    data = read_json(path)
    if not isinstance(data, list):
        raise malformed(path, "expected a list of videos")
    captions: dict[str, list[str]] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("videoID"), str):
            raise malformed(path, f'item {i} has no string "videoID"')
        texts = clean_captions(
            path,
            item.get("enCap"),
            f"{item['videoID']}.enCap",
            f'item {i} ({item["videoID"]}) has no "enCap" list',
        )
        captions.setdefault(item["videoID"].strip(), []).extend(texts)
    return captions


def _read(root: Path, split: str, videos_dir: Path) -> list[VideoEntry]:
    list_path = root / f"{split}_list.txt"
    if list_path.is_file():
        captions: dict[str, list[str]] = {}
        for name in dict.fromkeys(_FILES.values()):
            if (root / name).is_file():
                captions.update(_read_file(root / name))
        if not captions:
            _read_file(root / _FILES[split])  # raises NotFoundError naming the file
        order = read_id_list(list_path)
        absent = [video_id for video_id in order if not captions.get(video_id)]
        if absent:
            raise malformed(
                list_path, f"{len(absent)} listed video(s) have no caption: {absent[:5]}"
            )
    else:
        captions = _read_file(root / _FILES[split])
        order = [video_id for video_id, texts in captions.items() if texts]
    return [
        VideoEntry(
            video_id=video_id,
            captions=tuple(captions[video_id]),
            candidates=video_candidates(videos_dir, video_id),
        )
        for video_id in order
    ]


VATEX = DatasetLoader(
    name="vatex",
    read=_read,
    videos_dirs=("videos", "vatex_videos"),
    description="VATEX English captions (vatex_training_v1.0.json, vatex_validation_v1.0.json)",
)
