"""The search pipeline's LRU of encoded queries: (text, query-side model fingerprint) -> indicators.

Production search repeats queries; a hit skips the text tower (most of a search's time on a
CPU). The key holds the fingerprint of what encodes the text (``rerank.backend.query_fingerprint``),
so a search through another checkpoint never reads this one's indicators. Entries are read-only
float32 ``[m, D]`` arrays; every call returns a fresh ``[Q, m, D]`` array built from them, so a
caller may modify what it gets. Thread-safe: the sidecar runs searches on a thread pool. Only the
standard library and numpy are imported here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from tb_reranker.errors import InvalidInputError

__all__ = ["QueryCache"]

Key = tuple[str, str]  # (text, query-side fingerprint)


class QueryCache:
    """A thread-safe LRU of encoded query texts; ``capacity`` 0 caches nothing.

    Args:
        capacity: entries kept (one entry: one text's ``[m, D]`` float32 indicators, 6 KiB at
            m = 3, D = 512); 0 turns the cache off.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidInputError(f"query cache size must be an integer >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def encode(
        self,
        texts: Sequence[str],
        fingerprint: str,
        encode: Callable[[list[str]], np.ndarray],
    ) -> np.ndarray:
        """Indicators ``[Q, m, D]`` of ``texts``: cached rows, the others from one
        ``encode(missing texts)`` call (each distinct text once), which are then cached."""
        texts = list(texts)
        if not self.enabled:
            return encode(texts)
        rows: dict[str, np.ndarray] = {}
        with self._lock:
            for text in texts:
                if text in rows:
                    continue
                entry = self._entries.get((text, fingerprint))
                if entry is not None:
                    self._entries.move_to_end((text, fingerprint))
                    rows[text] = entry
            self.hits += sum(1 for text in texts if text in rows)
        missing = list(dict.fromkeys(text for text in texts if text not in rows))
        if missing:
            fresh = np.asarray(encode(missing), dtype=np.float32)
            if fresh.ndim != 3 or fresh.shape[0] != len(missing):
                raise ValueError(f"encode gave shape {fresh.shape} for {len(missing)} texts")
            with self._lock:
                self.misses += len(missing)
                for text, row in zip(missing, fresh, strict=True):
                    entry = row.copy()
                    entry.setflags(write=False)
                    rows[text] = entry
                    self._entries[(text, fingerprint)] = entry
                    self._entries.move_to_end((text, fingerprint))
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return np.stack([rows[text] for text in texts])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, int | float]:
        """Counters: hits and misses (per text), size, capacity, hit rate."""
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self),
            "capacity": self.capacity,
            "hit_rate": self.hits / total if total else 0.0,
        }
