"""TokenBinder encoders on the tiny preset: shapes, indicator placement, bad inputs."""

from __future__ import annotations

import pytest
import torch

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import TokenBinder, TokenBinderConfig


@pytest.fixture(scope="module")
def model() -> TokenBinder:
    return TokenBinder(TokenBinderConfig.tiny()).eval()


def _frames(model: TokenBinder, batch: int, frames: int | None = None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = model.image_size
    return torch.randn(batch, frames or model.num_frames, 3, size, size, generator=generator)


def test_contract_properties(model: TokenBinder) -> None:
    assert model.embed_dim == 64
    assert model.num_indicators == 4
    assert model.num_frames == 8
    assert model.top_k == 10
    assert model.image_size == 32
    assert len(model.image_mean) == 3 and len(model.image_std) == 3
    assert model.device.type == "cpu"


def test_encode_text_shapes_and_normalised(model: TokenBinder) -> None:
    with torch.no_grad():
        indicators = model.encode_text(["a red cube then a blue ball", "x", ""])
    assert indicators.shape == (3, 4, 64)
    assert indicators.dtype == torch.float32
    torch.testing.assert_close(indicators.norm(dim=-1), torch.ones(3, 4))
    # the m indicators are different vectors, not copies of one
    assert (indicators[:, 0] - indicators[:, 1]).abs().max() > 1e-4


def test_indicators_see_the_whole_text(model: TokenBinder) -> None:
    with torch.no_grad():
        first = model.encode_text(["a red cube then a blue ball"])
        second = model.encode_text(["a red cube then a blue cube"])  # only the last word differs
    assert (first - second).abs().amax(dim=-1).min() > 1e-4  # every I_k changed


def test_plain_clip_feature_unchanged_by_indicators(model: TokenBinder) -> None:
    import open_clip

    texts = ["a red cube then a blue ball", "a green star"]
    full_tokens = open_clip.SimpleTokenizer(context_length=model.text.context_length)(texts)
    short_tokens = model.tokenize(texts)
    assert short_tokens.shape[1] == model.text.context_length - model.num_indicators
    with torch.no_grad():
        reference = model.clip.encode_text(full_tokens, normalize=True)
        indicators, plain = model.encode_text_tokens(short_tokens)
        torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-6)
        # moving the indicators changes them but never the sentence's own EOT feature
        saved = model.text.indicators.detach().clone()
        try:
            model.text.indicators.add_(torch.randn_like(saved))
            moved, plain_after = model.encode_text_tokens(short_tokens)
        finally:
            model.text.indicators.copy_(saved)
    torch.testing.assert_close(plain_after, reference, rtol=1e-5, atol=1e-6)
    assert (moved - indicators).abs().max() > 1e-3


def test_long_text_is_truncated_to_leave_room_for_indicators(model: TokenBinder) -> None:
    long_text = " ".join(["word"] * 100)
    tokens = model.tokenize([long_text])
    assert tokens.shape == (1, model.context_length)
    assert int(tokens[0, -1]) == 49407  # EOT kept as the last text token
    with torch.no_grad():
        assert model.encode_text([long_text]).shape == (1, 4, 64)


def test_encode_frames_shapes(model: TokenBinder) -> None:
    with torch.no_grad():
        cls, frames_tokens = model.encode_frames(_frames(model, 2))
    assert cls.shape == (2, 64) and frames_tokens.shape == (2, 8, 64)
    assert cls.dtype == frames_tokens.dtype == torch.float32
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(frames_tokens.norm(dim=-1), torch.ones(2, 8))
    expected = torch.nn.functional.normalize(frames_tokens.mean(dim=1), dim=-1)
    torch.testing.assert_close(cls, expected)


def test_frames_mask_excludes_padded_frames_from_the_pool(model: TokenBinder) -> None:
    frames = _frames(model, 1, 4)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        cls_masked, _ = model.encode_frames(frames, mask)
        cls_real, _ = model.encode_frames(frames[:, :2])
        cls_all, _ = model.encode_frames(frames)
    torch.testing.assert_close(cls_masked, cls_real)
    assert (cls_masked - cls_all).abs().max() > 1e-4


