"""Moment evaluation in memory: long videos cut into segments, every caption searched over all
segments, with the product search's semantics (issue 22 §5; docs/method.md "Evaluating
moments").

Each video is cut by the segment spec (default ``shots``), except that a video no longer than
the spec's longest segment stays whole (:meth:`SegmentSpec.keeps_whole`, the rule ingest
shares). Each segment's T frames are encoded like a video: ``cls`` = the mean-pooled frame
features, ``tokens`` = the frame tokens. Per caption:

* broad: ``S' = cos(I_1, segment cls)`` over every segment of every video; a video's broad
  score is its best segment's;
* reranked: the top-K **segments** (K = ``model.top_k`` unless given; one video may hold several)
  are compared jointly by ``model.focused_scores``; a video's reranked score is its best
  segment's ``S' + Δ``; videos with no segment in the top-K follow, in broad order;
* the predicted moment is the best segment of the top-1 video, ``[start_s, end_s]``.

Reported, broad and reranked: video-level R@1/5/10 (MdR, MnR) of the caption's own video, and
moment R1@IoU≥0.5 / ≥0.7 and mean IoU of the predicted moment against the annotated window
(a query whose top-1 video is wrong counts as a miss, IoU 0), plus the same IoU≥0.5 among the
queries whose top-1 video is right. ``segmentation`` gives the ceiling the cuts allow: the
share of queries whose own video holds a segment with IoU≥0.5 / ≥0.7.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tb_reranker.errors import InvalidInputError, NotFoundError, VideoDecodeError
from tb_reranker.metrics import TIES, ranks_from_scores, rerank_topk, retrieval_metrics
from tb_reranker.training.evaluate import encode_texts, text_to_video_topk
from tb_reranker.training.features import FrameSet, VideoCaptionSet, load_features
from tb_reranker.video.segment_plan import SegmentSpec

__all__ = [
    "IOU_THRESHOLDS",
    "MomentQuery",
    "SegmentedSet",
    "evaluate_moments",
    "find_videos",
    "format_moment_table",
    "moment_queries",
    "plot_moment_metrics",
    "segment_videos",
]

log = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.5, 0.7)
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
INDEX_FILE = "videos.jsonl"  # what ``tb synth --long`` writes beside the videos
MOMENTS_FILE = "moments.json"


@dataclass(frozen=True)
class MomentQuery:
    """One caption, the video it describes and its annotated windows (seconds)."""

    caption: str
    video_id: str
    windows: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class SegmentedSet:
    """Every segment of the evaluated videos, each video's segments together and in time order."""

    video_ids: list[str]  # [V] videos that gave at least one segment
    first: np.ndarray  # [V] int64: index of each video's first segment (ascending)
    spans: np.ndarray  # [S, 2] float64 (start_s, end_s)
    frames: torch.Tensor  # [S, T, 3, H, W] float16, normalised as the model expects
    masks: torch.Tensor  # [S, T] bool (False = a repeated frame padding a short segment)
    failures: int  # failed stretches (SegmentFailure) over all videos
    skipped: list[str]  # videos that gave no segment at all

    @property
    def video_of(self) -> np.ndarray:
        """[S] int64: the video index of every segment."""
        counts = np.diff(np.append(self.first, len(self.spans)))
        return np.repeat(np.arange(len(self.video_ids)), counts)


def moment_queries(path: str | os.PathLike[str]) -> list[MomentQuery]:
    """The annotations of ``path`` (any ``load_moments`` format) as queries: one per (video,
    caption), with all its windows (QVHighlights gives several), in file order."""
    from tb_reranker.data.moments import load_moments

    grouped: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for m in load_moments(path):
        grouped.setdefault((m.video_id, m.caption), []).append((m.start_s, m.end_s))
    return [MomentQuery(c, v, tuple(w)) for (v, c), w in grouped.items()]


