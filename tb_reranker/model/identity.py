"""A model's identity: the whole-model, vision and query-side fingerprints.

:func:`identities` hashes the config and the bytes of every state tensor (name, dtype, shape,
bytes) in one pass: the whole model; the vision side (:func:`vision_spec`, what the stored data
depends on, and every tensor under ``clip.visual.``); the query side (the config and every
other tensor). Checkpoints, Milvus collections and frame records carry these values: what they
cover never changes without a new ``VISION_IDENTITY_VERSION`` (the values are pinned by
``tests/unit/test_model_identity.py``). Where they are computed, and when again, is
:mod:`tb_reranker.model.inference`'s business.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from tb_reranker.model.clip import OPENAI_MEAN, OPENAI_STD, image_size, preprocess_value
from tb_reranker.model.config import TokenBinderConfig

__all__ = ["VISION_IDENTITY_VERSION", "VISION_PREFIX", "Identities", "identities", "vision_spec"]

VISION_IDENTITY_VERSION = 1  # bump when what the vision fingerprint covers changes

# the state-dict prefix of the vision tower; its weights are the vision fingerprint's
VISION_PREFIX = "clip.visual."

Identities = tuple[str, str, str]  # (whole model, vision side, query side)


class Identified(Protocol):
    """What the fingerprints read of a model (a ``TokenBinder``)."""

    config: TokenBinderConfig
    clip: nn.Module

    def state_dict(self) -> Mapping[str, torch.Tensor]: ...


def vision_spec(config: TokenBinderConfig, clip: nn.Module) -> dict[str, Any]:
    """Everything but the weights that makes the stored data: the vision tower's architecture,
    the frame sampling and the frame normalisation."""
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
        "image_size": image_size(clip),
        "mean": list(preprocess_value(clip, "mean", OPENAI_MEAN)),
        "std": list(preprocess_value(clip, "std", OPENAI_STD)),
        "tokens": "l2-normalised per frame, [CLS] = normalised mean over real frames",
    }


def identities(model: Identified) -> Identities:
    """(whole model, vision side, query side) fingerprints of ``model``'s config and weights as
    they are now, computed in one pass over every state tensor (name, dtype, shape, bytes)."""
    state = model.state_dict()
    whole, vision, query = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    config_json = model.config.to_json().encode()
    whole.update(config_json)
    vision.update(json.dumps(vision_spec(model.config, model.clip), sort_keys=True).encode())
    query.update(b"query|" + config_json)
    for name in sorted(state):
        tensor = state[name].detach()
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode()
        flat = tensor.to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().data if flat.numel() else b""
        side = vision if name.startswith(VISION_PREFIX) else query
        for digest in (whole, side):
            digest.update(header)
            digest.update(data)
    return whole.hexdigest()[:32], vision.hexdigest()[:32], query.hexdigest()[:32]
