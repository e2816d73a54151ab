"""Inference-time linear layers on oneDNN's packed weights (issue 12), as the layer type a model is
prepared with (issue 21 §1): the same product as ``F.linear`` (float rounding), taken only where
nothing else changes (CPU float32 inference), re-packed whenever the layer's weights are loaded or
replaced, owned by the layer (dropped with it); the prepared text tower and fusion give the
results of open_clip's / PyTorch's own modules; open_clip's block is still the shape the packed
text block reproduces."""

from __future__ import annotations

import copy
import gc
import inspect
import os
import subprocess
import sys
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.model import TokenBinder, TokenBinderConfig, packed_linear
from tb_reranker.model.fast_text import (
    PLAIN_BLOCK_CHILDREN,
    PackedResidualBlock,
    is_plain_block,
    swap_blocks,
)
from tb_reranker.model.packed_linear import PackedLinear, packed_bytes

needs_onednn = pytest.mark.skipif(
    not packed_linear._available(), reason="this torch has no oneDNN packed linear"
)


@pytest.fixture(autouse=True)
def _enabled():
    previous = packed_linear.set_enabled(True)
    yield
    packed_linear.set_enabled(previous)


def _onednn(x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
    """What the packed path computes for ``layer(x)``: oneDNN's product on a fresh packing."""
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, None)
    return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")


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
    layer = PackedLinear(weight, b)
    assert packed_bytes(layer) > 0 and list(layer.parameters()) == []
    with torch.inference_mode():
        got = layer(x)
        assert torch.equal(got, _onednn(x, layer))  # the packed path was taken
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def _load(layer: PackedLinear) -> None:
    layer.load_state_dict({"weight": layer.weight * -2.0, "bias": layer.bias})  # in place


def _round_trip(layer: PackedLinear) -> None:
    layer.half().float()  # new tensors, rounded to float16


def _new_tensor(layer: PackedLinear) -> None:
    layer.weight = torch.randn(layer.weight.shape)  # a new buffer assigned


def _parameter_writes(layer: PackedLinear) -> None:
    for parameter in layer.parameters():  # none: nothing to write through ``.data``
        parameter.data.copy_(parameter.data * 3.0)
    layer.weight = torch.randn(layer.weight.shape)


@needs_onednn
@pytest.mark.parametrize(
    "change",
    [_load, _round_trip, _new_tensor, _parameter_writes],
    ids=["load_state_dict", "half-float", "new-tensor", "no-parameters"],
)
def test_a_changed_weight_is_packed_again(change) -> None:
    layer = PackedLinear.from_linear(torch.nn.Linear(16, 8))
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        change(layer)
        second = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        assert torch.equal(second, _onednn(x, layer))  # still on the packed path
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


@needs_onednn
def test_a_layer_owns_its_weights() -> None:
    """The layer copies the tensors it is built from: writing into them later never reaches it
    (with ``.data`` or without, inference tensors included)."""
    source = torch.nn.Linear(16, 8)
    with torch.inference_mode():
        frozen = torch.randn(8, 16)
    x = torch.randn(3, 16)
    for weight, bias in ((source.weight, source.bias), (frozen, None)):
        layer = PackedLinear(weight, bias)
        with torch.no_grad():
            expected = F.linear(x, weight, bias)
            first = layer(x)
            weight.data.mul_(-1.0)
            second = layer(x)
        assert torch.equal(first, second)
        torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_packed_copy_dies_with_its_layer() -> None:
    layer = PackedLinear.from_linear(torch.nn.Linear(64, 64))
    held = packed_bytes(layer)
    assert held >= 64 * 64 * 4
    packed = weakref.ref(layer.__dict__["_packs"]["weight"].packed)
    del layer
    gc.collect()
    assert packed() is None


def test_gradients_take_the_plain_path() -> None:
    layer = torch.nn.Linear(8, 4)  # a model that trains is never prepared: plain modules
    x = torch.randn(5, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    torch.testing.assert_close(layer.weight.grad, torch.ones(4, 5) @ x.detach())
    packed = PackedLinear.from_linear(layer)  # the input's gradient through a prepared layer
    x.grad = None
    packed(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 4) @ layer.weight.detach())


