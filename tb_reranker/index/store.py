"""Frame-token store: per-video frame tokens ``[T, D]`` (fp16) + timestamps, keyed by video id.

One record = the bytes of a safetensors file (``safetensors.numpy.save``) holding ``tokens``
and ``timestamps``, with the content hash in the safetensors metadata. No pickle anywhere.

Backends:

- :class:`LmdbFrameStore` (local default, built for a million videos): one LMDB environment
  directory; ``put_many``/``delete_many`` are one write transaction each (atomic: all or
  nothing); the memory map grows by doubling when full; ``readahead=False`` for random reads.
- :class:`~tb_reranker.index.s3_store.S3FrameStore`: objects ``<prefix>/<id[:2]>/<id>.safetensors``
  on any S3-compatible service (``s3://bucket/prefix``).

:func:`open_store` picks the backend from a spec string.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import DataCorruptionError, InvalidInputError, StoreError

__all__ = [
    "FrameRecord",
    "FrameStore",
    "LmdbFrameStore",
    "open_store",
    "validate_video_id",
    "encode_record",
    "decode_record",
    "VIDEO_ID_PATTERN",
]

log = logging.getLogger(__name__)

VIDEO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
_HASH_KEY = "content_hash"
_FORMAT_KEY = "tb_format"
_FORMAT = "frame_record/1"


def validate_video_id(video_id: Any) -> str:
    """Return ``video_id`` if it is a safe id, else raise :class:`InvalidInputError`.

    Safe: 1-255 characters of ``[A-Za-z0-9._:-]``, starting with a letter or digit, no ``..``.
    Such an id can never name a path outside the store (no ``/``, ``\\``, NUL, or ``..``).
    """
    if not isinstance(video_id, str):
        raise InvalidInputError(f"video id must be a string, got {type(video_id).__name__}")
    if not VIDEO_ID_PATTERN.fullmatch(video_id) or ".." in video_id:
        shown = video_id if len(video_id) <= 80 else video_id[:77] + "..."
        raise InvalidInputError(
            f"invalid video id {shown!r}: use 1-255 characters of letters, digits and ._:- "
            "starting with a letter or digit, without '..'"
        )
    return video_id


@dataclass(frozen=True)
class FrameRecord:
    """Frame tokens of one video (plus what is needed to rebuild its Milvus row)."""

    tokens: np.ndarray  # float16 (or float32) [T, D] per-frame features ([T·(1+P), D] with patches)
    timestamps: np.ndarray  # float32 [T] seconds of each sampled frame in the video
    content_hash: str  # sha256 hex of the source file the tokens were made from
    mask: np.ndarray | None = None  # bool [T]: False = padded (repeated) frame; None = all real
    uri: str = ""  # where the source video lives (to rebuild the Milvus row in `tb check --repair`)
    duration_s: float = 0.0  # video duration in seconds
    fingerprint: str = ""  # fingerprint of the model that made the tokens ("" = unknown)
    metadata: dict[str, Any] | None = None  # user metadata (JSON-serialisable) of the Milvus row

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, np.ndarray) or self.tokens.ndim != 2:
            raise InvalidInputError(
                "FrameRecord.tokens must be a 2-D array [T, D], got "
                f"{getattr(self.tokens, 'shape', type(self.tokens))}"
            )
        if self.tokens.dtype not in (np.float16, np.float32):
            raise InvalidInputError(
                f"FrameRecord.tokens dtype {self.tokens.dtype}: use float16 or float32"
            )
        if (
            not isinstance(self.timestamps, np.ndarray)
            or self.timestamps.ndim != 1
            or self.timestamps.shape[0] == 0
            or self.tokens.shape[0] % self.timestamps.shape[0] != 0
        ):
            raise InvalidInputError(
                f"FrameRecord.timestamps must have shape [T] with T dividing the {self.tokens.shape[0]} "
                f"token rows, got {getattr(self.timestamps, 'shape', type(self.timestamps))}"
            )
        if self.mask is not None and (
            not isinstance(self.mask, np.ndarray) or self.mask.shape != self.timestamps.shape
        ):
            raise InvalidInputError(
                f"FrameRecord.mask must have shape {list(self.timestamps.shape)}, "
                f"got {getattr(self.mask, 'shape', type(self.mask))}"
            )
        if not isinstance(self.content_hash, str):
            raise InvalidInputError("FrameRecord.content_hash must be a string")

    @property
    def num_frames(self) -> int:
        """T, sampled frames (real + padded)."""
        return int(self.timestamps.shape[0])

    @property
    def num_real_frames(self) -> int:
        return self.num_frames if self.mask is None else int(np.count_nonzero(self.mask))

    def frames_cls(self) -> np.ndarray:
        """Per-frame features float32 [T, D] (row 0 of each frame's token group)."""
        tokens = np.asarray(self.tokens, dtype=np.float32)
        per_frame = tokens.shape[0] // self.num_frames
        return tokens.reshape(self.num_frames, per_frame, -1)[:, 0]

    def video_cls(self) -> np.ndarray:
        """The video [CLS] float32 [D]: L2-normalised mean of the real frames' features.

        The same definition as ``TokenBinder.pool_cls`` (checked by the tests), so a Milvus row
        can be rebuilt from the store alone (up to the store's float16 rounding).
        """
        frames = self.frames_cls()
        if self.mask is not None and self.mask.any():
            frames = frames[self.mask.astype(bool)]
        pooled = frames.mean(axis=0)
        norm = float(np.linalg.norm(pooled))
        return pooled / max(norm, 1e-12)


def encode_record(record: FrameRecord, dtype: np.dtype | type = np.float16) -> bytes:
    """safetensors bytes of ``record``, tokens cast to ``dtype``."""
    from safetensors.numpy import save

    with np.errstate(over="ignore"):  # overflow to inf is refused just below
        tokens = np.ascontiguousarray(record.tokens, dtype=dtype)
    if not np.isfinite(tokens).all():
        raise InvalidInputError("frame tokens contain NaN/inf (or overflow float16)")
    tensors = {
        "tokens": tokens,
        "timestamps": np.ascontiguousarray(record.timestamps, dtype=np.float32),
    }
    if record.mask is not None:
        tensors["mask"] = np.ascontiguousarray(record.mask, dtype=np.uint8)
    metadata = {
        _HASH_KEY: record.content_hash,
        _FORMAT_KEY: _FORMAT,
        "uri": record.uri,
        "duration_s": repr(float(record.duration_s)),
        "fingerprint": record.fingerprint,
    }
    if record.metadata:
        try:
            metadata["metadata"] = json.dumps(record.metadata, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"metadata is not JSON-serialisable: {exc}") from exc
    return save(tensors, metadata=metadata)


_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8}


