"""Keep pymilvus from logging tracebacks for failures we handle.

pymilvus logs every failed call at ERROR with a traceback (``pymilvus.decorators``) and a
failed reconnect at WARNING with one (``pymilvus.client.connection_manager``), then raises. Where
``VideoIndex`` turns that exception into one of ours (a missing collection, a request Milvus
rejects, a server that does not answer), the user gets our one-line error, so pymilvus's
traceback is noise, and alarming noise. ``handled_failures(expected)`` drops exactly those
records: only inside the block, only from those two loggers, only when the exception being
logged satisfies ``expected``; they go to our DEBUG log as one line instead (``tb -v``).
Anything else pymilvus logs, and every failure outside such a block, is left as it is.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

__all__ = ["handled_failures", "install", "PYMILVUS_ERROR_LOGGERS"]

log = logging.getLogger(__name__)

PYMILVUS_ERROR_LOGGERS = ("pymilvus.decorators", "pymilvus.client.connection_manager")

_EXPECTED: ContextVar[Callable[[BaseException], bool] | None] = ContextVar(
    "tb_reranker_expected_milvus_failure", default=None
)
_installed = False
_install_lock = threading.Lock()


class _HandledFailureFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        expected = _EXPECTED.get()
        if expected is None or record.levelno < logging.WARNING:
            return True
        # pymilvus logs from inside its ``except`` block (exc_info not attached for the ERROR)
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        try:
            handled = exc is not None and expected(exc)
        except Exception:  # noqa: BLE001 - a classifier failure must not hide the record
            handled = False
        if not handled:
            return True
        first_line = record.getMessage().split("\n", 1)[0]
        log.debug("pymilvus %s (handled): %s", record.levelname, first_line)
        return False


def install() -> None:
    """Attach the filter to pymilvus's loggers (once; it passes everything outside a block)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        shared = _HandledFailureFilter()
        for name in PYMILVUS_ERROR_LOGGERS:
            logging.getLogger(name).addFilter(shared)
        _installed = True


@contextlib.contextmanager
def handled_failures(expected: Callable[[BaseException], bool]) -> Iterator[None]:
    """Within the block (this thread or task), pymilvus's error logs for an exception that
    ``expected(exc)`` accepts are dropped: the caller handles that exception."""
    install()
    token = _EXPECTED.set(expected)
    try:
        yield
    finally:
        _EXPECTED.reset(token)
