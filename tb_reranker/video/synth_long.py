"""Long synthetic videos for moment retrieval: several events per file, hard cuts, one caption
per event with its ground-truth ``[start_s, end_s]``, and a time-reversed twin of every video.

Events
    Each event is one short scene drawn by the clip benchmark's renderer (``synth.py``): an
    ``order`` (object A then object B), ``motion`` (one object crossing the frame) or ``colour``
    (one shape changing colour) scene, captioned as in that benchmark ("a red square then a blue
    circle", "a green cross moving up-left", "a circle turning from cyan to red"). Every event
    has its own background level (at least ``MIN_LEVEL_STEP`` grey levels away from the event
    before it), tint and texture, so each cut is a visible shot change; objects keep one
    placement for the whole event (no per-frame jitter), and each event is one continuous shot:
    every frame is the mean of the ``SHOT_SMOOTH_FRAMES`` (7) frames around it inside the event,
    so an order event's swap of A for B is a 7-frame dissolve and the per-frame noise changes 7x
    less from frame to frame (a shot detector then cuts at the events' bounds and nowhere else;
    without it PySceneDetect cut most order events at the swap). An event lasts ``event_s`` seconds x a factor drawn in [0.75, 1.25], in whole frames
    (at least 4).

Twins
    Videos ``long_{2p:06d}`` and ``long_{2p+1:06d}`` form pair ``p``: the second is the first
    **played backwards**, its whole frame sequence reversed. So its events come in reversed
    order and each event is itself reversed: "a red square then a blue circle" becomes "a blue
    circle then a red square", moving left becomes moving right, turning from red to blue
    becomes turning from blue to red (``synth.time_reversed``, the clip benchmark's twin of a
    content). Each twin event is captioned with the reversed caption. Both videos mean-pool
    alike, event by event and as a whole, yet every caption is true of exactly one video: each
    pair's events are twin groups of the clip benchmark (``synth.twin_groups``) drawn without
    replacement across the whole set, each shown one way round (a seeded coin) in the first
    video, so captions are unique across the set; a set needing more events than the families
    hold groups is refused. No event starts at the same time in both twins (lengths are redrawn
    until it is so, or, when events are too short to vary, the first one is lengthened).

Length
    ``events_per_video`` events at least; with ``duration_min`` > 0 events are added until each
    video lasts that many minutes (a 10-minute file at 64 px, 8 fps: 4,800 frames).

Output (``out_dir``)
    ``videos/<video_id>.mp4`` (H.264, ``mp4.py``); ``videos.jsonl``, one line per video:
    ``video_id``, ``path``, ``twin``, ``reversed`` (True for the time-reversed twin), ``fps``, ``num_frames``, ``duration_s`` and
    its ``events`` in time order (``caption``, ``family``, ``start_s``, ``end_s``,
    ``start_frame``, ``end_frame``); ``moments.json`` in the ActivityNet Captions format
    (``{video_id: {"duration": s, "timestamps": [[s, e], ...], "sentences": [...]}}``, read by
    ``tb_reranker.data.moments.load_moments``); ``meta.json`` last (its presence marks a
    complete output; re-running with the same arguments does nothing). Event ``k`` covers frames
    ``[start_frame, end_frame)``, i.e. ``[start_frame / fps, end_frame / fps)`` seconds.
    Everything follows from ``seed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import AlreadyExistsError, InvalidInputError, TBError
from tb_reranker.video.mp4 import Mp4Writer
from tb_reranker.video.synth import (  # the clip benchmark's contents and wording
    BACKGROUNDS,
    FAMILIES,
    Appearance,
    caption,
    draw_appearance,
    render_clip,
    time_reversed,
    twin_groups,
)

__all__ = [
    "GENERATOR_VERSION",
    "INDEX_FILE",
    "MOMENTS_FILE",
    "Event",
    "LongVideo",
    "LongSynthResult",
    "plan_long",
    "generate_long",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "3"  # 3: events are continuous shots (order swaps dissolve); 2: reversed twins
INDEX_FILE = "videos.jsonl"
MOMENTS_FILE = "moments.json"
MIN_EVENT_FRAMES = 4
MIN_LEVEL_STEP = 30.0  # grey levels between the backgrounds of consecutive events
SHOT_SMOOTH_FRAMES = 7  # inside an event, each frame averages this many (see _continuous)
_LENGTH_TRIES = 20  # draws of the event lengths before lengthening the first event
_VIDEO_ID = re.compile(r"^long_\d{6}(\.part)?\.mp4$")


@dataclass(frozen=True)
class Event:
    """One scene of a long video."""

    caption: str
    family: str  # order | motion | colour
    objects: tuple[tuple[str, str], ...]  # (colour, shape) in order of appearance
    direction: str  # motion family: right | left | ...; "" otherwise
    num_frames: int  # its length in frames
    level: float  # background grey level (0-255)
    index: int  # its position in the forward video (its render RNG stream)
    reversed: bool = False  # the twin's event: the forward event's frames, played backwards


@dataclass(frozen=True)
class LongVideo:
    """A planned long video: its events in time order."""

    video_id: str
    twin_id: str
    pair: int
    reversed: bool  # True for the twin: the first video's frames, played backwards
    events: tuple[Event, ...]
    fps: int

    @property
    def num_frames(self) -> int:
        return sum(e.num_frames for e in self.events)

    @property
    def duration_s(self) -> float:
        """Length in seconds: frames / fps."""
        return self.num_frames / self.fps

    def frame_bounds(self) -> list[tuple[int, int]]:
        """``[start_frame, end_frame)`` of every event, in time order."""
        ends = np.cumsum([e.num_frames for e in self.events]).tolist()
        return [(end - e.num_frames, end) for e, end in zip(self.events, ends, strict=True)]

    def windows(self) -> list[tuple[float, float]]:
        """``(start_s, end_s)`` of every event, in time order (frame bounds / fps)."""
        return [(a / self.fps, b / self.fps) for a, b in self.frame_bounds()]


@dataclass(frozen=True)
class LongSynthResult:
    """What :func:`generate_long` did."""

    root: Path
    videos: tuple[LongVideo, ...]
    created: int  # videos written by this call
    skipped: bool  # True when an identical complete output existed
    elapsed_s: float
    meta: dict[str, Any] = field(default_factory=dict)


def _catalogue(families: Sequence[str]) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """Every twin group ``(family, objects, direction)`` of ``families``, as its twin 0 shows
    it (the other way round is ``time_reversed`` of it): 276 order, 96 motion, 112 colour."""
    return [(f, objects, d) for f in families for objects, d in twin_groups(f)]


def _reversed_event(event: Event) -> Event:
    """The event played backwards (what the twin shows), or forwards again."""
    objects, direction = time_reversed(event.family, event.objects, event.direction)
    return Event(
        caption(event.family, objects, direction),
        event.family,
        objects,
        direction,
        event.num_frames,
        event.level,
        event.index,
        not event.reversed,
    )


def _times_differ(lengths: Sequence[int]) -> bool:
    """True when no event starts at the same frame in the video and in its reversed twin."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    reversed_starts = np.concatenate([[0], np.cumsum(lengths[::-1])[:-1]])[::-1]
    return bool(np.all(starts != reversed_starts))


