"""The focused view's scores in both directions, through the model's own fusion and head.

* text→video (``TokenBinder.focused_scores``, docs/method.md §2-3): each query's K candidate
  videos compared jointly; ``final = cos(I_1, [CLS]) + Δ``.
* video→text (the ℓ_focus,t direction, docs/method.md §4, "video→text"): the video's tokens are
  projected once; each candidate text's fused indicators attend over them as a single
  candidate, and the same head scores the pair (``TokenBinder.focused_scores_v2t``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tb_reranker.model.checks import InputChecks
from tb_reranker.model.fusion import FocusedScores

__all__ = ["text_to_video_scores", "video_to_text_scores"]


class Scorer(Protocol):
    """What scoring uses of a model (a ``TokenBinder``)."""

    fusion: nn.Module  # FocusedFusion
    tokens_per_frame: int

    @property
    def device(self) -> torch.device: ...

    @property
    def _checks(self) -> InputChecks: ...

    def _autocast(self) -> contextlib.AbstractContextManager[Any]: ...

    def fusion_queries(self, indicators: torch.Tensor) -> torch.Tensor: ...


def text_to_video_scores(
    model: Scorer,
    indicators: torch.Tensor,
    cand_cls: torch.Tensor,
    cand_tokens: torch.Tensor | None,
    cand_mask: torch.Tensor | None,
    cand_kv: torch.Tensor | None,
    frames_mask: torch.Tensor | None = None,
) -> FocusedScores:
    """Text→video scores of K candidate videos per query, on trusted inputs (checked by
    ``InputChecks.focused``, or the ``Reranker``'s own): indicators [B, m, D], cand_cls
    [B, K, D], exactly one of cand_tokens [B, K, T', D] (the K/V-free path: the tokens are never
    projected) and cand_kv [B, K, n_blocks, 2, T', D]; cand_mask [B, K]; frames_mask [B, K, T]."""
    device = model.device
    indicators = indicators.to(device)
    cand_cls = cand_cls.to(device)
    with model._autocast():
        queries = model.fusion_queries(indicators)
        if cand_kv is None:
            assert cand_tokens is not None
            delta, token_attention = model.fusion(
                queries,
                cand_mask=cand_mask,
                cand_tokens=cand_tokens.to(device).float(),
                frames_mask=frames_mask,
            )
        else:
            delta, token_attention = model.fusion(
                queries, cand_kv.to(device), cand_mask, frames_mask=frames_mask
            )
    broad = torch.bmm(
        F.normalize(cand_cls.float(), dim=-1),  # [B, K, D]
        F.normalize(indicators[:, 0].float(), dim=-1).unsqueeze(-1),  # [B, D, 1]
    ).squeeze(-1)  # [B, K] cosine
    if cand_mask is not None:
        broad = broad.masked_fill(~cand_mask, float("-inf"))
    delta = delta.float()
    frame_attention = _per_frame(token_attention.float(), model.tokens_per_frame)
    return FocusedScores(
        broad=broad, delta=delta, final=broad + delta, frame_attention=frame_attention
    )


def _per_frame(token_attention: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """token_attention [B, K, T'] -> frame_attention [B, K, T] (each frame's tokens summed)."""
    batch_size, num_candidates, num_tokens = token_attention.shape
    return token_attention.view(
        batch_size, num_candidates, num_tokens // tokens_per_frame, tokens_per_frame
    ).sum(-1)


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
    frame_attention = _per_frame(token_attention, model.tokens_per_frame)
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
