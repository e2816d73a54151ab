"""How a video is cut into segments (moments): the spec and the pure planning rules.

``SegmentSpec.parse`` reads ``shots`` | ``fixed:LEN[,OVERLAP]`` | ``none`` (seconds).
:func:`plan_segments` turns detected cut times and a duration into ``(start_s, end_s)``
segments; :class:`ShotPlanner` is the same rule run online (cut by cut, as a decode pass finds
them), which is how :mod:`tb_reranker.video.segment` uses it with bounded memory.

Shot rule (``shots``), times in seconds from the first frame:
    * a video shorter than ``min_s`` is one segment ``[0, duration]`` (short clips stay as today);
    * a cut less than ``min_s`` after the open segment's start is ignored: the short shot merges
      with the next one; a short remainder at the very end merges with the previous segment;
    * a shot longer than ``max_s`` is split: ``max_s`` windows while more than ``2 × max_s`` is
      left, then the rest (in ``(max_s, 2 × max_s)``) in two equal halves. Exactly even windows
      would need the shot's full length before its first window closes (unbounded memory on an
      hour-long static shot); this rule needs ``2 × max_s`` of look-ahead at most.
    Every segment is then in ``[min_s, max_s]`` (given ``max_s >= 2 × min_s``), except the short
    video, and the segments cover ``[0, duration]`` in order without gaps.

Whole files: :meth:`SegmentSpec.keeps_whole` says which videos are not cut at all (no longer
than the longest segment the spec makes: ``max_s``, 30 s by default); ingest and the moment
evaluation both ask it before cutting.

Defaults: ``min_s = 2`` s (shorter moments carry too little for T = 12 frames and a caption to
match; it also absorbs flashes and dissolves that the detector reports as several cuts) and
``max_s = 30`` s (long enough for one described action, short enough that 12 frames still sample
it every 2.5 s).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from tb_reranker.errors import InvalidInputError, printable

__all__ = [
    "DEFAULT_MAX_SEGMENT_S",
    "DEFAULT_MIN_SEGMENT_S",
    "SegmentSpec",
    "ShotPlanner",
    "plan_segments",
]

DEFAULT_MIN_SEGMENT_S = 2.0
DEFAULT_MAX_SEGMENT_S = 30.0
# Bounds on what a spec may ask for: no window or segment above an hour, no window below half a
# second (and no window step below it either: fixed:10,9.999 would make 10,000 windows a second).
LONGEST_S = 3600.0
SHORTEST_S = 0.5
MODES = ("shots", "fixed", "none")

Span = tuple[float, float]  # (start_s, end_s), seconds from the first frame


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else printable(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _seconds(value: object, what: str) -> float:
    if isinstance(value, bool):
        raise InvalidInputError(f"{what} must be a number of seconds, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(
            f"{what} must be a number of seconds, got {_shown(value)}"
        ) from None
    if not math.isfinite(number):
        raise InvalidInputError(f"{what} must be finite, got {_shown(value)}")
    return number


@dataclass(frozen=True)
class SegmentSpec:
    """How to cut a video into segments.

    ``mode``: ``shots`` (detected shot cuts, merged/split into ``[min_s, max_s]``), ``fixed``
    (windows of ``length_s`` seconds overlapping by ``overlap_s``) or ``none`` (the whole video,
    exactly as :func:`~tb_reranker.video.decode_video`). Seconds throughout.
    """

    mode: str = "shots"
    length_s: float = 0.0  # fixed windows only
    overlap_s: float = 0.0  # fixed windows only
    min_s: float = DEFAULT_MIN_SEGMENT_S  # shots only
    max_s: float = DEFAULT_MAX_SEGMENT_S  # shots only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInputError(
                f"segment spec: mode must be one of {', '.join(MODES)}, got {_shown(self.mode)}"
            )
        if self.mode == "fixed":
            self._check_fixed()
        if self.mode == "shots":
            self._check_shots()

    def _check_fixed(self) -> None:
        length = _seconds(self.length_s, "segment spec: window length")
        overlap = _seconds(self.overlap_s, "segment spec: overlap")
        if not SHORTEST_S <= length <= LONGEST_S:
            raise InvalidInputError(
                f"segment spec: window length must be in [{SHORTEST_S:g}, {LONGEST_S:g}] s, "
                f"got {length:g}"
            )
        if overlap < 0 or overlap >= length:
            raise InvalidInputError(
                f"segment spec: overlap must be >= 0 and < the window length {length:g} s, "
                f"got {overlap:g}"
            )
        if length - overlap < SHORTEST_S:
            raise InvalidInputError(
                f"segment spec: window step (length - overlap) must be >= {SHORTEST_S:g} s, "
                f"got {length - overlap:g}"
            )

    def _check_shots(self) -> None:
        low = _seconds(self.min_s, "segment spec: minimum segment length")
        high = _seconds(self.max_s, "segment spec: maximum segment length")
        if not SHORTEST_S <= low <= LONGEST_S / 2:
            raise InvalidInputError(
                f"segment spec: minimum segment length must be in [{SHORTEST_S:g}, "
                f"{LONGEST_S / 2:g}] s, got {low:g}"
            )
        if not 2 * low <= high <= LONGEST_S:
            raise InvalidInputError(
                f"segment spec: maximum segment length must be in [2 x minimum = {2 * low:g}, "
                f"{LONGEST_S:g}] s, got {high:g}"
            )

    @classmethod
    def parse(cls, text: str) -> SegmentSpec:
        """``shots`` | ``fixed:LEN[,OVERLAP]`` | ``none`` -> a spec (e.g. ``fixed:10,2``).

        Raises:
            InvalidInputError: anything else, in one line naming the value.
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"segment spec must be a string, got {type(text).__name__}")
        mode, sep, args = text.strip().partition(":")
        mode = mode.strip().lower()
        if mode in ("shots", "none") and not sep:
            return cls(mode=mode)
        if mode == "fixed" and sep:
            parts = args.split(",")
            if 1 <= len(parts) <= 2:
                length = _seconds(parts[0].strip(), "segment spec: window length")
                overlap = (
                    _seconds(parts[1].strip(), "segment spec: overlap") if len(parts) == 2 else 0.0
                )
                return cls(mode="fixed", length_s=length, overlap_s=overlap)
        raise InvalidInputError(
            f"segment spec must be 'shots', 'fixed:LEN[,OVERLAP]' or 'none' (seconds), "
            f"got {_shown(text)}"
        )

    @property
    def max_segment_s(self) -> float:
        """The longest segment this spec makes: ``max_s`` (shots), the window length (fixed),
        unbounded (``none``: the whole video)."""
        if self.mode == "shots":
            return self.max_s
        return self.length_s if self.mode == "fixed" else math.inf

    def keeps_whole(self, duration_s: float) -> bool:
        """The one rule of what gets cut, shared by ingest and the moment evaluation: a video
        no longer than :attr:`max_segment_s` (30 s for the default ``shots``) is one segment
        ``[0, duration_s]``; a longer one is cut per the spec.

        Raises:
            InvalidInputError: a negative, NaN or infinite duration.
        """
        duration = _seconds(duration_s, "duration")
        if duration < 0:
            raise InvalidInputError(f"duration must be >= 0 s, got {duration:g}")
        return duration <= self.max_segment_s

    def __str__(self) -> str:
        if self.mode == "fixed":
            return f"fixed:{self.length_s:g},{self.overlap_s:g}"
        return self.mode


