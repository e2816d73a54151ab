"""Training augmentations (issue 24): captions rewritten exactly when the pixels change their
meaning (flip: left/right; time reversal: order, direction, colour change, appear/disappear),
kept otherwise; the added twins are the same pixels transformed; the spec is validated; a training
run with every augmentation on trains and is reproducible."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tb_reranker.errors import InvalidInputError
from tb_reranker.training.augment import Augment, flipped_caption, reversed_caption
from tb_reranker.video.synth import DIRECTIONS, caption, time_reversed, twin_groups


@pytest.mark.parametrize("family", ["order", "motion", "colour"])
def test_reversal_rewrites_every_synth_caption_as_its_twin(family: str) -> None:
    """For every twin group of every family, the rewritten caption is exactly the twin's."""
    for objects, direction in twin_groups(family):
        text = caption(family, objects, direction)
        twin = caption(family, *time_reversed(family, objects, direction))
        assert reversed_caption(text) == twin
        assert reversed_caption(twin) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a man opens the door then walks out", "walks out then a man opens the door"),
        ("the cup appears on the table", "the cup disappears on the table"),
        ("the cup disappears", "the cup appears"),
        ("a ball moving up-right", "a ball moving down-left"),
        ("a man cooking pasta", None),
        ("a bright light", None),  # "right" inside a word is no side
    ],
)
def test_reversal_of_free_text(text: str, expected: str | None) -> None:
    assert reversed_caption(text) == expected


def test_flip_swaps_sides_only() -> None:
    for left, right in DIRECTIONS.values():
        for word in (left, right):
            text = f"a red square moving {word}"
            flipped = flipped_caption(text)
            if "left" in word or "right" in word:
                assert flipped != text and flipped_caption(flipped) == text
            else:
                assert flipped == text  # up/down: a mirror keeps them
    assert (
        flipped_caption("a bright red square then a circle") == "a bright red square then a circle"
    )
    assert flipped_caption("left of the car, right-hand side") == "right of the car, left-hand side"


def test_scaled_multiplies_every_probability() -> None:
    spec = Augment.parse("crop=0.5,noise=1,reverse=0.25")
    assert spec.scaled(0.5) == Augment(crop=0.25, noise=0.5, reverse=0.125)
    assert not spec.scaled(0.0) and spec.scaled(1.0) == spec


def test_spec_parsing() -> None:
    assert not Augment.parse("") and not Augment.parse(None)
    spec = Augment.parse("crop=0.5, flip=1")
    assert spec.crop == 0.5 and spec.flip == 1.0 and spec.reverse == 0.0 and spec
    assert Augment.parse("zoom=0.5,noise=0.25,time=1").time == 1.0
    for bad in ("crop", "crop=2", "blur=0.5", "flip=-0.1", "reverse=x"):
        with pytest.raises(InvalidInputError, match="invalid augmentation"):
            Augment.parse(bad)


def _batch(b: int = 3, t: int = 6, real: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    frames = torch.randn(b, t, 3, 8, 8)
    masks = torch.zeros(b, t, dtype=torch.bool)
    masks[:, :real] = True
    frames[:, real:] = 0.0
    return frames, masks


def test_twins_are_added_beside_the_originals_as_the_same_pixels() -> None:
    frames, masks = _batch()
    texts = ["a red square then a blue circle", "a man cooking", "a cross moving left"]
    out, out_masks, out_texts = Augment(flip=1.0, reverse=1.0)(
        frames, masks, texts, torch.Generator().manual_seed(0)
    )
    assert out_texts[:3] == texts and torch.equal(out[:3], frames)  # originals untouched
    assert out_texts[3:] == [
        "a red square then a blue circle",  # flipped: nothing in it names a side
        "a man cooking",  # flipped (no rule reverses it)
        "a cross moving right",  # flipped
        "a blue circle then a red square",  # reversed
        "a cross moving right",  # reversed
    ]
    assert torch.equal(out[3], frames[0].flip(-1)) and torch.equal(out[5], frames[2].flip(-1))
    assert torch.equal(out[6, :5], frames[0, :5].flip(0)) and torch.equal(out[6, 5:], frames[0, 5:])
    assert torch.equal(out[7, :5], frames[2, :5].flip(0))
    assert torch.equal(out_masks[3:], masks[[0, 1, 2, 0, 2]])


def test_reversal_twins_from_encoded_tokens_train_as_from_reversed_pixels() -> None:
    """Training reverses the encoded tokens of a twin's clip instead of encoding the reversed
    frames (``loop._encode_with_reversals``): the same loss and the same gradients. (K = 10
    covers the whole batch: a twin's video [CLS] ties with its clip's, and float rounding
    would otherwise decide which of the two is a top-K candidate.)"""
    from tb_reranker.model import TokenBinder, TokenBinderConfig, tokenbinder_loss
    from tb_reranker.training.loop import _encode_with_reversals

    model = TokenBinder(TokenBinderConfig.tiny(use_patch_tokens=True, gumbel_scale=0.0)).train()
    with torch.no_grad():  # a 'trained' head, so the focused view has gradients to compare
        model.fusion.head[-1].weight.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(4, 8, 3, 32, 32, generator=generator)
    masks = torch.ones(4, 8, dtype=torch.bool)
    masks[1, 6:] = False
    texts = ["a red square then a blue circle", "a cross moving left", "a dot", "a x then a y"]
    augmented = Augment(flip=0.5, reverse=1.0).batch(frames, masks, texts, generator)
    assert augmented.reversed_of == [0, 1, 3]

    def loss_and_grads(videos, videos_masks, videos_texts):
        model.zero_grad()
        loss = tokenbinder_loss(model, videos_texts, videos, frames_mask=videos_masks)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}  # fmt: skip

    tokens_input = _encode_with_reversals(model, augmented)
    assert tokens_input[0].ndim == 3 and tokens_input[2] == augmented.materialise()[2]
    by_tokens, grads_tokens = loss_and_grads(*tokens_input)
    by_pixels, grads_pixels = loss_and_grads(*augmented.materialise())
    torch.testing.assert_close(by_tokens, by_pixels, rtol=1e-4, atol=1e-5)  # float32 rounding
    assert grads_tokens.keys() == grads_pixels.keys()
    for name in grads_pixels:
        torch.testing.assert_close(grads_tokens[name], grads_pixels[name], rtol=1e-3, atol=1e-5)


