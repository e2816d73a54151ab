"""The open_clip model under a ``TokenBinder``: built from its config, with its preprocessing.

:func:`build_clip` builds the named open_clip model or a custom ``clip_cfg`` (random init, or
the pretrained weights the config names: a local file or an open_clip tag); a weights file that
fails to load is one ``CheckpointError`` line. The rest reads what the model needs of it: the
embedding width, the tokens per frame, the tokenizer, which towers train (:func:`freeze`), the
frame size and normalisation the model was trained with (OpenAI's mean and std when open_clip
records none).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tb_reranker.errors import CheckpointError, InvalidInputError
from tb_reranker.model.config import TokenBinderConfig

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "build_clip",
    "clip_tokenizer",
    "embed_dim",
    "frame_tokens",
    "freeze",
    "image_size",
    "preprocess_value",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(config: TokenBinderConfig, load_pretrained: bool = True) -> nn.Module:
    """The open_clip model described by ``config`` (random init unless pretrained is loaded).

    ``load_pretrained=False`` never touches the network or the disk (used by ``load``, whose
    weights come from the checkpoint).
    """
    import open_clip  # heavy: imported on first use

    pretrained = config.pretrained if load_pretrained else None
    if config.clip_cfg is not None:
        return _custom_clip(dict(config.clip_cfg), pretrained)
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


def _custom_clip(cfg: dict, pretrained: str | None) -> nn.Module:
    """A CLIP of a custom open_clip cfg, with the weights of a local file if one is named."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

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


def preprocess_value(
    clip: nn.Module, key: str, default: tuple[float, ...]
) -> tuple[float, float, float]:
    """``clip``'s preprocessing value ``key`` ("mean", "std") as floats, ``default`` if unset."""
    from open_clip import get_model_preprocess_cfg

    value = get_model_preprocess_cfg(clip).get(key) or default
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def image_size(clip: nn.Module) -> int:
    """The side of the square frames ``clip``'s vision tower takes."""
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def embed_dim(clip: nn.Module) -> int:
    """D: the width of ``clip``'s text projection (the joint embedding space)."""
    projection = clip.text_projection
    if isinstance(projection, torch.Tensor):
        return int(projection.shape[1])
    if isinstance(projection, nn.Linear):
        return int(projection.out_features)
    raise InvalidInputError("the open_clip text tower has no projection: embed dim unknown")


def frame_tokens(clip: nn.Module, use_patch_tokens: bool) -> int:
    """Tokens per frame: 1 (the frame's CLS), or 1 + the patches, after switching ``clip``'s ViT
    to return its patch tokens too."""
    if not use_patch_tokens:
        return 1
    visual = clip.visual
    if not hasattr(visual, "output_tokens") or getattr(visual, "proj", None) is None:
        raise InvalidInputError("use_patch_tokens needs an open_clip ViT with a proj")
    visual.output_tokens = True
    grid = visual.grid_size
    return 1 + int(grid[0]) * int(grid[1])


def clip_tokenizer(config: TokenBinderConfig, context_length: int) -> Any:
    """open_clip's tokenizer for ``config``'s text tower (a custom cfg: the plain BPE one)."""
    import open_clip

    if config.clip_cfg is not None:
        return open_clip.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(config.clip_model)


def freeze(clip: nn.Module, *, backbone: bool, text: bool) -> None:
    """Stop the gradients of ``clip``'s vision tower (``backbone``) and of its text tower
    (``text``: every weight outside the vision tower but the logit scale)."""
    if backbone:
        clip.visual.requires_grad_(False)
    if text:
        for name, parameter in clip.named_parameters():
            if not name.startswith("visual.") and name != "logit_scale":
                parameter.requires_grad_(False)