def find_videos(root: str | os.PathLike[str], video_ids: Sequence[str]) -> dict[str, str]:
    """Video files of ``video_ids`` under ``root``: the paths ``videos.jsonl`` names (what
    ``tb synth --long`` writes) when present, else ``root/videos/<id>.<ext>`` or
    ``root/<id>.<ext>`` (ext in ``VIDEO_EXTENSIONS``). Ids without a file are left out."""
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"data folder {root} does not exist")
    found: dict[str, str] = {}
    index = root / INDEX_FILE
    if index.is_file():
        for number, line in enumerate(index.read_text().splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
                if row is not None:
                    found[str(row["video_id"])] = str((root / str(row["path"])).resolve())
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidInputError(f"{index}:{number}: malformed row ({exc})") from None
    for video_id in video_ids:
        for folder in (root / "videos", root):
            for ext in VIDEO_EXTENSIONS:
                if video_id not in found and (folder / f"{video_id}{ext}").is_file():
                    found[video_id] = str((folder / f"{video_id}{ext}").resolve())
    return {
        v: found[v] for v in dict.fromkeys(video_ids) if v in found and Path(found[v]).is_file()
    }


def _segment_one(path: str, spec: SegmentSpec, sampling: dict[str, Any]) -> tuple[list, int]:
    """``([(start_s, end_s, clip)], failures)`` of one file; a video the rule keeps whole is one
    segment ``[0, duration]`` decoded by ``decode_video``."""
    from tb_reranker.video import decode_video
    from tb_reranker.video.segment import segment_video

    cut = segment_video(path, spec, **sampling)
    whole = len(cut.segments) == 1 and not cut.failures and cut.segments[0].start_s == 0.0
    if spec.keeps_whole(cut.duration_s) and not whole:
        clip = decode_video(path, **sampling)
        return [(0.0, clip.duration_s, clip)], 0
    return [(s.start_s, s.end_s, s.clip) for s in cut.segments], len(cut.failures)


def segment_videos(
    model: torch.nn.Module,
    paths: dict[str, str],
    spec: SegmentSpec | str = "shots",
    *,
    workers: int = 2,
    progress: bool = False,
) -> SegmentedSet:
    """Cut every video of ``paths`` (``{video_id: file}``) and sample the model's T frames per
    segment, ``workers`` files at a time. A file that cannot be decoded at all is skipped
    (logged, listed in ``skipped``); ``InvalidInputError`` when none gives a segment."""
    from tb_reranker.progress import progress as show

    spec = spec if isinstance(spec, SegmentSpec) else SegmentSpec.parse(spec)
    sampling = {
        "num_frames": model.num_frames,
        "image_size": model.image_size,
        "mean": tuple(model.image_mean),
        "std": tuple(model.image_std),
    }

    def one(path: str) -> tuple[list, int] | VideoDecodeError:
        try:
            return _segment_one(path, spec, sampling)
        except VideoDecodeError as exc:
            return exc

    ids, spans, frames, masks, first, skipped, failures = [], [], [], [], [], [], 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, paths.values())
        shown = show(results, total=len(paths), desc="segment", unit="video", enabled=progress)
        for video_id, result in zip(paths, shown, strict=True):
            if isinstance(result, VideoDecodeError) or not result[0]:
                log.warning("skipping %s: %s", video_id, getattr(result, "reason", "no segment"))
                skipped.append(video_id)
                continue
            segments, failed = result
            failures += failed
            ids.append(video_id)
            first.append(len(spans))
            for start, end, clip in segments:
                spans.append((start, end))
                frames.append(np.asarray(clip.frames, dtype=np.float16))
                masks.append(np.asarray(clip.mask, dtype=bool))
    if not ids:
        raise InvalidInputError(f"none of the {len(paths)} videos gave a segment")
    return SegmentedSet(
        ids,
        np.asarray(first, dtype=np.int64),
        np.asarray(spans, dtype=np.float64),
        torch.from_numpy(np.stack(frames)),
        torch.from_numpy(np.stack(masks)),
        failures,
        skipped,
    )


def _best_iou(span: np.ndarray, windows: Sequence[tuple[float, float]]) -> float:
    """IoU of ``span`` with the best-matching window (as ``metrics.moment_recall``)."""
    from tb_reranker.metrics import temporal_iou

    return max(temporal_iou(span, w) for w in windows)


