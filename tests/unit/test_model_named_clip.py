"""A checkpoint of a named open_clip model (``tb init --config vit-b-32`` makes one) loads.

Before: ``load_checkpoint`` checked shapes on a skeleton built under ``torch.device("meta")``,
and open_clip's ``create_model`` moved it to "cpu": "Cannot copy out of meta tensor", so every
such checkpoint was refused as "config cannot build a model" (tests used custom clip configs)."""

from __future__ import annotations

import torch

from tb_reranker.model import TokenBinder, TokenBinderConfig, load_checkpoint, save_checkpoint

NAMED = "ViT-S-32-alt"  # a small named open_clip model: the same code path as ViT-B-32


def test_a_named_open_clip_checkpoint_loads_plain_and_for_inference(tmp_path):
    config = TokenBinderConfig.tiny(clip_model=NAMED, clip_cfg=None, pretrained=None)
    model = TokenBinder(config, load_pretrained=False).eval()
    directory = save_checkpoint(model, tmp_path / "checkpoint")
    texts = ["a dog catches a frisbee", "a red circle"]
    with torch.inference_mode():
        expected = model.encode_text(texts)
    for kwargs in ({}, {"inference": True}):
        loaded = load_checkpoint(directory, **kwargs)
        assert loaded.fingerprint() == model.fingerprint()
        with torch.inference_mode():
            torch.testing.assert_close(loaded.encode_text(texts), expected, atol=1e-5, rtol=1e-5)
