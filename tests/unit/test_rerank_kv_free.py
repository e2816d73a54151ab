"""Issue 12: the ``Reranker`` fuses K/V-free (frame tokens in the cache, never projected) by
default; its scores equal the projected-K/V path (``cache_kv=True``, the path before) for cold,
warm and mixed batches, with padding, over a real LMDB store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tb_reranker.model import TokenBinder, TokenBinderConfig
from tb_reranker.rerank import Reranker
from tb_reranker.stores import FrameRecord, open_store


def _model(**overrides) -> TokenBinder:
    model = TokenBinder(TokenBinderConfig.tiny(**overrides)).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero fusion weights, as after training: Δ ≠ 0
        for param in model.fusion.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model


@pytest.fixture(
    scope="module", params=["symmetric", "listwise", "listwise_slots", "two_blocks_rank"]
)
def model(request):
    if request.param == "two_blocks_rank":
        return _model(fusion_blocks=2, rank_embedding=True)
    return _model(head=request.param)


@pytest.fixture()
def store(tmp_path, model):
    rng = np.random.default_rng(0)
    t, d = model.num_frames, model.embed_dim
    store = open_store(str(tmp_path / "frames"))
    store.put_many(
        {
            f"vid{i:03d}": FrameRecord(
                tokens=rng.standard_normal((t, d)).astype(np.float16),
                timestamps=np.arange(t, dtype=np.float32) * 0.5 + 0.25,
                content_hash=f"h{i}",
            )
            for i in range(40)
        }
    )
    yield store
    store.close()


def _request(model, rng, sizes):
    """Indicators [B, m, D] and per query ``size`` ids (with broad scores)."""
    indicators = rng.standard_normal((len(sizes), model.num_indicators, model.embed_dim))
    indicators /= np.linalg.norm(indicators, axis=-1, keepdims=True)
    ids = [[f"vid{i:03d}" for i in rng.choice(40, size, replace=False)] for size in sizes]
    scores = [sorted(rng.uniform(0.1, 0.5, size).tolist(), reverse=True) for size in sizes]
    return indicators.astype(np.float32), ids, scores


def _assert_same(results, reference):
    assert len(results) == len(reference)
    for got, want in zip(results, reference, strict=True):
        want_by_id = {c.id: c for c in want.candidates}
        assert [c.id for c in got.candidates] == [c.id for c in want.candidates] or all(
            abs(a.score - b.score) < 1e-5
            for a, b in zip(got.candidates, want.candidates, strict=True)
        )
        for c in got.candidates:
            w = want_by_id[c.id]
            assert c.delta == pytest.approx(w.delta, abs=5e-5, rel=1e-5)
            assert c.score == pytest.approx(w.score, abs=5e-5, rel=1e-5)
            assert c.reranked == w.reranked
            assert c.best_frame_s == w.best_frame_s
        assert got.missing_ids == want.missing_ids


def _never_project(model, monkeypatch):
    monkeypatch.setattr(
        model, "project_candidates", lambda *_: pytest.fail("the K/V-free path projected K/V")
    )


@pytest.mark.parametrize("sizes", [[10], [10, 10, 10], [3, 10, 7, 1], [12, 4]])
def test_cold_batches_equal_the_projected_path(model, store, monkeypatch, sizes):
    rng = np.random.default_rng(len(sizes))
    request = _request(model, rng, sizes)
    reference = Reranker(model, store, cache_kv=True).rerank(*request)
    kv_free = Reranker(model, store)
    _never_project(model, monkeypatch)
    _assert_same(kv_free.rerank(*request), reference)
    assert kv_free.cache.misses > 0 and kv_free.cache.hits == 0


def test_warm_and_mixed_batches_equal_the_projected_path(model, store, monkeypatch):
    rng = np.random.default_rng(7)
    kv_free, projected = Reranker(model, store), Reranker(model, store, cache_kv=True)
    warmup = _request(model, rng, [10, 10])
    _assert_same(kv_free.rerank(*warmup), projected.rerank(*warmup))
    cached = {i for row in warmup[1] for i in row}
    _never_project(model, monkeypatch)
    warm = (rng.standard_normal((2, model.num_indicators, model.embed_dim)).astype(np.float32),)
    warm += (warmup[1], warmup[2])
    hits = kv_free.cache.hits
    warm_results = kv_free.rerank(*warm)
    assert kv_free.cache.hits - hits == len(cached)  # every candidate from the cache
    monkeypatch.undo()
    _assert_same(warm_results, Reranker(model, store, cache_kv=True).rerank(*warm))
    mixed = _request(model, rng, [10, 6, 10])
    mixed_ids = {i for row in mixed[1] for i in row}
    assert mixed_ids & cached and mixed_ids - cached, "the batch must mix warm and cold ids"
    _assert_same(kv_free.rerank(*mixed), projected.rerank(*mixed))
    _assert_same(kv_free.rerank(*mixed), Reranker(model, store, cache_kv=True).rerank(*mixed))


def test_uncached_and_tiny_cache_equal_the_projected_path(model, store):
    rng = np.random.default_rng(11)
    reference = Reranker(model, store, cache_kv=True, cache_size=0)
    for cache_size in (0, 3):
        reranker = Reranker(model, store, cache_size=cache_size)
        for _ in range(3):  # evictions in between
            request = _request(model, rng, [10, 8])
            _assert_same(reranker.rerank(*request), reference.rerank(*request))


def test_the_cache_holds_tokens_by_default(model, store):
    kv_free, projected = Reranker(model, store), Reranker(model, store, cache_kv=True)
    request = _request(model, np.random.default_rng(3), [10])
    kv_free.rerank(*request)
    projected.rerank(*request)
    assert kv_free.cache.kv is not None and projected.cache.kv is not None
    assert kv_free.cache.kv.shape[:2] == (1, 1)  # tokens: half the bytes of one K/V block
    assert projected.cache.kv.shape[:2] == (model.fusion.num_blocks, 2)


@pytest.mark.parametrize("cache_kv", [False, True])
def test_stored_tokens_the_model_cannot_take_are_a_typed_error(model, tmp_path, cache_kv):
    """A record with more frames than the model's T is refused with ``InvalidInputError``
    naming the frames, on both paths (the K/V-free one gave a torch IndexError)."""
    from tb_reranker.errors import InvalidInputError

    t = model.num_frames + 3
    store = open_store(str(tmp_path / "bad"))
    store.put_many(
        {
            "long": FrameRecord(
                tokens=np.ones((t, model.embed_dim), dtype=np.float16),
                timestamps=np.arange(t, dtype=np.float32),
                content_hash="h",
            )
        }
    )
    try:
        reranker = Reranker(model, store, cache_kv=cache_kv)
        indicators = np.ones((1, model.num_indicators, model.embed_dim), dtype=np.float32)
        with pytest.raises(InvalidInputError, match="frames"):
            reranker.rerank(indicators, [["long"]], [[0.5]])
    finally:
        store.close()
