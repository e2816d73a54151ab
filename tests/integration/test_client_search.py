"""`Client` end to end on Milvus Lite and a real Milvus server: ingest real MP4s, search, rerank."""

from __future__ import annotations

import time

import pytest
import torch

from tb_reranker import Client
from tb_reranker.errors import InvalidInputError, NotFoundError
from tb_reranker.model import TokenBinder, TokenBinderConfig

COLOURS = ("red", "green", "blue", "yellow", "white", "purple")


@pytest.fixture(scope="module")
def model():
    """A tiny model whose fusion weights are non-zero (as after training), so Δ ≠ 0."""
    torch.manual_seed(0)
    model = TokenBinder(TokenBinderConfig.tiny()).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.fusion.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def videos(tmp_path_factory, mp4_writer):
    folder = tmp_path_factory.mktemp("client_videos")
    paths = []
    for i in range(14):
        colour = mp4_writer.colours[i % len(mp4_writer.colours)]
        paths.append(mp4_writer(folder / f"clip{i:02d}.mp4", colour, frames=8 + i, fps=8))
    return paths


def _client(uri, collection, tmp_path, model):
    return Client(
        uri,
        collection=collection,
        store=str(tmp_path / "frames"),
        model=model,
        data_dir=str(tmp_path),
    )


def _ingest(client, videos) -> None:
    report = client.ingest(videos, progress=False)
    assert report.ingested == len(videos) and not report.failed
    client.index.flush()
    client.index.wait_until_indexed()


@pytest.fixture
def fresh_client(milvus_uri, unique_collection, tmp_path, model, videos):
    """A Client on a collection and store of its own, just ingested: for a test that writes."""
    with _client(milvus_uri, unique_collection, tmp_path, model) as client:
        _ingest(client, videos)
        yield client


@pytest.fixture(scope="module", params=["lite", pytest.param("server", marks=pytest.mark.server)])
def ingested(request, tmp_path_factory, model, videos):
    """The videos ingested once per backend and module: (uri, collection, data dir), shared by
    the tests that only read (ingesting per test cost ~7 s each on the server)."""
    uri = str(request.getfixturevalue(f"milvus_{request.param}_uri"))
    root = tmp_path_factory.mktemp(f"client_{request.param}")
    collection = f"t_client_reads_{request.param}"
    with _client(uri, collection, root, model) as client:
        _ingest(client, videos)
    yield uri, collection, root
    with _client(uri, collection, root, model) as client:
        client.index.drop()


@pytest.fixture
def client(ingested, model):
    """A Client of its own (its own query cache) on the module's ingested collection and store:
    for a test that only reads."""
    uri, collection, root = ingested
    with _client(uri, collection, root, model) as client:
        yield client


QUERIES = [f"a {c} square moving" for c in COLOURS]


def test_search_returns_complete_reranked_hits(client):
    hits = client.search(QUERIES[0], limit=12)
    assert len(hits) == 12
    assert [h.rank for h in hits] == list(range(1, 13))
    scores = [h.score for h in hits[: client.model.top_k]]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:
        assert hit.id.startswith("clip")
        assert hit.metadata["uri"].endswith(f"{hit.id}.mp4")
        if hit.reranked:
            assert hit.score == pytest.approx(hit.broad_score + hit.delta, abs=1e-5)
            assert hit.best_frame_s is not None and 0.0 <= hit.best_frame_s <= 3.0
        else:
            assert hit.delta == 0.0 and hit.rank > client.model.top_k
    broad = client.search(QUERIES[0], limit=12, rerank=False)
    assert all(not h.reranked and h.delta == 0.0 for h in broad)
    assert {h.id for h in broad[:10]} == {h.id for h in hits[:10]}  # same top-K, new order


def test_rerank_changes_the_order_where_the_model_says_so(client):
    moved = 0
    for query in QUERIES:
        hits = client.search(query, limit=10)
        moved += sum(1 for h in hits if h.rank != h.broad_rank)
    assert moved > 0


def test_batch_search_equals_single_searches(client):
    together = client.search_many(QUERIES[:3], limit=5)
    for query, hits in zip(QUERIES[:3], together, strict=True):
        alone = client.search(query, limit=5)
        assert [h.id for h in alone] == [h.id for h in hits]
        for a, b in zip(alone, hits, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_filter_passes_through(client):
    hits = client.search(QUERIES[1], limit=14, filter='num_frames >= 8 and id like "clip1%"')
    assert hits and all(h.id.startswith("clip1") for h in hits)


def test_delete_removes_from_results(fresh_client):
    client = fresh_client
    victim = client.search(QUERIES[2], limit=1)[0].id
    assert client.delete([victim]) == 1
    # searches read at Bounded consistency: the delete shows within the staleness bound
    deadline = time.monotonic() + 15.0
    while victim in {h.id for h in client.search(QUERIES[2], limit=14)}:
        assert time.monotonic() < deadline, f"{victim} still returned 15 s after its delete"
        time.sleep(0.5)
    assert client.check().ok
    assert not client.store.contains(victim)


@pytest.mark.parametrize("limit", [0, -1, 10**6, 2.5, True])
def test_bad_limits(client, limit):
    with pytest.raises(InvalidInputError):
        client.search(QUERIES[0], limit=limit)


@pytest.mark.parametrize("text", ["", "   ", None, ["a list"]])
def test_bad_queries(client, text):
    with pytest.raises(InvalidInputError):
        client.search(text)


def test_unknown_collection(milvus_lite_uri, tmp_path, model):
    with (
        _client(milvus_lite_uri, "never_created", tmp_path, model) as client,
        pytest.raises(NotFoundError),
    ):
        client.search("a red square")


def test_lite_and_server_agree(milvus_lite_uri, milvus_server_uri, tmp_path, model, videos):
    results = []
    for name, uri in (("lite", milvus_lite_uri), ("server", milvus_server_uri)):
        collection = f"agree_{name}_{tmp_path.name[-8:]}".replace("-", "_")
        with _client(uri, collection, tmp_path / name, model) as client:
            client.ingest(videos, progress=False)
            client.index.flush()
            client.index.wait_until_indexed()
            results.append(client.search_many(QUERIES, limit=8))
            client.index.drop()
    for lite_hits, server_hits in zip(*results, strict=True):
        assert [h.id for h in lite_hits] == [h.id for h in server_hits]
        for a, b in zip(lite_hits, server_hits, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_repeated_query_is_served_from_the_query_cache(client, monkeypatch):
    """Issue 12: a repeated text skips the text tower and gives the same hits."""
    first = client.search(QUERIES[1], limit=8)
    assert client.query_cache.stats()["misses"] == 1
    monkeypatch.setattr(client.model, "encode_text", lambda *_: pytest.fail("re-encoded"))
    again = client.search(QUERIES[1], limit=8)
    assert client.query_cache.stats()["hits"] == 1
    assert [(h.id, h.score) for h in again] == [(h.id, h.score) for h in first]


def test_query_cache_size_is_a_client_option(tmp_path, model, monkeypatch):
    monkeypatch.setenv("TB_QUERY_CACHE_SIZE", "7")
    assert _client(str(tmp_path / "m.db"), "c", tmp_path, model).query_cache.capacity == 7
    off = Client(str(tmp_path / "m.db"), model=model, data_dir=str(tmp_path), query_cache_size=0)
    assert not off.query_cache.enabled
    with pytest.raises(InvalidInputError):
        Client(str(tmp_path / "m.db"), model=model, data_dir=str(tmp_path), query_cache_size=-1)
