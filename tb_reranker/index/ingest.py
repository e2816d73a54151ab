"""Ingestion: video files → (cut, decode, encode) → frame-token store + Milvus, one record and
one row per segment of each video.

Segments (``IngestOptions.segment``, ``tb ingest --segment``): ``shots`` (default: shot cuts,
segments of 2-30 s), ``fixed:LEN[,OVERLAP]`` or ``none``. A video no longer than the spec's
longest segment (30 s for ``shots``) is one segment, keyed by its video id, decoded as before
segments; a longer one gets ``segment_key(video_id, n)`` for its n-th segment (see
:mod:`tb_reranker.index.segmenting`). A corrupt stretch loses only its segments; the report names
its time range.

Pipeline (:class:`Ingestion`): **plan** (hash each file, compare with what Milvus and the store
hold for every segment of the video) → **update metadata** of unchanged files whose metadata
changed → **re-index** videos whose records are stored but whose rows are missing or stale →
**cut + decode + encode** the rest, and write each video whole: **its records to the store, then
the keys it no longer has (a changed file with fewer segments: store, then Milvus), then all its
rows in one upsert**. A process killed anywhere leaves at worst records without rows, or rows of
the old file (never rows of two versions of one file); re-running ``ingest`` re-indexes from the
stored tokens when the file is unchanged (deleting leftover keys), or re-encodes it otherwise;
``check(repair=True)`` fixes the rest. Nothing is ever duplicated: the keys are primary keys in
both places.

Idempotency. The sha256 of each file is compared with the ``content_hash`` stored in Milvus and
the store: equal for every segment → ``unchanged``, nothing is done; different → the video's
segments are replaced.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tb_reranker.errors import InvalidInputError, VideoDecodeError, printable
from tb_reranker.index.inputs import assign_ids, expand_paths
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.index.rows import (
    READ_BATCH,
    check_metadata,
    same_metadata,
    user_fields,
    video_row,
    video_rows,
)
from tb_reranker.numbers import CPUS, POSITIVE_INT
from tb_reranker.stores import FrameRecord, FrameStore, segment_key
from tb_reranker.video.segment_plan import SegmentSpec
from tb_reranker.video.sources import uri_of

__all__ = ["IngestOptions", "IngestReport", "ingest"]

log = logging.getLogger(__name__)

UPSERT_ROWS = 1000  # rows per upsert call, whole videos (a longer video is one call of its own)
ENGINES = ("local", "ray")  # IngestOptions.engine


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
        segment: how videos are cut: ``"shots"`` (default), ``"fixed:LEN[,OVERLAP]"``, ``"none"``
            or a :class:`SegmentSpec`; videos up to the longest segment stay whole.
        engine: ``"local"`` (default: this process, decoding threads) or ``"ray"`` (decode tasks
            and encode actors on Ray Data, :mod:`tb_reranker.index.ray_ingest`; the ``ray``
            extra). The plan and every write are this process's either way.
        ray_address: ``engine="ray"``: the cluster to join (``"auto"``, ``"host:6379"``,
            ``"ray://host:10001"``); None starts a private local Ray runtime for the run.
        encode_actors: ``engine="ray"``: encoder actors, each loading the model once (one GPU
            each when the cluster has GPUs).
        decode_tasks: ``engine="ray"``: decode tasks at once (None: as many as the CPUs allow).
        decode_cpus: ``engine="ray"``: CPUs each decode task reserves (a fraction packs more
            tasks onto a core).
        checkpoint: ``engine="ray"``: the checkpoint directory ``model`` was loaded from; each
            encode actor loads it (``Client.ingest`` passes its own).
        device: ``engine="ray"``: the encode actors' device (``"auto"``: a GPU when they have one).
        bulk: write the Milvus rows by Milvus's bulk import (:class:`~tb_reranker.index.bulk.
            BulkImport`: files staged at ``bulk_staging``, imported once at the end of the run)
            instead of upserts; a Milvus server only (Milvus Lite has no import).
        bulk_staging: ``bulk``: where the import files go, a directory the server reads (a
            local-storage server) or ``s3://<Milvus's own bucket>/<prefix>``; default
            ``TB_BULK_STAGING``.
    """

    batch_size: int = 8
    workers: int = 2
    metadata: Mapping[str, Mapping[str, Any]] | None = None
    ids: Mapping[str, str] | Callable[[str], str] | None = None
    progress: bool = True
    segment: str | SegmentSpec = "shots"
    engine: str = "local"
    ray_address: str | None = None
    encode_actors: int = 1
    decode_tasks: int | None = None
    decode_cpus: float = 1.0
    checkpoint: str | None = None
    device: str = "auto"
    bulk: bool = False
    bulk_staging: str | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers", "encode_actors", "decode_tasks"):
            if getattr(self, name) is not None or name != "decode_tasks":
                POSITIVE_INT.check(getattr(self, name), name)
        CPUS.check(self.decode_cpus, "decode_cpus")
        if self.engine not in ENGINES:
            raise InvalidInputError(
                f"engine must be one of {', '.join(ENGINES)}, got {printable(self.engine)}"
            )
        check_metadata(self.metadata)
        if self.bulk and not self.staging:
            raise InvalidInputError(
                "bulk import needs a staging location the Milvus server reads: --bulk-staging "
                "DIR (a local-storage server) or s3://<Milvus's bucket>/<prefix> (or TB_BULK_STAGING)"
            )
        if not isinstance(self.segment, SegmentSpec):
            SegmentSpec.parse(self.segment)  # InvalidInputError in one line

    @property
    def staging(self) -> str:
        """:attr:`bulk_staging`, else ``TB_BULK_STAGING`` ("" when neither is set)."""
        return self.bulk_staging or os.environ.get("TB_BULK_STAGING", "")

    @property
    def spec(self) -> SegmentSpec:
        """:attr:`segment` as a :class:`SegmentSpec`."""
        return (
            self.segment
            if isinstance(self.segment, SegmentSpec)
            else SegmentSpec.parse(self.segment)
        )

    def metadata_for(self, video_id: str, path: str) -> dict[str, Any]:
        """The user metadata given for ``video_id`` (or, failing that, for ``path``)."""
        metadata = self.metadata or {}
        return dict(metadata.get(video_id) or metadata.get(path) or {})


