"""Retrieval evaluation of a TokenBinder: broad view vs broad + focused view, both directions.

Text→video: every caption is a query over all N videos; the broad view ranks by
S' = cos(I_1, f_[CLS]); the focused view reranks each query's top-K by S = S' + Δ and keeps the
rest in broad order (:func:`tb_reranker.metrics.rerank_topk`). Video→text: each video queries all
M captions; its focused view reranks the video's top-K captions with ``model.focused_scores_v2t``
(the model's video→text twin, the one its ℓ_focus,t trains), and the rank follows the protocol of
:func:`tb_reranker.metrics.v2t_ranks`: by default (``"videos"``, published) the N videos are
ranked, each by its best caption; ``"captions"`` ranks the best own caption among all captions.
With an untrained head (Δ = 0) both views are identical.

Every metrics dict names the ``protocol`` and the ``ties`` rule that produced it; beside the
default (pessimistic ties) the result holds the same metrics with ``ties="optimistic"``, the rule
of CLIP4Clip's ``compute_metrics`` that published figures use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tb_reranker.errors import InvalidInputError
from tb_reranker.metrics import (
    TIES,
    V2T_PROTOCOLS,
    ranks_from_scores,
    rerank_topk,
    retrieval_metrics,
    v2t_ranks,
)
from tb_reranker.training.features import (
    VideoCaptionSet,
    as_video_caption_set,
    load_features,
    load_model_frames,
)

__all__ = [
    "evaluate",
    "encode_texts",
    "score_matrices",
    "text_to_video_topk",
    "recall_curve",
    "plot_recall_curves",
    "format_table",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, texts: list[str], batch_size: int, progress: bool
) -> torch.Tensor:
    """texts [M] → indicators [M, m, D] float32 on the CPU."""
    parts = []
    from tb_reranker.progress import progress as show

    starts = range(0, len(texts), batch_size)
    for start in show(starts, desc="encode texts", unit="batch", enabled=progress):
        parts.append(model.encode_text(texts[start : start + batch_size]).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def score_matrices(
    model: torch.nn.Module,
    indicators: torch.Tensor,
    videos_cls: torch.Tensor,
    frames_tokens: torch.Tensor,
    *,
    k: int,
    batch_size: int = 64,
    frames_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Broad scores and the focused scores of each query's top-K, both directions.

    indicators: [M, m, D], videos_cls: [N, D], frames_tokens: [N, T, D] (CPU tensors);
    frames_mask: [N, T] bool (False = padded frame: no attention) or None.
    Returns ``broad`` [M, N] (S'), ``candidates`` [M, K'] (each text's top-K' videos, K' =
    min(k, N)), ``final`` [M, K'] (S' + Δ of those), and for video→text ``candidates_v``
    [N, K''] (each video's top-K'' texts, K'' = min(k, M)) with ``final_v`` [N, K''].
    """
    num_texts, num_videos = indicators.shape[0], videos_cls.shape[0]
    broad, candidates, final = text_to_video_topk(
        model,
        indicators,
        videos_cls,
        frames_tokens,
        k=k,
        batch_size=batch_size,
        frames_mask=frames_mask,
    )
    was_training = model.training
    model.eval()
    # video -> text: each video's top-K texts, scored by the model's video→text focused view
    k_v = min(k, num_texts)
    candidates_v = broad.t().topk(k_v, dim=1).indices  # [N, K'']
    finals_v = []
    for start in range(0, num_videos, batch_size):
        chunk = candidates_v[start : start + batch_size]  # [b, K'']
        scores = model.focused_scores_v2t(
            frames_tokens[start : start + batch_size],  # [b, T, D]
            videos_cls[start : start + batch_size],  # [b, D]
            indicators[chunk],  # [b, K'', m, D]
            frames_mask=None if frames_mask is None else frames_mask[start : start + batch_size],
        )
        finals_v.append(scores.final.float().cpu())
    model.train(was_training)
    return {
        "broad": broad,
        "candidates": candidates,
        "final": final,
        "candidates_v": candidates_v,
        "final_v": torch.cat(finals_v),
    }


