"""The split identity: whole-model, vision and query-side fingerprints; the zero-shot config and
where its CLIP weights come from (a local file, the caches, or one download)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch

from tb_reranker.errors import CheckpointError, InvalidInputError
from tb_reranker.model import (
    TokenBinder,
    TokenBinderConfig,
    load_checkpoint,
    resolve_weights,
    save_checkpoint,
    zero_shot_config,
)


def _old_fingerprint(model: TokenBinder) -> str:
    """The whole-model fingerprint as it was computed before the split (must not change: every
    checkpoint saved so far records it)."""
    digest = hashlib.sha256()
    digest.update(model.config.to_json().encode())
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        flat = tensor.contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:32]


def _with_vision_of(source: TokenBinder, config: TokenBinderConfig) -> TokenBinder:
    model = TokenBinder(config)
    state = model.state_dict()
    state.update({k: v for k, v in source.state_dict().items() if k.startswith("clip.visual.")})
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def model() -> TokenBinder:
    return TokenBinder(TokenBinderConfig.tiny())


def test_whole_fingerprint_is_unchanged_for_existing_configs(model: TokenBinder) -> None:
    assert "broad_query" not in json.loads(model.config.to_json())
    assert model.fingerprint() == _old_fingerprint(model)
    clip = TokenBinder(TokenBinderConfig.tiny(broad_query="clip"))
    assert json.loads(clip.config.to_json())["broad_query"] == "clip"
    assert clip.fingerprint() != model.fingerprint()
    assert TokenBinderConfig.from_json(clip.config.to_json()) == clip.config


def test_vision_fingerprint_ignores_the_query_side(model: TokenBinder) -> None:
    other = _with_vision_of(
        model,
        TokenBinderConfig.tiny(
            head="listwise", num_indicators=2, seed=5, freeze_backbone=True, broad_query="clip"
        ),
    )
    assert other.vision_fingerprint() == model.vision_fingerprint()
    assert other.query_fingerprint() != model.query_fingerprint()
    assert other.fingerprint() != model.fingerprint()
    with torch.no_grad():  # the query side trains: the vision side stays
        other.text.indicators.add_(0.5)
        other.fusion.head[-1].bias.add_(1.0)
    assert other.vision_fingerprint() == model.vision_fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"num_frames": 6},  # frame sampling
        {"use_patch_tokens": True},  # what a frame token is
        {"seed": 9},  # other vision weights
    ],
)
def test_vision_fingerprint_tracks_what_the_store_holds(model: TokenBinder, change) -> None:
    other = TokenBinder(TokenBinderConfig.tiny(**change))
    if "seed" not in change:
        other = _with_vision_of(model, TokenBinderConfig.tiny(**change))
    assert other.vision_fingerprint() != model.vision_fingerprint()


def test_vision_fingerprint_follows_a_weight_update() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    before = model.vision_fingerprint(), model.query_fingerprint()
    with torch.no_grad():
        model.clip.visual.conv1.weight.mul_(1.01)
    assert model.vision_fingerprint() != before[0]
    assert model.query_fingerprint() == before[1]


def test_checkpoint_records_and_verifies_both_sides(model: TokenBinder, tmp_path: Path) -> None:
    directory = save_checkpoint(model, tmp_path / "ckpt")
    document = json.loads((directory / "config.json").read_text())
    assert document["vision_fingerprint"] == model.vision_fingerprint()
    assert document["query_fingerprint"] == model.query_fingerprint()
    loaded = load_checkpoint(directory)
    assert loaded.vision_fingerprint() == model.vision_fingerprint()
    # a checkpoint written before the split (no such keys) still loads
    for key in ("vision_fingerprint", "query_fingerprint"):
        document.pop(key)
    (directory / "config.json").write_text(json.dumps(document))
    assert load_checkpoint(directory).fingerprint() == model.fingerprint()
    document["vision_fingerprint"] = "0" * 32
    (directory / "config.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="vision_fingerprint"):
        load_checkpoint(directory)


def _patterned(config: TokenBinderConfig) -> TokenBinder:
    """A model whose every weight is a fixed pattern: its fingerprints depend on the config and
    the hashing alone, not on torch's random init."""
    model = TokenBinder(config)
    state = model.state_dict()
    with torch.no_grad():
        for index, name in enumerate(sorted(state)):
            tensor = state[name]
            ramp = torch.arange(tensor.numel(), dtype=torch.float64) * 7 + index
            tensor.copy_((ramp % 101 / 101 - 0.5).reshape(tensor.shape).to(tensor.dtype))
    return model


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {},
            (
                "88dfa086490aefbdc7b95b752eeaa4d2",
                "934806cb8592a34304f8f267c0572209",
                "d7d32180e5eeebb8558ae286902360f0",
            ),
        ),
        (
            {"use_patch_tokens": True, "head": "listwise", "broad_query": "clip"},
            (
                "301ffb014ac6b40e1b3122e680f4c0b4",
                "38483dd1502090ca4179c6866e7db444",
                "bf6831c833f53c206999f531f690822b",
            ),
        ),
    ],
)
def test_fingerprint_values_are_pinned(overrides: dict, expected: tuple[str, str, str]) -> None:
    """Checkpoints, Milvus collections and frame stores record these values: no refactoring may
    change them (a new config field must stay out of ``to_json`` at its default)."""
    model = _patterned(TokenBinderConfig.tiny(**overrides))
    found = model.fingerprint(), model.vision_fingerprint(), model.query_fingerprint()
    assert found == expected
    model.prepare_for_inference()  # packed layers, frozen buffers: the same identity
    assert (model.fingerprint(), model.vision_fingerprint(), model.query_fingerprint()) == expected


