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

Hot path (issue #6): the cache is one slab ``[n_blocks, 2, slots, T', D]`` with an id -> slot
map, so a whole batch's candidate K/V come out in one row gather per (block, K|V) plane, laid out
so that the fusion reads each block's keys/values ``[B, K*T', D]`` without another copy; when
every candidate is cached the gather reads the slab directly (under the cache lock), otherwise
cached rows are copied out under the lock, the misses are read and projected outside it and
inserted afterwards. The model is called without re-validating inputs built here.
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

from tb_reranker.errors import InvalidInputError, ModelMismatchError, NotFoundError
from tb_reranker.filters import check_filter
from tb_reranker.types import Hit, RerankedCandidate, RerankResult

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.index import FrameStore, VideoIndex
    from tb_reranker.model import TokenBinder

__all__ = ["Reranker", "RerankResult", "RerankedCandidate", "MAX_TEXT_CHARS", "MAX_INDICATOR_ABS"]

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2048  # longer query texts are refused (CLIP truncates at 77 tokens anyway)
# largest |value| accepted in caller-given indicators: encode_text's rows have norm 1, and values
# this small keep every score finite (3e38 is finite in float32 but overflows S' and the fusion)
MAX_INDICATOR_ABS = 1e4


@dataclass
class _Rows:
    """Per-video rows for one rerank call, gathered from the cache slab and/or the store.

    ``kv`` is laid out ``[n_blocks, 2, N, T', D]`` so that a gather along dim 2 yields the
    candidates' keys/values with each block's ``[B, K*T', D]`` a free view.
    """

    index: dict[str, int]  # video id -> row
    kv: torch.Tensor  # [n_blocks, 2, N, T', D] float32 (rows, or the whole cache slab)
    cls: torch.Tensor  # [N, D] L2-normalised pooled frame tokens
    timestamps: np.ndarray  # [N, T] seconds


