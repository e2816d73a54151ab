"""``TokenBinderConfig``: everything needed to rebuild a TokenBinder without the network."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from tb_reranker.errors import InvalidInputError

__all__ = ["TokenBinderConfig", "TINY_CLIP_CFG", "VIT_B_32_TEXT_CFG"]

# A small open_clip CLIP (the shape the synthetic preset trains end to end, docs/method.md §8, in minutes on 2 CPU cores).
# Keys follow open_clip's model-config JSON files (``open_clip/model_configs/*.json``).
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# ViT-B/32's text tower (open_clip ``text_cfg``): with TINY_CLIP_CFG's vision side and
# ``embed_dim`` 512, a model whose text encoding costs what the real one's does (benchmarks, tests).
VIT_B_32_TEXT_CFG: dict[str, Any] = {
    "context_length": 77,
    "vocab_size": 49408,
    "width": 512,
    "heads": 8,
    "layers": 12,
}

_HEADS = ("symmetric", "listwise", "listwise_slots")
_BROAD_QUERIES = ("indicator", "clip")
# Fields added after checkpoints existed: left out of the canonical JSON while at their default,
# so the fingerprint of every model saved before them stays what it was.
_OMITTED_AT_DEFAULT: dict[str, Any] = {"broad_query": "indicator", "frame_motion": False}


@dataclass(frozen=True)
class TokenBinderConfig:
    """Architecture and initialisation of a :class:`~tb_reranker.model.TokenBinder`.

    Exactly one of ``clip_model`` (an open_clip model name) and ``clip_cfg`` (a custom open_clip
    model-config dict) describes the backbone; ``clip_cfg`` wins when both are set.
    """

    clip_model: str = "ViT-B-32"  # open_clip model name (used when clip_cfg is None)
    clip_cfg: dict[str, Any] | None = (
        None  # custom open_clip CLIP cfg: embed_dim, vision_cfg, text_cfg
    )
    pretrained: str | None = (
        None  # open_clip pretrained tag or local checkpoint file; None = random
    )
    num_indicators: int = 4  # m: learned query indicators appended after the EOT token (1..8)
    num_frames: int = 12  # T: frames sampled per video
    top_k: int = 10  # K: candidates the focused view compares jointly (max for the listwise head)
    fusion_blocks: int = 1  # cross-attention blocks in the focused-view fusion
    fusion_heads: int = 8  # attention heads in each fusion block (must divide embed dim)
    fusion_mlp_ratio: float = 4.0  # FFN hidden width / embed dim in each fusion block
    head: str = "symmetric"  # "symmetric" (shared per-candidate MLP), "listwise" (the paper's
    # K-output MLP) or "listwise_slots" (K-output MLP over the K slots' own features)
    head_hidden: int = 0  # hidden width of the head MLP; 0 = embed dim
    rank_embedding: bool | None = None  # add rank embeddings to candidate K/V; None = listwise only
    gumbel_tau: float = 1.0  # softmax temperature of the fusion attention (train and eval)
    gumbel_scale: float = 0.3  # Gumbel noise multiplier in training (1 = textbook, 0 = no noise)
    indicator_init_std: float = 0.02  # std of the noise added to the EOT embedding at init
    use_patch_tokens: bool = False  # frame tokens = per-frame CLS + patch tokens (slower, larger)
    freeze_backbone: bool = False  # freeze the CLIP vision tower (cached frame features mode)
    freeze_text: bool = False  # also freeze the CLIP text transformer (indicators still train)
    # I_1, the broad-view query: "indicator" (the first learned indicator's output) or "clip"
    # (CLIP's own text feature, the EOT output: the broad view is exactly plain CLIP retrieval;
    # what `tb init` writes, so search works before any TokenBinder training)
    broad_query: str = "indicator"
    # the focused view's frame tokens also carry their change from the previous real frame:
    # x_t + W_m (x_t - x_{t-1}) with W_m zero-initialised (docs/method.md §3, "frame motion")
    frame_motion: bool = False
    seed: int | None = 0  # torch seed for the random init of new modules; None = global RNG
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata kept in checkpoints

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.clip_cfg is None and not self.clip_model:
            problems.append("either clip_model or clip_cfg must be set")
        if self.clip_cfg is not None:
            for key in ("embed_dim", "vision_cfg", "text_cfg"):
                if key not in self.clip_cfg:
                    problems.append(f"clip_cfg lacks {key!r}")
        if not 1 <= self.num_indicators <= 8:
            problems.append(f"num_indicators must be in 1..8, got {self.num_indicators}")
        if self.num_frames < 1:
            problems.append(f"num_frames must be >= 1, got {self.num_frames}")
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if self.fusion_blocks < 1:
            problems.append(f"fusion_blocks must be >= 1, got {self.fusion_blocks}")
        if self.fusion_heads < 1:
            problems.append(f"fusion_heads must be >= 1, got {self.fusion_heads}")
        if self.fusion_mlp_ratio <= 0:
            problems.append(f"fusion_mlp_ratio must be > 0, got {self.fusion_mlp_ratio}")
        if self.head not in _HEADS:
            problems.append(f"head must be one of {_HEADS}, got {self.head!r}")
        if self.head_hidden < 0:
            problems.append(f"head_hidden must be >= 0, got {self.head_hidden}")
        if self.broad_query not in _BROAD_QUERIES:
            problems.append(
                f"broad_query must be one of {_BROAD_QUERIES}, got {self.broad_query!r}"
            )
        if not isinstance(self.frame_motion, bool):
            problems.append(f"frame_motion must be true or false, got {self.frame_motion!r}")
        if not self.gumbel_tau > 0:
            problems.append(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if not self.gumbel_scale >= 0:
            problems.append(f"gumbel_scale must be >= 0, got {self.gumbel_scale}")
        if problems:
            raise InvalidInputError("invalid TokenBinderConfig: " + "; ".join(problems))

    def __hash__(self) -> int:  # dict fields are not hashable; hash the canonical JSON instead
        return hash(self.to_json())

    # ---- derived -------------------------------------------------------------------------------
    @property
    def uses_rank_embedding(self) -> bool:
        """Whether candidate K/V get rank embeddings (default: listwise head only)."""
        if self.rank_embedding is None:
            return self.head in ("listwise", "listwise_slots")
        return bool(self.rank_embedding)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> TokenBinderConfig:
        """A small random-init model that builds offline in well under a second (D=64, T=8)."""
        values: dict[str, Any] = dict(
            clip_model="",
            clip_cfg=json.loads(json.dumps(TINY_CLIP_CFG)),
            pretrained=None,
            num_indicators=4,
            num_frames=8,
            top_k=10,
            fusion_blocks=1,
            fusion_heads=2,
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def vit_b_32(cls, **overrides: Any) -> TokenBinderConfig:
        """The paper's ViT-B/32 setting with OpenAI CLIP weights (downloads them: needs network).

        OpenAI's weights were trained with QuickGELU: open_clip's plain ``ViT-B-32`` (nn.GELU)
        only warns and gives other features, so the ``-quickgelu`` twin is the model."""
        values: dict[str, Any] = dict(
            clip_model="ViT-B-32-quickgelu", clip_cfg=None, pretrained="openai"
        )
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> TokenBinderConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field (later-added fields only when not at default)."""
        data = asdict(self)
        for name, default in _OMITTED_AT_DEFAULT.items():
            if data.get(name) == default:
                del data[name]
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace variance): stable input for fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenBinderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer checkpoint format)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"a TokenBinderConfig must be a JSON object, got {type(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown TokenBinderConfig fields: {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidInputError(f"invalid TokenBinderConfig: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> TokenBinderConfig:
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"TokenBinderConfig JSON is malformed: {exc}") from exc
        return cls.from_dict(data)
