"""Ingestion: video files → (decode, encode) → frame-token store + Milvus row.

Pipeline (:class:`Ingestion`): **plan** (hash each file, compare with what Milvus and the store
hold) → **update metadata** of unchanged files whose metadata changed → **re-index** entries
whose tokens are stored but whose row is missing → **decode + encode** the rest (``decode_many``
decodes in worker threads ahead of the main thread, which encodes batches with the model under
``torch.inference_mode``) and write each batch: **store first, then Milvus** (upsert by primary
key). A process killed anywhere leaves at worst store entries without a Milvus row (or with an
older row); re-running ``ingest`` re-indexes them from the stored tokens when the file is
unchanged, or re-encodes it otherwise; ``check(repair=True)`` fixes the rest. Nothing is ever
duplicated: the video id is the primary key in both places.

Idempotency. The sha256 of each file is compared with the ``content_hash`` stored in Milvus: equal
(and the store holds the entry) → ``unchanged``, nothing is done; different → the entry is
replaced.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError, VideoDecodeError, printable
from tb_reranker.index.inputs import assign_ids, expand_paths
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.index.rows import (
    READ_BATCH,
    check_metadata,
    same_metadata,
    user_fields,
    video_row,
)
from tb_reranker.stores import FrameRecord, FrameStore

__all__ = ["IngestOptions", "IngestReport", "ingest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOptions:
    """How :func:`ingest` runs; checked when built (:class:`InvalidInputError`).

    Attributes:
        batch_size: videos per ``encode_frames`` call and per write.
        workers: decoding threads (decoding overlaps encoding).
        metadata: per video id (or path) a dict of user fields stored as Milvus dynamic fields
            (and in the frame record).
        ids: video id per path (mapping or function); default the file stem.
        progress: show progress (videos/s): a bar on a terminal, log lines elsewhere.
    """

    batch_size: int = 8
    workers: int = 2
    metadata: Mapping[str, Mapping[str, Any]] | None = None
    ids: Mapping[str, str] | Callable[[str], str] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInputError(f"{name} must be an int, got {value!r}")
        if self.batch_size < 1 or self.workers < 1:
            raise InvalidInputError(
                f"batch_size and workers must be >= 1, got {self.batch_size}, {self.workers}"
            )
        check_metadata(self.metadata)

    def metadata_for(self, video_id: str, path: str) -> dict[str, Any]:
        """The user metadata given for ``video_id`` (or, failing that, for ``path``)."""
        metadata = self.metadata or {}
        return dict(metadata.get(video_id) or metadata.get(path) or {})


@dataclass
class IngestReport:
    """What one ``ingest`` call did."""

    ingested: int = 0  # videos encoded (or re-indexed from the store) and written
    unchanged: int = 0  # videos skipped: same content hash already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) per failure
    seconds: float = 0.0  # wall time of the call
    videos_per_s: float = 0.0  # ingested / seconds
    reindexed: int = 0  # of `ingested`: rows rebuilt from stored tokens without decoding
    ids: list[str] = field(default_factory=list)  # ids written, in input order
    metadata_updated: int = 0  # unchanged files whose new metadata was written (not re-encoded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ingested": self.ingested,
            "metadata_updated": self.metadata_updated,
            "unchanged": self.unchanged,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "seconds": round(self.seconds, 3),
            "videos_per_s": round(self.videos_per_s, 3),
            "reindexed": self.reindexed,
            "ids": list(self.ids),
        }

    def summary(self) -> str:
        return (
            f"ingested {self.ingested} (re-indexed {self.reindexed}), unchanged {self.unchanged}"
            + (f" (metadata updated {self.metadata_updated})" if self.metadata_updated else "")
            + ", "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({self.videos_per_s:.2f} videos/s)"
        )


@dataclass
class IngestPlan:
    """What each input needs, decided by comparing its content hash with Milvus and the store."""

    encode: list[tuple[str, str]] = field(default_factory=list)  # (id, path): decode + encode
    reindex: list[tuple[str, str, FrameRecord]] = field(default_factory=list)  # tokens stored
    update: list[tuple[str, FrameRecord, dict[str, Any]]] = field(default_factory=list)  # metadata
    unchanged: int = 0  # same file, same metadata: nothing to do


def ingest(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    model: Any,
    index: VideoIndex,
    store: FrameStore,
    options: IngestOptions | None = None,
    **settings: Any,
) -> IngestReport:
    """Ingest videos into ``store`` (frame tokens) and ``index`` (Milvus rows).

    Args:
        paths: files, directories (recursive), glob patterns and ``@list.txt`` files.
        model: a ``TokenBinder`` (its ``num_frames``, ``image_size``, ``image_mean/std`` drive
            decoding; ``encode_frames`` makes the tokens; ``vision_fingerprint()`` marks the
            collection and the records).
        index: the Milvus index; the collection is created on first use.
        store: the frame-token store.
        options: an :class:`IngestOptions`; ``settings`` (its field names, e.g.
            ``batch_size=16, progress=False``) override its fields.
    Returns:
        An :class:`IngestReport`; undecodable files are listed in ``failed``, the rest go on.
    Raises:
        InvalidInputError: invalid/duplicate ids, bad metadata, ``batch_size``/``workers`` < 1.
        ModelMismatchError: the collection was filled by another model.
        StoreError, IndexBackendError: a backend failed (re-running resumes safely).
    """
    started = time.perf_counter()
    options = _options(options, settings)
    files, problems = expand_paths(paths)
    videos, misnamed = assign_ids(files, options.ids)
    problems.extend(misnamed)  # a file whose name is no valid id fails alone
    if not videos:
        shown = "; ".join(f"{printable(item)}: {why}" for item, why in problems[:5])
        raise InvalidInputError(f"nothing to ingest: {shown or 'no input given'}")
    run = Ingestion(model=model, index=index, store=store, options=options)
    run.report.failed.extend(problems)
    report = run.run(videos)
    report.seconds = time.perf_counter() - started
    report.videos_per_s = report.ingested / report.seconds if report.seconds > 0 else 0.0
    log.info("ingest: %s", report.summary())
    for path, reason in report.failed:
        log.info("ingest failed: %s: %s", printable(path), reason)
    return report


def _options(options: IngestOptions | None, settings: dict[str, Any]) -> IngestOptions:
    """``options`` with ``settings`` applied; an unknown name or a wrong type is an
    :class:`InvalidInputError` naming it (not the dataclass's TypeError)."""
    if options is not None and not isinstance(options, IngestOptions):
        raise InvalidInputError(f"options must be an IngestOptions, got {type(options).__name__}")
    known = [f.name for f in fields(IngestOptions)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise InvalidInputError(
            f"unknown ingest option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})"
        )
    return replace(options or IngestOptions(), **settings)


class Ingestion:
    """One ingest run over ``(video id, path)`` pairs: :meth:`run` = bind the index to the
    model → :meth:`plan` → :meth:`update_metadata` → :meth:`reindex` → :meth:`encode`."""

    def __init__(
        self, *, model: Any, index: VideoIndex, store: FrameStore, options: IngestOptions
    ) -> None:
        self.model = model
        self.index = index
        self.store = store
        self.options = options
        # the vision fingerprint marks the collection and every record written; records (and
        # legacy collections) carrying this very model's whole-model fingerprint are current too
        self.fingerprint = str(model.vision_fingerprint())
        self.model_fingerprint = str(model.fingerprint())
        self.report = IngestReport()
        self.hashes: dict[str, str] = {}  # video id -> sha256 of its file
        self._bar: Any = None

    def run(self, videos: list[tuple[str, str]]) -> IngestReport:
        # same dim and fingerprint as the model; the collection created, or checked and loaded
        self.index.bind(
            fingerprint=self.fingerprint,
            dim=int(self.model.embed_dim),
            model_fingerprint=self.model_fingerprint,
        )
        self.index.create(exist_ok=True)
        plan = self.plan(videos)
        self.update_metadata(plan.update)
        total = len(plan.encode) + len(plan.reindex)
        if self.options.progress and total:
            from tb_reranker.progress import progress

            self._bar = progress(total=total, unit="video", desc="ingest")
        try:
            self.reindex(plan.reindex)
            self.encode(plan.encode)
        finally:
            if self._bar is not None:
                self._bar.close()
        if self.report.ingested or self.report.metadata_updated:
            self.index.flush()  # seal the new rows: indexed search instead of brute force
        return self.report

    def _advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    # ---------------------------------------------------------------- 1. plan
    def plan(self, videos: list[tuple[str, str]]) -> IngestPlan:
        """Hash every file and sort it into encode / re-index / metadata update / unchanged."""
        from tb_reranker.video import content_hash

        todo: list[tuple[str, str]] = []
        for video_id, path in videos:
            try:
                self.hashes[video_id] = content_hash(path)
                todo.append((video_id, path))
            except VideoDecodeError as exc:
                self.report.failed.append((path, exc.reason))
        plan = IngestPlan()
        for start in range(0, len(todo), READ_BATCH):
            self._classify(todo[start : start + READ_BATCH], plan)
        self.report.unchanged += plan.unchanged
        return plan

    def _classify(self, chunk: list[tuple[str, str]], plan: IngestPlan) -> None:
        chunk_ids = [i for i, _ in chunk]
        indexed = self.index.get(chunk_ids)
        stored, errors = self.store.get_readable(chunk_ids)
        for exc in errors.values():  # one corrupt entry must not hide the others
            log.warning("%s; it will be re-encoded", exc)
        for video_id, path in chunk:
            record = stored.get(video_id)
            if record is None or not self._current(video_id, record):
                plan.encode.append((video_id, path))
                continue
            row = indexed.get(video_id)
            if row is None or row.get("content_hash") != self.hashes[video_id]:
                plan.reindex.append((video_id, path, record))  # killed between store and Milvus
                continue
            wanted = self.options.metadata_for(video_id, path)
            if wanted and not same_metadata(user_fields(row), wanted):
                plan.update.append((video_id, record, wanted))  # same file, new metadata
            else:
                plan.unchanged += 1

    def _current(self, video_id: str, record: FrameRecord) -> bool:
        """Whether ``record`` was made from this file by this vision model (or an unknown one)."""
        return record.content_hash == self.hashes[video_id] and (
            record.fingerprint in ("", self.fingerprint, self.model_fingerprint)
        )

    # ---------------------------------------------------------------- 2. metadata, re-index
    def update_metadata(self, updates: list[tuple[str, FrameRecord, dict[str, Any]]]) -> None:
        """Unchanged files whose metadata changed: rewrite the row (same vector) and the
        record's copy of the metadata; no decoding or encoding."""
        for start in range(0, len(updates), READ_BATCH):
            chunk = updates[start : start + READ_BATCH]
            vectors = self.index.get([i for i, _, _ in chunk], with_vectors=True)
            records = {i: replace(record, metadata=meta) for i, record, meta in chunk}
            rows = [
                video_row(i, records[i], vectors[i]["cls"], meta)
                for i, _, meta in chunk
                if i in vectors
            ]
            self._write(records, rows)
            self.report.metadata_updated += len(chunk)
            self.report.ids.extend(i for i, _, _ in chunk)

    def reindex(self, entries: list[tuple[str, str, FrameRecord]]) -> None:
        """Rows rebuilt from stored tokens (no decode/encode)."""
        for start in range(0, len(entries), self.options.batch_size):
            rows = []
            for video_id, path, record in entries[start : start + self.options.batch_size]:
                user = self.options.metadata_for(video_id, path) or dict(record.metadata or {})
                if not record.uri:
                    record = replace(record, uri=str(Path(path).resolve()))
                rows.append(video_row(video_id, record, record.video_cls(), user))
            self.index.upsert(rows)
            self.report.ingested += len(rows)
            self.report.reindexed += len(rows)
            self.report.ids.extend(r["id"] for r in rows)
            self._advance(len(rows))

    # ---------------------------------------------------------------- 3. decode, encode, write
    def encode(self, entries: list[tuple[str, str]]) -> None:
        """Decode (worker threads, ahead) → encode (this thread, batched) → store → Milvus."""
        if not entries:
            return
        from tb_reranker.video import decode_many

        path_to_id = {path: video_id for video_id, path in entries}
        stream = decode_many(
            [path for _, path in entries],
            num_frames=int(self.model.num_frames),
            image_size=int(self.model.image_size),
            mean=tuple(self.model.image_mean),
            std=tuple(self.model.image_std),
            workers=self.options.workers,
        )
        pending: list[tuple[str, Any]] = []
        for path, outcome in stream:
            if isinstance(outcome, VideoDecodeError):
                log.warning("%s", outcome)
                self.report.failed.append((path, outcome.reason))
                self._advance(1)
                continue
            pending.append((path_to_id[path], outcome))
            if len(pending) >= self.options.batch_size:
                self._write_encoded(pending)
                pending = []
        if pending:
            self._write_encoded(pending)

    def _write_encoded(self, clips: list[tuple[str, Any]]) -> None:
        records, rows = self._encode_batch(clips)
        self._write(records, rows)
        self.report.ingested += len(rows)
        self.report.ids.extend(records)

    def _encode_batch(
        self, clips: list[tuple[str, Any]]
    ) -> tuple[dict[str, FrameRecord], list[dict[str, Any]]]:
        """Frame records and Milvus rows of decoded ``(video id, clip)`` pairs, in one forward."""
        import torch

        frames = torch.from_numpy(np.stack([clip.frames for _, clip in clips]))  # [B, T, 3, H, W]
        masks = torch.from_numpy(np.stack([clip.mask for _, clip in clips]))  # [B, T]
        with torch.inference_mode():
            videos_cls, frames_tokens = self.model.encode_frames(
                frames, masks
            )  # [B, D], [B, T', D]
        videos_cls = videos_cls.float().cpu().numpy()
        frames_tokens = frames_tokens.float().cpu().numpy()
        records: dict[str, FrameRecord] = {}
        rows = []
        for b, (video_id, clip) in enumerate(clips):
            record = FrameRecord(
                tokens=frames_tokens[b].astype(np.float16),
                timestamps=np.asarray(clip.timestamps, dtype=np.float32),
                content_hash=self.hashes[video_id],
                mask=np.asarray(clip.mask, dtype=bool),
                uri=str(Path(clip.path).resolve()),
                duration_s=float(clip.duration_s),
                fingerprint=self.fingerprint,
                metadata=self.options.metadata_for(video_id, clip.path) or None,
            )
            records[video_id] = record
            rows.append(video_row(video_id, record, videos_cls[b], record.metadata))
        return records, rows

    def _write(self, records: Mapping[str, FrameRecord], rows: list[dict[str, Any]]) -> None:
        """Store first, then Milvus: a crash in between leaves tokens without a row (re-indexed
        by the next run), never a row without tokens."""
        self.store.put_many(records)
        self.index.upsert(rows)
        self._advance(len(rows))
