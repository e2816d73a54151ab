"""The local frame store: :class:`LmdbFrameStore`, one LMDB environment directory.

Built for a million videos: ``put_many``/``delete_many`` are one write transaction each (atomic:
all or nothing); the memory map grows by doubling when full, and a map another process grew
(``MDB_MAP_RESIZED``: a concurrent ingest) is adopted on the next transaction; ``readahead=False``
for random reads. ``scan``/``salvage`` read the environment in child processes
(:mod:`~tb_reranker.stores.lmdb_scan`) so a damaged page never kills the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import DataCorruptionError, InvalidInputError, StoreError
from tb_reranker.stores.base import FrameStore, StoreScan
from tb_reranker.stores.record import (
    FrameRecord,
    decode_record,
    encode_record,
    validate_record_key,
    validate_record_keys,
)

__all__ = ["LmdbFrameStore"]

log = logging.getLogger(__name__)


def _open_env(lmdb: Any, path: Path, map_size: int, readonly: bool = False) -> Any:
    """One LMDB environment with the store's settings (random reads, many readers)."""
    return lmdb.open(
        str(path),
        map_size=map_size,
        subdir=True,
        readonly=readonly,
        writemap=False,
        readahead=False,
        meminit=False,
        max_readers=256,
        lock=True,
    )


class _Environment:
    """One open LMDB environment, shared by every ``LmdbFrameStore`` of its directory in this
    process (LMDB allows one open per process): reference-counted, closed with the last store.
    The map-resize guard is the environment's, so it counts the transactions of all of them."""

    def __init__(self, key: str, env: Any, readonly: bool) -> None:
        self.key = key
        self.env: Any = env
        self.readonly = readonly
        self.refs = 1
        self.guard = threading.Condition()
        self.open_txns = 0
        self.resizing = False


_ENVIRONMENTS: dict[str, _Environment] = {}  # resolved directory -> its open environment
_ENVIRONMENTS_LOCK = threading.Lock()


def _acquire(lmdb: Any, path: Path, map_size: int, readonly: bool) -> _Environment:
    """The process's environment of ``path``, opened on first use."""
    key = str(path.resolve())
    with _ENVIRONMENTS_LOCK:
        shared = _ENVIRONMENTS.get(key)
        if shared is not None:
            if shared.readonly and not readonly:
                raise StoreError(
                    f"frame-token store {str(path)!r} is open read-only in this process; "
                    "close it before opening it for writing"
                )
            shared.refs += 1
            return shared
        shared = _Environment(key, _open_env(lmdb, path, map_size, readonly), readonly)
        _ENVIRONMENTS[key] = shared
        return shared


