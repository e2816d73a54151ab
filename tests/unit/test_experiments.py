"""The studies in ``experiments/`` build on the public API only (issue 21 §4): no private name of
``tb_reranker`` imported or read, no method patched; the one-to-many video→text study's scorer
agrees with the model where the two must agree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import TokenBinder, TokenBinderConfig
from tb_reranker.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.py"))


def _private_uses(path: Path) -> list[str]:
    """``line: what`` for every private name a module imports from tb_reranker, every private
    attribute it reads (``x._y``; dunders aside) and every assignment to a class attribute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tb_reranker"):
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(f"{node.lineno}: from {node.module}")
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name[0] == "_"]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            if not (node.attr.startswith("__") and node.attr.endswith("__")):
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Assign):
            patched = [t for t in node.targets if isinstance(t, ast.Attribute)]
            found += [f"{node.lineno}: assigns {ast.unparse(t)}" for t in patched]
    return found


def test_the_rule_sees_private_uses(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from tb_reranker.model.fusion import _head_logits\n"
        "from tb_reranker.model import TokenBinder\n"
        "TokenBinder.focused_scores_v2t = print\n"
        "x = model._fusion_queries\n"
        "y = model.__class__\n"
    )
    assert _private_uses(bad) == [
        "1: import _head_logits",
        "3: assigns TokenBinder.focused_scores_v2t",
        "4: ._fusion_queries",
    ]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiments_use_the_public_api_only(path: Path) -> None:
    assert EXPERIMENTS, "no experiments found"
    assert _private_uses(path) == []


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT))
    try:
        import experiments.v2t_one_to_many as module
    finally:
        sys.path.remove(str(ROOT))
    return module


def _scored_model() -> TokenBinder:
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny(head="symmetric")).eval()
    for parameter in model.fusion.head.parameters():  # a head that really scores
        torch.nn.init.normal_(parameter, std=0.5)
    return model


def test_joint_v2t_with_one_candidate_is_the_pointwise_score(study) -> None:
    """With one candidate text there is nothing to compete with: the joint share is 1, the
    pointwise pass's too, so the scores are the model's own; with five they differ."""
    model = _scored_model()
    joint = study.as_variant(model, "joint")
    assert isinstance(joint, study.JointV2TBinder)
    frames, video_cls = (
        torch.randn(3, model.num_frames, model.embed_dim),
        torch.randn(3, model.embed_dim),
    )
    texts = F.normalize(torch.randn(3, 5, model.num_indicators, model.embed_dim), dim=-1)
    with torch.no_grad():
        one = joint.focused_scores_v2t(frames, video_cls, texts[:, :1])
        expected = model.focused_scores_v2t(frames, video_cls, texts[:, :1])
        many = joint.focused_scores_v2t(frames, video_cls, texts)
        pointwise = model.focused_scores_v2t(frames, video_cls, texts)
    torch.testing.assert_close(one.final, expected.final, atol=1e-5, rtol=1e-5)
    assert (many.delta - pointwise.delta).abs().max() > 1e-3
    torch.testing.assert_close(many.broad, pointwise.broad)


def test_joint_v2t_masks_padded_texts(study) -> None:
    model = _scored_model()
    joint = study.as_variant(model, "joint")
    frames, video_cls = (
        torch.randn(2, model.num_frames, model.embed_dim),
        torch.randn(2, model.embed_dim),
    )
    texts = F.normalize(torch.randn(2, 4, model.num_indicators, model.embed_dim), dim=-1)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        scores = joint.focused_scores_v2t(frames, video_cls, texts, mask)
        alone = joint.focused_scores_v2t(frames[:1], video_cls[:1], texts[:1, :2])
    assert torch.isinf(scores.final[0, 2:]).all() and (scores.delta[0, 2:] == 0).all()
    torch.testing.assert_close(scores.final[0, :2], alone.final[0], atol=1e-5, rtol=1e-5)


def test_train_takes_only_a_tokenbinder_subclass(tmp_path: Path) -> None:
    config = TrainConfig(data_root=str(tmp_path), out_dir=str(tmp_path / "out"), epochs=1)
    with pytest.raises(InvalidInputError, match="model_class must be a TokenBinder subclass"):
        train(config, model_class=dict)
