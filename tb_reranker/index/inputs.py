"""What to ingest: files, directories, globs and ``@list.txt`` files → paths → video ids."""

from __future__ import annotations

import fnmatch
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tb_reranker.errors import InvalidInputError, printable
from tb_reranker.s3 import is_s3_url
from tb_reranker.stores import validate_video_id
from tb_reranker.video.sources import VIDEO_EXTENSIONS, ListingError, list_videos

__all__ = ["VIDEO_EXTENSIONS", "assign_ids", "expand_paths", "video_ids_for"]

_GLOB_CHARS = frozenset("*?[")


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _real_key(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` leads to (symlinks followed); None if unreadable."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _subdirs_and_files(directory: Path, hidden: bool = True) -> tuple[list[Path], list[Path]]:
    """(directories, regular files) in ``directory``, symlinks followed; [] when unreadable."""
    dirs: list[Path] = []
    files: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return dirs, files
    for entry in entries:
        if not hidden and entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                dirs.append(Path(entry.path))
            elif entry.is_file():
                files.append(Path(entry.path))
        except OSError:  # a broken symlink, a vanished entry
            continue
    return dirs, files


def _videos_under(directory: Path) -> list[Path]:
    """Every video file under ``directory`` (hidden ones included), symlinks followed, each real
    directory walked at most once (a link back up, ``a/up -> ..``, would otherwise make the walk endless)."""
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    queue = deque([directory])  # breadth first: a directory is named by its shortest path
    while queue:
        current = queue.popleft()
        key = _real_key(current)
        if key is None or key in seen:
            continue
        seen.add(key)
        dirs, files = _subdirs_and_files(current)
        found.extend(f for f in files if _is_video(f))
        queue.extend(sorted(dirs))
    return sorted(found)


def _glob(pattern: str) -> list[Path]:
    """``glob.glob(pattern, recursive=True)`` without its endless walks: ``**`` visits each
    real directory at most once per pattern position, however symlinks loop."""
    parts = Path(pattern).parts
    if not parts:
        return []
    anchor = Path(parts[0]) if Path(pattern).is_absolute() else Path()
    rest = list(parts[1:] if Path(pattern).is_absolute() else parts)
    matches: set[Path] = set()
    visited: set[tuple[tuple[int, int], int]] = set()
    stack: list[tuple[Path, int]] = [(anchor, 0)]
    while stack:
        current, position = stack.pop()
        if position == len(rest):
            matches.add(current)
            continue
        part = rest[position]
        if part == "**":
            key = _real_key(current)
            if key is None or (key, position) in visited:
                continue
            visited.add((key, position))
            stack.append((current, position + 1))  # ** matches no directory too
            dirs, files = _subdirs_and_files(current, hidden=False)
            stack.extend((d, position) for d in dirs)
            if position + 1 == len(rest):  # a final ** matches files too
                matches.update(files)
        elif not any(c in part for c in _GLOB_CHARS):
            if os.path.lexists(current / part):
                stack.append((current / part, position + 1))
        else:
            dirs, files = _subdirs_and_files(current, hidden=part.startswith("."))
            last = position + 1 == len(rest)
            for entry in dirs + (files if last else []):
                if fnmatch.fnmatchcase(entry.name, part):
                    stack.append((entry, position + 1))
    return sorted(m for m in matches if m != Path() or pattern in (".", ""))


class _Expansion:
    """One ``expand_paths`` call: the paths found (input order, no duplicates) and problems."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.problems: list[tuple[str, str]] = []
        self._seen: set[str] = set()
        self._lists_seen: set[str] = set()

    def _add(self, path: Path | str) -> None:
        key = path if isinstance(path, str) else str(path.resolve())  # an s3:// url is its key
        if key not in self._seen:
            self._seen.add(key)
            self.paths.append(str(path))

    def expand(self, item: str, base: Path | None) -> None:
        if item.startswith("@"):
            self._list_file(item, base)
            return
        if is_s3_url(item):
            self._s3(item)
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

    def _s3(self, item: str) -> None:
        try:
            urls = list_videos(item)
        except ListingError as exc:
            self.problems.append((item, str(exc)))
            return
        if not urls:
            self.problems.append((item, "no video object at or under this S3 prefix"))
        for url in urls:
            self._add(url)

    def _pattern(self, item: str, path: Path) -> None:
        matches = _glob(str(path))
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
    """Expand files, directories (recursive, video extensions), globs, ``s3://bucket/prefix``
    urls (the video objects under the prefix, or the one object named) and ``@list.txt`` files.

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


def assign_ids(
    paths: Sequence[str],
    ids: Mapping[str, str] | Callable[[str], str] | None = None,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(video id, path)`` of each path whose id is valid, and ``(path, reason)`` of each file
    whose own name makes an invalid id (it fails alone: the others are ingested).

    The id is ``ids[path]`` / ``ids(path)`` when given, else the file stem.

    Raises:
        InvalidInputError: an invalid id given by ``ids`` (listing them all: the caller's
            mapping is wrong), or two paths with the same id.
    """
    videos: list[tuple[str, str]] = []
    failed: list[tuple[str, str]] = []
    bad: list[str] = []
    for path in paths:
        given = _given_id(path, ids)
        video_id = Path(path).stem if given is None else given
        try:
            validate_video_id(video_id)
        except InvalidInputError:
            if given is None:
                failed.append((path, f"invalid video id {video_id!r} (the file name): {_ID_RULE}"))
            else:
                bad.append(f"{printable(path)} -> {video_id!r}")
            continue
        videos.append((video_id, path))
    if bad:
        raise InvalidInputError(
            f"invalid video ids ({_ID_RULE}): "
            + "; ".join(bad[:20])
            + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else "")
        )
    by_id: dict[str, list[str]] = {}
    for video_id, path in videos:
        by_id.setdefault(video_id, []).append(path)
    dupes = {i: p for i, p in by_id.items() if len(p) > 1}
    if dupes:
        listed = "; ".join(
            f"{i}: {', '.join(map(printable, p))}" for i, p in list(dupes.items())[:20]
        )
        raise InvalidInputError(f"several files map to the same video id: {listed}")
    return videos, failed


_ID_RULE = "use letters, digits and ._:- , or pass an id mapping"


def _given_id(path: str, ids: Mapping[str, str] | Callable[[str], str] | None) -> Any:
    """The id ``ids`` gives ``path`` (None: none given, the stem is used)."""
    if ids is None:
        return None
    if callable(ids):
        return ids(path)
    return ids.get(path, ids.get(str(Path(path).resolve())))


def video_ids_for(
    paths: Sequence[str],
    ids: Mapping[str, str] | Callable[[str], str] | None = None,
) -> list[str]:
    """Video id of each path: the file stem, or ``ids[path]`` / ``ids(path)``.

    Raises:
        InvalidInputError: an invalid id (listing them all), or two paths with the same id.
    """
    videos, failed = assign_ids(paths, ids)
    if failed:
        raise InvalidInputError(
            "invalid video ids: " + "; ".join(f"{printable(p)}: {why}" for p, why in failed[:20])
        )
    return [video_id for video_id, _ in videos]