@torch.no_grad()
def text_to_video_topk(
    model: torch.nn.Module,
    indicators: torch.Tensor,
    videos_cls: torch.Tensor,
    frames_tokens: torch.Tensor,
    *,
    k: int,
    batch_size: int = 64,
    frames_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text→video half of :func:`score_matrices`: ``broad`` [M, N], each text's top-K'
    ``candidates`` [M, K'] (K' = min(k, N)) and their ``final`` scores S' + Δ [M, K'], the K'
    candidates compared jointly by ``model.focused_scores``."""
    num_texts, num_videos = indicators.shape[0], videos_cls.shape[0]
    k_eff = min(k, num_videos)
    model_k = int(model.top_k)
    if k > model_k and getattr(model.config, "head", "") in ("listwise", "listwise_slots"):
        raise InvalidInputError(f"the listwise head scores at most K={model_k} candidates, got {k}")
    width = max(k_eff, model_k)  # pad short candidate lists to the model's K with a mask
    broad = indicators[:, 0] @ videos_cls.t()  # [M, N]
    candidates = broad.topk(k_eff, dim=1).indices  # [M, K']
    was_training = model.training
    model.eval()
    finals = []
    for start in range(0, num_texts, batch_size):
        chunk = candidates[start : start + batch_size]  # [b, K']
        mask = torch.ones(chunk.shape[0], width, dtype=torch.bool)
        if width > k_eff:
            mask[:, k_eff:] = False
            chunk = torch.nn.functional.pad(chunk, (0, width - k_eff), value=0)
        scores = model.focused_scores(
            indicators[start : start + batch_size],
            videos_cls[chunk],  # [b, K, D]
            frames_tokens[chunk],  # [b, K, T, D]
            mask,
            frames_mask=None if frames_mask is None else frames_mask[chunk],  # [b, K, T]
        )
        finals.append(scores.final[:, :k_eff].float().cpu())
    model.train(was_training)
    return broad, candidates, torch.cat(finals)


def recall_curve(ranks: np.ndarray, max_k: int) -> list[float]:
    """R@1..R@max_k (percent) of 1-based ``ranks``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return [float(100.0 * np.mean(ranks <= k)) for k in range(1, max_k + 1)]


