"""The reranking pipeline over a real LMDB frame store and a tiny TokenBinder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.model import TokenBinder, TokenBinderConfig
from tb_reranker.rerank import Reranker
from tb_reranker.stores import FrameRecord, open_store


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TokenBinder(TokenBinderConfig.tiny()).eval()


@pytest.fixture(scope="module")
def trained_like(model):
    """A copy whose fusion weights are non-zero, so Δ ≠ 0 (as after training)."""
    other = TokenBinder(model.config).eval()
    other.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in other.fusion.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return other


def _records(model, n, seed=0, content_hash="h0"):
    rng = np.random.default_rng(seed)
    t, d = model.num_frames, model.embed_dim
    return {
        f"vid{i:03d}": FrameRecord(
            tokens=rng.standard_normal((t, d)).astype(np.float16),
            timestamps=(np.arange(t, dtype=np.float32) * 0.5 + 0.25),
            content_hash=content_hash,
        )
        for i in range(n)
    }


@pytest.fixture()
def store(tmp_path, model):
    store = open_store(str(tmp_path / "frames"))
    store.put_many(_records(model, 40))
    yield store
    store.close()


def test_untrained_model_keeps_broad_order(model, store):
    reranker = Reranker(model, store)
    indicators = reranker.encode(["a red circle then a blue square"])
    ids = [f"vid{i:03d}" for i in range(12)]
    broad = [float(x) for x in np.linspace(0.9, 0.1, 12)]
    (result,) = reranker.rerank(indicators, [ids], [broad])
    assert [c.id for c in result.candidates] == ids
    assert all(c.delta == 0.0 for c in result.candidates)
    assert [c.reranked for c in result.candidates] == [True] * model.top_k + [False] * (
        12 - model.top_k
    )


def test_matches_direct_fusion_and_reorders(trained_like, store):
    reranker = Reranker(trained_like, store)
    indicators = reranker.encode(["a green star then a red square"])
    ids = [f"vid{i:03d}" for i in range(trained_like.top_k)]
    broad = [float(x) for x in np.linspace(0.5, 0.4, len(ids))]
    (result,) = reranker.rerank(indicators, [ids], [broad])
    records = store.get_many(ids)
    tokens = torch.stack([torch.from_numpy(records[i].tokens.astype(np.float32)) for i in ids])
    cls = torch.nn.functional.normalize(tokens.mean(1), dim=-1)
    with torch.inference_mode():
        direct = trained_like.focused_scores(torch.from_numpy(indicators), cls[None], tokens[None])
    by_id = {c.id: c for c in result.candidates}
    for k, video_id in enumerate(ids):
        assert by_id[video_id].delta == pytest.approx(float(direct.delta[0, k]), abs=1e-5)
        assert by_id[video_id].index == k
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert [c.id for c in result.candidates] != ids  # Δ ≠ 0 changes the order here
    stamps = set((np.arange(trained_like.num_frames) * 0.5 + 0.25).tolist())
    assert all(c.best_frame_s in stamps for c in result.candidates)


def test_batch_equals_one_by_one(trained_like, store):
    reranker = Reranker(trained_like, store, cache_size=0)
    indicators = reranker.encode(
        ["a red circle then a blue square", "a blue square then a red circle"]
    )
    lists = [[f"vid{i:03d}" for i in range(0, 10)], [f"vid{i:03d}" for i in range(5, 12)]]
    together = reranker.rerank(indicators, lists)
    for q in range(2):
        (alone,) = reranker.rerank(indicators[q : q + 1], [lists[q]])
        assert [c.id for c in alone.candidates] == [c.id for c in together[q].candidates]
        for a, b in zip(alone.candidates, together[q].candidates, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_missing_ids_reported_or_strict(model, store):
    reranker = Reranker(model, store)
    indicators = reranker.encode(["a red circle"])
    (result,) = reranker.rerank(indicators, [["vid001", "ghost", "vid002"]])
    assert result.missing_ids == ["ghost"]
    assert {c.id for c in result.candidates} == {"vid001", "vid002"}
    with pytest.raises(NotFoundError, match="ghost"):
        reranker.rerank(indicators, [["vid001", "ghost"]], strict=True)


def test_cache_hits_and_content_hash_invalidation(trained_like, tmp_path):
    store = open_store(str(tmp_path / "frames"))
    store.put_many(_records(trained_like, 10, seed=0, content_hash="old"))
    reranker = Reranker(trained_like, store)
    indicators = reranker.encode(["a red circle"])
    ids = [f"vid{i:03d}" for i in range(10)]
    (first,) = reranker.rerank(indicators, [ids])
    (again,) = reranker.rerank(indicators, [ids])
    assert reranker.cache.hits >= 10 and [c.score for c in first.candidates] == [
        c.score for c in again.candidates
    ]
    store.put_many(_records(trained_like, 10, seed=5, content_hash="new"))
    (stale,) = reranker.rerank(indicators, [ids], contents_hashes=[["old"] * 10])
    (fresh,) = reranker.rerank(indicators, [ids], contents_hashes=[["new"] * 10])
    assert [c.score for c in stale.candidates] == [c.score for c in first.candidates]
    assert [c.score for c in fresh.candidates] != [c.score for c in first.candidates]
    reranker.invalidate()
    assert len(reranker.cache) == 0
    store.close()


@pytest.mark.parametrize(
    ("indicators_shape", "ids", "scores", "match"),
    [
        ((1, 4, 64), [[]], None, "no candidates"),
        ((1, 4, 64), [["vid001", "vid001"]], None, "duplicate"),
        ((1, 4, 64), [["vid001"]], [[float("nan")]], "NaN"),
        ((1, 4, 64), [["vid001", "vid002"]], [[0.1]], "broad scores"),
        ((1, 3, 64), [["vid001"]], None, "shape"),
        ((1, 4, 32), [["vid001"]], None, "shape"),
        ((2, 4, 64), [["vid001"]], None, "candidate lists"),
    ],
)
def test_bad_inputs_are_typed(model, store, indicators_shape, ids, scores, match):
    reranker = Reranker(model, store)
    indicators = np.ones(indicators_shape, dtype=np.float32)
    with pytest.raises(InvalidInputError, match=match):
        reranker.rerank(indicators, ids, scores)


def test_bad_texts_are_typed(model, store):
    reranker = Reranker(model, store)
    for texts in ([], [""], ["  "], "just a string", ["x" * 5000]):
        with pytest.raises(InvalidInputError):
            reranker.encode(texts)
    with pytest.raises(InvalidInputError, match="top_n"):
        reranker.rerank(reranker.encode(["a"]), [["vid001"]], top_n=0)


def _ranking(results):
    return [[(c.id, round(c.score, 5), c.best_frame_s) for c in r.candidates] for r in results]


def test_small_cache_evicts_and_matches_uncached(trained_like, store):
    """A cache smaller than one request (eviction mid-call, partial hits) changes no score."""
    reference = Reranker(trained_like, store, cache_size=0)
    small = Reranker(trained_like, store, cache_size=3)
    large = Reranker(trained_like, store, cache_size=64)
    rng = np.random.default_rng(3)
    indicators = rng.standard_normal((3, 4, 64)).astype(np.float32)
    for _ in range(4):
        lists = [
            [f"vid{i:03d}" for i in rng.choice(20, size, replace=False)] for size in (10, 4, 7)
        ]
        expected = _ranking(reference.rerank(indicators, lists))
        assert _ranking(small.rerank(indicators, lists)) == expected
        assert _ranking(large.rerank(indicators, lists)) == expected
        assert _ranking(large.rerank(indicators, lists)) == expected  # all hits
        assert len(small.cache) <= 3
    assert large.cache.hits > 0 and small.cache.misses > 0
    large.invalidate(["vid000", "vid001"])
    assert "vid000" not in large.cache._slots and len(large.cache) > 0


def test_concurrent_reranks_match_serial(trained_like, store):
    """The gRPC server and the micro-batcher call rerank from several threads at once."""
    import threading

    reranker = Reranker(trained_like, store, cache_size=8)  # forces evictions under contention
    rng = np.random.default_rng(4)
    requests = []
    for _ in range(6):
        indicators = rng.standard_normal((2, 4, 64)).astype(np.float32)
        lists = [[f"vid{i:03d}" for i in rng.choice(30, 10, replace=False)] for _ in range(2)]
        requests.append((indicators, lists))
    serial = Reranker(trained_like, store, cache_size=0)
    expected = [_ranking(serial.rerank(*request)) for request in requests]
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(3):
                got[n] = _ranking(reranker.rerank(*requests[n]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert [got[n] for n in range(len(requests))] == expected


def _short_videos(model, n, real, seed=3):
    """n short videos of ``real`` frames as records: unpadded ([real, D], no mask) and padded to
    the model's T as the decoder pads them (last frame repeated, mask False on the repeats)."""
    rng = np.random.default_rng(seed)
    t, d = model.num_frames, model.embed_dim
    unpadded, padded = {}, {}
    for i in range(n):
        tokens = rng.standard_normal((real, d)).astype(np.float16)
        times = np.arange(real, dtype=np.float32) * 0.5 + 0.25
        repeat = np.r_[np.arange(real), [real - 1] * (t - real)]
        unpadded[f"vid{i:03d}"] = FrameRecord(tokens=tokens, timestamps=times, content_hash="h")
        padded[f"vid{i:03d}"] = FrameRecord(
            tokens=tokens[repeat],
            timestamps=times[repeat],
            content_hash="h",
            mask=np.arange(t) < real,
        )
    return unpadded, padded


