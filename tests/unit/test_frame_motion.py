"""``frame_motion``: the focused view also reads each frame's change from the previous one
(``tb_reranker/model/motion.py``): off by default with the old fingerprints, identity at init,
order-sensitive once trained, the same through cached K/V and raw tokens, blind to padding."""

from __future__ import annotations

import torch

from tb_reranker.model import TokenBinder, TokenBinderConfig
from tb_reranker.model.motion import FrameMotion
from tb_reranker.training.loop import TrainConfig, build_model_config

B, K, T, D = 2, 5, 8, 64


def _inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)

    return normal(B, 4, D), normal(B, K, D), normal(B, K, T, D)


def _trained(config: TokenBinderConfig, seed: int = 1) -> TokenBinder:
    """The model with every parameter of the fusion randomised (a 'trained' one: the zero
    initialised head and motion layers are not zero any more)."""
    model = TokenBinder(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.fusion.named_parameters():
            if "head" in name or "motion" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def test_off_by_default_and_left_out_of_the_fingerprint() -> None:
    plain = TokenBinderConfig.tiny()
    assert plain.frame_motion is False
    assert "frame_motion" not in plain.to_dict()  # saved models keep their fingerprints
    moving = plain.replace(frame_motion=True)
    assert moving.to_dict()["frame_motion"] is True
    assert TokenBinderConfig.from_json(moving.to_json()) == moving
    assert TokenBinder(plain).fusion.motion is None


def test_a_non_boolean_is_refused() -> None:
    import pytest

    from tb_reranker.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="frame_motion"):
        TokenBinderConfig.tiny(frame_motion="yes")


def test_untrained_motion_changes_nothing() -> None:
    """Zero-initialised W_m: the model starts exactly where one without motion does."""
    plain = TokenBinder(TokenBinderConfig.tiny()).eval()
    moving = TokenBinder(TokenBinderConfig.tiny(frame_motion=True)).eval()
    state = {k: v for k, v in moving.state_dict().items() if not k.startswith("fusion.motion.")}
    assert plain.state_dict().keys() == state.keys()
    moving.load_state_dict({**plain.state_dict(), **moving.fusion.motion.state_dict(
        prefix="fusion.motion.")})  # fmt: skip
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            moving.fusion.project_candidates(cand_tokens[0]),
            plain.fusion.project_candidates(cand_tokens[0]),
        )


def test_trained_motion_sees_the_order_of_frames() -> None:
    """A reversed clip has the same frames; only their differences (and positions) tell it
    apart. With the position embeddings zeroed, only a model with motion scores it otherwise."""
    indicators, cand_cls, cand_tokens = _inputs()
    reversed_tokens = cand_tokens.flip(2)
    for motion, differs in ((False, False), (True, True)):
        model = _trained(TokenBinderConfig.tiny(frame_motion=motion))
        with torch.no_grad():
            model.fusion.frame_position_embedding.zero_()
            forward = model.focused_scores(indicators, cand_cls, cand_tokens).delta
            backward = model.focused_scores(indicators, cand_cls, reversed_tokens).delta
        assert (not torch.allclose(forward, backward, atol=1e-5)) is differs


def test_cached_kv_and_raw_tokens_agree_with_padded_frames() -> None:
    """The Reranker's cached K/V and the uncached token path give the same scores, and a padded
    frame's content never reaches a real frame through the differences."""
    model = _trained(TokenBinderConfig.tiny(frame_motion=True))
    indicators, cand_cls, cand_tokens = _inputs()
    frames_mask = torch.ones(B, K, T, dtype=torch.bool)
    frames_mask[:, 1, 5:] = False  # a short video
    frames_mask[:, 3, 2] = False  # a frame missing in the middle: frame 3's change is unknown
    with torch.no_grad():
        kv = model.project_candidates(cand_tokens.flatten(0, 1), frames_mask.flatten(0, 1))
        cached = model.focused_scores(
            indicators, cand_cls, cand_kv=kv.unflatten(0, (B, K)), frames_mask=frames_mask
        )
        raw = model.focused_scores(indicators, cand_cls, cand_tokens, frames_mask=frames_mask)
        torch.testing.assert_close(cached.final, raw.final, rtol=1e-4, atol=1e-5)
        junk = cand_tokens.clone()
        junk[:, 1, 5:] = torch.randn_like(junk[:, 1, 5:]) * 10
        junk[:, 3, 2] = torch.randn_like(junk[:, 3, 2]) * 10
        again = model.focused_scores(indicators, cand_cls, junk, frames_mask=frames_mask)
        torch.testing.assert_close(again.final, raw.final)


def test_motion_layer_with_patch_tokens_differences_each_token() -> None:
    """With patch tokens (T' = T·P) a token's change is taken from the same token one frame back."""
    layer = FrameMotion(4, tokens_per_frame=3)
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(4))
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 6, 4)  # T = 2 frames of 3 tokens
    out = layer(tokens)
    torch.testing.assert_close(out[0, :3], tokens[0, :3])  # the first frame: no change
    torch.testing.assert_close(out[0, 3:], tokens[0, 3:] + 12.0)  # each token moved by 12


def test_train_config_turns_it_on() -> None:
    config = TrainConfig(data_root="d", out_dir="o", frame_motion=True)
    assert build_model_config(config).frame_motion is True
    assert build_model_config(TrainConfig(data_root="d", out_dir="o")).frame_motion is False


def test_tb_train_frame_motion_as_a_subprocess(tmp_path) -> None:
    """``tb train --frame-motion`` as a user runs it: the checkpoint says so, its motion layer
    learned, and the inference-prepared model (packed layers) scores as the training one."""
    import os
    import subprocess
    import sys

    from tb_reranker.model.checkpoint import load_checkpoint
    from tb_reranker.video.synth import generate

    data = tmp_path / "synth"
    generate(data, num_train=16, num_val=0, num_test=0, seed=5, families=("order",),
             workers=1, progress=False)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    command = [sys.executable, "-m", "tb_reranker", "train", "--data", str(data), "--out",
               str(tmp_path / "run"), "--config", "tiny", "--epochs", "1", "--batch-size", "8",
               "--frame-motion", "--threads", "1", "--no-progress",
               "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    checkpoint = tmp_path / "run" / "epoch-1"
    model = load_checkpoint(checkpoint)
    assert model.config.frame_motion is True
    assert model.fusion.motion is not None and model.fusion.motion.proj.weight.abs().sum() > 0
    served = load_checkpoint(checkpoint, inference=True)
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.no_grad():
        expected = model.focused_scores(indicators, cand_cls, cand_tokens).final
        kv = served.project_candidates(cand_tokens.flatten(0, 1)).unflatten(0, (B, K))
        got = served.focused_scores(indicators, cand_cls, cand_kv=kv).final
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