def _lengths(
    rng: np.random.Generator,
    count: int,
    min_frames: int,
    event_frames: float,
    groups: tuple[int, int],
) -> list[int]:
    """Frames of each event: ``count`` at least, more until they sum to ``min_frames``; no
    event starts at the same frame in the video and in its reversed twin. ``groups``: (twin
    groups used by the pairs before, twin groups the families hold)."""
    used, total = groups
    lengths: list[int] = []
    for _ in range(_LENGTH_TRIES):
        lengths = []
        while len(lengths) < count or sum(lengths) < min_frames:
            if used + len(lengths) == total:
                raise InvalidInputError(
                    f"the chosen families hold {total} twin groups and every event of the set "
                    f"needs its own (captions are unique across the set): {used} events before "
                    "this pair leave too few; use fewer pairs, fewer events or longer events"
                )
            drawn = round(event_frames * rng.uniform(0.75, 1.25))
            lengths.append(max(MIN_EVENT_FRAMES, drawn))
        if _times_differ(lengths):
            return lengths
    # lengths too short to vary (a few frames each): lengthen the first event until no start
    # coincides (each frame moves every later start of the video, none of its twin's)
    while not _times_differ(lengths):
        lengths[0] += 1
    return lengths


def _levels(rng: np.random.Generator, count: int) -> list[float]:
    """Background levels in [10, 90], consecutive ones ``MIN_LEVEL_STEP`` apart at least."""
    levels: list[float] = []
    while len(levels) < count:
        level = float(rng.uniform(10.0, 90.0))
        if not levels or abs(level - levels[-1]) >= MIN_LEVEL_STEP:
            levels.append(level)
    return levels


