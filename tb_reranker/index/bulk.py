"""Bulk import: backfill a Milvus server from files instead of millions of upserts (issue 23).

:class:`BulkImport` is a row sink with the interface of ``VideoIndex.upsert`` split in two: rows
are *added* (checked, then written into NumPy files where the server can read them) and the
whole lot is *committed* at the end (one Milvus import job per ``rows_per_file`` rows, polled to
completion, the row count verified)::

    from tb_reranker.index.bulk import BulkImport

    index = VideoIndex("http://127.0.0.1:19530", collection="tb_videos", dim=512)
    index.create()
    with BulkImport(index, staging="/var/lib/milvus/data/tb_bulk") as sink:   # local storage
        sink.add(rows)            # rows as video_row() makes them; any number of calls
        sink.add(more_rows)
        imported = sink.commit(progress=lambda done, total: ...)

    # or from a URI and a collection name (the collection must exist):
    sink = BulkImport.open(uri, "tb_videos", token="", staging="s3://a-bucket/tb_bulk")

``BulkImport(index, *, staging, ...)``
    ``index`` is a :class:`~tb_reranker.index.milvus_index.VideoIndex` of an existing collection
    (its dimension and fingerprint are checked as for an upsert). ``staging`` says where the
    import files go; it depends on the server's object storage (``common.storageType``):

    * a directory (``/path``): a server with **local storage** (``storageType: local``, what the
      ``milvus`` PyPI package and ``milvus_setup.launcher.LocalMilvus`` run) reads import files
      from its own file system, by absolute path. The directory must be on the server's host;
      under its ``localStorage.path`` is the natural place (``LocalMilvus``: ``base_dir/data``).
    * ``s3://<bucket>/<prefix>``: a server on **MinIO/S3** (the docker stack) reads import files
      as objects of *its own* bucket (``minio.bucketName``, ``a-bucket`` unless configured), by
      key. Files are uploaded with boto3 (endpoint ``s3_endpoint`` or ``TB_S3_ENDPOINT``,
      credentials from the usual ``AWS_*`` variables). pymilvus's ``RemoteBulkWriter`` is not
      used: it needs the ``minio``/``azure``/``ml_dtypes`` packages (``pymilvus[bulk_writer]``),
      which this project does not install; the files are written with numpy/pyarrow instead.

    ``file_format``: ``"numpy"`` (default: a folder per job, one ``<field>.npy`` per field) or
    ``"parquet"`` (one file per job). A NumPy job whose string columns would take more than
    ``NUMPY_TEXT`` (256 MiB) as fixed-width UTF-32 (one long ``$meta`` widens every row) is
    written as Parquet instead. ``rows_per_file``: rows per import job (default 100,000).

    Raises ``InvalidInputError`` at construction for a Milvus Lite URI (Lite has no import:
    drop ``--bulk``), a bad ``staging`` or a collection that does not exist (``NotFoundError``).

``add(rows) -> int``
    Checks rows as ``VideoIndex.upsert`` does (``entities.prepare_rows``: ids, vector shape and
    finiteness, scalar types, segment fields), refuses an id added before (``InvalidInputError``),
    and buffers them. Every ``lookup_rows`` rows (5,000) their ids are looked up in the
    collection: rows whose id is there are kept aside for an upsert at commit (see
    *idempotency*), the others are written, ``rows_per_file`` rows to a job's files (for S3:
    then uploaded). A collection that is empty at the first lookup (one ``count(*)``: a backfill
    into a fresh collection) is not looked up again. Returns the number of rows added. Nothing
    in the collection changes.

``commit(progress=None) -> int``
    Writes the last files, starts the import jobs, polls them (``progress(done_rows,
    total_rows)`` and a log line every ``log_every`` seconds), asks the server to load the new
    segments (``load_collection(refresh=True)``) and waits until the collection's row count has
    grown by the number of rows imported (an import job is "Completed" before its segments are
    searchable), then upserts the rows kept aside and removes the staged files. ``timings``
    holds the seconds of each phase (``lookup_s``, ``write_s``, ``jobs_s``, ``visible_s``). Returns the rows written (imported + upserted). A job that fails (the server
    rejects a file: wrong dimension, unreadable file, missing field), or rows that do not show up
    within ``visible_timeout``, raise :class:`~tb_reranker.errors.BulkImportError` naming each
    file's reason, after the rows of every job of this commit were deleted again: the collection
    is left as it was (the ids imported were not in it before). Milvus unreachable:
    ``IndexUnavailableError``. A sink commits once.

``abort()``
    Removes the staged files (local directory or S3 objects) without importing anything.
    Leaving the ``with`` block without a commit, or with an exception, aborts.

Idempotency. Milvus's import *inserts*: importing an id that is already in the collection makes
a second row with that primary key (``count(*)`` counts both; measured on 2.3.5). **Choice:**
only ids not yet in the collection are imported; :meth:`BulkImport.add` looks the ids up (one
Strong ``id in [...]`` query per ``lookup_rows`` rows: each costs ~0.2 s on 2.3.5 whatever its
size; skipped when the collection was empty at the first lookup) and keeps the rows of ids that exist for an upsert after the import succeeded. A re-run of a backfill thus updates what it finds and imports the rest, and a
rejected import changes nothing (the upserts run only after the import was verified). The rows
kept aside stay in memory until the commit: a re-ingest that changes most of a large collection
is better done with upserts. Deleting the existing ids before importing was rejected: a
rejected import would then have lost them. Not guarded: another writer inserting the same ids
between ``add`` and ``commit`` (a backfill is meant to be the collection's only writer).

What the Milvus 2.3.5 test server accepts (measured with ``LocalMilvus``, pymilvus 3.0.2):

* the API: gRPC ``Import``/``GetImportState`` (pymilvus's ``do_bulk_insert`` /
  ``get_bulk_insert_state``, reached through ``MilvusClient._get_connection()``: ``MilvusClient``
  has no import verbs, and ``pymilvus.bulk_writer.bulk_import`` is the REST API of 2.4+). On
  2.4+ the gRPC ``Import`` is still served (through the v2 import); that path is not tested here.
* storage: local (``common.storageType: local``, ``localStorage.path: <base_dir>/data``);
  import paths are absolute file paths (a relative path is resolved against the server's working
  directory, not the storage root: ``stat imp/b.json: no such file or directory``). A path
  outside the storage root is read too.
* file types: row-based JSON (``{"rows": [...]}``, dynamic fields as extra keys), NumPy (one
  ``<field>.npy`` per field, ``$meta.npy`` for dynamic fields) and Parquet (one column per
  field, ``cls`` as ``list<float32>``, ``$meta`` a JSON string column, optional) all import.
  JSON and Parquet take **one file per job** ("each task only accepts one file"); a NumPy job
  takes the list of its ``.npy`` files. Jobs of one collection run **one at a time** (the
  second stays Pending until the first is Completed), so more, smaller jobs buy nothing: one
  100,000-row job was not slower than two of 50,000, four of 25,000 were slower; one job also
  makes one segment (in the first benchmark, two imported 50,000-row segments took ~3x longer
  to index than the same rows upserted; one 100,000-row segment indexed in 223-225 s against
  316-341 s for the upserted rows in the same runs).
* a rejected file fails its job and leaves no rows: a vector of the wrong dimension ("float
  vector is irregular", or for JSON "array size 7 doesn't equal to vector dimension 8"), a
  missing file ("failed to get file size"), a damaged ``.npy``. Rows of a completed job become
  visible to ``count(*)`` with Strong consistency only once the query coordinator's target
  holds its segments: its next-target update (every 10 s) and then the segments' load and the
  current-target update (the next 10 s tick): 10-18 s measured after "Completed" at 100,000
  rows. ``load_collection(refresh=True)`` (what the gRPC ``LoadCollection.refresh`` is for)
  pulls the next target at once and returns once the segments are loaded and current: 6.5-12.6 s
  at 100,000 rows (~1 s until the load starts, 3.5-7 s loading, the rest the tick).

Measured at 100,000 rows of dim 512 (local 2.3.5 server, a 2-core machine shared with other
jobs, so every figure varies by ~2x between runs; pairs were run back to back on one server):

* file format: writing NumPy files takes 0.4-0.8 s, Parquet 2.2-2.3 s (pyarrow, list<float32>);
  the server's import (Started -> Persisted) took 7.5 and 9.3 s for NumPy, 6.1 and 8.9 s for
  Parquet: no measurable difference on the server, so NumPy (cheaper to write) is the default.
  Row JSON was not measured at this size (every float as text, for the server to parse).
* ``add``: ``prepare_rows`` (the same checks as an upsert) is most of it, ~4 s; the id lookups
  added ~4 s (20 queries) before they were skipped for an empty collection.
* ``commit``: the job(s) 7-10 s, then visibility 6.5-12.6 s with the refresh load (10-18 s
  polling ``count(*)`` alone). ``get_bulk_insert_state`` has ``row_count`` and ``infos``
  (``persist_cost``, ``progress_percent``) but no sign that the segments are loaded.

Against batched upserts (``benchmarks/results/bulk_import.json``, two full runs): bulk 32.7 and
33.1 s until every row counts (add 3.6-5.2 s, jobs 13.7-14.9 s, visible 12.3-14.5 s; 36.3 s
before these changes), upserts 62.1 and 30.1 s on the loaded machine (14.7 s in a quieter run):
the ~28 s of server time in ``commit`` is the floor, so bulk wins only against slow upserts.
Until indexed, bulk won both runs (1.46x, 1.47x).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import BulkImportError, InvalidInputError, NotFoundError
from tb_reranker.index.bulk_files import Columns, StagedJob, Staging, milvus_types
from tb_reranker.index.entities import BATCH, prepare_rows
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.index.schema import is_lite_uri

__all__ = ["BulkImport", "ROWS_PER_FILE", "LITE_MESSAGE"]

log = logging.getLogger(__name__)

ROWS_PER_FILE = 100_000  # rows per import job (~200 MB of vectors at dim 512)
LITE_MESSAGE = (
    "Milvus Lite has no bulk import (no import jobs, no object storage): drop --bulk to write "
    "with upserts, or point --uri at a Milvus server"
)
# pymilvus BulkInsertState names of the job states that end a job
_DONE = "Completed"
_FAILED = ("Failed", "Failed and cleaned")
LOOKUP_ROWS = 5000  # rows added before their ids are looked up (ids per `id in [...]` query)


class BulkImport:
    """A sink that imports rows into a Milvus server collection with import jobs (see the module
    docstring for what ``add``/``commit``/``abort`` do and raise).

    Args:
        index: the collection's :class:`VideoIndex` (the collection must exist).
        staging: a directory the server can read (local storage) or ``s3://bucket/prefix`` in
            the server's own bucket (MinIO/S3 storage).
        s3_endpoint: S3 endpoint for ``s3://`` staging (default ``TB_S3_ENDPOINT``; None: AWS).
        s3_client: a ready ``boto3`` S3 client (overrides ``s3_endpoint``).
        rows_per_file: rows per import job (its files: NumPy or Parquet).
        lookup_rows: rows added before their ids are looked up in the collection.
        job_timeout: seconds the import jobs may take together.
        visible_timeout: seconds to wait for imported rows to show in the row count.
        poll_interval: seconds between two job-state polls.
        log_every: seconds between two progress log lines.
    """

    def __init__(
        self,
        index: VideoIndex,
        *,
        staging: str | os.PathLike[str],
        s3_endpoint: str | None = None,
        s3_client: Any = None,
        rows_per_file: int = ROWS_PER_FILE,
        lookup_rows: int = LOOKUP_ROWS,
        job_timeout: float = 3600.0,
        visible_timeout: float = 300.0,
        poll_interval: float = 0.5,
        log_every: float = 10.0,
        file_format: str = "numpy",
    ) -> None:
        if is_lite_uri(index.uri):
            raise InvalidInputError(f"{LITE_MESSAGE} ({index.where})")
        if rows_per_file < 1 or lookup_rows < 1:
            raise InvalidInputError(
                f"rows_per_file and lookup_rows must be at least 1, got {rows_per_file}, "
                f"{lookup_rows}"
            )
        self.index = index
        self.rows_per_file = int(rows_per_file)
        self.lookup_rows = int(lookup_rows)
        self.job_timeout = float(job_timeout)
        self.visible_timeout = float(visible_timeout)
        self.poll_interval = float(poll_interval)
        self.log_every = float(log_every)
        if not index.exists():
            raise NotFoundError(
                f"Milvus collection {index.collection!r} does not exist at {index.where}: "
                "create it before a bulk import"
            )
        self._fields = _collection_fields(index)
        self._dim = self._fields.pop("cls")
        if index.dim is not None and index.dim != self._dim:
            raise InvalidInputError(
                f"collection {index.collection!r} holds {self._dim}-d vectors, the index is "
                f"bound to dim {index.dim}"
            )
        self._staging = Staging(
            staging,
            batch=f"tb_bulk_{index.collection}_{uuid.uuid4().hex[:12]}",
            fields=self._fields,
            dim=self._dim,
            file_format=file_format,
            s3_endpoint=s3_endpoint,
            s3_client=s3_client,
        )
        self.staging = self._staging.where
        self._buffer = Columns()
        self._keys: set[str] = set()
        self._updates: list[dict[str, Any]] = []
        self._unsorted: list[tuple[dict[str, Any], np.ndarray]] = []  # not looked up yet
        self._jobs: list[StagedJob] = []
        self._empty: bool | None = None  # the collection held no row at the first lookup
        #: seconds per phase: id lookups, file writing, jobs until Completed, until counted
        self.timings = {"lookup_s": 0.0, "write_s": 0.0, "jobs_s": 0.0, "visible_s": 0.0}
        self._closed = False
        log.info("bulk import into %s staged at %s", index.collection, self.staging)

    @classmethod
    def open(
        cls,
        uri: str,
        collection: str,
        *,
        token: str = "",
        fingerprint: str | None = None,
        timeout: float = 30.0,
        **options: Any,
    ) -> BulkImport:
        """A sink for ``collection`` at ``uri`` (options: as :class:`BulkImport`). Raises
        ``InvalidInputError`` for a Lite URI before connecting."""
        if is_lite_uri(str(uri)):
            raise InvalidInputError(f"{LITE_MESSAGE} ({uri})")
        index = VideoIndex(
            uri, token=token, collection=collection, fingerprint=fingerprint, timeout=timeout
        )
        return cls(index, **options)

    # ---------------------------------------------------------------- state
    @property
    def pending(self) -> int:
        """Rows added and not committed yet (to import and to upsert)."""
        return len(self._keys)

    @property
    def staged_files(self) -> list[str]:
        """One entry per import job: its Parquet file or its folder of ``.npy`` files (a local
        path, or an object key / key prefix for S3 staging)."""
        return [job.path for job in self._jobs]

    @property
    def updates(self) -> int:
        """Rows added whose id was found in the collection (upserted at commit); ids are looked
        up every ``lookup_rows`` rows and at the commit."""
        return len(self._updates)

    # ---------------------------------------------------------------- add
    def add(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Check and buffer ``rows`` (see the module docstring). Returns how many were added."""
        self._check_open()
        prepared, vectors = self._prepare(rows)
        if not prepared:
            return 0
        keys = [str(row["id"]) for row in prepared]
        repeated = sorted(set(keys) & self._keys)
        if repeated:
            raise InvalidInputError(f"ids added to this bulk import before: {repeated[:10]}")
        if self.index.fingerprint and not self.index.stored_fingerprint():
            self.index.set_fingerprint(self.index.fingerprint)  # as upsert marks a new collection
        self._keys.update(keys)
        self._unsorted.extend(zip(prepared, vectors, strict=True))
        if len(self._unsorted) >= self.lookup_rows:
            self._route()
        return len(prepared)

    def _prepare(
        self, rows: Iterable[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
        """Rows checked by ``prepare_rows`` with the vector checked here and kept as float32
        (``prepare_rows`` makes it a list of Python floats, what an upsert sends)."""
        vectors: list[np.ndarray] = []
        stripped: list[dict[str, Any]] = []
        for row in rows:
            if not isinstance(row, Mapping):
                raise InvalidInputError(f"a row must be a dict, got {type(row).__name__}")
            vector = np.asarray(row.get("cls"), dtype=np.float32)
            if vector.shape != (self._dim,):
                raise InvalidInputError(
                    f"row {row.get('id')!r}: vector must have shape [{self._dim}], got "
                    f"{list(vector.shape)}"
                )
            if not np.isfinite(vector).all():
                raise InvalidInputError(f"row {row.get('id')!r}: vector contains NaN/inf")
            vectors.append(vector)
            stripped.append({**row, "cls": vector[:1]})  # the scalar checks only
        return prepare_rows(stripped, None), vectors

    def _route(self) -> None:
        """Look the ids of the rows added since the last lookup up in the collection: rows of
        ids it holds are kept for the upsert, the others go into the import files."""
        unsorted, self._unsorted = self._unsorted, []
        started = time.monotonic()
        if self._empty is None and unsorted:
            self._empty = self.index.count() == 0
        existing = set() if self._empty else self._existing([str(row["id"]) for row, _ in unsorted])
        self.timings["lookup_s"] += time.monotonic() - started
        for row, vector in unsorted:
            if row["id"] in existing:
                row["cls"] = vector.tolist()
                self._updates.append(row)
            else:
                self._append(row, vector)
                if len(self._buffer) >= self.rows_per_file:
                    self._write_file()

    def _existing(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` the collection holds (Strong: rows written just before count; one
        query per LOOKUP_ROWS ids, since a Strong query waits ~0.2 s on 2.3 whatever it asks)."""
        index = self.index
        found: set[str] = set()
        for start in range(0, len(keys), LOOKUP_ROWS):
            quoted = ", ".join(f'"{k}"' for k in keys[start : start + LOOKUP_ROWS])
            # record keys hold no quote or backslash (validated by prepare_rows)
            rows = index._call(
                "query",
                index.client.query,
                index.collection,
                filter=f"id in [{quoted}]",
                output_fields=["id"],
                consistency_level="Strong",
            )
            found.update(str(row["id"]) for row in rows)
        return found

    def _append(self, row: dict[str, Any], vector: np.ndarray) -> None:
        buffer = self._buffer
        buffer.ids.append(str(row["id"]))
        buffer.vectors.append(vector)
        meta = {}
        for name, value in row.items():
            if name == "cls":
                continue
            if name in self._fields:
                buffer.scalars.setdefault(name, []).append(value)
            else:
                meta[name] = value
        buffer.meta.append(json.dumps(meta, ensure_ascii=False))

    def _write_file(self) -> None:
        """Write the buffered rows as one job's files (uploaded for S3 staging)."""
        buffer, self._buffer = self._buffer, Columns()
        if not buffer:
            return
        started = time.monotonic()
        job = self._staging.write(buffer, f"{len(self._jobs) + 1}")
        self._jobs.append(job)
        self.timings["write_s"] += time.monotonic() - started
        log.info("bulk import: staged %s (%d rows)", job.path, job.rows)

    # ---------------------------------------------------------------- commit
    def commit(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Import the staged files, verify, upsert the existing ids; returns the rows written
        (see the module docstring)."""
        self._check_open()
        self._route()
        self._write_file()
        self._closed = True
        total = sum(job.rows for job in self._jobs)
        try:
            if total:
                self._import(total, progress)
            if self._updates:
                self.index.upsert(self._updates)
                log.info("bulk import: upserted %d rows whose ids existed", len(self._updates))
        finally:
            self._remove_files()
        return total + len(self._updates)

    def _import(self, total: int, progress: Callable[[int, int], None] | None) -> None:
        index = self.index
        before = index.count()
        started = time.monotonic()
        handler = index.client._get_connection()  # MilvusClient has no import verbs
        try:
            for job in self._jobs:
                job.task = int(
                    index._call("import", handler.do_bulk_insert, index.collection, None, job.files)
                )
                job.state = "Pending"
            self._poll(handler, total, progress, started)
            self.timings["jobs_s"] = time.monotonic() - started
            failed = [job for job in self._jobs if job.state in _FAILED]
            if failed:
                reasons = "; ".join(f"{Path(j.path).name}: {j.reason}" for j in failed[:5])
                raise BulkImportError(
                    f"Milvus rejected the bulk import into {index.collection!r} ({len(failed)} "
                    f"of {len(self._jobs)} jobs): {reasons}"
                )
            self._wait_visible(before, total)
            self.timings["visible_s"] = time.monotonic() - started - self.timings["jobs_s"]
        except BaseException:
            self._roll_back(before)
            raise
        seconds = time.monotonic() - started
        log.info(
            "bulk import: %d rows into %s in %.1f s (%d jobs, %.0f rows/s)",
            total,
            index.collection,
            seconds,
            len(self._jobs),
            total / max(seconds, 1e-9),
        )

    def _poll(
        self,
        handler: Any,
        total: int,
        progress: Callable[[int, int], None] | None,
        started: float,
    ) -> None:
        """Poll every job until each is Completed or Failed (``BulkImportError`` past
        ``job_timeout``)."""
        index = self.index
        last_log = started
        while True:
            running = [job for job in self._jobs if job.state != _DONE and job.state not in _FAILED]
            for job in running:
                state = index._call("import state", handler.get_bulk_insert_state, job.task)
                job.state = state.state_name
                job.reason = state.failed_reason
                job.done_rows = job.rows if job.state == _DONE else int(state.row_count or 0)
            done = sum(job.done_rows for job in self._jobs)
            if progress is not None:
                progress(done, total)
            now = time.monotonic()
            finished = all(job.state == _DONE or job.state in _FAILED for job in self._jobs)
            if finished or now - last_log >= self.log_every:
                last_log = now
                log.info(
                    "bulk import: %d/%d rows, %d/%d jobs done, %.0f s",
                    done,
                    total,
                    sum(job.state == _DONE for job in self._jobs),
                    len(self._jobs),
                    now - started,
                )
            if finished:
                return
            if now - started > self.job_timeout:
                raise BulkImportError(
                    f"bulk import into {index.collection!r} not finished after "
                    f"{self.job_timeout:.0f} s ({done}/{total} rows)",
                    retriable=True,
                )
            time.sleep(self.poll_interval)

    def _wait_visible(self, before: int, total: int) -> None:
        """Wait until the row count grew by ``total``. A Completed job's segments are loaded by
        the query coordinator's next target update (10-18 s later on 2.3.5, polled); a load with
        ``refresh`` asks for that update now and returns once the new segments are loaded."""
        deadline = time.monotonic() + self.visible_timeout
        index = self.index
        try:
            index._call(
                "refresh load",
                index.client.load_collection,
                index.collection,
                refresh=True,
                timeout=self.visible_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - a server without refresh: poll the count
            log.info("bulk import: refresh load of %s failed (%s), polling", index.collection, exc)
        while True:
            count = self.index.count()
            grown = count - before
            if grown >= total:
                if grown > total:
                    log.warning(
                        "bulk import: %s grew by %d rows, %d imported (another writer?)",
                        self.index.collection,
                        grown,
                        total,
                    )
                return
            if time.monotonic() > deadline:
                raise BulkImportError(
                    f"bulk import into {self.index.collection!r}: the jobs completed but the "
                    f"row count grew by {grown}, not {total}, within {self.visible_timeout:.0f} s",
                    retriable=True,
                )
            time.sleep(self.poll_interval)

    def _roll_back(self, before: int) -> None:
        """Delete every id this commit imported (none was in the collection before)."""
        updated = {row["id"] for row in self._updates}
        ids = [key for key in self._keys if key not in updated]
        log.warning("bulk import failed: deleting the %d ids it imported", len(ids))
        try:
            for start in range(0, len(ids), BATCH):
                self.index.delete(ids[start : start + BATCH])
            after = self.index.count()
        except Exception:  # noqa: BLE001 - the import's own error is the one to raise
            log.exception("bulk import: rolling back %s failed", self.index.collection)
            return
        if after != before:
            log.warning(
                "bulk import: %s holds %d rows after the roll-back, %d before",
                self.index.collection,
                after,
                before,
            )

    # ---------------------------------------------------------------- abort / cleanup
    def abort(self) -> None:
        """Remove the staged files without importing; the sink is closed."""
        self._closed = True
        self._buffer = Columns()
        self._updates = []
        self._unsorted = []
        self._remove_files()
        log.info("bulk import into %s aborted", self.index.collection)

    def _remove_files(self) -> None:
        self._staging.remove()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this bulk import was committed or aborted already")

    def __enter__(self) -> BulkImport:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.abort()


def _collection_fields(index: VideoIndex) -> dict[str, Any]:
    """The collection's own fields from its description: ``{name: type name}`` for the scalar
    fields (the segment fields only where the schema has them: a schema-1 collection gets them
    in ``$meta``), and ``"cls"`` -> its dimension."""
    description = index._call("describe", index.client.describe_collection, index.collection)
    fields: dict[str, Any] = {}
    for item in description.get("fields", []):
        name = item["name"]
        kind = getattr(item["type"], "name", str(item["type"]))
        if name == "cls":
            fields["cls"] = int(item.get("params", {}).get("dim"))
        elif kind in milvus_types():
            fields[name] = kind
        else:
            raise InvalidInputError(
                f"collection {index.collection!r}: field {name!r} of type {kind} is not one "
                "this bulk import writes"
            )
    if "cls" not in fields:
        raise InvalidInputError(f"collection {index.collection!r} has no 'cls' vector field")
    return fields
