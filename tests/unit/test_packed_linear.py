"""Inference-time linear layers on oneDNN's packed weights (issue 12): the same product as
``F.linear`` (float rounding), taken only where nothing else changes (CPU float32 inference),
re-packed when a weight changes, dropped when it dies; the text tower and the fusion give the
results of open_clip's / PyTorch's own modules with it on or off."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.model import TokenBinder, TokenBinderConfig, packed_linear

needs_onednn = pytest.mark.skipif(
    not packed_linear._available(), reason="this torch has no oneDNN packed linear"
)


@pytest.fixture(autouse=True)
def _enabled():
    previous = packed_linear.set_enabled(True)
    yield
    packed_linear.set_enabled(previous)


def _count() -> int:
    return len(packed_linear._entries)


@needs_onednn
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 70),
    lead=st.sampled_from([(), (2,), (2, 3)]),
    sizes=st.tuples(st.integers(1, 96), st.integers(1, 96)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_f_linear(rows: int, lead: tuple[int, ...], sizes, bias: bool, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    in_features, out_features = sizes
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    x = torch.randn(*lead, rows, in_features, generator=generator)
    before = _count()
    with torch.inference_mode():
        got = packed_linear.linear(x, weight, b)
    assert _count() == before + 1  # the packed path was taken
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def _new_storage(weight: torch.nn.Parameter) -> None:
    weight.data = torch.randn(weight.shape)  # the same Parameter, new storage


@needs_onednn
@pytest.mark.parametrize(
    "change",
    [lambda weight: weight.mul_(-2.0), _new_storage],
    ids=["in-place", "new-storage"],
)
def test_a_changed_weight_is_packed_again(change) -> None:
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = packed_linear.linear(x, layer.weight, layer.bias)
        change(layer.weight)
        second = packed_linear.linear(x, layer.weight, layer.bias)
        expected = layer(x)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


@needs_onednn
def test_the_packed_copy_dies_with_its_weight() -> None:
    layer = torch.nn.Linear(64, 64)
    with torch.no_grad():
        packed_linear.linear(torch.randn(2, 64), layer.weight, layer.bias)
    assert id(layer.weight) in packed_linear._entries
    held = packed_linear.packed_bytes()
    assert held >= 64 * 64 * 4
    weight_id = id(layer.weight)
    del layer
    gc.collect()
    assert weight_id not in packed_linear._entries
    assert packed_linear.packed_bytes() <= held - 64 * 64 * 4


def test_gradients_take_the_plain_path() -> None:
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    before = _count()
    out = packed_linear.linear(x, layer.weight, layer.bias)
    assert _count() == before
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(4, 5) @ x.detach())


def test_autocast_and_other_dtypes_take_the_plain_path() -> None:
    layer = torch.nn.Linear(8, 4)
    before = _count()
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = packed_linear.linear(torch.randn(2, 8), layer.weight, layer.bias)
        assert out.dtype == torch.bfloat16  # autocast applied, as F.linear would
        double = layer.double()
        out = packed_linear.linear(torch.randn(2, 8).double(), double.weight, double.bias)
        assert out.dtype == torch.float64
    assert _count() == before


def test_switched_off_takes_the_plain_path() -> None:
    layer = torch.nn.Linear(8, 4)
    before = _count()
    packed_linear.set_enabled(False)
    assert not packed_linear.enabled()
    with torch.inference_mode():
        packed_linear.linear(torch.randn(2, 8), layer.weight, layer.bias)
    assert _count() == before


def test_environment_switch() -> None:
    code = (
        "from tb_reranker.model import packed_linear as p; import torch;"
        "w = torch.ones(2, 3);"
        "torch.set_grad_enabled(False); p.linear(torch.ones(1, 3), w);"
        "print(p.enabled(), len(p._entries))"
    )
    env = {**os.environ, "TB_PACKED_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0"]


@needs_onednn
def test_threads_share_one_packed_weight() -> None:
    layer = torch.nn.Linear(128, 256)
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = layer(x)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                for _ in range(20):
                    torch.testing.assert_close(
                        packed_linear.linear(x, layer.weight, layer.bias),
                        expected,
                        rtol=1e-5,
                        atol=1e-5,
                    )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sum(1 for e in packed_linear._entries.values() if e.weight() is layer.weight) == 1


class _TransformerCalls:
    """Counts calls of open_clip's own text transformer forward."""

    def __init__(self, model: TokenBinder) -> None:
        self.count = 0
        self._handle = model.text.transformer.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