def _tensor(header: dict[str, Any], name: str, data: Any, base: int) -> np.ndarray:
    """One tensor of a safetensors buffer, bounds- and size-checked, copied out (writable)."""
    info = header[name]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = [int(d) for d in info["shape"]]
    begin, end = (int(v) for v in info["data_offsets"])
    count = math.prod(shape)
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data) - base:
        raise ValueError(f"tensor {name!r} lies outside the buffer")
    if end - begin != count * dtype.itemsize:
        raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=base + begin).reshape(shape).copy()


def decode_record(video_id: str, data: bytes | memoryview) -> FrameRecord:
    """Parse safetensors bytes; any problem is a :class:`DataCorruptionError` naming
    ``video_id`` (unparsable bytes, or tokens/timestamps that are not finite: encode_record never
    writes those, so they can only come from damage on disk).

    The header is parsed directly (the safetensors format: u64 little-endian header length,
    JSON header, raw little-endian tensor bytes) so a read costs a few microseconds.
    """
    try:
        if len(data) < 8:
            raise ValueError("truncated header")
        (header_len,) = struct.unpack("<Q", bytes(data[:8]))
        if header_len > len(data) - 8:
            raise ValueError("header length past the end")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        if metadata.get(_FORMAT_KEY) != _FORMAT:
            raise ValueError(f"unknown format {metadata.get(_FORMAT_KEY)!r}")
        base = 8 + header_len
        mask = _tensor(header, "mask", data, base).astype(bool) if "mask" in header else None
        user = json.loads(metadata["metadata"]) if metadata.get("metadata") else None
        record = FrameRecord(
            tokens=_tensor(header, "tokens", data, base),
            timestamps=_tensor(header, "timestamps", data, base),
            content_hash=str(metadata.get(_HASH_KEY, "")),
            mask=mask,
            uri=str(metadata.get("uri", "")),
            duration_s=float(metadata.get("duration_s", "0") or 0.0),
            fingerprint=str(metadata.get("fingerprint", "")),
            metadata=user,
        )
        if not np.isfinite(record.tokens).all():
            raise ValueError("frame tokens contain NaN/inf")
        if not np.isfinite(record.timestamps).all():
            raise ValueError("timestamps contain NaN/inf")
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt entry
        raise DataCorruptionError(
            f"corrupt frame-token entry for video {video_id!r}: {exc} "
            "(run `tb check --repair`, then re-ingest it)"
        ) from exc
    return record


