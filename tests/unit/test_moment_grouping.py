"""Grouping segments by video and assembling hits (issue 22 §3): index/grouping.py and
rerank/moments.py, on random segment scores (Hypothesis)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.index.grouping import group_by_video, is_complete, segment_fields, video_filter
from tb_reranker.requests import MAX_MOMENTS_PER_VIDEO, SearchRequest
from tb_reranker.rerank.moments import (
    moment_hits,
    rerank_candidates,
    scored_segments,
    video_hits,
)
from tb_reranker.types import Hit, RerankedCandidate, RerankResult

SCORES = st.floats(-1, 1, allow_nan=False, width=32)


def _row(video: int, segment: int, score: float, segments: int = 3) -> dict[str, Any]:
    key = f"v{video}" if segment == 0 else f"v{video}~{segment}"
    return {
        "id": key,
        "score": score,
        "video_id": f"v{video}",
        "segment": segment,
        "start_s": 10.0 * segment,
        "end_s": 10.0 * (segment + 1),
        "duration_s": 10.0 * segments,
        "uri": f"/v{video}.mp4",
    }


@st.composite
def segment_rows(draw: Any) -> list[dict[str, Any]]:
    """Rows of up to 8 videos, 1-4 segments each, random scores, in broad order."""
    videos = draw(st.integers(1, 8))
    rows = []
    for v in range(videos):
        count = draw(st.integers(1, 4))
        for s in range(count):
            rows.append(_row(v, s, draw(SCORES), count))
    return sorted(rows, key=lambda r: -r["score"])


def _best_first_videos(rows: list[dict[str, Any]]) -> list[str]:
    best: dict[str, float] = {}
    for row in rows:
        best[row["video_id"]] = max(best.get(row["video_id"], -2.0), row["score"])
    return sorted(best, key=lambda v: -best[v])


@settings(max_examples=200, deadline=None)
@given(segment_rows(), st.integers(1, 10), st.integers(1, 4))
def test_group_by_video_orders_videos_by_their_best_segment(rows, limit, per_video):
    groups = group_by_video(rows, limit, per_video)
    order = [group[0]["video_id"] for group in groups]
    expected = _best_first_videos(rows)[:limit]
    assert [max(r["score"] for r in rows if r["video_id"] == v) for v in order] == [
        max(r["score"] for r in rows if r["video_id"] == v) for v in expected
    ]
    assert len(groups) == min(limit, len(_best_first_videos(rows)))
    for group in groups:
        scores = [r["score"] for r in group]
        own = sorted(
            (r["score"] for r in rows if r["video_id"] == group[0]["video_id"]), reverse=True
        )
        assert scores == own[:per_video]  # the video's best segments, best first, capped
        assert {r["video_id"] for r in group} == {group[0]["video_id"]}


@settings(max_examples=200, deadline=None)
@given(segment_rows(), st.integers(1, 10), st.integers(1, 4), st.booleans())
def test_video_hits_rank_videos_by_their_best_segment(rows, limit, per_video, rerank):
    """Not reranked: videos by their best broad segment. Reranked (a result that gives every
    sent segment a score): reranked videos by their best final score, the rest after them."""
    sent = rerank_candidates(rows, 4)
    result = None
    if rerank:
        deltas = [((i * 7919) % 13 - 6) / 20 for i in range(len(sent))]
        candidates = [
            RerankedCandidate(rows[r]["id"], i, rows[r]["score"] + d, rows[r]["score"], d, 1.0 * i)
            for i, (r, d) in enumerate(zip(sent, deltas, strict=True))
        ]
        candidates.sort(key=lambda c: -c.score)
        result = RerankResult(candidates)
    hits = video_hits(scored_segments(rows, sent, result), limit, per_video)
    final = {}
    for candidate in result.candidates if result else ():
        final[candidate.id] = candidate.score

    def key(video: str) -> tuple[int, float]:
        own = [r for r in rows if r["video_id"] == video]
        reranked = [final[r["id"]] for r in own if r["id"] in final]
        if reranked:
            return (0, -max(reranked))
        return (1, -max(r["score"] for r in own))

    videos = sorted({r["video_id"] for r in rows}, key=key)
    assert [key(h.id) for h in hits] == [key(v) for v in videos[:limit]]
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    for hit in hits:
        assert 1 <= len(hit.moments) <= per_video
        best = hit.moments[0]
        assert (hit.start_s, hit.end_s, hit.score, hit.broad_score) == (
            best.start_s,
            best.end_s,
            best.score,
            best.broad_score,
        )
        assert hit.score == pytest.approx(hit.broad_score + hit.delta)
        own = [r for r in rows if r["video_id"] == hit.id]
        assert len(hit.moments) == min(per_video, len(own))
        reranked = sorted((final[r["id"]] for r in own if r["id"] in final), reverse=True)
        rest = sorted((r["score"] for r in own if r["id"] not in final), reverse=True)
        assert [m.score for m in hit.moments] == (reranked + rest)[:per_video]  # best first
        assert "video_id" not in hit.metadata and hit.metadata["uri"] == f"/{hit.id}.mp4"


@settings(max_examples=100, deadline=None)
@given(segment_rows(), st.integers(1, 20))
def test_moment_hits_count_moments(rows, limit):
    hits = moment_hits(scored_segments(rows, [], None), limit)
    assert len(hits) == min(limit, len(rows))
    assert [h.score for h in hits] == sorted((r["score"] for r in rows), reverse=True)[:limit]
    for hit in hits:
        assert hit.id.startswith("v") and "~" not in hit.id  # the video's id
        assert len(hit.moments) == 1 and hit.moments[0].start_s == hit.start_s


# ------------------------------------------------------------------ one segment per video
def _old_hits(rows: list[dict[str, Any]], result: RerankResult | None, limit: int) -> list[Hit]:
    """The hits of the pipeline before segments (rerank/pipeline.py before issue 22)."""

    def hit(row: dict[str, Any], rank: int, broad_rank: int, **scored: Any) -> Hit:
        broad = float(row["score"])
        return Hit(
            id=str(row["id"]),
            score=float(scored.get("score", broad)),
            broad_score=broad,
            delta=float(scored.get("delta", 0.0)),
            rank=rank,
            reranked=bool(scored.get("reranked", False)),
            broad_rank=broad_rank,
            best_frame_s=scored.get("best_frame_s"),
        )

    if result is None:
        return [hit(row, r, r) for r, row in enumerate(rows[:limit], start=1)]
    hits = []
    for c in result.candidates:
        hits.append(
            hit(
                rows[c.index],
                len(hits) + 1,
                c.index + 1,
                score=c.score,
                delta=c.delta,
                reranked=c.reranked,
                best_frame_s=c.best_frame_s,
            )
        )
    seen = {c.index for c in result.candidates}
    for r, row in enumerate(rows):
        if r not in seen:
            hits.append(hit(row, len(hits) + 1, r + 1))
    return hits[:limit]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(SCORES, min_size=1, max_size=12),
    st.integers(1, 12),
    st.integers(0, 12),
    st.sets(st.integers(0, 11)),
    st.booleans(),
)
def test_one_segment_videos_give_the_hits_of_before(scores, limit, top_k, lacking, rerank):
    """A library of short clips (one segment each, legacy rows without segment fields): the
    same ids, scores, ranks and order as before segments."""
    rows = [
        {"id": f"clip{i:02d}", "score": s, "duration_s": 2.0}
        for i, s in enumerate(sorted(scores, reverse=True))
    ]
    rows = [segment_fields(r) for r in rows]
    sent = rerank_candidates(rows, len(rows))
    assert sent == list(range(len(rows)))
    result = None
    if rerank:  # what the backend gives: the first top_k present reranked, then the rest
        present = [i for i in sent if i not in lacking]
        head = [
            RerankedCandidate(
                rows[i]["id"],
                i,
                rows[i]["score"] + (i % 3 - 1) / 10,
                rows[i]["score"],
                (i % 3 - 1) / 10,
                0.5,
            )
            for i in present[:top_k]
        ]
        head.sort(key=lambda c: -c.score)
        tail = [
            RerankedCandidate(
                rows[i]["id"], i, rows[i]["score"], rows[i]["score"], 0.0, None, reranked=False
            )
            for i in present[top_k:]
        ]
        result = RerankResult(head + tail)
    new = video_hits(scored_segments(rows, sent, result), limit, 3)
    old = _old_hits(rows, result, limit)
    strip = (
        "id",
        "score",
        "broad_score",
        "delta",
        "rank",
        "reranked",
        "broad_rank",
        "best_frame_s",
    )
    assert [[getattr(h, f) for f in strip] for h in new] == [
        [getattr(h, f) for f in strip] for h in old
    ]
    for hit in new:
        assert (hit.start_s, hit.end_s) == (0.0, 2.0) and len(hit.moments) == 1


# ------------------------------------------------------------------ helpers and requests
def test_legacy_row_is_its_own_video():
    row = segment_fields({"id": "old", "score": 0.5, "duration_s": 4.5})
    assert (row["video_id"], row["segment"], row["start_s"], row["end_s"]) == ("old", 0, 0.0, 4.5)


def test_is_complete_knows_a_video_is_all_there():
    assert is_complete([_row(1, 0, 0.1, segments=1)], 3)  # a short clip: segment 0 to the end
    assert not is_complete([_row(1, 0, 0.1, segments=3)], 3)  # segments 1, 2 unseen
    assert is_complete([_row(1, 0, 0.1, 2), _row(1, 1, 0.2, 2)], 3)
    assert not is_complete([_row(1, 1, 0.2, 2)], 3)  # segment 0 unseen
    assert is_complete([_row(1, 2, 0.1), _row(1, 1, 0.1), _row(1, 0, 0.1)], 3)


def test_video_filter():
    assert video_filter(["a", "b"]) == 'video_id in ["a", "b"]'
    assert video_filter(["a"], "x > 1") == '(x > 1) and video_id in ["a"]'


@pytest.mark.parametrize(
    "options",
    [
        {"group": "file"},
        {"group": None},
        {"moments_per_video": 0},
        {"moments_per_video": MAX_MOMENTS_PER_VIDEO + 1},
        {"moments_per_video": 2.0},
        {"moments_per_video": True},
    ],
)
def test_search_request_refuses_bad_grouping(options):
    with pytest.raises(InvalidInputError):
        SearchRequest.build(["a dog"], **options)


def test_search_request_grouping_defaults():
    request = SearchRequest.build(["a dog"])
    assert (request.group, request.moments_per_video) == ("video", 3)
    request = SearchRequest.build(["a dog"], group="moment", moments_per_video=16)
    assert (request.group, request.moments_per_video) == ("moment", 16)
