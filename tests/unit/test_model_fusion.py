"""Focused-view fusion on the tiny preset: Δ = 0 untrained, equivariance, Gumbel, K/V cache."""

from __future__ import annotations

import pytest
import torch

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import FocusedScores, TokenBinder, TokenBinderConfig

B, K, T, D = 2, 6, 8, 64


def _inputs(seed: int = 0, k: int = K):
    """Random but valid query indicators and candidates: [B, m, D], [B, K, D], [B, K, T, D]."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(*shape, generator=generator), dim=-1
    )
    return normal(B, 4, D), normal(B, k, D), normal(B, k, T, D)


def _randomise_head(model: TokenBinder, seed: int = 1) -> None:
    """Give the zero-initialised last head layer non-zero weights (a 'trained' head)."""
    generator = torch.Generator().manual_seed(seed)
    last = model.fusion.head[-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=generator))
        last.bias.copy_(torch.randn(last.bias.shape, generator=generator))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: far faster for tiny tensors on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def symmetric() -> TokenBinder:
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.mark.parametrize("head", ["symmetric", "listwise"])
def test_untrained_model_keeps_broad_order(head: str) -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.no_grad():
        scores = model.focused_scores(indicators, cand_cls, cand_tokens)
    assert isinstance(scores, FocusedScores)
    assert scores.broad.shape == scores.delta.shape == scores.final.shape == (B, K)
    assert scores.frame_attention.shape == (B, K, T)
    assert torch.equal(scores.delta, torch.zeros(B, K))
    assert torch.equal(scores.final, scores.broad)
    assert torch.equal(scores.final.argsort(dim=1), scores.broad.argsort(dim=1))
    expected_broad = torch.einsum("bd,bkd->bk", indicators[:, 0], cand_cls)
    torch.testing.assert_close(scores.broad, expected_broad)
    torch.testing.assert_close(scores.frame_attention.sum(dim=(1, 2)), torch.ones(B))


def test_symmetric_head_is_permutation_equivariant(symmetric: TokenBinder) -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        scores = model.focused_scores(indicators, cand_cls, cand_tokens)
        permuted = model.focused_scores(
            indicators, cand_cls[:, permutation], cand_tokens[:, permutation]
        )
    assert scores.delta.abs().max() > 1e-3  # the head really scores now
    torch.testing.assert_close(permuted.delta, scores.delta[:, permutation])
    torch.testing.assert_close(permuted.frame_attention, scores.frame_attention[:, permutation])


def test_listwise_head_depends_on_rank() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head="listwise")).eval()
    assert model.fusion.rank_embedding is not None
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    permutation = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        scores = model.focused_scores(indicators, cand_cls, cand_tokens)
        permuted = model.focused_scores(
            indicators, cand_cls[:, permutation], cand_tokens[:, permutation]
        )
    assert not torch.allclose(permuted.delta, scores.delta[:, permutation])


def test_gumbel_noise_only_in_training() -> None:
    model = TokenBinder(TokenBinderConfig.tiny())
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    model.eval()
    with torch.no_grad():
        first = model.focused_scores(indicators, cand_cls, cand_tokens)
        second = model.focused_scores(indicators, cand_cls, cand_tokens)
    assert torch.equal(first.final, second.final)
    assert torch.equal(first.frame_attention, second.frame_attention)
    model.train()
    with torch.no_grad():
        noisy_a = model.focused_scores(indicators, cand_cls, cand_tokens)
        noisy_b = model.focused_scores(indicators, cand_cls, cand_tokens)
    assert not torch.allclose(noisy_a.frame_attention, noisy_b.frame_attention)
    assert not torch.allclose(noisy_a.delta, noisy_b.delta)
    # the broad score never has noise
    assert torch.equal(noisy_a.broad, first.broad)


def test_gumbel_scale_zero_trains_deterministically() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(gumbel_scale=0.0)).train()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.no_grad():
        first = model.focused_scores(indicators, cand_cls, cand_tokens)
        second = model.focused_scores(indicators, cand_cls, cand_tokens)
        evaluated = model.eval().focused_scores(indicators, cand_cls, cand_tokens)
    assert torch.equal(first.final, second.final)
    torch.testing.assert_close(first.final, evaluated.final)


@pytest.mark.parametrize("head", ["symmetric", "listwise"])
def test_cached_kv_gives_the_same_scores(head: str) -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head=head, fusion_blocks=2)).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.no_grad():
        direct = model.focused_scores(indicators, cand_cls, cand_tokens)
        # project each video on its own, as a cache filled one video at a time would
        per_video = [
            model.project_candidates(cand_tokens[b, k : k + 1]) for b in range(B) for k in range(K)
        ]
        cand_kv = torch.cat(per_video).view(B, K, *per_video[0].shape[1:])
        cached = model.focused_scores(indicators, cand_cls, cand_kv=cand_kv)
    assert cand_kv.shape == (B, K, 2, 2, T, D)
    torch.testing.assert_close(cached.final, direct.final, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.frame_attention, direct.frame_attention, rtol=1e-5, atol=1e-6)


def test_projection_is_independent_of_other_videos(symmetric: TokenBinder) -> None:
    _, _, cand_tokens = _inputs()
    videos = cand_tokens[0]  # [K, T, D]
    with torch.no_grad():
        together = symmetric.project_candidates(videos)
        alone = symmetric.project_candidates(videos[2:3])
    torch.testing.assert_close(together[2:3], alone)


def test_cand_mask_padded_candidates_never_win() -> None:
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    with torch.no_grad():
        scores = model.focused_scores(indicators, cand_cls, cand_tokens, mask)
        subset = model.focused_scores(indicators[:1], cand_cls[:1, :4], cand_tokens[:1, :4])
    assert torch.isinf(scores.final[~mask]).all() and (scores.final[~mask] < 0).all()
    assert torch.equal(scores.delta[~mask], torch.zeros(int((~mask).sum())))
    assert torch.isfinite(scores.final[mask]).all()
    assert (scores.frame_attention[~mask] == 0).all()
    assert bool(mask.gather(1, scores.final.argmax(dim=1, keepdim=True)).all())
    # padding is exactly equivalent to leaving the candidates out
    torch.testing.assert_close(scores.final[:1, :4], subset.final)


def test_v2t_direction_shapes_and_zero_init(symmetric: TokenBinder) -> None:
    generator = torch.Generator().manual_seed(3)
    frames_tokens = torch.nn.functional.normalize(torch.randn(B, T, D, generator=generator), dim=-1)
    video_cls = torch.nn.functional.normalize(frames_tokens.mean(1), dim=-1)
    cand_indicators = torch.nn.functional.normalize(
        torch.randn(B, 5, 4, D, generator=generator), dim=-1
    )
    with torch.no_grad():
        scores = symmetric.focused_scores_v2t(frames_tokens, video_cls, cand_indicators)
    assert scores.final.shape == (B, 5) and scores.frame_attention.shape == (B, 5, T)
    assert torch.equal(scores.final, scores.broad)
    torch.testing.assert_close(
        scores.broad, torch.einsum("bkd,bd->bk", cand_indicators[:, :, 0], video_cls)
    )
    torch.testing.assert_close(scores.frame_attention.sum(-1), torch.ones(B, 5))


def test_bad_fusion_inputs_raise_typed_errors(symmetric: TokenBinder) -> None:
    indicators, cand_cls, cand_tokens = _inputs()
    with pytest.raises(InvalidInputError, match="K must be >= 1"):
        symmetric.focused_scores(indicators, cand_cls[:, :0], cand_tokens[:, :0])
    with pytest.raises(InvalidInputError, match="embedding dim 32"):
        symmetric.focused_scores(indicators, cand_cls[..., :32], cand_tokens)
    with pytest.raises(InvalidInputError, match="embedding dim 32"):
        symmetric.focused_scores(indicators[..., :32], cand_cls, cand_tokens)
    bad = indicators.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN"):
        symmetric.focused_scores(bad, cand_cls, cand_tokens)
    with pytest.raises(InvalidInputError, match="\\[B, K\\]"):
        symmetric.focused_scores(indicators, cand_cls, cand_tokens[:1])
    with pytest.raises(InvalidInputError, match="exactly one"):
        symmetric.focused_scores(indicators, cand_cls)
    with pytest.raises(InvalidInputError, match="at most 8"):
        symmetric.focused_scores(indicators, cand_cls, torch.cat([cand_tokens, cand_tokens], 2))
    with pytest.raises(InvalidInputError, match="cand_mask"):
        symmetric.focused_scores(
            indicators, cand_cls, cand_tokens, torch.ones(B, K + 1, dtype=torch.bool)
        )
    listwise = TokenBinder(TokenBinderConfig.tiny(head="listwise", top_k=4)).eval()
    with pytest.raises(InvalidInputError, match="top_k=4"):
        listwise.focused_scores(indicators, cand_cls, cand_tokens)


@pytest.mark.parametrize("head", ["symmetric", "listwise"])
def test_v2t_scores_each_pair_like_a_single_candidate_t2v(head: str) -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs(k=3)
    video_tokens, video_cls = cand_tokens[:, 0], cand_cls[:, 0]  # [B, T, D], [B, D]
    texts = indicators.unsqueeze(1).expand(-1, 3, -1, -1).clone()  # [B, 3, m, D]
    texts[:, 1] = indicators.flip(0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        v2t = model.focused_scores_v2t(video_tokens, video_cls, texts, mask)
        for b in range(B):
            for k in range(2):
                single = model.focused_scores(
                    texts[b, k : k + 1],
                    video_cls[b].view(1, 1, D),
                    video_tokens[b].view(1, 1, T, D),
                )
                torch.testing.assert_close(v2t.delta[b, k], single.delta[0, 0])
                torch.testing.assert_close(v2t.final[b, k], single.final[0, 0])
    assert v2t.delta.abs().max() > 1e-3
    assert torch.isinf(v2t.final[0, 2]) and v2t.delta[0, 2] == 0


def test_listwise_head_takes_fewer_than_top_k_candidates() -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head="listwise")).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs(k=3)
    with torch.no_grad():
        scores = model.focused_scores(indicators, cand_cls, cand_tokens)
    assert scores.delta.shape == (B, 3) and scores.delta.abs().max() > 1e-3
