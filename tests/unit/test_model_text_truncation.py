"""The text tower runs only up to the batch's last ``eot + m`` position (issue 12, part 1):
exactly the full-context pass (float tolerance), for short, long and context-filling texts, a
batch mixing them, gradients included; on the tiny preset and a ViT-B/32-shaped text tower."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker.model import TokenBinder, TokenBinderConfig

SHORT = "x"
MEDIUM = "a red cube then a blue ball rolls over the green table"
LONG_WORDS = " ".join(f"word{i}" for i in range(200))  # fills (and overflows) any context


@pytest.fixture(scope="module")
def tiny() -> TokenBinder:
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    with torch.no_grad():  # indicators far from the EOT embedding: a real difference if misplaced
        model.text.indicators.add_(torch.randn_like(model.text.indicators))
    return model


class _PositionsSeen:
    """Records the sequence length the text transformer runs on (its first block's first
    LayerNorm: called on open_clip's path and on the packed-weights one alike)."""

    def __init__(self, model: TokenBinder) -> None:
        self.lengths: list[int] = []
        first = model.text.transformer.resblocks[0].ln_1
        self._handle = first.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.lengths.append(int(args[0].shape[1]))

    def close(self) -> None:
        self._handle.remove()


def _both(model: TokenBinder, tokens: torch.Tensor):
    """(truncated, full) raw outputs of the text tower, and the positions the truncated ran."""
    seen = _PositionsSeen(model)
    try:
        with torch.no_grad():
            truncated = model.text(tokens)
            full = model.text(tokens, truncate=False)
    finally:
        seen.close()
    return truncated, full, seen.lengths


def _assert_same(truncated, full, atol: float = 1e-5) -> None:
    for got, expected in zip(truncated, full, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol)


def _eot(model: TokenBinder, tokens: torch.Tensor) -> torch.Tensor:
    return tokens.argmax(dim=-1)  # CLIP's EOT id is the largest: open_clip's argmax pool


@pytest.mark.parametrize(
    "texts",
    [[SHORT], [MEDIUM], [LONG_WORDS], [""], [SHORT, LONG_WORDS, MEDIUM, ""]],
    ids=["short", "medium", "context-filling", "empty", "mixed"],
)
def test_truncated_text_pass_equals_the_full_context_pass(tiny: TokenBinder, texts) -> None:
    tokens = tiny.tokenize(texts)
    (indicators, eot), (full_indicators, full_eot), lengths = _both(tiny, tokens)
    _assert_same((indicators, eot), (full_indicators, full_eot))
    expected_positions = int(_eot(tiny, tokens).max()) + tiny.num_indicators + 1
    assert lengths == [expected_positions, tiny.text.context_length]
    if LONG_WORDS not in texts:  # really shorter, so the comparison tests something
        assert expected_positions < tiny.text.context_length
    else:
        assert expected_positions == tiny.text.context_length


def test_batch_rows_do_not_depend_on_their_neighbours(tiny: TokenBinder) -> None:
    """A short text encoded alone (few positions) equals the same text next to a long one."""
    with torch.no_grad():
        alone = tiny.text(tiny.tokenize([SHORT]))
        mixed = tiny.text(tiny.tokenize([LONG_WORDS, SHORT]))
    torch.testing.assert_close(alone[0][0], mixed[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[1][0], mixed[1][1], rtol=1e-5, atol=1e-5)


def test_tokens_shorter_than_the_text_context_are_accepted(tiny: TokenBinder) -> None:
    tokens = tiny.tokenize([MEDIUM, SHORT])
    trimmed = tokens[:, : int(_eot(tiny, tokens).max()) + 1]  # no padding at all
    (indicators, eot), full, _ = _both(tiny, trimmed)
    _assert_same((indicators, eot), full)
    _assert_same((indicators, eot), tiny.text(tokens, truncate=False))


def test_truncated_pass_has_the_full_pass_gradients() -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).train()
    tokens = model.tokenize([SHORT, MEDIUM])
    grads = []
    for truncate in (True, False):
        model.zero_grad(set_to_none=True)
        indicators, eot = model.text(tokens, truncate=truncate)
        weights = torch.linspace(-1, 1, indicators.numel()).view_as(indicators)
        ((indicators * weights).sum() + eot.square().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    truncated, full = grads
    assert "text.indicators" in truncated
    assert truncated.keys() == full.keys()
    for name, grad in truncated.items():
        torch.testing.assert_close(grad, full[name], rtol=1e-4, atol=1e-6, msg=name)


_TEXT_ROWS = st.lists(
    st.lists(st.integers(1, 49406), min_size=0, max_size=20), min_size=1, max_size=4
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=_TEXT_ROWS, noise=st.booleans())
def test_any_token_batch_truncates_exactly(tiny: TokenBinder, rows, noise: bool) -> None:
    """SOT, any words, EOT, then zeros (or arbitrary ids past the indicators' reach)."""
    width = tiny.context_length
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for index, words in enumerate(rows):
        words = [49406, *words[: width - 2], 49407]
        tokens[index, : len(words)] = torch.tensor(words)
        if noise and len(words) + tiny.num_indicators < width:
            start = len(words) + tiny.num_indicators  # past eot + m: can never be read
            tokens[index, start:] = torch.randint(1, 49406, (width - start,))
    truncated, full, _ = _both(tiny, tokens)
    _assert_same(truncated, full)


@pytest.mark.parametrize(
    "texts",
    [[SHORT], [MEDIUM], [LONG_WORDS], [SHORT, LONG_WORDS, MEDIUM]],
    ids=["short", "medium", "context-filling", "mixed"],
)
def test_vit_b32_text_tower_truncates_exactly(vit_b32_text: TokenBinder, texts) -> None:
    tokens = vit_b32_text.tokenize(texts)
    assert tokens.shape[1] == 77 - vit_b32_text.num_indicators
    truncated, full, lengths = _both(vit_b32_text, tokens)
    _assert_same(truncated, full, atol=2e-5)
    assert lengths[0] == int(_eot(vit_b32_text, tokens).max()) + vit_b32_text.num_indicators + 1
    # the normalised outputs of the public call agree as well
    with torch.no_grad():
        indicators, plain = vit_b32_text.encode_text_tokens(tokens)
    torch.testing.assert_close(
        indicators, torch.nn.functional.normalize(full[0], dim=-1), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        plain, torch.nn.functional.normalize(full[1], dim=-1), rtol=1e-5, atol=1e-5
    )
