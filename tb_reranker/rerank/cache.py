"""The per-video cache of the in-process reranker: one LRU slab and its lock choreography.

What a slot holds is the reranker's choice: the frame tokens (the default, fused K/V-free) or
their projected K/V (``Reranker(cache_kv=True)``); the slab code is the same for both.

The cache is keyed by video id and remembers the entry's content hash: a caller that knows the
hash (Milvus returns it with every hit) never sees a stale entry; ids given without a hash are
trusted for ``ttl_s`` seconds. ``invalidate(ids)`` drops entries at once.

Hot path (issue #6): entries live in one slab ``[n_blocks, 2, slots, T', D]`` with an id -> slot
map, so a whole batch's candidate K/V come out in one row gather per (block, K|V) plane.
:meth:`KVCache.collect` runs one call's lookup: when every candidate is cached the caller's
gather reads the slab directly (under the lock); otherwise cached rows are copied out under the
lock, the misses are read and projected outside it and inserted afterwards.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

__all__ = ["KVCache", "Rows", "take"]

T = TypeVar("T")


@dataclass
class Rows:
    """Per-video rows for one rerank call, gathered from the cache slab and/or the store.

    ``kv`` is laid out ``[n_blocks, 2, N, T', D]`` so that a gather along dim 2 yields the
    candidates' keys/values with each block's ``[B, K*T', D]`` a free view. A reranker that
    fuses K/V-free (the default, ``Reranker(cache_kv=False)``) keeps the frame tokens themselves
    there instead, as ``[1, 1, N, T', D]`` (:attr:`kv_free`).
    """

    index: dict[str, int]  # video id -> row
    kv: torch.Tensor  # [n_blocks, 2, N, T', D] or tokens [1, 1, N, T', D] float32 (rows or slab)
    cls: torch.Tensor  # [N, D] L2-normalised pooled frame tokens
    timestamps: np.ndarray  # [N, T] seconds
    masks: np.ndarray  # [N, T] bool, False = a padded (repeated) frame: no attention
    spans: np.ndarray  # [N, 3] float64: the record's start_s, end_s, its video's segment count

    @property
    def kv_free(self) -> bool:
        """``kv`` holds frame tokens ``[1, 1, N, T', D]`` (a K/V pair has 2 planes)."""
        return self.kv.dim() == 5 and self.kv.shape[1] == 1

    @classmethod
    def empty(cls) -> Rows:
        none = np.zeros((0, 0), dtype=np.float32)
        return cls({}, torch.empty(0), torch.empty(0), none, none.astype(bool), np.zeros((0, 3)))

    def then(self, other: Rows) -> Rows:
        """These rows followed by ``other``'s (``other`` may be empty)."""
        if not other.index:
            return self
        offset = len(self.index)
        return Rows(
            {**self.index, **{i: offset + n for i, n in other.index.items()}},
            torch.cat([self.kv, other.kv], dim=2),
            torch.cat([self.cls, other.cls]),
            np.concatenate([self.timestamps, other.timestamps]),
            np.concatenate([self.masks, other.masks]),
            np.concatenate([self.spans, other.spans]),
        )


def take(kv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """kv [n_blocks, 2, N, T', D], rows [R] int64 -> kv[:, :, rows] [n_blocks, 2, R, T', D].

    One contiguous row gather per (block, K|V) plane: much faster than ``index_select`` on
    dim 2.
    """
    blocks, pair, num_rows = kv.shape[0], kv.shape[1], kv.shape[2]
    out = kv.new_empty((blocks, pair, rows.shape[0], *kv.shape[3:]))
    for b in range(blocks):
        for j in range(pair):
            torch.index_select(
                kv[b, j].view(num_rows, -1), 0, rows, out=out[b, j].view(rows.shape[0], -1)
            )
    return out


def _put(kv: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """kv[:, :, rows] = values (values [n_blocks, 2, R, T', D]), plane by plane."""
    num_rows = kv.shape[2]
    for b in range(kv.shape[0]):
        for j in range(kv.shape[1]):
            kv[b, j].view(num_rows, -1).index_copy_(
                0, rows, values[b, j].reshape(rows.shape[0], -1)
            )


class KVCache:
    """A thread-safe LRU of per-video projections in one preallocated slab, with counters.

    Entries live in ``kv [n_blocks, 2, slots, T', D]`` / ``cls [slots, D]`` /
    ``timestamps [slots, T]`` / ``masks [slots, T]`` / ``spans [slots, 3]``; ``_slots`` maps id -> (slot, content hash, stamp) in LRU order.
    The slab grows by doubling up to ``capacity`` (nothing is allocated before the first put).
    """

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = max(0, int(capacity))
        self.ttl_s = ttl_s
        self._slots: OrderedDict[str, tuple[int, str, float]] = OrderedDict()
        self._free: list[int] = []
        self.kv: torch.Tensor | None = None
        self.cls: torch.Tensor | None = None
        self.timestamps: np.ndarray | None = None
        self.masks: np.ndarray | None = None
        self.spans: np.ndarray | None = None
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ one call's rows
    def collect(
        self,
        wanted: dict[str, str | None],
        fetch: Callable[[list[str]], tuple[Rows, dict[str, str]]],
        use: Callable[[Rows], T],
    ) -> tuple[Rows, T]:
        """Rows of the ``wanted`` ids (id -> content hash or None) and ``use(rows)``.

        Fresh entries come from the slab, the others from ``fetch(ids)`` (rows, hashes), which
        runs outside the lock and whose rows are cached. When everything is cached, ``use``
        runs under the lock on a view of the slab (no copy); ids neither cached nor fetched are
        absent from the returned rows' index.
        """
        cached: Rows | None = None
        with self.lock:
            found, missing = self.lookup(list(wanted), list(wanted.values()))
            if not missing:
                rows = self._view(found)
                return rows, use(rows)
            if found:  # copy the cached rows out before the lock is released
                cached = self._copy(found)
        fresh, hashes = fetch(missing)
        if fresh.index:
            with self.lock:
                self.put(fresh, hashes)
        rows = fresh if cached is None else cached.then(fresh)
        return rows, use(rows)

    def _view(self, found: dict[str, int]) -> Rows:
        assert self.kv is not None and self.cls is not None and self.timestamps is not None
        assert self.masks is not None and self.spans is not None
        return Rows(found, self.kv, self.cls, self.timestamps, self.masks, self.spans)

    def _copy(self, found: dict[str, int]) -> Rows:
        assert self.kv is not None and self.cls is not None and self.timestamps is not None
        assert self.masks is not None and self.spans is not None
        slots = list(found.values())
        where = torch.tensor(slots, dtype=torch.long, device=self.kv.device)
        return Rows(
            {video_id: n for n, video_id in enumerate(found)},
            take(self.kv, where),
            self.cls.index_select(0, where),
            self.timestamps[slots],
            self.masks[slots],
            self.spans[slots],
        )

    # ------------------------------------------------------------------ entries
    def lookup(
        self, videos_ids: Sequence[str], contents_hashes: Sequence[str | None]
    ) -> tuple[dict[str, int], list[str]]:
        """(id -> slot of fresh entries, ids to fetch); call with ``lock`` held."""
        found: dict[str, int] = {}
        wanted: list[str] = []
        now = None
        slots = self._slots
        for video_id, content_hash in zip(videos_ids, contents_hashes, strict=True):
            item = slots.get(video_id)
            if item is not None:
                if content_hash:
                    fresh = item[1] == content_hash
                else:
                    now = time.monotonic() if now is None else now
                    fresh = now - item[2] <= self.ttl_s
                if fresh:
                    slots.move_to_end(video_id)
                    found[video_id] = item[0]
                    continue
            wanted.append(video_id)
        self.hits += len(found)
        self.misses += len(wanted)
        return found, wanted

    def _grow(self, needed: int, like: Rows) -> None:
        size = 0 if self.kv is None else self.kv.shape[2]
        if needed <= size:
            return
        new_size = min(self.capacity, max(needed, 2 * size, 16))
        shape = (*like.kv.shape[:2], new_size, *like.kv.shape[3:])
        kv = torch.zeros(shape, dtype=like.kv.dtype, device=like.kv.device)
        cls = torch.zeros(
            (new_size, like.cls.shape[1]), dtype=like.cls.dtype, device=like.cls.device
        )
        timestamps = np.zeros((new_size, like.timestamps.shape[1]), dtype=np.float32)
        masks = np.ones((new_size, like.masks.shape[1]), dtype=bool)
        spans = np.zeros((new_size, 3))
        if self.kv is not None:
            assert self.cls is not None and self.timestamps is not None
            assert self.masks is not None and self.spans is not None
            kv[:, :, :size] = self.kv
            cls[:size] = self.cls
            timestamps[:size] = self.timestamps
            masks[:size] = self.masks
            spans[:size] = self.spans
        self.kv, self.cls, self.timestamps, self.masks = kv, cls, timestamps, masks
        self.spans = spans
        self._free.extend(range(new_size - 1, size - 1, -1))

    def _slot_for(self, video_id: str) -> int:
        """The slot ``video_id`` is (re)written to: its own, a free one, or the LRU entry's."""
        old = self._slots.pop(video_id, None)
        if old is not None:
            return old[0]
        if self._free:
            return self._free.pop()
        _, (slot, _, _) = self._slots.popitem(last=False)
        return slot

    def put(self, rows: Rows, contents_hashes: dict[str, str]) -> None:
        """Store ``rows`` (evicting least recently used entries); call with ``lock`` held."""
        if self.capacity <= 0 or not rows.index:
            return
        if self.kv is not None and (
            self.kv.shape[:2] != rows.kv.shape[:2] or self.kv.shape[3:] != rows.kv.shape[3:]
        ):
            # another frame count per video: start a new slab (entries of one shape only)
            self.clear()
        items = list(rows.index.items())[-self.capacity :]
        self._grow(min(self.capacity, len(self._slots) + len(items)), rows)
        assert self.kv is not None and self.cls is not None and self.timestamps is not None
        assert self.masks is not None and self.spans is not None
        now = time.monotonic()
        targets, sources = [], []
        for video_id, row in items:
            slot = self._slot_for(video_id)
            self._slots[video_id] = (slot, contents_hashes[video_id], now)
            targets.append(slot)
            sources.append(row)
        target = torch.tensor(targets, dtype=torch.long, device=self.kv.device)
        source = torch.tensor(sources, dtype=torch.long, device=rows.kv.device)
        _put(self.kv, target, take(rows.kv, source))
        self.cls.index_copy_(0, target, rows.cls.index_select(0, source))
        self.timestamps[targets] = rows.timestamps[sources]
        self.masks[targets] = rows.masks[sources]
        self.spans[targets] = rows.spans[sources]

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        """Drop these entries (all with ``None``); a video id (no ``~``) drops the entries of
        every segment of its video too (``<id>~<n>``)."""
        with self.lock:
            if videos_ids is None:
                self.clear()
                return
            dropped = set(videos_ids)
            videos = {f"{i}~" for i in dropped if "~" not in i}
            if videos:
                dropped.update(k for k in self._slots if k[: k.find("~") + 1] in videos)
            for key in dropped:
                item = self._slots.pop(key, None)
                if item is not None:
                    self._free.append(item[0])

    def clear(self) -> None:
        """Drop every entry and the slab (call with ``lock`` held)."""
        self._slots.clear()
        self._free.clear()
        self.kv = self.cls = None
        self.timestamps = self.masks = self.spans = None

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, int | float]:
        """Counters for ``Info`` / ``/metrics``."""
        return {
            "hits": int(self.hits),
            "misses": int(self.misses),
            "size": len(self),
            "capacity": int(self.capacity),
            "hit_rate": float(self.hit_rate),
        }
