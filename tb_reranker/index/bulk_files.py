"""Bulk import's files: where a :class:`~tb_reranker.index.bulk.BulkImport` stages its rows for
the Milvus server to read, and how it writes them.

:class:`Staging` owns one staging location: a directory the server reads (local storage) or an
``s3://bucket/prefix`` in the server's own bucket (uploaded with boto3, written to a local
temporary directory first). :meth:`Staging.write` turns buffered :class:`Columns` into one
import job's files: NumPy (``<field>.npy`` per field, what the server imports fastest to write)
or Parquet (one file; used when NumPy's fixed-width strings would be too large).
:meth:`Staging.remove` deletes everything staged. The module docstring of
:mod:`tb_reranker.index.bulk` has the measurements behind these choices.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from tb_reranker.errors import BulkImportError, InvalidInputError
from tb_reranker.s3 import make_client

__all__ = ["DYNAMIC_FIELD", "FILE_FORMATS", "Columns", "StagedJob", "Staging", "milvus_types"]

FILE_FORMATS = ("numpy", "parquet")
NUMPY_TEXT = 256 << 20  # string columns of a job above this (fixed-width UTF-32): Parquet
DYNAMIC_FIELD = "$meta"


@dataclass
class StagedJob:
    """One staged file (or folder of files) and, once started, its import job."""

    path: str  # the job's file (Parquet) or folder (NumPy): a local path or an object key
    rows: int
    files: list[str]  # what the server reads: absolute file paths or object keys in its bucket
    local: Path | None = None  # the file/folder on this machine (None once uploaded and removed)
    task: int | None = None
    state: str = "Staged"
    done_rows: int = 0
    reason: str = ""


@dataclass
class Columns:
    """Rows buffered column by column until a file is written."""

    vectors: list[np.ndarray] = field(default_factory=list)
    scalars: dict[str, list[Any]] = field(default_factory=dict)
    meta: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class Staging:
    """The staging location of one bulk import (named ``batch`` under ``staging``).

    Args:
        staging: a directory the server reads, or ``s3://bucket/prefix`` in its own bucket.
        batch: this import's folder / key prefix under ``staging``.
        fields: the collection's scalar fields, ``{name: Milvus type name}``.
        dim: the vector dimension.
        file_format: ``"numpy"`` or ``"parquet"``.
        s3_endpoint, s3_client: for ``s3://`` staging (default ``TB_S3_ENDPOINT``).
    Raises:
        InvalidInputError: a bad location, or a directory that cannot be created.
    """

    def __init__(
        self,
        staging: str | os.PathLike[str],
        *,
        batch: str,
        fields: dict[str, str],
        dim: int,
        file_format: str = "numpy",
        s3_endpoint: str | None = None,
        s3_client: Any = None,
    ) -> None:
        if file_format not in FILE_FORMATS:
            raise InvalidInputError(
                f"file_format must be one of {FILE_FORMATS}, got {file_format!r}"
            )
        self.fields = fields
        self.dim = dim
        self.file_format = file_format
        self._s3: Any = None
        text = os.fspath(staging)
        if text.startswith("s3://"):
            parsed = urlparse(text)
            if not parsed.netloc:
                raise InvalidInputError(f"not an s3://bucket/prefix url: {text!r}")
            self._bucket = parsed.netloc
            prefix = parsed.path.strip("/")
            self._prefix = f"{prefix}/{batch}" if prefix else batch
            self._s3 = s3_client or make_client(s3_endpoint)
            self._dir = Path(tempfile.mkdtemp(prefix="tb_bulk_"))
            self.where = f"s3://{self._bucket}/{self._prefix}"
        elif "://" in text:
            raise InvalidInputError(f"bulk staging must be a directory or s3://, got {text!r}")
        else:
            self._bucket = ""
            self._prefix = ""
            self._dir = Path(text).expanduser().resolve() / batch
            try:
                self._dir.mkdir(parents=True)
            except OSError as exc:
                raise InvalidInputError(
                    f"cannot create bulk staging dir {self._dir}: {exc}"
                ) from exc
            self.where = str(self._dir)
        self._uploaded: list[str] = []

    def write(self, buffer: Columns, name: str) -> StagedJob:
        """``buffer``'s rows as one job's files named ``name`` (uploaded for S3 staging)."""
        n = len(buffer)
        columns: dict[str, list[Any]] = {}
        for column in self.fields:
            values = buffer.scalars.get(column, [])
            if len(values) != n:
                raise InvalidInputError(f"field {column!r} is missing from some rows")
            columns[column] = values
        columns[DYNAMIC_FIELD] = buffer.meta
        vectors = np.stack(buffer.vectors)
        if self.file_format == "numpy" and _fixed_width_bytes(columns, self.fields) <= NUMPY_TEXT:
            local = self._dir / name
            local.mkdir()
            files = self._write_numpy(local, columns, vectors)
        else:
            local = self._dir / f"{name}.parquet"
            self._write_parquet(local, columns, vectors)
            files = [local]
        if self._s3 is None:
            return StagedJob(path=str(local), rows=n, files=[str(f) for f in files], local=local)
        keys = [f"{self._prefix}/{f.relative_to(self._dir).as_posix()}" for f in files]
        for file, key in zip(files, keys, strict=True):
            try:
                self._s3.upload_file(str(file), self._bucket, key)
            except Exception as exc:  # noqa: BLE001 - botocore/boto3 raise many types
                raise BulkImportError(
                    f"cannot upload bulk file to s3://{self._bucket}/{key}: {exc}",
                    retriable=True,
                ) from exc
            self._uploaded.append(key)
        if local.is_dir():
            shutil.rmtree(local)
        else:
            local.unlink()
        return StagedJob(path=f"{self._prefix}/{name}", rows=n, files=keys)

    def remove(self) -> None:
        """Delete everything staged (uploaded objects, the local directory)."""
        if self._s3 is not None:
            keys = self._uploaded
            for start in range(0, len(keys), 1000):
                with contextlib.suppress(Exception):
                    self._s3.delete_objects(
                        Bucket=self._bucket,
                        Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]},
                    )
        shutil.rmtree(self._dir, ignore_errors=True)

    def _write_numpy(
        self, folder: Path, columns: dict[str, list[Any]], vectors: np.ndarray
    ) -> list[Path]:
        """One ``<field>.npy`` per field (strings as fixed-width unicode), vectors ``(n, dim)``
        float32, the dynamic fields as JSON strings in ``$meta.npy``."""
        files = []
        for name, values in columns.items():
            kind = self.fields.get(name, "VARCHAR")  # $meta: JSON strings
            files.append(folder / f"{name}.npy")
            np.save(files[-1], np.array(values, dtype=_NUMPY[kind]))
        files.append(folder / "cls.npy")
        np.save(files[-1], vectors)
        return files

    def _write_parquet(
        self, local: Path, columns: dict[str, list[Any]], vectors: np.ndarray
    ) -> None:
        """One Parquet file: a column per field, ``cls`` as ``list<float32>``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = len(vectors)
        arrays = {
            name: pa.array(values, type=_ARROW[self.fields.get(name, "VARCHAR")]())
            for name, values in columns.items()
        }
        arrays["cls"] = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * self.dim, self.dim, dtype=np.int32)),
            pa.array(vectors.reshape(-1), type=pa.float32()),
        )
        pq.write_table(pa.table(arrays), local)