def test_broad_query_clip_makes_i1_the_plain_clip_feature() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(broad_query="clip"))
    texts = ["a red square then a blue circle", "dog"]
    tokens = model.tokenize(texts)
    indicators, eot = model.encode_text_tokens(tokens)
    torch.testing.assert_close(indicators[:, 0], eot, rtol=0, atol=0)
    learned = TokenBinder(TokenBinderConfig.tiny())  # same seed: same weights
    learned_indicators, _ = learned.encode_text_tokens(tokens)
    torch.testing.assert_close(indicators[:, 1:], learned_indicators[:, 1:])
    assert not torch.allclose(learned_indicators[:, 0], eot)
    with pytest.raises(InvalidInputError, match="broad_query"):
        TokenBinderConfig.tiny(broad_query="eot")


# ---- where zero-shot weights come from -----------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every outgoing connection fails (and is recorded)."""
    attempts: list[tuple] = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def _fake_hub_cache(root: Path, repo_id: str, filename: str) -> Path:
    """A Hugging Face hub cache entry as huggingface_hub lays it out."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    target = folder / "snapshots" / revision / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    return target


def test_a_cached_tag_is_used_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list
) -> None:
    from huggingface_hub import constants

    cached = _fake_hub_cache(
        tmp_path, "timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    path, facts = resolve_weights("ViT-B-32", "openai")
    assert Path(path) == cached and facts["source"] == "tag" and facts["quick_gelu"] is True
    config = zero_shot_config(TokenBinderConfig.vit_b_32(), None)  # default tag: openai
    assert config.pretrained == str(cached) and config.broad_query == "clip"
    assert config.clip_model == "ViT-B-32-quickgelu"  # OpenAI's weights were trained with it
    assert config.extra["init"]["pretrained"] == "openai"
    assert no_network == []


def test_an_uncached_tag_offline_fails_fast_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip either
    with pytest.raises(CheckpointError) as caught:
        resolve_weights("ViT-B-32", "openai")
    message = str(caught.value)
    assert "\n" not in message and "--pretrained FILE" in message and no_network


def test_bad_weights_arguments(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_weights("ViT-B-32", str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidInputError, match="neither a file nor an open_clip pretrained tag"):
        resolve_weights("ViT-B-32", "no-such-tag")
    with pytest.raises(CheckpointError, match="custom open_clip config"):
        resolve_weights(None, "openai")
    with pytest.raises(InvalidInputError, match="needs CLIP weights"):
        zero_shot_config(TokenBinderConfig.tiny(), None)


def test_the_vit_b_32_preset_uses_the_activation_its_weights_were_trained_with() -> None:
    """OpenAI's CLIP weights need QuickGELU; open_clip builds plain ViT-B-32 with nn.GELU and
    only warns, so the preset must name the -quickgelu model (else every feature is off)."""
    import open_clip

    config = TokenBinderConfig.vit_b_32()
    tag = open_clip.get_pretrained_cfg(config.clip_model, config.pretrained)
    model_cfg = open_clip.get_model_config(config.clip_model)
    assert tag and model_cfg is not None
    assert bool(model_cfg.get("quick_gelu", False)) == bool(tag.get("quick_gelu", False))