def test_autocast_and_other_dtypes_take_the_plain_path() -> None:
    layer = PackedLinear.from_linear(torch.nn.Linear(8, 4))
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(torch.randn(2, 8))
        assert out.dtype == torch.bfloat16  # autocast applied, as F.linear would
        double = layer.double()
        assert packed_bytes(double) == 0  # float64: nothing packed
        x = torch.randn(2, 8).double()
        out = double(x)
        assert out.dtype == torch.float64
        assert torch.equal(out, F.linear(x, double.weight, double.bias))


def _tiny_prepared(**overrides) -> TokenBinder:
    return TokenBinder(TokenBinderConfig.tiny(**overrides)).prepare_for_inference()


def test_switched_off_takes_the_plain_path() -> None:
    packed_linear.set_enabled(False)
    assert not packed_linear.enabled()
    model = _tiny_prepared()
    assert model.prepared and packed_bytes(model) == 0
    assert not any(isinstance(m, PackedLinear | PackedResidualBlock) for m in model.modules())
    packed_linear.set_enabled(True)  # decided at preparation: a later refresh keeps it
    model.fusion.head[1] = torch.nn.Linear(*model.fusion.head[1].weight.shape[::-1])
    model.fingerprint()
    assert not any(isinstance(m, PackedLinear | PackedResidualBlock) for m in model.modules())
    assert list(model.parameters()) == []


def test_environment_switch() -> None:
    code = (
        "from tb_reranker.model import TokenBinder, TokenBinderConfig, packed_linear as p;"
        "m = TokenBinder(TokenBinderConfig.tiny()).prepare_for_inference();"
        "print(p.enabled(), p.packed_bytes(m), type(m.fusion.blocks[0].q_proj).__name__)"
    )
    env = {**os.environ, "TB_PACKED_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0", "Linear"]


@needs_onednn
def test_threads_share_one_packed_weight() -> None:
    layer = PackedLinear.from_linear(torch.nn.Linear(128, 256))
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
    packs = layer.__dict__["_packs"]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                for _ in range(20):
                    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert layer.__dict__["_packs"] is packs  # packed once, never again


class _TransformerCalls:
    """Counts calls of open_clip's own residual blocks (and of the packed ones)."""

    def __init__(self, model: TokenBinder) -> None:
        self.open_clip = 0
        self.packed = 0
        self._handles = [
            block.register_forward_pre_hook(self._hook)
            for block in model.text.transformer.resblocks
        ]

    def _hook(self, module, args) -> None:
        if isinstance(module, PackedResidualBlock):
            self.packed += 1
        else:
            self.open_clip += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@needs_onednn
@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full"])
def test_text_tower_on_packed_weights_equals_open_clips_forward(
    vit_b32_text: TokenBinder, truncate: bool
) -> None:
    plain = vit_b32_text
    model = copy.deepcopy(plain).prepare_for_inference()
    tokens = model.tokenize(["x", "a red cube then a blue ball", " ".join(["word"] * 90)])
    calls, plain_calls = _TransformerCalls(model), _TransformerCalls(plain)
    try:
        with torch.inference_mode():
            packed = model.text(tokens, truncate=truncate)
            assert (calls.open_clip, calls.packed) == (0, 12)  # the packed blocks ran
            expected = plain.text(tokens, truncate=False)
            assert (plain_calls.open_clip, plain_calls.packed) == (12, 0)  # open_clip's own
    finally:
        calls.close()
        plain_calls.close()
    assert packed_bytes(model) >= 12 * 4 * (3 + 1 + 4 + 4) * 512 * 512
    for got, want in zip(packed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_text_tower_trains_through_open_clips_forward() -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).train()
    calls = _TransformerCalls(model)
    try:
        indicators, _ = model.text(model.tokenize(["a red cube"]))
    finally:
        calls.close()
    assert (calls.open_clip, calls.packed) == (2, 0)
    indicators.sum().backward()
    assert model.text.indicators.grad is not None


def test_other_block_types_use_open_clips_forward(vit_b32_text: TokenBinder) -> None:
    model = copy.deepcopy(vit_b32_text)
    model.text.transformer.resblocks[5].attn.dropout = 0.1  # not a block the packed one reproduces
    model.prepare_for_inference()
    calls = _TransformerCalls(model)
    try:
        with torch.inference_mode():
            model.text(model.tokenize(["x"]))
    finally:
        calls.close()
    assert not isinstance(model.text.transformer.resblocks[5], PackedResidualBlock)
    assert (calls.open_clip, calls.packed) == (1, 11 if packed_linear.enabled() else 0)


