"""Video decoding with PyAV: uniform frame sampling, CLIP preprocessing, parallel decoding.

Frame sampling (what :func:`decode_video` returns)
    The video's time span ``[t0, t0 + duration)`` is cut into ``num_frames`` equal segments and,
    for each segment, the decoded frame whose presentation time is nearest to the segment's
    centre is taken. Times come from each frame's own ``pts × time_base`` (never frame index ×
    fps), so variable-frame-rate video is sampled by wall time. ``timestamps`` are seconds from
    the first frame (``t0``). When the video has fewer distinct frames than ``num_frames`` (or
    long gaps), several segments pick the same frame: the frame is repeated and ``mask`` is
    ``False`` for every repeat after its first occurrence, so ``mask.sum()`` is the number of
    distinct frames.

Preprocessing
    Exactly open_clip's eval transform: PIL bicubic resize of the shorter side to
    ``image_size`` (antialiased, torchvision's size rounding), centre crop, RGB in [0, 1],
    ``(x - mean) / std``. Display rotation (the display-matrix side data, or the legacy
    ``rotate`` stream tag) is applied before resizing, as players do.

Decoding strategy
    Short videos are decoded sequentially (one pass, stopping after the last target). Videos
    longer than ``seek_threshold_s`` seek to the keyframe before each target instead. Every
    failure (missing file, no video stream, zero frames, corrupt or truncated data, a decode
    that runs past ``timeout_s``) is a :class:`~tb_reranker.errors.VideoDecodeError` naming the
    file; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError, VideoDecodeError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VideoClip",
    "decode_video",
    "decode_many",
    "preprocess_image",
    "content_hash",
    "check_video_file",
    "open_video",
]

log = logging.getLogger(__name__)

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP

# Videos longer than this (seconds) are sampled by seeking; shorter ones by one sequential pass.
# Measured (320x240 H.264, GOP 2 s, 12 frames): 10 s clip seq 230 ms vs seek 264 ms; 20 s clip
# seq 418 ms vs seek 264 ms; 60 s clip seq 809 ms vs seek 292 ms.
DEFAULT_SEEK_THRESHOLD_S = 15.0
# Corrupt packets tolerated (skipped) before a decode is abandoned.
MAX_BAD_PACKETS = 64
# Decoded frame size. Frames above MAX_FRAME_PIXELS (8K UHD) are refused: a tiny file can
# declare 8192x8192 frames, and each one decoded costs 100 MB before any resize. Frames above
# REDUCE_ABOVE_PIXELS (4K UHD) are decoded on one thread and shrunk as soon as they are picked
# (to REDUCED_SHORT_SIDE_FACTOR x image_size on the short side, area-averaged; the frames are
# resized to image_size anyway), so the T picked frames never sit in memory at full size.
# Frames up to 4K are preprocessed exactly as before (open_clip's transform from full size).
MAX_FRAME_PIXELS = 7680 * 4320
REDUCE_ABOVE_PIXELS = 3840 * 2160
REDUCED_SHORT_SIDE_FACTOR = 4


@dataclass(frozen=True)
class VideoClip:
    """``num_frames`` preprocessed frames of one video.

    ``frames`` float32 [T, 3, H, W] normalised; ``timestamps`` float64 [T] seconds from the
    first frame; ``mask`` bool [T] (False = a repeated frame padding a short video).
    """

    frames: np.ndarray  # float32 [T, 3, H, W], (rgb/255 - mean) / std
    timestamps: np.ndarray  # float64 [T], seconds from the first frame, non-decreasing
    mask: np.ndarray  # bool [T], True for the first occurrence of each distinct frame
    duration_s: float  # length of the video stream in seconds
    path: str  # the file decoded

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def content_hash(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of the file's bytes, read in chunks (for idempotent ingestion).

    Only regular files: a FIFO, a device (``/dev/zero``) or a socket named ``.mp4`` would block
    or never end, so it is opened non-blocking and refused after ``fstat``. An ``s3://`` url is
    hashed by streaming the object (:func:`tb_reranker.video.sources.s3_content_hash`).
    """
    import stat

    from tb_reranker.s3 import is_s3_url

    if is_s3_url(path):
        from tb_reranker.video.sources import s3_content_hash

        return s3_content_hash(path)

    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise VideoDecodeError(
                    str(path), "not a regular file (a FIFO, device or socket): refused"
                )
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    except FileNotFoundError:
        raise VideoDecodeError(str(path), "no such file") from None
    except IsADirectoryError:
        raise VideoDecodeError(str(path), "is a directory, not a file") from None
    except OSError as exc:
        raise VideoDecodeError(str(path), f"cannot read file: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _check_args(
    num_frames: int, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(num_frames, int) or num_frames < 1:
        raise InvalidInputError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise InvalidInputError(f"image_size must be a positive integer, got {image_size!r}")
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    if mean_arr.shape != (3,) or std_arr.shape != (3,):
        raise InvalidInputError("mean and std must each have 3 values (R, G, B)")
    if not (np.isfinite(mean_arr).all() and np.isfinite(std_arr).all() and (std_arr > 0).all()):
        raise InvalidInputError("mean must be finite and std finite and > 0")
    return mean_arr, std_arr


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)`` output size: shorter side -> ``size``, keep aspect."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess_image(
    image: Any,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """A PIL image -> float32 [3, image_size, image_size], as open_clip's eval transform.

    Bicubic (antialiased) resize of the shorter side, centre crop, /255, ``(x - mean) / std``.
    """
    from PIL import Image

    mean_arr, std_arr = _check_args(1, image_size, mean, std)
    if image.mode != "RGB":
        image = image.convert("RGB")  # (an RGB image's convert is a copy: skipped)
    width, height = image.size
    new_w, new_h = _resized_size(width, height, image_size)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # torchvision CenterCrop offsets (pads with zeros only when the image is smaller: never here)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    image = image.crop((left, top, left + image_size, top + image_size))
    return _normalise(np.asarray(image), mean_arr, std_arr)


