"""Milvus Lite's database directory, checked before pymilvus opens it.

Milvus Lite keeps a database as a directory and lets one process at a time open it (an ``flock``
on its ``LOCK`` file). Opened where that cannot work, Lite logs a long traceback and pymilvus
raises ``Open local milvus failed``, which says neither what is wrong nor what to do.
:func:`check_lite_database` says it in one line, before pymilvus is called:

- a path where no directory can be made (``/proc/self/x.db``, a path under a file, no
  permission) is the caller's mistake: :class:`InvalidInputError`;
- a database another process holds: :class:`IndexBackendError` naming that process (from
  ``/proc/locks`` on Linux) and the ways to share one database (``tb serve`` + ``--reranker``,
  or a Milvus server).
"""

from __future__ import annotations

import os
from pathlib import Path

from tb_reranker.errors import IndexBackendError, InvalidInputError

__all__ = ["check_lite_database", "lock_holder"]

LOCK_FILENAME = "LOCK"  # milvus_lite.db.LOCK_FILENAME


def check_lite_database(path: str | os.PathLike[str]) -> None:
    """Make the database directory ``path`` if needed and refuse one held by another process.

    Raises:
        InvalidInputError: ``path`` cannot be (or is not) a directory of this file system.
        IndexBackendError: another process holds the database (not retriable until it exits).
    """
    database = Path(path)
    try:
        database.mkdir(parents=True, exist_ok=True)
        if not database.is_dir():
            raise NotADirectoryError(20, "not a directory")
        probe = database / LOCK_FILENAME
        if not probe.exists() and not os.access(database, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise InvalidInputError(
            f"cannot use {str(database)!r} as a Milvus Lite database (a directory): "
            f"{exc.strerror or exc}; pass --uri (TB_MILVUS_URI) a writable path, "
            "e.g. ./tb_data/milvus.db"
        ) from None
    holder = lock_holder(database)
    if holder is not None:
        raise locked_error(database, holder)


def locked_error(database: Path, holder: str) -> IndexBackendError:
    return IndexBackendError(
        f"Milvus Lite database {str(database)!r} is in use by {holder}; Milvus Lite lets one "
        "process open it: stop that process, or run one `tb serve` on this data dir and give "
        "other commands --reranker HOST:PORT, or use a Milvus server (--uri http://HOST:19530)"
    )


def lock_holder(database: str | os.PathLike[str]) -> str | None:
    """Who holds the Lite lock of ``database``: ``"process 123 (python)"``, ``"another
    process"`` when the lock is taken but its owner unknown; None when free or held by this
    very process (Lite shares one server per path within a process)."""
    lock = Path(database) / LOCK_FILENAME
    try:
        status = os.stat(lock)
    except OSError:
        return None  # never opened: nobody holds it
    pids = _flock_pids(status.st_dev, status.st_ino)
    if pids is None:  # no /proc/locks (not Linux): Lite's own error stands
        return None
    others = [pid for pid in pids if pid != os.getpid()]
    if not others or len(others) < len(pids):
        return None
    pid = others[0]
    try:
        name = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    return f"process {pid}" + (f" ({name})" if name else "") if pid > 0 else "another process"


def _flock_pids(device: int, inode: int) -> list[int] | None:
    """Pids of the ``flock`` locks on (``device``, ``inode``), from ``/proc/locks``; None
    where that file does not exist."""
    try:
        lines = Path("/proc/locks").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            try:
                pids.append(int(fields[4]))
            except ValueError:
                pids.append(0)
    return pids
