"""The one search pipeline: Milvus broad search, then the focused-view rerank.

``TwoStageSearch(index, backend)`` serves ``Client`` in both modes (in-process backend, or the
remote backend that reranks on a sidecar) and the sidecar's own ``SearchService``:

1. texts → indicators with ``backend.encode`` (or indicators given), through the LRU of encoded
   queries (``query_cache``, keyed by text and the backend's ``query_fingerprint``) when given;
2. ANN from Milvus with I_1 (``index.search``), with the filter: the segments of the top
   ``max(limit, K)`` videos grouped by video (at most ``moments_per_video`` each), or with
   ``group="moment"`` the top ``max(limit, K)`` segments;
3. ``backend.rerank`` of each query's ``max(limit, K)`` best segments by broad score (segment
   keys, broad scores and content hashes from Milvus; the backend reranks the first K of them
   that the store holds, so K counts segments and one video may hold several);
4. hits (:mod:`tb_reranker.rerank.moments`, the only place ``Hit``s are made): videos in the
   order of their best segment (reranked, then not reranked by broad score, then those the
   store lacks), each with its best moment's scores and span and its moments; or moments.

With ``degrade=True`` (the SDK's non-strict remote mode) a backend that cannot be reached
(``RerankerUnavailableError``) gives the broad-only hits, marked ``reranked=False`` and logged
once, instead of an error. Only the standard library and numpy are imported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tb_reranker.errors import RerankerUnavailableError
from tb_reranker.requests import DEFAULT_LIMITS, Limits, RerankRequest, SearchRequest
from tb_reranker.rerank.moments import moment_hits, rerank_candidates, scored_segments, video_hits
from tb_reranker.types import Hit, RerankResult

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tb_reranker.index import VideoIndex
    from tb_reranker.rerank.backend import RerankBackend
    from tb_reranker.rerank.query_cache import QueryCache

__all__ = ["TwoStageSearch"]

log = logging.getLogger(__name__)

Row = dict[str, Any]  # one Milvus hit: id, score, content_hash, segment fields, output fields


@dataclass
class TwoStageSearch:
    """Broad search in ``index``, rerank by ``backend``; one hit list per query.

    Args:
        index: the Milvus ``VideoIndex`` of the model's videos.
        backend: a ``RerankBackend`` (in process or remote).
        limits: the limits ``search`` validates against (``run`` trusts its request).
        degrade: return broad-only hits when the backend is unreachable instead of raising.
        query_cache: the LRU of encoded queries (shared by every search through it); ``None``
            or capacity 0: every text is encoded.
    """

    index: VideoIndex
    backend: RerankBackend
    limits: Limits = field(default=DEFAULT_LIMITS, kw_only=True)
    degrade: bool = field(default=False, kw_only=True)
    query_cache: QueryCache | None = field(default=None, kw_only=True)
    _warned: bool = field(default=False, init=False, repr=False)  # degradation logged once

    def search(self, queries: Sequence[str] | Any, **options: Any) -> list[list[Hit]]:
        """Two-stage search for query texts or indicators ``[Q, m, D]``, validated here;
        ``limit`` (10), ``rerank`` (True), ``filter`` (None), ``group`` ("video") and
        ``moments_per_video`` (3) as in ``Client.search``."""
        info = self.backend.info()
        return self.run(
            SearchRequest.build(queries, shape=info.shape, limits=self.limits, **options)
        )

    def run(self, request: SearchRequest) -> list[list[Hit]]:
        """``search`` of an already validated request."""
        t0 = time.perf_counter_ns()
        indicators = request.indicators if request.texts is None else self.encode(request.texts)
        t1 = time.perf_counter_ns()
        fetch = max(request.limit, self.backend.info().top_k) if request.rerank else request.limit
        by_video = request.group == "video"
        broad = self.index.search(
            indicators[:, 0],
            fetch,
            filter=request.filter,
            group_size=request.moments_per_video if by_video else None,
        )
        t2 = time.perf_counter_ns()
        sent = [rerank_candidates(rows, fetch) for rows in broad]
        results = None
        if request.rerank:
            results = self._rerank(
                indicators, [[rows[r] for r in s] for rows, s in zip(broad, sent, strict=True)]
            )
        log.debug(
            "search: %d queries, encode %.1f ms, ann %.1f ms, rerank %.1f ms",
            len(broad),
            (t1 - t0) / 1e6,
            (t2 - t1) / 1e6,
            (time.perf_counter_ns() - t2) / 1e6,
        )
        hits = []
        for q, rows in enumerate(broad):
            segments = scored_segments(rows, sent[q], None if results is None else results[q])
            if by_video:
                hits.append(video_hits(segments, request.limit, request.moments_per_video))
            else:
                hits.append(moment_hits(segments, request.limit))
        return hits

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Validated texts → indicators ``[Q, m, D]``: cached ones from ``query_cache``, the
        others from ``backend.encode``."""
        cache = self.query_cache
        if cache is None or not cache.enabled:
            return self.backend.encode(texts)
        fingerprint = self.backend.query_fingerprint()
        if fingerprint is None:
            return self.backend.encode(texts)
        return cache.encode(texts, fingerprint, self.backend.encode)

    def _rerank(self, indicators: np.ndarray, broad: list[list[Row]]) -> list[RerankResult] | None:
        """Per query the backend's result (empty for no rows); ``None`` when degraded."""
        results = [RerankResult([]) for _ in broad]
        nonempty = [q for q, rows in enumerate(broad) if rows]
        if not nonempty:
            return results
        request = RerankRequest(
            indicators=indicators[nonempty],
            candidates_ids=[[str(row["id"]) for row in broad[q]] for q in nonempty],
            broad_scores=[[float(row["score"]) for row in broad[q]] for q in nonempty],
            contents_hashes=[
                [row.get("content_hash") or None for row in broad[q]] for q in nonempty
            ],
            candidates_are="segment",  # Milvus rows are segments: scored each by its own key
        )
        try:
            reranked = self.backend.rerank(request)
        except RerankerUnavailableError as exc:
            if not self.degrade:
                raise
            if not self._warned:
                log.warning("reranker unavailable (%s): returning broad-only results", exc)
                self._warned = True
            return None
        for q, result in zip(nonempty, reranked, strict=True):
            results[q] = result
        return results