def _normalise(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] ``(rgb / 255 - mean) / std``.

    Through a 256-entry table per channel built with exactly those float32 operations, so every
    value is bitwise what the per-pixel arithmetic gives (tested), in one gather per channel
    instead of five passes over [H, W, 3] with a 3-wide broadcast (~1 ms at 224 px)."""
    levels = np.arange(256, dtype=np.float32) / 255.0
    table = (levels[None, :] - mean[:, None]) / std[:, None]  # float32 [3, 256]
    planes = rgb.transpose(2, 0, 1)  # [3, H, W] view
    out = np.empty(planes.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], planes[channel], out=out[channel])
    return out


def _stream_rotation(stream: Any) -> int:
    """Legacy ``rotate`` tag (clockwise degrees) as a counter-clockwise angle; 0 if absent."""
    tag = (stream.metadata or {}).get("rotate")
    if tag is None:
        return 0
    try:
        return -int(float(tag))
    except ValueError:
        return 0


def _rotate(image: Any, degrees_ccw: float) -> Any:
    """Rotate a PIL image counter-clockwise by a multiple of 90° (nearest one)."""
    from PIL import Image

    quarter = int(round(degrees_ccw / 90.0)) % 4
    if quarter == 0:
        return image
    transpose = {
        1: Image.Transpose.ROTATE_90,
        2: Image.Transpose.ROTATE_180,
        3: Image.Transpose.ROTATE_270,
    }[quarter]
    return image.transpose(transpose)


def _frame_rotation(frame: Any, stream_rotation: int) -> int:
    try:
        rotation = int(frame.rotation)  # display matrix side data, counter-clockwise degrees
    except Exception:  # noqa: BLE001 - malformed side data: treat as unrotated
        rotation = 0
    return rotation if rotation != 0 else stream_rotation


class _Deadline:
    def __init__(self, path: str, timeout_s: float | None) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.end = None if timeout_s is None else time.monotonic() + timeout_s

    def check(self) -> None:
        if self.end is not None and time.monotonic() > self.end:
            raise VideoDecodeError(self.path, f"decoding took longer than {self.timeout_s:g} s")


def _time_of(frame: Any, time_base: Fraction | None) -> float | None:
    pts = frame.pts
    if pts is not None and time_base is not None:
        # float(pts * time_base) without building a Fraction per frame: an int / int true
        # division is correctly rounded, so the value is the same float
        return pts * time_base.numerator / time_base.denominator
    return frame.time


def _span_from_packets(container: Any, stream: Any, deadline: _Deadline) -> tuple[float, float]:
    """(t0, duration) from a demux-only pass over the video packets (no decoding)."""
    start, end = math.inf, -math.inf
    time_base = stream.time_base
    for packet in container.demux(stream):
        deadline.check()
        if packet.pts is None:
            continue
        t = float(packet.pts * time_base)
        dur = float(packet.duration * time_base) if packet.duration else 0.0
        start, end = min(start, t), max(end, t + dur)
    container.seek(0)
    if not math.isfinite(start):
        return 0.0, 0.0
    return start, max(end - start, 0.0)


def _stream_span(
    container: Any, stream: Any, deadline: _Deadline, scan_below_s: float
) -> tuple[float, float]:
    """(t0, duration) in seconds of the video stream.

    Container metadata first; when it is missing or says the video is short (≤ ``scan_below_s``)
    a demux-only pass over the packets (no decoding) gives the exact span, since MP4 stream
    durations are derived from decode timestamps and can be off for variable frame rates.
    """
    time_base = stream.time_base
    t0 = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    duration: float | None = None
    if stream.duration and time_base is not None:
        duration = float(stream.duration * time_base)
    elif container.duration:
        c_start = (container.start_time or 0) / 1e6
        duration = max(container.duration / 1e6 - (t0 - c_start), 0.0)
    if duration is not None and duration > scan_below_s:
        return t0, duration
    start, span = _span_from_packets(container, stream, deadline)
    if span > 0:
        return start, span
    return t0, duration or 0.0


def _check_frame_size(path: str, width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise VideoDecodeError(
            path,
            f"frames of {width}x{height} pixels exceed the limit of {MAX_FRAME_PIXELS} pixels "
            "(8K UHD): refused, as decoding them would take gigabytes of memory",
        )


@contextlib.contextmanager
def open_video(path: str) -> Iterator[tuple[Any, Any]]:
    """``path`` opened for decoding: its container and first video stream, checked before a
    single frame is decoded (a readable media file, a video stream, frames of at most
    ``MAX_FRAME_PIXELS``), the container closed on exit; ``VideoDecodeError`` otherwise.
    The one opening of ``decode_video`` and of the segmenting pass (``video.segment``)."""
    import av

    try:
        container = av.open(path, mode="r")
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(
            path, f"not a readable media file ({_open_error_reason(exc)})"
        ) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoDecodeError(path, f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        _check_frame_size(path, int(stream.codec_context.width), int(stream.codec_context.height))
        yield container, stream


class _Reduced:
    """A picked frame kept as a small RGB image (for frames above REDUCE_ABOVE_PIXELS): what
    the preprocessing reads of a frame (``to_image``, ``rotation``), at a fraction of the size."""

    def __init__(self, frame: Any, short_side: int) -> None:
        width, height = int(frame.width), int(frame.height)
        scale = min(1.0, short_side / max(1, min(width, height)))
        self.image = frame.to_image(
            width=max(1, round(width * scale)),
            height=max(1, round(height * scale)),
            interpolation="AREA",
        )
        try:
            self.rotation = int(frame.rotation)
        except Exception:  # noqa: BLE001 - malformed side data: treat as unrotated
            self.rotation = 0

    def to_image(self) -> Any:
        return self.image


def _rgb_image(frame: Any, reformatter: Any) -> Any:
    """A decoded frame (or a :class:`_Reduced` one) as an RGB PIL image: ``frame.to_image()``'s
    pixels (tested on real files, sizes and pixel formats) through ``reformatter``, one reused
    single-threaded ``VideoReformatter``. ``to_image`` sets up a threaded swscale context per
    call: ~4 ms even for a 96x96 frame, against ~0.1 ms."""
    from PIL import Image

    if isinstance(frame, _Reduced):
        return frame.image
    return Image.fromarray(reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray())


def _preprocess_frame(
    frame: Any,
    reformatter: Any,
    stream_rotation: int,
    image_size: int,
    mean: np.ndarray,
    std: np.ndarray,
) -> np.ndarray:
    """One decoded frame -> float32 [3, S, S]: RGB, display rotation, :func:`preprocess_image`."""
    image = _rotate(_rgb_image(frame, reformatter), _frame_rotation(frame, stream_rotation))
    return preprocess_image(image, image_size, mean, std)


class _Picker:
    """Keeps, for each target time, the nearest frame seen so far (``reduce_to``: frames larger
    than REDUCE_ABOVE_PIXELS are kept as a :class:`_Reduced` image of that short side)."""

    def __init__(self, targets: np.ndarray, reduce_to: int = 0) -> None:
        self.targets = targets
        self.reduce_to = reduce_to
        self.best_frames: list[Any] = [None] * len(targets)
        self.best_times = np.full(len(targets), np.nan)
        self.best_dist = np.full(len(targets), np.inf)

    def offer(self, frame: Any, t: float) -> None:
        dist = np.abs(self.targets - t)
        better = dist < self.best_dist
        if self.reduce_to and better.any() and frame.width * frame.height > REDUCE_ABOVE_PIXELS:
            frame = _Reduced(frame, self.reduce_to)  # the full-size frame is released
        for i in np.flatnonzero(better):
            self.best_frames[i] = frame
            self.best_times[i] = t
            self.best_dist[i] = dist[i]

    @property
    def complete(self) -> bool:
        return all(f is not None for f in self.best_frames)


def _decode_packets(
    container: Any, stream: Any, path: str, deadline: _Deadline
) -> Iterator[tuple[Any, float]]:
    """(frame, time) in presentation order, skipping up to MAX_BAD_PACKETS corrupt packets."""
    import av

    time_base = stream.time_base
    bad = 0
    last_error = ""
    for packet in container.demux(stream):
        deadline.check()
        try:
            frames = packet.decode()
        except av.error.FFmpegError as exc:
            bad += 1
            last_error = str(exc)
            if bad > MAX_BAD_PACKETS:
                raise VideoDecodeError(path, f"too many corrupt packets ({last_error})") from None
            continue
        for frame in frames:
            _check_frame_size(path, int(frame.width), int(frame.height))  # a size change
            t = _time_of(frame, time_base)
            if t is not None:
                yield frame, t
    if bad:
        log.debug("%s: skipped %d corrupt packets (%s)", path, bad, last_error)


def _pick_sequential(
    container: Any,
    stream: Any,
    path: str,
    targets: np.ndarray,
    deadline: _Deadline,
    reduce_to: int = 0,
) -> _Picker:
    picker = _Picker(targets, reduce_to)
    last_target = float(targets[-1])
    for frame, t in _decode_packets(container, stream, path, deadline):
        picker.offer(frame, t)
        if t >= last_target and picker.complete:
            break  # frames come in presentation order: later ones are farther from every target
    return picker


def _pick_seeking(
    container: Any,
    stream: Any,
    path: str,
    targets: np.ndarray,
    deadline: _Deadline,
    reduce_to: int = 0,
) -> _Picker:
    picker = _Picker(targets, reduce_to)
    time_base = stream.time_base
    for i, target in enumerate(targets):
        if picker.best_frames[i] is not None and picker.best_times[i] >= target:
            continue  # a frame already decoded after this target is the nearest one seen
        container.seek(int(target / time_base), stream=stream, backward=True, any_frame=False)
        for frame, t in _decode_packets(container, stream, path, deadline):
            picker.offer(frame, t)
            if t >= target:
                break
    return picker


def _open_error_reason(exc: BaseException) -> str:
    text = str(exc)
    # PyAV messages repeat the path; keep only the FFmpeg reason
    if ": '" in text:
        text = text.split(": '")[0]
    return text or type(exc).__name__


def check_video_file(path: str | os.PathLike[str]) -> str:
    """``path`` as a string once it names a non-empty regular file, else VideoDecodeError."""
    path_str = os.fspath(path)
    file = Path(path_str)
    if not file.exists():
        raise VideoDecodeError(path_str, "no such file")
    if not file.is_file():
        raise VideoDecodeError(path_str, "not a regular file")
    if file.stat().st_size == 0:
        raise VideoDecodeError(path_str, "empty file (0 bytes)")
    return path_str


def decode_video(
    path: str | os.PathLike[str],
    num_frames: int = 12,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    start_s: float | None = None,
    end_s: float | None = None,
    timeout_s: float | None = 60.0,
    seek_threshold_s: float = DEFAULT_SEEK_THRESHOLD_S,
    threads: int = 0,
) -> VideoClip:
    """Decode ``num_frames`` uniformly sampled, CLIP-preprocessed frames of one video.

    Args:
        path: a video file (any container/codec FFmpeg reads).
        num_frames: T, frames sampled at the centres of T equal time segments.
        image_size: output side (shorter side resized to it, then centre-cropped).
        mean, std: per-channel normalisation of RGB in [0, 1].
        timeout_s: abandon the decode after this many seconds (None = no limit).
        seek_threshold_s: videos longer than this are sampled by seeking to each target.
        threads: FFmpeg decoder threads (0 = FFmpeg's choice; 1 inside worker pools).

    Returns:
        A :class:`VideoClip` with frames float32 [T, 3, image_size, image_size].

    Raises:
        VideoDecodeError: the file is missing, unreadable, has no video stream or no decodable
            frame, is corrupt, or decoding ran past ``timeout_s``.
        InvalidInputError: bad ``num_frames`` / ``image_size`` / ``mean`` / ``std``.
    """
    mean_arr, std_arr = _check_args(num_frames, image_size, mean, std)
    if start_s is not None and not (math.isfinite(start_s) and start_s >= 0):
        raise InvalidInputError(f"start_s must be a number of seconds >= 0, got {start_s!r}")
    if end_s is not None and not (math.isfinite(end_s) and end_s > (start_s or 0.0)):
        raise InvalidInputError(f"end_s must be greater than start_s, got {end_s!r}")
    path_str = check_video_file(path)
    deadline = _Deadline(path_str, timeout_s)
    try:
        return _decode(
            path_str,
            num_frames,
            image_size,
            mean_arr,
            std_arr,
            (start_s, end_s),
            deadline,
            seek_threshold_s,
            threads,
        )
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - FFmpeg/PIL failures of any kind become typed errors
        raise VideoDecodeError(path_str, _open_error_reason(exc)) from exc


def _decode(
    path: str,
    num_frames: int,
    image_size: int,
    mean: np.ndarray,
    std: np.ndarray,
    segment: tuple[float | None, float | None],
    deadline: _Deadline,
    seek_threshold_s: float,
    threads: int,
) -> VideoClip:
    from av.video.reformatter import VideoReformatter

    with open_video(path) as (container, stream):
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width * height > REDUCE_ABOVE_PIXELS:
            threads = 1  # every decoding thread holds a full-size frame of its own
        if threads:
            stream.codec_context.thread_count = threads
        t0, duration = _stream_span(container, stream, deadline, seek_threshold_s)
        seg_start = t0 + (segment[0] or 0.0)
        seg_end = t0 + duration if segment[1] is None else t0 + min(segment[1], duration)
        if segment != (None, None) and seg_end <= seg_start:
            raise VideoDecodeError(
                path, f"segment {segment[0]}-{segment[1]} s is outside the video ({duration:.3f} s)"
            )
        # centres of num_frames equal parts of [seg_start, seg_end)
        parts = (np.arange(num_frames, dtype=np.float64) + 0.5) / num_frames
        targets = seg_start + parts * (seg_end - seg_start)
        pick = _pick_seeking if duration > seek_threshold_s else _pick_sequential
        reduce_to = REDUCED_SHORT_SIDE_FACTOR * image_size
        picker = pick(container, stream, path, targets, deadline, reduce_to)
        if not picker.complete:
            raise VideoDecodeError(path, "no decodable video frames")
        stream_rotation = _stream_rotation(stream)
        reformatter = VideoReformatter()

        frames = np.empty((num_frames, 3, image_size, image_size), dtype=np.float32)
        mask = np.zeros(num_frames, dtype=bool)
        done: dict[int, int] = {}  # id(frame) -> index of its first occurrence
        for i, frame in enumerate(picker.best_frames):
            first = done.get(id(frame))
            if first is not None:
                frames[i] = frames[first]
                continue
            deadline.check()
            frames[i] = _preprocess_frame(
                frame, reformatter, stream_rotation, image_size, mean, std
            )
            mask[i] = True
            done[id(frame)] = i
    timestamps = np.maximum(picker.best_times - t0, 0.0)
    return VideoClip(
        frames=frames,
        timestamps=timestamps.astype(np.float64),
        mask=mask,
        duration_s=float(duration),
        path=path,
    )


def _decode_for_pool(
    path: str, kwargs: dict[str, Any]
) -> VideoClip | tuple[str, str]:  # (path, reason) travels instead of the exception
    try:
        return decode_video(path, **kwargs)
    except VideoDecodeError as exc:
        return (exc.path, exc.reason)
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
        return (path, f"{type(exc).__name__}: {exc}")


def decode_many(
    paths: Iterable[str | os.PathLike[str]],
    *,
    num_frames: int = 12,
    image_size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    workers: int = 2,
    prefetch: int | None = None,
    timeout_s: float | None = 60.0,
    backend: str = "thread",
) -> Iterator[tuple[str, VideoClip | VideoDecodeError]]:
    """Decode many videos in parallel; yield ``(path, VideoClip | VideoDecodeError)`` in input order.

    At most ``prefetch`` (default ``2 * workers``) decodes are in flight, so memory stays bounded
    and the caller's work on clip i (e.g. encoding) overlaps the decoding of the next ones.
    A bad file yields its error and the batch goes on. ``backend`` is ``"thread"`` (default:
    PyAV and PIL release the GIL, and clips need no pickling) or ``"process"``. Measured on 2
    shared cores, 200 synthetic 32² clips → 12 frames at 224²: threads 1 worker 26-28 clips/s,
    2 workers 31-42 clips/s; processes (spawn) 2 workers 9-12 clips/s.
    """
    _check_args(num_frames, image_size, mean, std)
    if workers < 1:
        raise InvalidInputError(f"workers must be >= 1, got {workers}")
    if backend not in ("thread", "process"):
        raise InvalidInputError(f"backend must be 'thread' or 'process', got {backend!r}")
    window = prefetch if prefetch is not None else 2 * workers
    if window < 1:
        raise InvalidInputError(f"prefetch must be >= 1, got {prefetch}")
    kwargs: dict[str, Any] = {
        "num_frames": num_frames,
        "image_size": image_size,
        "mean": tuple(float(v) for v in mean),
        "std": tuple(float(v) for v in std),
        "timeout_s": timeout_s,
        "threads": 1 if workers > 1 else 0,
    }

    def result(path: str, outcome: VideoClip | tuple[str, str]) -> VideoClip | VideoDecodeError:
        if isinstance(outcome, VideoClip):
            return outcome
        return VideoDecodeError(outcome[0], outcome[1])

    if workers == 1:
        for raw in paths:
            path = os.fspath(raw)
            yield path, result(path, _decode_for_pool(path, kwargs))
        return

    executor: Executor
    if backend == "thread":
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tb-decode")
    else:
        import multiprocessing

        executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        )
    pending: deque[tuple[str, Future[Any]]] = deque()
    try:
        for raw in paths:
            path = os.fspath(raw)
            pending.append((path, executor.submit(_decode_for_pool, path, kwargs)))
            if len(pending) >= window:
                head, future = pending.popleft()
                yield head, result(head, future.result())
        while pending:
            head, future = pending.popleft()
            yield head, result(head, future.result())
    finally:
        for _, future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
