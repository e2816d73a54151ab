"""Moments, not files: one decode pass that finds shot cuts and samples T frames per segment.

:func:`segment_video` decodes a file sequentially once. Each decoded frame may serve two uses:

Shot detection
    PySceneDetect's ``ContentDetector`` (HSV content change, threshold 27) is driven frame by
    frame through its public ``process_frame`` on small BGR copies (``DETECT_WIDTH`` pixels wide,
    converted by one reused swscale context) of the frames we decode anyway, at up to
    ``DETECT_RATE_HZ`` frames a second (PySceneDetect's ``--frame-skip`` idea: a probe costs
    more than decoding a 360p frame). When a probe differs from the previous one, the frames
    between them are rerun consecutively through a fresh detector: the first one it fires on is
    the cut, and if none fires the change built up across the gap (motion, a fade) and is no cut,
    as ContentDetector fed every frame would say. The cuts feed
    :class:`~tb_reranker.video.segment_plan.ShotPlanner`, which closes segments as the pass goes
    (``fixed`` windows close at their known ends).

Frame sampling
    Candidate frames are kept on a grid: at most ``4 × num_frames`` since the open segment's
    start (when full, every other one is dropped and the spacing doubles), plus those of the one
    segment a short tail could still extend. Small frames (up to ``LAZY_MAX_PIXELS``) are kept as
    decoded and preprocessed only when picked; larger ones are preprocessed on arrival. When a
    segment is final, each of its T targets (the centres of T equal parts, as in
    :func:`~tb_reranker.video.decode_video`) takes the nearest candidate inside the segment, the
    frames are preprocessed exactly as ``decode_video`` does (rotation, open_clip transform),
    repeats are masked, and the candidates before the next segment are released. Memory is
    bounded by the candidate count, never by the file's length.

``none``, and a video too short to cut (shorter than ``min_s``, or than one ``fixed`` window), is
one segment decoded by ``decode_video`` itself: identical frames and mask to today.

Failures: a corrupt packet fails the segment whose time span holds it and a segment with no
decodable frame fails; both land in ``SegmentedVideo.failures`` with their time range, and the
other segments come back. A file that stops early (a read error or truncation) ends its segments
at the last decoded frame and reports the rest as one failure. A file with no decodable frame at
all, or no video stream, is a :class:`~tb_reranker.errors.VideoDecodeError`.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tb_reranker.errors import VideoDecodeError
from tb_reranker.video.decode import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_SEEK_THRESHOLD_S,
    REDUCE_ABOVE_PIXELS,
    VideoClip,
    _check_args,
    _check_frame_size,
    _Deadline,
    _open_error_reason,
    _preprocess_frame,
    _stream_rotation,
    _stream_span,
    _time_of,
    check_video_file,
    decode_video,
    open_video,
)
from tb_reranker.video.segment_plan import SegmentSpec, ShotPlanner, Span, fixed_windows

__all__ = ["Segment", "SegmentFailure", "SegmentedVideo", "iter_segments", "segment_video"]

log = logging.getLogger(__name__)

DETECT_WIDTH = 64  # detector input width in pixels (height keeps the aspect ratio)
DETECT_RATE_HZ = 5.0  # detector probes per second of video at most
DETECT_THRESHOLD = 27.0  # ContentDetector's default threshold (mean HSV change, 0-255)
DETECT_INTERPOLATION = "AREA"  # swscale filter of the detector's copies
CANDIDATES_PER_FRAME = 4  # candidate capacity per open segment = this × num_frames
LAZY_MAX_PIXELS = 640 * 480  # frames up to this size wait undecoded-to-RGB until picked
TAIL_GAP_S = 1.0  # frames ending this long before the stated duration: a truncated file


@dataclass(frozen=True)
class Segment:
    """One moment: ``[start_s, end_s)`` in seconds from the first frame, and its T frames
    (``clip.frames`` float32 [T, 3, H, W], ``clip.timestamps`` seconds from the first frame,
    inside the segment; ``clip.duration_s`` is the whole video's, as with ``decode_video``)."""

    start_s: float
    end_s: float
    clip: VideoClip


@dataclass(frozen=True)
class SegmentFailure:
    """A stretch ``[start_s, end_s)`` (seconds) that could not be sampled, and why (one line)."""

    start_s: float
    end_s: float
    reason: str


@dataclass(frozen=True)
class SegmentedVideo:
    """What :func:`segment_video` found in one file: segments and failures, both in time order,
    together covering ``[0, duration_s]``; ``cuts`` the detected shot cuts in seconds."""

    path: str
    duration_s: float
    spec: SegmentSpec
    segments: tuple[Segment, ...]
    failures: tuple[SegmentFailure, ...] = ()
    cuts: tuple[float, ...] = ()


class _CutDetector:
    """ContentDetector fed small BGR copies of every probed frame; ``offer`` returns the time of
    a cut (the first frame of the new shot) or None."""

    def __init__(self, stream: Any, t0: float) -> None:
        from av.video.reformatter import VideoReformatter

        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        scale = min(1.0, DETECT_WIDTH / max(1, width))
        self.size = (max(1, round(width * scale)), max(1, round(height * scale)))
        self.reformatter = VideoReformatter()
        self.fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        self.t0 = t0
        self.detector = self._new_detector()
        self.next_t = -math.inf
        self.previous: tuple[float, np.ndarray] | None = None
        self.skipped: list[tuple[float, Any]] = []

    @staticmethod
    def _new_detector() -> Any:
        from scenedetect import ContentDetector

        # min_scene_len 0: no flash filter (the planner merges short shots itself)
        return ContentDetector(threshold=DETECT_THRESHOLD, min_scene_len=0)

    def _small(self, frame: Any) -> np.ndarray:
        width, height = self.size
        small = self.reformatter.reformat(
            frame,
            width=width,
            height=height,
            format="bgr24",
            interpolation=DETECT_INTERPOLATION,
            threads=1,
        )
        return small.to_ndarray()  # uint8 [h, w, 3]

    def _probe(self, detector: Any, t: float, image: np.ndarray) -> bool:
        from scenedetect import FrameTimecode

        timecode = FrameTimecode(max(0.0, t - self.t0), fps=self.fps)
        return bool(detector.process_frame(timecode, image))

    def offer(self, frame: Any, t: float) -> float | None:
        if t < self.next_t:
            self.skipped.append((t, frame))
            return None
        image = self._small(frame)
        cut = None
        if self._probe(self.detector, t, image):
            cut = t if self.previous is None else self._locate(t, image)
        self.previous = (t, image)
        self.skipped = []
        self.next_t = t + 1.0 / DETECT_RATE_HZ - 1e-6
        return cut

    def _locate(self, t: float, image: np.ndarray) -> float | None:
        """The probe at ``t`` differs from the previous one: rerun the frames between them,
        consecutively, through a fresh detector. The first frame it fires on is the cut; none
        (the change built up across the gap: motion, a fade) is no cut, as ContentDetector
        fed every frame would say."""
        assert self.previous is not None
        probe = self._new_detector()
        self._probe(probe, *self.previous)
        for skipped_t, frame in self.skipped:
            if self._probe(probe, skipped_t, self._small(frame)):
                return skipped_t
        return t if self._probe(probe, t, image) else None


class _Candidates:
    """Frames kept for the segments not final yet (see the module docstring), times ascending."""

    def __init__(self, capacity: int, base_spacing: float, keep_raw: bool, prepare: Any) -> None:
        self.capacity = capacity
        self.base_spacing = base_spacing
        self.spacing = base_spacing
        self.keep_raw = keep_raw
        self.prepare: Callable[[Any], np.ndarray] = prepare
        self.times: list[float] = []
        self.items: list[Any] = []  # a decoded frame (kept raw) or its preprocessed array
        self.frozen = 0  # entries before this index belong to closed spans: never thinned

    def restart(self, t: float) -> None:
        """A new segment opens at ``t``: the grid restarts at its base spacing there."""
        self.frozen = bisect.bisect_left(self.times, t)
        self.spacing = self.base_spacing

    def offer(self, frame: Any, t: float) -> None:
        if len(self.times) > self.frozen and t < self.times[-1] + self.spacing:
            return
        self.times.append(t)
        self.items.append(frame if self.keep_raw else self.prepare(frame))
        if len(self.times) - self.frozen > self.capacity:
            self.times[self.frozen :] = self.times[self.frozen :: 2]
            self.items[self.frozen :] = self.items[self.frozen :: 2]
            self.spacing *= 2

    def release(self, before: float) -> None:
        cut = bisect.bisect_left(self.times, before)
        del self.times[:cut], self.items[:cut]
        self.frozen = max(0, self.frozen - cut)

    def pick(self, span: Span, num: int) -> tuple[list[float], list[Any]] | None:
        """For each of ``num`` targets in ``span`` the nearest candidate inside it (ties: the
        earlier); None when the span holds no candidate."""
        lo = bisect.bisect_left(self.times, span[0])
        hi = bisect.bisect_left(self.times, span[1])
        if hi <= lo:
            return None
        times = np.asarray(self.times[lo:hi])
        targets = span[0] + (np.arange(num) + 0.5) / num * (span[1] - span[0])
        nearest = np.abs(times[None, :] - targets[:, None]).argmin(axis=1) + lo
        return [self.times[i] for i in nearest], [self.items[i] for i in nearest]


@dataclass
class _Settings:
    path: str
    spec: SegmentSpec
    num_frames: int
    image_size: int
    mean: np.ndarray
    std: np.ndarray
    t0: float
    duration: float
    stream_rotation: int = 0
    deadline: _Deadline | None = None
    bad: list[tuple[float, str]] = field(default_factory=list)  # (time, reason) corrupt packets
    stop_reason: str = ""  # why the packets stopped early (a read error), if they did

    reformatter: Any = None  # one swscale context for every picked frame

    def preprocess(self, frame: Any) -> np.ndarray:
        """A decoded frame -> float32 [3, S, S], through ``decode_video``'s own code (one
        reused single-threaded RGB converter)."""
        from av.video.reformatter import VideoReformatter

        if self.reformatter is None:
            self.reformatter = VideoReformatter()
        return _preprocess_frame(
            frame, self.reformatter, self.stream_rotation, self.image_size, self.mean, self.std
        )


def _frames(container: Any, stream: Any, settings: _Settings) -> Iterator[tuple[Any, float]]:
    """(frame, time) in presentation order. A packet that fails to decode is recorded in
    ``settings.bad`` (its time, the FFmpeg reason) and skipped; a read error ends the frames
    (``settings.stop_reason``)."""
    import av

    time_base = stream.time_base
    packets = container.demux(stream)
    last_t = settings.t0
    while True:
        assert settings.deadline is not None
        settings.deadline.check()
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            settings.stop_reason = f"read error ({_open_error_reason(exc)})"
            return
        try:
            frames = packet.decode()
        except av.error.FFmpegError as exc:
            t = float(packet.pts * time_base) if packet.pts is not None else last_t
            settings.bad.append((t - settings.t0, _open_error_reason(exc)))
            continue
        for frame in frames:
            _check_frame_size(settings.path, int(frame.width), int(frame.height))
            t = _time_of(frame, time_base)
            if t is not None:
                last_t = t
                yield frame, t


Outcome = Segment | SegmentFailure


class _SegmentPass:
    """The state of one pass: detector, planner (or fixed windows), candidates, results."""

    def __init__(self, settings: _Settings, stream: Any, keep_raw: bool) -> None:
        self.s = settings
        spec = settings.spec
        shots = spec.mode == "shots"
        self.detector = _CutDetector(stream, settings.t0) if shots else None
        self.planner = ShotPlanner(spec.min_s, spec.max_s) if shots else None
        windows = [] if shots else fixed_windows(settings.duration, spec.length_s, spec.overlap_s)
        self.windows = windows  # fixed mode: windows not closed yet, in order
        shortest = spec.min_s if shots else spec.length_s
        self.candidates = _Candidates(
            capacity=CANDIDATES_PER_FRAME * settings.num_frames,
            base_spacing=shortest / (2 * settings.num_frames),
            keep_raw=keep_raw,
            prepare=settings.preprocess,
        )
        self.cuts: list[float] = []
        self.open_start = 0.0  # where the candidates' grid last restarted
        self.frames_seen = 0
        self.last_t = -math.inf  # seconds from the first frame
        self.step = 0.0  # the last gap between frames

    def feed(self, frame: Any, t: float) -> list[Outcome]:
        """One decoded frame at stream time ``t`` -> the outcomes that became final."""
        rel = t - self.s.t0
        self.frames_seen += 1
        if rel > self.last_t:
            self.step = rel - self.last_t if math.isfinite(self.last_t) else self.step
            self.last_t = rel
        self.candidates.offer(frame, rel)
        if self.planner is None:
            return self._close_windows(rel)
        spans: list[Span] = []
        assert self.detector is not None
        cut = self.detector.offer(frame, t)
        if cut is not None:
            self.cuts.append(cut - self.s.t0)
            spans += self.planner.cut(cut - self.s.t0)
        spans += self.planner.advance(rel)
        return self._settle(spans)

    def _close_windows(self, now: float) -> list[Outcome]:
        done = 0
        while done < len(self.windows) and self.windows[done][1] <= now:
            done += 1
        spans, self.windows = self.windows[:done], self.windows[done:]
        outcomes = [self._outcome(span) for span in spans]
        if spans:
            keep = self.windows[0][0] if self.windows else now
            self._release(keep)
        return outcomes

    def _settle(self, spans: list[Span]) -> list[Outcome]:
        assert self.planner is not None
        outcomes = [self._outcome(span) for span in spans]
        if self.planner.open_start != self.open_start:
            self.open_start = self.planner.open_start
            self.candidates.restart(self.open_start)
        if spans:
            self._release(self.planner.keep_from)
        return outcomes

    def _release(self, before: float) -> None:
        self.candidates.release(before)
        self.s.bad[:] = [(t, r) for t, r in self.s.bad if t >= before]

    def _outcome(self, span: Span) -> Outcome:
        bad = [reason for t, reason in self.s.bad if span[0] <= t < span[1]]
        if bad:
            plural = "s" if len(bad) > 1 else ""
            return SegmentFailure(*span, f"{len(bad)} corrupt packet{plural} ({bad[0]})")
        picked = self.candidates.pick(span, self.s.num_frames)
        if picked is None:
            return SegmentFailure(*span, "no decodable frame in this stretch")
        return Segment(span[0], span[1], self._clip(*picked))

    def _clip(self, times: list[float], items: list[Any]) -> VideoClip:
        num, size = self.s.num_frames, self.s.image_size
        frames = np.empty((num, 3, size, size), dtype=np.float32)
        mask = np.zeros(num, dtype=bool)
        first: dict[int, int] = {}  # id(item) -> index of its first occurrence
        for i, item in enumerate(items):
            seen = first.get(id(item))
            if seen is not None:
                frames[i] = frames[seen]
                continue
            frames[i] = self.s.preprocess(item) if not isinstance(item, np.ndarray) else item
            mask[i] = True
            first[id(item)] = i
        return VideoClip(
            frames=frames,
            timestamps=np.maximum(np.asarray(times, dtype=np.float64), 0.0),
            mask=mask,
            duration_s=float(self.s.duration),
            path=self.s.path,
        )

    def finish(self) -> list[Outcome]:
        """The packets ended: the last segments, and the stretch after the last frame when the
        file stopped early."""
        if self.frames_seen == 0:
            raise VideoDecodeError(self.s.path, self.s.stop_reason or "no decodable video frames")
        data_end = self.last_t + self.step
        stopped = bool(self.s.stop_reason) or self.s.duration - data_end > TAIL_GAP_S
        end = data_end if stopped else self.s.duration
        if not stopped and data_end > self.s.duration + 1e-3:
            end = data_end  # frames past the stated duration
        if self.planner is None:
            self.windows = [w for w in self.windows if w[0] < end]
            self.windows[-1:] = [(w[0], min(w[1], end)) for w in self.windows[-1:]]
            outcomes = self._close_windows(math.inf)
        else:
            outcomes = self._settle(self.planner.finish(end))
        if stopped:
            reason = self.s.stop_reason or "no frames after this point (truncated file?)"
            outcomes.append(SegmentFailure(data_end, self.s.duration, reason))
        return outcomes


def _whole(path: str, spec: SegmentSpec, decode_kwargs: dict[str, Any]) -> SegmentedVideo:
    clip = decode_video(path, **decode_kwargs)
    segment = Segment(0.0, clip.duration_s, clip)
    return SegmentedVideo(path, clip.duration_s, spec, (segment,))


def _one_segment(spec: SegmentSpec, duration: float) -> bool:
    """Whether the plan is one ``[0, duration]`` segment whatever the cuts."""
    if spec.mode == "shots":
        return duration < spec.min_s
    return spec.mode == "none" or duration <= spec.length_s


def _pass(
    path: str, spec: SegmentSpec, decode_kwargs: dict[str, Any], settings: _Settings
) -> Iterator[Outcome | SegmentedVideo]:
    """Open, probe the span, then either hand the file to ``decode_video`` (one segment) or run
    the pass; yields outcomes as they become final, then the summary ``SegmentedVideo``."""
    with open_video(path) as (container, stream):
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        assert settings.deadline is not None
        settings.t0, settings.duration = _stream_span(
            container, stream, settings.deadline, DEFAULT_SEEK_THRESHOLD_S
        )
        if not _one_segment(spec, settings.duration):
            threads = 1 if width * height > REDUCE_ABOVE_PIXELS else decode_kwargs["threads"]
            if threads:
                stream.codec_context.thread_count = threads
            settings.stream_rotation = _stream_rotation(stream)
            run = _SegmentPass(settings, stream, keep_raw=width * height <= LAZY_MAX_PIXELS)
            for frame, t in _frames(container, stream, settings):
                yield from run.feed(frame, t)
            yield from run.finish()
            yield SegmentedVideo(path, settings.duration, spec, (), (), tuple(run.cuts))
            return
    yield _whole(path, spec, decode_kwargs)


def iter_segments(
    path: str | os.PathLike[str],
    spec: SegmentSpec | str = "shots",
    num_frames: int = 12,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    timeout_s: float | None = None,
    threads: int = 0,
) -> Iterator[Segment | SegmentFailure]:
    """Segments (and failed stretches) of one video, in time order, as the single decode pass
    makes them final: an hour-long file never holds more than one segment's output at a time.

    Args:
        path: a video file (any container/codec FFmpeg reads).
        spec: a :class:`SegmentSpec` or its text (``shots``, ``fixed:LEN[,OVERLAP]``, ``none``).
        num_frames, image_size, mean, std: as :func:`~tb_reranker.video.decode_video`
            (each segment's clip: frames float32 [T, 3, S, S]).
        timeout_s: abandon after this many seconds of wall time, the consumer's pauses between
            segments included (None = no limit; a pass reads the whole file).
        threads: FFmpeg decoder threads (0 = FFmpeg's choice).

    Raises:
        InvalidInputError: a bad spec or sampling argument (before the file is opened).
        VideoDecodeError: a missing/unreadable file, no video stream, no decodable frame at
            all, or the time limit. Corrupt stretches are SegmentFailure items instead.
    """
    for item in _segment_items(path, spec, num_frames, image_size, mean, std, timeout_s, threads):
        if not isinstance(item, SegmentedVideo):
            yield item
        elif item.segments:  # one segment decoded by decode_video
            yield from item.segments


def _segment_items(
    path: str | os.PathLike[str],
    spec: SegmentSpec | str,
    num_frames: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    timeout_s: float | None,
    threads: int,
) -> Iterator[Outcome | SegmentedVideo]:
    spec = spec if isinstance(spec, SegmentSpec) else SegmentSpec.parse(spec)
    mean_arr, std_arr = _check_args(num_frames, image_size, mean, std)
    path_str = check_video_file(path)
    decode_kwargs: dict[str, Any] = {
        "num_frames": num_frames,
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "timeout_s": timeout_s,
        "threads": threads,
    }
    settings = _Settings(path_str, spec, num_frames, image_size, mean_arr, std_arr, 0.0, 0.0)
    settings.deadline = _Deadline(path_str, timeout_s)
    try:
        yield from _pass(path_str, spec, decode_kwargs, settings)
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg/PIL/OpenCV failures become typed errors
        raise VideoDecodeError(path_str, _open_error_reason(exc)) from exc


def segment_video(
    path: str | os.PathLike[str],
    spec: SegmentSpec | str = "shots",
    num_frames: int = 12,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    timeout_s: float | None = None,
    threads: int = 0,
) -> SegmentedVideo:
    """:func:`iter_segments`, collected: every segment and failure of one video, with the
    duration and the detected cuts (seconds from the first frame). Holds every segment's
    frames (T × 3 × S × S float32 each): for long files, prefer :func:`iter_segments`."""
    segments: list[Segment] = []
    failures: list[SegmentFailure] = []
    items = _segment_items(path, spec, num_frames, image_size, mean, std, timeout_s, threads)
    for item in items:
        if isinstance(item, SegmentedVideo):
            if item.segments:
                return item
            return SegmentedVideo(
                item.path, item.duration_s, item.spec, tuple(segments), tuple(failures), item.cuts
            )
        (segments if isinstance(item, Segment) else failures).append(item)  # type: ignore[arg-type]
    raise AssertionError("the pass ended without its summary")  # pragma: no cover
