"""Frame motion for the focused view (docs/method.md §3, "frame motion"; ``frame_motion``).

A frame's [CLS] says what is on screen, not how it changed. With ``TokenBinderConfig(
frame_motion=True)`` every frame token the fusion reads also carries its change from the same
token of the previous frame::

    x_t  <-  x_t + W_m (x_t - x_{t-1})        (0 for the first frame, and next to a padded one)

``W_m`` is zero-initialised, so an untrained motion layer leaves the tokens as they were and the
model starts exactly where one without it does. It is a per-video function of the video's own
tokens, so the fusion's keys and values stay cacheable per candidate.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrameMotion"]


class FrameMotion(nn.Module):
    """``x_t + W_m (x_t - x_{t-1})`` over a video's frame tokens, real frames only."""

    def __init__(self, width: int, tokens_per_frame: int = 1) -> None:
        super().__init__()
        self.tokens_per_frame = tokens_per_frame
        self.proj = nn.Linear(width, width, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(
        self, tokens: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: [..., T', D] frame-major (T' = T·tokens_per_frame); frames_mask: [..., T] bool
        (False = a padded frame) or None -> [..., T', D]. A difference that involves a padded
        frame is zero, so padding never leaks into a real frame's token."""
        *lead, num_tokens, width = tokens.shape
        frames = tokens.reshape(*lead, num_tokens // self.tokens_per_frame, -1, width)
        change = frames[..., 1:, :, :] - frames[..., :-1, :, :]  # [..., T-1, P, D]
        if frames_mask is not None:
            both_real = frames_mask[..., 1:] & frames_mask[..., :-1]  # [..., T-1]
            change = change * both_real[..., None, None].to(change.dtype)
        change = torch.cat([torch.zeros_like(frames[..., :1, :, :]), change], dim=-3)
        return tokens + self.proj(change.reshape(tokens.shape))
