"""``RemoteReranker`` / ``AsyncRemoteReranker`` against a real sidecar: same results as in-process."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.errors import (
    AuthenticationError,
    IndexBackendError,
    InvalidInputError,
    NotFoundError,
    RerankerUnavailableError,
)
from tb_reranker.remote import AsyncRemoteReranker, RemoteReranker
from tb_reranker.rerank import InProcessBackend, RerankResult, TwoStageSearch
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.engine import Components
from tb_reranker.server.testing import ServerThread, build_tiny_components
from tb_reranker.types import Hit

TEXTS = ["a dog runs on the beach", "a red car at night"]


def _index_videos(uri: str, collection: str, components: Components, videos_ids, **kwargs):
    from tb_reranker.index import VideoIndex

    reranker = components.reranker
    index = VideoIndex(
        uri,
        collection=collection,
        dim=64,
        fingerprint=reranker.model.vision_fingerprint(),
        **kwargs,
    )
    index.create()
    records = reranker.store.get_many(videos_ids)
    index.upsert(
        {
            "id": video_id,
            "cls": records[video_id].video_cls(),
            "uri": f"file:///videos/{video_id}.mp4",
            "duration_s": float(n % 7),
            "num_frames": records[video_id].num_frames,
            "content_hash": records[video_id].content_hash,
            "genre": "even" if n % 2 == 0 else "odd",
        }
        for n, video_id in enumerate(videos_ids)
    )
    return index


@pytest.fixture(scope="module")
def setup(tmp_path_factory, milvus_lite_uri):
    components, videos_ids = build_tiny_components(tmp_path_factory.mktemp("remote"), num_videos=30)
    components.index = _index_videos(
        milvus_lite_uri, f"t_remote_{os.getpid()}", components, videos_ids
    )
    config = ServerConfig(port=0, max_candidates=64)
    with ServerThread(config, lambda: components) as running:
        yield running, components, videos_ids
    components.index.drop()


# Scores agree to float32 rounding only: the server may fuse concurrent queries into another
# batch size than the in-process call, and batched kernels round differently.
TOL = 1e-5


def _same(remote: list[RerankResult], local: list[RerankResult]) -> None:
    assert len(remote) == len(local)
    for r, loc in zip(remote, local, strict=True):
        assert [(c.id, c.index, c.reranked, c.best_frame_s) for c in r.candidates] == [
            (c.id, c.index, c.reranked, c.best_frame_s) for c in loc.candidates
        ]
        for a, b in zip(r.candidates, loc.candidates, strict=True):
            assert a.score == pytest.approx(b.score, abs=TOL)
            assert a.broad_score == pytest.approx(b.broad_score, abs=TOL)
            assert a.delta == pytest.approx(b.delta, abs=TOL)
        assert r.missing_ids == loc.missing_ids
        assert r.timings["total_ns"] > 0 and r.timings["batch_size"] >= 1


def _same_hits(remote: list[list[Hit]], local: list[list[Hit]]) -> None:
    assert len(remote) == len(local)
    for rs, ls in zip(remote, local, strict=True):
        assert [(h.id, h.rank, h.broad_rank, h.reranked, h.metadata) for h in rs] == [
            (h.id, h.rank, h.broad_rank, h.reranked, h.metadata) for h in ls
        ]
        for a, b in zip(rs, ls, strict=True):
            assert a.score == pytest.approx(b.score, abs=TOL)
            assert a.broad_score == pytest.approx(b.broad_score, abs=TOL)


def _local_search(components: Components, queries, **options) -> list[list[Hit]]:
    """The in-process two-stage search over the test collection."""
    backend = InProcessBackend(components.reranker)
    return TwoStageSearch(components.index, backend).search(queries, **options)


def test_remote_equals_in_process(setup):
    running, components, ids = setup
    local = components.reranker
    with RemoteReranker(running.target, timeout=30) as remote:
        indicators = remote.encode(TEXTS)
        np.testing.assert_allclose(indicators, local.encode(TEXTS), atol=1e-5)
        assert remote.embed_dim == 64 and remote.num_indicators == 4 and remote.top_k == 10
        assert remote.fingerprint == local.model.fingerprint()

        candidates = [ids[:12], [*ids[10:20], "ghost"]]
        broad = [list(np.linspace(0.8, 0.2, 12)), list(np.linspace(0.7, 0.1, 11))]
        _same(
            remote.rerank(indicators, candidates, broad),
            local.rerank(indicators, candidates, broad),
        )
        _same(  # broad scores computed from the store, top_n
            remote.rerank(indicators, candidates, top_n=4),
            local.rerank(indicators, candidates, top_n=4),
        )
        with pytest.raises(NotFoundError, match="ghost"):
            remote.rerank(indicators[1:], [candidates[1]], strict=True)

        remote_hits = remote.search(TEXTS, limit=12)
        local_hits = _local_search(components, TEXTS, limit=12)
        _same_hits(remote_hits, local_hits)
        assert remote_hits[0][0].metadata["genre"] in ("even", "odd")
        assert any(h.rank != h.broad_rank for h in remote_hits[0])  # reranking moved something
        # filter and no rerank
        filtered = remote.search([TEXTS[0]], limit=5, rerank=False, filter='genre == "even"')
        _same_hits(
            filtered,
            _local_search(components, [TEXTS[0]], limit=5, rerank=False, filter='genre == "even"'),
        )
        assert filtered[0] and all(h.metadata["genre"] == "even" for h in filtered[0])
        by_indicators = remote.search(indicators[:1], limit=5)
        assert [h.id for h in by_indicators[0]] == [h.id for h in local_hits[0][:5]]

        remote.invalidate([ids[0]])
        remote.invalidate()
        assert int(remote.info()["cache"]["size"]) == 0


def test_remote_errors_are_typed(setup, tiny_unused_port):
    running, components, ids = setup
    with RemoteReranker(running.target, timeout=30) as remote:
        with pytest.raises(InvalidInputError, match="no candidate"):
            remote.rerank(np.zeros((1, 4, 64), np.float32), [[]])
        with pytest.raises(InvalidInputError, match="shape"):
            remote.rerank(np.ones((1, 4, 32), np.float32), [ids[:3]])
        with pytest.raises(InvalidInputError, match="empty"):
            remote.encode([""])
    # nothing listens: UNAVAILABLE is retried with backoff, then RerankerUnavailableError
    with RemoteReranker(f"127.0.0.1:{tiny_unused_port}", timeout=2, retries=2) as remote:
        started = time.monotonic()
        with pytest.raises(RerankerUnavailableError, match="unavailable"):
            remote.encode(["a dog"])
        assert time.monotonic() - started < 10


def test_remote_auth(setup):
    _, components, ids = setup
    config = ServerConfig(port=0, token="tok-123")
    with ServerThread(config, lambda: components) as running:
        with (
            RemoteReranker(running.target, timeout=10) as remote,
            pytest.raises(AuthenticationError),
        ):
            remote.encode(["a dog"])
        with RemoteReranker(running.target, token="tok-123", timeout=10) as remote:
            assert remote.encode(["a dog"]).shape == (1, 4, 64)


def test_async_remote(setup):
    running, components, ids = setup
    local = components.reranker

    async def main():
        async with AsyncRemoteReranker(running.target, timeout=30) as remote:
            indicators = await remote.encode(TEXTS)
            results = await remote.rerank(indicators, [ids[:10], ids[5:15]])
            hits = await remote.search(TEXTS[:1], limit=6)
            info = await remote.info()
            with pytest.raises(InvalidInputError):
                await remote.rerank(indicators[:1], [[ids[0], ids[0]]])
            return indicators, results, hits, info

    indicators, results, hits, info = asyncio.run(main())
    _same(results, local.rerank(indicators, [ids[:10], ids[5:15]]))
    _same_hits(hits, _local_search(components, TEXTS[:1], limit=6))
    assert info["embed_dim"] == 64


@pytest.fixture
def tiny_unused_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.server
def test_milvus_stopped_search_unavailable_rerank_keeps_serving(tmp_path):
    from milvus_setup.launcher import LocalMilvus

    components, ids = build_tiny_components(tmp_path / "tiny", num_videos=12)
    milvus = LocalMilvus(tmp_path / "milvus")
    try:
        milvus.start()
    except Exception as exc:  # noqa: BLE001
        milvus.stop()
        pytest.skip(f"local Milvus server did not start: {exc}")
    try:
        from tb_reranker.index import VideoIndex

        setup = _index_videos(milvus.uri, "t_remote_fault", components, ids, timeout=60)
        setup.wait_until_indexed(120)
        # the server's own connection fails fast once Milvus is gone
        components.index = VideoIndex(milvus.uri, collection="t_remote_fault", timeout=5)
        with (
            ServerThread(ServerConfig(port=0), lambda: components) as running,
            grpc.insecure_channel(running.target) as ch,
        ):
            health = health_pb2_grpc.HealthStub(ch)
            search = pb_grpc.SearchServiceStub(ch)
            request = health_pb2.HealthCheckRequest(service="tb_reranker.v1.SearchService")
            assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            assert (
                len(
                    search.Search(
                        pb.SearchRequest(text="a dog", limit=5, rerank=True), timeout=30
                    ).hits
                )
                == 5
            )

            milvus.stop()
            with pytest.raises(grpc.RpcError) as info:
                search.Search(pb.SearchRequest(text="a dog", limit=5), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Milvus" in info.value.details()
            assert (
                health.Check(request, timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            with RemoteReranker(running.target, timeout=30, retries=0) as remote:
                with pytest.raises(IndexBackendError):
                    remote.search(["a dog"], limit=3)
                # Encode/Rerank do not need Milvus
                assert len(remote.rerank(remote.encode(["a dog"]), [ids[:5]])[0].candidates) == 5
    finally:
        milvus.stop()


def test_sdk_client_remote_modes(setup, milvus_lite_uri, tmp_path):
    """``Client(reranker="host:port")``: one hop (sidecar does everything) and two hops (local
    encode + Milvus, remote rerank) both give the in-process answer."""
    from tb_reranker.client import Client

    running, components, ids = setup
    expected = _local_search(components, [TEXTS[0]], limit=8)[0]
    one_hop = Client(reranker=running.target, checkpoint=str(tmp_path / "no-checkpoint"))
    two_hops = Client(
        uri=milvus_lite_uri,
        collection=components.index.collection,
        store=str(tmp_path / "unused-store"),
        model=components.reranker.model,
        reranker=running.target,
    )
    try:
        for client in (one_hop, two_hops):
            hits = client.search(TEXTS[0], limit=8)
            assert [h.id for h in hits] == [h.id for h in expected]
            assert [h.reranked for h in hits] == [h.reranked for h in expected]
            for got, want in zip(hits, expected, strict=True):
                assert got.score == pytest.approx(want.score, abs=TOL)
    finally:
        one_hop.close()
        two_hops.close()


def test_sdk_client_degrades_to_broad_only_when_the_sidecar_is_down(
    setup, milvus_lite_uri, tmp_path, tiny_unused_port, caplog
):
    """Two hops, nothing listening: the broad-only hits (``reranked=False``, Milvus order, the
    same as ``rerank=False``), logged once; ``strict=True`` raises instead."""
    from tb_reranker.client import Client
    from tb_reranker.errors import RerankerUnavailableError

    _, components, _ = setup
    broad = _local_search(components, [TEXTS[0]], limit=8, rerank=False)[0]
    options = {
        "uri": milvus_lite_uri,
        "collection": components.index.collection,
        "store": str(tmp_path / "unused-store"),
        "model": components.reranker.model,
        "reranker": f"127.0.0.1:{tiny_unused_port}",
        "timeout": 2,
    }
    with Client(**options) as client, caplog.at_level("WARNING", logger="tb_reranker"):
        for _ in range(2):
            hits = client.search(TEXTS[0], limit=8)
            assert [h.id for h in hits] == [h.id for h in broad] and len(hits) == 8
            assert not any(h.reranked for h in hits)
            assert [h.rank for h in hits] == [h.broad_rank for h in hits] == list(range(1, 9))
            assert [h.score for h in hits] == [h.broad_score for h in hits]
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    with Client(**options, strict=True) as client, pytest.raises(RerankerUnavailableError):
        client.search(TEXTS[0], limit=8)


def test_retries_only_what_can_succeed_later(tmp_path):
    """UNAVAILABLE while the model loads is retried until it serves; a corrupt store entry
    (DataCorruptionError: DATA_LOSS, not retriable) fails at once with its own type."""
    from tb_reranker.errors import DataCorruptionError

    components, ids = build_tiny_components(tmp_path, num_videos=4)
    components.reranker.store._write(lambda txn: txn.put(b"vid-003", b"garbage"))  # noqa: SLF001

    import threading

    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return components

    running = ServerThread(ServerConfig(port=0), slow_load, wait_ready=False).start()
    loading = running.server.metrics.requests.labels("EncodeService/Encode", "UNAVAILABLE")

    def finish_loading_after_a_refusal() -> None:
        deadline = time.monotonic() + 30
        while loading._value.get() < 1 and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        loaded.set()

    threading.Thread(target=finish_loading_after_a_refusal, daemon=True).start()
    try:
        with RemoteReranker(running.target, timeout=30, retries=8) as remote:
            indicators = remote.encode(["a dog"])  # first attempt: "still loading", retried
            assert indicators.shape == (1, 4, 64)
            assert loading._value.get() >= 1  # noqa: SLF001
            calls = running.server.metrics.requests.labels("RerankService/Rerank", "DATA_LOSS")
            with pytest.raises(DataCorruptionError, match="vid-003"):
                remote.rerank(indicators, [ids])
            deadline = time.monotonic() + 5  # the server counts a call after replying
            while calls._value.get() < 1 and time.monotonic() < deadline:  # noqa: SLF001
                time.sleep(0.01)
            time.sleep(0.2)
            assert calls._value.get() == 1  # noqa: SLF001 - not retried
    finally:
        loaded.set()
        running.stop()