def test_patch_tokens_option() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(use_patch_tokens=True)).eval()
    per_frame = 1 + (32 // 8) ** 2
    assert model.tokens_per_frame == per_frame
    with torch.no_grad():
        cls, frames_tokens = model.encode_frames(_frames(model, 2, 3))
        indicators = model.encode_text(["a", "b"])
        scores = model.focused_scores(
            indicators,
            cls.unsqueeze(0).expand(2, -1, -1),
            frames_tokens.unsqueeze(0).expand(2, -1, -1, -1),
        )
    assert frames_tokens.shape == (2, 3 * per_frame, 64)
    assert scores.frame_attention.shape == (2, 2, 3)
    torch.testing.assert_close(scores.frame_attention.sum(dim=(1, 2)), torch.ones(2))


def test_single_indicator_model_works() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(num_indicators=1)).eval()
    with torch.no_grad():
        indicators = model.encode_text(["a", "b"])
        cls, frames_tokens = model.encode_frames(_frames(model, 3))
        scores = model.focused_scores(
            indicators,
            cls.unsqueeze(0).expand(2, -1, -1),
            frames_tokens.unsqueeze(0).expand(2, -1, -1, -1),
        )
    assert indicators.shape == (2, 1, 64) and scores.final.shape == (2, 3)


@pytest.mark.parametrize(
    "texts, message",
    [([], "empty"), ("a single string", "list of strings"), (["ok", 3], "texts\\[1\\]")],
)
def test_bad_texts_raise_typed_errors(model: TokenBinder, texts, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        model.encode_text(texts)


def test_bad_tokens_raise_typed_errors(model: TokenBinder) -> None:
    with pytest.raises(InvalidInputError, match="at most"):
        model.encode_text(torch.zeros(1, model.text.context_length, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="token ids"):
        model.encode_text(torch.full((1, 5), 10**6, dtype=torch.long))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 8, 3, 32), "shape"),  # 4-D
        ((2, 8, 1, 32, 32), "3, 32, 32"),  # grey
        ((2, 8, 3, 64, 64), "3, 32, 32"),  # wrong size
        ((2, 9, 3, 32, 32), "T=9"),  # more frames than the model takes
        ((0, 8, 3, 32, 32), "at least one"),
    ],
)
def test_bad_frames_raise_typed_errors(model: TokenBinder, shape, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        model.encode_frames(torch.zeros(shape))


def test_nan_frames_raise(model: TokenBinder) -> None:
    frames = _frames(model, 1)
    frames[0, 3, 1, 2, 2] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        model.encode_frames(frames)
    with pytest.raises(InvalidInputError, match="frames must be a torch.Tensor or numpy array"):
        model.encode_frames(frames.tolist())


def test_numpy_and_half_inputs_are_accepted(model: TokenBinder) -> None:
    frames = _frames(model, 2)
    with torch.no_grad():
        cls, frames_tokens = model.encode_frames(frames)
        cls_np, _ = model.encode_frames(frames.numpy().astype("float64"))
        indicators = model.encode_text(["a", "b"])
        scores = model.focused_scores(
            indicators,
            cls.unsqueeze(0).expand(2, -1, -1),
            frames_tokens.unsqueeze(0).expand(2, -1, -1, -1),
        )
        half = model.focused_scores(
            indicators.half(),
            cls.unsqueeze(0).expand(2, -1, -1).half(),
            frames_tokens.unsqueeze(0).expand(2, -1, -1, -1).half().numpy(),
        )
        kv = model.project_candidates(frames_tokens.half()).half()
        cached = model.focused_scores(
            indicators,
            cls.unsqueeze(0).expand(2, -1, -1),
            cand_kv=kv.unsqueeze(0).expand(2, *kv.shape),
        )
    torch.testing.assert_close(cls_np, cls, rtol=1e-5, atol=1e-6)
    assert half.final.dtype == torch.float32 == cached.final.dtype
    torch.testing.assert_close(half.final, scores.final, rtol=0, atol=5e-3)
    torch.testing.assert_close(cached.final, scores.final, rtol=0, atol=5e-3)


def test_new_model_is_in_eval_mode() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    assert not model.training and not model.fusion.training


def test_config_rejects_bad_values() -> None:
    with pytest.raises(InvalidInputError, match="num_indicators"):
        TokenBinderConfig.tiny(num_indicators=9)
    with pytest.raises(InvalidInputError, match="head"):
        TokenBinderConfig.tiny(head="pairwise")
    cfg = TokenBinderConfig.tiny(head="listwise", gumbel_tau=0.5)
    assert TokenBinderConfig.from_json(cfg.to_json()) == cfg
    assert hash(cfg) == hash(TokenBinderConfig.from_json(cfg.to_json()))
    with pytest.raises(InvalidInputError, match="unknown"):
        TokenBinderConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    assert TokenBinderConfig.vit_b_32().pretrained == "openai"


def test_deepcopy_keeps_the_text_tower_wired_to_its_own_clip(model: TokenBinder) -> None:
    import copy

    clone = copy.deepcopy(model)
    assert clone.text._parts[0] is clone.clip and clone.text._parts[0] is not model.clip
    assert clone.fingerprint() == model.fingerprint()
    with torch.no_grad():
        clone.clip.token_embedding.weight.add_(0.5)
        assert not torch.equal(clone.encode_text(["a cat"]), model.encode_text(["a cat"]))