def plan_long(
    num_pairs: int,
    *,
    events_per_video: int = 4,
    event_s: float = 10.0,
    duration_min: float = 0.0,
    fps: int = 8,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
) -> list[LongVideo]:
    """What every long video shows (the ground truth), without rendering anything.

    Returns ``2 * num_pairs`` videos: pair ``p`` is video ``2p`` and its reversed twin
    ``2p + 1``. Arguments as :func:`generate_long`'s (checked there).
    """
    _checked_plan(num_pairs, events_per_video, event_s, duration_min, fps, seed, families)
    rng = np.random.default_rng([seed, 104729])
    catalogue = _catalogue(families)
    order = rng.permutation(len(catalogue))
    min_frames = math.ceil(duration_min * 60.0 * fps - 1e-9)
    videos: list[LongVideo] = []
    cursor = 0
    for pair in range(num_pairs):
        lengths = _lengths(
            rng, events_per_video, min_frames, event_s * fps, (cursor, len(catalogue))
        )
        levels = _levels(rng, len(lengths))
        flips = rng.integers(0, 2, size=len(lengths))  # which way round the first video shows
        events = []
        for k, (frames, level) in enumerate(zip(lengths, levels, strict=True)):
            family, objects, direction = catalogue[order[cursor + k]]
            if flips[k]:
                objects, direction = time_reversed(family, objects, direction)
            shown = caption(family, objects, direction)
            events.append(Event(shown, family, objects, direction, frames, level, k))
        cursor += len(lengths)
        first, second = f"long_{2 * pair:06d}", f"long_{2 * pair + 1:06d}"
        videos.append(LongVideo(first, second, pair, False, tuple(events), fps))
        backwards = tuple(_reversed_event(e) for e in events[::-1])
        videos.append(LongVideo(second, first, pair, True, backwards, fps))
    return videos


def _render_event(event: Event, *, pair: int, size: int, seed: int, background: str) -> np.ndarray:
    """uint8 RGB frames [event.num_frames, size, size, 3]; a twin's event is the forward
    event's frames in reversed order."""
    if event.reversed:
        forward = _reversed_event(event)
        return _render_event(forward, pair=pair, size=size, seed=seed, background=background)[::-1]
    rng = np.random.default_rng([seed, 104729, pair, event.index])
    look = draw_appearance(event.family, size, rng)
    tint = rng.uniform(-6.0, 6.0, size=3)
    texture = rng.normal(0.0, 6.0, size=(size, size, 1))
    scene = Appearance((event.level + tint + texture).astype(np.float32), look.objects)
    frames = render_clip(
        event.family,
        event.objects,
        event.direction,
        scene,
        num_frames=event.num_frames,
        rng=rng,
        background=background,
    )
    return _continuous(frames)


def _continuous(frames: np.ndarray, width: int = SHOT_SMOOTH_FRAMES) -> np.ndarray:
    """One shot's frames made continuous: each frame the mean of the frames within
    ``width // 2`` of it **inside the event** (fewer at its ends, so the cuts between events
    stay one-frame changes). The order family's swap of A for B becomes a ``width``-frame
    dissolve, and the per-frame noise (and the hue jitter it gives dark, grey backgrounds)
    changes ``width`` times less from one frame to the next; motion and colour changes were
    gradual already and stay so. uint8 [F, S, S, 3] in and out."""
    half = width // 2
    out = np.empty_like(frames)
    for t in range(len(frames)):
        window = frames[max(0, t - half) : t + half + 1].astype(np.float32)
        out[t] = np.clip(np.rint(window.mean(axis=0)), 0, 255).astype(np.uint8)
    return out


