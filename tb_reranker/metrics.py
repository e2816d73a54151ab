"""Retrieval metrics: ranks of the ground truth, R@k / MdR / MnR, and reranked rankings.

Scores are similarities (higher = better). Inputs may be numpy arrays, nested lists or torch
tensors (moved to the CPU); everything is computed in numpy float64.

Ties. A ranking is only defined up to the order of equal scores, so the rank of the ground
truth among tied items is a convention, chosen with ``ties=``:

- ``"pessimistic"`` (default, conservative): every non-ground-truth item whose score equals
  the ground truth's is counted ahead of it, ``rank = 1 + #{higher} + #{tied}``. A model
  that gives every video the same score gets the worst rank, never R@1 = 100.
- ``"optimistic"``: ``rank = 1 + #{strictly higher}``. This is what CLIP4Clip's
  ``compute_metrics`` (and the papers that reuse it) computes; with continuous scores ties
  almost never happen and both conventions agree.
- ``"mean"``: the expected rank under a uniformly random order of the tied items,
  ``1 + #{higher} + #{tied} / (r + 1)`` with ``r`` the number of ground truths sharing the best
  ground-truth score (``#{tied} / 2`` for one ground truth). Fractional.

With several ground truths per query (video->text: a video has several captions) the rank is
that of the best-ranked ground truth, i.e. of the highest ground-truth score, and the other
ground truths never count against it.

Video->text on datasets with several captions per video (MSVD, VATEX...). Two protocols, chosen
with ``protocol=`` of :func:`v2t_ranks`:

- ``"videos"`` (default; the published one, CLIP4Clip's ``tensor_video_to_text_sim`` and the
  papers that reuse it): a video query ranks the N videos, each represented by its best caption
  for that query (the maximum score over its captions); the rank is its own video's. Ranks lie in
  ``[1, N]``, so these numbers compare with published ones.
- ``"captions"``: the video's best caption is ranked against every other caption (of any video);
  a competitor video with several captions above it counts several times. Ranks lie in
  ``[1, M - C_v + 1]``; not comparable with published figures on multi-caption datasets.

With one caption per video both are the same.

Moments (a span of a video per query): :func:`temporal_iou` of two ``[start, end]`` intervals
and :func:`moment_recall`, the share of queries whose top-1 predicted window overlaps a
ground-truth window with IoU >= a threshold ("R1@IoU0.5"). An interval of zero length has IoU 0
with everything (itself included), so IoU is 1 exactly for equal intervals of positive length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from tb_reranker.errors import InvalidInputError

__all__ = [
    "TIES",
    "V2T_PROTOCOLS",
    "moment_recall",
    "ranks_from_scores",
    "retrieval_metrics",
    "rerank_topk",
    "temporal_iou",
    "v2t_ranks",
]

TIES = ("pessimistic", "optimistic", "mean")
Ties = Literal["pessimistic", "optimistic", "mean"]
V2T_PROTOCOLS = ("videos", "captions")
V2TProtocol = Literal["videos", "captions"]

_ROWS_PER_CHUNK = 1024  # bounds the [chunk, N] temporaries of ranks_from_scores


def _as_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """``value`` as a float64 array with ``ndim`` dimensions (torch tensors are detached)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().to("cpu").double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be numeric: {exc}") from exc
    if array.ndim != ndim:
        raise InvalidInputError(f"{name} must have {ndim} dimensions, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    return array


def _gt_mask(gt: Any, num_queries: int, num_items: int) -> np.ndarray:
    """Ground truth as a bool mask ``[Q, N]`` from ``[Q]`` ints or ``Q`` lists of ints."""
    if hasattr(gt, "detach"):
        gt = gt.detach().to("cpu").numpy()
    if isinstance(gt, np.ndarray) and gt.ndim == 1:
        gt = gt.tolist()
    if not isinstance(gt, Sequence) and not isinstance(gt, np.ndarray):
        raise InvalidInputError("gt must be a list of ints or a list of lists of ints")
    if len(gt) != num_queries:
        raise InvalidInputError(f"gt has {len(gt)} entries for {num_queries} queries")
    mask = np.zeros((num_queries, num_items), dtype=bool)
    for query, truth in enumerate(gt):
        indices = [truth] if isinstance(truth, (int, np.integer)) else truth
        if isinstance(indices, np.ndarray):
            indices = indices.tolist()
        if not isinstance(indices, (list, tuple)) or not indices:
            raise InvalidInputError(f"gt[{query}] must be an int or a non-empty list of ints")
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise InvalidInputError(f"gt[{query}] holds a non-integer {index!r}")
            if not 0 <= index < num_items:
                raise InvalidInputError(f"gt[{query}] index {index} out of range [0, {num_items})")
            mask[query, index] = True
    return mask


def ranks_from_scores(
    scores: Any, gt: Sequence[int] | Sequence[Sequence[int]] | Any, *, ties: Ties = "pessimistic"
) -> np.ndarray:
    """1-based rank of the (best) ground truth of each query.

    Args:
        scores: ``[Q, N]`` similarity of query ``q`` to item ``n`` (higher = better).
        gt: ``[Q]`` index of each query's ground-truth item, or ``Q`` non-empty lists of
            indices (several ground truths; the best-ranked one counts).
        ties: ``"pessimistic"`` (default), ``"optimistic"`` or ``"mean"`` (module docstring).

    Returns:
        ``[Q]`` ranks in ``[1, N]``: int64, or float64 for ``ties="mean"``.
    """
    if ties not in TIES:
        raise InvalidInputError(f"ties must be one of {list(TIES)}, got {ties!r}")
    scores = _as_array(scores, "scores", ndim=2)
    num_queries, num_items = scores.shape
    if num_queries == 0 or num_items == 0:
        raise InvalidInputError(f"scores must be non-empty, got shape {scores.shape}")
    mask = _gt_mask(gt, num_queries, num_items)
    ranks = np.empty(num_queries, dtype=np.float64)
    for start in range(0, num_queries, _ROWS_PER_CHUNK):
        chunk = scores[start : start + _ROWS_PER_CHUNK]  # [C, N]
        chunk_mask = mask[start : start + _ROWS_PER_CHUNK]  # [C, N]
        best = np.where(chunk_mask, chunk, -np.inf).max(axis=1, keepdims=True)  # [C, 1]
        others = ~chunk_mask
        higher = np.count_nonzero(others & (chunk > best), axis=1)  # [C]
        if ties == "optimistic":
            ranks[start : start + len(chunk)] = 1 + higher
            continue
        tied = np.count_nonzero(others & (chunk == best), axis=1)  # [C]
        if ties == "pessimistic":
            ranks[start : start + len(chunk)] = 1 + higher + tied
        else:
            tied_truths = np.count_nonzero(chunk_mask & (chunk == best), axis=1)  # [C], >= 1
            ranks[start : start + len(chunk)] = 1 + higher + tied / (tied_truths + 1)
    return ranks if ties == "mean" else ranks.astype(np.int64)


def v2t_ranks(
    scores: Any,
    texts_videos: Sequence[int] | Any,
    *,
    protocol: V2TProtocol = "videos",
    ties: Ties = "pessimistic",
) -> np.ndarray:
    """1-based video->text rank of each video's own captions (module docstring: protocols).

    Args:
        scores: ``[N, M]`` similarity of video ``v`` (query) to text ``t``.
        texts_videos: ``[M]`` the video each text describes (every video needs one or more).
        protocol: ``"videos"`` (default, published) or ``"captions"``.
        ties: the tie rule of :func:`ranks_from_scores`.

    Returns:
        ``[N]`` ranks: int64, or float64 for ``ties="mean"``.
    """
    if protocol not in V2T_PROTOCOLS:
        raise InvalidInputError(f"protocol must be one of {list(V2T_PROTOCOLS)}, got {protocol!r}")
    scores = _as_array(scores, "scores", ndim=2)
    num_videos, num_texts = scores.shape
    if hasattr(texts_videos, "detach"):
        texts_videos = texts_videos.detach().to("cpu").numpy()
    owners = np.asarray(texts_videos)
    if owners.shape != (num_texts,) or (
        owners.size and not np.issubdtype(owners.dtype, np.integer)
    ):
        raise InvalidInputError(
            f"texts_videos must be {num_texts} integer video indices, got {owners.dtype} "
            f"{owners.shape}"
        )
    if owners.size and (owners.min() < 0 or owners.max() >= num_videos):
        raise InvalidInputError(f"texts_videos holds a video index outside [0, {num_videos})")
    counts = np.bincount(owners, minlength=num_videos) if owners.size else np.zeros(num_videos)
    if num_videos == 0 or not counts.all():
        raise InvalidInputError("every video needs at least one caption among the texts")
    if protocol == "captions":
        texts_of: list[list[int]] = [[] for _ in range(num_videos)]
        for text, video in enumerate(owners.tolist()):
            texts_of[video].append(text)
        return ranks_from_scores(scores, texts_of, ties=ties)
    order = np.argsort(owners, kind="stable")  # texts grouped by video
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
    best = np.maximum.reduceat(scores[:, order], starts, axis=1)  # [N, N]: best caption per video
    return ranks_from_scores(best, np.arange(num_videos), ties=ties)


def retrieval_metrics(ranks: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
    """Recall at k, median and mean rank of 1-based ground-truth ranks.

    Args:
        ranks: ``[Q]`` 1-based ranks (from :func:`ranks_from_scores`).
        ks: the cut-offs of ``R@k``.

    Returns:
        ``{"R@1": %, "R@5": %, "R@10": %, "MdR": median rank, "MnR": mean rank,
        "num_queries": Q}``; ``R@k`` is the percentage (0-100) of queries with rank <= k.
    """
    ranks = _as_array(ranks, "ranks", ndim=1)
    if ranks.size == 0:
        raise InvalidInputError("ranks is empty: no queries to score")
    if np.any(ranks < 1):
        raise InvalidInputError("ranks are 1-based: found a rank < 1")
    metrics: dict[str, float | int] = {}
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        metrics[f"R@{k}"] = float(100.0 * np.mean(ranks <= k))
    metrics["MdR"] = float(np.median(ranks))
    metrics["MnR"] = float(np.mean(ranks))
    metrics["num_queries"] = int(ranks.size)
    return metrics


def rerank_topk(broad_scores: Any, topk_indices: Any, final_scores: Any) -> np.ndarray:
    """Full-gallery scores whose ranking puts the reranked top-K first.

    The K candidates of each query come first, ordered by their ``final_scores`` (ties among
    them kept as ties); every other item follows in its broad order. The returned values keep
    the differences of the inputs (top-K: ``final + offset`` with the offset lifting the lowest
    of them above the best other item by 1; others: their broad score), so they can go straight
    into :func:`ranks_from_scores`.

    Args:
        broad_scores: ``[Q, N]`` broad (first-stage) scores of the whole gallery.
        topk_indices: ``[Q, K]`` gallery indices of the reranked candidates (distinct per row).
        final_scores: ``[Q, K]`` reranked scores of those candidates.

    Returns:
        ``[Q, N]`` float64 scores.
    """
    broad = _as_array(broad_scores, "broad_scores", ndim=2)
    final = _as_array(final_scores, "final_scores", ndim=2)
    if hasattr(topk_indices, "detach"):
        topk_indices = topk_indices.detach().to("cpu").numpy()
    indices = np.asarray(topk_indices)
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        raise InvalidInputError(
            f"topk_indices must be a [Q, K] integer array, got {indices.dtype} {indices.shape}"
        )
    num_queries, num_items = broad.shape
    if indices.shape != final.shape or indices.shape[0] != num_queries:
        raise InvalidInputError(
            f"shapes disagree: broad_scores {broad.shape}, topk_indices {indices.shape}, "
            f"final_scores {final.shape}"
        )
    num_candidates = indices.shape[1]
    if num_candidates > num_items:
        raise InvalidInputError(f"K = {num_candidates} exceeds the gallery size N = {num_items}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_items):
        raise InvalidInputError(f"topk_indices out of range [0, {num_items})")
    sorted_indices = np.sort(indices, axis=1)
    if np.any(sorted_indices[:, 1:] == sorted_indices[:, :-1]):
        raise InvalidInputError("topk_indices repeats an item within a query")
    scores = broad.copy()
    if num_candidates == 0:
        return scores
    rows = np.arange(num_queries)[:, None]  # [Q, 1]
    in_topk = np.zeros_like(broad, dtype=bool)
    in_topk[rows, indices] = True
    rest_best = np.where(in_topk, -np.inf, broad).max(axis=1)  # [Q]; -inf when K == N
    rest_best = np.where(np.isfinite(rest_best), rest_best, 0.0)
    offset = rest_best - final.min(axis=1) + 1.0  # [Q]
    scores[rows, indices] = final + offset[:, None]
    return scores


def _windows(value: Any, name: str) -> np.ndarray:
    """One ``[start, end]`` window or a list of them as float64 ``[K, 2]`` (K >= 1), checked:
    finite, ``start <= end``."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().to("cpu").double().numpy()
    try:
        windows = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be numeric [start, end] windows: {exc}") from exc
    if not np.all(np.isfinite(windows)):
        raise InvalidInputError(f"{name} contains NaN or infinite values")
    if windows.shape == (2,):
        windows = windows[None]
    if windows.ndim != 2 or windows.shape[1] != 2 or len(windows) == 0:
        raise InvalidInputError(
            f"{name} must be a [start, end] window or a non-empty list of them, got shape "
            f"{windows.shape}"
        )
    if np.any(windows[:, 0] > windows[:, 1]):
        raise InvalidInputError(f"{name} holds a window whose start is after its end")
    return windows


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of windows ``a`` [..., 2] and ``b`` [..., 2] (broadcast); 0 where the union has
    zero length."""
    inter = np.clip(np.minimum(a[..., 1], b[..., 1]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def temporal_iou(a: Any, b: Any) -> float:
    """Intersection over union of two time intervals ``[start, end]`` (any unit, start <= end).

    In [0, 1], symmetric; 0 for disjoint or touching intervals and for any interval of zero
    length; 1 exactly when both are the same interval of positive length.
    """
    first, second = _windows(a, "a"), _windows(b, "b")
    if len(first) != 1 or len(second) != 1:
        raise InvalidInputError("temporal_iou takes one [start, end] interval on each side")
    return float(_iou(first[0], second[0]))


def moment_recall(
    predicted: Sequence[Any], ground_truth: Sequence[Any], thresholds: Sequence[float] = (0.5, 0.7)
) -> dict[str, float | int]:
    """R1@IoU: the percentage of queries whose top-1 window matches a ground-truth window.

    Args:
        predicted: ``Q`` entries, each one ``[start, end]`` window or a ranked list of them
            (the first is the top-1 prediction; the rest are ignored).
        ground_truth: ``Q`` entries, each one ``[start, end]`` window or a list of them (the
            one with the best IoU counts, as in QVHighlights' evaluation).
        thresholds: IoU thresholds in (0, 1]; a query counts when IoU >= threshold.

    Returns:
        ``{"R1@IoU0.5": %, "R1@IoU0.7": %, "mIoU": %, "num_queries": Q}`` (percentages 0-100;
        ``mIoU``: the mean best IoU of the top-1 windows).
    """
    if len(predicted) != len(ground_truth):
        raise InvalidInputError(
            f"{len(predicted)} predictions for {len(ground_truth)} ground-truth entries"
        )
    if len(predicted) == 0:
        raise InvalidInputError("no queries to score")
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 1:
            raise InvalidInputError(f"IoU thresholds must be numbers in (0, 1], got {t!r}")
    best = np.array(
        [
            _iou(_windows(p, f"predicted[{q}]")[0], _windows(g, f"ground_truth[{q}]")).max()
            for q, (p, g) in enumerate(zip(predicted, ground_truth, strict=True))
        ]
    )  # [Q]
    metrics: dict[str, float | int] = {
        f"R1@IoU{t:g}": float(100.0 * np.mean(best >= t)) for t in thresholds
    }
    metrics["mIoU"] = float(100.0 * best.mean())
    metrics["num_queries"] = len(best)
    return metrics