@needs_onednn
@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
def test_fusion_on_packed_weights_equals_plain_modules(head: str) -> None:
    torch.manual_seed(0)
    config = TokenBinderConfig.tiny(head=head)
    plain = TokenBinder(config).eval()
    with torch.no_grad():
        for parameter in plain.fusion.head[-1].parameters():
            parameter.normal_(std=0.5)  # Δ depends on every layer
    model = copy.deepcopy(plain).prepare_for_inference()
    assert packed_bytes(model.fusion) > 0 and packed_bytes(plain) == 0
    queries = torch.randn(3, model.num_indicators - 1, model.embed_dim)
    tokens = torch.randn(3, 4, config.num_frames, model.embed_dim)
    mask = torch.tensor([[True] * 4, [True, True, True, False], [True] * 4])
    outputs = []
    for each in (model, plain):
        with torch.inference_mode():
            kv = each.fusion.project_candidates(tokens.flatten(0, 1))
            kv = kv.view(3, 4, *kv.shape[1:])
            outputs.append(
                (
                    each.fusion(queries, cand_tokens=tokens, cand_mask=mask),
                    each.fusion(queries, kv, cand_mask=mask),
                )
            )
    (packed_tokens, packed_kv), (plain_tokens, plain_kv) = outputs
    for got, expected in zip((*packed_tokens, *packed_kv), (*plain_tokens, *plain_kv), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert plain_tokens[0].abs().max() > 1e-3  # Δ is not trivially zero


# ---- open_clip's block, as the packed text block reproduces it ----------------------------------
# What the packed block was written against (open_clip 3.x ResidualAttentionBlock): if open_clip
# changes the block's shape, these fail before a prepared model silently computes something else.
_BLOCK_STATE = {
    "ln_1.weight": (64,),
    "ln_1.bias": (64,),
    "attn.in_proj_weight": (192, 64),
    "attn.in_proj_bias": (192,),
    "attn.out_proj.weight": (64, 64),
    "attn.out_proj.bias": (64,),
    "ln_2.weight": (64,),
    "ln_2.bias": (64,),
    "mlp.c_fc.weight": (256, 64),
    "mlp.c_fc.bias": (256,),
    "mlp.c_proj.weight": (64, 256),
    "mlp.c_proj.bias": (64,),
}


def _open_clip_block(**options):
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    return ResidualAttentionBlock(64, 2, **options).eval()


def test_open_clips_block_has_the_shape_the_packed_block_reproduces() -> None:
    from open_clip.transformer import ResidualAttentionBlock

    block = _open_clip_block()
    assert tuple(name for name, _ in block.named_children()) == PLAIN_BLOCK_CHILDREN
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == _BLOCK_STATE
    assert list(inspect.signature(ResidualAttentionBlock.forward).parameters) == [
        "self",
        "q_x",
        "k_x",
        "v_x",
        "attn_mask",
    ]
    assert is_plain_block(block)
    assert not is_plain_block(_open_clip_block(is_cross_attention=True))
    packed = PackedResidualBlock(block)
    assert {k: tuple(v.shape) for k, v in packed.state_dict().items()} == _BLOCK_STATE


@pytest.mark.parametrize("layer_scale", [None, 0.5], ids=["plain", "layer-scale"])
def test_packed_block_equals_open_clips_block(layer_scale) -> None:
    block = _open_clip_block(ls_init_value=layer_scale)
    packed = PackedResidualBlock(copy.deepcopy(block))
    for name, tensor in block.state_dict().items():
        assert torch.equal(packed.state_dict()[name], tensor), name
    x = torch.randn(3, 9, 64)
    mask = torch.full((9, 9), float("-inf")).triu(1)  # open_clip's causal mask
    with torch.inference_mode():
        for attn_mask in (mask, None):
            torch.testing.assert_close(
                packed(x, attn_mask=attn_mask),
                block(x, attn_mask=attn_mask),
                rtol=1e-5,
                atol=1e-5,
            )


def test_swap_blocks_leaves_other_transformers_alone() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    assert swap_blocks(model.text.transformer) == 2
    assert swap_blocks(model.text.transformer) == 0  # already swapped
    assert swap_blocks(torch.nn.Linear(2, 2)) == 0
