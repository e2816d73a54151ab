"""TokenBinder losses on the tiny preset: gradients, freezing, loss going down, param groups."""

from __future__ import annotations

import pytest
import torch

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import (
    TokenBinder,
    TokenBinderConfig,
    param_groups,
    select_candidates,
    tokenbinder_loss,
)

TEXTS = [
    "a red cube then a blue ball",
    "a blue ball then a red cube",
    "a green star then a yellow cube",
    "a yellow cube then a green star",
    "a purple ring then a red star",
    "a red star then a purple ring",
]


def _frames(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, 3, 32, 32, generator=generator)


def _grad_norm(parameter: torch.nn.Parameter) -> float:
    return 0.0 if parameter.grad is None else float(parameter.grad.norm())


def test_select_candidates_forces_ground_truth_in() -> None:
    similarity = torch.tensor(
        [[0.1, 0.9, 0.8, 0.0], [0.2, 0.9, 0.1, 0.3], [0.9, 0.8, 0.0, 0.7], [0.0, 0.1, 0.2, 0.3]]
    )
    index, targets = select_candidates(similarity, 2)
    assert index.tolist() == [[1, 0], [1, 3], [0, 2], [3, 2]]
    assert targets.tolist() == [1, 0, 1, 0]
    assert bool((index.gather(1, targets.unsqueeze(1)).squeeze(1) == torch.arange(4)).all())


def test_loss_terms_and_gradients_reach_every_part() -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).train()
    out = tokenbinder_loss(model, TEXTS[:4], _frames(4), k=3)
    assert set(out) >= {"loss", "broad", "focus", "t2v", "v2t", "focus_v", "focus_t"}
    torch.testing.assert_close(out["loss"].detach(), out["broad"] + out["focus"])
    out["loss"].backward()
    assert _grad_norm(model.text.indicators) > 0
    assert _grad_norm(model.fusion.head[-1].weight) > 0  # zero-init layer still learns
    assert _grad_norm(model.clip.visual.conv1.weight) > 0
    assert _grad_norm(model.clip.token_embedding.weight) > 0
    assert _grad_norm(model.clip.logit_scale) > 0
    # after one step the head is non-zero and gradients reach the attention blocks
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    tokenbinder_loss(model, TEXTS[:4], _frames(4), k=3)["loss"].backward()
    block = model.fusion.blocks[0]
    for parameter in (block.q_proj.weight, block.k_proj.weight, block.v_proj.weight):
        assert _grad_norm(parameter) > 0
    assert _grad_norm(model.fusion.frame_position_embedding) > 0


def test_frozen_backbone_gets_no_gradient_from_cached_features() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(freeze_backbone=True)).train()
    assert not any(p.requires_grad for p in model.clip.visual.parameters())
    with torch.no_grad():
        _, frames_tokens = model.encode_frames(_frames(4))  # the cached features
    out = tokenbinder_loss(model, model.tokenize(TEXTS[:4]), frames_tokens)
    out["loss"].backward()
    assert all(p.grad is None for p in model.clip.visual.parameters())
    assert _grad_norm(model.text.indicators) > 0
    assert _grad_norm(model.fusion.head[-1].weight) > 0
    assert _grad_norm(model.clip.token_embedding.weight) > 0  # the text side still trains
    # raw frames through a frozen tower: still no gradient there
    model.zero_grad()
    tokenbinder_loss(model, TEXTS[:4], _frames(4))["loss"].backward()
    assert all(p.grad is None for p in model.clip.visual.parameters())
    names = {group["name"] for group in param_groups(model)}
    assert all(
        not any(p is q for q in model.clip.visual.parameters())
        for group in param_groups(model)
        for p in group["params"]
    ), names


def test_loss_decreases_end_to_end_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny()).train()
    frames = _frames(6, seed=1)
    tokens = model.tokenize(TEXTS)
    optimizer = torch.optim.AdamW(
        param_groups(model, lr_fusion=1e-3, lr_backbone=3e-4, weight_decay=0.0)
    )
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = tokenbinder_loss(model, tokens, frames, k=4)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_decreases_with_cached_frame_features() -> None:
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny(freeze_backbone=True)).train()
    features = torch.randn(6, 8, 64, generator=torch.Generator().manual_seed(1))
    tokens = model.tokenize(TEXTS)
    optimizer = torch.optim.AdamW(param_groups(model, lr_fusion=1e-3, lr_backbone=1e-3))
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = tokenbinder_loss(model, tokens, features, k=4)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses


def test_training_loss_accepts_precomputed_indicators() -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).train()
    indicators = model.encode_text(TEXTS[:3])
    out = tokenbinder_loss(model, indicators, _frames(3))
    assert torch.isfinite(out["loss"])


def test_param_groups_split_learning_rates() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    groups = param_groups(model, lr_fusion=1e-4, lr_backbone=1e-6, weight_decay=0.2)
    by_name = {group["name"]: group for group in groups}
    assert by_name["fusion"]["lr"] == 1e-4 and by_name["backbone"]["lr"] == 1e-6
    assert by_name["fusion"]["weight_decay"] == 0.2
    assert by_name["fusion_no_decay"]["weight_decay"] == 0.0
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert any(p is model.text.indicators for p in by_name["fusion_no_decay"]["params"])
    assert any(p is model.clip.logit_scale for p in by_name["backbone_no_decay"]["params"])


def test_training_loss_bad_inputs() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    with pytest.raises(InvalidInputError, match="3 texts but 2 videos"):
        tokenbinder_loss(model, TEXTS[:3], _frames(2))
    with pytest.raises(InvalidInputError, match="at least 2"):
        tokenbinder_loss(model, TEXTS[:1], _frames(1))
    with pytest.raises(InvalidInputError, match="videos must be"):
        tokenbinder_loss(model, TEXTS[:2], torch.zeros(2, 8, 64, 1))
    with pytest.raises(InvalidInputError, match="k must be"):
        tokenbinder_loss(model, TEXTS[:2], _frames(2), k=0)


@pytest.mark.parametrize("head", ["symmetric", "listwise"])
@pytest.mark.parametrize("inputs", ["features", "frames"])
def test_padded_videos_train_like_their_unpadded_originals(head: str, inputs: str) -> None:
    """Issue 13 §2: a batch of short videos (5 real frames) padded to T = 8 with repeats and
    ``frames_mask`` gives the loss and gradients of the unpadded batch (both focused terms)."""
    model = TokenBinder(TokenBinderConfig.tiny(head=head, gumbel_scale=0.0)).train()
    with torch.no_grad():  # a head that really scores
        model.fusion.head[-1].weight.normal_(generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(1)
    if inputs == "features":
        original = torch.randn(4, 5, 64, generator=generator)
    else:
        original = torch.randn(4, 5, 3, 32, 32, generator=generator)
    padded = torch.cat([original, original[:, -1:].expand(-1, 3, *original.shape[2:])], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3] * 4)
    tokens = model.tokenize(TEXTS[:4])
    results = []
    for videos, frames_mask in ((original, None), (padded, mask), (padded, None)):
        model.zero_grad()
        out = tokenbinder_loss(model, tokens, videos, k=3, frames_mask=frames_mask)
        out["loss"].backward()
        grad = model.fusion.head[1].weight.grad.clone()
        results.append((out, grad))
    (expected, expected_grad), (got, got_grad), (unmasked, _) = results
    for term in ("loss", "focus_v", "focus_t", "broad"):
        torch.testing.assert_close(
            got[term].detach(), expected[term].detach(), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmasked["focus"], expected["focus"], atol=1e-4)
