"""Rerank by video (issue 22 §4): a video id stands for every stored segment of its video.

A real tiny TokenBinder and LMDB store holding a cut video (``long``: 4 segments), a video of 2
segments, one whose last segment the store lost, and one-segment videos. Before, a video id of a
cut video was scored as its segment 0 alone: a silent wrong result.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.requests import RerankRequest
from tb_reranker.rerank import Reranker
from tb_reranker.rerank.videos import collapse, combine, expand
from tb_reranker.server.testing import build_tiny_components
from tb_reranker.types import RerankedCandidate, RerankResult

# video -> (segment count, how many of its segments are stored)
VIDEOS = {"long": (4, 4), "mid": (2, 2), "gap": (3, 2), "s0": (1, 1), "s1": (1, 1), "s2": (1, 1)}
SPAN = 10.0  # every segment is 10 s long


def _keys(video: str, count: int) -> list[str]:
    return [video] + [f"{video}~{n}" for n in range(1, count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The components, the query (its I_1 = the [CLS] of ``long~2``: that segment is the best
    of its video, not segment 0) and every stored key."""
    components, ids = build_tiny_components(tmp_path_factory.mktemp("videos"), num_videos=14)
    store = components.reranker.store
    records = iter(store.get_many(ids)[i] for i in ids)
    cut = {}
    for video, (count, stored) in VIDEOS.items():
        for s, key in enumerate(_keys(video, count)[:stored]):
            record = next(records)
            cut[key] = dataclasses.replace(
                record,
                timestamps=SPAN * s + np.arange(record.num_frames, dtype=np.float32),
                segment=s,
                segments=count,
                start_s=SPAN * s,
                end_s=SPAN * (s + 1),
                duration_s=SPAN * count,
            )
    store.put_many(cut)
    reranker = components.reranker
    query = reranker.encode(["a red square then a blue circle"])
    query[0, 0] = cut["long~2"].video_cls()
    return components, query, cut


def _fields(candidate: RerankedCandidate) -> tuple:
    return (
        candidate.id,
        candidate.index,
        candidate.score,
        candidate.broad_score,
        candidate.delta,
        candidate.best_frame_s,
        candidate.reranked,
    )


def test_a_cut_video_scores_as_its_best_segment_with_its_span(world):
    components, query, cut = world
    reranker = components.reranker
    videos = ["s0", "long", "mid", "s1"]
    (result,) = reranker.rerank(query, [videos])  # as every caller did before: no new argument
    keys = [key for video in videos for key in _keys(video, VIDEOS[video][0])]
    assert len(keys) <= reranker.top_k  # every segment is reranked
    (explicit,) = reranker.rerank(query, [keys], candidates_are="segment")
    by_key = {c.id: c for c in explicit.candidates}
    assert [c.id for c in result.candidates] == sorted(
        videos, key=lambda v: -max(by_key[k].score for k in _keys(v, VIDEOS[v][0]))
    )
    for candidate in result.candidates:
        segments = [by_key[k] for k in _keys(candidate.id, VIDEOS[candidate.id][0])]
        best = max(segments, key=lambda c: c.score)
        assert candidate.score == best.score  # before: segment 0's alone
        assert (candidate.broad_score, candidate.delta) == (best.broad_score, best.delta)
        assert candidate.index == videos.index(candidate.id)
        record = cut[best.id]
        assert (candidate.start_s, candidate.end_s) == (record.start_s, record.end_s)
        assert candidate.best_frame_s == best.best_frame_s
    long = next(c for c in result.candidates if c.id == "long")
    assert (long.start_s, long.end_s) == (20.0, 30.0)  # long~2, whose [CLS] is I_1
    assert by_key["long"].score < long.score
    assert result.missing_ids == []


