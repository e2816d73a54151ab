"""Plain result types shared by the SDK, the CLI and the gRPC server."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Hit"]


@dataclass(frozen=True)
class Hit:
    """One search result.

    ``score`` is what the hits are sorted by: ``broad_score + delta`` for reranked hits,
    ``broad_score`` otherwise.
    """

    id: str  # the video id (Milvus primary key)
    score: float  # final score, sort key (descending)
    broad_score: float  # cosine(I_1, video CLS) from the Milvus ANN search
    delta: float  # focused-view correction Δ (0.0 when not reranked)
    rank: int  # 1-based position in the returned list
    reranked: bool  # whether the focused view was applied to this hit
    broad_rank: int = 0  # 1-based position in the broad (Milvus) order
    best_frame_s: float | None = None  # timestamp (s) of the frame the fusion attended most
    metadata: dict[str, Any] = field(default_factory=dict)  # uri, duration_s, user fields

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
