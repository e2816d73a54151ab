"""Fixtures shared by the unit tests."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="module")
def vit_b32_text():
    """Random weights, ViT-B/32's text tower (77 positions, width 512, 12 layers), tiny vision,
    fusion at D 512 with 8 heads; eval mode. Module-scoped: tests that change it copy it first."""
    from tb_reranker.model import TokenBinder, TokenBinderConfig
    from tb_reranker.model.config import TINY_CLIP_CFG, VIT_B_32_TEXT_CFG

    clip_cfg = copy.deepcopy(TINY_CLIP_CFG)
    clip_cfg["embed_dim"] = 512
    clip_cfg["text_cfg"] = copy.deepcopy(VIT_B_32_TEXT_CFG)
    return TokenBinder(TokenBinderConfig.tiny(clip_cfg=clip_cfg, fusion_heads=8)).eval()
