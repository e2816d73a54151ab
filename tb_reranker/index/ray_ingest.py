"""Ingest on Ray: ``tb ingest --engine ray`` (``IngestOptions(engine="ray")``, the ``ray`` extra).

Only the decode and the encode move. This process (the driver) expands the inputs and plans
exactly as the local engine (:class:`~tb_reranker.index.ingest.Ingestion`: content hash, then
encode / re-index / metadata update / unchanged); the videos to encode go through Ray Data::

    from_items([{video_id, path}])                  one block per video (up to MAX_BLOCKS)
    → flat_map(decode_rows)      CPU tasks          decode_file(): one row per segment (frames
                                                    as numpy arrays), then one end row per video
                                                    (segment count, failed stretches, error)
    → map_batches(EncodeActor)   actor pool         encode_segments(), batch_size segments per
                                                    call; the model loaded once per actor from
                                                    the checkpoint directory (a GPU each when
                                                    the cluster has GPUs)
    → iter_rows() here           VideoAssembly      each video whole once its end row and all
                                                    its segments are in → Ingestion.take

The decode of a file and the encode of a batch are the very functions the local engine runs
(:func:`~tb_reranker.index.segmenting.decode_file`,
:func:`~tb_reranker.index.segmenting.encode_segments`), and every write is the local engine's
(``Ingestion.take`` → ``_finished`` → ``_write``: the store before Milvus, each video whole).

One writer: the driver is the only process that writes the frame store and Milvus. A local
LMDB store is an environment that one writer owns; the workers only read the video files (at the
same path on every node) and the checkpoint, and send back arrays.

Guarantees, as with the local engine: idempotent by content hash (a second run finds every video
unchanged and starts no Ray runtime), resumable (a run killed anywhere is finished by running it
again), a corrupt file fails alone (its end row carries the error). Faults: decode tasks are
retried (``DECODE_RETRIES``), encode actors restarted (``ACTOR_RESTARTS``, their calls retried
``ACTOR_TASK_RETRIES`` times), so a killed worker costs time, not videos; a retried task's rows
may arrive twice, and :class:`VideoAssembly` keeps one of each segment. Videos are written as
they complete, not in input order.

Runtime: without an address, a private local Ray runtime (``address="local"``: never someone
else's cluster; all CPUs; its own temporary directory, removed afterwards) started only when
there is something to encode; ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:10001"`` join a
running cluster (checked before planning: an address where nothing answers is one line,
:class:`InvalidInputError`). A process that already called ``ray.init`` is used as it is.
Progress: Ray Data's bars on a terminal, the ingest's own log lines elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tb_reranker.errors import CheckpointError, InvalidInputError, VideoDecodeError, printable
from tb_reranker.index.segmenting import (
    DecodeSettings,
    EncodedSegment,
    EncodedVideo,
    decode_file,
    encode_segments,
)
from tb_reranker.video.segment import SegmentFailure

__all__ = ["RayEncoder", "VideoAssembly", "EncodeActor", "check_ray", "decode_rows", "require_ray"]

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'tb_reranker[ray]'"
DECODE_RETRIES = 3  # a decode task whose worker died runs again (its rows may arrive twice)
ACTOR_RESTARTS = 3  # an encode actor whose process died is restarted ...
ACTOR_TASK_RETRIES = 3  # ... and the batch it held is encoded again
MAX_BLOCKS = 4096  # input blocks: one video each up to this many, then several per block
PROBE_TIMEOUT_S = 5.0  # a cluster address must accept a TCP connection within this
SEGMENT, END = "segment", "end"  # the row kinds of the decode stage


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data); :class:`InvalidInputError` naming the extra when it
    is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401 - ray[data]: the extra installs both
    except ImportError as exc:
        raise InvalidInputError(
            f"the ray engine needs the ray extra ({exc.name or 'ray'} is not installed): "
            f"{RAY_EXTRA}"
        ) from None
    return ray


def probe_address(address: str) -> None:
    """Whether something answers at a ``HOST:PORT`` or ``ray://HOST:PORT`` cluster address
    (Ray itself retries an unreachable one for minutes); ``"auto"`` is left to ``ray.init``."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInputError(
            f"invalid Ray address {printable(address)}: expected auto, HOST:PORT or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise InvalidInputError(
            f"no Ray cluster answers at {printable(address)}: {exc.strerror or exc}"
        ) from None


def check_ray(address: str | None) -> str | None:
    """The checks a Ray ingest can make before anything loads: the extra is installed and
    something answers at ``address``; the address to join (None: a private local runtime)."""
    require_ray()
    address = None if address in (None, "", "local") else str(address)
    if address is not None:
        probe_address(address)
    return address


