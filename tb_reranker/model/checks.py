"""The checks of a ``TokenBinder``'s inputs: shapes, dtypes, finiteness, masks, token ids.

:class:`InputChecks` holds what the checks need to know of the model (its width D, m, T, K, the
tokens per frame, ...) and its device; every check raises ``InvalidInputError`` with one line
naming the input, and returns the input as the model computes with it (float32 tensors, bool
masks on the model's device). The model keeps one (``TokenBinder._checks``) and builds it again
when it moved to another device, so the device is always the one the model is on now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tb_reranker.errors import InvalidInputError

__all__ = ["InputChecks"]

OptionalTensor = torch.Tensor | None


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidInputError(f"{name} contains NaN or infinite values")


def _as_float_tensor(name: str, value: Any, ndim: int, shape_doc: str) -> torch.Tensor:
    """Validate a floating-point input (torch tensor or numpy array) -> float32 tensor."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(
            f"{name} must be a torch.Tensor or numpy array {shape_doc}, got {type(value).__name__}"
        )
    if value.ndim != ndim:
        raise InvalidInputError(
            f"{name} must have shape {shape_doc}, got {tuple(value.shape)} ({value.ndim}-D)"
        )
    if not value.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point tensor, got {value.dtype}")
    _check_finite(name, value)
    return value.float()