def _release(shared: _Environment) -> None:
    with _ENVIRONMENTS_LOCK:
        shared.refs -= 1
        if shared.refs > 0:
            return
        if _ENVIRONMENTS.get(shared.key) is shared:
            del _ENVIRONMENTS[shared.key]
        if shared.env is not None:
            shared.env.close()
            shared.env = None


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
        self._shared: _Environment | None = None
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            elif not self.path.is_dir():
                raise StoreError(f"frame-token store {str(self.path)!r} does not exist")
            # several stores (two Clients of one data dir) of one process share the environment
            self._shared = _acquire(lmdb, self.path, map_size, readonly)
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open frame-token store {str(self.path)!r}: {exc}") from exc

    def __repr__(self) -> str:
        return f"LmdbFrameStore({str(self.path)!r})"

    @property
    def _env(self) -> Any:
        return None if self._shared is None else self._shared.env

    # the map may be resized only while no transaction of this process is open: the guard and
    # its counters belong to the shared environment
    @property
    def _guard(self) -> threading.Condition:
        assert self._shared is not None
        return self._shared.guard

    @property
    def _open_txns(self) -> int:
        return self._shared.open_txns if self._shared is not None else 0

    @_open_txns.setter
    def _open_txns(self, value: int) -> None:
        assert self._shared is not None
        self._shared.open_txns = value

    @property
    def _resizing(self) -> bool:
        return self._shared.resizing if self._shared is not None else False

    @_resizing.setter
    def _resizing(self, value: bool) -> None:
        assert self._shared is not None
        self._shared.resizing = value

    def _env_or_raise(self) -> Any:
        if self._env is None:
            raise StoreError(f"frame-token store {str(self.path)!r} is closed")
        return self._env

    @contextlib.contextmanager
    def _txn(self, **options: Any) -> Iterator[Any]:
        """One transaction (``env.begin(**options)``). When another process grew the map past
        this one's (``MapResizedError``), the new size is adopted and the transaction begun
        again; before, every read failed with ``MDB_MAP_RESIZED`` until a restart."""
        env = self._env_or_raise()
        self._enter()
        try:
            try:
                txn = env.begin(**options)
            except self._lmdb.MapResizedError:
                self._exit()
                try:
                    self._resize(env, 0)  # 0: the size the environment records now
                finally:
                    self._enter()
                txn = env.begin(**options)
            with txn:
                yield txn
        finally:
            self._exit()

    def _enter(self) -> None:
        with self._guard:
            while self._resizing:
                self._guard.wait()
            self._open_txns += 1

    def _exit(self) -> None:
        with self._guard:
            self._open_txns -= 1
            self._guard.notify_all()

    def _resize(self, env: Any, size: int) -> None:
        """``env.set_mapsize(size)`` once no transaction of this process is open (LMDB's rule:
        readers hold pointers into the map)."""
        with self._guard:
            while self._resizing:
                self._guard.wait()
            self._resizing = True
            try:
                while self._open_txns:
                    self._guard.wait()
                env.set_mapsize(size)
            finally:
                self._resizing = False
                self._guard.notify_all()
        if size == 0:
            log.info("frame-token store map grown by another process: now %d MiB", _mib(env))

    def _write(self, fn: Any) -> Any:
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full."""
        env = self._env_or_raise()
        while True:
            try:
                with self._txn(write=True) as txn:
                    return fn(txn)
            except self._lmdb.MapFullError:
                new_size = env.info()["map_size"] * 2
                log.info("frame-token store full; growing map to %d MiB", new_size >> 20)
                self._resize(env, new_size)
            except self._lmdb.Error as exc:
                raise StoreError(f"frame-token store write failed: {exc}") from exc

    def put_many(self, records: Mapping[str, FrameRecord]) -> None:
        items = []
        for video_id, record in records.items():
            validate_record_key(video_id)
            if not isinstance(record, FrameRecord):
                raise InvalidInputError(f"value for {video_id!r} is not a FrameRecord")
            items.append((video_id.encode(), encode_record(record, self.dtype)))

        def write(txn: Any) -> None:
            for key, value in items:
                txn.put(key, value)

        if items:
            self._write(write)

    def get_many(self, ids: Iterable[str]) -> dict[str, FrameRecord]:
        wanted = validate_record_keys(ids)
        out: dict[str, FrameRecord] = {}
        try:
            with self._txn(buffers=True) as txn:
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
        keys = [i.encode() for i in validate_record_keys(ids)]
        if not keys:
            return 0
        return int(self._write(lambda txn: sum(1 for k in keys if txn.delete(k))))

    def contains(self, video_id: str) -> bool:
        key = validate_record_key(video_id).encode()
        with self._txn(buffers=True) as txn:
            return txn.get(key) is not None

    def list_ids(self) -> Iterator[str]:
        try:
            with self._txn() as txn:
                keys = [bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False)]
        except (self._lmdb.Error, UnicodeDecodeError) as exc:
            raise DataCorruptionError(
                f"frame-token store {self.path.name!r} is damaged: {exc} (run `tb check`)"
            ) from exc
        yield from keys

    def scan(self, expected: Iterable[str] = ()) -> StoreScan:
        """Every entry read in child processes (see :mod:`tb_reranker.stores.lmdb_scan`): a
        damaged page that makes LMDB abort kills a child, never this process."""
        from tb_reranker.stores.lmdb_scan import scan_lmdb

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

        from tb_reranker.stores.lmdb_scan import copy_lmdb

        env = self._env_or_raise()
        map_size = env.info()["map_size"]
        fresh = self.path.with_name(self.path.name + ".salvage")
        shutil.rmtree(fresh, ignore_errors=True)
        copy_lmdb(self.path, fresh, ids)
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shared = self._shared
        assert shared is not None
        env.close()  # every store sharing it reads the fresh environment below
        shared.env = None
        os.replace(self.path, aside)
        os.replace(fresh, self.path)
        shared.env = _open_env(self._lmdb, self.path, map_size)
        log.warning(
            "frame-token store rebuilt from %d entries; damaged copy at %s", len(ids), aside
        )
        return aside

    def __len__(self) -> int:
        return int(self._env_or_raise().stat()["entries"])

    def close(self) -> None:
        """Close this store; the environment closes with the last store of the process."""
        if self._shared is not None:
            shared, self._shared = self._shared, None
            _release(shared)


def _mib(env: Any) -> int:
    return int(env.info()["map_size"]) >> 20
