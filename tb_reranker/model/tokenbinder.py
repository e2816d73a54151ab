"""``TokenBinder``: CLIP encoders with query indicators + the focused-view fusion (docs/method.md).

The class owns the modules and the contract; the rest is elsewhere, one job per module: the
open_clip model's construction (``clip.py``), the input checks (``checks.py``), the
fingerprints (``identity.py``), scoring in both directions (``scoring.py``), inference preparation
(``inference.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tb_reranker.errors import CheckpointError, InvalidInputError
from tb_reranker.model.checks import InputChecks
from tb_reranker.model.clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    build_clip,
    clip_tokenizer,
    embed_dim,
    frame_tokens,
    freeze,
    image_size,
    preprocess_value,
)
from tb_reranker.model.config import TokenBinderConfig
from tb_reranker.model.fusion import FocusedFusion, FocusedScores
from tb_reranker.model.identity import Identities, identities
from tb_reranker.model.inference import WITHOUT_VISION, InferenceState, prepare
from tb_reranker.model.precision import autocast_dtype, check_precision, resolve_device
from tb_reranker.model.scoring import text_to_video_scores, video_to_text_scores
from tb_reranker.model.text import IndicatorTextEncoder
from tb_reranker.model.tokens import tokenize

__all__ = ["TokenBinder"]

logger = logging.getLogger(__name__)


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
            self.tokens_per_frame = frame_tokens(self.clip, config.use_patch_tokens)
            self.embed_dim = embed_dim(self.clip)
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
                frame_motion=config.frame_motion,
            )
        freeze(self.clip, backbone=config.freeze_backbone, text=config.freeze_text)
        self._tokenizer: Any = None
        self._inference: InferenceState | None = None  # set by prepare_for_inference
        self._precision = check_precision(precision)
        self.eval()
        self.to(resolve_device(device))

    # ---- construction helpers ------------------------------------------------------------------
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
        return image_size(self.clip)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return preprocess_value(self.clip, "mean", OPENAI_MEAN)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return preprocess_value(self.clip, "std", OPENAI_STD)

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

    @property
    def _checks(self) -> InputChecks:
        """The input checks, on the device the model is on now (built again after a move)."""
        checks = self.__dict__.get("_input_checks")
        if checks is None or checks.device != self.device:
            checks = self.__dict__["_input_checks"] = self._new_checks()
        return checks

    def _new_checks(self) -> InputChecks:
        fusion = self.fusion
        return InputChecks(
            embed_dim=self.embed_dim,
            num_indicators=self.num_indicators,
            num_frames=self.num_frames,
            tokens_per_frame=self.tokens_per_frame,
            top_k=self.top_k,
            position_bound=self.config.head in ("listwise", "listwise_slots")
            or fusion.rank_embedding is not None,
            context_length=self.context_length,
            vocab_size=self.text.token_embedding.num_embeddings,
            num_blocks=fusion.num_blocks,
            image_size=self.image_size,
            device=self.device,
        )

    # ---- text ----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """list[str] -> tokens [B, context_length - m] int64 (CPU), truncated to fit."""
        texts = self._checks.texts(texts)
        if self._tokenizer is None:
            self._tokenizer = clip_tokenizer(self.config, self.context_length)
        # only what the text tower reads is BPE-encoded: same rows, bounded work per text
        return tokenize(self._tokenizer, texts, self.context_length)

    def encode_text_tokens(self, texts_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, L'] -> (indicators [B, m, D] L2-normalised, plain CLIP feature [B, D] L2-normalised)."""
        texts_tokens = self._checks.tokens(texts_tokens)
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
        frames, frames_mask = self._checks.frames(frames, frames_mask)
        batch_size, num_frames = frames.shape[:2]
        size = self.image_size
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
    def project_candidates(
        self, frames_tokens: torch.Tensor, frames_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-video fusion keys/values, cacheable (independent of query and other candidates).

        frames_tokens: [N, T', D]; frames_mask: [N, T] bool (False = padded frame) or None
        -> kv [N, n_blocks, 2, T', D] float32. Padded frames' tokens are not projected (zero
        K/V): pass the same mask to ``focused_scores(frames_mask=...)``.
        """
        frames_tokens, frames_mask = self._checks.frames_tokens(frames_tokens, frames_mask)
        with self._autocast():
            kv = self.fusion.project_candidates(frames_tokens.to(self.device).float(), frames_mask)
        return kv.float()

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
        """Broad and focused scores of K candidates per query (docs/method.md §2-3).

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
        inputs = indicators, cand_cls, cand_tokens, cand_mask, cand_kv, frames_mask
        if validate:
            inputs = self._checks.focused(*inputs)
        return text_to_video_scores(self, *inputs)

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
        them as a single candidate, and the same head scores the pair (docs/method.md §4,
        "video→text"; ``scoring.video_to_text_scores``).
        frames_tokens: [B, T', D]; video_cls: [B, D]; cand_indicators: [B, K, m, D];
        cand_mask: [B, K] bool or None; frames_mask: [B, T] bool (False = padded frame: no
        attention, not projected) or None. ``frame_attention`` is [B, K, T]: the video's frames
        as seen by each candidate text.
        """
        return video_to_text_scores(
            self, frames_tokens, video_cls, cand_indicators, cand_mask, frames_mask=frames_mask
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

    def _identities(self) -> Identities:
        """(whole model, vision side, query side) fingerprints, computed in one pass."""
        state = self.__dict__.get("_inference")
        return identities(self) if state is None else state.identities(self)

    def extra_repr(self) -> str:
        return (
            f"D={self.embed_dim}, m={self.num_indicators}, T={self.num_frames}, K={self.top_k}, "
            f"head={self.config.head}, blocks={self.config.fusion_blocks}"
        )