@pytest.mark.parametrize("cache_kv", [False, True], ids=["kv-free", "kv-cache"])
@pytest.mark.parametrize("head", ["symmetric", "listwise", "listwise_slots"])
def test_padded_records_rerank_like_their_unpadded_originals(head, cache_kv, tmp_path):
    """Issue 13 §2 in serving: stored short videos padded to T with a mask rerank exactly as
    the same videos stored unpadded (Δ, order, best frame), cold (store -> projection) and warm
    (K/V cache), with given and with computed broad scores; old records without a mask are all
    real."""
    model = TokenBinder(TokenBinderConfig.tiny(head=head)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.fusion.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    unpadded, padded = _short_videos(model, 12, real=3)
    results = {}
    for name, records in (("unpadded", unpadded), ("padded", padded)):
        store = open_store(str(tmp_path / name))
        store.put_many(records)
        reranker = Reranker(model, store, cache_kv=cache_kv)
        indicators = reranker.encode(["a red circle then a blue square", "a green star"])
        ids = [list(records)[:10], list(records)[2:12]]
        broad = [[float(x) for x in np.linspace(0.5, 0.45, 10)], None]
        cold = reranker.rerank(indicators, ids, broad)
        warm = reranker.rerank(indicators, ids, broad)
        assert reranker.cache.hits == 12  # the second call read every video from the cache
        results[name] = (cold, warm)
        store.close()
    expected = results["unpadded"][0]
    assert any(abs(c.delta) > 1e-3 for c in expected[0].candidates)
    for got in results["padded"]:
        for want, have in zip(expected, got, strict=True):
            assert [c.id for c in have.candidates] == [c.id for c in want.candidates]
            for a, b in zip(want.candidates, have.candidates, strict=True):
                # float32 rounding of differently shaped products: relative for the larger
                # deltas of the listwise_slots head (|Δ| ≈ 3.6 differed by 1.07e-5 on one CPU)
                assert b.delta == pytest.approx(a.delta, rel=1e-5, abs=1e-5)
                assert b.broad_score == pytest.approx(a.broad_score, abs=1e-5)
                assert b.best_frame_s == a.best_frame_s
