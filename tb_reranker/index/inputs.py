"""What to ingest: files, directories, globs and ``@list.txt`` files → paths → video ids."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from tb_reranker.errors import InvalidInputError
from tb_reranker.stores import validate_video_id

__all__ = ["VIDEO_EXTENSIONS", "expand_paths", "video_ids_for"]

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ts",
        ".flv",
        ".wmv",
        ".3gp",
        ".gif",
    }
)
_GLOB_CHARS = frozenset("*?[")


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _videos_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and _is_video(p))


class _Expansion:
    """One ``expand_paths`` call: the paths found (input order, no duplicates) and problems."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.problems: list[tuple[str, str]] = []
        self._seen: set[str] = set()
        self._lists_seen: set[str] = set()

    def _add(self, path: Path) -> None:
        key = str(path.resolve())
        if key not in self._seen:
            self._seen.add(key)
            self.paths.append(str(path))

    def expand(self, item: str, base: Path | None) -> None:
        if item.startswith("@"):
            self._list_file(item, base)
            return
        path = Path(item).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if any(c in item for c in _GLOB_CHARS) and not path.exists():
            self._pattern(item, path)
        elif path.is_dir():
            files = _videos_under(path)
            if not files:
                self.problems.append((item, "directory holds no video file"))
            for f in files:
                self._add(f)
        elif path.exists():
            self._add(path)
        else:
            self.problems.append((str(path), "no such file"))

    def _pattern(self, item: str, path: Path) -> None:
        matches = [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
        files = [m for m in matches if m.is_file()]
        for directory in (m for m in matches if m.is_dir()):
            files.extend(_videos_under(directory))
        if not files:
            self.problems.append((item, "pattern matches no file"))
        for f in files:
            self._add(f)

    def _list_file(self, item: str, base: Path | None) -> None:
        list_file = Path(item[1:])
        if base is not None and not list_file.is_absolute():
            list_file = base / list_file
        key = str(list_file.resolve())
        if key in self._lists_seen:
            self.problems.append((item, "list file includes itself (directly or not): skipped"))
            return
        self._lists_seen.add(key)
        try:
            if list_file.exists() and not list_file.is_file():
                raise ValueError("not a regular file")
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            self.problems.append((item, f"cannot read list file: {exc.strerror or exc}"))
            return
        except ValueError as exc:  # UnicodeDecodeError included
            self.problems.append((item, f"cannot read list file: {exc}"))
            return
        entries = [line.strip() for line in lines]
        entries = [e for e in entries if e and not e.startswith("#")]
        if not entries:
            self.problems.append((item, "list file holds no entries"))
        for entry in entries:
            self.expand(entry, list_file.parent)


def expand_paths(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, directories (recursive, video extensions), globs and ``@list.txt`` files.

    A list file holds one input per line (blank lines and ``#`` comments skipped); relative
    entries are relative to the list file's directory. Returns ``(paths, problems)`` where
    ``problems`` are ``(input, reason)`` for inputs that match nothing. Paths keep input order,
    duplicates (same resolved file) removed.
    """
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    expansion = _Expansion()
    for raw in inputs:
        expansion.expand(os.fspath(raw), None)
    return expansion.paths, expansion.problems


def video_ids_for(
    paths: Sequence[str],
    ids: Mapping[str, str] | Callable[[str], str] | None = None,
) -> list[str]:
    """Video id of each path: the file stem, or ``ids[path]`` / ``ids(path)``.

    Raises:
        InvalidInputError: an invalid id (listing them all), or two paths with the same id.
    """
    out: list[str] = []
    bad: list[str] = []
    for path in paths:
        if ids is None:
            video_id = Path(path).stem
        elif callable(ids):
            video_id = ids(path)
        else:
            video_id = ids.get(path, ids.get(str(Path(path).resolve()), Path(path).stem))
        try:
            validate_video_id(video_id)
        except InvalidInputError:
            bad.append(f"{path} -> {video_id!r}")
        out.append(video_id)
    if bad:
        raise InvalidInputError(
            "invalid video ids (use letters, digits and ._:- , or pass an id mapping): "
            + "; ".join(bad[:20])
            + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else "")
        )
    by_id: dict[str, list[str]] = {}
    for path, video_id in zip(paths, out, strict=True):
        by_id.setdefault(video_id, []).append(path)
    dupes = {i: p for i, p in by_id.items() if len(p) > 1}
    if dupes:
        listed = "; ".join(f"{i}: {', '.join(p)}" for i, p in list(dupes.items())[:20])
        raise InvalidInputError(f"several files map to the same video id: {listed}")
    return out
