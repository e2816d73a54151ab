"""Plain result types shared by the SDK, the CLI and the gRPC server."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Hit", "Moment", "RerankResult", "RerankedCandidate"]


@dataclass(frozen=True)
class Moment:
    """One scored segment of a video: its span and scores (``score`` as ``Hit.score``)."""

    start_s: float  # where the segment starts in the video, seconds
    end_s: float  # where it ends
    score: float  # broad_score + Δ where reranked, broad_score otherwise
    broad_score: float  # cosine(I_1, segment CLS)


@dataclass(frozen=True)
class Hit:
    """One search result: a video (its best moment's scores and span, and its scored moments
    best first), or with ``group="moment"`` one moment of a video.

    ``score`` is what the hits are sorted by: ``broad_score + delta`` for reranked hits,
    ``broad_score`` otherwise.
    """

    id: str  # the video id (of a one-segment video, also its Milvus primary key)
    score: float  # final score, sort key (descending)
    broad_score: float  # cosine(I_1, video CLS) from the Milvus ANN search
    delta: float  # focused-view correction Δ (0.0 when not reranked)
    rank: int  # 1-based position in the returned list
    reranked: bool  # whether the focused view was applied to this hit
    broad_rank: int = 0  # 1-based position in the broad (Milvus) order
    best_frame_s: float | None = None  # timestamp (s) of the frame the fusion attended most
    metadata: dict[str, Any] = field(default_factory=dict)  # uri, duration_s, user fields
    start_s: float | None = None  # the best moment's span in the video, seconds
    end_s: float | None = None
    moments: list[Moment] = field(default_factory=list)  # scored moments, best first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RerankedCandidate:
    """One candidate of a rerank: a video (reranked as its segments, scored as its best one,
    whose span ``start_s``/``end_s`` it carries) or, by segment, one record key."""

    id: str  # as asked: a video id, or by segment a record key ("<video id>~<n>" for n >= 1)
    index: int  # position of this candidate in the request's candidate list
    score: float  # final score S = S' + Δ (S' alone for candidates past K)
    broad_score: float  # S': cosine(I_1, segment CLS)
    delta: float  # Δ from the focused view (0.0 past K)
    best_frame_s: float | None  # timestamp of the frame the indicators attended most
    reranked: bool = True  # False for candidates past K (kept in broad order)
    start_s: float | None = None  # by video: the best segment's span in the video, seconds
    end_s: float | None = None  # (None by segment: the caller has the spans of its keys)


@dataclass
class RerankResult:
    candidates: list[RerankedCandidate]  # sorted by score, descending (top_n of them)
    missing_ids: list[str] = field(default_factory=list)  # ids the store does not hold
    timings: dict[str, int] = field(default_factory=dict)  # ns: encode/fetch/fusion/total