class FrameStore(abc.ABC):
    """Key-value store of :class:`FrameRecord` by video id."""

    @abc.abstractmethod
    def put_many(self, records: Mapping[str, FrameRecord]) -> None:
        """Write (insert or replace) all ``records``."""

    @abc.abstractmethod
    def get_many(self, ids: Iterable[str]) -> dict[str, FrameRecord]:
        """Records of ``ids`` that exist (missing ids are absent from the result)."""

    @abc.abstractmethod
    def delete_many(self, ids: Iterable[str]) -> int:
        """Delete ``ids`` (missing ones ignored). Returns how many existed."""

    @abc.abstractmethod
    def list_ids(self) -> Iterator[str]:
        """Every stored video id (sorted for LMDB)."""

    @abc.abstractmethod
    def contains(self, video_id: str) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release resources; the store is unusable afterwards."""

    def get(self, video_id: str) -> FrameRecord | None:
        return self.get_many([video_id]).get(video_id)

    def scan(self, expected: Iterable[str] = ()) -> Any:
        """Read every entry: a :class:`~tb_reranker.index.lmdb_scan.StoreScan` (ids that read
        fine, corrupt ids with the reason, store-level damage). ``expected``: ids that should
        be present (backends that can lose their key listing read these one by one)."""
        from tb_reranker.index.lmdb_scan import StoreScan

        scan = StoreScan()
        try:
            ids = list(self.list_ids())
        except StoreError as exc:
            scan.damage.append(f"listing the entries failed: {exc}")
            ids = list(dict.fromkeys(expected))
        for video_id in ids:
            try:
                found = self.get_many([video_id])
            except StoreError as exc:
                scan.corrupt[video_id] = str(exc)
                continue
            if video_id in found:
                scan.ok.append(video_id)
        return scan

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and self.contains(video_id)

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ids_list(ids: Iterable[str]) -> list[str]:
    if isinstance(ids, str):
        raise InvalidInputError("pass a list of video ids, not a single string")
    return [validate_video_id(i) for i in ids]


class LmdbFrameStore(FrameStore):
    """Local store in one LMDB environment directory.

    Args:
        path: the environment directory (created if missing).
        dtype: token dtype on disk (float16 default; float32 to keep full precision).
        map_size: initial map size in bytes; doubled whenever a write finds it full.
        readonly: open read-only (no writes, many readers).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: str = "float16",
        map_size: int = 1 << 30,
        readonly: bool = False,
    ) -> None:
        import lmdb

        if dtype not in ("float16", "float32"):
            raise InvalidInputError(f"store dtype must be float16 or float32, got {dtype!r}")
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._lmdb = lmdb
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            elif not self.path.is_dir():
                raise StoreError(f"frame-token store {str(self.path)!r} does not exist")
            self._env = lmdb.open(
                str(self.path),
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                writemap=False,
                readahead=False,
                meminit=False,
                max_readers=256,
                lock=True,
            )
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open frame-token store {str(self.path)!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"LmdbFrameStore({str(self.path)!r})"

    def _env_or_raise(self) -> Any:
        if self._env is None:
            raise StoreError(f"frame-token store {str(self.path)!r} is closed")
        return self._env

    def _write(self, fn: Any) -> Any:
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full."""
        env = self._env_or_raise()
        while True:
            try:
                with env.begin(write=True) as txn:
                    return fn(txn)
            except self._lmdb.MapFullError:
                new_size = env.info()["map_size"] * 2
                log.info("frame-token store full; growing map to %d MiB", new_size >> 20)
                env.set_mapsize(new_size)
            except self._lmdb.Error as exc:
                raise StoreError(f"frame-token store write failed: {exc}") from exc

    def put_many(self, records: Mapping[str, FrameRecord]) -> None:
        items = []
        for video_id, record in records.items():
            validate_video_id(video_id)
            if not isinstance(record, FrameRecord):
                raise InvalidInputError(f"value for {video_id!r} is not a FrameRecord")
            items.append((video_id.encode(), encode_record(record, self.dtype)))

        def write(txn: Any) -> None:
            for key, value in items:
                txn.put(key, value)

        if items:
            self._write(write)

    def get_many(self, ids: Iterable[str]) -> dict[str, FrameRecord]:
        wanted = _ids_list(ids)
        env = self._env_or_raise()
        out: dict[str, FrameRecord] = {}
        try:
            with env.begin(buffers=True) as txn:
                for video_id in wanted:
                    value = txn.get(video_id.encode())  # a memoryview valid inside the txn
                    if value is not None:
                        out[video_id] = decode_record(video_id, value)
        except (self._lmdb.CorruptedError, self._lmdb.PageNotFoundError) as exc:
            raise DataCorruptionError(
                f"frame-token store {self.path.name!r} is damaged: {exc} (run `tb check`)"
            ) from exc
        except self._lmdb.Error as exc:
            raise StoreError(f"frame-token store read failed: {exc}") from exc
        return out

    def delete_many(self, ids: Iterable[str]) -> int:
        keys = [i.encode() for i in _ids_list(ids)]
        if not keys:
            return 0
        return int(self._write(lambda txn: sum(1 for k in keys if txn.delete(k))))

    def contains(self, video_id: str) -> bool:
        key = validate_video_id(video_id).encode()
        with self._env_or_raise().begin(buffers=True) as txn:
            return txn.get(key) is not None

    def list_ids(self) -> Iterator[str]:
        env = self._env_or_raise()
        try:
            with env.begin() as txn:
                keys = [bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False)]
        except (self._lmdb.Error, UnicodeDecodeError) as exc:
            raise DataCorruptionError(
                f"frame-token store {self.path.name!r} is damaged: {exc} (run `tb check`)"
            ) from exc
        yield from keys

    def scan(self, expected: Iterable[str] = ()) -> Any:
        """Every entry read in child processes (see :mod:`tb_reranker.index.lmdb_scan`): a
        damaged page that makes LMDB abort kills a child, never this process."""
        from tb_reranker.index.lmdb_scan import scan_lmdb

        self._env_or_raise()
        return scan_lmdb(self.path, expected)

    def salvage(self, ids: list[str]) -> Path:
        """Rebuild the environment from the entries ``ids`` (read fine by :meth:`scan`).

        The readable entries are copied into a fresh environment (in a child process), the
        damaged directory is moved aside to ``<path>.damaged-<time>`` (kept for forensics), and
        the fresh one takes its place. Returns where the damaged copy went. Stop other processes
        using the store first: they keep reading the damaged copy until they reopen it.
        """
        import shutil
        import time

        from tb_reranker.index.lmdb_scan import copy_lmdb

        env = self._env_or_raise()
        map_size = env.info()["map_size"]
        fresh = self.path.with_name(self.path.name + ".salvage")
        shutil.rmtree(fresh, ignore_errors=True)
        copy_lmdb(self.path, fresh, ids)
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        self.close()
        os.replace(self.path, aside)
        os.replace(fresh, self.path)
        self._env = self._lmdb.open(
            str(self.path),
            map_size=map_size,
            subdir=True,
            writemap=False,
            readahead=False,
            meminit=False,
            max_readers=256,
            lock=True,
        )
        log.warning(
            "frame-token store rebuilt from %d entries; damaged copy at %s", len(ids), aside
        )
        return aside

    def __len__(self) -> int:
        return int(self._env_or_raise().stat()["entries"])

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def open_store(
    spec: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    dtype: str = "float16",
    **options: Any,
) -> FrameStore:
    """Open a frame-token store from ``spec``.

    ``s3://bucket/prefix`` → :class:`S3FrameStore` (endpoint from ``endpoint_url`` or
    ``TB_S3_ENDPOINT``; credentials from the usual AWS variables); anything else is a local
    directory → :class:`LmdbFrameStore`. ``options`` go to the backend's constructor.
    """
    text = os.fspath(spec)
    if not text:
        raise InvalidInputError("empty frame-token store spec")
    if text.startswith("s3://"):
        from tb_reranker.index.s3_store import S3FrameStore

        return S3FrameStore.from_url(text, endpoint_url=endpoint_url, dtype=dtype, **options)
    if "://" in text:
        raise InvalidInputError(f"unsupported frame-token store {text!r}: use a directory or s3://")
    return LmdbFrameStore(text, dtype=dtype, **options)