def evaluate(
    model: torch.nn.Module,
    dataset: Any,
    *,
    k: int | None = None,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = False,
    curve_k: int | None = None,
    v2t_protocol: str = "videos",
    ties: str = "pessimistic",
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (a VideoCaptionSet or a ``tb_reranker.data`` dataset).

    Returns ``{"t2v": {"broad": metrics, "reranked": metrics}, "v2t": {...}, "k": K,
    "num_videos": N, "num_texts": M, "ties": ties, "v2t_protocol": v2t_protocol,
    "optimistic": {"t2v": ..., "v2t": ...}, "curves": {"t2v"|"v2t": {"broad"|"reranked":
    [R@1..]}}}`` where metrics = ``retrieval_metrics`` (R@1/5/10 in percent, MdR, MnR) plus the
    ``protocol`` ("videos": videos are ranked; "captions": captions are) and the ``ties`` rule
    that produced them; ``"optimistic"`` holds them with optimistic ties (paper-comparable).
    Frames are decoded once into ``cache_dir`` (and the video features cached there by model
    fingerprint).
    """
    videos: VideoCaptionSet = as_video_caption_set(dataset)
    k = _check_settings(int(k if k is not None else model.top_k), v2t_protocol, ties)
    device = next(model.parameters()).device
    frame_set = load_model_frames(
        model, videos, cache_dir=cache_dir, workers=workers, progress=progress
    )
    videos = frame_set.videos
    features = load_features(
        model,
        frame_set,
        cache_dir=cache_dir,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    texts = [caption for captions in videos.captions for caption in captions]
    indicators = encode_texts(model, texts, batch_size, progress)  # [M, m, D]
    mats = score_matrices(
        model,
        indicators,
        features.cls,
        features.frames_tokens,
        k=k,
        batch_size=batch_size,
        frames_mask=frame_set.masks,
    )
    ranks = _ranks(mats, videos.captions, v2t_protocol, ties)
    k_eff = mats["candidates"].shape[1]
    max_k = curve_k or max(10, k_eff + 5)
    protocols = {"t2v": "videos", "v2t": v2t_protocol}
    result: dict[str, Any] = {
        "k": k_eff,
        "num_videos": len(videos),
        "num_texts": len(texts),
        "ties": ties,
        "v2t_protocol": v2t_protocol,
        **_metrics_of(ranks, protocols, ties),
        "optimistic": _metrics_of(
            _ranks(mats, videos.captions, v2t_protocol, "optimistic"), protocols, "optimistic"
        ),
        "curves": {
            d: {v: recall_curve(r, max_k) for v, r in by_view.items()}
            for d, by_view in ranks.items()
        },
    }
    log.info(
        "t2v R@1 broad %.1f -> reranked %.1f; v2t R@1 broad %.1f -> reranked %.1f (N=%d, M=%d, K=%d)",
        result["t2v"]["broad"]["R@1"],
        result["t2v"]["reranked"]["R@1"],
        result["v2t"]["broad"]["R@1"],
        result["v2t"]["reranked"]["R@1"],
        len(videos),
        len(texts),
        k_eff,
    )
    return result


def _check_settings(k: int, v2t_protocol: str, ties: str) -> int:
    """``k`` once ``k``, the video→text protocol and the tie rule are known valid."""
    if k < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    if v2t_protocol not in V2T_PROTOCOLS:
        raise InvalidInputError(f"v2t_protocol must be one of {list(V2T_PROTOCOLS)}")
    if ties not in TIES:
        raise InvalidInputError(f"ties must be one of {list(TIES)}, got {ties!r}")
    return k


def _metrics_of(
    ranks: dict[str, dict[str, np.ndarray]], protocols: dict[str, str], ties: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """``retrieval_metrics`` of every (direction, view), each naming its protocol and ties."""
    return {
        d: {
            v: {**retrieval_metrics(r), "protocol": protocols[d], "ties": ties}
            for v, r in by_view.items()
        }
        for d, by_view in ranks.items()
    }


def _ranks(
    mats: dict[str, torch.Tensor],
    captions: Sequence[Sequence[str]],
    v2t_protocol: str = "videos",
    ties: str = "pessimistic",
) -> dict[str, dict[str, np.ndarray]]:
    """1-based ranks of the right answers, ``{"t2v"|"v2t": {"broad"|"reranked": ranks}}``, from
    :func:`score_matrices`' output; text j (flattened in order) describes its own video."""
    text_to_video = [i for i, caps in enumerate(captions) for _ in caps]  # [M]
    broad = mats["broad"]  # [M, N]
    broad_v = broad.t()  # [N, M]
    return {
        "t2v": {
            "broad": ranks_from_scores(broad, text_to_video, ties=ties),
            "reranked": ranks_from_scores(
                rerank_topk(broad, mats["candidates"], mats["final"]),
                text_to_video,
                ties=ties,
            ),
        },
        "v2t": {
            view: v2t_ranks(
                scores,
                text_to_video,
                protocol=v2t_protocol,
                ties=ties,
            )
            for view, scores in (
                ("broad", broad_v),
                ("reranked", rerank_topk(broad_v, mats["candidates_v"], mats["final_v"])),
            )
        },
    }


def plot_recall_curves(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """Recall@k for k = 1..K+, broad vs reranked, text→video and video→text side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction, label in zip(
        axes, ("t2v", "v2t"), ("text → video", "video → text"), strict=True
    ):
        curves = result["curves"][direction]
        ks = np.arange(1, len(curves["broad"]) + 1)
        ax.plot(ks, curves["broad"], marker="o", label="broad (S')")
        ax.plot(ks, curves["reranked"], marker="s", label="broad + focused (S' + Δ)")
        ax.axvline(result["k"], color="grey", linestyle=":", label=f"K = {result['k']}")
        ax.set_title(label)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@k (%)")
    axes[0].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: direction × view with R@1/5/10, MdR, MnR, then the protocol and
    tie rule, and R@1 with optimistic ties (paper-comparable) when the result holds it."""
    header = (
        f"{'direction':<10} {'view':<9} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MdR':>6} {'MnR':>7}"
    )
    lines = [header, "-" * len(header)]
    for direction in ("t2v", "v2t"):
        for view in ("broad", "reranked"):
            m = result[direction][view]
            lines.append(
                f"{direction:<10} {view:<9} {m['R@1']:6.1f} {m['R@5']:6.1f} {m['R@10']:6.1f} "
                f"{m['MdR']:6.1f} {m['MnR']:7.2f}"
            )
    if "ties" in result:
        lines.append(
            f"ties: {result['ties']}; video→text protocol: {result['v2t_protocol']} "
            "(videos ranked, each by its best caption)"
            if result["v2t_protocol"] == "videos"
            else f"ties: {result['ties']}; video→text protocol: captions (best own caption "
            "ranked among all captions)"
        )
    if "optimistic" in result:
        opt = result["optimistic"]
        lines.append(
            "optimistic ties (paper-comparable) R@1: "
            + ", ".join(
                f"{d} {opt[d]['broad']['R@1']:.1f} → {opt[d]['reranked']['R@1']:.1f}"
                for d in ("t2v", "v2t")
            )
        )
    return "\n".join(lines)