def test_preserving_augmentations_keep_shape_captions_and_change_pixels() -> None:
    frames, masks = _batch()
    texts = ["a", "b", "c"]
    augment = Augment(crop=1.0, colour=1.0, shift=1.0, zoom=1.0, noise=1.0, time=1.0)
    out, out_masks, out_texts = augment(frames, masks, texts, torch.Generator().manual_seed(1))
    assert out.shape == frames.shape and out_texts == texts and torch.equal(out_masks, masks)
    assert not torch.allclose(out, frames)
    again = augment(frames, masks, texts, torch.Generator().manual_seed(1))[0]
    assert torch.equal(out, again)  # the generator decides everything


def test_time_warp_keeps_the_ends_and_the_order_of_the_real_frames() -> None:
    t, real = 12, 10
    frames = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1).expand(4, t, 3, 4, 4).clone()
    masks = torch.zeros(4, t, dtype=torch.bool)
    masks[:, :real] = True
    out, _, _ = Augment(time=1.0)(frames, masks, ["a"] * 4, torch.Generator().manual_seed(2))
    seen = out[:, :, 0, 0, 0]
    assert torch.equal(seen[:, real:], frames[:, real:, 0, 0, 0])  # padding untouched
    assert (seen[:, 0] == 0).all() and (seen[:, real - 1] == real - 1).all()
    assert (seen[:, 1:real] >= seen[:, : real - 1]).all()  # never backwards
    assert any(not torch.equal(row[:real], torch.arange(real, dtype=torch.float32)) for row in seen)


def test_texture_keeps_the_clips_dtype() -> None:
    """Its noise is drawn in float32 on the CPU generator and added in the clip's own dtype
    (and device: tests/unit/test_cuda.py runs the augmentations on CUDA frames)."""
    from tb_reranker.training.augment import _texture

    clip = torch.zeros(2, 3, 8, 8, dtype=torch.bfloat16)
    assert _texture(clip, torch.Generator().manual_seed(5)).dtype == torch.bfloat16


def test_zoom_out_shrinks_a_shape_and_texture_leaves_the_mean_colour() -> None:
    frames = torch.full((1, 4, 3, 32, 32), -1.0)
    frames[..., 8:24, 8:24] = 1.0  # a bright square, half the side
    masks = torch.ones(1, 4, dtype=torch.bool)
    zoomed = Augment(zoom=1.0)(frames, masks, ["a"], torch.Generator().manual_seed(3))[0]
    assert (zoomed[0, 0, 0] > 0).sum() < (frames[0, 0, 0] > 0).sum()
    textured = Augment(noise=1.0)(frames, masks, ["a"], torch.Generator().manual_seed(4))[0]
    assert not torch.allclose(textured, frames)
    inside, outside = textured[..., 10:22, 10:22].mean(), textured[..., :6, :6].mean()
    assert inside > 0.5 and outside < -0.5  # the square stays the square


