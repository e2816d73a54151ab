"""The frame-store interface: :class:`FrameStore` (a key-value store of frame records by
video id) and :class:`StoreScan` (what a full read of a store found, for ``tb check``)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tb_reranker.errors import StoreError
from tb_reranker.stores.record import FrameRecord

__all__ = ["FrameStore", "StoreScan"]


@dataclass
class StoreScan:
    """What a full read of a frame-token store found."""

    ok: list[str] = field(default_factory=list)  # entries that read and decode
    corrupt: dict[str, str] = field(default_factory=dict)  # id -> why it cannot be used
    bad_keys: list[str] = field(default_factory=list)  # keys that are not valid ids (hex)
    damage: list[str] = field(default_factory=list)  # store-level damage, one line each

    @property
    def ids(self) -> list[str]:
        return sorted({*self.ok, *self.corrupt})


class FrameStore(abc.ABC):
    """Key-value store of :class:`FrameRecord` by video id."""

    @abc.abstractmethod
    def put_many(self, records: Mapping[str, FrameRecord]) -> None:
        """Write (insert or replace) all ``records``."""

    @abc.abstractmethod
    def get_many(self, ids: Iterable[str]) -> dict[str, FrameRecord]:
        """Records of ``ids`` that exist (missing ids are absent from the result)."""

    @abc.abstractmethod
    def delete_many(self, ids: Iterable[str]) -> int:
        """Delete ``ids`` (missing ones ignored). Returns how many existed."""

    @abc.abstractmethod
    def list_ids(self) -> Iterator[str]:
        """Every stored video id (sorted for LMDB)."""

    @abc.abstractmethod
    def contains(self, video_id: str) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release resources; the store is unusable afterwards."""

    def get(self, video_id: str) -> FrameRecord | None:
        return self.get_many([video_id]).get(video_id)

    def get_readable(
        self, ids: Sequence[str]
    ) -> tuple[dict[str, FrameRecord], dict[str, StoreError]]:
        """Like :meth:`get_many`, but one entry that cannot be read does not hide the others:
        ``(records read, {id: its error})`` (the ids are read one by one after a failure)."""
        try:
            return self.get_many(ids), {}
        except StoreError:
            pass
        records: dict[str, FrameRecord] = {}
        errors: dict[str, StoreError] = {}
        for video_id in ids:
            try:
                records.update(self.get_many([video_id]))
            except StoreError as exc:
                errors[video_id] = exc
        return records, errors

    def scan(self, expected: Iterable[str] = ()) -> StoreScan:
        """Read every entry: a :class:`StoreScan` (ids that read fine, corrupt ids with the
        reason, store-level damage). ``expected``: ids that should be present (backends that
        can lose their key listing read these one by one)."""
        scan = StoreScan()
        try:
            ids = list(self.list_ids())
        except StoreError as exc:
            scan.damage.append(f"listing the entries failed: {exc}")
            ids = list(dict.fromkeys(expected))
        for video_id in ids:
            try:
                found = self.get_many([video_id])
            except StoreError as exc:
                scan.corrupt[video_id] = str(exc)
                continue
            if video_id in found:
                scan.ok.append(video_id)
        return scan

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and self.contains(video_id)

    def __enter__(self) -> FrameStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