def _write_video(
    video: LongVideo, path: Path, *, size: int, seed: int, background: str, bar: Any
) -> None:
    with Mp4Writer(path, fps=video.fps, width=size, height=size) as writer:
        for event in video.events:
            frames = _render_event(
                event, pair=video.pair, size=size, seed=seed, background=background
            )
            writer.write(frames)
            bar.update(len(frames))


def _index_line(video: LongVideo) -> dict[str, Any]:
    events = [
        {
            "caption": e.caption,
            "family": e.family,
            "start_s": start_s,
            "end_s": end_s,
            "start_frame": a,
            "end_frame": b,
        }
        for e, (start_s, end_s), (a, b) in zip(
            video.events, video.windows(), video.frame_bounds(), strict=True
        )
    ]
    return {
        "video_id": video.video_id,
        "path": f"videos/{video.video_id}.mp4",
        "twin": video.twin_id,
        "reversed": video.reversed,
        "fps": video.fps,
        "num_frames": video.num_frames,
        "duration_s": video.duration_s,
        "events": events,
    }


def _moments(videos: Sequence[LongVideo]) -> dict[str, Any]:
    """The ActivityNet Captions form of the ground truth."""
    return {
        v.video_id: {
            "duration": v.duration_s,
            "timestamps": [list(w) for w in v.windows()],
            "sentences": [e.caption for e in v.events],
        }
        for v in videos
    }


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(root: Path, params: dict[str, Any], videos: Sequence[LongVideo]) -> bool:
    meta = _read_meta(root)
    if meta is None or meta.get("params") != params:
        return False
    needed = [root / INDEX_FILE, root / MOMENTS_FILE]
    needed += [root / "videos" / f"{v.video_id}.mp4" for v in videos]
    return all(p.is_file() for p in needed)


def _holds_other(root: Path, params: dict[str, Any]) -> bool:
    """True when ``root`` holds an output not made with ``params`` (or an unfinished one)."""
    if (root / "meta.json").exists():
        meta = _read_meta(root)
        return meta is None or meta.get("params") != params
    return (root / INDEX_FILE).exists() or (root / MOMENTS_FILE).exists()