def _take(kv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
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


class _KVCache:
    """A thread-safe LRU of per-video projections in one preallocated slab, with counters.

    Entries live in ``kv [n_blocks, 2, slots, T', D]`` / ``cls [slots, D]`` /
    ``timestamps [slots, T]``; ``_slots`` maps id -> (slot, content hash, stamp) in LRU order.
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
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

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

    def _grow(self, needed: int, like: _Rows) -> None:
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
        if self.kv is not None:
            assert self.cls is not None and self.timestamps is not None
            kv[:, :, :size] = self.kv
            cls[:size] = self.cls
            timestamps[:size] = self.timestamps
        self.kv, self.cls, self.timestamps = kv, cls, timestamps
        self._free.extend(range(new_size - 1, size - 1, -1))

    def put(self, rows: _Rows, contents_hashes: dict[str, str]) -> None:
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
        now = time.monotonic()
        targets, sources = [], []
        for video_id, row in items:
            old = self._slots.pop(video_id, None)
            if old is not None:
                slot = old[0]
            else:
                if not self._free:
                    _, (slot, _, _) = self._slots.popitem(last=False)
                else:
                    slot = self._free.pop()
            self._slots[video_id] = (slot, contents_hashes[video_id], now)
            targets.append(slot)
            sources.append(row)
        target = torch.tensor(targets, dtype=torch.long, device=self.kv.device)
        source = torch.tensor(sources, dtype=torch.long, device=rows.kv.device)
        _put(self.kv, target, _take(rows.kv, source))
        self.cls.index_copy_(0, target, rows.cls.index_select(0, source))
        self.timestamps[targets] = rows.timestamps[sources]

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        with self.lock:
            if videos_ids is None:
                self.clear()
            else:
                for video_id in videos_ids:
                    item = self._slots.pop(video_id, None)
                    if item is not None:
                        self._free.append(item[0])

    def clear(self) -> None:
        """Drop every entry and the slab (call with ``lock`` held)."""
        self._slots.clear()
        self._free.clear()
        self.kv = self.cls = None
        self.timestamps = None

    def __len__(self) -> int:
        return len(self._slots)

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
    if tensor.numel() and float(tensor.abs().max()) > MAX_INDICATOR_ABS:
        raise InvalidInputError(
            f"indicator values must lie in [-{MAX_INDICATOR_ABS:g}, {MAX_INDICATOR_ABS:g}] "
            "(encode_text gives L2-normalised rows); larger ones overflow the scores"
        )
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
        self._fingerprint: str | None = None  # the model's, computed at the first store read

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
    def _fetch(self, videos_ids: Sequence[str]) -> tuple[_Rows, dict[str, str]]:
        """One store batch for ``videos_ids``, projected in one model call -> rows, hashes."""
        records = self.store.get_many(list(videos_ids))
        self._check_identity(records)
        fetched = [video_id for video_id in videos_ids if video_id in records]
        if not fetched:
            return self._empty_rows(), {}
        tokens = np.stack([np.asarray(records[i].tokens) for i in fetched])  # [N, T', D]
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise InvalidInputError(
                f"stored frame tokens have dim {tokens.shape[-1]}, "
                f"the model expects {self.embed_dim}: was the store made by another model?"
            )
        frames_tokens = torch.from_numpy(tokens.astype(np.float32, copy=False)).to(self.device)
        num_frames = frames_tokens.shape[1] // self.tokens_per_frame
        with torch.inference_mode():
            kv = self.model.project_candidates(frames_tokens)  # [N, n_blocks, 2, T', D]
            masks = [getattr(records[i], "mask", None) for i in fetched]
            frames_mask = None
            if any(mask is not None for mask in masks):
                frames_mask = torch.from_numpy(
                    np.stack(
                        [
                            np.asarray(mask, dtype=bool)
                            if mask is not None
                            else np.ones(num_frames, dtype=bool)
                            for mask in masks
                        ]
                    )
                ).to(self.device)  # [N, T]
            cls = self.model.pool_cls(frames_tokens, frames_mask)  # [N, D], the model's pooling
        timestamps = np.stack(
            [np.asarray(records[i].timestamps, dtype=np.float32) for i in fetched]
        )  # [N, T]
        rows = _Rows(
            index={video_id: n for n, video_id in enumerate(fetched)},
            kv=kv.permute(1, 2, 0, 3, 4).contiguous(),  # [n_blocks, 2, N, T', D]
            cls=cls,
            timestamps=timestamps,
        )
        return rows, {video_id: records[video_id].content_hash for video_id in fetched}

    def _check_identity(self, records: dict[str, Any]) -> None:
        """Refuse frame tokens written by another model (each record names its model).

        Tokens of another vision tower are vectors of another space: scoring them would give
        plausible-looking, meaningless numbers. Records without a fingerprint (written by hand
        or by an old version) are accepted, as a collection without one is.
        """
        if self._fingerprint is None:
            self._fingerprint = str(self.model.fingerprint())
        foreign = sorted(
            video_id
            for video_id, record in records.items()
            if getattr(record, "fingerprint", "") and record.fingerprint != self._fingerprint
        )
        if foreign:
            other = records[foreign[0]].fingerprint
            raise ModelMismatchError(
                f"{len(foreign)} stored videos (e.g. {foreign[0]!r}) hold frame tokens of model "
                f"{other[:12]}, but the loaded model is {self._fingerprint[:12]}: serve the "
                "checkpoint that ingested them, or re-ingest with this one"
            )

    def _empty_rows(self) -> _Rows:
        return _Rows({}, torch.empty(0), torch.empty(0), np.zeros((0, 0), dtype=np.float32))

    def _prepare(
        self,
        queries: torch.Tensor,
        candidates_ids: Sequence[Sequence[str]],
        broad_scores: Sequence[Sequence[float]] | None,
        rows: _Rows,
    ) -> tuple[list[list[tuple[int, str, float]]], dict[str, Any] | None]:
        """Per query the present candidates sorted by broad score, and the fusion inputs.

        Returns (plans, batch) where batch holds ``active`` (queries with candidates),
        ``sizes``, ``cand_kv [B, K, n_blocks, 2, T', D]`` (a view of one gathered
        ``[n_blocks, 2, B*K, T', D]`` tensor), ``cand_cls [B, K, D]``, ``cand_mask [B, K]`` and
        ``timestamps [B, K, T]`` (numpy); ``None`` when no query has a candidate.
        """
        index = rows.index
        computed: list[float] | None = None
        if broad_scores is None:
            flat = [
                (q, index[i]) for q, ids in enumerate(candidates_ids) for i in ids if i in index
            ]
            if flat:
                which = torch.tensor([f[0] for f in flat], device=self.device)
                slots = torch.tensor([f[1] for f in flat], device=self.device)
                computed = (rows.cls.index_select(0, slots) * queries[which, 0]).sum(-1).tolist()
        plans: list[list[tuple[int, str, float]]] = []
        position = 0
        for q, ids in enumerate(candidates_ids):
            present = []
            for n, video_id in enumerate(ids):
                if video_id not in index:
                    continue
                if computed is not None:
                    score = computed[position]
                    position += 1
                else:
                    assert broad_scores is not None
                    score = float(broad_scores[q][n])
                present.append((n, video_id, score))
            present.sort(key=lambda item: -item[2])
            plans.append(present)
        sizes = [min(len(p), self.top_k) for p in plans]
        active = [q for q, size in enumerate(sizes) if size > 0]
        if not active:
            return plans, None
        k_max = max(sizes)
        gather = []
        masks = []
        for q in active:
            chosen = [index[video_id] for _, video_id, _ in plans[q][: sizes[q]]]
            pad = k_max - len(chosen)
            gather.extend(chosen + [chosen[0]] * pad)  # padding rows are masked out
            masks.append([True] * len(chosen) + [False] * pad)
        num_active = len(active)
        slots = torch.tensor(gather, dtype=torch.long, device=rows.kv.device)
        kv = _take(rows.kv, slots)  # [n_blocks, 2, B*K, T', D]
        cand_kv = kv.view(*kv.shape[:2], num_active, k_max, *kv.shape[3:]).permute(2, 3, 0, 1, 4, 5)
        batch = {
            "active": active,
            "sizes": sizes,
            "cand_kv": cand_kv,  # [B, K, n_blocks, 2, T', D]
            "cand_cls": rows.cls.index_select(0, slots).view(num_active, k_max, -1),
            # [B, K]; None when no query needs padding (the same scores, fewer ops)
            "cand_mask": (
                None
                if all(sizes[q] == k_max for q in active)
                else torch.tensor(masks, device=self.device)
            ),
            "timestamps": rows.timestamps[gather].reshape(num_active, k_max, -1),
        }
        return plans, batch

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

        unique_ids: dict[str, str | None] = {}
        for q, ids in enumerate(candidates_ids):
            hashes = contents_hashes[q] if contents_hashes is not None else None
            for n, video_id in enumerate(ids):
                if video_id not in unique_ids:
                    unique_ids[video_id] = hashes[n] if hashes is not None else None
        queries = queries.to(self.device)
        t_fetch = time.perf_counter_ns()
        cache = self.cache
        plans = batch = None
        cached: _Rows | None = None
        with cache.lock:
            found, wanted = cache.lookup(list(unique_ids), list(unique_ids.values()))
            if not wanted:  # all cached: gather straight from the slab
                assert cache.kv is not None and cache.cls is not None
                assert cache.timestamps is not None
                rows = _Rows(found, cache.kv, cache.cls, cache.timestamps)
                plans, batch = self._prepare(queries, candidates_ids, broad_scores, rows)
            elif found:  # copy the cached rows out before the lock is released
                assert cache.kv is not None and cache.cls is not None
                assert cache.timestamps is not None
                slots = list(found.values())
                where = torch.tensor(slots, dtype=torch.long, device=cache.kv.device)
                cached = _Rows(
                    {video_id: n for n, video_id in enumerate(found)},
                    _take(cache.kv, where),
                    cache.cls.index_select(0, where),
                    cache.timestamps[slots],
                )
        if wanted:
            fresh, fresh_hashes = self._fetch(wanted)
            if fresh.index:
                with cache.lock:
                    cache.put(fresh, fresh_hashes)
            rows = fresh
            if cached is not None and fresh.index:
                offset = len(found)
                rows = _Rows(
                    {**cached.index, **{i: offset + n for i, n in fresh.index.items()}},
                    torch.cat([cached.kv, fresh.kv], dim=2),
                    torch.cat([cached.cls, fresh.cls]),
                    np.concatenate([cached.timestamps, fresh.timestamps]),
                )
            elif cached is not None:
                rows = cached
            plans, batch = self._prepare(queries, candidates_ids, broad_scores, rows)
        assert plans is not None
        t_fused = time.perf_counter_ns()
        present_ids = rows.index
        missing = [[i for i in ids if i not in present_ids] for ids in candidates_ids]
        if strict and any(missing):
            absent = sorted({i for ms in missing for i in ms})
            raise NotFoundError(
                f"{len(absent)} candidate ids not in the frame store: {absent[:10]}"
            )
        focused = self._fuse(queries, plans, batch)
        t_done = time.perf_counter_ns()

        results: list[RerankResult] = []
        timings = {
            "fetch_ns": t_fused - t_fetch,
            "fusion_ns": t_done - t_fused,
            "total_ns": t_done - t_start,
            "batch_size": num_queries,
        }
        for q, present in enumerate(plans):
            deltas, best = focused[q] if focused[q] is not None else ((), None)
            num_reranked = len(deltas)
            head: list[RerankedCandidate] = []
            for k in range(num_reranked):
                index, video_id, score = present[k]
                delta = deltas[k]
                head.append(
                    RerankedCandidate(
                        video_id,
                        index,
                        score + delta,
                        score,
                        delta,
                        best[k] if best is not None else None,
                    )
                )
            head.sort(key=lambda c: -c.score)
            tail = [
                RerankedCandidate(video_id, index, score, score, 0.0, None, reranked=False)
                for index, video_id, score in present[num_reranked:]
            ]
            ordered = head + tail
            if top_n is not None:
                ordered = ordered[:top_n]
            results.append(
                RerankResult(candidates=ordered, missing_ids=missing[q], timings=dict(timings))
            )
        return results

    def _fuse(
        self,
        queries: torch.Tensor,
        plans: list[list[tuple[int, str, float]]],
        batch: dict[str, Any] | None,
    ) -> list[tuple[list[float], list[float] | None] | None]:
        """One batched fusion call over all queries' top-K; per query (Δ [k], best frame s [k])."""
        out: list[tuple[list[float], list[float] | None] | None] = [None] * len(plans)
        if batch is None:
            return out
        active = batch["active"]
        with torch.inference_mode():
            # inputs built and checked here (finite indicators, this model's own cached K/V)
            scores = self.model.focused_scores(
                queries[active] if len(active) < queries.shape[0] else queries,
                batch["cand_cls"],
                cand_mask=batch["cand_mask"],
                cand_kv=batch["cand_kv"],
                validate=False,
            )
        deltas = scores.delta.float().cpu().numpy()  # [B, K]
        attention = getattr(scores, "frame_attention", None)
        best = None
        if attention is not None:
            frames = attention.float().cpu().numpy().argmax(-1)  # [B, K]
            stamps = batch["timestamps"]  # [B, K, T]
            best = np.take_along_axis(stamps, frames[..., None], axis=-1)[..., 0].tolist()
        deltas_lists = deltas.tolist()
        for b, q in enumerate(active):
            size = batch["sizes"][q]
            out[q] = (deltas_lists[b][:size], best[b][:size] if best is not None else None)
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
        filter = check_filter(filter)
        t0 = time.perf_counter_ns()
        if isinstance(queries, str):
            raise InvalidInputError("queries must be a list (use Client.search for one text)")
        if len(queries) == 0:
            raise InvalidInputError("no queries given (pass at least one text or indicator set)")
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
