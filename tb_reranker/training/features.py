"""What training and evaluation read: videos with captions, decoded frames and frozen features.

Decoding is the slow part of an epoch on a CPU, so the frames of a split are decoded once per
(dataset files, T, image size, normalisation) and cached as one fp16 safetensors file; with a
frozen vision backbone the per-video features are cached the same way, keyed by the model's
vision fingerprint (they depend on nothing else: retraining the query side reuses them). Cache
files are written to a temporary name and renamed, so an interrupted run never leaves a half
file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tb_reranker.errors import InvalidInputError, NotFoundError, VideoDecodeError

__all__ = [
    "VideoCaptionSet",
    "FrameSet",
    "FeatureSet",
    "load_video_captions",
    "as_video_caption_set",
    "load_frames",
    "load_model_frames",
    "load_features",
]

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


@dataclass(frozen=True)
class VideoCaptionSet:
    """N videos of one split with their captions (at least one each)."""

    videos_ids: list[str]  # [N] video ids
    paths: list[str]  # [N] absolute video file paths
    captions: list[list[str]]  # [N][C_i] captions of each video
    name: str = "generic"  # dataset name (for logs and cache keys)
    split: str = "test"  # split the videos come from

    def __len__(self) -> int:
        return len(self.videos_ids)

    def subset(self, indices: Sequence[int]) -> VideoCaptionSet:
        """The videos at ``indices``, in that order."""
        return VideoCaptionSet(
            videos_ids=[self.videos_ids[i] for i in indices],
            paths=[self.paths[i] for i in indices],
            captions=[self.captions[i] for i in indices],
            name=self.name,
            split=self.split,
        )


@dataclass(frozen=True)
class FrameSet:
    """Decoded, normalised frames of the videos of a :class:`VideoCaptionSet` that decoded."""

    videos: VideoCaptionSet  # the videos that decoded (failed ones dropped)
    frames: torch.Tensor  # [N, T, 3, H, W] float16, normalised with the model's mean/std
    masks: torch.Tensor  # [N, T] bool, real (True) vs padded frames
    key: str  # cache key (hash of files + decode settings)


@dataclass(frozen=True)
class FeatureSet:
    """Frozen-backbone features of a :class:`FrameSet` (vision fingerprint in the key)."""

    videos: VideoCaptionSet  # same videos as the FrameSet
    cls: torch.Tensor  # [N, D] float32, L2-normalised video CLS
    frames_tokens: torch.Tensor  # [N, T, D] float32 frame tokens
    key: str  # cache key


# ----------------------------------------------------------------------------- datasets


def _read_generic_folder(root: Path, split: str | None) -> VideoCaptionSet:
    """The generic folder format: ``<root>/captions.jsonl`` + ``<root>/videos/<id>.mp4``."""
    index = root / "captions.jsonl"
    if not index.is_file():
        raise NotFoundError(f"no captions.jsonl in dataset folder {root}")
    videos_ids: list[str] = []
    paths: list[str] = []
    captions: list[list[str]] = []
    with open(index, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                video_id = str(row["video_id"])
                rel = str(row.get("path") or f"videos/{video_id}.mp4")
                texts = [str(c) for c in row["captions"]]
                row_split = str(row.get("split", "test"))
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidInputError(f"{index}:{line_no}: malformed row ({exc})") from exc
            if split is not None and row_split != split:
                continue
            if not texts:
                raise InvalidInputError(f"{index}:{line_no}: video {video_id} has no captions")
            videos_ids.append(video_id)
            paths.append(str((root / rel).resolve()))
            captions.append(texts)
    if not videos_ids:
        raise NotFoundError(f"no videos with split {split!r} in {index}")
    return VideoCaptionSet(videos_ids, paths, captions, name="generic", split=split or "all")


def as_video_caption_set(
    dataset: Any, *, name: str = "generic", split: str = "test"
) -> VideoCaptionSet:
    """Adapt what ``tb_reranker.data.load_dataset`` returns (duck-typed) to a VideoCaptionSet.

    Accepts a VideoCaptionSet, or an iterable of items with ``video_id``, ``path`` and
    ``captions`` (attributes or mapping keys).
    """
    if isinstance(dataset, VideoCaptionSet):
        return dataset
    videos_ids: list[str] = []
    paths: list[str] = []
    captions: list[list[str]] = []
    items: Iterable[Any] = dataset.videos if hasattr(dataset, "videos") else dataset
    for item in items:

        def field(key: str, item: Any = item) -> Any:
            return item[key] if isinstance(item, dict) else getattr(item, key)

        texts = field("captions")
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        if not texts:
            continue
        videos_ids.append(str(field("video_id")))
        paths.append(str(field("path")))
        captions.append(texts)
    if not videos_ids:
        raise NotFoundError(f"dataset {name!r} split {split!r} has no videos with captions")
    name = str(getattr(dataset, "name", name))
    split = str(getattr(dataset, "split", split))
    return VideoCaptionSet(videos_ids, paths, captions, name=name, split=split)


def load_video_captions(name: str, root: str | os.PathLike, split: str) -> VideoCaptionSet:
    """Videos and captions of ``split`` of dataset ``name`` under ``root``.

    Uses ``tb_reranker.data.load_dataset`` where it exists; the generic folder format (what
    ``tb synth`` writes) is also read directly so training does not depend on it.
    """
    root = Path(root)
    if not root.exists():
        raise NotFoundError(f"dataset root {root} does not exist")
    try:
        from tb_reranker.data import load_dataset  # type: ignore[attr-defined]
    except ImportError:
        load_dataset = None
    if load_dataset is not None:
        return as_video_caption_set(load_dataset(name, root, split), name=name, split=split)
    if name not in ("generic", "synthetic", "synth"):
        raise InvalidInputError(f"unknown dataset {name!r} (tb_reranker.data is not available)")
    return _read_generic_folder(root, split)


# ----------------------------------------------------------------------------- frame cache


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _files_signature(paths: Sequence[str]) -> list[list[Any]]:
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
            signature.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            signature.append([path, -1, -1])
    return signature


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            if metadata.get("key") != key:
                return None
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # noqa: BLE001 - a broken cache file is re-made, not fatal
        log.warning("ignoring unreadable cache file %s: %s", path, exc)
        return None
    return tensors, metadata


def load_frames(
    videos: VideoCaptionSet,
    *,
    num_frames: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = False,
) -> FrameSet:
    """Decode every video once (``T`` frames, ``image_size``², normalised) → fp16 frames.

    With ``cache_dir`` the result is stored as ``frames-<key>.safetensors`` and reused while the
    files and settings are unchanged. Videos that fail to decode are dropped with a warning;
    ``InvalidInputError`` if none decodes.
    """
    settings = {
        "v": _CACHE_VERSION,
        "T": int(num_frames),
        "size": int(image_size),
        "mean": [round(float(x), 6) for x in mean],
        "std": [round(float(x), 6) for x in std],
    }
    key = _hash({**settings, "files": _files_signature(videos.paths)})
    cache_path = Path(cache_dir) / f"frames-{key}.safetensors" if cache_dir else None
    if cache_path is not None:
        cached = _read_cache(cache_path, key)
        if cached is not None:
            tensors, metadata = cached
            kept = json.loads(metadata["kept"])
            log.info("frames of %d videos from cache %s", len(kept), cache_path)
            return FrameSet(
                videos.subset(kept), tensors["frames"], tensors["masks"].bool(), key=key
            )

    from tb_reranker.video import decode_many  # decoding needs PyAV; imported on use

    frames: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    kept: list[int] = []
    results = decode_many(
        videos.paths,
        num_frames=num_frames,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        workers=workers,
    )
    from tb_reranker.progress import progress as show

    shown = show(results, total=len(videos), desc="decode", unit="video", enabled=progress)
    for i, (path, clip) in enumerate(shown):
        if isinstance(clip, VideoDecodeError):
            log.warning("skipping %s: %s", path, clip.reason)
            continue
        frames.append(np.asarray(clip.frames, dtype=np.float16))
        masks.append(np.asarray(clip.mask, dtype=bool))
        kept.append(i)
    if not kept:
        raise InvalidInputError(f"none of the {len(videos)} videos could be decoded")
    frames_tensor = torch.from_numpy(np.stack(frames))  # [N, T, 3, H, W] fp16
    masks_tensor = torch.from_numpy(np.stack(masks))  # [N, T] bool
    if cache_path is not None:
        _atomic_save(
            {"frames": frames_tensor, "masks": masks_tensor.to(torch.uint8)},
            cache_path,
            {"key": key, "kept": json.dumps(kept), "settings": json.dumps(settings)},
        )
        log.info("cached frames of %d videos in %s", len(kept), cache_path)
    return FrameSet(videos.subset(kept), frames_tensor, masks_tensor, key=key)


def load_model_frames(
    model: torch.nn.Module,
    videos: VideoCaptionSet,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = False,
) -> FrameSet:
    """:func:`load_frames` with the frame count, size and normalisation ``model`` expects."""
    return load_frames(
        videos,
        num_frames=model.num_frames,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
    )


@torch.no_grad()
def load_features(
    model: torch.nn.Module,
    frame_set: FrameSet,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> FeatureSet:
    """``model.encode_frames`` over all frames, once; cached by vision fingerprint + frames key."""
    key = _hash(
        {"v": _CACHE_VERSION, "vision": model.vision_fingerprint(), "frames": frame_set.key}
    )
    cache_path = Path(cache_dir) / f"features-{key}.safetensors" if cache_dir else None
    if cache_path is not None:
        cached = _read_cache(cache_path, key)
        if cached is not None:
            tensors, _ = cached
            log.info("features of %d videos from cache %s", len(frame_set.videos), cache_path)
            return FeatureSet(
                frame_set.videos, tensors["cls"].float(), tensors["frames_tokens"].float(), key
            )
    was_training = model.training
    model.eval()
    device = torch.device(device)
    cls_parts: list[torch.Tensor] = []
    tokens_parts: list[torch.Tensor] = []
    from tb_reranker.progress import progress as show

    starts = range(0, len(frame_set.videos), batch_size)
    for start in show(starts, desc="encode videos", unit="batch", enabled=progress):
        frames = frame_set.frames[start : start + batch_size].to(device=device, dtype=torch.float32)
        masks = frame_set.masks[start : start + batch_size].to(device)  # [b, T]
        cls, frames_tokens = model.encode_frames(frames, masks)  # [b, D], [b, T, D]
        cls_parts.append(cls.float().cpu())
        tokens_parts.append(frames_tokens.float().cpu())
    model.train(was_training)
    cls_all = torch.cat(cls_parts).half().float()  # [N, D], fp16-rounded like the cache
    tokens_all = torch.cat(tokens_parts).half().float()  # [N, T, D]
    if cache_path is not None:
        _atomic_save(
            {"cls": cls_all.half(), "frames_tokens": tokens_all.half()}, cache_path, {"key": key}
        )
    return FeatureSet(frame_set.videos, cls_all, tokens_all, key)
