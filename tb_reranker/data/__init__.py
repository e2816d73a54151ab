"""Text-video retrieval dataset annotations: MSR-VTT, MSVD, DiDeMo, ActivityNet Captions, VATEX,
LSMDC and the project's own folder format.

>>> dataset = load_dataset("msrvtt", "/data/msrvtt", split="test")     # doctest: +SKIP
>>> dataset.texts, dataset.text_to_video, dataset.videos_paths          # doctest: +SKIP

Loaders read annotation files only (nothing is decoded). Video files are looked up under their
conventional names; the ones that are absent are left out of ``videos``, listed in
``missing`` and summed up in one log warning (``check_files=False`` skips the lookup and keeps
every video at its first conventional path). Malformed annotations raise
:class:`~tb_reranker.errors.InvalidInputError` naming the file and the problem; absent
annotation files raise :class:`~tb_reranker.errors.NotFoundError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tb_reranker.data.base import (
    VIDEO_EXTENSIONS,
    DatasetLoader,
    VideoEntry,
    VideoItem,
    VideoTextDataset,
    check_split,
    safe_pickle_load,
)
from tb_reranker.data.folder import CAPTIONS_FILE, FOLDER
from tb_reranker.data.lsmdc import LSMDC
from tb_reranker.data.msrvtt import MSRVTT
from tb_reranker.data.msvd import MSVD
from tb_reranker.data.paragraph import ACTIVITYNET, DIDEMO
from tb_reranker.data.vatex import VATEX
from tb_reranker.errors import InvalidInputError, NotFoundError

__all__ = [
    "LOADERS",
    "ALIASES",
    "CAPTIONS_FILE",
    "VIDEO_EXTENSIONS",
    "DatasetLoader",
    "VideoItem",
    "VideoTextDataset",
    "load_dataset",
    "safe_pickle_load",
]

logger = logging.getLogger(__name__)

# Canonical name -> loader. ``load_dataset`` also accepts the ALIASES below.
LOADERS: dict[str, DatasetLoader] = {
    loader.name: loader for loader in (MSRVTT, MSVD, DIDEMO, ACTIVITYNET, VATEX, LSMDC, FOLDER)
}
ALIASES = {
    "msrvtt": "msrvtt",
    "msvd": "msvd",
    "youtube2text": "msvd",
    "didemo": "didemo",
    "activitynet": "activitynet",
    "activitynetcaptions": "activitynet",
    "anet": "activitynet",
    "vatex": "vatex",
    "lsmdc": "lsmdc",
    "generic": "generic",
    "folder": "generic",
    "synth": "generic",
    "synthetic": "generic",
}

_MISSING_SHOWN = 5  # ids named in the missing-files warning


def _canonical_name(name: str) -> str:
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    if key not in ALIASES:
        raise InvalidInputError(f"unknown dataset {name!r}; known datasets: {sorted(LOADERS)}")
    return ALIASES[key]


def _default_videos_dir(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def _resolve(entry: VideoEntry) -> Path | None:
    for candidate in entry.candidates:
        if candidate.is_file():
            return candidate
    return None


def _videos_path(
    loader: DatasetLoader, root: Path, videos_dir: str | Path | None, check_files: bool
) -> Path | None:
    """The folder of the video files: ``videos_dir`` (checked when ``check_files``), else the
    loader's conventional folder under ``root`` (or ``root``), else None (the loader decides)."""
    if videos_dir is not None:
        videos_path = Path(videos_dir).expanduser()
        if check_files and not videos_path.is_dir():
            raise NotFoundError(f"videos directory not found: {videos_path}")
        return videos_path
    if loader.videos_dirs:
        return _default_videos_dir(root, loader.videos_dirs)
    return None


def _video_items(
    entries: Sequence[VideoEntry], check_files: bool
) -> tuple[list[VideoItem], list[str]]:
    """(the entries as items with their file path, the ids whose file was not found)."""
    videos: list[VideoItem] = []
    missing: list[str] = []
    for entry in entries:
        path = _resolve(entry) if check_files else entry.candidates[0]
        if path is None:
            missing.append(entry.video_id)
            continue
        videos.append(
            VideoItem(
                video_id=entry.video_id,
                path=str(path),
                captions=entry.captions,
                start_s=entry.start_s,
                end_s=entry.end_s,
            )
        )
    return videos, missing


def _warn_missing(name: str, split: str, missing: list[str], num_entries: int, where: str) -> None:
    """Log the video files not found (the first few ids), with a hint when none was."""
    hint = " - none at all: pass videos_dir (the folder holding them)" * (
        len(missing) == num_entries
    )
    logger.warning(
        "%s %s: %d of %d video files not found under %s (skipped): %s%s%s",
        name,
        split,
        len(missing),
        num_entries,
        where,
        ", ".join(missing[:_MISSING_SHOWN]),
        ", ..." if len(missing) > _MISSING_SHOWN else "",
        hint,
    )


def load_dataset(
    name: str,
    root: str | Path,
    split: str = "test",
    *,
    videos_dir: str | Path | None = None,
    check_files: bool = True,
) -> VideoTextDataset:
    """Read the annotations of one split of a dataset.

    Args:
        name: a key of :data:`LOADERS` (case, ``-`` and ``_`` ignored; aliases such as
            ``"msr-vtt"``, ``"activitynet_captions"``, ``"synth"`` accepted).
        root: the directory holding the annotation files.
        split: a split of that dataset (``DatasetLoader.splits``).
        videos_dir: where the video files are; default: the dataset's conventional folder
            under ``root`` (``DatasetLoader.videos_dirs``), else ``root``.
        check_files: look each video file up (and leave out, report the absent ones).

    Returns:
        The split, videos in annotation order.

    Raises:
        InvalidInputError: unknown dataset or split, malformed annotation file.
        NotFoundError: ``root``, ``videos_dir`` or an annotation file does not exist.
    """
    loader = LOADERS[_canonical_name(name)]
    check_split(loader, split)
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise NotFoundError(f"dataset directory not found: {root_path}")
    videos_path = _videos_path(loader, root_path, videos_dir, check_files)
    entries = loader.read(root_path, split, videos_path)
    if not entries:
        raise InvalidInputError(
            f"dataset {loader.name!r} under {root_path} has no video in split {split!r}"
        )

    videos, missing = _video_items(entries, check_files)
    where = str(videos_path if videos_path is not None else root_path)
    if missing:
        _warn_missing(loader.name, split, missing, len(entries), where)
    dataset = VideoTextDataset(
        name=loader.name,
        root=str(root_path),
        split=split,
        videos=videos,
        missing=missing,
        videos_dir=where,
    )
    logger.info("loaded %s", dataset.summary())
    return dataset
