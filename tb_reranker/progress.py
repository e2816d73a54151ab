"""Progress of long loops: a tqdm bar on a terminal, a log line every few seconds elsewhere.

A tqdm bar redraws itself with carriage returns; written into a file or a pipe (CI logs,
``make demo | tee``) that is hundreds of kilobytes of one line rewritten. ``progress()`` draws
the bar only when stderr is a terminal; otherwise it logs ``<desc>: <n>/<total> <unit> (<rate>)``
on the ``tb_reranker.progress`` logger at most once every ``TB_PROGRESS_INTERVAL_S`` seconds
(default 10), and a last line when a loop that logged finishes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tb_reranker.config import env
from tb_reranker.errors import InvalidInputError

__all__ = ["Progress", "progress", "DEFAULT_INTERVAL_S"]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


class Progress:
    """The part of tqdm's interface the library uses: iterate, ``update``, ``set_postfix``,
    ``close``. This base class shows nothing (progress off); ``_LogProgress`` logs."""

    def __init__(self, iterable: Iterable[Any] | None = None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError("this progress has no iterable")
        for item in self._iterable:
            yield item
            self.update(1)
        self.close()  # like tqdm: an exhausted loop is over

    def update(self, n: int = 1) -> None:
        """``n`` more items done."""

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (e.g. the loss)."""

    def close(self) -> None:
        """The loop is over."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LogProgress(Progress):
    def __init__(
        self,
        iterable: Iterable[Any] | None,
        *,
        total: int | None,
        desc: str,
        unit: str,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(iterable)
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.unit = total, desc, unit
        self.interval_s, self._clock = interval_s, clock
        self.n = 0
        self._started = self._last = clock()
        self._postfix = ""
        self._logged = False
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total is not None and self.n >= self.total:
            return  # the last line is close()'s
        now = self._clock()
        if now - self._last >= self.interval_s:
            self._log(now)

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._logged:  # a loop too short to log anything stays silent at the end too
            self._log(self._clock(), done=True)

    def _log(self, now: float, done: bool = False) -> None:
        elapsed = now - self._started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        extra = f", {self._postfix}" if self._postfix else ""
        state = f"done in {elapsed:.1f} s" if done else f"{elapsed:.0f} s"
        log.info(
            "%s: %s %s (%.1f %s/s, %s%s)",
            self.desc,
            count,
            self.unit,
            rate,
            self.unit,
            state,
            extra,
        )
        self._last = now
        self._logged = True


def interval_from_env() -> float:
    """``TB_PROGRESS_INTERVAL_S`` (seconds between log lines off a terminal), default 10."""
    raw = env("PROGRESS_INTERVAL_S")
    if raw is None:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise InvalidInputError(f"TB_PROGRESS_INTERVAL_S must be a positive number, got {raw!r}")
    return value


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
) -> Any:
    """A progress display for a loop over ``iterable`` (or ``update``-driven with ``total``).

    Off (``enabled=False``): nothing shown. On a terminal (stderr is a TTY): a tqdm bar.
    Elsewhere: a log line at most every ``TB_PROGRESS_INTERVAL_S`` seconds.
    """
    if not enabled:
        return Progress(iterable)
    stream = sys.stderr
    if stream is not None and hasattr(stream, "isatty") and stream.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return _LogProgress(iterable, total=total, desc=desc, unit=unit, interval_s=interval_from_env())