def _view_metrics(
    segment_scores: np.ndarray,
    segments: SegmentedSet,
    gt: np.ndarray,
    queries: Sequence[MomentQuery],
    ties: str,
) -> dict[str, Any]:
    """Video ranks and moment IoUs of one view from its segment scores [M, S]."""
    video_scores = np.maximum.reduceat(segment_scores, segments.first, axis=1)  # [M, V]
    ranks = ranks_from_scores(video_scores, gt, ties=ties)
    ious = np.zeros(len(queries))
    for q, query in enumerate(queries):
        if ranks[q] == 1:  # the top video is the right one: its best segment is the moment
            a = segments.first[gt[q]]
            b = segments.first[gt[q] + 1] if gt[q] + 1 < len(segments.first) else None
            best = a + int(np.argmax(segment_scores[q, a:b]))
            ious[q] = _best_iou(segments.spans[best], query.windows)
    right = ranks == 1
    per_query = {"rank": ranks.tolist(), "iou": ious.round(4).tolist()}
    moment: dict[str, Any] = {
        f"R1@IoU{t:g}": float(100 * np.mean(ious >= t)) for t in IOU_THRESHOLDS
    }
    moment["mIoU"] = float(100 * ious.mean())
    moment["top_video_right"] = int(right.sum())
    moment["R1@IoU0.5_of_top_video_right"] = (
        float(100 * np.mean(ious[right] >= 0.5)) if right.any() else None
    )
    return {"video": retrieval_metrics(ranks), "moment": moment, "per_query": per_query}


def _segmentation_ceiling(
    segments: SegmentedSet, gt: np.ndarray, queries: Sequence[MomentQuery]
) -> dict[str, Any]:
    """The share of queries whose own video holds a segment matching the window."""
    video_of = segments.video_of
    best = np.array(
        [
            max(_best_iou(segments.spans[s], query.windows) for s in np.flatnonzero(video_of == v))
            for query, v in zip(queries, gt, strict=True)
        ]
    )
    return {
        **{f"best_possible_R1@IoU{t:g}": float(100 * np.mean(best >= t)) for t in IOU_THRESHOLDS},
        "segments": len(segments.spans),
        "segments_per_video": round(len(segments.spans) / len(segments.video_ids), 3),
        "failures": segments.failures,
    }


def _queries_and_videos(
    data_root: str | os.PathLike[str], moments: str | os.PathLike[str] | None
) -> tuple[list[MomentQuery], dict[str, str], list[str]]:
    """The queries, the files of their videos, and the annotated videos without a file."""
    path = Path(moments) if moments is not None else Path(data_root) / MOMENTS_FILE
    if not path.is_file():
        raise NotFoundError(f"moment annotations {path} do not exist")
    queries = moment_queries(path)
    if not queries:
        raise InvalidInputError(f"{path} holds no moment")
    wanted = list(dict.fromkeys(q.video_id for q in queries))
    paths = find_videos(data_root, wanted)
    missing = [v for v in wanted if v not in paths]
    if not paths:
        raise NotFoundError(f"none of the {len(wanted)} annotated videos is under {data_root}")
    if missing:
        log.warning("%d annotated videos have no file under %s: their queries are left out",
                    len(missing), data_root)  # fmt: skip
    return queries, paths, missing