@needs_onednn
@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full"])
def test_text_tower_on_packed_weights_equals_open_clips_forward(
    vit_b32_text: TokenBinder, truncate: bool
) -> None:
    model = vit_b32_text
    tokens = model.tokenize(["x", "a red cube then a blue ball", " ".join(["word"] * 90)])
    calls = _TransformerCalls(model)
    try:
        with torch.inference_mode():
            packed = model.text(tokens, truncate=truncate)
            assert calls.count == 0  # our block loop ran, on packed weights
            packed_linear.set_enabled(False)
            plain = model.text(tokens, truncate=False)
            assert calls.count == 1  # open_clip's own forward
    finally:
        calls.close()
    for got, expected in zip(packed, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_text_tower_trains_through_open_clips_forward() -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).train()
    calls = _TransformerCalls(model)
    try:
        indicators, _ = model.text(model.tokenize(["a red cube"]))
    finally:
        calls.close()
    assert calls.count == 1
    indicators.sum().backward()
    assert model.text.indicators.grad is not None


def test_other_block_types_use_open_clips_forward(vit_b32_text: TokenBinder) -> None:
    model = copy.deepcopy(vit_b32_text)
    model.text.transformer.resblocks[5].attn.dropout = 0.1  # not a block _blocks reproduces
    calls = _TransformerCalls(model)
    try:
        with torch.inference_mode():
            model.text(model.tokenize(["x"]))
    finally:
        calls.close()
    assert calls.count == 1


@needs_onednn
@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
def test_fusion_on_packed_weights_equals_plain_modules(head: str) -> None:
    torch.manual_seed(0)
    config = TokenBinderConfig.tiny(head=head)
    model = TokenBinder(config).eval()
    with torch.no_grad():
        for parameter in model.fusion.head[-1].parameters():
            parameter.normal_(std=0.5)  # Δ depends on every layer
    queries = torch.randn(3, model.num_indicators - 1, model.embed_dim)
    tokens = torch.randn(3, 4, config.num_frames, model.embed_dim)
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4])
    outputs = []
    for enabled in (True, False):
        packed_linear.set_enabled(enabled)
        before = _count()
        with torch.inference_mode():
            kv = model.fusion.project_candidates(tokens.flatten(0, 1))
            kv = kv.view(3, 4, *kv.shape[1:])
            outputs.append(
                (
                    model.fusion(queries, cand_tokens=tokens, cand_mask=mask),
                    model.fusion(queries, kv, cand_mask=mask),
                )
            )
        assert _count() > before if enabled else _count() == before
    (packed_tokens, packed_kv), (plain_tokens, plain_kv) = outputs
    for got, expected in zip((*packed_tokens, *packed_kv), (*plain_tokens, *plain_kv), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert plain_tokens[0].abs().max() > 1e-3  # Δ is not trivially zero


def test_inference_tensor_weights_take_the_plain_path() -> None:
    """Weights made under ``inference_mode`` have no version counter: an in-place change could
    not be seen, so they are never packed (this raised a RuntimeError before)."""
    with torch.inference_mode():
        weight, x = torch.randn(8, 16), torch.randn(3, 16)
        before = _count()
        first = packed_linear.linear(x, weight)
        weight.mul_(-1.0)
        second = packed_linear.linear(x, weight)
    assert _count() == before
    torch.testing.assert_close(second, -first)