class ShotPlanner:
    """The shot rule, online: feed cut times in increasing order (:meth:`cut`), the decode
    position (:meth:`advance`) and the end (:meth:`finish`); each returns the segments that
    became final, in order. ``open_start`` is where the segment being built begins and
    ``keep_from`` the earliest time a later segment can still include (frames before it may be
    dropped)."""

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.open_start = 0.0
        self._pending: Span | None = None  # emitted last; a short tail may still extend it

    @property
    def keep_from(self) -> float:
        return self._pending[0] if self._pending is not None else self.open_start

    def _emit(self, span: Span) -> list[Span]:
        final = [self._pending] if self._pending is not None else []
        self._pending = span
        return final

    def advance(self, now: float) -> list[Span]:
        """The decode reached ``now`` without a cut since the last call."""
        out: list[Span] = []
        while now - self.open_start >= 2 * self.max_s:
            out += self._emit((self.open_start, self.open_start + self.max_s))
            self.open_start += self.max_s
        if self._pending is not None and now - self.open_start >= self.min_s:
            out.append(self._pending)  # the open segment is long enough: no tail will merge
            self._pending = None
        return out

    def _close(self, end: float) -> list[Span]:
        start = self.open_start
        if end - start <= self.max_s:
            out = self._emit((start, end))
        else:  # (max_s, 2 x max_s): two equal halves
            middle = start + (end - start) / 2
            out = self._emit((start, middle)) + self._emit((middle, end))
        self.open_start = end
        return out

    def cut(self, t: float) -> list[Span]:
        """A shot cut at ``t`` (the first frame of the new shot)."""
        out = self.advance(t)
        if t - self.open_start < self.min_s:
            return out  # a short shot: merges with the next one
        return out + self._close(t)

    def finish(self, end: float) -> list[Span]:
        """The video ends at ``end``: every remaining segment, final."""
        out = self.advance(end)
        if end - self.open_start >= self.min_s or self._pending is None:
            out += self._close(end) if end > self.open_start else []
            if self._pending is None and not out:
                out = self._emit((self.open_start, end))  # an empty video: [0, 0]
        else:  # a short tail merges with the previous segment
            self.open_start = self._pending[0]
            self._pending = None
            out += self._close(end)
        if self._pending is not None:
            out.append(self._pending)
            self._pending = None
        return out


def fixed_windows(duration: float, length_s: float, overlap_s: float) -> list[Span]:
    """Windows of ``length_s`` starting every ``length_s - overlap_s``; the last one ends at
    ``duration`` (shifted back to full length when it can be); one ``[0, duration]`` if shorter."""
    step = length_s - overlap_s
    windows: list[Span] = []
    k = 0
    while k * step + length_s < duration:
        windows.append((k * step, k * step + length_s))
        k += 1
    last = (max(0.0, duration - length_s), duration)
    if not windows or windows[-1] != last:
        windows.append(last)
    return windows


def plan_segments(cuts: Iterable[float], duration: float, spec: SegmentSpec) -> list[Span]:
    """Detected cut times + the video's duration -> ``(start_s, end_s)`` segments, in order.

    Args:
        cuts: shot-cut times in seconds (any order; those outside ``(0, duration)`` are ignored).
        duration: seconds, finite and >= 0.
        spec: the mode and its lengths (see the module docstring for the rules).

    Raises:
        InvalidInputError: a negative, NaN or infinite duration or cut.
    """
    duration = _seconds(duration, "duration")
    if duration < 0:
        raise InvalidInputError(f"duration must be >= 0 s, got {duration:g}")
    times = sorted({_seconds(t, "cut time") for t in cuts})
    if spec.mode == "none":
        return [(0.0, duration)]
    if spec.mode == "fixed":
        return fixed_windows(duration, spec.length_s, spec.overlap_s)
    planner = ShotPlanner(spec.min_s, spec.max_s)
    segments: list[Span] = []
    for t in times:
        if 0 < t < duration:
            segments += planner.cut(t)
    return segments + planner.finish(duration)
