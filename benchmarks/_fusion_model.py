"""A TokenBinder whose focused-view fusion has the paper's width (D = 512, T = 12) for benchmarks.

The CLIP towers are the tiny offline config (they are not used: benchmarks feed synthetic
indicators and frame tokens), only the embedding width is raised to D so that the fusion (K/V
projections, cross-attention, head) does the arithmetic of a ViT-B/32-sized model.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["build_fusion_model", "random_unit"]


def build_fusion_model(
    *,
    embed_dim: int = 512,
    num_frames: int = 12,
    num_indicators: int = 4,
    top_k: int = 10,
    fusion_heads: int = 8,
    device: str = "cpu",
    nonzero_head: bool = True,
) -> Any:
    """A random-init ``TokenBinder`` in eval mode with fusion width ``embed_dim``.

    The fusion head's output layer is zero-initialised (delta = 0 before training); with
    ``nonzero_head`` it gets small random weights so that scores depend on the fusion.
    """
    import torch

    from tb_reranker.model import TokenBinder, TokenBinderConfig
    from tb_reranker.model.config import TINY_CLIP_CFG

    clip_cfg = copy.deepcopy(TINY_CLIP_CFG)
    clip_cfg["embed_dim"] = embed_dim
    config = TokenBinderConfig.tiny(
        clip_cfg=clip_cfg,
        num_frames=num_frames,
        num_indicators=num_indicators,
        top_k=top_k,
        fusion_heads=fusion_heads,
    )
    model = TokenBinder(config)
    if nonzero_head:
        with torch.no_grad():
            last = model.fusion.head[-1]
            torch.nn.init.normal_(last.weight, std=0.02)
            torch.nn.init.normal_(last.bias, std=0.02)
    return model.to(device).eval()


def random_unit(generator: Any, *shape: int) -> Any:
    """Random L2-normalised float32 vectors (last axis), from a ``numpy.random.Generator``."""
    import numpy as np

    x = generator.standard_normal(shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x