@torch.no_grad()
def evaluate_moments(
    model: torch.nn.Module,
    data_root: str | os.PathLike[str],
    moments: str | os.PathLike[str] | None = None,
    *,
    spec: SegmentSpec | str = "shots",
    k: int | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = False,
    ties: str = "pessimistic",
    details: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on the long videos under ``data_root`` (module docstring).

    Args:
        moments: the annotation file (default ``data_root/moments.json``, what ``tb synth
            --long`` writes); ActivityNet Captions, Charades-STA or QVHighlights.
        spec: how videos are cut (``shots``, ``fixed:LEN[,OVERLAP]``, ``none``).
        k: segments reranked per query (default ``model.top_k``).
        ties: the tie rule of the video ranks (``metrics.TIES``).
        details: keep each query's ``caption``, ``video_id``, video rank and moment IoU per
            view (``queries``; left out otherwise).

    Returns ``{"mode": "moments", "k", "segments", "num_videos", "num_queries", "ties",
    "broad": {"video": retrieval metrics, "moment": {...}}, "reranked": {...},
    "segmentation": {...}, "missing_videos", "skipped_videos"}``.
    """
    if ties not in TIES:
        raise InvalidInputError(f"ties must be one of {list(TIES)}, got {ties!r}")
    k = int(k if k is not None else model.top_k)
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    spec = spec if isinstance(spec, SegmentSpec) else SegmentSpec.parse(spec)
    queries, paths, missing = _queries_and_videos(data_root, moments)
    segments = segment_videos(model, paths, spec, workers=workers, progress=progress)
    index = {v: i for i, v in enumerate(segments.video_ids)}
    queries = [q for q in queries if q.video_id in index]
    gt = np.array([index[q.video_id] for q in queries], dtype=np.int64)
    frame_set = FrameSet(
        VideoCaptionSet(
            [f"{i}" for i in range(len(segments.spans))],
            [""] * len(segments.spans),
            [[""]] * len(segments.spans),
            name="moments",
        ),  # fmt: skip
        segments.frames,
        segments.masks,
        key="",
    )
    device = next(model.parameters()).device
    features = load_features(model, frame_set, batch_size=batch_size, device=device)
    indicators = encode_texts(model, [q.caption for q in queries], batch_size, progress)
    broad, candidates, final = text_to_video_topk(
        model, indicators, features.cls, features.frames_tokens, k=k,
        batch_size=batch_size, frames_mask=segments.masks,
    )  # fmt: skip
    views = {"broad": broad.double().numpy(), "reranked": rerank_topk(broad, candidates, final)}
    result: dict[str, Any] = {
        "mode": "moments",
        "k": int(candidates.shape[1]),
        "segments": str(spec),
        "num_videos": len(segments.video_ids),
        "num_queries": len(queries),
        "ties": ties,
        **{view: _view_metrics(s, segments, gt, queries, ties) for view, s in views.items()},
        "segmentation": _segmentation_ceiling(segments, gt, queries),
        "missing_videos": missing,
        "skipped_videos": segments.skipped,
    }
    _move_details(result, queries, keep=details)
    log.info(
        "moments: video R@1 broad %.1f -> reranked %.1f; R1@IoU0.5 broad %.1f -> reranked %.1f",
        result["broad"]["video"]["R@1"],
        result["reranked"]["video"]["R@1"],
        result["broad"]["moment"]["R1@IoU0.5"],
        result["reranked"]["moment"]["R1@IoU0.5"],
    )
    return result


def _move_details(result: dict[str, Any], queries: Sequence[MomentQuery], keep: bool) -> None:
    """Take each view's per-query ranks and IoUs out of ``result``; with ``keep``, put them
    back as one ``queries`` list (caption, video, rank and IoU per view)."""
    views = ("broad", "reranked")
    per_query = {view: result[view].pop("per_query") for view in views}
    if keep:
        result["queries"] = [
            {"caption": q.caption, "video_id": q.video_id}
            | {f"{v}_{name}": per_query[v][name][i] for v in views for name in ("rank", "iou")}
            for i, q in enumerate(queries)
        ]


_ROWS = (
    ("video", "R@1"),
    ("video", "R@5"),
    ("video", "R@10"),
    ("moment", "R1@IoU0.5"),
    ("moment", "R1@IoU0.7"),
    ("moment", "mIoU"),
    ("moment", "R1@IoU0.5_of_top_video_right"),
)


def format_moment_table(result: dict[str, Any]) -> str:
    """Broad vs reranked, one metric a line."""
    lines = [f"{'metric':<36} {'broad':>7} {'reranked':>9}", "-" * 54]
    for level, name in _ROWS:
        values = [result[view][level][name] for view in ("broad", "reranked")]
        shown = ["   n/a" if v is None else f"{v:6.1f}" for v in values]
        lines.append(f"{level + ' ' + name:<36} {shown[0]:>7} {shown[1]:>9}")
    seg = result["segmentation"]
    lines.append(
        f"segments: {result['segments']}, {seg['segments']} in {result['num_videos']} videos; "
        f"best possible R1@IoU0.5 {seg['best_possible_R1@IoU0.5']:.1f}"
    )
    return "\n".join(lines)


def plot_moment_metrics(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """Bars: broad vs reranked for every metric of :func:`format_moment_table`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{level}\n{name.replace('_of_top_video_right', ' | top video right')}"
             for level, name in _ROWS]  # fmt: skip
    x = np.arange(len(_ROWS))
    fig, ax = plt.subplots(figsize=(11, 4))
    for shift, view in ((-0.2, "broad"), (0.2, "reranked")):
        values = [result[view][level][name] or 0.0 for level, name in _ROWS]
        bars = ax.bar(x + shift, values, width=0.4, label=view)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
