"""Delete videos, check (and repair) the agreement of the Milvus index and the frame store, and
migrate a collection and store written before the vision fingerprint existed.

Ingest writes the store first and Milvus second, so a crash leaves store entries without a row,
which :func:`check` re-indexes (the store is the newer). Delete runs in the opposite order,
store first and Milvus second, so a crash leaves Milvus rows without tokens, which
:func:`check` deletes: a deleted video never comes back, whatever instant the crash hits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tb_reranker.errors import InvalidInputError, ModelMismatchError, NotFoundError
from tb_reranker.index.milvus_index import VideoIndex
from tb_reranker.index.rows import READ_BATCH, video_row, video_rows
from tb_reranker.stores import (
    FrameRecord,
    FrameStore,
    segment_key,
    split_key,
    validate_video_ids,
)

__all__ = ["CheckReport", "DeleteReport", "MigrateReport", "check", "delete", "migrate"]

log = logging.getLogger(__name__)


@dataclass
class DeleteReport:
    """What one ``delete`` call did."""

    deleted: list[str] = field(default_factory=list)  # ids that existed (index or store)
    not_found: list[str] = field(default_factory=list)  # ids in neither place

    def to_dict(self) -> dict[str, Any]:
        return {"deleted": len(self.deleted), "ids": self.deleted, "not_found": self.not_found}


@dataclass
class CheckReport:
    """Disagreements between the Milvus index and the frame-token store."""

    only_in_store: list[str] = field(default_factory=list)  # stored tokens, no Milvus row
    only_in_index: list[str] = field(default_factory=list)  # Milvus row, no tokens (cannot rerank)
    fingerprint_ok: bool = True  # collection fingerprint equals the model's (or unknown)
    hash_mismatch: list[str] = field(default_factory=list)  # both present, content hashes differ
    corrupt: list[str] = field(default_factory=list)  # store entries that cannot be read
    # segment records no current video has (left by a crash: the video's first record names
    # fewer segments, another file, or is gone): repair deletes them, never re-indexes them
    orphans: list[str] = field(default_factory=list)
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
            or self.orphans
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "fingerprint_ok": self.fingerprint_ok,
            "only_in_store": list(self.only_in_store),
            "only_in_index": list(self.only_in_index),
            "hash_mismatch": list(self.hash_mismatch),
            "corrupt": list(self.corrupt),
            "orphans": list(self.orphans),
            "repaired": self.repaired,
            "actions": list(self.actions),
            "damage": list(self.damage),
            "reasons": dict(self.reasons),
            "lost": dict(self.lost),
        }


def delete(ids: Sequence[str], *, index: VideoIndex, store: FrameStore) -> DeleteReport:
    """Delete videos, every segment of each, from the store first, then from Milvus.

    The order is what makes a deletion stick: a crash in between leaves Milvus rows without
    tokens (searches rank them last, unreranked), and ``check(repair=True)`` deletes such rows;
    the opposite order would leave tokens without a row, which repair re-indexes (it cannot tell
    them from an interrupted ingest), bringing the deleted videos back.

    A video's keys are its Milvus rows (by ``video_id``, and its plain id for rows written
    before segments) and the store keys its first record names (``segments``).

    Returns which ids were deleted (found in the index or the store) and which were found in
    neither (nothing to delete; reported, not an error here).
    """
    wanted = list(dict.fromkeys(validate_video_ids(ids)))
    report = DeleteReport()
    if not wanted:
        return report
    keys: dict[str, set[str]] = {}
    for start in range(0, len(wanted), READ_BATCH):
        chunk = wanted[start : start + READ_BATCH]
        for video_id, rows in video_rows(index, chunk, ()).items():
            keys.setdefault(video_id, set()).update(str(r["id"]) for r in rows)
        firsts, _ = store.get_readable(chunk)  # an unreadable first record: its key alone
        for video_id in chunk:
            first = firsts.get(video_id)
            if first is not None:
                named = (segment_key(video_id, n) for n in range(first.segments))
                keys.setdefault(video_id, set()).update(named)
            elif store.contains(video_id):
                keys.setdefault(video_id, set()).add(video_id)
    report.deleted = [i for i in wanted if keys.get(i)]
    report.not_found = [i for i in wanted if not keys.get(i)]
    doomed = sorted(k for i in report.deleted for k in keys[i])
    for start in range(0, len(doomed), READ_BATCH):
        store.delete_many(doomed[start : start + READ_BATCH])
    if doomed:
        index.delete(doomed)
    log.info(
        "deleted %d videos (%d records and rows), %d not found",
        len(report.deleted),
        len(doomed),
        len(report.not_found),
    )
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

    Repair: Milvus rows without tokens are deleted (they cannot be reranked, and an interrupted
    ``delete`` leaves exactly those: what was deleted stays deleted); store entries
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
    if model is not None and index.fingerprint is None:
        index.bind(
            fingerprint=str(model.vision_fingerprint()), model_fingerprint=str(model.fingerprint())
        )
    if not index.exists():
        raise NotFoundError(
            f"Milvus collection {index.collection!r} does not exist at {index.where}"
        )
    stored = index.stored_identity()
    report = CheckReport(fingerprint_ok=index.check_fingerprint())
    if repair and not report.fingerprint_ok:
        raise ModelMismatchError(
            "refusing to repair with another model's tokens: " + index.mismatch_message(stored)
        )
    comparison = _Comparison(index, store, report)
    comparison.run()
    if repair:
        comparison.repair(store_only)
    return report


class _Comparison:
    """One ``check``: every Milvus row's content hash against every store entry."""

    def __init__(self, index: VideoIndex, store: FrameStore, report: CheckReport) -> None:
        self.index = index
        self.store = store
        self.report = report
        self.records: dict[str, FrameRecord] = {}  # readable entries worth comparing
        self.readable: set[str] = set()  # entries the scan read fine

    def run(self) -> None:
        report = self.report
        # reading another model's rows is harmless: a mismatch is reported, not raised
        with self.index.tolerating_mismatch(not report.fingerprint_ok):
            index_hashes: dict[str, str] = {
                str(row["id"]): str(row.get("content_hash", ""))
                for row in self.index.iter_rows(("id", "content_hash"))
            }
        # every entry read (LMDB: in child processes, so a page that makes LMDB abort is
        # reported, not fatal); the ids Milvus knows are probed one by one when the key
        # listing is damaged
        scan = self.store.scan(expected=sorted(index_hashes))
        report.damage = list(scan.damage)
        if scan.bad_keys:
            report.damage.append(f"{len(scan.bad_keys)} keys that are not video ids")
        report.reasons = dict(sorted(scan.corrupt.items()))
        report.only_in_index = sorted(set(index_hashes) - set(scan.ok) - set(scan.corrupt))
        report.corrupt = sorted(scan.corrupt)
        self.readable = set(scan.ok)
        both = sorted(self.readable & set(index_hashes))
        candidates = sorted(self.readable - set(index_hashes))
        self._read(both + candidates)
        report.corrupt.sort()
        stored_only = [i for i in candidates if i in self.records]
        report.orphans = [i for i in stored_only if self._orphan(i)]
        report.only_in_store = [i for i in stored_only if i not in set(report.orphans)]
        report.hash_mismatch = [
            i for i in both if i in self.records and self.records[i].content_hash != index_hashes[i]
        ]
        for video_id in report.corrupt:
            log.warning("check: %s", report.reasons.get(video_id, f"{video_id}: unreadable"))
        for line in report.damage:
            log.warning("check: frame-token store damage: %s", line)

    def _orphan(self, key: str) -> bool:
        """Whether the stored record ``key`` (segment n >= 1) belongs to no current video: the
        video's first record is unreadable, names fewer segments or was made from another file."""
        video_id, n = split_key(key)
        if n == 0:
            return False
        if video_id not in self.records and video_id in self.readable:
            self._read([video_id])
        first = self.records.get(video_id)
        return (
            first is None
            or n >= first.segments
            or (first.content_hash != self.records[key].content_hash)
        )

    def _read(self, ids: list[str]) -> None:
        for start in range(0, len(ids), READ_BATCH):
            records, errors = self.store.get_readable(ids[start : start + READ_BATCH])
            self.records.update(records)
            for video_id, exc in errors.items():  # changed since the scan
                self.report.corrupt.append(video_id)
                self.report.reasons[video_id] = str(exc)

    # ---------------------------------------------------------------- repair
    def repair(self, store_only: str) -> None:
        report = self.report
        report.repaired = True
        dropped = sorted(set(report.only_in_index) | set(report.corrupt))
        if dropped:  # remember where their sources are: re-ingesting them restores them
            rows = self.index.get(dropped)
            report.lost = {i: str(rows.get(i, {}).get("uri", "")) for i in dropped}
        if report.damage:
            self._salvage()
        self._drop_unusable()
        if report.orphans:
            self.store.delete_many(report.orphans)
            report.actions.append(
                f"deleted {len(report.orphans)} segment records of no current video"
            )
        stale = report.only_in_store + report.hash_mismatch
        if stale and store_only == "delete":
            self.index.delete(report.hash_mismatch)
            self.store.delete_many(stale)
            report.actions.append(f"deleted {len(stale)} store entries without a matching row")
        elif stale:
            self._reindex(stale)
        for action in report.actions:
            log.info("check --repair: %s", action)

    def _salvage(self) -> None:
        salvage = getattr(self.store, "salvage", None)
        if salvage is None:
            self.report.actions.append(
                "store-level damage left as is (this backend cannot rebuild)"
            )
            return
        aside = salvage(sorted(self.readable))
        self.report.actions.append(
            f"rebuilt the frame-token store from its {len(self.readable)} readable entries; "
            f"the damaged copy is kept at {aside}"
        )

    def _drop_unusable(self) -> None:
        """Rows without tokens, and corrupt entries with their rows, are deleted."""
        report = self.report
        if report.only_in_index:
            self.index.delete(report.only_in_index)
            report.actions.append(f"deleted {len(report.only_in_index)} index-only rows")
        if report.corrupt:
            self.index.delete(report.corrupt)
            if not report.damage:  # a rebuilt store holds none of them
                self.store.delete_many(report.corrupt)
            report.actions.append(
                f"deleted {len(report.corrupt)} corrupt store entries and their rows: "
                + ", ".join(report.corrupt[:10])
                + (" ..." if len(report.corrupt) > 10 else "")
            )
        if report.lost:
            report.actions.append(
                f"{len(report.lost)} videos dropped: re-ingest their source files to restore them"
            )

    def _reindex(self, stale: list[str]) -> None:
        """Rows rebuilt from the stored tokens (the store is written first: it is the newer)."""
        dim = self.index.dim if self.index.dim is not None else self.index.stored_dim()
        rows = []
        for video_id in stale:
            record = self.records[video_id]
            if record.tokens.shape[1] != dim:
                raise ModelMismatchError(
                    f"stored tokens of {video_id!r} are {record.tokens.shape[1]}-d, the collection "
                    f"is {dim}-d"
                )
            rows.append(video_row(video_id, record, record.video_cls(), record.metadata))
        self.index.upsert(rows)
        self.index.flush()
        self.report.actions.append(f"re-indexed {len(rows)} videos from their stored tokens")


