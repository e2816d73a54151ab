"""TokenBinder checkpoints: bit-for-bit round trip, fingerprints, tamper and mismatch detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tb_reranker.errors import CheckpointError, NotFoundError
from tb_reranker.model import (
    TokenBinder,
    TokenBinderConfig,
    load_checkpoint,
    save_checkpoint,
    tokenbinder_loss,
)


@pytest.fixture(scope="module")
def trained() -> TokenBinder:
    """A tiny model after two optimisation steps (so the Δ head is non-zero)."""
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    frames = torch.randn(4, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        texts = ["a red cube", "a blue ball", "a green star", "a cat"]
        tokenbinder_loss(model, texts, frames)["loss"].backward()
        optimizer.step()
    return model.eval()


@pytest.fixture()
def saved(trained: TokenBinder, tmp_path: Path) -> Path:
    return save_checkpoint(trained, tmp_path / "ckpt")


def _scores(model: TokenBinder):
    frames = torch.randn(5, 8, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cls, frames_tokens = model.encode_frames(frames)
        indicators = model.encode_text(["a red cube then a blue ball", "a green star"])
        scores = model.focused_scores(
            indicators,
            cls.unsqueeze(0).expand(2, -1, -1),
            frames_tokens.unsqueeze(0).expand(2, -1, -1, -1),
        )
    return indicators, cls, frames_tokens, scores


def test_save_writes_safetensors_and_json(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    document = json.loads((saved / "config.json").read_text())
    assert document["format"] == "tb_reranker.tokenbinder/1"
    assert len(document["weights_sha256"]) == 64
    assert TokenBinderConfig.from_dict(document["config"]) == TokenBinderConfig.tiny(
        fusion_blocks=2
    )
    assert not (saved / "model.safetensors").read_bytes().startswith(b"\x80")  # not a pickle


def test_load_reproduces_scores_bit_for_bit(trained: TokenBinder, saved: Path) -> None:
    loaded = load_checkpoint(saved, device="cpu")
    assert not loaded.training
    assert loaded.fingerprint() == trained.fingerprint()
    before, after = _scores(trained), _scores(loaded)
    assert before[3].delta.abs().max() > 0  # the head is trained, so this compares real work
    for old, new in zip(before[:3], after[:3], strict=True):
        assert torch.equal(old, new)
    for field in ("broad", "delta", "final", "frame_attention"):
        assert torch.equal(getattr(before[3], field), getattr(after[3], field))


def test_fingerprint_tracks_weights_and_config(trained: TokenBinder) -> None:
    first = trained.fingerprint()
    assert first == trained.fingerprint() and len(first) == 32
    bias = trained.fusion.head[-1].bias
    saved_bias = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1.0)  # an in-place update, as an optimiser step does
    try:
        assert trained.fingerprint() != first
    finally:
        with torch.no_grad():
            bias.copy_(saved_bias)
    assert trained.fingerprint() == first
    other = TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2, gumbel_tau=0.5))
    same_weights = TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2))
    other.load_state_dict(same_weights.state_dict())
    assert other.fingerprint() != same_weights.fingerprint()  # config is part of it
    # construction is seeded: the same config gives the same model
    assert (
        TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2)).fingerprint()
        == same_weights.fingerprint()
    )


def test_tampered_weights_are_rejected(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="modified or corrupted"):
        load_checkpoint(saved)


def test_mismatched_config_is_rejected(saved: Path) -> None:
    path = saved / "config.json"
    document = json.loads(path.read_text())
    document["config"]["num_indicators"] = 3
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="weights do not match the config.*text.indicators"):
        load_checkpoint(saved)


def test_config_change_with_same_shapes_is_rejected(saved: Path) -> None:
    path = saved / "config.json"
    document = json.loads(path.read_text())
    document["config"]["gumbel_tau"] = 0.25  # shapes still fit; the fingerprint does not
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_checkpoint(saved)


def test_missing_or_malformed_files_are_rejected(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load_checkpoint(saved)
    (saved / "config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="not a TokenBinder checkpoint"):
        load_checkpoint(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(saved)


def test_missing_weights_file_is_rejected(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_checkpoint(saved)


def test_pickle_disguised_as_weights_is_rejected(saved: Path) -> None:
    import hashlib

    weights = saved / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, weights)  # a pickle-based file in place of safetensors
    path = saved / "config.json"
    document = json.loads(path.read_text())
    document["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(saved)


_EDITED_CONFIG_LOAD = """
import json, resource, sys
from pathlib import Path
from tb_reranker.errors import CheckpointError
from tb_reranker.model import load_checkpoint
directory = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_checkpoint(directory)
    message = "loaded"
except CheckpointError as exc:
    message = "CheckpointError: " + str(exc)
grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"message": message, "grew_mb": grew_mb}))
"""


@pytest.mark.parametrize(
    "edit",
    [
        ("clip_cfg", "text_cfg", "vocab_size", 8_000_000),  # a 2 GB token embedding
        ("clip_cfg", "embed_dim", 1_048_576),  # the edit (terabytes)
    ],
    ids=["vocab", "embed_dim"],
)
def test_edited_config_is_refused_before_allocating(saved: Path, edit: tuple) -> None:
    """The config is checked against the weights file's header (shapes) before any model is
    built: the old code built the 2 GB model first (peak RSS +1.9 GB, measured), then refused."""
    import subprocess
    import sys

    path = saved / "config.json"
    document = json.loads(path.read_text())
    target = document["config"]
    for key in edit[:-2]:
        target = target[key]
    target[edit[-2]] = edit[-1]
    path.write_text(json.dumps(document))
    import os

    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", _EDITED_CONFIG_LOAD, str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=root),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["message"].startswith("CheckpointError: "), result
    assert "shape mismatch" in result["message"] and "from the config" in result["message"]
    assert result["grew_mb"] < 300, result