def _clear(root: Path) -> Path:
    """Remove the index files and the videos this generator names; return ``videos/``."""
    videos_dir = root / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    for name in ("meta.json", INDEX_FILE, MOMENTS_FILE):
        (root / name).unlink(missing_ok=True)
    for old in videos_dir.iterdir():
        if _VIDEO_ID.match(old.name):
            old.unlink()
    return videos_dir


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_real(name: str, value: Any, *, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "> 0" if positive else ">= 0"
        raise InvalidInputError(f"{name} must be a finite number {kind}, got {value!r}")
    return float(value)


def _checked_plan(
    num_pairs: Any,
    events_per_video: Any,
    event_s: Any,
    duration_min: Any,
    fps: Any,
    seed: Any,
    families: Sequence[str],
) -> dict[str, Any]:
    """The arguments of :func:`plan_long`, checked, as meta.json's ``params`` hold them."""
    families = list(families)
    if not families or len(set(families)) != len(families) or set(families) - set(FAMILIES):
        raise InvalidInputError(
            f"families must be distinct names from {list(FAMILIES)}, got {families}"
        )
    return {
        "num_pairs": _check_int("num_pairs", num_pairs, 1),
        "events_per_video": _check_int("events_per_video", events_per_video, 2),
        "event_s": _check_real("event_s", event_s, positive=True),
        "duration_min": _check_real("duration_min", duration_min, positive=False),
        "fps": _check_int("fps", fps, 1),
        "seed": _check_int("seed", seed, 0),
        "families": families,
    }


def generate_long(
    out_dir: str | os.PathLike[str],
    *,
    num_pairs: int = 2,
    events_per_video: int = 4,
    event_s: float = 10.0,
    duration_min: float = 0.0,
    fps: int = 8,
    size: int = 64,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
    background: str = "plain",
    force: bool = False,
    progress: bool = True,
) -> LongSynthResult:
    """Write ``2 * num_pairs`` long videos and their moment annotations (module docstring).

    Args:
        out_dir: output folder (created).
        num_pairs: video pairs (a video and its reversed twin), >= 1.
        events_per_video: events in each video at least (>= 2).
        event_s: mean event length in seconds (each drawn in [0.75, 1.25] x this, >= 4 frames).
        duration_min: each video lasts at least this many minutes (events are added); 0 = off.
        fps: frame rate of the files. size: frame side in pixels (even, >= 16).
        seed: everything (contents, lengths, looks, noise) follows from it.
        families: event families, from ``synth.FAMILIES``.
        background: ``"plain"`` or ``"noisy"`` (as in ``synth.generate``).
        force: regenerate even if an output exists. progress: show progress (frames).

    Raises:
        InvalidInputError: a bad argument.
        AlreadyExistsError: ``out_dir`` holds another output (other arguments) and not force.
    """
    started = time.perf_counter()
    plan = _checked_plan(num_pairs, events_per_video, event_s, duration_min, fps, seed, families)
    if background not in BACKGROUNDS:
        raise InvalidInputError(
            f"background must be one of {list(BACKGROUNDS)}, got {background!r}"
        )
    if _check_int("size", size, 16) % 2:
        raise InvalidInputError(f"size must be even (yuv420p), got {size}")
    params = {
        "generator": "tb_reranker.video.synth_long",
        "version": GENERATOR_VERSION,
        **plan,
        "size": size,
        "background": background,
        "codec": "libx264",
    }
    videos = tuple(plan_long(**plan))
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"output path exists and is not a folder: {root}")
    if not force and _is_complete(root, params, videos):
        log.info("%s already holds these long videos (same arguments): nothing to do", root)
        meta = _read_meta(root) or {}
        return LongSynthResult(root, videos, 0, True, time.perf_counter() - started, meta)
    if not force and _holds_other(root, params):
        raise AlreadyExistsError(
            f"{root} already holds an output made with other arguments (or an unfinished one);"
            " pass --force (force=True) to replace it"
        )
    _write_all(_clear(root), videos, params, progress)
    lines = [json.dumps(_index_line(v)) for v in videos]
    _write_atomic(root / INDEX_FILE, "\n".join(lines) + "\n")
    _write_atomic(root / MOMENTS_FILE, json.dumps(_moments(videos)) + "\n")
    elapsed = time.perf_counter() - started
    meta = {
        "params": params,
        "generator_version": GENERATOR_VERSION,
        "num_videos": len(videos),
        "num_events": sum(len(v.events) for v in videos),
        "duration_s": {v.video_id: v.duration_s for v in videos},
        "elapsed_s": round(elapsed, 3),
    }
    _write_atomic(root / "meta.json", json.dumps(meta, indent=2) + "\n")
    log.info("wrote %d long videos to %s in %.1f s", len(videos), root, elapsed)
    return LongSynthResult(root, videos, len(videos), False, elapsed, meta)


def _write_all(
    videos_dir: Path, videos: Sequence[LongVideo], params: dict[str, Any], progress: bool
) -> None:
    """Render and encode every video, one after the other, event by event."""
    from tb_reranker.progress import progress as show

    bar = show(
        total=sum(v.num_frames for v in videos), desc="synth", unit="frame", enabled=progress
    )
    try:
        for video in videos:
            _write_video(
                video,
                videos_dir / f"{video.video_id}.mp4",
                size=params["size"],
                seed=params["seed"],
                background=params["background"],
                bar=bar,
            )
    except OSError as exc:
        raise TBError(f"cannot write long synthetic videos: {exc}") from exc
    finally:
        bar.close()
