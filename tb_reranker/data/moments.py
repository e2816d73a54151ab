"""Moment annotations: which span of which video a sentence describes.

>>> moments = load_moments("/data/anet/val_1.json")                    # doctest: +SKIP
>>> moments[0].video_id, moments[0].caption, moments[0].start_s, moments[0].end_s  # doctest: +SKIP

Formats (``format=``; guessed from the content when not given):

``"activitynet"``: ActivityNet Captions JSON, also written by ``tb synth --long``:
    ``{video_id: {"duration": s, "timestamps": [[s, e], ...], "sentences": [...]}}``; one
    Moment per sentence, in file order, ``duration_s`` set. Keys are kept as they are
    (``v_<id>`` in the official files).
``"charades"``: Charades-STA text, one moment a line: ``VIDEO START END##SENTENCE``;
    ``duration_s`` is None (the files do not hold it). Blank lines are skipped.
``"qvhighlights"``: QVHighlights JSONL, one query a line: ``{"qid", "query", "vid",
    "duration", "relevant_windows": [[s, e], ...]}``; one Moment **per window** (nothing is
    lost: a query with three windows gives three Moments with the same ``video_id`` and
    ``caption``; ``metrics.moment_recall`` takes a query's windows together as its ground
    truth, the best one counting, as QVHighlights' own evaluation does).

Times are seconds. Every moment satisfies ``0 <= start_s <= end_s`` and, when the duration is
known, ``end_s <= duration_s``; anything else (a missing field, a non-number, NaN, an empty
sentence) raises :class:`~tb_reranker.errors.InvalidInputError` naming the file and the line
or key. Some public files hold windows that end a little past the duration:
``clip_to_duration=True`` clips those ends to the duration (counted in one log warning)
instead of refusing the file. A file that does not exist raises ``NotFoundError``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tb_reranker.data.base import clean_caption, malformed, parse_json, read_text
from tb_reranker.errors import InvalidInputError

__all__ = ["MOMENT_FORMATS", "Moment", "load_moments"]

logger = logging.getLogger(__name__)

MOMENT_FORMATS = ("activitynet", "charades", "qvhighlights")


@dataclass(frozen=True)
class Moment:
    """A sentence and the span ``[start_s, end_s]`` (seconds) of the video it describes."""

    video_id: str
    caption: str
    start_s: float
    end_s: float
    duration_s: float | None = None  # the video's length, when the annotation gives it


class _Reader:
    """Checks shared by the three formats; ``clipped`` counts ends clipped to the duration."""

    def __init__(self, path: Path, clip_to_duration: bool, text_numbers: bool) -> None:
        self.path = path
        self.clip_to_duration = clip_to_duration
        self.text_numbers = text_numbers
        self.clipped = 0

    def number(self, value: Any, where: str, *, positive: bool = False) -> float:
        """A finite number >= 0 (> 0 when ``positive``); ``where`` names it in the error. A
        string is read as a number only in the text format (Charades-STA)."""
        if isinstance(value, str) and self.text_numbers:
            try:
                if "_" in value:  # float() reads "1_0" as 10
                    raise ValueError(value)
                value = float(value)
            except ValueError:
                raise malformed(self.path, f"{where}: {value!r} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise malformed(self.path, f"{where}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise malformed(self.path, f"{where}: must be a finite number {bound}, got {value!r}")
        return float(value)

    def moment(
        self, video_id: Any, caption: Any, window: Any, duration: float | None, where: str
    ) -> Moment:
        """One checked Moment; ``window`` is ``[start, end]``."""
        if not isinstance(video_id, str) or not video_id.strip():
            raise malformed(self.path, f"{where}: the video id must be a non-empty string")
        text = clean_caption(self.path, caption, where)
        if not text:
            raise malformed(self.path, f"{where}: empty sentence")
        if not isinstance(window, list | tuple) or len(window) != 2:
            raise malformed(self.path, f"{where}: a window must be [start, end], got {window!r}")
        start = self.number(window[0], f"{where} start")
        end = self.number(window[1], f"{where} end")
        if start > end:
            raise malformed(self.path, f"{where}: start {start:g} > end {end:g}")
        if duration is not None and end > duration:
            if not self.clip_to_duration or start > duration:
                raise malformed(
                    self.path, f"{where}: end {end:g} is past the duration {duration:g}"
                )
            end = duration
            self.clipped += 1
        return Moment(video_id.strip(), text, start, end, duration)


def _activitynet(reader: _Reader, text: str) -> list[Moment]:
    data = parse_json(reader.path, text)
    if not isinstance(data, dict):
        raise malformed(reader.path, "expected a JSON object {video_id: {...}}")
    moments: list[Moment] = []
    for video_id, entry in data.items():
        where = f"video {video_id!r}"
        if not isinstance(entry, dict):
            raise malformed(reader.path, f"{where}: expected an object")
        for key in ("duration", "timestamps", "sentences"):
            if key not in entry:
                raise malformed(reader.path, f'{where}: missing "{key}"')
        duration = reader.number(entry["duration"], f"{where} duration", positive=True)
        stamps, sentences = entry["timestamps"], entry["sentences"]
        if not isinstance(stamps, list) or not isinstance(sentences, list):
            raise malformed(reader.path, f'{where}: "timestamps" and "sentences" must be lists')
        if len(stamps) != len(sentences):
            raise malformed(
                reader.path,
                f"{where}: {len(stamps)} timestamps for {len(sentences)} sentences",
            )
        for i, (window, sentence) in enumerate(zip(stamps, sentences, strict=True)):
            moments.append(reader.moment(video_id, sentence, window, duration, f"{where} [{i}]"))
    return moments


def _charades(reader: _Reader, text: str) -> list[Moment]:
    moments: list[Moment] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        head, sep, sentence = line.partition("##")
        fields = head.split()
        if not sep or len(fields) != 3:
            raise malformed(reader.path, f"{where}: expected 'VIDEO START END##SENTENCE'")
        video_id, start, end = fields
        moments.append(reader.moment(video_id, sentence, [start, end], None, where))
    return moments


def _qvhighlights(reader: _Reader, text: str) -> list[Moment]:
    moments: list[Moment] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise malformed(reader.path, f"{where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise malformed(reader.path, f"{where}: expected a JSON object")
        for key in ("query", "vid", "duration", "relevant_windows"):
            if key not in record:
                raise malformed(reader.path, f'{where}: missing "{key}"')
        duration = reader.number(record["duration"], f"{where} duration", positive=True)
        windows = record["relevant_windows"]
        if not isinstance(windows, list) or not windows:
            raise malformed(reader.path, f'{where}: "relevant_windows" must be a non-empty list')
        for i, window in enumerate(windows):
            moments.append(
                reader.moment(record["vid"], record["query"], window, duration, f"{where} [{i}]")
            )
    return moments


_READERS: dict[str, Callable[[_Reader, str], list[Moment]]] = {
    "activitynet": _activitynet,
    "charades": _charades,
    "qvhighlights": _qvhighlights,
}


def _guess(path: Path, text: str) -> str:
    """The format of ``text``: a JSON object with one document -> activitynet, JSON objects
    one a line -> qvhighlights, ``##`` lines -> charades."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise malformed(path, "no moments (the file is empty)")
    if lines[0].lstrip().startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:  # a document then more: JSON lines
            return "qvhighlights" if exc.msg == "Extra data" else "activitynet"
        single_query = isinstance(whole, dict) and "relevant_windows" in whole
        return "qvhighlights" if single_query else "activitynet"
    if "##" in lines[0]:
        return "charades"
    raise malformed(path, f"cannot tell its format: pass format= one of {list(MOMENT_FORMATS)}")


def load_moments(
    path: str | Path, format: str | None = None, *, clip_to_duration: bool = False
) -> list[Moment]:
    """The moments of an annotation file, in file order (module docstring: formats, checks).

    Args:
        path: the annotation file.
        format: ``"activitynet"``, ``"charades"``, ``"qvhighlights"``, or None to guess.
        clip_to_duration: clip ends past the video's duration to it instead of refusing them.

    Raises:
        InvalidInputError: unknown format, or a malformed file (naming the line or key).
        NotFoundError: no such file.
    """
    if format is not None and format not in MOMENT_FORMATS:
        raise InvalidInputError(
            f"unknown moment format {format!r}; choose one of {list(MOMENT_FORMATS)}"
        )
    path = Path(path)
    text = read_text(path)
    format = format or _guess(path, text)
    reader = _Reader(path, clip_to_duration, text_numbers=format == "charades")
    moments = _READERS[format](reader, text)
    if not moments:
        raise malformed(path, "no moments")
    if reader.clipped:
        logger.warning(
            "%s: %d window(s) ended past their video's duration and were clipped to it",
            path,
            reader.clipped,
        )
    return moments