@dataclass
class MigrateReport:
    """What one ``migrate`` call did."""

    collection: str = ""
    was: str = ""  # "legacy" (whole-model fingerprint), "vision" or "none"
    vision_fingerprint: str = ""  # recorded on the collection and the store records
    records_rewritten: int = 0  # store records whose fingerprint was rewritten
    records_current: int = 0  # store records already carrying the vision fingerprint
    changed: bool = False  # whether anything was written

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "was": self.was,
            "vision_fingerprint": self.vision_fingerprint,
            "records_rewritten": self.records_rewritten,
            "records_current": self.records_current,
            "changed": self.changed,
        }


def migrate(*, model: Any, index: VideoIndex, store: FrameStore) -> MigrateReport:
    """Record ``model``'s vision fingerprint on a collection and store written before the
    identity was split (they carry the whole-model fingerprint), after verifying that ``model``
    is the one that filled them. No video is decoded or encoded, no vector changes.

    Order: the store's records first (tokens unchanged, only their fingerprint), the collection
    property last, so a crash in between leaves a legacy collection that this same call finishes
    when run again (it is idempotent). A collection already recording this vision fingerprint
    only gets its stray legacy records rewritten.

    Raises:
        NotFoundError: no such collection.
        ModelMismatchError: the collection (or a store record) was filled by another model:
            nothing is written.
    """
    vision, whole = str(model.vision_fingerprint()), str(model.fingerprint())
    if not index.exists():
        raise NotFoundError(
            f"Milvus collection {index.collection!r} does not exist at {index.where}"
        )
    stored = index.stored_identity()
    report = MigrateReport(collection=index.collection, was=stored.kind, vision_fingerprint=vision)
    if stored.kind == "legacy" and stored.value != whole:
        raise ModelMismatchError(
            f"collection {index.collection!r} was filled by model {stored.value}, not by this "
            f"checkpoint ({whole}): give `tb migrate` the checkpoint that filled it (the "
            "fingerprint is in its config.json), or re-index with this one"
        )
    if stored.kind == "vision" and stored.value != vision:
        raise ModelMismatchError(
            f"collection {index.collection!r} already records vision model {stored.value}, "
            f"not this checkpoint's {vision}: nothing to migrate with it"
        )
    # every record must be this model's (or unmarked) before any is rewritten
    ids = sorted(store.list_ids())
    stale: list[str] = []
    for start in range(0, len(ids), READ_BATCH):
        records, unreadable = store.get_readable(ids[start : start + READ_BATCH])
        for exc in unreadable.values():  # `tb check --repair` deals with those
            log.warning("migrate: %s; left as it is", exc)
        for video_id, record in records.items():
            if record.fingerprint == vision:
                report.records_current += 1
            elif record.fingerprint in ("", whole):
                stale.append(video_id)
            else:
                raise ModelMismatchError(
                    f"store record {video_id!r} holds tokens of model {record.fingerprint}, "
                    f"neither this checkpoint ({whole}) nor its vision side ({vision}): the "
                    "store was not filled by it; nothing was migrated"
                )
    for start in range(0, len(stale), READ_BATCH):
        records = store.get_many(stale[start : start + READ_BATCH])
        store.put_many({i: replace(r, fingerprint=vision) for i, r in records.items()})
        report.records_rewritten += len(records)
    if stored.kind != "vision":
        index.set_fingerprint(vision)
    report.changed = bool(report.records_rewritten) or stored.kind != "vision"
    log.info(
        "migrate %s: was %s, vision fingerprint %s, %d records rewritten",
        index.collection,
        stored.kind,
        vision,
        report.records_rewritten,
    )
    return report
