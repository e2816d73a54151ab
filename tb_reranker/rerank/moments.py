"""Hits from segment rows and the rerank's result: videos with their moments, or moments.

A broad search gives segment rows (``id`` = the segment key, ``video_id``, ``start_s``,
``end_s``, ``score`` = broad); the rerank gives some of them a final score. Every segment gets a
place in one order (:func:`scored_segments`), the order of hits before this module:

1. reranked segments, in the reranker's order (by ``S = S' + Δ``);
2. segments not reranked (past the top K, or not sent), by broad score;
3. segments the frame store lacks, by broad score.

A video's place is its best segment's, and so are its scores and span (``Hit.start_s``/``end_s``);
its moments are its segments in that order, at most ``moments_per_video``. A library of
one-segment videos gives exactly the hits of a search without segments. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tb_reranker.types import Hit, Moment, RerankResult

__all__ = ["ScoredSegment", "moment_hits", "rerank_candidates", "scored_segments", "video_hits"]

Row = dict[str, Any]
# fields of a row that are not the hit's metadata (segment fields are the hit's own)
_NOT_METADATA = {"id", "score", "cls", "video_id", "segment", "start_s", "end_s"}


@dataclass(frozen=True)
class ScoredSegment:
    """One segment row with its final scores and its place in the order of hits."""

    row: Row
    key: tuple[float, ...]  # ascending = best first
    score: float
    delta: float
    reranked: bool
    best_frame_s: float | None
    broad_rank: int  # 1-based place of the row by broad score

    @property
    def broad_score(self) -> float:
        return float(self.row["score"])

    @property
    def video_id(self) -> str:
        return str(self.row.get("video_id") or self.row["id"])

    def moment(self) -> Moment:
        row = self.row
        end = row.get("end_s", row.get("duration_s"))
        return Moment(
            start_s=float(row.get("start_s") or 0.0),
            end_s=float(end or 0.0),
            score=self.score,
            broad_score=self.broad_score,
        )


def _broad_order(rows: Sequence[Row]) -> list[int]:
    """Row positions by broad score, best first (ties: first given first)."""
    return sorted(range(len(rows)), key=lambda r: -float(rows[r]["score"]))


def rerank_candidates(rows: Sequence[Row], count: int) -> list[int]:
    """The positions of the ``count`` best rows by broad score: what the reranker is sent."""
    return _broad_order(rows)[:count]


def scored_segments(
    rows: Sequence[Row], sent: Sequence[int], result: RerankResult | None
) -> list[ScoredSegment]:
    """Every row with its scores, best first; ``sent``: the row positions the reranker was sent,
    in the order sent (``result.candidates[i].index`` is a position in it); ``result`` None:
    not reranked (every row by broad score)."""
    broad_rank = {r: place for place, r in enumerate(_broad_order(rows), start=1)}

    def segment(r: int, key: tuple[float, ...], **scored: Any) -> ScoredSegment:
        broad = float(rows[r]["score"])
        return ScoredSegment(
            rows[r],
            key,
            float(scored.get("score", broad)),
            float(scored.get("delta", 0.0)),
            bool(scored.get("reranked", False)),
            scored.get("best_frame_s"),
            broad_rank[r],
        )

    out: dict[int, ScoredSegment] = {}
    for place, candidate in enumerate(result.candidates if result is not None else ()):
        r = sent[candidate.index]
        if candidate.reranked:
            key: tuple[float, ...] = (0, place, 0)
        else:
            key = (1, -float(rows[r]["score"]), broad_rank[r])
        out[r] = segment(
            r,
            key,
            score=candidate.score,
            delta=candidate.delta,
            reranked=candidate.reranked,
            best_frame_s=candidate.best_frame_s,
        )
    lacking = set(sent) if result is not None else set()  # sent and not returned: no tokens
    for r in range(len(rows)):
        if r not in out:
            tier = 2 if r in lacking else 1
            out[r] = segment(r, (tier, -float(rows[r]["score"]), broad_rank[r]))
    return sorted(out.values(), key=lambda s: s.key)


def _metadata(row: Row) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in _NOT_METADATA}


def _hit(best: ScoredSegment, rank: int, broad_rank: int, moments: list[Moment]) -> Hit:
    span = best.moment()
    return Hit(
        id=best.video_id,
        score=best.score,
        broad_score=best.broad_score,
        delta=best.delta,
        rank=rank,
        reranked=best.reranked,
        broad_rank=broad_rank,
        best_frame_s=best.best_frame_s,
        metadata=_metadata(best.row),
        start_s=span.start_s,
        end_s=span.end_s,
        moments=moments,
    )


def video_hits(segments: Sequence[ScoredSegment], limit: int, moments_per_video: int) -> list[Hit]:
    """Videos in the order of their best segment (``segments`` best first), at most ``limit``;
    each with its best ``moments_per_video`` moments; ``broad_rank``: the video's place by its
    best broad score."""
    videos: dict[str, list[ScoredSegment]] = {}
    for segment in segments:
        videos.setdefault(segment.video_id, []).append(segment)
    by_broad = sorted(videos, key=lambda v: min(s.broad_rank for s in videos[v]))
    broad_rank = {video: place for place, video in enumerate(by_broad, start=1)}
    hits = []
    for rank, (video, own) in enumerate(list(videos.items())[:limit], start=1):
        moments = [s.moment() for s in own[:moments_per_video]]
        hits.append(_hit(own[0], rank, broad_rank[video], moments))
    return hits


def moment_hits(segments: Sequence[ScoredSegment], limit: int) -> list[Hit]:
    """Segments as hits (``segments`` best first), at most ``limit``: the hit's id is its video's,
    its span the segment's, its one moment itself."""
    return [
        _hit(segment, rank, segment.broad_rank, [segment.moment()])
        for rank, segment in enumerate(segments[:limit], start=1)
    ]
