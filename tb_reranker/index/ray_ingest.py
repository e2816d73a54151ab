"""Ingest on Ray: ``tb ingest --engine ray`` (``IngestOptions(engine="ray")``, the ``ray`` extra).

Only the decode and the encode move. This process (the driver) expands the inputs and plans
exactly as the local engine (:class:`~tb_reranker.index.ingest.Ingestion`: content hash, then
encode / re-index / metadata update / unchanged); the videos to encode go through Ray Data::

    from_items([{video_id, path}])                  a few videos per block (VIDEOS_PER_TASK)
    → map_batches(decode_batch)  CPU tasks          decode_file(): one row per segment, frames
                                                    a fixed-shape [T, 3, H, W] tensor column;
                                                    a video's last row also carries its segment
                                                    count, failed stretches and error (a video
                                                    with no segment: one row, n = -1)
    → map_batches(EncodeActor)   actor pool         encode_segments(), batch_size segments per
                                                    call; the model loaded once per actor from
                                                    the checkpoint directory (a GPU each when
                                                    the cluster has GPUs; else the CPUs the
                                                    decode tasks leave, torch threads to match)
    → iter_batches() here        VideoAssembly      each video whole once its last row and all
                                                    its segments are in → Ingestion.take

Every column is a plain numpy array of one shape per row (no Python objects pickled per row);
Ray sets ``OMP_NUM_THREADS`` to 1 in its workers, so the actor sets torch's thread count to the
CPUs it reserves (:func:`encode_cpus`). Decode tasks take several videos each (a task costs
tens of milliseconds to schedule, a small clip less than that to decode).

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
Progress: Ray Data's bars on a terminal, the ingest's own log lines elsewhere. Timing: the
seconds from the engine's start to the first encoded videos back here (runtime start, actor
start and model load, the first batch through the pipeline) are ``IngestReport.startup_s``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tb_reranker.errors import (
    CheckpointError,
    InvalidInputError,
    TBError,
    VideoDecodeError,
    printable,
)
from tb_reranker.index.segmenting import (
    DecodeSettings,
    EncodedSegment,
    EncodedVideo,
    decode_file,
    encode_segments,
)
from tb_reranker.s3 import is_s3_url
from tb_reranker.video.segment import SegmentFailure

__all__ = [
    "RayEncoder",
    "VideoAssembly",
    "EncodeActor",
    "check_ray",
    "decode_batch",
    "decode_rows",
    "encode_cpus",
    "require_ray",
]

log = logging.getLogger(__name__)

RAY_EXTRA = "pip install 'tb_reranker[ray]'"
DECODE_RETRIES = 3  # a decode task whose worker died runs again (its rows may arrive twice)
ACTOR_RESTARTS = 3  # an encode actor whose process died is restarted ...
ACTOR_TASK_RETRIES = 3  # ... and the batch it held is encoded again
MAX_BLOCKS = 4096  # input blocks (decode tasks) at most
VIDEOS_PER_TASK = 8  # videos per decode task at most (fewer when there are few videos)
PROBE_TIMEOUT_S = 5.0  # a cluster address must accept a TCP connection within this


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
    """``ray.init`` for the run; the temporary directory of a private runtime (None: joined).
    A private runtime that does not come up (Ray gives its raylet 30 s to register, which a
    loaded machine can miss) is started once more before the run gives up."""
    settings: dict[str, Any] = {
        "logging_level": logging.ERROR if quiet else logging.INFO,
        "log_to_driver": not quiet,
    }
    if address is None:  # never someone else's cluster, never their /tmp/ray
        return _init_local(ray, settings)
    if address.startswith("ray://"):
        settings = {"address": address}  # Ray Client: the server's own settings
    else:
        settings["address"] = address
    try:
        ray.init(**settings)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise InvalidInputError(
            f"cannot start Ray at {printable(address)}: {_first_line(exc)}"
        ) from None
    log.debug("ray: %s", ray.cluster_resources())
    return None


_LOCAL_STARTS = 2


def _init_local(ray: Any, settings: dict[str, Any]) -> str:
    """A private runtime with this machine's cores in its own temporary directory (returned)."""
    settings = {**settings, "address": "local", "num_cpus": os.cpu_count() or 1}
    for attempt in range(1, _LOCAL_STARTS + 1):
        temp = tempfile.mkdtemp(prefix="tb-ray-")
        try:
            ray.init(**settings, include_dashboard=False, _temp_dir=temp)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on a timeout
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
            if attempt == _LOCAL_STARTS:
                raise TBError(f"cannot start Ray locally: {_first_line(exc)}") from None
            log.warning("ray: the local runtime did not start (%s); starting it once more", exc)
            continue
        log.debug("ray: %s", ray.cluster_resources())
        return temp
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def decode_rows(row: Mapping[str, Any], settings: DecodeSettings) -> Iterator[dict[str, Any]]:
    """One video's rows (``row``: ``{video_id, path, file}``; ``file``, an absolute path or an
    ``s3://`` url, is what it reads): one per segment (``n`` its index; frames [T, 3, H, W] float32, mask,
    timestamps), the last one also carrying ``count`` (the video's segments; -1 on the others)
    and ``info`` (its failed stretches, error and duration, as JSON). A video with no segment
    is one row with ``n = -1`` and zero frames. One segment is held back to know which is last."""
    video_id, path = str(row["video_id"]), str(row["path"])
    count, duration, failures, error = 0, 0.0, [], None
    held: dict[str, Any] | None = None
    for item in decode_file(str(row["file"]), settings):
        if isinstance(item, VideoDecodeError):
            error = item.reason
        elif isinstance(item, SegmentFailure):
            failures.append([item.start_s, item.end_s, item.reason])
        else:
            if held is not None:
                yield held
            duration = float(item.clip.duration_s)
            held = _row(video_id, path, count, item.start_s, item.end_s, item.clip, settings)
            count += 1
    info = json.dumps({"duration_s": duration, "failures": failures, "error": error})
    if held is None:
        held = _row(video_id, path, -1, 0.0, duration, None, settings)
    held.update(count=count, info=info)
    yield held


