"""TokenBinder training losses (docs/method.md §4) and the two-learning-rate parameter groups.

Total loss = (ℓ_t→v + ℓ_v→t)/2 + (ℓ_focus,v + ℓ_focus,t)/2 where

* ℓ_t→v, ℓ_v→t: symmetric InfoNCE over the batch on S' = cos(I_1, f_[CLS]) with CLIP's
  learnable logit scale;
* ℓ_focus,v: for each text its top-K batch videos by S' (ground truth forced in by replacing the
  last one if absent), cross-entropy over logit_scale · (S' + Δ) from ``focused_scores``;
* ℓ_focus,t: the same for each video over its top-K batch texts, scored by
  ``focused_scores_v2t`` (the function evaluation uses too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tb_reranker.errors import InvalidInputError

if TYPE_CHECKING:
    from tb_reranker.model.tokenbinder import TokenBinder

__all__ = [
    "infonce_loss",
    "select_candidates",
    "focused_ce_loss",
    "tokenbinder_loss",
    "param_groups",
    "MAX_LOGIT_SCALE",
]

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


def infonce_loss(
    texts_embeddings: torch.Tensor, videos_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE; pairs are matched by index.

    texts_embeddings: [B, D], videos_embeddings: [B, D] (L2-normalised); logit_scale: scalar,
    already exponentiated. returns (ℓ_t→v, ℓ_v→t).
    """
    logits = logit_scale * texts_embeddings @ videos_embeddings.t()  # [B, B]
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, targets), F.cross_entropy(logits.t(), targets)


