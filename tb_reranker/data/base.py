"""Common result types and file helpers of the dataset annotation loaders.

A loader reads a dataset's annotation files and returns :class:`VideoEntry` records (one per
video, with every conventional place its file may be); :func:`tb_reranker.data.load_dataset`
then resolves the files and builds a :class:`VideoTextDataset`. Nothing here decodes video.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tb_reranker.errors import InvalidInputError, NotFoundError

__all__ = [
    "VideoItem",
    "VideoTextDataset",
    "VideoEntry",
    "DatasetLoader",
    "VIDEO_EXTENSIONS",
    "safe_pickle_load",
]

logger = logging.getLogger(__name__)

# Container extensions tried, in this order, when a dataset does not fix one.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4",
    ".avi",
    ".mkv",
    ".webm",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".3gp",
    ".wmv",
    ".flv",
    ".mts",
    ".ogv",
)


@dataclass(frozen=True)
class VideoItem:
    """One video of a dataset split and the texts that describe it."""

    video_id: str  # the dataset's own id (MSR-VTT "video7010", ActivityNet "v_QOlSCBRmfWY", ...)
    path: str  # the video file (resolved when the dataset was loaded with check_files=True)
    captions: tuple[str, ...]  # >= 1 texts; paragraph datasets hold one concatenated paragraph
    start_s: float | None = None  # start of the described segment in the file (None = start)
    end_s: float | None = None  # end of the described segment in the file (None = end)


@dataclass
class VideoTextDataset:
    """A split of a text-video retrieval dataset.

    ``videos`` holds only the videos whose files were found (all of them with
    ``check_files=False``); ``missing`` holds the ids of the annotated videos whose file was
    not found under any conventional name. Texts are numbered video by video, caption by
    caption: text ``j`` is ``pairs()[j]``.
    """

    name: str  # canonical dataset name, a key of LOADERS
    root: str  # the annotation directory
    split: str  # the split that was loaded ("train", "val", "test", ...)
    videos: list[VideoItem]  # videos with a file, in annotation order
    missing: list[str] = field(default_factory=list)  # annotated video ids without a file
    videos_dir: str = ""  # where video files were looked up

    def __len__(self) -> int:
        return len(self.videos)

    def __iter__(self) -> Iterator[VideoItem]:
        return iter(self.videos)

    @property
    def video_ids(self) -> list[str]:
        """Ids of the videos, ``[N]``."""
        return [video.video_id for video in self.videos]

    @property
    def videos_paths(self) -> list[str]:
        """Files of the videos, ``[N]``."""
        return [video.path for video in self.videos]

    @property
    def texts(self) -> list[str]:
        """Every caption, video by video, ``[M]`` (text ``j`` of the metrics)."""
        return [caption for video in self.videos for caption in video.captions]

    def pairs(self) -> list[tuple[str, int]]:
        """``(caption, video_index)`` for every caption, ``[M]``: the text→video ground truth."""
        return [
            (caption, video_index)
            for video_index, video in enumerate(self.videos)
            for caption in video.captions
        ]

    @property
    def text_to_video(self) -> list[int]:
        """Video index of each text, ``[M]`` (the ``gt`` of text→video ranking)."""
        return [video_index for _, video_index in self.pairs()]

    @property
    def texts_per_video(self) -> list[list[int]]:
        """Text indices of each video, ``[N][n_i]`` (the ``gt`` of video→text ranking)."""
        result: list[list[int]] = []
        start = 0
        for video in self.videos:
            result.append(list(range(start, start + len(video.captions))))
            start += len(video.captions)
        return result

    def summary(self) -> dict[str, Any]:
        """Counts for logs and ``--json`` output."""
        return {
            "name": self.name,
            "split": self.split,
            "root": self.root,
            "videos_dir": self.videos_dir,
            "num_videos": len(self.videos),
            "num_texts": sum(len(video.captions) for video in self.videos),
            "num_missing": len(self.missing),
        }


@dataclass(frozen=True)
class VideoEntry:
    """What a loader reads for one video, before the file is looked up."""

    video_id: str  # the dataset's id
    captions: tuple[str, ...]  # non-empty, stripped texts
    candidates: tuple[Path, ...]  # conventional file locations, most likely first
    start_s: float | None = None  # segment start in the file (None = start)
    end_s: float | None = None  # segment end in the file (None = end)


@dataclass(frozen=True)
class DatasetLoader:
    """A registered dataset format."""

    name: str  # canonical name (key of LOADERS)
    # (root, split, videos_dir) -> entries; videos_dir is None only when videos_dirs is empty
    # and the caller gave none (the loader then uses paths from its annotations)
    read: Callable[[Path, str, Path | None], list[VideoEntry]]
    splits: tuple[str, ...] = ("train", "val", "test")  # split names accepted by ``read``
    # default video folders under root, the first existing one wins (root itself if none)
    videos_dirs: tuple[str, ...] = ("videos",)
    description: str = ""  # one line for ``tb`` help and error messages


# ---------------------------------------------------------------------------------------------
# File helpers shared by the loaders: every failure names the file and the problem.


def require_file(path: Path) -> Path:
    """``path`` if it is a file, else :class:`NotFoundError` naming it."""
    if not path.is_file():
        raise NotFoundError(f"annotation file not found: {path}")
    return path


def malformed(path: Path, problem: str) -> InvalidInputError:
    """The error for a malformed annotation file."""
    return InvalidInputError(f"malformed annotation file {path}: {problem}")


def read_text(path: Path) -> str:
    """The UTF-8 text of an annotation file (a BOM is dropped)."""
    require_file(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise malformed(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise malformed(path, f"cannot read ({exc.strerror})") from exc


def read_json(path: Path) -> Any:
    """The parsed JSON document of ``path``."""
    return parse_json(path, read_text(path))


def parse_json(path: Path, text: str) -> Any:
    """``text`` (read from ``path``) parsed as one JSON document; ``malformed`` names the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise malformed(
            path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc


def read_id_list(path: Path) -> list[str]:
    """One id per line (blank lines skipped), duplicates dropped, order kept."""
    ids: list[str] = []
    seen: set[str] = set()
    for line in read_text(path).splitlines():
        video_id = line.strip()
        if video_id and video_id not in seen:
            seen.add(video_id)
            ids.append(video_id)
    if not ids:
        raise malformed(path, "no video ids")
    return ids


def read_csv_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a comma-separated file with a header that has every ``required`` column."""
    reader = csv.DictReader(io.StringIO(read_text(path)))
    columns = reader.fieldnames or []
    absent = [name for name in required if name not in columns]
    if absent:
        raise malformed(path, f"missing column(s) {absent} (header: {columns})")
    rows: list[dict[str, str]] = []
    for row in reader:
        if None in row or any(row.get(name) is None for name in required):
            raise malformed(path, f"line {reader.line_num}: wrong number of fields")
        rows.append(row)
    return rows


def clean_caption(path: Path, value: Any, where: str) -> str:
    """A caption as a stripped string ("" when blank); anything but a string is malformed."""
    if not isinstance(value, str):
        raise malformed(path, f"{where}: caption must be a string, got {type(value).__name__}")
    return " ".join(value.split())


def clean_captions(path: Path, values: Any, where: str, not_a_list: str) -> list[str]:
    """The non-blank captions of the list ``values``, cleaned by :func:`clean_caption` (the
    i-th named ``where[i]``); ``not_a_list`` is the problem reported when it is not a list."""
    if not isinstance(values, list):
        raise malformed(path, not_a_list)
    texts = [clean_caption(path, text, f"{where}[{i}]") for i, text in enumerate(values)]
    return [text for text in texts if text]


def video_candidates(
    videos_dir: Path, stem: str, extensions: Sequence[str] = VIDEO_EXTENSIONS
) -> tuple[Path, ...]:
    """``<videos_dir>/<stem><ext>`` for each extension, in order."""
    return tuple(videos_dir / f"{stem}{ext}" for ext in extensions)


def check_split(loader: DatasetLoader, split: str) -> None:
    if split not in loader.splits:
        raise InvalidInputError(
            f"dataset {loader.name!r} has no split {split!r}; choose one of {list(loader.splits)}"
        )


# ---------------------------------------------------------------------------------------------
# Pickle, for the one dataset (MSVD) whose captions ship as a pickle. Plain containers and
# scalars need no class lookup, so refusing every lookup refuses every code-execution gadget.


class _NoClassesUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global (class or function) reference."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def safe_pickle_load(path: str | Path) -> Any:
    """Load a pickle made only of dicts, lists, tuples, strings, numbers, booleans and None
    (and sets / bytes from pickle protocol 4 / 3 on, where they need no class either).

    Any reference to a class or function (the way every malicious pickle runs code) raises
    :class:`InvalidInputError` before anything is called. Persistent ids are refused too.
    """
    path = require_file(Path(path))
    try:
        with path.open("rb") as handle:
            # Python 2 pickles hold text as byte strings: decode them as UTF-8
            return _NoClassesUnpickler(handle, encoding="utf-8").load()
    except pickle.UnpicklingError as exc:
        raise malformed(path, f"unsafe or corrupt pickle ({exc})") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise malformed(path, f"corrupt pickle ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        raise malformed(path, f"cannot read ({exc.strerror})") from exc
