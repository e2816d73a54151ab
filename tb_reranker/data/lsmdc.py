"""LSMDC (Large Scale Movie Description Challenge, 2016 files).

Files under ``root``, tab-separated, no header, six fields a line:
``<CLIP_ID> <START_ALIGNED> <END_ALIGNED> <START_EXTRACTED> <END_EXTRACTED> <SENTENCE>``;
``LSMDC16_annos_training.csv`` (train), ``LSMDC16_annos_val.csv`` (val) and
``LSMDC16_challenge_1000_publictect.csv`` (test: the 1,000-clip retrieval test set; the
misspelling is the real file name). A clip id may carry several sentences; they become the
captions of one video.

Clip ids are ``<movie>_<hh.mm.ss.mmm>-<hh.mm.ss.mmm>``, e.g.
``0001_American_Beauty_00.00.51.926-00.00.54.129``; clips are distributed in one folder per
movie: ``<videos_dir>/<movie>/<clip_id>.avi`` (a flat ``<videos_dir>/<clip_id>.avi`` is
found too). Clips are already cut, so items carry no segment times.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tb_reranker.data.base import (
    VIDEO_EXTENSIONS,
    DatasetLoader,
    VideoEntry,
    clean_caption,
    malformed,
    read_text,
    video_candidates,
)

__all__ = ["LSMDC", "lsmdc_movie"]

_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",
}
_EXTENSIONS = (".avi", *(ext for ext in VIDEO_EXTENSIONS if ext != ".avi"))


def lsmdc_movie(clip_id: str) -> str:
    """The movie folder of a clip: the id without its last ``_<start>-<end>`` part."""
    movie, sep, times = clip_id.rpartition("_")
    return movie if sep and movie and "-" in times else clip_id


def _read(root: Path, split: str, videos_dir: Path) -> list[VideoEntry]:
    path = root / _FILES[split]
    captions: dict[str, list[str]] = defaultdict(list)
    order: list[str] = []
    for line_number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 6:
            raise malformed(
                path, f"line {line_number}: expected 6 tab-separated fields, got {len(fields)}"
            )
        clip_id = fields[0].strip()
        if not clip_id:
            raise malformed(path, f"line {line_number}: empty clip id")
        # A sentence containing a tab would split further: keep everything after field 5.
        caption = clean_caption(path, "\t".join(fields[5:]), f"line {line_number}")
        if clip_id not in captions:
            order.append(clip_id)
        if caption:
            captions[clip_id].append(caption)
    entries: list[VideoEntry] = []
    for clip_id in order:
        if not captions[clip_id]:
            raise malformed(path, f"clip {clip_id}: empty sentence")
        movie_dir = videos_dir / lsmdc_movie(clip_id)
        candidates = (
            *video_candidates(movie_dir, clip_id, _EXTENSIONS),
            *video_candidates(videos_dir, clip_id, _EXTENSIONS),
        )
        entries.append(VideoEntry(clip_id, tuple(captions[clip_id]), candidates))
    if not entries:
        raise malformed(path, "no clips")
    return entries


LSMDC = DatasetLoader(
    name="lsmdc",
    read=_read,
    videos_dirs=("videos", "avi"),
    description="LSMDC 2016 (LSMDC16_annos_training.csv, LSMDC16_challenge_1000_publictect.csv)",
)
