"""Video→text scores: K candidate texts per video, through the model's own fusion and head.

The ℓ_focus,t direction (docs/method.md §4, "video→text"): the video's tokens are projected
once; each candidate text's fused indicators attend over them as a single candidate, and the
same head scores the pair. ``TokenBinder.focused_scores_v2t`` is this function.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tb_reranker.model.checks import InputChecks
from tb_reranker.model.fusion import FocusedScores

__all__ = ["video_to_text_scores"]


class Scorer(Protocol):
    """What video→text scoring uses of a model (a ``TokenBinder``)."""

    fusion: nn.Module  # FocusedFusion
    tokens_per_frame: int

    @property
    def device(self) -> torch.device: ...

    @property
    def _checks(self) -> InputChecks: ...

    def _autocast(self) -> contextlib.AbstractContextManager[Any]: ...

    def fusion_queries(self, indicators: torch.Tensor) -> torch.Tensor: ...


def video_to_text_scores(
    model: Scorer,
    frames_tokens: torch.Tensor,
    video_cls: torch.Tensor,
    cand_indicators: torch.Tensor,
    cand_mask: torch.Tensor | None = None,
    *,
    frames_mask: torch.Tensor | None = None,
) -> FocusedScores:
    """Video→text scores of K candidate texts per video, inputs checked (``InvalidInputError``).

    frames_tokens: [B, T', D]; video_cls: [B, D]; cand_indicators: [B, K, m, D];
    cand_mask: [B, K] bool or None; frames_mask: [B, T] bool (False = padded frame: no
    attention, not projected) or None. ``frame_attention`` is [B, K, T]: the video's frames
    as seen by each candidate text.
    """
    frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask = model._checks.v2t(
        frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask
    )
    batch_size, num_candidates = cand_indicators.shape[:2]
    device = model.device
    cand_indicators = cand_indicators.to(device)
    delta, token_attention = _pair_fusion(model, frames_tokens, cand_indicators, frames_mask)
    if cand_mask is not None:
        delta = delta.masked_fill(~cand_mask, 0.0)
        token_attention = token_attention * cand_mask.unsqueeze(-1)
    # broad: cos(I_1 of each candidate text, the video's CLS)
    broad_queries = cand_indicators[:, :, 0]  # [B, K, D]
    broad = torch.einsum(
        "bkd,bd->bk",
        F.normalize(broad_queries.float(), dim=-1),
        F.normalize(video_cls.to(device).float(), dim=-1),
    )
    num_tokens = token_attention.shape[-1]
    frame_attention = token_attention.view(
        batch_size, num_candidates, num_tokens // model.tokens_per_frame, model.tokens_per_frame
    ).sum(-1)
    if cand_mask is not None:
        broad = broad.masked_fill(~cand_mask, float("-inf"))
    return FocusedScores(
        broad=broad, delta=delta, final=broad + delta, frame_attention=frame_attention
    )


def _pair_fusion(
    model: Scorer,
    frames_tokens: torch.Tensor,
    cand_indicators: torch.Tensor,
    frames_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [B, K], token_attention [B, K, T']) float32: every (video, candidate text) pair
    through the fusion as one query with one candidate, the video's K/V projected once."""
    batch_size, num_candidates, num_indicators, width = cand_indicators.shape
    num_frames = frames_tokens.shape[1] // model.tokens_per_frame
    pair_frames_mask = None
    if frames_mask is not None:  # [B*K, 1, T]: each pair sees its video's mask
        pair_frames_mask = frames_mask.unsqueeze(1).expand(-1, num_candidates, -1)
        pair_frames_mask = pair_frames_mask.reshape(batch_size * num_candidates, 1, num_frames)
    with model._autocast():
        kv = model.fusion.project_candidates(
            frames_tokens.to(model.device).float(), frames_mask
        )  # [B, n, 2, T', D]
        pair_kv = kv.unsqueeze(1).expand(-1, num_candidates, *kv.shape[1:])
        pair_kv = pair_kv.reshape(batch_size * num_candidates, 1, *kv.shape[1:])
        queries = model.fusion_queries(
            cand_indicators.reshape(batch_size * num_candidates, num_indicators, width)
        )
        delta, token_attention = model.fusion(
            queries, pair_kv, None, frames_mask=pair_frames_mask
        )  # [B*K, 1], [B*K, 1, T']
    delta = delta.float().view(batch_size, num_candidates)
    token_attention = token_attention.float().view(batch_size, num_candidates, -1)
    return delta, token_attention