@dataclass
class IngestReport:
    """What one ``ingest`` call did."""

    ingested: int = 0  # videos encoded (or re-indexed from the store) and written
    segments: int = 0  # of those videos, the segments (records and rows) written
    unchanged: int = 0  # videos skipped: same content hash already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) per failure
    seconds: float = 0.0  # wall time of the call
    videos_per_s: float = 0.0  # ingested / seconds
    reindexed: int = 0  # of `ingested`: rows rebuilt from stored tokens without decoding
    ids: list[str] = field(default_factory=list)  # ids written, in input order
    metadata_updated: int = 0  # unchanged files whose new metadata was written (not re-encoded)
    engine: str = "local"  # IngestOptions.engine: where decode and encode ran
    bulk_rows: int | None = None  # IngestOptions.bulk: rows written by the import (+ upserts)
    startup_s: float = 0.0  # engine="ray": seconds until the first encoded videos came back

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "ingested": self.ingested,
            "segments": self.segments,
            "metadata_updated": self.metadata_updated,
            "unchanged": self.unchanged,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "seconds": round(self.seconds, 3),
            "videos_per_s": round(self.videos_per_s, 3),
            "reindexed": self.reindexed,
            "ids": list(self.ids),
            **({} if self.bulk_rows is None else {"bulk_rows": self.bulk_rows}),
            **({"startup_s": round(self.startup_s, 3)} if self.engine == "ray" else {}),
        }

    def summary(self) -> str:
        return (
            f"ingested {self.ingested} (re-indexed {self.reindexed})"
            + (f" as {self.segments} segments" if self.segments > self.ingested else "")
            + f", unchanged {self.unchanged}"
            + (f" (metadata updated {self.metadata_updated})" if self.metadata_updated else "")
            + ", "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({self.videos_per_s:.2f} videos/s)"
        )


