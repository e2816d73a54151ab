"""The input checks of a ``TokenBinder`` (``tb_reranker/model/checks.py``): kept by the model,
and on the device it is on now."""

from __future__ import annotations

import torch

from tb_reranker.model import TokenBinder, TokenBinderConfig


def test_the_checks_follow_the_model_to_another_device() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    checks = model._checks
    assert model._checks is checks  # kept, not built again on every call
    mask = checks.mask(torch.ones(1, 2, dtype=torch.int64), 1, 2)
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    model.to("meta")  # a move: masks now go where the model computes
    moved = model._checks
    assert moved is not checks and moved.device.type == "meta"
    assert moved.mask(torch.ones(1, 2), 1, 2).device.type == "meta"