def test_training_with_every_augmentation_runs_and_reproduces(tmp_path, mp4_synth) -> None:
    from tb_reranker.model import load_checkpoint
    from tb_reranker.training import TrainConfig, train

    def run(name: str, **changes) -> dict[str, torch.Tensor]:
        config = TrainConfig(
            data_root=str(mp4_synth),
            out_dir=str(tmp_path / name),
            model_config="tiny",
            epochs=1,
            batch_size=8,
            augment="crop=0.5,colour=0.5,shift=0.5,zoom=0.5,noise=0.5,time=0.5,flip=0.5,reverse=0.5",
            cache_dir=str(tmp_path / "cache"),
            threads=1,
            progress=False,
        )
        return load_checkpoint(train(dataclasses.replace(config, **changes))).state_dict()

    first, second = run("a"), run("b")
    assert all(torch.equal(first[k], second[k]) for k in first)
    # a warm-up ramps the probabilities from 0: its first epoch trains on the clean clips
    clean, warm = run("clean", augment=""), run("warm", augment_warmup=3)
    assert all(torch.equal(clean[k], warm[k]) for k in clean)
    assert not all(torch.equal(clean[k], first[k]) for k in clean)
    with pytest.raises(InvalidInputError, match="augment_warmup"):
        TrainConfig(data_root="x", out_dir="y", augment_warmup=-1)
    with pytest.raises(InvalidInputError, match="freeze_backbone"):
        TrainConfig(data_root="x", out_dir="y", augment="flip=1", freeze_backbone=True)


@pytest.fixture(scope="module")
def mp4_synth(tmp_path_factory: pytest.TempPathFactory):
    from tb_reranker.video.synth import generate

    root = tmp_path_factory.mktemp("aug_synth")
    generate(root, num_train=16, num_val=0, num_test=0, seed=3, families=("order", "motion"),
             workers=1, progress=False)  # fmt: skip
    return root


def test_cli_refuses_a_bad_spec_in_one_line(tmp_path, capsys, tb_exit_code) -> None:
    code = tb_exit_code(
        ["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--augment", "blur=1"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "invalid augmentation 'blur=1'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_tb_train_with_the_wide_spec_and_a_warmup_as_a_subprocess(tmp_path, mp4_synth) -> None:
    """``tb train`` as a user runs it: the wide spec with a warm-up trains and writes its
    checkpoint; a negative warm-up is one line and exit 2, no traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    spec = "crop=0.5,colour=0.5,shift=0.5,zoom=0.5,noise=0.5,time=0.5,flip=0.5,reverse=0.5"
    common = ["--data", str(mp4_synth), "--config", "tiny", "--epochs", "2", "--batch-size", "8"]
    common += ["--threads", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]

    def tb(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "tb_reranker", "train", *common, *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    done = tb("--out", str(tmp_path / "run"), "--augment", spec, "--augment-warmup", "1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "epoch-2").is_dir()
    bad = tb("--out", str(tmp_path / "bad"), "--augment", spec, "--augment-warmup", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "augment-warmup" in bad.stderr


def test_the_synthetic_preset_augments_and_paper_does_not() -> None:
    """Issue 24: the synthetic preset trains with crops, colour, shake and reversal twins by
    default (failed before: no augmentation unless asked); ``none`` or "" turns them off, the
    paper preset has none, and a frozen backbone (no frames) gets none instead of an error."""
    from tb_reranker.training import TrainConfig
    from tb_reranker.training.loop import SYNTHETIC_AUGMENT

    def resolved(**changes) -> str:
        config = TrainConfig(data_root="d", out_dir="o", **changes)
        return config.resolved(is_tiny=True).augment

    assert SYNTHETIC_AUGMENT == "crop=0.5,colour=0.5,shift=0.5,reverse=0.5"
    assert resolved() == SYNTHETIC_AUGMENT
    assert resolved(preset="paper") == ""
    assert not Augment.parse(resolved(augment="none")) and resolved(augment="") == ""
    assert resolved(augment="flip=1") == "flip=1"
    assert resolved(freeze_backbone=True) == ""
    assert Augment.parse("none") == Augment() == Augment.parse(" None ")


def test_tb_train_uses_the_presets_augmentations_as_a_subprocess(tmp_path, mp4_synth) -> None:
    """``tb train`` as a user runs it records the augmentations it trained with: the preset's
    by default, none with ``--augment none``."""
    import json
    import os
    import subprocess
    import sys

    from tb_reranker.training.loop import SYNTHETIC_AUGMENT

    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    common = ["--data", str(mp4_synth), "--config", "tiny", "--epochs", "1", "--batch-size", "8"]
    common += ["--threads", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    for name, extra, expected in (("default", [], SYNTHETIC_AUGMENT), ("off", ["--augment", "none"], "none")):  # fmt: skip
        command = [sys.executable, "-m", "tb_reranker", "train", *common, *extra]
        command += ["--out", str(tmp_path / name)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        state = json.loads((tmp_path / name / "epoch-1" / "train_state.json").read_text())
        assert state["train_config"]["augment"] == expected
