"""The search pipeline's LRU of encoded queries (issue 12): keyed by text and the text side's
model fingerprint, off at size 0, thread-safe, through ``TwoStageSearch`` with real models."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.model import TokenBinder, TokenBinderConfig
from tb_reranker.rerank import InProcessBackend, QueryCache, TwoStageSearch
from tb_reranker.rerank.backend import encode_texts, query_fingerprint


class CountingEncoder:
    """A deterministic text -> [m, D] encoder that records every batch it was asked for."""

    def __init__(self, m: int = 3, d: int = 8, salt: int = 0) -> None:
        self.m, self.d, self.salt = m, d, salt
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def row(self, text: str) -> np.ndarray:
        seed = (sum(text.encode()) * 7919 + len(text) + self.salt * 104729) % 2**32
        return np.random.default_rng(seed).standard_normal((self.m, self.d)).astype(np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock:
            self.calls.append(list(texts))
        return np.stack([self.row(t) for t in texts])


def test_hit_returns_identical_arrays_and_skips_the_encoder():
    cache, encoder = QueryCache(8), CountingEncoder()
    first = cache.encode(["a dog", "a cat"], "fp", encoder)
    second = cache.encode(["a cat", "a dog"], "fp", encoder)
    assert encoder.calls == [["a dog", "a cat"]]
    assert second.dtype == np.float32 and second.shape == (2, 3, 8)
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_array_equal(second[1], first[0])
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2


def test_returned_arrays_are_the_callers_to_modify():
    cache, encoder = QueryCache(8), CountingEncoder()
    out = cache.encode(["a dog"], "fp", encoder)
    out[:] = 0.0  # must not reach the cache
    np.testing.assert_array_equal(cache.encode(["a dog"], "fp", encoder)[0], encoder.row("a dog"))


def test_another_fingerprint_misses():
    cache, encoder_a, encoder_b = QueryCache(8), CountingEncoder(salt=1), CountingEncoder(salt=2)
    a = cache.encode(["a dog"], "model-a", encoder_a)
    b = cache.encode(["a dog"], "model-b", encoder_b)
    assert encoder_b.calls == [["a dog"]]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(b[0], encoder_b.row("a dog"))
    assert ("a dog", "model-a") in cache and ("a dog", "model-b") in cache


def test_size_zero_never_caches():
    cache, encoder = QueryCache(0), CountingEncoder()
    for _ in range(3):
        cache.encode(["a dog", "a dog"], "fp", encoder)
    assert encoder.calls == [["a dog", "a dog"]] * 3
    assert len(cache) == 0 and not cache.enabled


def test_eviction_drops_the_least_recently_used():
    cache, encoder = QueryCache(2), CountingEncoder()
    cache.encode(["a"], "fp", encoder)
    cache.encode(["b"], "fp", encoder)
    cache.encode(["a"], "fp", encoder)  # a is now the most recent
    cache.encode(["c"], "fp", encoder)  # evicts b
    assert ("a", "fp") in cache and ("c", "fp") in cache and ("b", "fp") not in cache
    encoder.calls.clear()
    cache.encode(["a", "b", "c"], "fp", encoder)
    assert encoder.calls == [["b"]]
    assert len(cache) == 2


def test_a_batch_encodes_each_missing_text_once():
    cache, encoder = QueryCache(8), CountingEncoder()
    cache.encode(["x"], "fp", encoder)
    out = cache.encode(["y", "x", "y", "z"], "fp", encoder)
    assert encoder.calls[-1] == ["y", "z"]
    np.testing.assert_array_equal(out[0], out[2])


@pytest.mark.parametrize("size", [-1, 1.5, True, "8"])
def test_bad_sizes_are_refused(size):
    with pytest.raises(InvalidInputError):
        QueryCache(size)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 4),
    calls=st.lists(
        st.tuples(
            st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4), st.sampled_from("pq")
        ),
        max_size=25,
    ),
)
def test_agrees_with_a_reference_lru(capacity, calls):
    cache = QueryCache(capacity)
    encoders = {"p": CountingEncoder(salt=1), "q": CountingEncoder(salt=2)}
    reference: OrderedDict[tuple[str, str], None] = OrderedDict()
    for texts, fingerprint in calls:
        encoder = encoders[fingerprint]
        before = len(encoder.calls)
        out = cache.encode(texts, fingerprint, encoder)
        np.testing.assert_array_equal(out, np.stack([encoder.row(t) for t in texts]))
        expected_missing = list(
            dict.fromkeys(t for t in texts if (t, fingerprint) not in reference)
        )
        if capacity == 0:
            assert encoder.calls[before:] == [texts]
            continue
        assert encoder.calls[before:] == ([expected_missing] if expected_missing else [])
        for text in dict.fromkeys(texts):  # a call uses each distinct text once, in order
            if (text, fingerprint) in reference:
                reference.move_to_end((text, fingerprint))
        for text in expected_missing:
            reference[(text, fingerprint)] = None
        while len(reference) > capacity:
            reference.popitem(last=False)
        assert [key for key in reference] == list(cache._entries)


def test_concurrent_searches_get_their_own_rows():
    cache, encoder = QueryCache(16), CountingEncoder()
    texts = [f"query {i}" for i in range(40)]
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                batch = list(rng.choice(texts, size=int(rng.integers(1, 5))))
                out = cache.encode(batch, "fp", encoder)
                np.testing.assert_array_equal(out, np.stack([encoder.row(t) for t in batch]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(cache) == 16
    stats = cache.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0


# ---------------------------------------------------------------------- through the pipeline
def _tiny(seed: int) -> TokenBinder:
    """A tiny model; another ``seed`` gives other text-side weights (another checkpoint)."""
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.text.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


class _Reranker:
    """What ``InProcessBackend`` reads of a ``Reranker`` for encoding: its model."""

    def __init__(self, model: TokenBinder) -> None:
        self.model = model


def _pipeline(model: TokenBinder, cache: QueryCache) -> TwoStageSearch:
    # encoding never touches the index: none is needed for these tests
    return TwoStageSearch(None, InProcessBackend(_Reranker(model)), query_cache=cache)  # type: ignore[arg-type]


def test_pipeline_hit_equals_the_encoder_and_skips_it(monkeypatch):
    model, cache = _tiny(0), QueryCache(4)
    pipeline = _pipeline(model, cache)
    texts = ["a red square", "a dog runs"]
    first = pipeline.encode(texts)
    np.testing.assert_array_equal(first, encode_texts(model, texts))
    monkeypatch.setattr(model, "encode_text", lambda *_: pytest.fail("encoded a cached text"))
    np.testing.assert_array_equal(pipeline.encode(texts[::-1]), first[::-1])


def test_pipeline_of_another_checkpoint_misses():
    model_a, model_b, cache = _tiny(0), _tiny(1), QueryCache(4)
    assert query_fingerprint(model_a) != query_fingerprint(model_b)
    a = _pipeline(model_a, cache).encode(["a red square"])
    b = _pipeline(model_b, cache).encode(["a red square"])
    np.testing.assert_array_equal(b, encode_texts(model_b, ["a red square"]))
    assert not np.allclose(a, b)


def test_pipeline_misses_after_the_weights_change_in_place():
    model, cache = _tiny(0), QueryCache(4)
    pipeline = _pipeline(model, cache)
    before = pipeline.encode(["a red square"])
    with torch.no_grad():
        model.text.indicators.add_(0.5)  # the learned query indicators, in place
    after = pipeline.encode(["a red square"])
    np.testing.assert_array_equal(after, encode_texts(model, ["a red square"]))
    assert not np.allclose(before, after)


def test_pipeline_without_a_cache_or_size_zero_always_encodes(monkeypatch):
    model = _tiny(0)
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: calls.append(texts) or original(texts))
    for cache in (None, QueryCache(0)):
        pipeline = TwoStageSearch(None, InProcessBackend(_Reranker(model)), query_cache=cache)  # type: ignore[arg-type]
        pipeline.encode(["a"])
        pipeline.encode(["a"])
    assert len(calls) == 4