def test_one_segment_videos_answer_exactly_as_by_segment(world):
    """For one-segment videos, by video (the default) is today's answer, bit for bit: computed
    and given broad scores (ties kept in the order asked), top_n, missing ids."""
    components, query, _ = world
    reranker = components.reranker
    ids = ["s2", "s0", "ghost", "s1"]
    for scores in (None, [[0.4, 0.7, 0.1, 0.4]]):
        for top_n in (None, 2):
            (by_video,) = reranker.rerank(query, [ids], scores, top_n=top_n)
            (by_key,) = reranker.rerank(query, [ids], scores, top_n=top_n, candidates_are="segment")
            assert [_fields(c) for c in by_video.candidates] == [
                _fields(c) for c in by_key.candidates
            ]
            assert by_video.missing_ids == by_key.missing_ids == ["ghost"]
            assert all(c.start_s == 0.0 and c.end_s == SPAN for c in by_video.candidates)
            assert all(c.start_s is None for c in by_key.candidates)


def test_a_given_video_score_is_its_best_segments(world):
    """S'_v given: the segment with the largest cosine gets S'_v, the others their cosine gap
    below it; the same as sending those scores per segment."""
    components, query, _ = world
    reranker = components.reranker
    keys = _keys("long", 4) + ["s0"]
    (cosines,) = reranker.rerank(query, [keys], candidates_are="segment")
    cos = {c.id: c.broad_score for c in cosines.candidates}
    best = max(cos[k] for k in _keys("long", 4))
    given = {"long": 0.25, "s0": 0.5}
    shifted = [given["long"] + cos[k] - best for k in _keys("long", 4)] + [given["s0"]]
    (explicit,) = reranker.rerank(query, [keys], [shifted], candidates_are="segment")
    (result,) = reranker.rerank(query, [["long", "s0"]], [[given["long"], given["s0"]]])
    by_key = {c.id: c for c in explicit.candidates}
    long = next(c for c in result.candidates if c.id == "long")
    top = max((by_key[k] for k in _keys("long", 4)), key=lambda c: c.score)
    assert (long.score, long.broad_score) == (top.score, top.broad_score)
    s0 = next(c for c in result.candidates if c.id == "s0")
    assert s0.broad_score == 0.5 and s0.score == by_key["s0"].score


def test_segment_keys_are_refused_by_video_and_taken_by_segment(world):
    components, query, _ = world
    reranker = components.reranker
    with pytest.raises(InvalidInputError, match="'long~1' is a segment key"):
        reranker.rerank(query, [["s0", "long~1"]])
    with pytest.raises(InvalidInputError, match="candidates_are must be one of video, segment"):
        reranker.rerank(query, [["s0"]], candidates_are="moment")
    (result,) = reranker.rerank(query, [["s0", "long~1"]], candidates_are="segment")
    assert {c.id for c in result.candidates} == {"s0", "long~1"}


def test_missing_videos_reported_or_strict_and_lost_segments_skipped(world, caplog):
    components, query, cut = world
    reranker = components.reranker
    (result,) = reranker.rerank(query, [["gap", "ghost", "mid"]])
    assert result.missing_ids == ["ghost"]
    assert [c.index for c in result.candidates if c.id == "gap"] == [0]
    with pytest.raises(NotFoundError, match="ghost"):
        reranker.rerank(query, [["gap", "ghost"]], strict=True)
    with caplog.at_level(logging.WARNING, logger="tb_reranker.rerank.videos"):
        (gap,) = reranker.rerank(query, [["gap"]])
    assert "'gap~2'" in caplog.text  # the store lost it: scored without it, and said so
    (explicit,) = reranker.rerank(query, [["gap", "gap~1"]], candidates_are="segment")
    assert gap.candidates[0].score == max(c.score for c in explicit.candidates)


def test_batched_cached_and_uncached_calls_agree(world):
    components, query, _ = world
    reranker = components.reranker
    other = reranker.encode(["a blue circle"])
    queries = np.concatenate([query, other])
    lists = [["long", "s0", "mid"], ["mid", "s2", "long", "gap"]]
    together = reranker.rerank(queries, lists)
    cold = Reranker(reranker.model, reranker.store, cache_size=0)
    for q in range(2):
        for alone in (
            reranker.rerank(queries[q : q + 1], [lists[q]])[0],  # cached by now
            cold.rerank(queries[q : q + 1], [lists[q]])[0],  # read from the store
        ):
            assert [c.id for c in alone.candidates] == [c.id for c in together[q].candidates]
            assert [(c.start_s, c.end_s) for c in alone.candidates] == [
                (c.start_s, c.end_s) for c in together[q].candidates
            ]
            for a, b in zip(alone.candidates, together[q].candidates, strict=True):
                assert a.score == pytest.approx(b.score, abs=1e-5)