def milvus_types() -> tuple[str, ...]:
    """The Milvus scalar type names these files can hold."""
    return tuple(_NUMPY)


# Milvus scalar types of our schema -> pyarrow types of their Parquet column
def _arrow(name: str) -> Callable[[], Any]:
    def make() -> Any:
        import pyarrow as pa

        return getattr(pa, name)()

    return make


_NUMPY: dict[str, Any] = {
    "VARCHAR": np.str_,
    "INT64": np.int64,
    "INT32": np.int32,
    "FLOAT": np.float32,
    "DOUBLE": np.float64,
    "BOOL": np.bool_,
}

_ARROW: dict[str, Callable[[], Any]] = {
    "VARCHAR": _arrow("string"),
    "INT64": _arrow("int64"),
    "INT32": _arrow("int32"),
    "FLOAT": _arrow("float32"),
    "DOUBLE": _arrow("float64"),
    "BOOL": _arrow("bool_"),
}


def _fixed_width_bytes(columns: dict[str, list[Any]], fields: dict[str, str]) -> int:
    """Bytes of the string columns as NumPy writes them: fixed-width UTF-32, the longest string
    of a column sets its width (one long ``$meta`` would blow every row up)."""
    total = 0
    for name, values in columns.items():
        if fields.get(name, "VARCHAR") == "VARCHAR" and values:
            total += 4 * len(values) * max(len(v) for v in values)
    return total
