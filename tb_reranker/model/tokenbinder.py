"""``TokenBinder``: CLIP encoders with query indicators + the focused-view fusion (METHOD.md)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tb_reranker.errors import CheckpointError, InvalidInputError
from tb_reranker.model.config import TokenBinderConfig
from tb_reranker.model.fusion import FocusedFusion, FocusedScores
from tb_reranker.model.inference import WITHOUT_VISION, InferenceState, identities, prepare
from tb_reranker.model.precision import autocast_dtype, check_precision, resolve_device
from tb_reranker.model.text import IndicatorTextEncoder
from tb_reranker.model.tokens import tokenize

__all__ = ["TokenBinder", "build_clip"]

logger = logging.getLogger(__name__)

VISION_IDENTITY_VERSION = 1  # bump when what the vision fingerprint covers changes

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(config: TokenBinderConfig, load_pretrained: bool = True) -> nn.Module:
    """The open_clip model described by ``config`` (random init unless pretrained is loaded).

    ``load_pretrained=False`` never touches the network or the disk (used by ``load``, whose
    weights come from the checkpoint).
    """
    import open_clip  # heavy: imported on first use
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    pretrained = config.pretrained if load_pretrained else None
    if config.clip_cfg is not None:
        cfg = dict(config.clip_cfg)
        try:
            model = CLIP(
                embed_dim=int(cfg["embed_dim"]),
                vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                text_cfg=CLIPTextCfg(**cfg["text_cfg"]),
                quick_gelu=bool(cfg.get("quick_gelu", False)),
            )
        except (TypeError, ValueError, AssertionError) as exc:
            raise InvalidInputError(f"invalid custom open_clip cfg {cfg}: {exc}") from exc
        if pretrained:
            if not Path(pretrained).is_file():
                raise CheckpointError(
                    f"pretrained weights {pretrained!r} for a custom clip_cfg must be a local "
                    "open_clip checkpoint file, and it does not exist"
                )
            try:
                open_clip.load_checkpoint(model, pretrained)
            except Exception as exc:  # open_clip raises many kinds here
                raise _weights_error(f"cannot load CLIP weights from {pretrained}", exc) from exc
        return model
    if config.clip_model not in open_clip.list_models():
        raise InvalidInputError(
            f"unknown open_clip model {config.clip_model!r} (see open_clip.list_models())"
        )
    try:
        # the default device, not open_clip's "cpu": a model built under ``torch.device("meta")``
        # (the checkpoint's shape check) stays there instead of failing to copy out of meta
        device = torch.get_default_device()
        return open_clip.create_model(config.clip_model, pretrained=pretrained, device=device)
    except Exception as exc:  # open_clip raises RuntimeError/FileNotFoundError/HF errors
        raise _weights_error(
            f"cannot create open_clip model {config.clip_model!r} with pretrained={pretrained!r}",
            exc,
        ) from exc


def _weights_error(what: str, exc: BaseException) -> CheckpointError:
    """One line for a weights file that failed to load. A pickle holding more than tensors
    (refused by ``torch.load(weights_only=True)``, whose message suggests the unsafe option) is
    named as such, with the safe way out; anything else keeps its first line."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        culprit = f" ({found.group(1)})" if found else ""
        return CheckpointError(
            f"{what}: the file is a pickle holding more than tensors{culprit}, and pickles are "
            "only read as plain tensors: refused; save the weights as .safetensors instead"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return CheckpointError(f"{what}: {first}")


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


class TokenBinder(nn.Module):
    """TokenBinder: one-to-many text-video alignment (WACV 2025), on open_clip.

    Modules: ``clip`` (the open_clip model: vision tower, text tower, logit scale), ``text``
    (m learned query indicators, using ``clip``'s text modules), ``fusion`` (focused view).
    """

    def __init__(
        self,
        config: TokenBinderConfig,
        *,
        device: str | torch.device | None = "cpu",
        load_pretrained: bool = True,
        precision: str = "auto",
    ) -> None:
        """Build the model (random init, or pretrained CLIP towers per ``config.pretrained``).

        The model starts in **eval mode** (deterministic softmax, no Gumbel noise): call
        ``.train()`` to train. ``device``: "cpu" (default), "cuda", ... or None/"auto" = CUDA
        when available; ``.to()`` works as usual. ``precision``: the autocast policy, see
        :attr:`precision`.
        """
        super().__init__()
        if not isinstance(config, TokenBinderConfig):
            raise InvalidInputError(f"config must be a TokenBinderConfig, got {type(config)}")
        self.config = config
        rng = torch.random.fork_rng(devices=[]) if config.seed is not None else None
        with rng if rng is not None else contextlib.nullcontext():
            if config.seed is not None:
                torch.manual_seed(config.seed)
            self.clip = build_clip(config, load_pretrained=load_pretrained)
            try:
                self.text = IndicatorTextEncoder(
                    self.clip, config.num_indicators, config.indicator_init_std
                )
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"unsupported text tower: {exc}") from exc
            visual = self.clip.visual
            if config.use_patch_tokens:
                if not hasattr(visual, "output_tokens") or getattr(visual, "proj", None) is None:
                    raise InvalidInputError("use_patch_tokens needs an open_clip ViT with a proj")
                visual.output_tokens = True
                grid = visual.grid_size
                self.tokens_per_frame = 1 + int(grid[0]) * int(grid[1])
            else:
                self.tokens_per_frame = 1
            self.embed_dim = (
                int(self.clip.text_projection.shape[1])
                if isinstance(self.clip.text_projection, torch.Tensor)
                else int(self._probe_embed_dim())
            )
            self.fusion = FocusedFusion(
                self.embed_dim,
                num_queries=max(1, config.num_indicators - 1),
                max_frames=config.num_frames,
                max_candidates=config.top_k,
                blocks=config.fusion_blocks,
                heads=config.fusion_heads,
                mlp_ratio=config.fusion_mlp_ratio,
                head=config.head,
                head_hidden=config.head_hidden,
                rank_embedding=config.uses_rank_embedding,
                tokens_per_frame=self.tokens_per_frame,
                gumbel_tau=config.gumbel_tau,
                gumbel_scale=config.gumbel_scale,
            )
        self._apply_freezing()
        self._tokenizer: Any = None
        self._inference: InferenceState | None = None  # set by prepare_for_inference
        self._precision = check_precision(precision)
        self.eval()
        self.to(resolve_device(device))

    # ---- construction helpers ------------------------------------------------------------------
    def _probe_embed_dim(self) -> int:
        projection = self.clip.text_projection
        if isinstance(projection, nn.Linear):
            return projection.out_features
        raise InvalidInputError("the open_clip text tower has no projection: embed dim unknown")

    def _apply_freezing(self) -> None:
        if self.config.freeze_backbone:
            self.clip.visual.requires_grad_(False)
        if self.config.freeze_text:
            for name, parameter in self.clip.named_parameters():
                if not name.startswith("visual.") and name != "logit_scale":
                    parameter.requires_grad_(False)

    def backbone_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the CLIP backbone (vision + text towers, logit scale)."""
        for name, parameter in self.named_parameters():
            if name.startswith("clip."):
                yield name, parameter

    # ---- properties of the contract ------------------------------------------------------------
    @property
    def num_indicators(self) -> int:
        return self.config.num_indicators

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def top_k(self) -> int:
        return self.config.top_k

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    def _preprocess_value(self, key: str, default: tuple[float, ...]) -> tuple[float, float, float]:
        from open_clip import get_model_preprocess_cfg

        value = get_model_preprocess_cfg(self.clip).get(key) or default
        return tuple(float(v) for v in value)  # type: ignore[return-value]

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self._preprocess_value("mean", _OPENAI_MEAN)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self._preprocess_value("std", _OPENAI_STD)

    @property
    def device(self) -> torch.device:
        return self.text.indicators.device

    @property
    def context_length(self) -> int:
        """Text positions the tokenizer may fill (CLIP context minus the m indicators)."""
        return self.text.text_context_length

    @property
    def precision(self) -> str:
        """Autocast policy of every model call (``tb_reranker.model.precision``): ``"auto"``
        (bfloat16 on CUDA, none elsewhere; the default), ``"float32"`` or ``"bfloat16"`` (on
        any device). Outputs are float32 either way. Settable; ``InvalidInputError`` if unknown."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        device = self.device
        dtype = autocast_dtype(self._precision, device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    # ---- text ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """list[str] -> tokens [B, context_length - m] int64 (CPU), truncated to fit."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidInputError(f"texts must be a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise InvalidInputError("texts is empty: give at least one text")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{index}] is {type(text).__name__}, not str")
        if self._tokenizer is None:
            import open_clip

            if self.config.clip_cfg is not None:
                self._tokenizer = open_clip.SimpleTokenizer(context_length=self.context_length)
            else:
                self._tokenizer = open_clip.get_tokenizer(self.config.clip_model)
        # only what the text tower reads is BPE-encoded: same rows, bounded work per text
        return tokenize(self._tokenizer, list(texts), self.context_length)

    def _check_tokens(self, texts_tokens: torch.Tensor) -> torch.Tensor:
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
        vocab = self.text.token_embedding.num_embeddings
        if int(texts_tokens.min()) < 0 or int(texts_tokens.max()) >= vocab:
            raise InvalidInputError(f"token ids must be in [0, {vocab})")
        return texts_tokens.to(self.device)

    def encode_text_tokens(self, texts_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L'] -> (indicators [B, m, D] L2-normalised, plain CLIP feature [B, D] L2-normalised)."""
        texts_tokens = self._check_tokens(texts_tokens)
        with self._autocast():
            indicators, eot_features = self.text(texts_tokens)
        indicators = F.normalize(indicators.float(), dim=-1)
        eot_features = F.normalize(eot_features.float(), dim=-1)
        if self.config.broad_query == "clip":  # I_1 is CLIP's own text feature
            indicators = torch.cat([eot_features.unsqueeze(1), indicators[:, 1:]], dim=1)
        return indicators, eot_features

    def encode_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """list[str] (or tokens [B, L']) -> indicators [B, m, D], L2-normalised; I_1 = [:, 0]."""
        texts_tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return self.encode_text_tokens(texts_tokens)[0]

    # ---- video ---------------------------------------------------------------------------------
    def _check_frames_mask(self, frames_mask: torch.Tensor | None, shape: tuple[int, int]) -> Any:
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

    def pool_cls(
        self, frames_tokens: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Video [CLS] = L2-normalised mean of the per-frame CLS features over real frames.

        frames_tokens: [B, T·tokens_per_frame, D]; frames_mask: [B, T] bool or None -> [B, D]
        """
        batch_size, num_tokens, width = frames_tokens.shape
        frames_cls = frames_tokens.view(batch_size, -1, self.tokens_per_frame, width)[:, :, 0]
        if frames_mask is None:
            pooled = frames_cls.mean(dim=1)
        else:
            weights = frames_mask.to(frames_cls.dtype).unsqueeze(-1)  # [B, T, 1]
            pooled = (frames_cls * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def encode_frames(
        self, frames: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode sampled video frames.

        frames: [B, T, 3, H, W] float (normalised with image_mean/std, H = W = image_size),
        T <= num_frames; frames_mask: optional [B, T] bool (False = padded frame, left out of the
        mean pool).
        returns (cls [B, D] L2-normalised mean pool, frames_tokens [B, T, D] L2-normalised per
        frame; [B, T·(1+P), D] frame-major with use_patch_tokens).
        """
        if not self.has_vision:
            raise CheckpointError(WITHOUT_VISION)
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
        frames_mask = self._check_frames_mask(frames_mask, (batch_size, num_frames))
        images = frames.to(self.device).reshape(batch_size * num_frames, 3, size, size)
        with self._autocast():
            output = self.clip.visual(images)
            if self.tokens_per_frame > 1:
                pooled, patches = output  # [B*T, D], [B*T, P, W]
                patches = patches @ self.clip.visual.proj  # [B*T, P, D]
                tokens = torch.cat([pooled.unsqueeze(1), patches], dim=1)  # [B*T, 1+P, D]
            else:
                tokens = output.unsqueeze(1)  # [B*T, 1, D]
        tokens = F.normalize(tokens.float(), dim=-1)
        frames_tokens = tokens.reshape(batch_size, num_frames * self.tokens_per_frame, -1)
        return self.pool_cls(frames_tokens, frames_mask), frames_tokens

    # ---- focused view --------------------------------------------------------------------------
    def _check_width(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.shape[-1] != self.embed_dim:
            raise InvalidInputError(
                f"{name} has embedding dim {tensor.shape[-1]}, the model's D is {self.embed_dim}"
            )

    def _check_tokens_count(self, name: str, num_tokens: int) -> None:
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

    def project_candidates(
        self, frames_tokens: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-video fusion keys/values, cacheable (independent of query and other candidates).

        frames_tokens: [N, T', D]; frames_mask: [N, T] bool (False = padded frame) or None
        -> kv [N, n_blocks, 2, T', D] float32. Padded frames' tokens are not projected (zero
        K/V): pass the same mask to ``focused_scores(frames_mask=...)``.
        """
        frames_tokens = _as_float_tensor("frames_tokens", frames_tokens, 3, "[N, T, D]")
        self._check_width("frames_tokens", frames_tokens)
        self._check_tokens_count("frames_tokens", frames_tokens.shape[1])
        num_videos, num_tokens = frames_tokens.shape[:2]
        frames_mask = self._check_frames_mask(
            frames_mask, (num_videos, num_tokens // self.tokens_per_frame)
        )
        with self._autocast():
            kv = self.fusion.project_candidates(frames_tokens.to(self.device).float(), frames_mask)
        return kv.float()

    def _check_cand_frames_mask(
        self, frames_mask: Any, shape: tuple[int, int, int], cand_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
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

    def _check_mask(
        self, cand_mask: torch.Tensor | None, batch_size: int, num_candidates: int
    ) -> torch.Tensor | None:
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

    def fusion_queries(self, indicators: torch.Tensor) -> torch.Tensor:
        """The queries of the focused view: indicators [B, m, D] -> [B, Q, D].

        I_2..I_m, the m - 1 indicators that attend over a candidate's frame tokens (I_1 is the
        broad query, compared with the video's [CLS]); with m = 1, I_1 alone (Q = 1).
        """
        return indicators[:, 1:] if indicators.shape[1] > 1 else indicators[:, :1]

    def focused_scores(
        self,
        indicators: torch.Tensor,
        cand_cls: torch.Tensor,
        cand_tokens: torch.Tensor | None = None,
        cand_mask: torch.Tensor | None = None,
        *,
        cand_kv: torch.Tensor | None = None,
        frames_mask: torch.Tensor | None = None,
        validate: bool = True,
    ) -> FocusedScores:
        """Broad and focused scores of K candidates per query (METHOD.md §2-3).

        indicators: [B, m, D] (from encode_text); cand_tokens: [B, K, T', D] or cand_kv:
        [B, K, n_blocks, 2, T', D] (stacked ``project_candidates``, any strides); cand_cls:
        [B, K, D]; cand_mask: [B, K] bool (False = padding) or None; frames_mask: [B, K, T]
        bool (False = a padded frame of a short video) or None = all frames real. Padded frames
        get no attention: a candidate scores as if they were absent.
        broad = cos(I_1, cls); final = broad + delta.

        ``validate=False`` skips the input checks, for callers that built the inputs themselves
        (the ``Reranker`` hot path): float32 tensors of the shapes above, finite, ``cand_kv``
        made by this model's ``project_candidates``, ``cand_mask`` bool on the model's device.
        Anything else then gives wrong scores or a torch error, not an ``InvalidInputError``.
        """
        if not validate:
            return self._focused_scores(
                indicators, cand_cls, cand_tokens, cand_mask, cand_kv, frames_mask
            )
        indicators = _as_float_tensor("indicators", indicators, 3, "[B, m, D]")
        cand_cls = _as_float_tensor("cand_cls", cand_cls, 3, "[B, K, D]")
        self._check_width("indicators", indicators)
        self._check_width("cand_cls", cand_cls)
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
        position_bound = (
            self.config.head in ("listwise", "listwise_slots")
            or self.fusion.rank_embedding is not None
        )
        if position_bound and num_candidates > self.top_k:
            raise InvalidInputError(
                f"K={num_candidates} candidates but this model scores at most top_k={self.top_k}"
            )
        cand_tokens, cand_kv = self._check_candidates(cand_tokens, cand_kv, cand_cls.shape)
        cand_mask = self._check_mask(cand_mask, batch_size, num_candidates)
        num_tokens = cand_tokens.shape[2] if cand_tokens is not None else cand_kv.shape[4]
        frames_mask = self._check_cand_frames_mask(
            frames_mask,
            (batch_size, num_candidates, num_tokens // self.tokens_per_frame),
            cand_mask,
        )
        return self._focused_scores(
            indicators, cand_cls, cand_tokens, cand_mask, cand_kv, frames_mask
        )

    def _check_candidates(
        self,
        cand_tokens: torch.Tensor | None,
        cand_kv: torch.Tensor | None,
        cls_shape: tuple[int, ...],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Validated (cand_tokens, cand_kv), exactly one given, matching cand_cls on [B, K]."""
        batch_size, num_candidates = cls_shape[0], cls_shape[1]
        if (cand_tokens is None) == (cand_kv is None):
            raise InvalidInputError("give exactly one of cand_tokens and cand_kv")
        if cand_kv is None:
            cand_tokens = _as_float_tensor("cand_tokens", cand_tokens, 4, "[B, K, T, D]")
            self._check_width("cand_tokens", cand_tokens)
            if tuple(cand_tokens.shape[:2]) != (batch_size, num_candidates):
                raise InvalidInputError(
                    f"cand_tokens {tuple(cand_tokens.shape)} does not match cand_cls "
                    f"{tuple(cls_shape)} on [B, K]"
                )
            self._check_tokens_count("cand_tokens", cand_tokens.shape[2])
            return cand_tokens, None
        expected = (batch_size, num_candidates, self.fusion.num_blocks, 2)
        cand_kv = _as_float_tensor("cand_kv", cand_kv, 6, "[B, K, n_blocks, 2, T, D]")
        if tuple(cand_kv.shape[:4]) != expected:
            raise InvalidInputError(
                f"cand_kv must have shape {expected + ('T', 'D')}, got {tuple(cand_kv.shape)}"
            )
        self._check_width("cand_kv", cand_kv)
        self._check_tokens_count("cand_kv", cand_kv.shape[4])
        return None, cand_kv

    def _focused_scores(
        self,
        indicators: torch.Tensor,
        cand_cls: torch.Tensor,
        cand_tokens: torch.Tensor | None,
        cand_mask: torch.Tensor | None,
        cand_kv: torch.Tensor | None,
        frames_mask: torch.Tensor | None = None,
    ) -> FocusedScores:
        """``focused_scores`` on trusted inputs (checked, or ``validate=False``)."""
        device = self.device
        indicators = indicators.to(device)
        cand_cls = cand_cls.to(device)
        with self._autocast():
            queries = self.fusion_queries(indicators)
            if cand_kv is None:  # uncached: the K/V-free path (never projects the tokens)
                assert cand_tokens is not None
                delta, token_attention = self.fusion(
                    queries,
                    cand_mask=cand_mask,
                    cand_tokens=cand_tokens.to(device).float(),
                    frames_mask=frames_mask,
                )
            else:
                delta, token_attention = self.fusion(
                    queries, cand_kv.to(device), cand_mask, frames_mask=frames_mask
                )
        return self._assemble(
            indicators[:, 0], cand_cls, delta.float(), token_attention.float(), cand_mask
        )

    def _assemble(
        self,
        queries: torch.Tensor,
        cand_cls: torch.Tensor,
        delta: torch.Tensor,
        token_attention: torch.Tensor,
        cand_mask: torch.Tensor | None,
    ) -> FocusedScores:
        """queries [B, D], cand_cls [B, K, D], delta [B, K], token_attention [B, K, T'] -> scores"""
        broad = torch.bmm(
            F.normalize(cand_cls.float(), dim=-1),  # [B, K, D]
            F.normalize(queries.float(), dim=-1).unsqueeze(-1),  # [B, D, 1]
        ).squeeze(-1)  # [B, K] cosine
        batch_size, num_candidates, num_tokens = token_attention.shape
        frame_attention = token_attention.view(
            batch_size, num_candidates, num_tokens // self.tokens_per_frame, self.tokens_per_frame
        ).sum(-1)
        if cand_mask is not None:
            broad = broad.masked_fill(~cand_mask, float("-inf"))
        final = broad + delta
        return FocusedScores(broad=broad, delta=delta, final=final, frame_attention=frame_attention)

    def _check_v2t(
        self,
        frames_tokens: Any,
        video_cls: Any,
        cand_indicators: Any,
        cand_mask: Any,
        frames_mask: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any, Any]:
        """The inputs of :meth:`focused_scores_v2t`, validated (``InvalidInputError``)."""
        frames_tokens = _as_float_tensor("frames_tokens", frames_tokens, 3, "[B, T, D]")
        video_cls = _as_float_tensor("video_cls", video_cls, 2, "[B, D]")
        cand_indicators = _as_float_tensor("cand_indicators", cand_indicators, 4, "[B, K, m, D]")
        for name, tensor in (
            ("frames_tokens", frames_tokens),
            ("video_cls", video_cls),
            ("cand_indicators", cand_indicators),
        ):
            self._check_width(name, tensor)
        batch_size, num_candidates, num_indicators, width = cand_indicators.shape
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
        self._check_tokens_count("frames_tokens", frames_tokens.shape[1])
        cand_mask = self._check_mask(cand_mask, batch_size, num_candidates)
        num_frames = frames_tokens.shape[1] // self.tokens_per_frame
        frames_mask = self._check_frames_mask(frames_mask, (batch_size, num_frames))
        return frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask

    def focused_scores_v2t(
        self,
        frames_tokens: torch.Tensor,
        video_cls: torch.Tensor,
        cand_indicators: torch.Tensor,
        cand_mask: torch.Tensor | None = None,
        *,
        frames_mask: torch.Tensor | None = None,
    ) -> FocusedScores:
        """Video→text scores of K candidate texts per video (the ℓ_focus,t direction).

        The video's tokens are projected once; each candidate text's fused indicators attend over
        them as a single candidate, and the same head scores the pair (docs/method.md, "video→text").
        frames_tokens: [B, T', D]; video_cls: [B, D]; cand_indicators: [B, K, m, D];
        cand_mask: [B, K] bool or None; frames_mask: [B, T] bool (False = padded frame: no
        attention, not projected) or None. ``frame_attention`` is [B, K, T]: the video's frames
        as seen by each candidate text.
        """
        frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask = self._check_v2t(
            frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask
        )
        batch_size, num_candidates, num_indicators, width = cand_indicators.shape
        num_frames = frames_tokens.shape[1] // self.tokens_per_frame
        pair_frames_mask = None
        if frames_mask is not None:  # [B*K, 1, T]: each pair sees its video's mask
            pair_frames_mask = frames_mask.unsqueeze(1).expand(-1, num_candidates, -1)
            pair_frames_mask = pair_frames_mask.reshape(batch_size * num_candidates, 1, num_frames)
        device = self.device
        cand_indicators = cand_indicators.to(device)
        with self._autocast():
            kv = self.fusion.project_candidates(
                frames_tokens.to(device).float(), frames_mask
            )  # [B, n, 2, T', D]
            pair_kv = kv.unsqueeze(1).expand(-1, num_candidates, *kv.shape[1:])
            pair_kv = pair_kv.reshape(batch_size * num_candidates, 1, *kv.shape[1:])
            queries = self.fusion_queries(
                cand_indicators.reshape(batch_size * num_candidates, num_indicators, width)
            )
            delta, token_attention = self.fusion(
                queries, pair_kv, None, frames_mask=pair_frames_mask
            )  # [B*K, 1], [B*K, 1, T']
        delta = delta.float().view(batch_size, num_candidates)
        token_attention = token_attention.float().view(batch_size, num_candidates, -1)
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
            batch_size, num_candidates, num_tokens // self.tokens_per_frame, self.tokens_per_frame
        ).sum(-1)
        if cand_mask is not None:
            broad = broad.masked_fill(~cand_mask, float("-inf"))
        return FocusedScores(
            broad=broad, delta=delta, final=broad + delta, frame_attention=frame_attention
        )

    # ---- inference and identity ---------------------------------------------------------------
    def prepare_for_inference(self, *, vision: bool = True) -> TokenBinder:
        """Make this model an inference model, in place, and return it (``inference.prepare``):
        eval mode, packed linear layers on CPU float32, no parameters (its weights are frozen
        buffers), its fingerprints computed once. For search and serving
        (``load_checkpoint(inference=True)``); never for a model that will train.
        ``vision=False`` (the sidecar) also frees the vision tower: it can no longer encode
        videos, its fingerprints stay the checkpoint's."""
        return prepare(self, vision=vision)

    @property
    def has_vision(self) -> bool:
        """Whether the vision tower's weights are in memory (False: a serving model)."""
        state = self.__dict__.get("_inference")
        return state is None or state.vision

    @property
    def prepared(self) -> bool:
        """Whether :meth:`prepare_for_inference` made this an inference model."""
        return self.__dict__.get("_inference") is not None

    def fingerprint(self) -> str:
        """Stable hex hash of the config and every weight (name, dtype, shape, bytes): the whole
        model. Checkpoints are verified against it.

        Computed from the weights as they are: on every call, or (a prepared model) once and
        again whenever its weights are loaded or replaced."""
        return self._identities()[0]

    def vision_fingerprint(self) -> str:
        """Hash of everything that makes the stored data: the vision tower's architecture and
        weights, the frame sampling (T, the uniform rule) and the frame normalisation (image
        size, mean, std, patch tokens). The Milvus collection and the frame-token store record
        it; any checkpoint with the same vision fingerprint serves them as they are."""
        return self._identities()[1]

    def query_fingerprint(self) -> str:
        """Hash of the query side: the config and every weight outside the vision tower (text
        tower, indicators, fusion, logit scale). Retraining it never needs a re-ingest."""
        return self._identities()[2]

    def _identities(self) -> tuple[str, str, str]:
        """(whole model, vision side, query side) fingerprints, computed in one pass."""
        state = self.__dict__.get("_inference")
        return identities(self) if state is None else state.identities(self)

    def _vision_spec(self) -> dict[str, Any]:
        config = self.config
        if config.clip_cfg is not None:
            arch: Any = {
                "embed_dim": config.clip_cfg.get("embed_dim"),
                "vision_cfg": config.clip_cfg.get("vision_cfg"),
                "quick_gelu": bool(config.clip_cfg.get("quick_gelu", False)),
            }
        else:
            arch = config.clip_model
        return {
            "identity": VISION_IDENTITY_VERSION,
            "arch": arch,
            "num_frames": config.num_frames,
            "sampling": "uniform",  # tb_reranker.video.decode: T frames uniformly over the video
            "use_patch_tokens": config.use_patch_tokens,
            "image_size": self.image_size,
            "mean": list(self.image_mean),
            "std": list(self.image_std),
            "tokens": "l2-normalised per frame, [CLS] = normalised mean over real frames",
        }

    def extra_repr(self) -> str:
        return (
            f"D={self.embed_dim}, m={self.num_indicators}, T={self.num_frames}, K={self.top_k}, "
            f"head={self.config.head}, blocks={self.config.fusion_blocks}"
        )