def test_invalidating_a_video_drops_every_segment_of_it(world):
    components, query, _ = world
    reranker = components.reranker
    reranker.rerank(query, [["long", "mid", "s0"]])
    cached = set(reranker.cache._slots)
    assert {"long", "long~3", "mid~1", "s0"} <= cached
    reranker.invalidate(["long", "s0", "mid~1"])
    left = set(reranker.cache._slots)
    assert not left & {"long", "long~1", "long~2", "long~3", "s0", "mid~1"}
    assert "mid" in left  # a segment key drops that segment only


def test_expand_combine_collapse():
    """The logic alone: hashes follow their video to every segment; a given video score goes
    to its best segment by cosine (ties: the order asked); each video answered once."""
    request = RerankRequest(
        indicators=np.zeros((1, 4, 8), dtype=np.float32),
        candidates_ids=[["a", "ghost", "b", "c"]],
        broad_scores=[[0.9, 0.1, 0.5, 0.5]],
        contents_hashes=[["ha", None, "hb", "hc"]],
        top_n=2,
    )
    expansion = expand(request, {"a": 3, "b": 1, "c": 1})
    assert expansion.request.candidates_ids == [["a", "a~1", "a~2", "b", "c"]]
    assert expansion.request.contents_hashes == [["ha", "ha", "ha", "hb", "hc"]]
    assert expansion.owners == [[0, 0, 0, 2, 3]] and expansion.missing == [["ghost"]]
    assert expansion.request.candidates_are == "segment"
    with pytest.raises(NotFoundError, match="ghost"):
        expand(dataclasses.replace(request, strict=True), {"a": 3, "b": 1, "c": 1})
    cosine = [(1, "a~1", 0.8), (4, "c", 0.7), (3, "b", 0.6), (0, "a", 0.2), (2, "a~2", 0.1)]
    (plan,) = combine([cosine], expansion)
    assert plan == [
        (1, "a~1", 0.9),
        (3, "b", 0.5),  # tied with c: b was asked first
        (4, "c", 0.5),
        (0, "a", pytest.approx(0.9 - 0.6)),
        (2, "a~2", pytest.approx(0.9 - 0.7)),
    ]
    ranked = [
        RerankedCandidate("b", 3, 0.95, 0.5, 0.45, None),
        RerankedCandidate("a~1", 1, 0.93, 0.9, 0.03, 12.0),
        RerankedCandidate("a", 0, 0.5, 0.3, 0.2, 1.0),
        RerankedCandidate("c", 4, 0.4, 0.5, -0.1, None),
    ]
    spans = {"a": (0.0, 10.0), "a~1": (10.0, 20.0), "b": (0.0, 4.0), "c": (0.0, 7.0)}
    (result,) = collapse([RerankResult(ranked)], expansion, request, spans)
    assert [(c.id, c.index, c.score, c.start_s, c.end_s) for c in result.candidates] == [
        ("b", 2, 0.95, 0.0, 4.0),
        ("a", 0, 0.93, 10.0, 20.0),  # a's best segment, a~1
    ]
    assert result.missing_ids == ["ghost"]


def test_each_segment_is_scored_by_the_cosine_of_its_own_cls(world):
    """S' of a segment: cos(I_1, its [CLS]), the normalised mean of its frame tokens (what
    ingest writes to Milvus, ``FrameRecord.video_cls``), up to the store's float16."""
    components, query, cut = world
    (result,) = components.reranker.rerank(query, [list(VIDEOS)])
    for candidate in result.candidates:
        count = VIDEOS[candidate.id][1]
        key = next(
            k
            for k in _keys(candidate.id, count)
            if (cut[k].start_s, cut[k].end_s) == (candidate.start_s, candidate.end_s)
        )
        cosine = float(cut[key].video_cls() @ query[0, 0])
        assert candidate.broad_score == pytest.approx(cosine, abs=1e-3)
    long = next(c for c in result.candidates if c.id == "long")
    assert long.broad_score == pytest.approx(1.0, abs=1e-3)