@contextlib.contextmanager
def ray_runtime(address: str | None, *, progress: bool) -> Iterator[Any]:
    """``ray``, initialised for the run: joined to ``address``, or a private local runtime;
    shut down afterwards (a runtime this process had already started is used and left as is)."""
    ray = require_ray()
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.enable_progress_bars, context.enable_auto_log_stats)
    context.enable_progress_bars = progress and sys.stderr.isatty()
    context.enable_auto_log_stats = False
    quiet = not log.isEnabledFor(logging.DEBUG)
    for name in ("ray", "ray.data"):  # Ray Data's per-run INFO lines; its warnings when quiet
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.INFO)
    temp, started = None, False
    # Ray's driver prints worker deaths and worker output to sys.stdout: stderr for the run, so
    # stdout holds only what the caller prints (tb ingest --json)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            try:
                if not ray.is_initialized():
                    temp = _init(ray, address, quiet)
                    started = True
                yield ray
            finally:
                if started:
                    ray.shutdown()
    finally:
        context.enable_progress_bars, context.enable_auto_log_stats = saved
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _init(ray: Any, address: str | None, quiet: bool) -> str | None:
    """``ray.init`` for the run; the temporary directory of a private runtime (None: joined)."""
    settings: dict[str, Any] = {
        "logging_level": logging.ERROR if quiet else logging.INFO,
        "log_to_driver": not quiet,
    }
    temp = None
    if address is None:  # never someone else's cluster, never their /tmp/ray
        temp = tempfile.mkdtemp(prefix="tb-ray-")
        settings.update(
            address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, _temp_dir=temp
        )
    elif address.startswith("ray://"):
        settings = {"address": address}  # Ray Client: the server's own settings
    else:
        settings["address"] = address
    try:
        ray.init(**settings)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"at {printable(address)}" if address else "locally"
        raise InvalidInputError(f"cannot start Ray {where}: {first}") from None
    log.debug("ray: %s", ray.cluster_resources())
    return temp


def decode_rows(row: Mapping[str, Any], settings: DecodeSettings) -> Iterator[dict[str, Any]]:
    """The decode stage (a Ray task per input row ``{video_id, path, file}``; ``file``, the
    absolute path, is what it reads): one row per segment, then the video's end row (``n`` =
    its segment count; ``info`` its failed stretches, error and duration, as JSON), all with
    the same columns."""
    video_id, path = str(row["video_id"]), str(row["path"])
    size = settings.image_size
    count, duration, failures, error = 0, 0.0, [], None
    for item in decode_file(str(row["file"]), settings):
        if isinstance(item, VideoDecodeError):
            error = item.reason
        elif isinstance(item, SegmentFailure):
            failures.append([item.start_s, item.end_s, item.reason])
        else:
            duration = float(item.clip.duration_s)
            yield _row(video_id, path, SEGMENT, count, item.start_s, item.end_s, "", item.clip)
            count += 1
    info = json.dumps({"duration_s": duration, "failures": failures, "error": error})
    empty = _Frames(
        np.zeros((0, 3, size, size), np.float32), np.zeros(0, bool), np.zeros(0, np.float64)
    )
    yield _row(video_id, path, END, count, 0.0, duration, info, empty)


@dataclass
class _Frames:
    frames: np.ndarray
    mask: np.ndarray
    timestamps: np.ndarray


def _row(
    video_id: str, path: str, kind: str, n: int, start: float, end: float, info: str, clip: Any
) -> dict[str, Any]:
    return {
        "video_id": video_id,
        "path": path,
        "kind": kind,
        "n": int(n),
        "start_s": float(start),
        "end_s": float(end),
        "info": info,
        "frames": np.asarray(clip.frames, dtype=np.float32),
        "mask": np.asarray(clip.mask, dtype=bool),
        "timestamps": np.asarray(clip.timestamps, dtype=np.float64),
    }


class EncodeActor:
    """The encode stage (a Ray Data actor): loads the TokenBinder from ``checkpoint`` once
    (never a pickled model) and encodes the segment rows of each batch; end rows pass through
    with empty ``cls``/``tokens``. The ``frames`` column stays behind."""

    def __init__(self, checkpoint: str, device: str, fingerprint: str, threads: int = 1) -> None:
        import torch

        from tb_reranker.model import load_checkpoint, resolve_device

        torch.set_num_threads(max(1, threads))
        self.model = load_checkpoint(checkpoint, device=resolve_device(device), inference=True)
        found = str(self.model.vision_fingerprint())
        if found != fingerprint:
            raise CheckpointError(
                f"checkpoint {checkpoint} on this Ray worker has vision fingerprint {found}, "
                f"the driver's model {fingerprint}: not the same model"
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        kinds = [str(k) for k in batch["kind"]]
        rows = [i for i, kind in enumerate(kinds) if kind == SEGMENT]
        cls_column = np.empty(len(kinds), dtype=object)
        tokens_column = np.empty(len(kinds), dtype=object)
        cls_column[:] = [np.zeros(0, np.float32)] * len(kinds)
        tokens_column[:] = [np.zeros((0, 0), np.float16)] * len(kinds)
        if rows:
            frames = np.stack([np.asarray(batch["frames"][i], dtype=np.float32) for i in rows])
            masks = np.stack([np.asarray(batch["mask"][i], dtype=bool) for i in rows])
            cls, tokens = encode_segments(self.model, frames, masks)
            for b, i in enumerate(rows):
                cls_column[i], tokens_column[i] = cls[b], tokens[b]
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "frames"}
        out["cls"], out["tokens"] = cls_column, tokens_column
        return out


