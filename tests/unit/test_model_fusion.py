"""Focused-view fusion: Δ = 0 untrained, equivariance, Gumbel, K/V cache, and the one forward
against the plain formulation (values and gradients)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import FocusedScores, TokenBinder, TokenBinderConfig, fusion_block
from tb_reranker.model.fusion import CrossAttentionBlock, FocusedFusion, gumbel_like

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


@pytest.fixture(scope="module")
def symmetric() -> TokenBinder:
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
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


@pytest.mark.parametrize("head", ["listwise", "listwise_slots"])
def test_listwise_head_depends_on_rank(head: str) -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
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


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
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
    # the slots head sums 10 slots x 3 queries x 65 features through random weights
    atol = 1e-5 if head == "listwise_slots" else 1e-6
    torch.testing.assert_close(cached.final, direct.final, rtol=1e-5, atol=atol)
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


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
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


@pytest.mark.parametrize("head", ["listwise", "listwise_slots"])
def test_listwise_head_takes_fewer_than_top_k_candidates(head: str) -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs(k=3)
    with torch.no_grad():
        scores = model.focused_scores(indicators, cand_cls, cand_tokens)
    assert scores.delta.shape == (B, 3) and scores.delta.abs().max() > 1e-3


# ---- the plain formulation: the reference the one fusion forward must equal ---------------------
def _reference_block(
    block: CrossAttentionBlock,
    queries: torch.Tensor,
    kv: torch.Tensor,
    tokens_mask: torch.Tensor | None,
    tau: float,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block written plainly: queries [B, Q, D], kv [B, 2, S, D], tokens_mask [B, S] ->
    (queries [B, Q, D], attention [B, H, Q, S], values [B, H, S, D/H])."""
    batch_size, num_queries, _ = queries.shape
    num_tokens = kv.shape[2]
    q = block.q_proj(block.ln_q(queries))
    q = q.view(batch_size, num_queries, block.heads, block.head_dim).transpose(1, 2)
    k = kv[:, 0].view(batch_size, num_tokens, block.heads, block.head_dim).transpose(1, 2)
    v = kv[:, 1].view(batch_size, num_tokens, block.heads, block.head_dim).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(block.head_dim)  # [B, H, Q, S]
    if noise is not None:
        logits = logits + noise.view_as(logits)
    logits = logits / tau
    if tokens_mask is not None:
        keep = tokens_mask[:, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
        any_real = keep.any(dim=-1, keepdim=True)
        logits = torch.where(any_real, logits, torch.zeros_like(logits))
        attention = torch.softmax(logits, dim=-1) * any_real
    else:
        attention = torch.softmax(logits, dim=-1)
    attended = (attention @ v).transpose(1, 2).reshape(batch_size, num_queries, block.width)
    queries = queries + block.out_proj(attended)
    queries = queries + block.mlp(block.ln_mlp(queries))
    return queries, attention, v


def _reference_fusion(
    fusion: FocusedFusion,
    queries: torch.Tensor,
    cand_kv: torch.Tensor,
    cand_mask: torch.Tensor | None,
    noises: list[torch.Tensor] | None = None,
    frames_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md §3 written plainly (attention over the K·T' tokens, values, head features);
    ``noises``: the Gumbel noise of each block, already multiplied by ``gumbel_scale``;
    ``frames_mask`` [B, K, T']: tokens that get no attention."""
    batch_size, num_candidates, _, _, num_tokens, width = cand_kv.shape
    tokens_mask = None
    if cand_mask is not None:
        tokens_mask = cand_mask.unsqueeze(-1).expand(-1, -1, num_tokens)
    if frames_mask is not None:
        tokens_mask = frames_mask if tokens_mask is None else tokens_mask & frames_mask
    if tokens_mask is not None:
        tokens_mask = tokens_mask.reshape(batch_size, num_candidates * num_tokens)
    attention = values = None
    for index, block in enumerate(fusion.blocks):
        kv = cand_kv[:, :, index]  # [B, K, 2, T', D]
        if fusion.rank_embedding is not None:
            rank = block.rank_kv(fusion.rank_embedding[:num_candidates])  # [2, K, D]
            kv = kv + rank.transpose(0, 1).unsqueeze(0).unsqueeze(3)
        kv = kv.transpose(1, 2).reshape(batch_size, 2, num_candidates * num_tokens, width)
        noise = None if noises is None else noises[index]
        queries, attention, values = _reference_block(
            block, queries, kv, tokens_mask, fusion.gumbel_tau, noise
        )
    heads = attention.shape[1]
    per_candidate = attention.view(batch_size, heads, -1, num_candidates, num_tokens)
    token_attention = per_candidate.mean(dim=(1, 2))
    if fusion.head_type == "listwise":
        delta = fusion.head(queries.reshape(batch_size, -1))[:, :num_candidates]
    else:
        mass = per_candidate.sum(dim=-1)  # [B, H, Q, K]
        within = per_candidate / mass.unsqueeze(-1).clamp_min(1e-12)
        values_per_candidate = values.view(batch_size, heads, num_candidates, num_tokens, -1)
        summary = torch.einsum("bhqkt,bhktd->bqkhd", within, values_per_candidate)
        summary = summary.reshape(batch_size, -1, num_candidates, width)  # [B, Q, K, D]
        products = queries.unsqueeze(2) * summary
        if cand_mask is None:
            real = torch.full((batch_size, 1, 1), float(num_candidates))
        else:
            real = cand_mask.sum(dim=1).to(mass.dtype).view(batch_size, 1, 1)
        mass_feature = (mass.mean(dim=1) * real).unsqueeze(-1)
        features = torch.cat([products, mass_feature], dim=-1)  # [B, Q, K, D+1]
        features = features.permute(0, 2, 1, 3).reshape(batch_size, num_candidates, -1)
        if fusion.head_type == "listwise_slots":  # all K slots' features into one K-output MLP
            if cand_mask is not None:
                features = features * cand_mask.unsqueeze(-1).to(features.dtype)
            slots = torch.zeros(batch_size, fusion.max_candidates, features.shape[-1])
            slots = slots.to(features.dtype)
            slots[:, :num_candidates] = features
            delta = fusion.head(slots.reshape(batch_size, -1))[:, :num_candidates]
        else:
            delta = fusion.head(features).squeeze(-1)
    if cand_mask is not None:
        delta = delta.masked_fill(~cand_mask, 0.0)
    return delta, token_attention


_EQUIVALENCE_MASK = torch.tensor(
    [[True] * 5, [True, False, True, False, True], [False] * 5, [True] * 2 + [False] * 3]
)


def _perturbed_fusion(head: str, blocks: int, dtype: torch.dtype) -> FocusedFusion:
    """``head``: "symmetric", "listwise" (with rank embeddings) or "symmetric+rank"."""
    torch.manual_seed(0)
    rank = head != "symmetric"
    head = head.removesuffix("+rank")
    fusion = FocusedFusion(64, 3, 6, 5, blocks=blocks, heads=4, head=head, rank_embedding=rank)
    with torch.no_grad():
        for param in fusion.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return fusion.to(dtype).eval()


def _fusion_inputs(blocks: int, dtype: torch.dtype, cached: bool, fusion: FocusedFusion):
    """queries [4, 3, 64] and cand_kv [4, 5, blocks, 2, 6, 64]: a strided view of a
    ``[blocks, 2, B*K, T', D]`` gather (the ``Reranker``'s layout) when ``cached``, else the
    projection of candidate tokens (gradients reach the tokens and the K/V projections)."""
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(4, 3, 64, generator=generator).to(dtype).requires_grad_()
    if cached:
        gathered = torch.randn(blocks, 2, 20, 6, 64, generator=generator).to(dtype)
        leaf = gathered.requires_grad_()
        cand_kv = leaf.permute(2, 0, 1, 3, 4).view(4, 5, blocks, 2, 6, 64)
    else:
        leaf = torch.randn(20, 6, 64, generator=generator).to(dtype).requires_grad_()
        cand_kv = fusion.project_candidates(leaf).view(4, 5, blocks, 2, 6, 64)
    return queries, leaf, cand_kv


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("few_candidates", [0, 10**6])  # per-head bmm / block-diagonal bmm
def test_fusion_forward_equals_the_plain_formulation(head, blocks, few_candidates, monkeypatch):
    """Values (float32, inference mode, as the reranker runs it) equal the plain formulation,
    with and without a candidate mask; the packed head weight follows updates."""
    monkeypatch.setattr(fusion_block, "_FEW_CANDIDATES", few_candidates)
    fusion = _perturbed_fusion(head, blocks, torch.float32)
    queries = torch.randn(4, 3, 64)
    cand_kv = torch.randn(4, 5, blocks, 2, 6, 64)
    for mask in (None, _EQUIVALENCE_MASK):
        with torch.inference_mode():
            delta, attention = fusion(queries, cand_kv, mask)
            expected_delta, expected_attention = _reference_fusion(fusion, queries, cand_kv, mask)
        assert delta.abs().max() > 1e-3  # a head that really scores
        torch.testing.assert_close(delta, expected_delta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention, expected_attention, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        fusion.head[1].weight.mul_(2.0)
    with torch.inference_mode():
        delta, _ = fusion(queries, cand_kv, None)
        expected_delta, _ = _reference_fusion(fusion, queries, cand_kv, None)
    torch.testing.assert_close(delta, expected_delta, atol=1e-5, rtol=1e-5)


def _reference_noises(fusion: FocusedFusion, blocks: int) -> list[torch.Tensor]:
    """The Gumbel noise the fusion draws per block ([B 4, H 4, Q 3, K·T' 30]), drawn in the
    same order, scaled as the fusion scales it: the plain formulation's input."""
    return [
        fusion.gumbel_scale * gumbel_like(torch.empty(4, 4, 3, 30, dtype=torch.float64))
        for _ in range(blocks)
    ]


def _backward(fusion: FocusedFusion, delta, attention, queries, leaf) -> tuple:
    """Backward of a fixed mix of Δ and attention; (Δ, attention, the queries' and the leaf's
    gradients, every parameter's gradient by name)."""
    weights = torch.linspace(-1.0, 1.0, delta.numel(), dtype=torch.float64)
    loss = (delta.reshape(-1) * weights).sum() + (attention**2).sum()
    loss.backward()
    grads = {name: p.grad for name, p in fusion.named_parameters()}
    return delta.detach(), attention.detach(), queries.grad, leaf.grad, grads


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("few_candidates", [0, 10**6])
@pytest.mark.parametrize("cached", [True, False])
def test_fusion_gradients_equal_the_plain_formulation(
    head, blocks, few_candidates, cached, monkeypatch
):
    """Training: the same values and the same gradients (every parameter, the queries, the
    cached K/V or the tokens they were projected from) as the plain formulation, in float64,
    with the Gumbel noise on (training mode) and with a mask that pads a whole query."""
    monkeypatch.setattr(fusion_block, "_FEW_CANDIDATES", few_candidates)
    for mask in (None, _EQUIVALENCE_MASK):
        results = []
        for formulation in ("fusion", "reference"):
            fusion = _perturbed_fusion(head, blocks, torch.float64).train()
            queries, leaf, cand_kv = _fusion_inputs(blocks, torch.float64, cached, fusion)
            torch.manual_seed(7)  # the same Gumbel noise, drawn in the same order
            if formulation == "fusion":
                delta, attention = fusion(queries, cand_kv, mask)
            else:
                noises = _reference_noises(fusion, blocks)
                delta, attention = _reference_fusion(fusion, queries, cand_kv, mask, noises)
            results.append(_backward(fusion, delta, attention, queries, leaf))
        (delta, attention, queries_grad, leaf_grad, grads), expected = results
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(delta, expected[0], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(attention, expected[1], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(queries_grad, expected[2], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(leaf_grad, expected[3], atol=1e-10, rtol=1e-9)
        assert grads.keys() == expected[4].keys()
        for name, grad in grads.items():
            if expected[4][name] is None:
                assert grad is None, name
                continue
            assert grad is not None, name
            torch.testing.assert_close(grad, expected[4][name], atol=1e-10, rtol=1e-9, msg=name)


def test_unvalidated_focused_scores_equal_the_checked_ones() -> None:
    """``validate=False`` (the reranker's hot path) skips the checks, not the arithmetic."""
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.inference_mode():
        cand_kv = model.project_candidates(cand_tokens.reshape(B * K, T, D))
        cand_kv = cand_kv.view(B, K, *cand_kv.shape[1:])
        checked = model.focused_scores(indicators, cand_cls, cand_mask=mask, cand_kv=cand_kv)
        trusted = model.focused_scores(
            indicators, cand_cls, cand_mask=mask, cand_kv=cand_kv, validate=False
        )
    assert torch.equal(trusted.final, checked.final)
    assert torch.equal(trusted.frame_attention, checked.frame_attention)
    with pytest.raises(InvalidInputError, match="NaN"):  # the default still checks
        model.focused_scores(indicators * float("nan"), cand_cls, cand_mask=mask, cand_kv=cand_kv)


# ---- the K/V-free path (issue 12): scores straight from the candidates' tokens ------------------
def _token_inputs(dtype: torch.dtype):
    """queries [4, 3, 64] and candidate tokens [4, 5, 6, 64] (leaves)."""
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(4, 3, 64, generator=generator).to(dtype).requires_grad_()
    tokens = torch.randn(4, 5, 6, 64, generator=generator).to(dtype).requires_grad_()
    return queries, tokens


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots", "symmetric+rank"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_token_path_equals_the_plain_formulation(head, blocks):
    """float32 inference: the K/V-free path gives the plain formulation's Δ and attention on
    the projected K/V, with and without a mask (one query fully padded), rank embedding included
    for the listwise head."""
    fusion = _perturbed_fusion(head, blocks, torch.float32)
    queries, tokens = _token_inputs(torch.float32)
    for mask in (None, _EQUIVALENCE_MASK):
        with torch.inference_mode():
            delta, attention = fusion(queries, cand_mask=mask, cand_tokens=tokens)
            cand_kv = fusion.project_candidates(tokens.reshape(20, 6, 64)).view(
                4, 5, blocks, 2, 6, 64
            )
            expected_delta, expected_attention = _reference_fusion(fusion, queries, cand_kv, mask)
            cached_delta, _ = fusion(queries, cand_kv, mask)
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(delta, expected_delta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention, expected_attention, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(delta, cached_delta, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots", "symmetric+rank"])
@pytest.mark.parametrize("blocks", [1, 2])
def test_token_path_gradients_equal_the_plain_formulation(head, blocks):
    """Training (Gumbel noise on, float64): the same values and gradients (every parameter,
    the queries, the tokens) as the plain formulation on the projected K/V."""
    for mask in (None, _EQUIVALENCE_MASK):
        results = []
        for formulation in ("tokens", "reference"):
            fusion = _perturbed_fusion(head, blocks, torch.float64).train()
            queries, tokens = _token_inputs(torch.float64)
            torch.manual_seed(7)  # the same Gumbel noise, drawn in the same order
            if formulation == "tokens":
                delta, attention = fusion(queries, cand_mask=mask, cand_tokens=tokens)
            else:
                cand_kv = fusion.project_candidates(tokens.reshape(20, 6, 64))
                cand_kv = cand_kv.view(4, 5, blocks, 2, 6, 64)
                noises = _reference_noises(fusion, blocks)
                delta, attention = _reference_fusion(fusion, queries, cand_kv, mask, noises)
            results.append(_backward(fusion, delta, attention, queries, tokens))
        (delta, attention, queries_grad, tokens_grad, grads), expected = results
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(delta, expected[0], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(attention, expected[1], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(queries_grad, expected[2], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(tokens_grad, expected[3], atol=1e-10, rtol=1e-9)
        assert grads.keys() == expected[4].keys()
        for name, grad in grads.items():
            reference = expected[4][name]
            if reference is None:
                assert grad is None, name
                continue
            assert grad is not None, name
            torch.testing.assert_close(grad, reference, atol=1e-10, rtol=1e-9, msg=name)


def _record_projections(model: TokenBinder) -> list[tuple[str, int]]:
    """(``"k"``/``"v"``, rows) of every K/V projection the fusion's linear layers run (module
    calls: plain ``nn.Linear`` or, on a prepared model, ``PackedLinear``)."""
    calls: list[tuple[str, int]] = []
    for block in model.fusion.blocks:
        for name, layer in (("k", block.k_proj), ("v", block.v_proj)):
            layer.register_forward_pre_hook(
                lambda _module, args, name=name: calls.append((name, int(args[0].shape[0])))
            )
    return calls


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_focused_scores_on_tokens_never_projects_them(prepared: bool) -> None:
    """``focused_scores(cand_tokens=...)`` takes the K/V-free path: no K/V projection runs, and
    the scores equal those on the projected K/V."""
    model = TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2)).eval()
    _randomise_head(model)
    if prepared:
        model.prepare_for_inference()
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.inference_mode():
        cand_kv = model.project_candidates(cand_tokens.reshape(B * K, T, D))
        cached = model.focused_scores(
            indicators, cand_cls, cand_kv=cand_kv.view(B, K, *cand_kv.shape[1:])
        )
    calls = _record_projections(model)
    with torch.inference_mode():
        direct = model.focused_scores(indicators, cand_cls, cand_tokens)
        assert calls == []
        model.project_candidates(cand_tokens.reshape(B * K, T, D))
    assert len(calls) == 4  # the recorder sees a projection: k and v of 2 blocks
    assert direct.delta.abs().max() > 1e-3
    torch.testing.assert_close(direct.final, cached.final, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(direct.frame_attention, cached.frame_attention, rtol=1e-5, atol=1e-6)


def test_fusion_needs_exactly_one_candidate_source() -> None:
    fusion = _perturbed_fusion("symmetric", 1, torch.float32)
    queries, tokens = _token_inputs(torch.float32)
    with pytest.raises(ValueError, match="exactly one"):
        fusion(queries.detach())
    with pytest.raises(ValueError, match="exactly one"):
        fusion(queries.detach(), torch.zeros(4, 5, 1, 2, 6, 64), cand_tokens=tokens.detach())


def test_listwise_slots_output_k_reads_slot_k() -> None:
    """The slot-bound head: Δ_k follows candidate k's own features. Swapping two candidates
    changes the inputs of exactly those two slots; the pure listwise head, whose input is the
    pooled fused indicators, changes its slots' Δ only through attention-mass shifts."""
    model = TokenBinder(TokenBinderConfig.tiny(head="listwise_slots")).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    with torch.no_grad():
        fusion = model.fusion
        queries = model.fusion_queries(indicators)
        inputs = []
        for tokens in (cand_tokens, cand_tokens[:, [1, 0, *range(2, K)]]):
            positions = fusion.position_embeddings(T)
            block = fusion.blocks[0]
            out = block(
                queries,
                fusion_block.TokenInputs(
                    block.kv_inputs(tokens, positions), fusion.rank_embedding[:K]
                ),
            )
            inputs.append(fusion._candidate_features(queries, out.mass, out.summary, None))
    unchanged = (inputs[0] - inputs[1]).abs().amax(dim=(0, 2, 3))  # per slot
    assert unchanged[0] > 1e-3 and unchanged[1] > 1e-3
    assert unchanged[2:].max() < 0.5 * unchanged[:2].min()  # others move only via the softmax


# ---- padded frames (issue 13 §2): no attention, as if absent ------------------------------------
def _padded_copy(tokens: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [..., n, D]`` padded to ``num_frames`` as the decoder pads a short video (the
    last frame repeated), with its mask ``[..., num_frames]`` (False = padded)."""
    real = tokens.shape[-2]
    repeats = tokens[..., -1:, :].expand(*tokens.shape[:-2], num_frames - real, tokens.shape[-1])
    mask = torch.zeros(*tokens.shape[:-2], num_frames, dtype=torch.bool)
    mask[..., :real] = True
    return torch.cat([tokens, repeats], dim=-2), mask


def _kv_of(model: TokenBinder, tokens: torch.Tensor, mask: torch.Tensor | None = None):
    """[B, K, T', D] tokens (and [B, K, T] mask) -> cand_kv [B, K, n_blocks, 2, T', D]"""
    batch_size, num_candidates = tokens.shape[:2]
    flat_mask = None if mask is None else mask.reshape(batch_size * num_candidates, -1)
    kv = model.project_candidates(
        tokens.reshape(batch_size * num_candidates, *tokens.shape[2:]), flat_mask
    )
    return kv.view(batch_size, num_candidates, *kv.shape[1:])


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
@pytest.mark.parametrize("path", ["tokens", "kv"])
def test_padded_copy_scores_like_the_unpadded_original_t2v(head: str, path: str) -> None:
    """A short video (5 real frames) and its copy padded to T = 8 with repeats + frames_mask
    score identically (Δ, final, frame attention), from tokens and from cached K/V."""
    model = TokenBinder(TokenBinderConfig.tiny(head=head, fusion_blocks=2)).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs()
    original = cand_tokens[:, :, :5]  # [B, K, 5, D]
    padded, mask = _padded_copy(original, T)  # [B, K, 8, D], [B, K, 8]
    with torch.inference_mode():
        if path == "tokens":
            expected = model.focused_scores(indicators, cand_cls, original)
            got = model.focused_scores(indicators, cand_cls, padded, frames_mask=mask)
            unmasked = model.focused_scores(indicators, cand_cls, padded)
        else:
            expected = model.focused_scores(indicators, cand_cls, cand_kv=_kv_of(model, original))
            got = model.focused_scores(
                indicators, cand_cls, cand_kv=_kv_of(model, padded, mask), frames_mask=mask
            )
            unmasked = model.focused_scores(indicators, cand_cls, cand_kv=_kv_of(model, padded))
    assert expected.delta.abs().max() > 1e-3
    torch.testing.assert_close(got.delta, expected.delta, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.final, expected.final, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        got.frame_attention[..., :5], expected.frame_attention, atol=1e-7, rtol=1e-5
    )
    assert torch.equal(got.frame_attention[..., 5:], torch.zeros(B, K, 3))
    # without the mask the repeats do get attention (what issue 13 found)
    assert unmasked.frame_attention[..., 5:].sum() > 0.1
    assert not torch.allclose(unmasked.delta, expected.delta, atol=1e-4)


@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
def test_padded_copy_scores_like_the_unpadded_original_v2t(head: str) -> None:
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
    _randomise_head(model)
    indicators, cand_cls, cand_tokens = _inputs(k=3)
    video_cls = cand_cls[:, 0]
    original = cand_tokens[:, 0, :3]  # [B, 3, D]: 3 real frames
    padded, mask = _padded_copy(original, T)
    texts = torch.stack([indicators, indicators.flip(0), indicators.roll(1, -1)], dim=1)
    with torch.inference_mode():
        expected = model.focused_scores_v2t(original, video_cls, texts)
        got = model.focused_scores_v2t(padded, video_cls, texts, frames_mask=mask)
        unmasked = model.focused_scores_v2t(padded, video_cls, texts)
    assert expected.delta.abs().max() > 1e-3
    torch.testing.assert_close(got.final, expected.final, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        got.frame_attention[..., :3], expected.frame_attention, atol=1e-7, rtol=1e-5
    )
    assert torch.equal(got.frame_attention[..., 3:], torch.zeros(B, 3, T - 3))
    assert not torch.allclose(unmasked.delta, expected.delta, atol=1e-4)


@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_padded_frames_are_not_projected(prepared: bool) -> None:
    """The K/V of padded frames are never computed (zero), the real ones are unchanged."""
    model = TokenBinder(TokenBinderConfig.tiny(fusion_blocks=2)).eval()
    if prepared:
        model.prepare_for_inference()
    _, _, cand_tokens = _inputs()
    videos = cand_tokens[0]  # [K, T, D]
    mask = torch.ones(K, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1::2] = False
    calls = _record_projections(model)
    with torch.inference_mode():
        full = model.project_candidates(videos)
        calls.clear()
        masked = model.project_candidates(videos, mask)
    rows = [count for name, count in calls if name == "k"]
    assert rows == [int(mask.sum())] * 2  # one k_proj call per block, real tokens only
    assert masked.shape == full.shape
    keep = mask[:, None, None, :, None].expand_as(full)
    torch.testing.assert_close(masked[keep], full[keep])
    assert torch.equal(masked[~keep], torch.zeros(int((~keep).sum())))


def test_bad_frames_masks_raise_typed_errors(symmetric: TokenBinder) -> None:
    indicators, cand_cls, cand_tokens = _inputs()
    with pytest.raises(InvalidInputError, match="frames_mask"):
        symmetric.focused_scores(
            indicators, cand_cls, cand_tokens, frames_mask=torch.ones(B, K, 7, dtype=torch.bool)
        )
    with pytest.raises(InvalidInputError, match="frames_mask"):
        symmetric.focused_scores(indicators, cand_cls, cand_tokens, frames_mask=torch.ones(B, K, T))
    empty = torch.ones(B, K, T, dtype=torch.bool)
    empty[1, 2] = False
    with pytest.raises(InvalidInputError, match="at least one real frame"):
        symmetric.focused_scores(indicators, cand_cls, cand_tokens, frames_mask=empty)
    cand_mask = torch.ones(B, K, dtype=torch.bool)
    cand_mask[1, 2] = False  # a padded candidate may have no real frame
    scores = symmetric.focused_scores(
        indicators, cand_cls, cand_tokens, cand_mask, frames_mask=empty
    )
    assert torch.isfinite(scores.final[cand_mask]).all()
    with pytest.raises(InvalidInputError, match="frames_mask"):
        symmetric.focused_scores_v2t(
            cand_tokens[:, 0],
            cand_cls[:, 0],
            indicators[:, None],
            frames_mask=torch.ones(B, 3, dtype=torch.bool),
        )
    with pytest.raises(InvalidInputError, match="frames_mask"):
        symmetric.project_candidates(cand_tokens[0], torch.ones(K, 2, dtype=torch.bool))


_FRAMES_MASK = torch.ones(4, 5, 6, dtype=torch.bool)
_FRAMES_MASK[0, 1, 3:] = False  # trailing padding
_FRAMES_MASK[1, 0, ::2] = False  # interleaved repeats
_FRAMES_MASK[3, :, 1:] = False  # one real frame per candidate


@pytest.mark.parametrize("head", ["symmetric", "listwise", "symmetric+rank"])
@pytest.mark.parametrize("path", ["tokens", "kv"])
def test_frames_mask_gradients_equal_the_plain_formulation(head, path):
    """Training (Gumbel noise, float64), padded frames masked: values and every gradient equal
    the plain formulation's with those tokens masked, on both paths, with a candidate mask too;
    padded tokens get no gradient."""
    for mask in (None, _EQUIVALENCE_MASK):
        results = []
        for formulation in ("fusion", "reference"):
            fusion = _perturbed_fusion(head, 2, torch.float64).train()
            queries, tokens = _token_inputs(torch.float64)
            torch.manual_seed(7)
            if formulation == "fusion" and path == "tokens":
                delta, attention = fusion(
                    queries, cand_mask=mask, cand_tokens=tokens, frames_mask=_FRAMES_MASK
                )
            else:
                frames = _FRAMES_MASK if formulation == "fusion" else None
                cand_kv = fusion.project_candidates(
                    tokens.reshape(20, 6, 64), None if frames is None else frames.reshape(20, 6)
                ).view(4, 5, 2, 2, 6, 64)
                if formulation == "fusion":
                    delta, attention = fusion(queries, cand_kv, mask, frames_mask=_FRAMES_MASK)
                else:
                    noises = _reference_noises(fusion, 2)
                    delta, attention = _reference_fusion(
                        fusion, queries, cand_kv, mask, noises, frames_mask=_FRAMES_MASK
                    )
            results.append(_backward(fusion, delta, attention, queries, tokens))
        (delta, attention, queries_grad, tokens_grad, grads), expected = results
        assert delta.abs().max() > 1e-3
        assert torch.equal(attention[~_FRAMES_MASK], torch.zeros(int((~_FRAMES_MASK).sum())))
        torch.testing.assert_close(delta, expected[0], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(attention, expected[1], atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(queries_grad, expected[2], atol=1e-10, rtol=1e-9)
        padded_grad = tokens_grad[~_FRAMES_MASK]
        assert torch.equal(padded_grad, torch.zeros_like(padded_grad))
        torch.testing.assert_close(tokens_grad, expected[3], atol=1e-10, rtol=1e-9)
        for name, grad in grads.items():
            reference = expected[4][name]
            if reference is None:
                assert grad is None, name
                continue
            torch.testing.assert_close(grad, reference, atol=1e-10, rtol=1e-9, msg=name)


@functools.cache
def _property_model(head: str) -> TokenBinder:
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
    _randomise_head(model)
    return model


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    head=st.sampled_from(["symmetric", "listwise"]),
    cached=st.booleans(),
    bits=st.lists(st.integers(1, 2**T - 1), min_size=B * K, max_size=B * K),
    seed=st.integers(0, 2**16),
)
def test_padded_tokens_never_matter(head: str, cached: bool, bits: list[int], seed: int) -> None:
    """Property: for any frames mask (each candidate with a real frame), what the padded frames
    hold never changes a score, and they get no attention."""
    model = _property_model(head)
    indicators, cand_cls, cand_tokens = _inputs()
    mask = torch.tensor(
        [[(b >> t) & 1 == 1 for t in range(T)] for b in bits], dtype=torch.bool
    ).view(B, K, T)
    generator = torch.Generator().manual_seed(seed)
    other = torch.where(
        mask[..., None], cand_tokens, torch.randn(cand_tokens.shape, generator=generator) * 5
    )
    with torch.inference_mode():
        scores = []
        for tokens in (cand_tokens, other):
            if cached:
                scores.append(
                    model.focused_scores(
                        indicators, cand_cls, cand_kv=_kv_of(model, tokens, mask), frames_mask=mask
                    )
                )
            else:
                scores.append(model.focused_scores(indicators, cand_cls, tokens, frames_mask=mask))
    first, second = scores
    torch.testing.assert_close(first.final, second.final, atol=1e-6, rtol=1e-5)
    assert torch.equal(first.frame_attention[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(
        first.frame_attention.sum(dim=(1, 2)), torch.ones(B), atol=1e-5, rtol=1e-5
    )
