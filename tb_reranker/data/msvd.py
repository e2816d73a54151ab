"""MSVD (YouTube2Text) in the CLIP4Clip layout.

Files under ``root``: ``train_list.txt`` / ``val_list.txt`` / ``test_list.txt`` (one video id
per line, e.g. ``-4wsuPCjDBc_5_15``) and ``raw-captions.pkl``: a pickled dict
``video_id -> [[token, token, ...], ...]`` (one token list per caption; captions are the tokens
joined by spaces). The pickle is read by :func:`safe_pickle_load`, which refuses every class
or function reference, so a malicious file raises ``InvalidInputError`` and runs nothing.

Videos: ``<videos_dir>/<video_id>.avi`` (the official archive's ``YouTubeClips`` folder).
"""

from __future__ import annotations

from pathlib import Path

from tb_reranker.data.base import (
    VIDEO_EXTENSIONS,
    DatasetLoader,
    VideoEntry,
    clean_caption,
    malformed,
    read_id_list,
    require_file,
    safe_pickle_load,
    video_candidates,
)

__all__ = ["MSVD"]

_EXTENSIONS = (".avi", *(ext for ext in VIDEO_EXTENSIONS if ext != ".avi"))


def _caption_text(path: Path, value: object, where: str) -> str:
    """A caption stored as a token list (CLIP4Clip) or as a plain string."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(token, str) for token in value):
            raise malformed(path, f"{where}: tokens must be strings")
        return clean_caption(path, " ".join(value), where)
    return clean_caption(path, value, where)


def _read(root: Path, split: str, videos_dir: Path) -> list[VideoEntry]:
    videos_ids = read_id_list(root / f"{split}_list.txt")
    captions_path = require_file(root / "raw-captions.pkl")
    captions = safe_pickle_load(captions_path)
    if not isinstance(captions, dict):
        raise malformed(captions_path, f"expected a dict, got {type(captions).__name__}")
    entries: list[VideoEntry] = []
    for video_id in videos_ids:
        raw = captions.get(video_id)
        if raw is None:
            raise malformed(
                captions_path, f"no captions for video {video_id!r} of {split}_list.txt"
            )
        if not isinstance(raw, (list, tuple)):
            raise malformed(captions_path, f"{video_id}: expected a list of captions")
        texts = [_caption_text(captions_path, cap, f"{video_id}[{i}]") for i, cap in enumerate(raw)]
        texts = [text for text in texts if text]
        if not texts:
            raise malformed(captions_path, f"{video_id}: no non-empty caption")
        entries.append(
            VideoEntry(
                video_id=video_id,
                captions=tuple(texts),
                candidates=video_candidates(videos_dir, video_id, _EXTENSIONS),
            )
        )
    return entries


MSVD = DatasetLoader(
    name="msvd",
    read=_read,
    videos_dirs=("YouTubeClips", "videos"),
    description="MSVD, CLIP4Clip files (train/val/test_list.txt, raw-captions.pkl)",
)