@dataclass
class IngestPlan:
    """What each input needs, decided by comparing its content hash with Milvus and the store."""

    encode: list[tuple[str, str]] = field(default_factory=list)  # (id, path): decode + encode
    held: dict[str, set[str]] = field(default_factory=dict)  # keys they hold now (id -> keys)
    # (id, path, records in segment order, keys to delete): tokens stored, rows missing/stale
    reindex: list[tuple[str, str, list[FrameRecord], list[str]]] = field(default_factory=list)
    update: list[tuple[str, list[FrameRecord], dict[str, Any]]] = field(default_factory=list)
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
        InvalidInputError: invalid/duplicate ids, bad metadata, ``batch_size``/``workers`` < 1;
            ``engine="ray"`` without the ``ray`` extra, or a Ray address that does not answer.
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
    if options.bulk and index.is_lite:  # before any collection, record or decode
        from tb_reranker.index.bulk import LITE_MESSAGE

        raise InvalidInputError(f"{LITE_MESSAGE} ({index.where})")
    run = Ingestion(model=model, index=index, store=store, options=options)
    if options.engine == "ray":
        from tb_reranker.index.ray_ingest import RayEncoder

        run.encoder = RayEncoder(options, fingerprint=run.fingerprint)  # the extra, the address
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
    model → :meth:`plan` → :meth:`update_metadata` → :meth:`reindex` → :meth:`encode`.

    Every step writes a video whole (all its segments), in one order: the store's new records,
    then the keys the video no longer has (store, then Milvus), then its Milvus rows in one
    upsert. A crash anywhere leaves each video's rows all of one version (old or new) and the
    next run converges (see the module docstring)."""

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
        self.report = IngestReport(engine=options.engine)
        self.hashes: dict[str, str] = {}  # video id -> sha256 of its file
        self.encoder: Any = None  # another engine's decode + encode (RayEncoder); None: local
        self._bar: Any = None
        self._bulk: Any = None  # a BulkImport when options.bulk
        self._ready: list[VideoWrite] = []  # encoded videos waiting for the next write

    def run(self, videos: list[tuple[str, str]]) -> IngestReport:
        # same dim and fingerprint as the model; the collection created, or checked and loaded
        self.index.bind(
            fingerprint=self.fingerprint,
            dim=int(self.model.embed_dim),
            model_fingerprint=self.model_fingerprint,
        )
        self.index.create(exist_ok=True)
        if self.options.bulk:  # Lite, a bad staging: refused before any decoding
            from tb_reranker.index.bulk import BulkImport

            self._bulk = BulkImport(self.index, staging=self.options.staging)
        try:
            self._steps(videos)
            if self._bulk is not None:
                self.report.bulk_rows = self._bulk.commit(progress=self._bulk_progress)
        finally:
            if self._bulk is not None and self.report.bulk_rows is None:
                self._bulk.abort()  # nothing imported: the staged files go, the store stays
        if self.report.ingested or self.report.metadata_updated:
            self.index.flush()  # seal the new rows: indexed search instead of brute force
        return self.report

    def _steps(self, videos: list[tuple[str, str]]) -> None:
        plan = self.plan(videos)
        self.update_metadata(plan.update)
        total = len(plan.encode) + len(plan.reindex)
        if self.options.progress and total:
            from tb_reranker.progress import progress

            self._bar = progress(total=total, unit="video", desc="ingest")
        try:
            self.reindex(plan.reindex)
            self.encode(plan.encode, plan.held)
        finally:
            if self._bar is not None:
                self._bar.close()

    @staticmethod
    def _bulk_progress(done: int, total: int) -> None:
        log.info("bulk import: %d of %d rows", done, total)

    def _upsert(self, rows: list[dict[str, Any]]) -> None:
        """Rows into Milvus: an upsert, or added to the bulk import (``bulk``)."""
        if self._bulk is not None:
            self._bulk.add(rows)
        else:
            self.index.upsert(rows)

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
        rows = video_rows(self.index, chunk_ids)
        stored = self._stored_records(chunk_ids)
        firsts = self.index.get(chunk_ids) if self.options.metadata else {}
        for video_id, path in chunk:
            records = stored.get(video_id)
            held = {str(r["id"]) for r in rows.get(video_id, [])}
            if records is None:  # not stored whole by this model from this file
                plan.encode.append((video_id, path))
                plan.held[video_id] = held | self._stored_keys.get(video_id, set())
                continue
            keys = [segment_key(video_id, n) for n in range(len(records))]
            current = {str(r["id"]) for r in rows.get(video_id, []) if self._row_current(r)}
            if not set(keys) <= current or held - set(keys):
                stale = sorted(held - set(keys))
                plan.reindex.append((video_id, path, records, stale))  # crash between the writes
                continue
            wanted = self.options.metadata_for(video_id, path)
            row = firsts.get(video_id, {})
            if wanted and not same_metadata(user_fields(row), wanted):
                plan.update.append((video_id, records, wanted))  # same file, new metadata
            else:
                plan.unchanged += 1

    def _row_current(self, row: Mapping[str, Any]) -> bool:
        return row.get("content_hash") == self.hashes[str(row["video_id"])]

    def _stored_records(self, video_ids: list[str]) -> dict[str, list[FrameRecord]]:
        """Per video, its records in segment order when the store holds all of them, made from
        this file by this vision model (or an unknown one); ``_stored_keys`` the keys held."""
        self._stored_keys: dict[str, set[str]] = {}
        firsts, errors = self.store.get_readable(video_ids)
        for exc in errors.values():  # one corrupt entry must not hide the others
            log.warning("%s; it will be re-encoded", exc)
        more = [segment_key(v, n) for v, r in firsts.items() for n in range(1, max(1, r.segments))]
        rest: dict[str, FrameRecord] = {}
        for start in range(0, len(more), READ_BATCH):
            found, errors = self.store.get_readable(more[start : start + READ_BATCH])
            rest.update(found)
            for exc in errors.values():
                log.warning("%s; it will be re-encoded", exc)
        out: dict[str, list[FrameRecord]] = {}
        for video_id, first in firsts.items():
            keys = [segment_key(video_id, n) for n in range(1, first.segments)]
            self._stored_keys[video_id] = {video_id, *(k for k in keys if k in rest)}
            records = [first, *(rest[k] for k in keys if k in rest)]
            if len(records) == first.segments and all(
                self._current(video_id, r, n, first.segments) for n, r in enumerate(records)
            ):
                out[video_id] = records
        return out

    def _current(self, video_id: str, record: FrameRecord, n: int, segments: int) -> bool:
        """Whether ``record`` is segment ``n`` of ``segments`` made from this file by this vision
        model (or an unknown one)."""
        return (
            record.content_hash == self.hashes[video_id]
            and record.fingerprint in ("", self.fingerprint, self.model_fingerprint)
            and (record.segment, record.segments) == (n, segments)
        )

    # ---------------------------------------------------------------- 2. metadata, re-index
    def update_metadata(self, updates: list[tuple[str, list[FrameRecord], dict[str, Any]]]) -> None:
        """Unchanged files whose metadata changed: rewrite the rows (same vectors) and the
        records' copy of the metadata; no decoding or encoding."""
        for start in range(0, len(updates), self.options.batch_size):
            chunk = updates[start : start + self.options.batch_size]
            keys = [segment_key(v, n) for v, records, _ in chunk for n in range(len(records))]
            vectors = self.index.get(keys, with_vectors=True)
            group: list[VideoWrite] = []
            for video_id, records, meta in chunk:
                write = VideoWrite(video_id)
                for n, record in enumerate(records):
                    key = segment_key(video_id, n)
                    record = replace(record, metadata=meta)
                    cls = vectors[key]["cls"] if key in vectors else record.video_cls()
                    write.add(key, record, video_row(key, record, cls, meta))
                group.append(write)
            self._write(group)
            self.report.metadata_updated += len(chunk)
            self.report.ids.extend(v for v, _, _ in chunk)

    def reindex(self, entries: list[tuple[str, str, list[FrameRecord], list[str]]]) -> None:
        """Rows rebuilt from stored tokens (no decode/encode); keys the video no longer has
        deleted first."""
        for start in range(0, len(entries), self.options.batch_size):
            group: list[VideoWrite] = []
            for video_id, path, records, stale in entries[start : start + self.options.batch_size]:
                user = self.options.metadata_for(video_id, path) or dict(records[0].metadata or {})
                write = VideoWrite(video_id, stale=stale)
                for n, record in enumerate(records):
                    if not record.uri:
                        record = replace(record, uri=uri_of(path))
                    key = segment_key(video_id, n)
                    write.add(key, None, video_row(key, record, record.video_cls(), user))
                group.append(write)
            self._write(group)
            self.report.ingested += len(group)
            self.report.reindexed += len(group)
            self.report.segments += sum(len(w.rows) for w in group)
            self.report.ids.extend(w.video_id for w in group)
            self._advance(len(group))

    # ---------------------------------------------------------------- 3. decode, encode, write
    def encode(self, entries: list[tuple[str, str]], held: Mapping[str, set[str]]) -> None:
        """Cut and decode (worker threads, ahead) → encode (this thread, batched) → write each
        video whole: store → stale keys → Milvus. With another engine (:attr:`encoder`) it
        decodes and encodes, and hands each video to :meth:`take` here."""
        if not entries:
            return
        if self.encoder is not None:
            self.encoder.encode(self, entries, held)
            self.flush()
            return
        from tb_reranker.index.segmenting import DecodeSettings, SegmentEncoder, segment_stream

        ids_of: dict[str, list[str]] = {}
        for video_id, path in entries:
            ids_of.setdefault(path, []).append(video_id)
        workers = self.options.workers
        settings = DecodeSettings.for_model(
            self.model, self.options.spec, threads=1 if workers > 1 else 0
        )
        stream = segment_stream([path for _, path in entries], settings, workers=workers)
        encoder = SegmentEncoder(self.model, self.options.batch_size)
        for path, item in stream:
            for video in encoder.add(path, item):
                self.take(ids_of[video.path].pop(0), video, held)
        for video in encoder.finish():
            self.take(ids_of[video.path].pop(0), video, held)
        self.flush()

    def take(self, video_id: str, video: Any, held: Mapping[str, set[str]]) -> None:
        """One encoded video (an ``EncodedVideo``, all its segments) in; written whole with the
        next ``batch_size`` of them (:meth:`_write`), a failed one reported."""
        self._ready.extend(self._finished(video_id, video, held))
        if len(self._ready) >= self.options.batch_size:
            self.flush()

    def flush(self) -> None:
        """Write the videos :meth:`take` holds."""
        ready, self._ready = self._ready, []
        if ready:
            self._write_encoded(ready)

    def _finished(
        self, video_id: str, video: Any, held: Mapping[str, set[str]]
    ) -> list[VideoWrite]:
        """The write of one encoded video ([] when nothing of it could be decoded)."""
        for failure in video.failures:
            reason = f"{failure.start_s:.1f}-{failure.end_s:.1f} s: {failure.reason}"
            log.warning("%s: %s", printable(video.path), reason)
            self.report.failed.append((video.path, reason))
        if video.error is not None or not video.segments:
            error = video.error or VideoDecodeError(video.path, "no segment could be decoded")
            log.warning("%s", error)
            if video.error is not None or not video.failures:
                self.report.failed.append((video.path, error.reason))
            self._advance(1)
            return []
        count = len(video.segments)
        user = self.options.metadata_for(video_id, video.path) or None
        keys = [segment_key(video_id, n) for n in range(count)]
        write = VideoWrite(video_id, stale=sorted(set(held.get(video_id, ())) - set(keys)))
        for n, (key, segment) in enumerate(zip(keys, video.segments, strict=True)):
            whole = count == 1 and segment.start_s == 0 and segment.end_s >= video.duration_s
            record = FrameRecord(
                tokens=segment.tokens,
                timestamps=segment.timestamps,
                content_hash=self.hashes[video_id],
                mask=segment.mask,
                uri=uri_of(video.path),
                duration_s=float(video.duration_s),
                fingerprint=self.fingerprint,
                metadata=user,
                segment=n,
                start_s=float(segment.start_s),
                end_s=None if whole else float(segment.end_s),
                segments=count,
            )
            write.add(key, record, video_row(key, record, segment.cls, user))
        return [write]

    def _write_encoded(self, group: list[VideoWrite]) -> None:
        self._write(group)
        self.report.ingested += len(group)
        self.report.segments += sum(len(w.rows) for w in group)
        self.report.ids.extend(w.video_id for w in group)

    def _write(self, group: list[VideoWrite]) -> None:
        """Store first (new records), then the keys the videos no longer have (store, then
        Milvus), then the rows, each video's in one upsert: a crash leaves tokens without a
        row (re-indexed by the next run) or rows without tokens (deleted by it), never a row
        without tokens that stays, nor a video whose rows mix two versions of its file."""
        records = {k: r for w in group for k, r in w.records.items()}
        stale = [k for w in group for k in w.stale]
        if records:
            self.store.put_many(records)
        if stale:
            self.store.delete_many(stale)
            self.index.delete(stale)
        rows: list[dict[str, Any]] = []
        for write in group:
            if rows and len(rows) + len(write.rows) > UPSERT_ROWS:
                self._upsert(rows)
                rows = []
            rows.extend(write.rows)
        if rows:
            self._upsert(rows)
        self._advance(sum(1 for w in group if w.records))


@dataclass
class VideoWrite:
    """What one video's write holds: its new records (None: unchanged in the store), its rows
    and the keys it no longer has."""

    video_id: str
    records: dict[str, FrameRecord] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    def add(self, key: str, record: FrameRecord | None, row: dict[str, Any]) -> None:
        if record is not None:
            self.records[key] = record
        self.rows.append(row)
