"""Retrieval metrics: hand-checked cases, tie conventions, multi-gt, reranking, brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.metrics import ranks_from_scores, rerank_topk, retrieval_metrics, v2t_ranks


def _brute_rank(row: np.ndarray, truths: list[int], ties: str) -> float:
    """Rank of the first ground truth in a full sort, ties broken per the convention."""
    truth_set = set(truths)

    def first_truth(order: list[int]) -> int:
        return next(pos for pos, item in enumerate(order) if item in truth_set) + 1

    items = list(range(len(row)))
    if ties == "pessimistic":  # among equal scores, non-truths first
        return first_truth(sorted(items, key=lambda i: (-row[i], i in truth_set)))
    if ties == "optimistic":  # among equal scores, truths first
        return first_truth(sorted(items, key=lambda i: (-row[i], i not in truth_set)))
    # mean: average over every order of the tied groups (small inputs only)
    groups = [[i for i in items if row[i] == value] for value in sorted(set(row), reverse=True)]
    total, count = 0.0, 0
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        total += first_truth([i for perm in perms for i in perm])
        count += 1
    return total / count


def test_hand_checked_single_ground_truth() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # gt 0 -> rank 1
            [0.9, 0.1, 0.5, 0.3],  # gt 2 -> rank 2
            [0.9, 0.1, 0.5, 0.3],  # gt 1 -> rank 4
        ]
    )
    assert ranks_from_scores(scores, [0, 2, 1]).tolist() == [1, 2, 4]
    assert ranks_from_scores(scores, [0, 2, 1]).dtype == np.int64


def test_ties_conventions_hand_checked() -> None:
    scores = np.array([[0.5, 0.7, 0.5, 0.5, 0.1]])  # gt 0 tied with items 2 and 3, item 1 higher
    assert ranks_from_scores(scores, [0], ties="pessimistic").tolist() == [4]
    assert ranks_from_scores(scores, [0], ties="optimistic").tolist() == [2]
    assert ranks_from_scores(scores, [0], ties="mean").tolist() == [3.0]
    assert ranks_from_scores(scores, [0]).tolist() == [4]  # default is conservative
    constant = np.zeros((3, 5))  # a collapsed model: every score equal
    assert ranks_from_scores(constant, [0, 1, 2]).tolist() == [5, 5, 5]
    assert retrieval_metrics(ranks_from_scores(constant, [0, 1, 2]))["R@1"] == 0.0
    assert (
        retrieval_metrics(ranks_from_scores(constant, [0, 1, 2], ties="optimistic"))["R@1"] == 100.0
    )
    with pytest.raises(InvalidInputError, match="ties must be one of"):
        ranks_from_scores(scores, [0], ties="random")


def test_multiple_ground_truths_take_the_best_rank() -> None:
    scores = np.array(
        [
            [0.1, 0.8, 0.9, 0.3, 0.8],  # gts {0, 3}: best 0.3 -> behind 0.8, 0.9, 0.8 -> 4
            [0.1, 0.8, 0.9, 0.3, 0.8],  # gts {1, 4} tie at 0.8: other gts never count -> 2
            [0.5, 0.5, 0.5, 0.2, 0.2],  # gts {0, 1} tied with item 2
        ]
    )
    gts = [[0, 3], [1, 4], [0, 1]]
    assert ranks_from_scores(scores, gts, ties="pessimistic").tolist() == [4, 2, 2]
    assert ranks_from_scores(scores, gts, ties="optimistic").tolist() == [4, 2, 1]
    # mean, row 3: one non-gt tied with two gts -> first gt at 1 + 1/3 on average
    assert ranks_from_scores(scores, gts, ties="mean") == pytest.approx([4, 2, 4 / 3])


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "mean"])
def test_against_brute_force_on_random_scores_with_ties(ties: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        num_queries, num_items = rng.integers(1, 5), rng.integers(1, 7)
        scores = rng.integers(0, 3, size=(num_queries, num_items)).astype(np.float32)
        gts = [
            sorted(
                rng.choice(num_items, size=rng.integers(1, num_items + 1), replace=False).tolist()
            )
            for _ in range(num_queries)
        ]
        expected = [_brute_rank(scores[q], gts[q], ties) for q in range(num_queries)]
        assert ranks_from_scores(scores, gts, ties=ties) == pytest.approx(expected)


def test_large_random_matches_argsort_and_chunking() -> None:
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((2100, 300))  # > one chunk of rows; continuous: no ties
    gt = rng.integers(0, 300, size=2100)
    order = np.argsort(-scores, axis=1)
    expected = np.argmax(order == gt[:, None], axis=1) + 1
    for ties in ("pessimistic", "optimistic", "mean"):
        assert np.array_equal(ranks_from_scores(scores, gt, ties=ties), expected)
    # torch tensors and numpy gt arrays are accepted
    got = ranks_from_scores(torch.from_numpy(scores).float(), torch.from_numpy(gt))
    assert np.array_equal(got, expected)


def test_retrieval_metrics_hand_checked() -> None:
    metrics = retrieval_metrics([1, 2, 5, 6, 11, 1])
    assert metrics["R@1"] == pytest.approx(100 * 2 / 6)
    assert metrics["R@5"] == pytest.approx(100 * 4 / 6)
    assert metrics["R@10"] == pytest.approx(100 * 5 / 6)
    assert metrics["MdR"] == 3.5
    assert metrics["MnR"] == pytest.approx(26 / 6)
    assert metrics["num_queries"] == 6
    assert set(retrieval_metrics([3], ks=(1, 50))) == {"R@1", "R@50", "MdR", "MnR", "num_queries"}
    with pytest.raises(InvalidInputError, match="empty"):
        retrieval_metrics([])
    with pytest.raises(InvalidInputError, match="1-based"):
        retrieval_metrics([0, 1])
    with pytest.raises(InvalidInputError, match="positive int"):
        retrieval_metrics([1], ks=(0,))


def test_rerank_topk_hand_checked() -> None:
    broad = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    # top-3 by broad = [0, 1, 2]; reranker prefers 2, then 0, then 1
    scores = rerank_topk(broad, [[0, 1, 2]], [[0.2, -0.5, 3.0]])
    assert np.argsort(-scores[0]).tolist() == [2, 0, 1, 3, 4]
    assert scores[0, 3] == 0.6 and scores[0, 4] == 0.5  # the rest keep broad scores
    assert scores[0, 1] == pytest.approx(0.6 + 1.0)  # lowest reranked = best other + 1
    assert ranks_from_scores(scores, [1]).tolist() == [3]
    assert ranks_from_scores(scores, [3]).tolist() == [4]
    # a reranked item beats every non-candidate even if its broad score was lower
    scores = rerank_topk(broad, [[4, 3]], [[1.0, 0.0]])
    assert np.argsort(-scores[0]).tolist() == [4, 3, 0, 1, 2]
    # ties among the reranked scores stay ties (tie conventions still apply)
    scores = rerank_topk(broad, [[0, 1]], [[0.5, 0.5]])
    assert scores[0, 0] == scores[0, 1]
    assert ranks_from_scores(scores, [1], ties="pessimistic").tolist() == [2]
    # K == N: everything reranked
    scores = rerank_topk(broad, [[4, 3, 2, 1, 0]], [[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert np.argsort(-scores[0]).tolist() == [4, 3, 2, 1, 0]


def test_rerank_topk_random_against_reference() -> None:
    rng = np.random.default_rng(2)
    num_queries, num_items, k = 30, 50, 10
    broad = rng.standard_normal((num_queries, num_items)).astype(np.float32)
    topk = np.argsort(-broad, axis=1)[:, :k]
    final = rng.standard_normal((num_queries, k))
    scores = rerank_topk(broad, topk, final)
    assert scores.shape == (num_queries, num_items) and scores.dtype == np.float64
    for q in range(num_queries):
        expected = topk[q][np.argsort(-final[q])].tolist()
        rest = [i for i in np.argsort(-broad[q]).tolist() if i not in set(topk[q].tolist())]
        assert np.argsort(-scores[q]).tolist() == expected + rest
    # torch inputs work the same
    torch_scores = rerank_topk(
        torch.from_numpy(broad), torch.from_numpy(topk), torch.from_numpy(final)
    )
    assert np.array_equal(torch_scores, scores)


@pytest.mark.parametrize(
    ("broad", "indices", "final", "match"),
    [
        (np.zeros((2, 4)), [[0, 1]], [[1.0, 2.0]], "shapes disagree"),
        (np.zeros((1, 4)), [[0, 0]], [[1.0, 2.0]], "repeats"),
        (np.zeros((1, 4)), [[0, 4]], [[1.0, 2.0]], "out of range"),
        (np.zeros((1, 4)), [[0.0, 1.0]], [[1.0, 2.0]], "integer"),
        (np.zeros((1, 2)), [[0, 1, 1]], [[1.0, 2.0, 3.0]], "exceeds"),
        (np.full((1, 4), np.nan), [[0, 1]], [[1.0, 2.0]], "NaN"),
        (np.zeros(4), [[0, 1]], [[1.0, 2.0]], "2 dimensions"),
    ],
)
def test_rerank_topk_bad_input(broad, indices, final, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        rerank_topk(broad, indices, final)


@pytest.mark.parametrize(
    ("scores", "gt", "match"),
    [
        (np.zeros((2, 3)), [0], "1 entries for 2 queries"),
        (np.zeros((1, 3)), [3], "out of range"),
        (np.zeros((1, 3)), [[]], "non-empty"),
        (np.zeros((1, 3)), [1.5], "non-empty list of ints"),
        (np.zeros((1, 3)), [[0, 1.0]], "non-integer"),
        (np.zeros((0, 3)), [], "non-empty"),
        (np.array([[0.1, np.inf]]), [0], "NaN or infinite"),
        (np.zeros(3), [0], "2 dimensions"),
    ],
)
def test_ranks_bad_input(scores, gt, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        ranks_from_scores(scores, gt)


# ---- video->text on several captions per video (issue 13 §3) -----------------------------------
# 4 videos; captions c0, c1 of v0; c2 of v1; c3, c4, c5 of v2; c6 of v3. Rows: video queries.
_OWNERS = [0, 0, 1, 2, 2, 2, 3]
_V2T_SCORES = np.array(
    [
        [0.50, 0.90, 0.90, 0.10, 0.95, 0.20, 0.30],  # v0
        [0.80, 0.70, 0.60, 0.65, 0.10, 0.62, 0.00],  # v1
        [0.20, 0.20, 0.30, 0.40, 0.40, 0.10, 0.40],  # v2
        [0.00, 0.10, 0.20, 0.30, 0.30, 0.30, 0.25],  # v3
    ]
)
# "videos" (published): each video is represented by its best caption for the query, so the
# rows become [N, N] matrices of group maxima:
#   v0: (0.90, 0.90, 0.95, 0.30) own 0.90: 1 higher (v2), 1 tied (v1)  -> 3 / 2 / 2.5
#   v1: (0.80, 0.60, 0.65, 0.00) own 0.60: 2 higher (v0, v2)           -> 3 / 3 / 3
#   v2: (0.20, 0.30, 0.40, 0.40) own 0.40: 0 higher, 1 tied (v3)       -> 2 / 1 / 1.5
#   v3: (0.10, 0.20, 0.30, 0.25) own 0.25: 1 higher (v2)               -> 2 / 2 / 2
# "captions" (ours before issue 13): the best own caption against every other caption:
#   v0: own best 0.90 (c1): higher c4, tied c2                          -> 3 / 2 / 2.5
#   v1: own 0.60: higher c0, c1, c3, c5                                 -> 5 / 5 / 5
#   v2: own best 0.40 (c3 and c4, 2 truths): tied c6 -> 2 / 1 / 1 + 1/(2+1)
#   v3: own 0.25: higher c3, c4, c5 (three captions of one video)       -> 4 / 4 / 4
_EXPECTED_V2T = {
    ("videos", "pessimistic"): [3, 3, 2, 2],
    ("videos", "optimistic"): [2, 3, 1, 2],
    ("videos", "mean"): [2.5, 3.0, 1.5, 2.0],
    ("captions", "pessimistic"): [3, 5, 2, 4],
    ("captions", "optimistic"): [2, 5, 1, 4],
    ("captions", "mean"): [2.5, 5.0, 1 + 1 / 3, 4.0],
}


@pytest.mark.parametrize(("protocol", "ties"), sorted(_EXPECTED_V2T))
def test_v2t_protocols_on_a_hand_checked_multi_caption_fixture(protocol, ties):
    ranks = v2t_ranks(_V2T_SCORES, _OWNERS, protocol=protocol, ties=ties)
    np.testing.assert_allclose(ranks, _EXPECTED_V2T[(protocol, ties)])
    # owners given in any order (texts of a video not contiguous) rank the same
    shuffle = np.array([6, 2, 0, 5, 3, 1, 4])
    shuffled = v2t_ranks(
        _V2T_SCORES[:, shuffle], np.array(_OWNERS)[shuffle], protocol=protocol, ties=ties
    )
    np.testing.assert_allclose(shuffled, ranks)


def test_v2t_default_is_the_published_protocol_and_its_recalls():
    ranks = v2t_ranks(_V2T_SCORES, _OWNERS)
    assert ranks.tolist() == [3, 3, 2, 2]  # "videos", pessimistic
    metrics = retrieval_metrics(ranks, ks=(1, 2, 3))
    assert (metrics["R@1"], metrics["R@2"], metrics["R@3"]) == (0.0, 50.0, 100.0)
    assert (metrics["MdR"], metrics["MnR"]) == (2.5, 2.5)
    paper = retrieval_metrics(v2t_ranks(_V2T_SCORES, _OWNERS, ties="optimistic"), ks=(1, 2, 3))
    assert (paper["R@1"], paper["R@2"], paper["R@3"]) == (25.0, 75.0, 100.0)
    ours = retrieval_metrics(v2t_ranks(_V2T_SCORES, _OWNERS, protocol="captions"), ks=(1, 2, 3))
    assert (ours["R@1"], ours["R@2"], ours["R@3"]) == (0.0, 25.0, 50.0)


def test_v2t_protocols_agree_with_one_caption_per_video():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 6)).astype(float)  # many ties
    owners = rng.permutation(6)
    for ties in ("pessimistic", "optimistic", "mean"):
        np.testing.assert_array_equal(
            v2t_ranks(scores, owners, ties=ties),
            v2t_ranks(scores, owners, protocol="captions", ties=ties),
        )


def test_v2t_ranks_bad_inputs_are_typed():
    with pytest.raises(InvalidInputError, match="protocol"):
        v2t_ranks(_V2T_SCORES, _OWNERS, protocol="texts")
    with pytest.raises(InvalidInputError, match="at least one caption"):
        v2t_ranks(_V2T_SCORES, [0, 0, 1, 2, 2, 2, 2])
    with pytest.raises(InvalidInputError, match="7 integer"):
        v2t_ranks(_V2T_SCORES, _OWNERS[:-1])
    with pytest.raises(InvalidInputError, match="outside"):
        v2t_ranks(_V2T_SCORES, [0, 0, 1, 2, 2, 2, 4])
    with pytest.raises(InvalidInputError, match="integer"):
        v2t_ranks(_V2T_SCORES, [0.0, 0, 1, 2, 2, 2, 3])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_v2t_videos_protocol_property(data):
    """Property: the published protocol is the captions protocol on the [N, N] matrix of each
    video's best caption, and never ranks a video worse than the captions protocol does."""
    num_videos = data.draw(st.integers(1, 5))
    extra = data.draw(st.lists(st.integers(0, num_videos - 1), max_size=6))
    owners = np.array(data.draw(st.permutations(list(range(num_videos)) + extra)))
    scores = np.array(
        data.draw(
            st.lists(
                st.lists(st.integers(0, 3), min_size=len(owners), max_size=len(owners)),
                min_size=num_videos,
                max_size=num_videos,
            )
        ),
        dtype=float,
    )
    best = np.stack([scores[:, owners == v].max(axis=1) for v in range(num_videos)], axis=1)
    for ties in ("pessimistic", "optimistic"):
        videos = v2t_ranks(scores, owners, ties=ties)
        expected = [_brute_rank(best[v], [v], ties) for v in range(num_videos)]
        np.testing.assert_array_equal(videos, expected)
        assert (videos <= v2t_ranks(scores, owners, protocol="captions", ties=ties)).all()
