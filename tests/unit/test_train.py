"""Training loop, no-pickle checkpoints, resume, frame cache — on a tiny real synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tb_reranker.errors import AlreadyExistsError, CheckpointError, InvalidInputError
from tb_reranker.model import load_checkpoint
from tb_reranker.training import TrainConfig, train, train_synthetic
from tb_reranker.training.checkpoint import (
    STATE_JSON,
    STATE_TENSORS,
    is_complete,
    latest_checkpoint,
    optimizer_state_from_files,
    optimizer_state_to_files,
)
from tb_reranker.training.features import load_frames, load_video_captions
from tb_reranker.training.loop import _epoch_order
from tb_reranker.video.synth import generate


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(
        root,
        num_train=24,
        num_val=0,
        num_test=12,
        seed=3,
        size=32,
        num_frames=8,
        workers=1,
        progress=False,
    )
    return root


def _config(synth_root: Path, out: Path, cache: Path, **changes) -> TrainConfig:
    values = dict(
        data_root=str(synth_root),
        out_dir=str(out),
        model_config="tiny",
        epochs=3,
        batch_size=8,
        seed=7,
        cache_dir=str(cache),
        workers=1,
        progress=False,
    )
    values.update(changes)
    return TrainConfig(**values)


def test_training_lowers_the_loss_and_writes_loadable_checkpoints(synth_root, tmp_path):
    epochs_stats: list[dict] = []
    out = tmp_path / "run"
    last = train(
        _config(synth_root, out, tmp_path / "cache", epochs=4),
        on_epoch_end=lambda epoch, path, stats: epochs_stats.append(stats),
    )
    assert last == out / "epoch-4"
    assert [s["epoch"] for s in epochs_stats] == [1, 2, 3, 4]
    assert epochs_stats[-1]["loss"] < epochs_stats[0]["loss"] - 0.1
    for epoch in range(1, 5):
        assert is_complete(out / f"epoch-{epoch}")
    model = load_checkpoint(last)
    assert model.num_frames == 8
    state = json.loads((last / STATE_JSON).read_text())
    assert state["epoch"] == 4 and state["global_step"] == 4 * 3
    assert len(state["history"]) == 4
    # optimizer moments are real tensors in safetensors, not pickles
    tensors = load_file(str(last / STATE_TENSORS))
    assert any(name.endswith(".exp_avg") for name in tensors)
    assert not list(out.glob(".epoch-*"))  # no temporary directories left behind


def test_resume_after_interruption_continues_with_the_same_state(synth_root, tmp_path):
    cache = tmp_path / "cache"

    class Interrupted(Exception):
        pass

    def stop_after_first(epoch, path, stats):
        if epoch == 1:
            raise Interrupted

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        train(_config(synth_root, out, cache), on_epoch_end=stop_after_first)
    assert latest_checkpoint(out)[0] == 1
    # an interrupted writer's leftovers: a half epoch-2 directory and a temp directory
    (out / "epoch-2").mkdir()
    (out / "epoch-2" / "config.json").write_text("{}")
    (out / ".epoch-2.abc.tmp").mkdir()
    assert latest_checkpoint(out)[0] == 1

    saved = load_file(str(out / "epoch-1" / STATE_TENSORS))
    seen: list[int] = []

    def check_start(epoch, optimizer):
        seen.append(epoch)
        if epoch == 2:
            tensors, _ = optimizer_state_to_files(optimizer.state_dict())
            assert tensors.keys() == {k for k in saved if k.startswith("state.")}
            for name, value in tensors.items():
                torch.testing.assert_close(value, saved[name], rtol=0, atol=0)

    resumed = train(_config(synth_root, out, cache, resume=True), on_epoch_start=check_start)
    assert seen == [2, 3]
    assert resumed == out / "epoch-3" and is_complete(out / "epoch-2")

    # the same run without the interruption: same losses, same encoders (float noise aside;
    # a scalar head bias that no softmax sees drifts freely under Adam, so raw weights of it
    # are not compared)
    straight = train(_config(synth_root, tmp_path / "straight", cache))
    history_resumed = json.loads((resumed / STATE_JSON).read_text())["history"]
    history_straight = json.loads((straight / STATE_JSON).read_text())["history"]
    for a, b in zip(history_resumed, history_straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    model_a, model_b = load_checkpoint(resumed).eval(), load_checkpoint(straight).eval()
    texts = ["a red circle then a blue square", "a white cross then a green triangle"]
    frames = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model_a.encode_text(texts), model_b.encode_text(texts), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            model_a.encode_frames(frames)[1], model_b.encode_frames(frames)[1], atol=1e-4, rtol=1e-4
        )

    with pytest.raises(AlreadyExistsError):
        train(_config(synth_root, out, cache))  # not --resume: refuses to overwrite


def test_frozen_backbone_trains_on_cached_features(synth_root, tmp_path):
    cache = tmp_path / "cache"
    last = train(_config(synth_root, tmp_path / "frozen", cache, epochs=1, freeze_backbone=True))
    model = load_checkpoint(last)
    assert model.config.freeze_backbone
    assert list(cache.glob("features-*.safetensors"))
    assert all(not p.requires_grad for p in model.clip.visual.parameters())


def test_frame_cache_is_reused_without_decoding(synth_root, tmp_path, monkeypatch):
    videos = load_video_captions("generic", synth_root, "test")
    kwargs = dict(num_frames=8, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    first = load_frames(videos, cache_dir=tmp_path, **kwargs)
    assert first.frames.dtype == torch.float16 and first.frames.shape == (12, 8, 3, 32, 32)

    import tb_reranker.video as video

    def no_decoding(*args, **kw):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(video, "decode_many", no_decoding)
    second = load_frames(videos, cache_dir=tmp_path, **kwargs)
    torch.testing.assert_close(first.frames, second.frames)
    assert second.videos.videos_ids == first.videos.videos_ids
    with pytest.raises(AssertionError):  # other settings = another key = decoding needed
        load_frames(videos, cache_dir=tmp_path, **{**kwargs, "image_size": 16})


def test_optimizer_state_roundtrip_without_pickle():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.9))
    (params[0].sum() + params[1].square().sum()).backward()
    optimizer.step()
    tensors, meta = optimizer_state_to_files(optimizer.state_dict())
    json.dumps(meta)  # JSON-able
    other = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=5.0)
    other.load_state_dict(optimizer_state_from_files(tensors, meta))
    assert other.param_groups[0]["betas"] == (0.8, 0.9) and other.param_groups[0]["lr"] == 1e-3
    torch.testing.assert_close(
        other.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_bad_configs_raise_typed_errors(synth_root, tmp_path):
    with pytest.raises(InvalidInputError):
        TrainConfig(data_root=".", out_dir=".", epochs=0)
    with pytest.raises(InvalidInputError):
        TrainConfig(data_root=".", out_dir=".", head="diagonal")
    with pytest.raises(InvalidInputError):
        train(_config(synth_root, tmp_path / "x", tmp_path / "c", batch_size=6, grad_accum=4))
    with pytest.raises(CheckpointError):
        from tb_reranker.training.checkpoint import read_train_state

        read_train_state(tmp_path)


def test_train_synthetic_entry_point(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TB_CACHE_DIR", str(tmp_path / "cache"))
    path = train_synthetic(synth_root, tmp_path / "demo", seed=1, epochs=1, progress=False)
    assert path == tmp_path / "demo" / "epoch-1"
    state = json.loads((path / STATE_JSON).read_text())
    assert state["train_config"]["preset"] == "synthetic"
    assert state["train_config"]["lr"] == 1e-3 and state["train_config"]["backbone_lr"] == 5e-4
    assert state["train_config"]["hard_negatives"] is False
    # from-scratch preset: light weight decay, constant learning rate (results_synthetic.md)
    assert state["train_config"]["weight_decay"] == 0.05
    assert state["train_config"]["warmup"] == 0.0 and state["train_config"]["min_lr_ratio"] == 1.0
    assert load_checkpoint(path).config.gumbel_scale == 0.0  # synthetic preset: no noise


def test_hard_negative_order_keeps_word_order_twins_together():
    captions = [
        ["a red circle then a blue square"],
        ["a green cross then a white cross"],
        ["a blue square then a red circle"],
        ["a white cross then a green cross"],
        ["a yellow circle then a red cross"],
        ["a red circle then a blue square", "a blue square then a red circle"],
    ]
    for epoch in (1, 2, 3):
        order, picks = _epoch_order(captions, seed=0, epoch=epoch, hard_negatives=True)
        assert sorted(order.tolist()) == list(range(6))
        texts = [captions[i][picks[i]] for i in order.tolist()]
        position = {text: i for i, text in enumerate(texts)}
        # the cross pair is always adjacent (one video per caption)
        assert (
            abs(
                position["a green cross then a white cross"]
                - position["a white cross then a green cross"]
            )
            == 1
        )
        # both orders of red/blue appear in adjacent slots (a unit holds one per caption)
        pairs = {frozenset(texts[i : i + 2]) for i in range(len(texts) - 1)}
        assert (
            frozenset(["a red circle then a blue square", "a blue square then a red circle"])
            in pairs
        )
    plain, _ = _epoch_order(captions, seed=0, epoch=1, hard_negatives=False)
    again, _ = _epoch_order(captions, seed=0, epoch=1, hard_negatives=False)
    assert plain.tolist() == again.tolist()  # seeded: the same order on resume


def test_presets_fill_schedule_fields_and_explicit_values_win():
    synthetic = TrainConfig(data_root="d", out_dir="o", preset="synthetic").resolved(True)
    assert (synthetic.weight_decay, synthetic.warmup, synthetic.min_lr_ratio) == (0.05, 0.0, 1.0)
    assert synthetic.epochs == 30 and synthetic.hard_negatives is False
    paper = TrainConfig(data_root="d", out_dir="o", preset="paper").resolved(False)
    assert (paper.weight_decay, paper.warmup, paper.min_lr_ratio) == (0.2, 0.05, 0.0)
    mine = TrainConfig(data_root="d", out_dir="o", weight_decay=0.1, warmup=3, min_lr_ratio=0.5)
    assert (mine.resolved(True).weight_decay, mine.resolved(True).warmup) == (0.1, 3)
    assert mine.resolved(False).min_lr_ratio == 0.5
    with pytest.raises(InvalidInputError, match="min_lr_ratio"):
        TrainConfig(data_root="d", out_dir="o", min_lr_ratio=2.0)


def test_cli_passes_min_lr_ratio_and_the_slots_head(tmp_path, monkeypatch, capsys, tb_exit_code):
    import tb_reranker.training as training
    from tb_reranker.cli import main

    seen = []
    monkeypatch.setattr(training, "train", lambda config: seen.append(config) or tmp_path)
    argv = ["train", "--data", "d", "--out", str(tmp_path / "o"), "--head", "listwise_slots"]
    assert main([*argv, "--min-lr-ratio", "0.1"]) == 0
    assert seen[-1].min_lr_ratio == 0.1 and seen[-1].head == "listwise_slots"
    assert tb_exit_code([*argv, "--min-lr-ratio", "2"]) == 2  # typed error, one line, exit 2
    assert "--min-lr-ratio: '2': must be a number >= 0 and <= 1" in capsys.readouterr().err
