"""Numbers at the edge: one range check for every numeric setting a user or a caller gives.

A :class:`Bound` says what a setting accepts (integer or real, lowest and highest value, finite
always). :meth:`Bound.check` is the SDK's and the config's check (``InvalidInputError``, a
``ValueError``, naming the setting); :meth:`Bound.parse` reads a string (a flag, a ``TB_*``
variable) and is the ``argparse`` ``type=`` of every numeric flag (the CLI's exit 2 with one
line). ``inf``, ``nan``, booleans and out-of-range values
are refused everywhere, before they reach a socket, a timer or a thread pool. Standard library
only.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from tb_reranker.errors import InvalidInputError

__all__ = [
    "Bound",
    "NumberError",
    "MAX_INT32",
    "PORT",
    "PORT_OR_OFF",
    "POSITIVE_INT",
    "COUNT",
    "SECONDS",
    "THREADS",
    "CPUS",
    "WORKERS",
    "SEED",
    "REAL",
    "RATE",
    "FRACTION",
]

MAX_INT32 = 2**31 - 1  # gRPC's int options and the uint32 fields of the wire stay below it


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting accepts: ``low <= value <= high`` (``low_open``:
    ``low < value``), finite, an ``int`` when ``integer``."""

    low: float
    high: float
    integer: bool = True
    low_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"> {_text(self.low)}" if self.low_open else f">= {_text(self.low)}"
        return f"{kind} {low} and <= {_text(self.high)}"

    def _problem(self, value: Any) -> str | None:
        """Why ``value`` is refused (None: accepted)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be {self.describe()}"
        if not math.isfinite(value):
            return f"must be finite ({self.describe()})"
        if self.integer and not (isinstance(value, int) or float(value).is_integer()):
            return f"must be {self.describe()}"
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high:
            return f"must be {self.describe()}"
        return None

    def check(self, value: Any, name: str) -> Any:
        """``value`` as an ``int`` (integer bounds) or ``float``; ``InvalidInputError`` naming
        ``name`` otherwise."""
        problem = self._problem(value)
        if problem is not None:
            raise InvalidInputError(f"{name} {problem}, got {value!r}")
        return int(value) if self.integer else float(value)

    def parse(self, text: str) -> Any:
        """A command-line or environment string → the checked number. Usable as an
        ``argparse`` ``type=``: the error is both ``ArgumentTypeError`` and ``ValueError``."""
        raw = str(text).strip()
        try:
            value: Any = int(raw) if self.integer else float(raw)
        except ValueError:
            raise NumberError(f"{text!r} is not {self.describe()}") from None
        problem = self._problem(value)
        if problem is not None:
            raise NumberError(f"{text!r}: {problem}")
        return value


def _text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class NumberError(argparse.ArgumentTypeError, ValueError):
    """A string that is not a number in range (argparse prints it as the one error line)."""


PORT = Bound(0, 65535)  # a TCP port; 0 = any free port
PORT_OR_OFF = Bound(-1, 65535)  # -1 = off
POSITIVE_INT = Bound(1, MAX_INT32)
COUNT = Bound(0, MAX_INT32)  # a size that may be 0 (off, none)
SECONDS = Bound(0, 7 * 24 * 3600, integer=False, low_open=True)  # a timeout: > 0, at most a week
THREADS = Bound(1, 1024)
CPUS = Bound(0, 1024, integer=False, low_open=True)  # CPUs a task reserves (a fraction: shares one)
WORKERS = Bound(0, 1024)  # 0: the command's own meaning (in process, one per CPU)
SEED = Bound(0, 2**32 - 1)  # numpy's seed range
REAL = Bound(0, 1e9, integer=False)  # a non-negative setting (weight decay, clip, scale)
RATE = Bound(0, 10, integer=False, low_open=True)  # a learning rate
FRACTION = Bound(0, 1, integer=False)
