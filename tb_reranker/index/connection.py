"""The pymilvus client of one collection: connecting, every call, and its errors mapped to ours.

:class:`MilvusConnection` opens a ``pymilvus.MilvusClient`` (a Milvus Lite database directory is
checked first, :func:`tb_reranker.index.lite.check_lite_database`) and runs every call through
:meth:`MilvusConnection.call`: with the timeout, without pymilvus's traceback for the failures
we report ourselves (:func:`tb_reranker.index.milvus_logs.handled_failures`), and with its
exceptions mapped to ours:

- a collection that does not exist: :class:`NotFoundError`;
- a malformed request (bad filter, wrong dimension): :class:`InvalidInputError`;
- anything else (Milvus stopped, unreachable, timed out, failed): :class:`IndexUnavailableError`.

For Milvus Lite it also remembers which database directory it opened (device and inode), so a
database removed or replaced since is noticed (:meth:`MilvusConnection.check_database`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tb_reranker.errors import IndexUnavailableError, InvalidInputError, NotFoundError, TBError
from tb_reranker.index.milvus_logs import handled_failures
from tb_reranker.index.schema import is_lite_uri

__all__ = [
    "LITE_GRPC_OPTIONS",
    "MilvusConnection",
    "consistency",
    "is_handled",
    "is_invalid_input",
    "is_missing_collection",
    "is_unavailable",
    "lite_path",
]

log = logging.getLogger(__name__)

# Milvus Lite 3.2's in-process gRPC server keeps gRPC's default keepalive policy (a ping without
# data at most every 5 min, GOAWAY "too_many_pings" after two early ones), while pymilvus pings
# every 10 s even with no call in flight; a shared Lite channel then dies now and then
# (UNAVAILABLE "Too many pings", seen in the test suite). A local server needs no idle pings.
LITE_GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": 0}

# MilvusException codes that mean "the request is malformed" (the caller's fault, not Milvus's):
# 1100 ParameterInvalid (server 2.3+); 5 IllegalArgument (legacy ErrorCode); 6 is what Milvus
# Lite 3.x sends for a filter it cannot parse or type-check ("unterminated string literal at
# column 7", "expected ')'", "comparison between incompatible types").
_INVALID_INPUT_CODES = frozenset({5, 6, 1100})
_INVALID_INPUT_MARKERS = (
    "cannot parse expression",
    "invalid expression",
    "failed to create query plan",
    "unexpected token",
    "unterminated string",
    "syntax error",
    "parse",
)


def is_invalid_input(exc: Exception) -> bool:
    """Milvus rejected the request as malformed: our ``InvalidInputError``."""
    from pymilvus.exceptions import (
        DataNotMatchException,
        DataTypeNotMatchException,
        MilvusException,
        ParamError,
    )

    if isinstance(exc, ParamError | DataNotMatchException | DataTypeNotMatchException):
        return True
    code = getattr(exc, "code", None)
    if isinstance(exc, MilvusException) and code in _INVALID_INPUT_CODES:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _INVALID_INPUT_MARKERS)


def is_missing_collection(exc: Exception) -> bool:
    """The collection does not exist: our ``NotFoundError``."""
    from pymilvus.exceptions import CollectionNotExistException

    if isinstance(exc, CollectionNotExistException) or getattr(exc, "code", None) == 100:
        return True
    text = str(exc).lower()
    return "collection" in text and ("not exist" in text or "not found" in text)


def is_unavailable(exc: BaseException) -> bool:
    """Milvus did not answer (stopped, unreachable, timed out): our ``IndexUnavailableError``."""
    import grpc
    from pymilvus.exceptions import MilvusException

    if isinstance(exc, grpc.FutureTimeoutError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    text = str(exc).lower()
    return isinstance(exc, MilvusException) and (
        "fail connecting to server" in text or "server unavailable" in text
    )


def is_handled(exc: BaseException) -> bool:
    """The failures :meth:`MilvusConnection.call` expects and reports as a typed error of its
    own, so that pymilvus's traceback for them is not logged (``milvus_logs.handled_failures``)."""
    if not isinstance(exc, Exception):
        return False
    return is_missing_collection(exc) or is_invalid_input(exc) or is_unavailable(exc)


