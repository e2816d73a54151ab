"""Bulk import: backfill a Milvus server from files instead of millions of upserts (issue 23).

:class:`BulkImport` is a row sink with the interface of ``VideoIndex.upsert`` split in two: rows
are *added* (checked, then written into Parquet files where the server can read them) and the
whole lot is *committed* at the end (one Milvus import job per file, polled to completion, the
row count verified)::

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
      which this project does not install; the Parquet files are written with pyarrow instead.

    Raises ``InvalidInputError`` at construction for a Milvus Lite URI (Lite has no import:
    drop ``--bulk``), a bad ``staging`` or a collection that does not exist (``NotFoundError``).

``add(rows) -> int``
    Checks rows as ``VideoIndex.upsert`` does (``entities.prepare_rows``: ids, vector shape and
    finiteness, scalar types, segment fields), refuses an id added before (``InvalidInputError``),
    and buffers them. Every ``lookup_rows`` rows (5,000) their ids are looked up in the
    collection: rows whose id is there are kept aside for an upsert at commit (see
    *idempotency*), the others are written, ``rows_per_file`` rows to a Parquet file (for S3:
    then uploaded). Returns the number of rows added. Nothing in the collection changes.

``commit(progress=None) -> int``
    Writes the last file, starts one import job per file, polls them (``progress(done_rows,
    total_rows)`` and a log line every ``log_every`` seconds), waits until the collection's row
    count has grown by the number of rows imported (an import job is "Completed" before its
    segments are searchable: seconds on 2.3.5), then upserts the rows kept aside and removes the
    staged files. Returns the rows written (imported + upserted). A job that fails (the server
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
size) and keeps the rows of ids that exist for an upsert after the import succeeded. A re-run of a backfill thus updates what it finds and imports the rest, and a
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
  JSON and Parquet take **one file per job** ("each task only accepts one file"); Parquet is
  used here (compact, columnar, written from numpy without Python floats).
* a rejected file fails its job and leaves no rows: a vector of the wrong dimension ("float
  vector is irregular", or for JSON "array size 7 doesn't equal to vector dimension 8"), a
  missing file ("failed to get file size"). Rows of a completed job become visible to
  ``count(*)`` with Strong consistency a few seconds after the job says "Completed".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from tb_reranker.errors import BulkImportError, InvalidInputError, NotFoundError
from tb_reranker.index.entities import BATCH, prepare_rows
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.index.schema import is_lite_uri

__all__ = ["BulkImport", "ROWS_PER_FILE", "LITE_MESSAGE"]

log = logging.getLogger(__name__)

ROWS_PER_FILE = 50_000  # rows per Parquet file = per import job (~100 MB at dim 512)
DYNAMIC_FIELD = "$meta"
LITE_MESSAGE = (
    "Milvus Lite has no bulk import (no import jobs, no object storage): drop --bulk to write "
    "with upserts, or point --milvus-uri at a Milvus server"
)
# pymilvus BulkInsertState names of the job states that end a job
_DONE = "Completed"
_FAILED = ("Failed", "Failed and cleaned")
LOOKUP_ROWS = 5000  # rows added before their ids are looked up (ids per `id in [...]` query)


@dataclass
class _Job:
    """One staged file and, once started, its import job."""

    path: str  # what the server reads: an absolute file path or an object key in its bucket
    rows: int
    local: Path | None = None  # the file on this machine (None once uploaded and removed)
    task: int | None = None
    state: str = "Staged"
    done_rows: int = 0
    reason: str = ""


@dataclass
class _Columns:
    """Rows buffered column by column until a file is written."""

    vectors: list[np.ndarray] = field(default_factory=list)
    scalars: dict[str, list[Any]] = field(default_factory=dict)
    meta: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class BulkImport:
    """A sink that imports rows into a Milvus server collection with import jobs (see the module
    docstring for what ``add``/``commit``/``abort`` do and raise).

    Args:
        index: the collection's :class:`VideoIndex` (the collection must exist).
        staging: a directory the server can read (local storage) or ``s3://bucket/prefix`` in
            the server's own bucket (MinIO/S3 storage).
        s3_endpoint: S3 endpoint for ``s3://`` staging (default ``TB_S3_ENDPOINT``; None: AWS).
        s3_client: a ready ``boto3`` S3 client (overrides ``s3_endpoint``).
        rows_per_file: rows per Parquet file, i.e. per import job.
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
        self._batch = f"tb_bulk_{index.collection}_{uuid.uuid4().hex[:12]}"
        self._s3: Any = None
        text = os.fspath(staging)
        if text.startswith("s3://"):
            parsed = urlparse(text)
            if not parsed.netloc:
                raise InvalidInputError(f"not an s3://bucket/prefix url: {text!r}")
            self._bucket = parsed.netloc
            prefix = parsed.path.strip("/")
            self._prefix = f"{prefix}/{self._batch}" if prefix else self._batch
            self._s3 = s3_client or _s3_client(s3_endpoint)
            self._dir = Path(tempfile.mkdtemp(prefix="tb_bulk_"))
            self.staging = f"s3://{self._bucket}/{self._prefix}"
        elif "://" in text:
            raise InvalidInputError(f"bulk staging must be a directory or s3://, got {text!r}")
        else:
            self._bucket = ""
            self._prefix = ""
            self._dir = Path(text).expanduser().resolve() / self._batch
            try:
                self._dir.mkdir(parents=True)
            except OSError as exc:
                raise InvalidInputError(
                    f"cannot create bulk staging dir {self._dir}: {exc}"
                ) from exc
            self.staging = str(self._dir)
        self._buffer = _Columns()
        self._keys: set[str] = set()
        self._updates: list[dict[str, Any]] = []
        self._unsorted: list[tuple[dict[str, Any], np.ndarray]] = []  # not looked up yet
        self._jobs: list[_Job] = []
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
        """What the server will read: absolute file paths or object keys, one per job."""
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
        existing = self._existing([str(row["id"]) for row, _ in unsorted])
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
        """Write the buffered rows as one Parquet file (uploaded for S3 staging)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer, self._buffer = self._buffer, _Columns()
        if not buffer:
            return
        n = len(buffer)
        flat = np.concatenate(buffer.vectors) if buffer.vectors else np.zeros(0, np.float32)
        columns: dict[str, Any] = {}
        for name, kind in self._fields.items():
            values = buffer.scalars.get(name, [])
            if len(values) != n:
                raise InvalidInputError(f"field {name!r} is missing from some rows")
            columns[name] = pa.array(values, type=_ARROW[kind]())
        columns["cls"] = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * self._dim, self._dim, dtype=np.int32)),
            pa.array(flat, type=pa.float32()),
        )
        columns[DYNAMIC_FIELD] = pa.array(buffer.meta, type=pa.string())
        local = self._dir / f"{len(self._jobs) + 1}.parquet"
        pq.write_table(pa.table(columns), local)
        job = _Job(path=str(local), rows=n, local=local)
        if self._s3 is not None:
            key = f"{self._prefix}/{local.name}"
            try:
                self._s3.upload_file(str(local), self._bucket, key)
            except Exception as exc:  # noqa: BLE001 - botocore/boto3 raise many types
                raise BulkImportError(
                    f"cannot upload bulk file to s3://{self._bucket}/{key}: {exc}", retriable=True
                ) from exc
            local.unlink()
            job = _Job(path=key, rows=n)
        self._jobs.append(job)
        log.info("bulk import: staged %s (%d rows)", job.path, n)

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
                    index._call(
                        "import", handler.do_bulk_insert, index.collection, None, [job.path]
                    )
                )
                job.state = "Pending"
            self._poll(handler, total, progress, started)
            failed = [job for job in self._jobs if job.state in _FAILED]
            if failed:
                reasons = "; ".join(f"{Path(j.path).name}: {j.reason}" for j in failed[:5])
                raise BulkImportError(
                    f"Milvus rejected the bulk import into {index.collection!r} ({len(failed)} "
                    f"of {len(self._jobs)} files): {reasons}"
                )
            self._wait_visible(before, total)
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
        """Wait until the row count grew by ``total`` (a Completed job's segments are loaded a
        few seconds later)."""
        deadline = time.monotonic() + self.visible_timeout
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
        self._buffer = _Columns()
        self._updates = []
        self._unsorted = []
        self._remove_files()
        log.info("bulk import into %s aborted", self.index.collection)

    def _remove_files(self) -> None:
        if self._s3 is not None:
            keys = [job.path for job in self._jobs if job.local is None]
            for start in range(0, len(keys), 1000):
                with contextlib.suppress(Exception):
                    self._s3.delete_objects(
                        Bucket=self._bucket,
                        Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]},
                    )
        shutil.rmtree(self._dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("this bulk import was committed or aborted already")

    def __enter__(self) -> BulkImport:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.abort()


# Milvus scalar types of our schema -> pyarrow types of their Parquet column
def _arrow(name: str) -> Callable[[], Any]:
    def make() -> Any:
        import pyarrow as pa

        return getattr(pa, name)()

    return make


_ARROW: dict[str, Callable[[], Any]] = {
    "VARCHAR": _arrow("string"),
    "INT64": _arrow("int64"),
    "INT32": _arrow("int32"),
    "FLOAT": _arrow("float32"),
    "DOUBLE": _arrow("float64"),
    "BOOL": _arrow("bool_"),
}


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
        elif kind in _ARROW:
            fields[name] = kind
        else:
            raise InvalidInputError(
                f"collection {index.collection!r}: field {name!r} of type {kind} is not one "
                "this bulk import writes"
            )
    if "cls" not in fields:
        raise InvalidInputError(f"collection {index.collection!r} has no 'cls' vector field")
    return fields


def _s3_client(endpoint: str | None) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint or os.environ.get("TB_S3_ENDPOINT") or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )
