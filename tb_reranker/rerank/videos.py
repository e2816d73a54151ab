"""Rerank by video: each candidate id stands for every stored segment of its video.

A long video is stored as segments (records ``video_id``, ``video_id~1``, ...; every record says
how many its video has, ``FrameRecord.segments``). A ``RerankRequest`` with
``candidates_are="video"`` (the default: what a caller of ``Reranker.rerank``, the Rerank RPC or
the HTTP provider endpoints means) is answered per video, by the one rerank of ``rerank.batch``:

1. :func:`segment_counts`: the segment-0 records of the candidates (read through the K/V cache,
   so a one-segment video costs only the read its scoring needs) give each video's count;
2. :func:`expand`: each video becomes its segment keys (one key, itself, for a whole video);
3. :func:`combine`: each segment's broad score S' is cos(I_1, its [CLS]) (the L2-normalised mean
   of its real frames' tokens, as ingest stores it in Milvus) as for any candidate without a
   given score. Where the caller gave a video a broad score S'_v, that score is the video's
   *best* segment's (as a Milvus grouping search reports a video): segment s gets
   ``S'_v + cos_s - max_s' cos_s'``, so the best segment by its own cosine keeps S'_v exactly
   and the others keep their gap below it (a one-segment video: S'_v, as before segments);
4. the top K segments across all candidate videos are reranked jointly (K: the model's);
5. :func:`collapse`: a video's place, scores and span (``start_s``/``end_s``) are its best
   segment's, the first of its segments in the reranker's order (reranked by S, then the rest
   by broad score); ids without a stored segment 0 are reported missing, as before.

Only the standard library and numpy are imported (the caller passes rows and plans).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tb_reranker.errors import NotFoundError
from tb_reranker.requests import RerankRequest
from tb_reranker.types import RerankResult

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.rerank.batch import Plan
    from tb_reranker.rerank.cache import Rows

__all__ = ["Expansion", "segment_counts", "expand", "combine", "spans_of", "collapse"]

log = logging.getLogger(__name__)

Span = tuple[float, float]  # (start_s, end_s) of a segment in its video


@dataclass
class Expansion:
    """A request by video as the segment-level request that is reranked, and the way back."""

    request: RerankRequest  # segment keys (present videos only), broad scores computed
    owners: list[list[int]]  # per query, per segment key: its video's index in the caller's ids
    given: list[list[float] | None]  # per query the caller's broad scores, one per video
    missing: list[list[str]]  # per query the video ids without a stored segment 0

    @property
    def keys(self) -> set[str]:
        """Every segment key of every query."""
        return {key for ids in self.request.candidates_ids for key in ids}


def segment_counts(rows: Rows, videos_ids: Sequence[str]) -> dict[str, int]:
    """Video id -> its segment count, for the ids whose segment-0 record ``rows`` hold."""
    index = rows.index
    return {v: max(1, int(rows.spans[index[v], 2])) for v in videos_ids if v in index}


def _keys(video_id: str, count: int) -> list[str]:
    # the rule of tb_reranker.stores.record.segment_key, without importing the store here
    return [video_id] + [f"{video_id}~{n}" for n in range(1, count)]


def expand(request: RerankRequest, counts: dict[str, int]) -> Expansion:
    """The segment-level request of ``request`` (by video); ``NotFoundError`` for a strict one
    with a video whose segment 0 the store lacks."""
    keys, owners, hashes, missing = [], [], [], []
    for ids, given_hashes in zip(request.candidates_ids, request.contents_hashes, strict=True):
        query_keys: list[str] = []
        query_owners: list[int] = []
        query_hashes: list[str | None] = []
        for n, video_id in enumerate(ids):
            count = counts.get(video_id)
            if count is None:
                continue
            segment_keys = _keys(video_id, count)
            query_keys.extend(segment_keys)
            query_owners.extend([n] * count)
            # every record of a video carries the file's content hash
            query_hashes.extend([given_hashes[n] if given_hashes is not None else None] * count)
        keys.append(query_keys)
        owners.append(query_owners)
        hashes.append(query_hashes)
        missing.append([video_id for video_id in ids if video_id not in counts])
    if request.strict and any(missing):
        absent = sorted({i for ms in missing for i in ms})
        raise NotFoundError(f"{len(absent)} candidate ids not in the frame store: {absent[:10]}")
    segments = RerankRequest(
        indicators=request.indicators,
        candidates_ids=keys,
        broad_scores=[None] * len(keys),  # cos(I_1, segment CLS); combined with given ones
        contents_hashes=hashes,
        candidates_are="segment",
    )
    return Expansion(segments, owners, list(request.broad_scores), missing)


def combine(plans: Sequence[Plan], expansion: Expansion) -> list[Plan]:
    """Per query the segment plan (by cosine) with the caller's per-video broad scores applied:
    ``S'_v + cos_s - max cos`` over the video's present segments, best first (ties in the
    order asked, as ``rerank.batch.plan_queries`` sorts)."""
    out: list[Plan] = []
    for plan, owners, given in zip(plans, expansion.owners, expansion.given, strict=True):
        if given is None:
            out.append(list(plan))
            continue
        best: dict[int, float] = {}
        for n, _, cosine in plan:
            video = owners[n]
            best[video] = max(best.get(video, cosine), cosine)
        scored = [
            (n, key, given[owners[n]] + (cosine - best[owners[n]])) for n, key, cosine in plan
        ]
        scored.sort(key=lambda item: (-item[2], item[0]))
        out.append(scored)
    return out


def spans_of(rows: Rows, keys: set[str]) -> dict[str, Span]:
    """``(start_s, end_s)`` of the ``keys`` that ``rows`` hold."""
    index = rows.index
    return {
        key: (float(rows.spans[index[key], 0]), float(rows.spans[index[key], 1]))
        for key in keys
        if key in index
    }


def collapse(
    results: Sequence[RerankResult],
    expansion: Expansion,
    request: RerankRequest,
    spans: dict[str, Span],
) -> list[RerankResult]:
    """Per query one candidate per video (its best segment's, under the video id and its index
    in ``request``, with that segment's span), in the order of their best segments; the
    ``request.top_n`` best; videos without a stored segment 0 missing."""
    out = []
    for q, result in enumerate(results):
        ids = request.candidates_ids[q]
        owners = expansion.owners[q]
        seen: set[int] = set()
        videos = []
        for candidate in result.candidates:
            video = owners[candidate.index]
            if video in seen:
                continue
            seen.add(video)
            start, end = spans.get(candidate.id, (None, None))
            videos.append(replace(candidate, id=ids[video], index=video, start_s=start, end_s=end))
        if result.missing_ids:  # segments of a stored video that the store lacks: damage
            log.warning(
                "rerank: %d segments of stored videos are not in the frame store (e.g. %r): "
                "scored without them; `tb check --repair` finds such videos",
                len(result.missing_ids),
                result.missing_ids[0],
            )
        if request.top_n is not None:
            videos = videos[: request.top_n]
        out.append(RerankResult(videos, list(expansion.missing[q]), dict(result.timings)))
    return out
