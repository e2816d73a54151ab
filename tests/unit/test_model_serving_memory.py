"""A serving model (``load_checkpoint(inference=True, vision=False)``, what ``tb serve`` loads)
holds no vision tower: its memory is given back, its fingerprints stay the checkpoint's, and
what would need the tower is a typed error, never a wrong answer."""

from __future__ import annotations

import pytest
import torch

from tb_reranker.errors import CheckpointError
from tb_reranker.model import TokenBinder, TokenBinderConfig, load_checkpoint, save_checkpoint
from tb_reranker.model.identity import VISION_PREFIX


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    with torch.no_grad():  # a head that scores (its last layer starts at zero)
        for parameter in model.fusion.head[-1].parameters():
            parameter.normal_(0, 0.5)
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "checkpoint")


def _vision_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if name.startswith(VISION_PREFIX)
    )


def test_a_serving_model_frees_its_vision_tower_and_keeps_its_identity(checkpoint, tmp_path):
    full = load_checkpoint(checkpoint, inference=True)
    serving = load_checkpoint(checkpoint, inference=True, vision=False)
    assert _vision_bytes(full) > 0 and _vision_bytes(serving) == 0
    assert full.has_vision and not serving.has_vision
    for name in ("fingerprint", "vision_fingerprint", "query_fingerprint"):
        assert getattr(serving, name)() == getattr(full, name)()
    texts = ["a red circle then a blue square", "a dog"]
    tokens = torch.randn(2, 5, full.num_frames, full.embed_dim)
    tokens = torch.nn.functional.normalize(tokens, dim=-1)
    with torch.inference_mode():
        a, b = full.encode_text(texts), serving.encode_text(texts)
        torch.testing.assert_close(a, b)
        cls = torch.nn.functional.normalize(tokens.mean(2), dim=-1)
        fa = full.focused_scores(a, cls, tokens).final
        fb = serving.focused_scores(b, cls, tokens).final
    torch.testing.assert_close(fa, fb)
    frames = torch.zeros(1, full.num_frames, 3, full.image_size, full.image_size)
    with pytest.raises(CheckpointError, match="without its vision tower"):
        serving.encode_frames(frames)
    with pytest.raises(CheckpointError, match="without its vision tower"):
        save_checkpoint(serving, tmp_path / "copy")
    query_side = {k: v for k, v in full.state_dict().items() if not k.startswith(VISION_PREFIX)}
    serving.load_state_dict(query_side, strict=False)
    with pytest.raises(CheckpointError, match="without its vision tower"):
        serving.fingerprint()  # new weights need a new identity, which needs the tower
    assert not (tmp_path / "copy").exists()


def test_the_sidecar_loads_a_serving_model(checkpoint, tmp_path):
    """``tb serve``'s loader (before: the whole model, vision tower included)."""
    from tb_reranker.config import Settings
    from tb_reranker.server.app import load_components
    from tb_reranker.server.config import ServerConfig

    settings = Settings.from_env(data_dir=str(tmp_path), checkpoint=str(checkpoint))
    components = load_components(settings, ServerConfig())
    try:
        model = components.reranker.model
        assert not model.has_vision and _vision_bytes(model) == 0
    finally:
        components.reranker.store.close()