@dataclass(frozen=True)
class InputChecks:
    """The input checks of one model, on the device it is on."""

    embed_dim: int  # D
    num_indicators: int  # m
    num_frames: int  # T, the most frames a video may have
    tokens_per_frame: int
    top_k: int
    position_bound: bool  # K is bound to the head's or the rank embedding's positions
    context_length: int  # text positions the tokenizer may fill
    vocab_size: int
    num_blocks: int  # fusion blocks (the K/V cache's n_blocks)
    image_size: int
    device: torch.device

    # ---- text and frames -----------------------------------------------------------------------
    def texts(self, texts: Any) -> list[str]:
        """A non-empty sequence of strings, as a list."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise InvalidInputError("texts is empty: give at least one text")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{index}] is {type(text).__name__}, not str")
        return list(texts)

    def tokens(self, texts_tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B > 0, L <= context_length] in the vocabulary, on the model's device."""
        if texts_tokens.ndim != 2 or texts_tokens.shape[0] == 0:
            raise InvalidInputError(
                f"texts tokens must have shape [B>0, L], got {tuple(texts_tokens.shape)}"
            )
        if texts_tokens.is_floating_point():
            raise InvalidInputError("texts tokens must be integer token ids")
        if texts_tokens.shape[1] > self.context_length:
            raise InvalidInputError(
                f"texts tokens have {texts_tokens.shape[1]} positions; at most "
                f"{self.context_length} (context length minus {self.num_indicators} indicators)"
            )
        vocab = self.vocab_size
        if int(texts_tokens.min()) < 0 or int(texts_tokens.max()) >= vocab:
            raise InvalidInputError(f"token ids must be in [0, {vocab})")
        return texts_tokens.to(self.device)

    def frames(self, frames: Any, frames_mask: Any) -> tuple[torch.Tensor, OptionalTensor]:
        """Frames [B, T, 3, H, W] of the model's image size, T <= num_frames, and their mask."""
        frames = _as_float_tensor("frames", frames, 5, "[B, T, 3, H, W]")
        batch_size, num_frames, channels, height, width = frames.shape
        size = self.image_size
        if batch_size == 0 or num_frames == 0:
            raise InvalidInputError(
                f"frames must hold at least one video and one frame, got {tuple(frames.shape)}"
            )
        if channels != 3 or height != size or width != size:
            raise InvalidInputError(
                f"frames must have shape [B, T, 3, {size}, {size}], got {tuple(frames.shape)}"
            )
        if num_frames > self.num_frames:
            raise InvalidInputError(f"frames has T={num_frames} > the model's {self.num_frames}")
        return frames, self.frames_mask(frames_mask, (batch_size, num_frames))

    def frames_mask(self, frames_mask: Any, shape: tuple[int, int]) -> OptionalTensor:
        """An optional ``[B, T]`` frame mask, every video with a real frame; bool on the device."""
        if frames_mask is None:
            return None
        if not isinstance(frames_mask, torch.Tensor) or tuple(frames_mask.shape) != shape:
            got = tuple(frames_mask.shape) if isinstance(frames_mask, torch.Tensor) else frames_mask
            raise InvalidInputError(
                f"frames_mask must be a bool tensor of shape {shape}, got {got}"
            )
        frames_mask = frames_mask.to(device=self.device, dtype=torch.bool)
        if not bool(frames_mask.any(dim=1).all()):
            raise InvalidInputError("every video needs at least one real frame in frames_mask")
        return frames_mask

    def frames_tokens(
        self, frames_tokens: Any, frames_mask: Any
    ) -> tuple[torch.Tensor, OptionalTensor]:
        """The inputs of ``project_candidates``: frame tokens [N, T', D] and their mask."""
        frames_tokens = _as_float_tensor("frames_tokens", frames_tokens, 3, "[N, T, D]")
        self.width("frames_tokens", frames_tokens)
        self.tokens_count("frames_tokens", frames_tokens.shape[1])
        num_videos, num_tokens = frames_tokens.shape[:2]
        frames_mask = self.frames_mask(
            frames_mask, (num_videos, num_tokens // self.tokens_per_frame)
        )
        return frames_tokens, frames_mask

    def width(self, name: str, tensor: torch.Tensor) -> None:
        """The last dimension of ``tensor`` is the model's D."""
        if tensor.shape[-1] != self.embed_dim:
            raise InvalidInputError(
                f"{name} has embedding dim {tensor.shape[-1]}, the model's D is {self.embed_dim}"
            )

    def tokens_count(self, name: str, num_tokens: int) -> None:
        """``num_tokens`` per video: whole frames, at most the model's T of them."""
        if num_tokens == 0 or num_tokens % self.tokens_per_frame:
            raise InvalidInputError(
                f"{name} holds {num_tokens} tokens per video: not a positive multiple of "
                f"{self.tokens_per_frame} tokens per frame"
            )
        if num_tokens > self.num_frames * self.tokens_per_frame:
            raise InvalidInputError(
                f"{name} holds {num_tokens // self.tokens_per_frame} frames per video, "
                f"the model takes at most {self.num_frames}"
            )

    # ---- candidates ----------------------------------------------------------------------------
    def mask(self, cand_mask: Any, batch_size: int, num_candidates: int) -> OptionalTensor:
        """Validate an optional ``[B, K]`` candidate mask; return it as bool on the model device."""
        if cand_mask is None:
            return None
        if not isinstance(cand_mask, torch.Tensor) or tuple(cand_mask.shape) != (
            batch_size,
            num_candidates,
        ):
            raise InvalidInputError(
                f"cand_mask must be a [B, K] = {(batch_size, num_candidates)} bool tensor"
            )
        return cand_mask.to(device=self.device, dtype=torch.bool)

    def cand_frames_mask(
        self, frames_mask: Any, shape: tuple[int, int, int], cand_mask: OptionalTensor
    ) -> OptionalTensor:
        """Validate an optional ``[B, K, T]`` per-candidate frame mask: bool, every real
        candidate with at least one real frame; return it as bool on the model device."""
        if frames_mask is None:
            return None
        if isinstance(frames_mask, np.ndarray):
            frames_mask = torch.from_numpy(frames_mask)
        if (
            not isinstance(frames_mask, torch.Tensor)
            or tuple(frames_mask.shape) != shape
            or frames_mask.is_floating_point()
            or frames_mask.is_complex()
        ):
            got = tuple(frames_mask.shape) if isinstance(frames_mask, torch.Tensor) else frames_mask
            raise InvalidInputError(
                f"frames_mask must be a bool tensor of shape [B, K, T] = {shape}, got {got}"
            )
        frames_mask = frames_mask.to(device=self.device, dtype=torch.bool)
        empty = ~frames_mask.any(dim=-1)  # [B, K]
        if cand_mask is not None:
            empty = empty & cand_mask
        if bool(empty.any()):
            raise InvalidInputError("every real candidate needs at least one real frame")
        return frames_mask

    def candidates(
        self, cand_tokens: Any, cand_kv: Any, cls_shape: tuple[int, ...]
    ) -> tuple[OptionalTensor, OptionalTensor]:
        """Validated (cand_tokens, cand_kv), exactly one given, matching cand_cls on [B, K]."""
        batch_size, num_candidates = cls_shape[0], cls_shape[1]
        if (cand_tokens is None) == (cand_kv is None):
            raise InvalidInputError("give exactly one of cand_tokens and cand_kv")
        if cand_kv is None:
            cand_tokens = _as_float_tensor("cand_tokens", cand_tokens, 4, "[B, K, T, D]")
            self.width("cand_tokens", cand_tokens)
            if tuple(cand_tokens.shape[:2]) != (batch_size, num_candidates):
                raise InvalidInputError(
                    f"cand_tokens {tuple(cand_tokens.shape)} does not match cand_cls "
                    f"{tuple(cls_shape)} on [B, K]"
                )
            self.tokens_count("cand_tokens", cand_tokens.shape[2])
            return cand_tokens, None
        expected = (batch_size, num_candidates, self.num_blocks, 2)
        cand_kv = _as_float_tensor("cand_kv", cand_kv, 6, "[B, K, n_blocks, 2, T, D]")
        if tuple(cand_kv.shape[:4]) != expected:
            raise InvalidInputError(
                f"cand_kv must have shape {expected + ('T', 'D')}, got {tuple(cand_kv.shape)}"
            )
        self.width("cand_kv", cand_kv)
        self.tokens_count("cand_kv", cand_kv.shape[4])
        return None, cand_kv

    def focused(
        self,
        indicators: Any,
        cand_cls: Any,
        cand_tokens: Any,
        cand_mask: Any,
        cand_kv: Any,
        frames_mask: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, OptionalTensor, OptionalTensor, OptionalTensor, Any]:
        """The inputs of ``focused_scores``, validated, in its order: (indicators, cand_cls,
        cand_tokens, cand_mask, cand_kv, frames_mask)."""
        indicators = _as_float_tensor("indicators", indicators, 3, "[B, m, D]")
        cand_cls = _as_float_tensor("cand_cls", cand_cls, 3, "[B, K, D]")
        self.width("indicators", indicators)
        self.width("cand_cls", cand_cls)
        if indicators.shape[1] != self.num_indicators:
            raise InvalidInputError(
                f"indicators has m={indicators.shape[1]}, the model has {self.num_indicators}"
            )
        batch_size, num_candidates, _ = cand_cls.shape
        if batch_size == 0 or batch_size != indicators.shape[0]:
            raise InvalidInputError(
                f"indicators ({indicators.shape[0]}) and cand_cls ({batch_size}) disagree on B > 0"
            )
        if num_candidates == 0:
            raise InvalidInputError("no candidates: K must be >= 1")
        if self.position_bound and num_candidates > self.top_k:
            raise InvalidInputError(
                f"K={num_candidates} candidates but this model scores at most top_k={self.top_k}"
            )
        cand_tokens, cand_kv = self.candidates(cand_tokens, cand_kv, cand_cls.shape)
        cand_mask = self.mask(cand_mask, batch_size, num_candidates)
        num_tokens = cand_tokens.shape[2] if cand_tokens is not None else cand_kv.shape[4]
        frames_mask = self.cand_frames_mask(
            frames_mask,
            (batch_size, num_candidates, num_tokens // self.tokens_per_frame),
            cand_mask,
        )
        return indicators, cand_cls, cand_tokens, cand_mask, cand_kv, frames_mask

    def v2t(
        self,
        frames_tokens: Any,
        video_cls: Any,
        cand_indicators: Any,
        cand_mask: Any,
        frames_mask: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Any]:
        """The inputs of ``focused_scores_v2t``, validated, in its order."""
        frames_tokens = _as_float_tensor("frames_tokens", frames_tokens, 3, "[B, T, D]")
        video_cls = _as_float_tensor("video_cls", video_cls, 2, "[B, D]")
        cand_indicators = _as_float_tensor("cand_indicators", cand_indicators, 4, "[B, K, m, D]")
        for name, tensor in (
            ("frames_tokens", frames_tokens),
            ("video_cls", video_cls),
            ("cand_indicators", cand_indicators),
        ):
            self.width(name, tensor)
        batch_size, num_candidates, num_indicators, _ = cand_indicators.shape
        if (
            batch_size == 0
            or frames_tokens.shape[0] != batch_size
            or video_cls.shape[0] != batch_size
        ):
            raise InvalidInputError(
                "frames_tokens, video_cls and cand_indicators disagree on B > 0"
            )
        if num_candidates == 0:
            raise InvalidInputError("no candidates: K must be >= 1")
        if num_indicators != self.num_indicators:
            raise InvalidInputError(
                f"cand_indicators has m={num_indicators}, the model has {self.num_indicators}"
            )
        self.tokens_count("frames_tokens", frames_tokens.shape[1])
        cand_mask = self.mask(cand_mask, batch_size, num_candidates)
        num_frames = frames_tokens.shape[1] // self.tokens_per_frame
        frames_mask = self.frames_mask(frames_mask, (batch_size, num_frames))
        return frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask
