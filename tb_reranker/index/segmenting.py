"""Ingest's decode and encode of segments: videos cut and sampled in worker threads, segments
encoded in batches across videos, each video handed over whole once its last segment is encoded.

:func:`segment_stream` runs :func:`tb_reranker.video.segment.iter_segments` for up to
``workers`` videos at a time, each into a bounded queue, and yields their items in input order:
memory holds a few segments' frames per worker, never a whole long file. A video no longer than
the spec's longest segment (``SegmentSpec.keeps_whole`` of the duration its container states: 30 s
for ``shots``) is one segment decoded by ``decode_video``, exactly as before segments.

:class:`SegmentEncoder` takes those items, encodes ``batch_size`` segments per ``encode_frames``
call (segments of several short videos share a batch, as whole videos did), and returns the
videos all of whose segments are encoded (:class:`EncodedVideo`): the ingest writes a video
only whole, so a crash never leaves part of its new segments visible.

:func:`decode_file` (one file's items) and :func:`encode_segments` (one batch through the model)
are the two steps themselves: this module's thread pipeline and the Ray engine's tasks and actors
(:mod:`tb_reranker.index.ray_ingest`) both run them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tb_reranker.errors import VideoDecodeError
from tb_reranker.video.segment import Segment, SegmentFailure, iter_segments
from tb_reranker.video.segment_plan import SegmentSpec

__all__ = [
    "END",
    "DecodeSettings",
    "EncodedSegment",
    "EncodedVideo",
    "SegmentEncoder",
    "decode_file",
    "encode_segments",
    "segment_stream",
]

log = logging.getLogger(__name__)

END = None  # the item after a video's last one
QUEUE_SEGMENTS = 4  # decoded segments a worker may hold ahead of the encoder
_POLL_S = 0.2  # how often a blocked worker checks whether the stream was abandoned

Item = Segment | SegmentFailure | VideoDecodeError | None


WHOLE_TIMEOUT_S = 60.0  # decode_video's limit for a file kept whole (decode_many's)


def stated_duration(path: str) -> float | None:
    """The duration the container states for its first video stream, in seconds (None when it
    states none or cannot be opened: then the decode pass measures it)."""
    import av

    try:
        with av.open(path, mode="r") as container:
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return float(container.duration) / av.time_base
    except Exception:  # noqa: BLE001 - the decode that follows reports what is wrong
        return None
    return None


@dataclass(frozen=True)
class DecodeSettings:
    """How every file of an ingest is cut and sampled: the segment spec and the model's input
    geometry (``num_frames`` frames of ``image_size`` pixels normalised by ``mean``/``std``);
    ``threads`` FFmpeg decoder threads per file (0: FFmpeg's choice); ``s3_endpoint`` where
    ``s3://`` inputs are read (the driver's ``TB_S3_ENDPOINT``: a Ray worker need not have it set;
    credentials stay the worker's own). Plain values: it travels to Ray decode tasks as it is."""

    spec: SegmentSpec
    num_frames: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threads: int = 0
    s3_endpoint: str | None = None

    @classmethod
    def for_model(cls, model: Any, spec: SegmentSpec, threads: int = 0) -> DecodeSettings:
        """The settings that feed ``model`` (a ``TokenBinder``)."""
        return cls(
            spec=spec,
            num_frames=int(model.num_frames),
            image_size=int(model.image_size),
            mean=tuple(float(v) for v in model.image_mean),
            std=tuple(float(v) for v in model.image_std),
            threads=threads,
            s3_endpoint=os.environ.get("TB_S3_ENDPOINT") or None,
        )

    def decode_kwargs(self) -> dict[str, Any]:
        return {
            "num_frames": self.num_frames,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "threads": self.threads,
        }


def _items(path: str, settings: DecodeSettings) -> Iterator[Item]:
    """A file the spec keeps whole (by its stated duration) is decoded by ``decode_video``
    itself, as before segments; the rest go through the one-pass cutter."""
    from tb_reranker.video import decode_video

    duration = stated_duration(path)
    if duration is not None and settings.spec.keeps_whole(duration):
        clip = decode_video(path, timeout_s=WHOLE_TIMEOUT_S, **settings.decode_kwargs())
        yield Segment(0.0, float(clip.duration_s), clip)
        return
    yield from iter_segments(path, spec=settings.spec, **settings.decode_kwargs())


def decode_file(path: str, settings: DecodeSettings) -> Iterator[Item]:
    """The decode of one file, the one both ingest engines run: its segments and failed
    stretches (:class:`Segment`, :class:`SegmentFailure`) in time order, then, when the file (or
    what is left of it) cannot be decoded, one :class:`VideoDecodeError`. Never raises for a bad
    file: one bad file must not stop the others. An ``s3://`` object is decoded from a local
    copy held for the length of the decode (:func:`tb_reranker.video.sources.local_copy`)."""
    from tb_reranker.video.sources import local_copy

    with contextlib.ExitStack() as held:
        try:
            local = held.enter_context(local_copy(path, endpoint=settings.s3_endpoint))
        except VideoDecodeError as exc:
            yield exc
            return
        segments = _items(local, settings)
        try:
            yield from segments
        except VideoDecodeError as exc:
            yield exc if local == path else VideoDecodeError(path, exc.reason)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            yield VideoDecodeError(path, f"{type(exc).__name__}: {exc}")
        finally:
            segments.close()


def _produce(path: str, settings: DecodeSettings, out: queue.Queue, stop: threading.Event) -> None:
    """One video's items into ``out`` (then END); gives up when ``stop`` is set."""

    def put(item: Item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    items = decode_file(path, settings)
    try:
        for item in items:
            if not put(item):
                return
    finally:
        items.close()
    put(END)


def segment_stream(
    paths: Iterable[str], settings: DecodeSettings, *, workers: int = 2
) -> Iterator[tuple[str, Item]]:
    """``(path, item)`` for every segment, failed stretch or file error of each video
    (:func:`decode_file`), in input order, each video's items ending with ``(path, END)``;
    ``workers`` videos decode at once."""
    stop = threading.Event()
    pending: list[tuple[str, queue.Queue]] = []
    todo = iter(paths)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tb-segment")

    def submit() -> None:
        path = next(todo, None)
        if path is not None:
            items: queue.Queue = queue.Queue(maxsize=QUEUE_SEGMENTS)
            executor.submit(_produce, path, settings, items, stop)
            pending.append((path, items))

    try:
        for _ in range(workers):
            submit()
        while pending:
            path, items = pending.pop(0)
            while True:
                item = items.get()
                yield path, item
                if item is END:
                    break
            submit()
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)


def encode_segments(model: Any, frames: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """The encode of a batch of segments, the one both ingest engines run: ``frames`` float32
    [B, T, 3, H, W] and ``masks`` bool [B, T] through ``model.encode_frames`` →
    ``(cls float32 [B, D], tokens float16 [B, T', D])``."""
    import torch

    with torch.inference_mode():
        cls, tokens = model.encode_frames(torch.from_numpy(frames), torch.from_numpy(masks))
    return cls.float().cpu().numpy(), tokens.float().cpu().numpy().astype(np.float16)


@dataclass
class EncodedSegment:
    """One segment's tokens and [CLS] and where it lies in its video."""

    start_s: float
    end_s: float
    tokens: np.ndarray  # float16 [T', D]
    cls: np.ndarray  # float32 [D]
    timestamps: np.ndarray  # float32 [T], seconds in the file
    mask: np.ndarray  # bool [T]

    @classmethod
    def of(
        cls,
        start_s: float,
        end_s: float,
        tokens: np.ndarray,
        cls_vector: np.ndarray,
        timestamps: np.ndarray,
        mask: np.ndarray,
    ) -> EncodedSegment:
        """One row of :func:`encode_segments`' output with its segment's span and frames'
        times and mask, each its own copy in the stored types."""
        return cls(
            start_s=float(start_s),
            end_s=float(end_s),
            tokens=np.array(tokens, dtype=np.float16),
            cls=np.array(cls_vector, dtype=np.float32),
            timestamps=np.asarray(timestamps, dtype=np.float32),
            mask=np.asarray(mask, dtype=bool),
        )


@dataclass
class EncodedVideo:
    """A video all of whose segments are encoded: the segments in time order (failed stretches
    left out), the failures, and the file's duration."""

    path: str
    duration_s: float = 0.0
    segments: list[EncodedSegment] = field(default_factory=list)
    failures: list[SegmentFailure] = field(default_factory=list)
    error: VideoDecodeError | None = None  # the whole file failed
    ended: bool = False
    waiting: int = 0  # segments handed to the encoder, not encoded yet


class SegmentEncoder:
    """Encodes segments ``batch_size`` at a time with ``model.encode_frames``; :meth:`add` takes
    the items of :func:`segment_stream` and returns the videos that became complete."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.videos: list[EncodedVideo] = []  # in input order, not handed over yet
        self.batch: list[tuple[EncodedVideo, int, Segment]] = []

    def add(self, path: str, item: Item) -> list[EncodedVideo]:
        if not self.videos or self.videos[-1].ended or self.videos[-1].path != path:
            self.videos.append(EncodedVideo(path))
        video = self.videos[-1]
        if item is END:
            video.ended = True
        elif isinstance(item, VideoDecodeError):
            video.error = item
        elif isinstance(item, SegmentFailure):
            video.failures.append(item)
        else:
            video.duration_s = float(item.clip.duration_s)
            video.segments.append(None)  # type: ignore[arg-type] - filled by _encode
            video.waiting += 1
            self.batch.append((video, len(video.segments) - 1, item))
            if len(self.batch) >= self.batch_size:
                self._encode()
        return self._complete()

    def finish(self) -> list[EncodedVideo]:
        """Encode what is left; every video is complete then."""
        if self.batch:
            self._encode()
        return self._complete()

    def _complete(self) -> list[EncodedVideo]:
        done = 0
        while done < len(self.videos) and self.videos[done].ended and not self.videos[done].waiting:
            done += 1
        complete, self.videos = self.videos[:done], self.videos[done:]
        return complete

    def _encode(self) -> None:
        batch, self.batch = self.batch, []
        frames = np.stack([s.clip.frames for _, _, s in batch])  # [B, T, 3, H, W]
        masks = np.stack([s.clip.mask for _, _, s in batch])  # [B, T]
        cls, tokens = encode_segments(self.model, frames, masks)
        for b, (video, position, segment) in enumerate(batch):
            video.segments[position] = EncodedSegment.of(
                segment.start_s,
                segment.end_s,
                tokens[b],
                cls[b],
                segment.clip.timestamps,
                segment.clip.mask,
            )
            video.waiting -= 1