@torch.no_grad()
def select_candidates(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns per row by similarity, the diagonal (ground truth) forced in.

    similarity: [B, N] (row i's ground truth is column i) -> (candidates_index [B, k] ordered
    by similarity, with the ground truth replacing the last one when absent; targets [B] =
    position of the ground truth in each row).
    """
    batch_size = similarity.shape[0]
    candidates_index = similarity.topk(k, dim=1).indices  # [B, k]
    truth = torch.arange(batch_size, device=similarity.device)
    hits = candidates_index == truth.unsqueeze(1)  # [B, k]
    present = hits.any(dim=1)
    candidates_index[~present, -1] = truth[~present]
    hits = candidates_index == truth.unsqueeze(1)
    targets = hits.float().argmax(dim=1)
    return candidates_index, targets


def focused_ce_loss(
    final_scores: torch.Tensor, targets: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy over logit_scale · S for [B, K] scores and [B] target positions."""
    return F.cross_entropy(logit_scale * final_scores, targets)


def _indicators_of(model: TokenBinder, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
    if isinstance(texts, torch.Tensor) and texts.is_floating_point():
        if texts.ndim != 3 or texts.shape[1] != model.num_indicators:
            raise InvalidInputError(
                f"precomputed indicators must be [B, {model.num_indicators}, D], "
                f"got {tuple(texts.shape)}"
            )
        if not bool(torch.isfinite(texts).all()):
            raise InvalidInputError("indicators contain NaN or infinite values")
        return F.normalize(texts.to(model.device), dim=-1)
    if isinstance(texts, torch.Tensor):
        return model.encode_text_tokens(texts)[0]
    return model.encode_text(texts)


def _videos_of(
    model: TokenBinder, videos: torch.Tensor, frames_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (videos_cls [B, D], frames_tokens [B, T', D], frames_mask [B, T] bool or None)"""
    if not isinstance(videos, torch.Tensor):
        raise InvalidInputError(f"videos must be a tensor, got {type(videos).__name__}")
    if videos.ndim == 5:
        videos_cls, frames_tokens = model.encode_frames(videos, frames_mask)
        mask = model._checks.frames_mask(frames_mask, tuple(videos.shape[:2]))
        return videos_cls, frames_tokens, mask
    if videos.ndim == 3:
        if videos.shape[-1] != model.embed_dim:
            raise InvalidInputError(
                f"frame features have D={videos.shape[-1]}, the model's D is {model.embed_dim}"
            )
        if not bool(torch.isfinite(videos).all()):
            raise InvalidInputError("frame features contain NaN or infinite values")
        frames_tokens = F.normalize(videos.to(model.device).float(), dim=-1)
        shape = (videos.shape[0], videos.shape[1] // model.tokens_per_frame)
        mask = model._checks.frames_mask(frames_mask, shape)
        return model.pool_cls(frames_tokens, mask), frames_tokens, mask
    raise InvalidInputError(
        "videos must be frames [B, T, 3, H, W] or frame features [B, T, D], got "
        f"{tuple(videos.shape)}"
    )


def tokenbinder_loss(
    model: TokenBinder,
    texts: Sequence[str] | torch.Tensor,
    videos: torch.Tensor,
    *,
    k: int | None = None,
    frames_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """TokenBinder loss on a batch of B matching (text, video) pairs (docs/method.md §4).

    texts: list[str], tokens [B, L'] int64, or precomputed indicators [B, m, D] float.
    videos: raw frames [B, T, 3, H, W] or precomputed frame features [B, T', D] (frozen
    vision tower: cache ``model.encode_frames(...)[1]``).
    frames_mask: [B, T] bool, False = a padded (repeated) frame: left out of the video [CLS]
    and given no attention by the focused view, in both directions.
    k: focused-view candidates per query (default ``min(top_k, B)``).
    returns {"loss", "broad", "focus", "t2v", "v2t", "focus_v", "focus_t"} (scalars).
    """
    indicators = _indicators_of(model, texts)  # [B, m, D]
    # [B, D], [B, T', D], [B, T] (padded frames get no attention in either direction)
    videos_cls, frames_tokens, frames_mask = _videos_of(model, videos, frames_mask)
    batch_size = indicators.shape[0]
    if videos_cls.shape[0] != batch_size:
        raise InvalidInputError(f"{batch_size} texts but {videos_cls.shape[0]} videos")
    if batch_size < 2:
        raise InvalidInputError("a contrastive batch needs at least 2 pairs")
    num_candidates = min(k if k is not None else model.top_k, batch_size)
    if num_candidates < 1:
        raise InvalidInputError(f"k must be >= 1, got {k}")
    logit_scale = model.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    similarity = indicators[:, 0] @ videos_cls.t()  # [B texts, B videos] = S'
    loss_t2v, loss_v2t = infonce_loss(indicators[:, 0], videos_cls, logit_scale)

    # text -> video: each text's top-K videos
    videos_index, videos_targets = select_candidates(similarity.detach(), num_candidates)
    scores_v = model.focused_scores(
        indicators,
        videos_cls[videos_index],
        frames_tokens[videos_index],
        frames_mask=None if frames_mask is None else frames_mask[videos_index],
    )
    loss_focus_v = focused_ce_loss(scores_v.final, videos_targets, logit_scale)

    # video -> text: each video's top-K texts
    texts_index, texts_targets = select_candidates(similarity.detach().t(), num_candidates)
    scores_t = model.focused_scores_v2t(
        frames_tokens, videos_cls, indicators[texts_index], frames_mask=frames_mask
    )
    loss_focus_t = focused_ce_loss(scores_t.final, texts_targets, logit_scale)

    broad = (loss_t2v + loss_v2t) / 2
    focus = (loss_focus_v + loss_focus_t) / 2
    return {
        "loss": broad + focus,
        "broad": broad.detach(),
        "focus": focus.detach(),
        "t2v": loss_t2v.detach(),
        "v2t": loss_v2t.detach(),
        "focus_v": loss_focus_v.detach(),
        "focus_t": loss_focus_t.detach(),
    }


def _no_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        parameter.ndim < 2
        or "embedding" in leaf
        or leaf in ("indicators", "class_embedding", "logit_scale", "logit_bias")
    )


def param_groups(
    model: TokenBinder,
    lr_fusion: float = 1e-4,
    lr_backbone: float = 1e-6,
    weight_decay: float = 0.2,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: new modules (fusion, indicators) at ``lr_fusion``, the CLIP
    backbone (towers + logit scale) at ``lr_backbone``; biases, norms, embeddings, indicators
    and the logit scale get no weight decay. Frozen parameters are left out."""
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "backbone" if name.startswith("clip.") else "fusion"
        buckets.setdefault((part, _no_decay(name, parameter)), []).append(parameter)
    lrs = {"fusion": lr_fusion, "backbone": lr_backbone}
    groups = []
    for (part, no_decay), params in sorted(buckets.items()):
        groups.append(
            {
                "name": f"{part}{'_no_decay' if no_decay else ''}",
                "params": params,
                "lr": lrs[part],
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        )
    return groups