def lite_path(uri: str) -> str:
    """The absolute path of a Milvus Lite URI (``./x.db``, ``~/x.db``, ``file:///x.db``)."""
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def consistency(level: str | None) -> dict[str, Any]:
    """The ``consistency_level`` keyword of a pymilvus call (none: the collection's level)."""
    return {"consistency_level": level} if level else {}


def _directory_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of ``path``; None when it does not exist."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class MilvusConnection:
    """One ``pymilvus.MilvusClient`` used for one collection.

    Args:
        uri: a file path (Milvus Lite) or ``http://host:19530`` (server).
        token: ``user:password`` or API key for a server ("" for none / Lite).
        collection: the collection name (named in errors).
        timeout: seconds for every call.

    Raises:
        InvalidInputError: a Lite path where no database directory can be.
        IndexUnavailableError: Milvus cannot be reached, or another process holds the Lite database.
    """

    def __init__(self, uri: str, *, token: str, collection: str, timeout: float) -> None:
        self.uri = uri
        self.collection = collection
        self.timeout = timeout
        self.is_lite = is_lite_uri(uri)
        # where, in messages: a Lite database as its absolute path, a server as its URI
        self.where = lite_path(uri) if self.is_lite else uri
        self.client = self._connect(token)
        # the Lite directory this connection opened (None for a server)
        self._database_id = _directory_identity(self.where) if self.is_lite else None

    def _connect(self, token: str) -> Any:
        if self.is_lite:  # a path Lite cannot open, or another process's: one clear line
            from tb_reranker.index.lite import check_lite_database

            check_lite_database(self.where)
        try:
            from pymilvus import MilvusClient

            options = {"grpc_options": LITE_GRPC_OPTIONS} if self.is_lite else {}
            with handled_failures(is_unavailable):
                return MilvusClient(uri=self.uri, token=token, timeout=self.timeout, **options)
        except Exception as exc:  # noqa: BLE001
            raise IndexUnavailableError(f"cannot connect to Milvus at {self.where}: {exc}") from exc

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one pymilvus call with the timeout, mapping its errors to ours."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            with handled_failures(is_handled):  # no pymilvus traceback for what we map below
                return fn(*args, **kwargs)
        except TBError:
            raise
        except Exception as exc:  # noqa: BLE001 - pymilvus/grpc raise many types
            if is_missing_collection(exc):
                raise NotFoundError(
                    f"Milvus collection {self.collection!r} does not exist at {self.where} "
                    "(create it with `tb collection create` or by ingesting videos)"
                ) from exc
            if is_invalid_input(exc):
                raise InvalidInputError(f"Milvus rejected {what}: {exc}") from exc
            raise IndexUnavailableError(f"Milvus {what} failed at {self.where}: {exc}") from exc

    def check_database(self) -> None:
        """Milvus Lite: ``NotFoundError`` when the database directory opened was removed or
        replaced since. A server: nothing to check."""
        if not self.is_lite:
            return
        now = _directory_identity(self.where)
        if now is not None and now == self._database_id:
            return
        what = "removed" if now is None else "replaced by another database"
        raise NotFoundError(
            f"Milvus Lite database {self.where} was {what} after this process opened it"
        )

    def release_database(self) -> None:
        """Close and, for Milvus Lite, stop this process's server of the path (every client of
        the path shares it)."""
        self.close()
        if not self.is_lite:
            return
        try:
            from milvus_lite.server_manager import server_manager_instance
        except ImportError:  # pragma: no cover - milvus-lite ships with pymilvus here
            return
        server_manager_instance.release_server(self.uri)  # the key pymilvus started it with

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - closing twice or a dead server is fine
            log.debug("closing Milvus client failed", exc_info=True)
