"""Ingestion: video files → (decode, encode) → frame-token store + Milvus row; delete; check/repair.

Pipeline. ``decode_many`` decodes in worker threads ahead of the main thread, which encodes
batches with the model (``torch.inference_mode``) and writes them: **store first, then Milvus**
(upsert by primary key). A process killed anywhere leaves at worst store entries without a Milvus
row (or with an older row); re-running ``ingest`` re-indexes them from the stored tokens when the
file is unchanged, or re-encodes it otherwise; ``check(repair=True)`` fixes the rest. Nothing is
ever duplicated: the video id is the primary key in both places.

Idempotency. The sha256 of each file is compared with the ``content_hash`` stored in Milvus: equal
(and the store holds the entry) → ``unchanged``, nothing is done; different → the entry is
replaced.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tb_reranker.errors import InvalidInputError, ModelMismatchError, StoreError, VideoDecodeError
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.stores import FrameRecord, FrameStore, validate_video_id

__all__ = [
    "IngestReport",
    "CheckReport",
    "DeleteReport",
    "VIDEO_EXTENSIONS",
    "ingest",
    "delete",
    "check",
    "expand_paths",
    "video_ids_for",
]

log = logging.getLogger(__name__)

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
_READ_BATCH = 512  # ids per store/index lookup


@dataclass
class IngestReport:
    """What one ``ingest`` call did."""

    ingested: int = 0  # videos encoded (or re-indexed from the store) and written
    unchanged: int = 0  # videos skipped: same content hash already indexed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) per failure
    seconds: float = 0.0  # wall time of the call
    videos_per_s: float = 0.0  # ingested / seconds
    reindexed: int = 0  # of `ingested`: rows rebuilt from stored tokens without decoding
    ids: list[str] = field(default_factory=list)  # ids written, in input order
    metadata_updated: int = 0  # unchanged files whose new metadata was written (not re-encoded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ingested": self.ingested,
            "metadata_updated": self.metadata_updated,
            "unchanged": self.unchanged,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "seconds": round(self.seconds, 3),
            "videos_per_s": round(self.videos_per_s, 3),
            "reindexed": self.reindexed,
            "ids": list(self.ids),
        }

    def summary(self) -> str:
        return (
            f"ingested {self.ingested} (re-indexed {self.reindexed}), unchanged {self.unchanged}"
            + (f" (metadata updated {self.metadata_updated})" if self.metadata_updated else "")
            + ", "
            f"failed {len(self.failed)} in {self.seconds:.1f} s ({self.videos_per_s:.2f} videos/s)"
        )


@dataclass
class CheckReport:
    """Disagreements between the Milvus index and the frame-token store."""

    only_in_store: list[str] = field(default_factory=list)  # stored tokens, no Milvus row
    only_in_index: list[str] = field(default_factory=list)  # Milvus row, no tokens (cannot rerank)
    fingerprint_ok: bool = True  # collection fingerprint equals the model's (or unknown)
    hash_mismatch: list[str] = field(default_factory=list)  # both present, content hashes differ
    corrupt: list[str] = field(default_factory=list)  # store entries that cannot be read
    repaired: bool = False  # whether repair ran
    actions: list[str] = field(default_factory=list)  # what repair did, one line each
    damage: list[str] = field(default_factory=list)  # store-level damage (broken pages)
    reasons: dict[str, str] = field(default_factory=dict)  # corrupt id -> what is wrong
    lost: dict[str, str] = field(default_factory=dict)  # dropped by repair: id -> source uri

    @property
    def ok(self) -> bool:
        return self.fingerprint_ok and not (
            self.only_in_store
            or self.only_in_index
            or self.hash_mismatch
            or self.corrupt
            or self.damage
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "fingerprint_ok": self.fingerprint_ok,
            "only_in_store": list(self.only_in_store),
            "only_in_index": list(self.only_in_index),
            "hash_mismatch": list(self.hash_mismatch),
            "corrupt": list(self.corrupt),
            "repaired": self.repaired,
            "actions": list(self.actions),
            "damage": list(self.damage),
            "reasons": dict(self.reasons),
            "lost": dict(self.lost),
        }


# ------------------------------------------------------------------------------- inputs
def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


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
    out: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    lists_seen: set[str] = set()

    def add(path: Path) -> None:
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            out.append(str(path))

    def expand(item: str, base: Path | None) -> None:
        if item.startswith("@"):
            list_file = Path(item[1:])
            if base is not None and not list_file.is_absolute():
                list_file = base / list_file
            key = str(list_file.resolve())
            if key in lists_seen:
                problems.append((item, "list file includes itself (directly or not): skipped"))
                return
            lists_seen.add(key)
            try:
                if list_file.exists() and not list_file.is_file():
                    raise ValueError("not a regular file")
                lines = list_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                problems.append((item, f"cannot read list file: {exc.strerror or exc}"))
                return
            except ValueError as exc:  # UnicodeDecodeError included
                problems.append((item, f"cannot read list file: {exc}"))
                return
            entries = [line.strip() for line in lines]
            entries = [e for e in entries if e and not e.startswith("#")]
            if not entries:
                problems.append((item, "list file holds no entries"))
            for entry in entries:
                expand(entry, list_file.parent)
            return
        path = Path(item).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if any(c in item for c in _GLOB_CHARS) and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            for directory in (Path(m) for m in matches if Path(m).is_dir()):
                files.extend(
                    sorted(p for p in directory.rglob("*") if p.is_file() and _is_video(p))
                )
            if not files:
                problems.append((item, "pattern matches no file"))
            for f in files:
                add(f)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_video(p))
            if not files:
                problems.append((item, "directory holds no video file"))
            for f in files:
                add(f)
        elif path.exists():
            add(path)
        else:
            problems.append((str(path), "no such file"))

    for raw in inputs:
        expand(os.fspath(raw), None)
    return out, problems


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


# ------------------------------------------------------------------------------- helpers
def _model_fingerprint(model: Any) -> str:
    return str(model.fingerprint())


def _prepare_index(index: VideoIndex, model: Any) -> None:
    """Bind the index to the model: same dim and fingerprint; create the collection if missing."""
    fingerprint = _model_fingerprint(model)
    if index.fingerprint is None:
        index.fingerprint = fingerprint
    elif index.fingerprint != fingerprint:
        raise ModelMismatchError(
            f"the index expects model {index.fingerprint} but the model given is {fingerprint}"
        )
    if index.dim is None:
        index.dim = int(model.embed_dim)
    elif index.dim != int(model.embed_dim):
        raise ModelMismatchError(
            f"the index holds {index.dim}-d vectors, the model makes {model.embed_dim}-d ones"
        )
    index.create(exist_ok=True)  # creates, or checks dim + fingerprint and loads


def _row(
    video_id: str, record: FrameRecord, cls: np.ndarray, metadata: Mapping[str, Any] | None
) -> dict[str, Any]:
    row: dict[str, Any] = dict(metadata or {})
    row.update(
        id=video_id,
        cls=np.asarray(cls, dtype=np.float32),
        uri=record.uri,
        duration_s=float(record.duration_s),
        num_frames=record.num_real_frames,
        content_hash=record.content_hash,
    )
    return row


def _check_metadata(metadata: Mapping[str, Any] | None) -> None:
    from tb_reranker.index.milvus_index import ROW_FIELDS

    for key, value in (metadata or {}).items():
        if not isinstance(value, Mapping):
            raise InvalidInputError(
                f"metadata for {key!r} must be a dict, got {type(value).__name__}"
            )
        clash = set(value) & (set(ROW_FIELDS) | {"score"})
        if clash or any(str(k).startswith("$") for k in value):
            raise InvalidInputError(
                f"metadata for {key!r} uses reserved field names {sorted(clash) or list(value)}"
            )


def _user_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    from tb_reranker.index.milvus_index import ROW_FIELDS

    return {k: v for k, v in row.items() if k not in ROW_FIELDS and k != "score"}


def _same_json(value: Mapping[str, Any]) -> str:
    """Canonical JSON of user metadata (Milvus returns numbers/dicts as they were written)."""
    import json

    return json.dumps(value, sort_keys=True, default=str)


def _hash_file(path: str) -> str:
    from tb_reranker.video import content_hash

    return content_hash(path)


# ------------------------------------------------------------------------------- ingest
def ingest(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    model: Any,
    index: VideoIndex,
    store: FrameStore,
    batch_size: int = 8,
    workers: int = 2,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    ids: Mapping[str, str] | Callable[[str], str] | None = None,
    progress: bool = True,
    after_store: Callable[[list[str]], None] | None = None,
) -> IngestReport:
    """Ingest videos into ``store`` (frame tokens) and ``index`` (Milvus rows).

    Args:
        paths: files, directories (recursive), glob patterns and ``@list.txt`` files.
        model: a ``TokenBinder`` (its ``num_frames``, ``image_size``, ``image_mean/std`` drive
            decoding; ``encode_frames`` makes the tokens; ``fingerprint()`` marks the collection).
        index: the Milvus index; the collection is created on first use.
        store: the frame-token store.
        batch_size: videos per ``encode_frames`` call and per write.
        workers: decoding threads (decoding overlaps encoding).
        metadata: per video id (or path) a dict of user fields stored as Milvus dynamic fields.
        ids: video id per path (mapping or function); default the file stem.
        progress: show a tqdm progress bar (videos/s) on stderr.
        after_store: called with the batch's ids after the store write and before the Milvus
            write (a test hook for crash consistency; raising there aborts like a crash).
    Returns:
        An :class:`IngestReport`; undecodable files are listed in ``failed``, the rest go on.
    Raises:
        InvalidInputError: invalid/duplicate ids, bad metadata, ``batch_size``/``workers`` < 1.
        ModelMismatchError: the collection was filled by another model.
        StoreError, IndexBackendError: a backend failed (re-running resumes safely).
    """
    import torch

    from tb_reranker.video import decode_many

    started = time.perf_counter()
    if batch_size < 1 or workers < 1:
        raise InvalidInputError(f"batch_size and workers must be >= 1, got {batch_size}, {workers}")
    _check_metadata(metadata)
    files, problems = expand_paths(paths)
    if not files:
        shown = "; ".join(f"{item}: {why}" for item, why in problems[:5]) or "no input given"
        raise InvalidInputError(f"nothing to ingest: {shown}")
    videos_ids = video_ids_for(files, ids)
    report = IngestReport(failed=list(problems))
    _prepare_index(index, model)
    fingerprint = _model_fingerprint(model)
    metadata = metadata or {}

    def meta_for(video_id: str, path: str) -> dict[str, Any]:
        return dict(metadata.get(video_id) or metadata.get(path) or {})

    # 1. content hashes, and what Milvus / the store already hold
    hashes: dict[str, str] = {}
    todo: list[tuple[str, str]] = []  # (video_id, path)
    for video_id, path in zip(videos_ids, files, strict=True):
        try:
            hashes[video_id] = _hash_file(path)
            todo.append((video_id, path))
        except VideoDecodeError as exc:
            report.failed.append((path, exc.reason))
    to_encode: list[tuple[str, str]] = []
    to_reindex: list[tuple[str, str, FrameRecord]] = []
    to_update: list[tuple[str, FrameRecord, dict[str, Any]]] = []
    for start in range(0, len(todo), _READ_BATCH):
        chunk = todo[start : start + _READ_BATCH]
        chunk_ids = [i for i, _ in chunk]
        indexed = index.get(chunk_ids)
        try:
            stored = store.get_many(chunk_ids)
        except StoreError:
            stored = {}
            for video_id in chunk_ids:  # one corrupt entry must not hide the others
                try:
                    stored.update(store.get_many([video_id]))
                except StoreError as exc:
                    log.warning("%s; it will be re-encoded", exc)
        for video_id, path in chunk:
            record = stored.get(video_id)
            in_store = (
                record is not None
                and record.content_hash == hashes[video_id]
                and (not record.fingerprint or record.fingerprint == fingerprint)
            )
            row = indexed.get(video_id)
            if in_store and row is not None and row.get("content_hash") == hashes[video_id]:
                wanted = meta_for(video_id, path)
                if wanted and _same_json(_user_fields(row)) != _same_json(wanted):
                    assert record is not None
                    to_update.append((video_id, record, wanted))  # same file, new metadata
                else:
                    report.unchanged += 1
            elif in_store and record is not None:
                to_reindex.append((video_id, path, record))  # killed between store and Milvus
            else:
                to_encode.append((video_id, path))

    # 1b. unchanged files whose metadata changed: rewrite the row (same vector) and the record's
    # copy of the metadata; no decoding or encoding
    for start in range(0, len(to_update), _READ_BATCH):
        chunk = to_update[start : start + _READ_BATCH]
        vectors = index.get([i for i, _, _ in chunk], with_vectors=True)
        records = {i: replace(record, metadata=meta) for i, record, meta in chunk}
        store.put_many(records)  # store first, as everywhere
        index.upsert(
            [_row(i, records[i], vectors[i]["cls"], meta) for i, _, meta in chunk if i in vectors]
        )
        report.metadata_updated += len(chunk)
        report.ids.extend(i for i, _, _ in chunk)

    total = len(to_encode) + len(to_reindex)
    bar = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="video", desc="ingest", dynamic_ncols=True, leave=True)

    # 2. re-index entries whose tokens are already stored (no decode/encode)
    for start in range(0, len(to_reindex), batch_size):
        chunk = to_reindex[start : start + batch_size]
        rows = []
        for video_id, path, record in chunk:
            user = meta_for(video_id, path) or dict(record.metadata or {})
            rows.append(_row(video_id, _with_uri(record, path), record.video_cls(), user))
        index.upsert(rows)
        report.ingested += len(rows)
        report.reindexed += len(rows)
        report.ids.extend(r["id"] for r in rows)
        if bar is not None:
            bar.update(len(rows))

    # 3. decode (worker threads, ahead) -> encode (this thread, batched) -> store -> Milvus
    path_to_id = {path: video_id for video_id, path in to_encode}
    pending: list[tuple[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        frames = torch.from_numpy(np.stack([clip.frames for _, clip in pending]))  # [B, T, 3, H, W]
        masks = torch.from_numpy(np.stack([clip.mask for _, clip in pending]))  # [B, T]
        with torch.inference_mode():
            videos_cls, frames_tokens = model.encode_frames(frames, masks)  # [B, D], [B, T', D]
        videos_cls = videos_cls.float().cpu().numpy()
        frames_tokens = frames_tokens.float().cpu().numpy()
        records: dict[str, FrameRecord] = {}
        rows = []
        for b, (video_id, clip) in enumerate(pending):
            path = clip.path
            record = FrameRecord(
                tokens=frames_tokens[b].astype(np.float16),
                timestamps=np.asarray(clip.timestamps, dtype=np.float32),
                content_hash=hashes[video_id],
                mask=np.asarray(clip.mask, dtype=bool),
                uri=str(Path(path).resolve()),
                duration_s=float(clip.duration_s),
                fingerprint=fingerprint,
                metadata=meta_for(video_id, path) or None,
            )
            records[video_id] = record
            rows.append(_row(video_id, record, videos_cls[b], record.metadata))
        store.put_many(records)  # store first ...
        batch_ids = list(records)
        if after_store is not None:
            after_store(batch_ids)
        index.upsert(rows)  # ... then Milvus
        report.ingested += len(rows)
        report.ids.extend(batch_ids)
        if bar is not None:
            bar.update(len(rows))
        pending.clear()

    try:
        if to_encode:
            stream = decode_many(
                [path for _, path in to_encode],
                num_frames=int(model.num_frames),
                image_size=int(model.image_size),
                mean=tuple(model.image_mean),
                std=tuple(model.image_std),
                workers=workers,
            )
            for path, outcome in stream:
                if isinstance(outcome, VideoDecodeError):
                    log.warning("%s", outcome)
                    report.failed.append((path, outcome.reason))
                    if bar is not None:
                        bar.update(1)
                    continue
                pending.append((path_to_id[path], outcome))
                if len(pending) >= batch_size:
                    flush()
            flush()
    finally:
        if bar is not None:
            bar.close()
    if report.ingested or report.metadata_updated:
        index.flush()  # seal the new rows: indexed search instead of brute force over them
    report.seconds = time.perf_counter() - started
    report.videos_per_s = report.ingested / report.seconds if report.seconds > 0 else 0.0
    log.info("ingest: %s", report.summary())
    for path, reason in report.failed:
        log.info("ingest failed: %s: %s", path, reason)
    return report


def _with_uri(record: FrameRecord, path: str) -> FrameRecord:
    """``record`` with ``uri`` set to the resolved ``path`` when it had none."""
    if record.uri:
        return record
    from dataclasses import replace

    return replace(record, uri=str(Path(path).resolve()))


# ------------------------------------------------------------------------------- delete / check
@dataclass
class DeleteReport:
    """What one ``delete`` call did."""

    deleted: list[str] = field(default_factory=list)  # ids that existed (index or store)
    not_found: list[str] = field(default_factory=list)  # ids in neither place

    def to_dict(self) -> dict[str, Any]:
        return {"deleted": len(self.deleted), "ids": self.deleted, "not_found": self.not_found}


def delete(ids: Sequence[str], *, index: VideoIndex, store: FrameStore) -> DeleteReport:
    """Delete videos from Milvus first (they stop being found), then from the store.

    Returns which ids were deleted (found in the index or the store) and which were found in
    neither (nothing to delete; reported, not an error here).
    """
    if isinstance(ids, str):
        raise InvalidInputError("pass a list of video ids, not a single string")
    wanted = list(dict.fromkeys(validate_video_id(i) for i in ids))
    report = DeleteReport()
    if not wanted:
        return report
    present = set(index.get(wanted))
    for start in range(0, len(wanted), _READ_BATCH):
        chunk = [i for i in wanted[start : start + _READ_BATCH] if i not in present]
        present.update(i for i in chunk if store.contains(i))
    report.deleted = [i for i in wanted if i in present]
    report.not_found = [i for i in wanted if i not in present]
    if report.deleted:
        index.delete(report.deleted)
        store.delete_many(report.deleted)
    log.info("deleted %d videos (%d not found)", len(report.deleted), len(report.not_found))
    return report


def check(
    index: VideoIndex,
    store: FrameStore,
    repair: bool = False,
    *,
    model: Any = None,
    store_only: str = "reindex",
) -> CheckReport:
    """Find (and with ``repair`` fix) disagreements between the index and the store.

    Repair: Milvus rows without tokens are deleted (they cannot be reranked); store entries
    without a row (or with a row of another content hash: the store is written first, so it is
    the newer) are re-indexed from their tokens (``store_only="reindex"``, the video CLS being
    the L2-normalised mean of the real frames' features, as in the model) or deleted
    (``store_only="delete"``); corrupt store entries (unparsable, NaN/inf tokens) are deleted
    from both, and a store with damaged pages is rebuilt from its readable entries (the damaged
    copy is moved aside). Videos dropped are listed in ``lost`` with their source uri: ingesting
    those files again re-encodes them (the store no longer holds them, so nothing is skipped).

    Raises:
        ModelMismatchError: ``repair`` while the collection's fingerprint differs from the model's.
    """
    if store_only not in ("reindex", "delete"):
        raise InvalidInputError(f"store_only must be 'reindex' or 'delete', got {store_only!r}")
    if model is not None:
        fingerprint = _model_fingerprint(model)
        if index.fingerprint is None:
            index.fingerprint = fingerprint
    report = CheckReport()
    if not index.exists():
        from tb_reranker.errors import NotFoundError

        raise NotFoundError(f"Milvus collection {index.collection!r} does not exist at {index.uri}")
    report.fingerprint_ok = index.check_fingerprint()
    if repair and not report.fingerprint_ok:
        raise ModelMismatchError(
            f"collection {index.collection!r} was filled by model {index.stored_fingerprint()}, "
            f"not the loaded {index.fingerprint}; refusing to repair with another model's tokens"
        )
    allowed = index.allow_fingerprint_mismatch
    index.allow_fingerprint_mismatch = allowed or not report.fingerprint_ok  # reads are harmless
    try:
        index_hashes: dict[str, str] = {
            str(row["id"]): str(row.get("content_hash", ""))
            for row in index.iter_rows(("id", "content_hash"))
        }
    finally:
        index.allow_fingerprint_mismatch = allowed
    # every entry read (LMDB: in child processes, so a page that makes LMDB abort is reported,
    # not fatal); the ids Milvus knows are probed one by one when the key listing is damaged
    scan = store.scan(expected=sorted(index_hashes))
    report.damage = list(scan.damage)
    if scan.bad_keys:
        report.damage.append(f"{len(scan.bad_keys)} keys that are not video ids")
    report.reasons = dict(sorted(scan.corrupt.items()))
    store_ids = set(scan.ok) | set(scan.corrupt)
    report.only_in_index = sorted(set(index_hashes) - store_ids)
    report.corrupt = sorted(scan.corrupt)
    readable = set(scan.ok)
    both = sorted(readable & set(index_hashes))
    candidates = sorted(readable - set(index_hashes))
    records: dict[str, FrameRecord] = {}
    wanted = both + candidates
    for start in range(0, len(wanted), _READ_BATCH):
        chunk = wanted[start : start + _READ_BATCH]
        try:
            records.update(store.get_many(chunk))
        except StoreError:  # changed since the scan: read one by one
            for video_id in chunk:
                try:
                    records.update(store.get_many([video_id]))
                except StoreError as exc:
                    report.corrupt.append(video_id)
                    report.reasons[video_id] = str(exc)
    report.corrupt.sort()
    report.only_in_store = [i for i in candidates if i in records]
    report.hash_mismatch = [
        i for i in both if i in records and records[i].content_hash != index_hashes[i]
    ]
    for video_id in report.corrupt:
        log.warning("check: %s", report.reasons.get(video_id, f"{video_id}: unreadable"))
    for line in report.damage:
        log.warning("check: frame-token store damage: %s", line)
    if not repair:
        return report

    report.repaired = True
    dropped = sorted(set(report.only_in_index) | set(report.corrupt))
    if dropped:  # remember where their sources are: re-ingesting them restores them
        rows = index.get(dropped)
        report.lost = {i: str(rows.get(i, {}).get("uri", "")) for i in dropped}
    if report.damage:
        salvage = getattr(store, "salvage", None)
        if salvage is None:
            report.actions.append("store-level damage left as is (this backend cannot rebuild)")
        else:
            aside = salvage(sorted(readable))
            report.actions.append(
                f"rebuilt the frame-token store from its {len(readable)} readable entries; "
                f"the damaged copy is kept at {aside}"
            )
    if report.only_in_index:
        index.delete(report.only_in_index)
        report.actions.append(f"deleted {len(report.only_in_index)} index-only rows")
    if report.corrupt:
        index.delete(report.corrupt)
        if not report.damage:  # a rebuilt store holds none of them
            store.delete_many(report.corrupt)
        report.actions.append(
            f"deleted {len(report.corrupt)} corrupt store entries and their rows: "
            + ", ".join(report.corrupt[:10])
            + (" ..." if len(report.corrupt) > 10 else "")
        )
    if report.lost:
        report.actions.append(
            f"{len(report.lost)} videos dropped: re-ingest their source files to restore them"
        )
    stale = report.only_in_store + report.hash_mismatch
    if stale and store_only == "delete":
        index.delete(report.hash_mismatch)
        store.delete_many(stale)
        report.actions.append(f"deleted {len(stale)} store entries without a matching row")
    elif stale:
        if index.dim is None:
            index.dim = index.stored_dim()
        rows = []
        for video_id in stale:
            record = records[video_id]
            if record.tokens.shape[1] != index.dim:
                raise ModelMismatchError(
                    f"stored tokens of {video_id!r} are {record.tokens.shape[1]}-d, the collection "
                    f"is {index.dim}-d"
                )
            rows.append(_row(video_id, record, record.video_cls(), record.metadata))
        index.upsert(rows)
        index.flush()
        report.actions.append(f"re-indexed {len(rows)} videos from their stored tokens")
    for action in report.actions:
        log.info("check --repair: %s", action)
    return report