@dataclass
class _Parts:
    path: str
    segments: dict[int, EncodedSegment] = field(default_factory=dict)
    end: Mapping[str, Any] | None = None  # the end row: count and info


class VideoAssembly:
    """Encoded rows (in any order) → whole videos: a video is complete once its end row and
    every one of its segments are in. A row that arrives twice (a retried task) counts once;
    rows of a video already handed over are ignored."""

    def __init__(self) -> None:
        self.open: dict[str, _Parts] = {}
        self.done: set[str] = set()

    def add(self, row: Mapping[str, Any]) -> tuple[str, EncodedVideo] | None:
        """The video ``row`` completes, as ``(video id, EncodedVideo)``; None otherwise."""
        video_id = str(row["video_id"])
        if video_id in self.done:
            return None
        parts = self.open.setdefault(video_id, _Parts(str(row["path"])))
        n = int(row["n"])
        if row["kind"] == END:
            parts.end = {"count": n, **json.loads(str(row["info"]))}
        else:
            parts.segments[n] = EncodedSegment.of(
                row["start_s"],
                row["end_s"],
                row["tokens"],
                row["cls"],
                row["timestamps"],
                row["mask"],
            )
        if parts.end is None or len(parts.segments) < parts.end["count"]:
            return None
        del self.open[video_id]
        self.done.add(video_id)
        return video_id, self._video(parts)

    @staticmethod
    def _video(parts: _Parts) -> EncodedVideo:
        end = parts.end or {}
        error = end.get("error")
        return EncodedVideo(
            path=parts.path,
            duration_s=float(end.get("duration_s", 0.0)),
            segments=[parts.segments[n] for n in range(int(end.get("count", 0)))],
            failures=[SegmentFailure(float(s), float(e), str(r)) for s, e, r in end["failures"]],
            error=VideoDecodeError(parts.path, error) if error else None,
            ended=True,
        )

    def missing(self, entries: list[tuple[str, str]]) -> list[tuple[str, EncodedVideo]]:
        """The videos of ``entries`` the pipeline did not complete, each with an error."""
        lost = []
        for video_id, path in entries:
            if video_id in self.done:
                continue
            parts = self.open.pop(video_id, None)
            have = "no end row"
            if parts is not None and parts.end is not None:
                have = f"{len(parts.segments)} of {parts.end['count']} segments"
            reason = f"the Ray pipeline lost part of it ({have})"
            lost.append((video_id, EncodedVideo(path, error=VideoDecodeError(path, reason))))
            self.done.add(video_id)
        return lost


class RayEncoder:
    """The Ray engine of one ingest (``Ingestion.encoder``): checks the extra, the checkpoint
    and the address when built; :meth:`encode` runs the pipeline and hands each video to the
    ingestion."""

    def __init__(self, options: Any, *, fingerprint: str) -> None:
        if not options.checkpoint:
            raise InvalidInputError(
                "the ray engine needs checkpoint= (the model's checkpoint directory, which each "
                "encode actor loads)"
            )
        self.address = check_ray(options.ray_address)
        self.options = options
        self.fingerprint = fingerprint

    def encode(self, run: Any, entries: list[tuple[str, str]], held: Any) -> None:
        """Decode + encode ``entries`` (``(video id, path)``) on Ray; ``run.take`` each video."""
        with ray_runtime(self.address, progress=self.options.progress) as ray:
            assembly = VideoAssembly()
            for row in self._dataset(ray, run, entries).iter_rows():
                done = assembly.add(row)
                if done is not None:
                    run.take(done[0], done[1], held)
            for video_id, video in assembly.missing(entries):
                run.take(video_id, video, held)

    def _dataset(self, ray: Any, run: Any, entries: list[tuple[str, str]]) -> Any:
        options = self.options
        threads = max(1, int(options.decode_cpus))
        settings = DecodeSettings.for_model(run.model, options.spec, threads=threads)
        gpus = 1 if options.device != "cpu" and ray.cluster_resources().get("GPU", 0) else 0
        items = [{"video_id": v, "path": p, "file": os.path.abspath(p)} for v, p in entries]
        data = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_BLOCKS))
        decode_compute = (
            ray.data.TaskPoolStrategy(size=options.decode_tasks) if options.decode_tasks else None
        )
        with warnings.catch_warnings():  # retries are still "ray_remote_args" in Ray 2.60
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            decoded = data.flat_map(
                decode_rows,
                fn_kwargs={"settings": settings},
                compute=decode_compute,
                num_cpus=options.decode_cpus,
                max_retries=DECODE_RETRIES,
            )
            return decoded.map_batches(
                EncodeActor,
                fn_constructor_kwargs={
                    "checkpoint": str(options.checkpoint),
                    "device": options.device if gpus or options.device != "auto" else "cpu",
                    "fingerprint": self.fingerprint,
                },
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=options.encode_actors),
                num_cpus=1,
                num_gpus=gpus,
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_TASK_RETRIES,
            )