def decode_batch(batch: Mapping[str, Any], settings: DecodeSettings) -> Iterator[dict[str, Any]]:
    """The decode stage (a Ray task per block of input rows ``{video_id, path, file}``): each
    video's rows (:func:`decode_rows`) as a numpy batch, one video at a time."""
    for video_id, path, file in zip(batch["video_id"], batch["path"], batch["file"], strict=True):
        rows = list(decode_rows({"video_id": video_id, "path": path, "file": file}, settings))
        yield {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def _row(
    video_id: str,
    path: str,
    n: int,
    start: float,
    end: float,
    clip: Any,
    settings: DecodeSettings,
) -> dict[str, Any]:
    t, size = settings.num_frames, settings.image_size
    if clip is None:  # no segment: zero frames of the same shape (one schema for every row)
        frames = np.zeros((t, 3, size, size), np.float32)
        mask, stamps = np.zeros(t, bool), np.zeros(t, np.float64)
    else:
        frames, mask, stamps = clip.frames, clip.mask, clip.timestamps
    return {
        "video_id": video_id,
        "path": path,
        "n": np.int64(n),
        "count": np.int64(-1),
        "start_s": np.float64(start),
        "end_s": np.float64(end),
        "info": "",
        "frames": np.asarray(frames, dtype=np.float32),
        "mask": np.asarray(mask, dtype=bool),
        "timestamps": np.asarray(stamps, dtype=np.float64),
    }


def encode_cpus(node_cpus: float, decode_reserved: float, actors: int) -> float:
    """The CPUs each of ``actors`` CPU encode actors reserves on a ``node_cpus`` node where the
    decode tasks reserve ``decode_reserved``: what they leave, shared (at least a quarter CPU;
    a whole one where the rest is a fraction above 1, Ray's rule for fractions)."""
    share = max(0.25, (float(node_cpus) - float(decode_reserved)) / max(1, actors))
    return share if share < 1 else max(1.0, round(share * 4) / 4)


class EncodeActor:
    """The encode stage (a Ray Data actor): loads the TokenBinder from ``checkpoint`` once
    (never a pickled model), runs torch on ``threads`` threads (Ray's workers start with
    ``OMP_NUM_THREADS=1``), and encodes the segment rows (``n >= 0``) of each batch into ``cls``
    [B, D] float32 and ``tokens`` [B, T', D] float16 (zeros on a row without a segment). The
    ``frames`` column stays behind."""

    def __init__(self, checkpoint: str, device: str, fingerprint: str, threads: int = 1) -> None:
        import torch

        from tb_reranker.model import load_checkpoint, resolve_device

        started = time.perf_counter()
        torch.set_num_threads(max(1, int(threads)))
        self.model = load_checkpoint(checkpoint, device=resolve_device(device), inference=True)
        found = str(self.model.vision_fingerprint())
        if found != fingerprint:
            raise CheckpointError(
                f"checkpoint {checkpoint} on this Ray worker has vision fingerprint {found}, "
                f"the driver's model {fingerprint}: not the same model"
            )
        self.shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        log.debug("encode actor: model loaded in %.2f s", time.perf_counter() - started)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        segments = np.asarray(batch["n"]) >= 0
        frames = np.asarray(batch["frames"], dtype=np.float32)
        if segments.any():
            cls, tokens = encode_segments(
                self.model,
                np.ascontiguousarray(frames[segments]),
                np.ascontiguousarray(np.asarray(batch["mask"], dtype=bool)[segments]),
            )
            self.shapes = (cls.shape[1:], tokens.shape[1:])
        elif self.shapes is None:  # no segment yet: the shapes of one (an all-zero clip)
            cls, tokens = encode_segments(
                self.model, np.zeros_like(frames[:1]), np.ones(frames[:1].shape[:2], bool)
            )
            self.shapes = (cls.shape[1:], tokens.shape[1:])
        cls_shape, tokens_shape = self.shapes
        out: dict[str, Any] = {k: v for k, v in batch.items() if k != "frames"}
        if segments.all():
            out["cls"], out["tokens"] = cls, tokens
            return out
        out["cls"] = np.zeros((len(segments), *cls_shape), np.float32)
        out["tokens"] = np.zeros((len(segments), *tokens_shape), np.float16)
        if segments.any():
            out["cls"][segments], out["tokens"][segments] = cls, tokens
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
        n, count = int(row["n"]), int(row["count"])
        if count >= 0:
            parts.end = {"count": count, **json.loads(str(row["info"]))}
        if n >= 0:
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
            have = "no last row"
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
        """Decode + encode ``entries`` (``(video id, path)``) on Ray; ``run.take`` each video.
        ``run.report.startup_s``: the seconds until the first encoded rows are back here."""
        started = time.perf_counter()
        with ray_runtime(self.address, progress=self.options.progress) as ray:
            up = time.perf_counter()
            assembly = VideoAssembly()
            first = None
            for batch in self._dataset(ray, run, entries).iter_batches(
                batch_size=None, batch_format="numpy"
            ):
                if first is None:
                    first = time.perf_counter()
                    run.report.startup_s = first - started
                    log.info(
                        "ray: runtime up in %.1f s, first encoded rows after %.1f s",
                        up - started,
                        first - started,
                    )
                columns = list(batch)
                for i in range(len(batch["n"])):
                    done = assembly.add({key: batch[key][i] for key in columns})
                    if done is not None:
                        run.take(done[0], done[1], held)
            for video_id, video in assembly.missing(entries):
                run.take(video_id, video, held)
            log.info("ray: pipeline done %.1f s after the start", time.perf_counter() - started)

    def _dataset(self, ray: Any, run: Any, entries: list[tuple[str, str]]) -> Any:
        options = self.options
        threads = max(1, int(options.decode_cpus))
        settings = DecodeSettings.for_model(run.model, options.spec, threads=threads)
        gpus = 1 if options.device != "cpu" and ray.cluster_resources().get("GPU", 0) else 0
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        node_cpus = max((float(r.get("CPU", 0)) for r in nodes), default=1.0) or 1.0
        decode_slots = options.decode_tasks or max(1, int(node_cpus // options.decode_cpus))
        if gpus:
            actor_cpus, actor_threads = 1.0, 1
        else:  # what the decode tasks (one, when not given) leave on a node; threads to match
            reserved = min(node_cpus, options.decode_cpus * (options.decode_tasks or 1))
            actor_cpus = encode_cpus(node_cpus, reserved, options.encode_actors)
            actor_threads = max(1, math.ceil(actor_cpus))
        log.debug("ray: encode actors reserve %s CPUs, %d threads", actor_cpus, actor_threads)
        items = [{"video_id": v, "path": p, "file": _where(p)} for v, p in entries]
        per_task = max(1, min(VIDEOS_PER_TASK, len(items) // (4 * decode_slots)))
        blocks = min(MAX_BLOCKS, math.ceil(len(items) / per_task))
        data = ray.data.from_items(items, override_num_blocks=blocks)
        decode_compute = (
            ray.data.TaskPoolStrategy(size=options.decode_tasks) if options.decode_tasks else None
        )
        with warnings.catch_warnings():  # retries are still "ray_remote_args" in Ray 2.60
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            decoded = data.map_batches(
                decode_batch,
                fn_kwargs={"settings": settings},
                batch_size=None,
                batch_format="numpy",
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
                    "threads": actor_threads,
                },
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=options.encode_actors),
                num_cpus=actor_cpus,
                num_gpus=gpus,
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=ACTOR_TASK_RETRIES,
            )


def _where(path: str) -> str:
    """What a worker opens for ``path``: an ``s3://`` url as it is (the worker downloads it),
    a local path made absolute (a worker's working directory is not the driver's)."""
    return path if is_s3_url(path) else os.path.abspath(path)
