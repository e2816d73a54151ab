"""The reranking pipeline: query indicators + candidate ids → focused-view scores, reordered.

``Reranker`` joins the model, the frame-token store and (for ``search``) the Milvus index:

1. ``encode``: texts → indicators ``[Q, m, D]`` (I_1 drives Milvus, I_2..I_m the fusion);
2. ``rerank``: per query, candidates sorted by broad score, their per-video projected K/V fetched
   from an LRU cache or computed from the store's frame tokens, one batched fusion over all
   queries, ``S = S' + Δ``; candidates past the model's K keep their broad order below;
3. ``search``: ANN top-max(limit, K) from Milvus, then ``rerank``.

The K/V cache is keyed by video id and remembers the entry's content hash: a caller that knows
the hash (Milvus returns it with every hit) never sees a stale entry; ids given without a hash
are trusted for ``cache_ttl_s`` seconds. ``invalidate(ids)`` drops entries at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.types import Hit, RerankedCandidate, RerankResult

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.index import FrameStore, VideoIndex
    from tb_reranker.model import TokenBinder

__all__ = ["Reranker", "RerankResult", "RerankedCandidate", "MAX_TEXT_CHARS"]

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2048  # longer query texts are refused (CLIP truncates at 77 tokens anyway)


@dataclass
class _CacheEntry:
    content_hash: str
    kv: torch.Tensor  # the model's per-video projection (leading dim T)
    cls: torch.Tensor  # [D] L2-normalised mean of the frame tokens
    tokens: torch.Tensor  # [T, D] float32 frame tokens (for models without cached K/V)
    timestamps: np.ndarray  # [T] seconds
    stamp: float  # time.monotonic() when cached


class _KVCache:
    """A thread-safe LRU of per-video projections with hit/miss counters."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, video_id: str, content_hash: str | None) -> _CacheEntry | None:
        with self._lock:
            entry = self._entries.get(video_id)
            fresh = entry is not None and (
                entry.content_hash == content_hash
                if content_hash
                else time.monotonic() - entry.stamp <= self.ttl_s
            )
            if not fresh:
                self.misses += 1
                return None
            self._entries.move_to_end(video_id)
            self.hits += 1
            return entry

    def put(self, video_id: str, entry: _CacheEntry) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[video_id] = entry
            self._entries.move_to_end(video_id)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        with self._lock:
            if videos_ids is None:
                self._entries.clear()
            else:
                for video_id in videos_ids:
                    self._entries.pop(video_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _as_indicators(indicators: Any, num_indicators: int, dim: int) -> torch.Tensor:
    """Validate and convert indicators to a float32 tensor ``[Q, m, D]``."""
    tensor = torch.as_tensor(np.asarray(indicators, dtype=np.float32))
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[1:] != (num_indicators, dim):
        raise InvalidInputError(
            f"indicators must have shape [Q, {num_indicators}, {dim}], got {list(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise InvalidInputError("no queries given")
    if not torch.isfinite(tensor).all():
        raise InvalidInputError("indicators contain NaN or infinity")
    return tensor


class Reranker:
    """TokenBinder's focused view over a frame-token store, in process.

    Args:
        model: a loaded ``TokenBinder`` (eval mode is enforced).
        store: the ``FrameStore`` holding each video's frame tokens.
        cache_size: videos whose projected K/V are kept (LRU); 0 disables the cache.
        cache_ttl_s: how long a cached entry is trusted when the caller gives no content hash.
        max_candidates: candidates per query accepted by ``rerank`` (beyond the model's K,
            candidates keep their broad order).
    """

    def __init__(
        self,
        model: TokenBinder,
        store: FrameStore,
        *,
        cache_size: int = 4096,
        cache_ttl_s: float = 300.0,
        max_candidates: int = 1000,
    ) -> None:
        self.model = model.eval()
        self.store = store
        self.cache = _KVCache(cache_size, cache_ttl_s)
        self.max_candidates = max_candidates
        self.device = next(model.parameters()).device
        self.embed_dim = int(model.embed_dim)
        self.num_indicators = int(model.num_indicators)
        self.top_k = int(model.top_k)
        self.tokens_per_frame = int(getattr(model, "tokens_per_frame", 1))

    # ------------------------------------------------------------------ encode
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → indicators ``[Q, m, D]`` float32 (L2-normalised; I_1 = ``[:, 0]``)."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        texts = list(texts)
        if not texts:
            raise InvalidInputError("no query texts given")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError("every query text must be a non-empty string")
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidInputError(
                    f"query text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
                )
        with torch.inference_mode():
            indicators = self.model.encode_text(texts)
        return indicators.float().cpu().numpy()

    # ------------------------------------------------------------------ fetch
    def _entries(
        self, videos_ids: Sequence[str], contents_hashes: Sequence[str | None]
    ) -> dict[str, _CacheEntry]:
        """Cache lookups, then one store batch for the misses, projected in one model call."""
        found: dict[str, _CacheEntry] = {}
        wanted: list[str] = []
        for video_id, content_hash in zip(videos_ids, contents_hashes, strict=True):
            if video_id in found or video_id in wanted:
                continue
            entry = self.cache.get(video_id, content_hash)
            if entry is None:
                wanted.append(video_id)
            else:
                found[video_id] = entry
        if not wanted:
            return found
        records = self.store.get_many(wanted)
        fetched = [video_id for video_id in wanted if video_id in records]
        if not fetched:
            return found
        frames_tokens = torch.stack(
            [torch.from_numpy(np.asarray(records[i].tokens, dtype=np.float32)) for i in fetched]
        ).to(self.device)  # [N, T, D]
        if frames_tokens.shape[-1] != self.embed_dim:
            raise InvalidInputError(
                f"stored frame tokens have dim {frames_tokens.shape[-1]}, "
                f"the model expects {self.embed_dim}: was the store made by another model?"
            )
        with torch.inference_mode():
            kv = self.model.project_candidates(frames_tokens)  # [N, T, ...]
        frames_mask = torch.stack(
            [
                torch.from_numpy(np.asarray(records[i].mask, dtype=bool))
                if getattr(records[i], "mask", None) is not None
                else torch.ones(frames_tokens.shape[1] // self.tokens_per_frame, dtype=torch.bool)
                for i in fetched
            ]
        ).to(self.device)  # [N, T]
        cls = self.model.pool_cls(frames_tokens, frames_mask)  # [N, D], the model's own pooling
        now = time.monotonic()
        for n, video_id in enumerate(fetched):
            entry = _CacheEntry(
                content_hash=records[video_id].content_hash,
                kv=kv[n],
                cls=cls[n],
                tokens=frames_tokens[n],
                timestamps=np.asarray(records[video_id].timestamps, dtype=np.float32),
                stamp=now,
            )
            self.cache.put(video_id, entry)
            found[video_id] = entry
        return found

    # ------------------------------------------------------------------ rerank
    def rerank(
        self,
        indicators: Any,
        candidates_ids: Sequence[Sequence[str]],
        broad_scores: Sequence[Sequence[float]] | None = None,
        *,
        top_n: int | None = None,
        strict: bool = False,
        contents_hashes: Sequence[Sequence[str | None]] | None = None,
    ) -> list[RerankResult]:
        """Rerank each query's candidates jointly (the one-to-many focused view).

        Args:
            indicators: ``[Q, m, D]`` (or ``[m, D]`` for one query).
            candidates_ids: Q lists of video ids (no duplicates within a list).
            broad_scores: Q lists of S' aligned with the ids; ``None`` → computed from the
                stored tokens (cosine of I_1 with the normalised mean frame token).
            top_n: return only the best ``top_n`` per query.
            strict: raise ``NotFoundError`` for ids the store lacks instead of reporting them.
            contents_hashes: optional Q lists of content hashes (validates cached K/V).

        Returns:
            Q ``RerankResult``; the first ``min(K, found)`` candidates by broad score are
            reranked, the rest follow in broad order, ids missing from the store come last.
        """
        t_start = time.perf_counter_ns()
        queries = _as_indicators(indicators, self.num_indicators, self.embed_dim)  # [Q, m, D]
        num_queries = queries.shape[0]
        if len(candidates_ids) != num_queries:
            raise InvalidInputError(
                f"{num_queries} queries but {len(candidates_ids)} candidate lists"
            )
        if broad_scores is not None and len(broad_scores) != num_queries:
            raise InvalidInputError(f"{num_queries} queries but {len(broad_scores)} score lists")
        if top_n is not None and top_n <= 0:
            raise InvalidInputError(f"top_n must be positive, got {top_n}")
        for q, ids in enumerate(candidates_ids):
            if isinstance(ids, str):
                raise InvalidInputError("each query's candidates must be a list of ids")
            if not ids:
                raise InvalidInputError(f"query {q} has no candidates")
            if len(ids) > self.max_candidates:
                raise InvalidInputError(
                    f"query {q} has {len(ids)} candidates; the limit is {self.max_candidates}"
                )
            if len(set(ids)) != len(ids):
                raise InvalidInputError(f"query {q} has duplicate candidate ids")
            if broad_scores is not None:
                scores = broad_scores[q]
                if len(scores) != len(ids):
                    raise InvalidInputError(
                        f"query {q}: {len(ids)} candidates but {len(scores)} broad scores"
                    )
                if not all(math.isfinite(float(s)) for s in scores):
                    raise InvalidInputError(f"query {q}: broad scores contain NaN or infinity")

        flat_ids = [i for ids in candidates_ids for i in ids]
        flat_hashes: list[str | None] = (
            [h for hs in contents_hashes for h in hs]
            if contents_hashes is not None
            else [None] * len(flat_ids)
        )
        t_fetch = time.perf_counter_ns()
        entries = self._entries(flat_ids, flat_hashes)
        t_fused = time.perf_counter_ns()
        missing = [[i for i in ids if i not in entries] for ids in candidates_ids]
        if strict and any(missing):
            absent = sorted({i for ms in missing for i in ms})
            raise NotFoundError(
                f"{len(absent)} candidate ids not in the frame store: {absent[:10]}"
            )

        queries = queries.to(self.device)
        # per query: present candidates sorted by broad score (rank embedding = broad rank)
        plans: list[list[tuple[int, str, float]]] = []
        for q, ids in enumerate(candidates_ids):
            present = []
            for index, video_id in enumerate(ids):
                if video_id not in entries:
                    continue
                if broad_scores is not None:
                    score = float(broad_scores[q][index])
                else:
                    score = float(entries[video_id].cls @ queries[q, 0])
                present.append((index, video_id, score))
            present.sort(key=lambda item: -item[2])
            plans.append(present)

        focused = self._fuse(queries, plans, entries)
        t_done = time.perf_counter_ns()

        results: list[RerankResult] = []
        for q, present in enumerate(plans):
            deltas, attention = focused[q] if focused[q] is not None else ([], None)
            ranked: list[RerankedCandidate] = []
            for k, (index, video_id, score) in enumerate(present):
                if k < len(deltas):
                    delta = float(deltas[k])
                    best = None
                    if attention is not None:
                        stamps = entries[video_id].timestamps
                        best = float(stamps[int(np.argmax(attention[k]))])
                    ranked.append(
                        RerankedCandidate(video_id, index, score + delta, score, delta, best)
                    )
                else:
                    ranked.append(
                        RerankedCandidate(video_id, index, score, score, 0.0, None, reranked=False)
                    )
            head = sorted(ranked[: len(deltas)], key=lambda c: -c.score)
            ordered = head + ranked[len(deltas) :]
            if top_n is not None:
                ordered = ordered[:top_n]
            results.append(
                RerankResult(
                    candidates=ordered,
                    missing_ids=missing[q],
                    timings={
                        "fetch_ns": t_fused - t_fetch,
                        "fusion_ns": t_done - t_fused,
                        "total_ns": t_done - t_start,
                        "batch_size": num_queries,
                    },
                )
            )
        return results

    def _fuse(
        self,
        queries: torch.Tensor,
        plans: list[list[tuple[int, str, float]]],
        entries: dict[str, _CacheEntry],
    ) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
        """One batched fusion call over all queries' top-K; returns (Δ [k], attention [k, T])."""
        sizes = [min(len(p), self.top_k) for p in plans]
        active = [q for q, size in enumerate(sizes) if size > 0]
        out: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(plans)
        if not active:
            return out
        k_max = self.top_k
        first = entries[plans[active[0]][0][1]]
        kv_zero = torch.zeros_like(first.kv)
        cls_zero = torch.zeros_like(first.cls)
        kvs, clss, masks = [], [], []
        for q in active:
            chosen = [entries[video_id] for _, video_id, _ in plans[q][: sizes[q]]]
            pad = k_max - len(chosen)
            kvs.append(torch.stack([e.kv for e in chosen] + [kv_zero] * pad))
            clss.append(torch.stack([e.cls for e in chosen] + [cls_zero] * pad))
            masks.append([True] * len(chosen) + [False] * pad)
        cand_kv = torch.stack(kvs)  # [B, K, T, ...]
        cand_cls = torch.stack(clss)  # [B, K, D]
        cand_mask = torch.tensor(masks, device=self.device)  # [B, K]
        with torch.inference_mode():
            scores = self.model.focused_scores(
                queries[active], cand_cls, None, cand_mask=cand_mask, cand_kv=cand_kv
            )
        deltas = scores.delta.float().cpu().numpy()  # [B, K]
        attention = (
            scores.frame_attention.float().cpu().numpy()
            if getattr(scores, "frame_attention", None) is not None
            else None
        )
        for b, q in enumerate(active):
            size = sizes[q]
            out[q] = (deltas[b, :size], attention[b, :size] if attention is not None else None)
        return out

    # ------------------------------------------------------------------ search
    def search(
        self,
        index: VideoIndex,
        queries: Sequence[str] | Any,
        *,
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        max_limit: int = 1024,
    ) -> list[list[Hit]]:
        """Two-stage search for one or many queries (texts or indicators ``[Q, m, D]``)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise InvalidInputError(f"limit must be a positive integer, got {limit!r}")
        if limit > max_limit:
            raise InvalidInputError(f"limit {limit} exceeds the maximum of {max_limit}")
        t0 = time.perf_counter_ns()
        if isinstance(queries, str):
            raise InvalidInputError("queries must be a list (use Client.search for one text)")
        if len(queries) and isinstance(queries[0], str):
            indicators = self.encode(list(queries))
        else:
            indicators = _as_indicators(queries, self.num_indicators, self.embed_dim).numpy()
        t1 = time.perf_counter_ns()
        fetch = max(limit, self.top_k) if rerank else limit
        broad = index.search(indicators[:, 0], fetch, filter=filter)
        t2 = time.perf_counter_ns()
        if not rerank:
            return [
                [
                    _hit(row, r + 1, r + 1, row["score"], 0.0, False, None)
                    for r, row in enumerate(rows)
                ][:limit]
                for rows in broad
            ]
        nonempty = [q for q, rows in enumerate(broad) if rows]
        results: list[RerankResult] = [RerankResult([]) for _ in broad]
        if nonempty:
            reranked = self.rerank(
                indicators[nonempty],
                [[row["id"] for row in broad[q]] for q in nonempty],
                [[float(row["score"]) for row in broad[q]] for q in nonempty],
                contents_hashes=[[row.get("content_hash") for row in broad[q]] for q in nonempty],
            )
            for q, result in zip(nonempty, reranked, strict=True):
                results[q] = result
        hits_per_query: list[list[Hit]] = []
        for rows, result in zip(broad, results, strict=True):
            by_index = {row_index: row for row_index, row in enumerate(rows)}
            hits: list[Hit] = []
            for candidate in result.candidates:
                row = by_index[candidate.index]
                hits.append(
                    _hit(
                        row,
                        len(hits) + 1,
                        candidate.index + 1,
                        candidate.score,
                        candidate.delta,
                        candidate.reranked,
                        candidate.best_frame_s,
                    )
                )
            # rows whose tokens are missing from the store: broad order, after the others
            seen = {c.index for c in result.candidates}
            for row_index, row in enumerate(rows):
                if row_index not in seen:
                    hits.append(
                        _hit(row, len(hits) + 1, row_index + 1, row["score"], 0.0, False, None)
                    )
            hits_per_query.append(hits[:limit])
        log.debug(
            "search: %d queries, encode %.1f ms, ann %.1f ms, rerank %.1f ms",
            len(broad),
            (t1 - t0) / 1e6,
            (t2 - t1) / 1e6,
            (time.perf_counter_ns() - t2) / 1e6,
        )
        return hits_per_query

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        """Forget cached projections of these videos (all when ``None``)."""
        self.cache.invalidate(videos_ids)


_RESERVED = {"id", "score", "cls"}


def _hit(
    row: dict[str, Any],
    rank: int,
    broad_rank: int,
    score: float,
    delta: float,
    reranked: bool,
    best_frame_s: float | None,
) -> Hit:
    metadata = {key: value for key, value in row.items() if key not in _RESERVED}
    return Hit(
        id=str(row["id"]),
        score=float(score),
        broad_score=float(row["score"]),
        delta=float(delta),
        rank=rank,
        reranked=reranked,
        broad_rank=broad_rank,
        best_frame_s=best_frame_s,
        metadata=metadata,
    )
