"""Moments over the wire (issue 22 §4): a real sidecar's Search returns the hits of the
in-process search, moments included, for videos of several segments; its Rerank takes segment
keys; an unknown group or moments_per_video out of range is INVALID_ARGUMENT."""

from __future__ import annotations

import dataclasses
import os

import grpc
import numpy as np
import pytest

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.errors import InvalidInputError
from tb_reranker.index import VideoIndex
from tb_reranker.remote import RemoteReranker
from tb_reranker.rerank import InProcessBackend, TwoStageSearch
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components

TEXTS = ["a dog runs on the beach", "a red car at night"]
TOL = 1e-5  # the server may batch differently: float32 rounding only


@pytest.fixture(scope="module")
def setup(tmp_path_factory, milvus_lite_uri):
    """24 stored records regrouped as 10 videos of 1-4 segments (keys ``m<v>``, ``m<v>~<n>``)."""
    components, ids = build_tiny_components(tmp_path_factory.mktemp("moments"), num_videos=24)
    store = components.reranker.store
    records = store.get_many(ids)
    counts = [1, 4, 2, 3, 1, 2, 4, 3, 2, 2]
    segments, rows, n = {}, [], 0
    for v, count in enumerate(counts):
        for s in range(count):
            key = f"m{v}" if s == 0 else f"m{v}~{s}"
            record = dataclasses.replace(
                records[ids[n]], segment=s, segments=count, start_s=2.0 * s, end_s=2.0 * s + 2
            )
            segments[key] = record
            rows.append(
                {
                    "id": key,
                    "cls": record.video_cls(),
                    "uri": f"file:///videos/m{v}.mp4",
                    "duration_s": 2.0 * count,
                    "num_frames": record.num_frames,
                    "content_hash": record.content_hash,
                    "video_id": f"m{v}",
                    "segment": s,
                    "start_s": 2.0 * s,
                    "end_s": 2.0 * s + 2,
                }
            )
            n += 1
    store.put_many(segments)
    index = VideoIndex(
        milvus_lite_uri,
        collection=f"t_moments_{os.getpid()}",
        dim=64,
        fingerprint=components.reranker.model.vision_fingerprint(),
    )
    index.create()
    index.upsert(rows)
    index.flush()
    components.index = index
    with ServerThread(ServerConfig(port=0, max_candidates=64), lambda: components) as running:
        yield running, components, list(segments)
    index.drop()


def _local(components, queries, **options):
    backend = InProcessBackend(components.reranker)
    return TwoStageSearch(components.index, backend).search(queries, **options)


def _same_hits(remote, local):
    assert len(remote) == len(local)
    for rs, ls in zip(remote, local, strict=True):
        fields = ("id", "rank", "broad_rank", "reranked", "start_s", "end_s", "metadata")
        assert [[getattr(h, f) for f in fields] for h in rs] == [
            [getattr(h, f) for f in fields] for h in ls
        ]
        for a, b in zip(rs, ls, strict=True):
            assert a.score == pytest.approx(b.score, abs=TOL)
            assert a.best_frame_s == pytest.approx(b.best_frame_s, abs=TOL)
            assert [(m.start_s, m.end_s) for m in a.moments] == [
                (m.start_s, m.end_s) for m in b.moments
            ]
            assert [m.score for m in a.moments] == pytest.approx(
                [m.score for m in b.moments], abs=TOL
            )
            assert [m.broad_score for m in a.moments] == pytest.approx(
                [m.broad_score for m in b.moments], abs=TOL
            )


def test_sidecar_search_returns_the_in_process_moments(setup):
    running, components, keys = setup
    with RemoteReranker(running.target, timeout=30) as remote:
        for options in (
            {"limit": 6},
            {"limit": 4, "moments_per_video": 2},
            {"limit": 10, "moments_per_video": 4, "rerank": False},
            {"limit": 12, "group": "moment"},
            {"limit": 5, "filter": 'video_id == "m1"', "group": "moment"},
        ):
            remote_hits = remote.search(TEXTS, **options)
            local_hits = _local(components, TEXTS, **options)
            _same_hits(remote_hits, local_hits)
            assert all(hits for hits in remote_hits)
        videos = remote.search(TEXTS, limit=10)[0]
        assert len({h.id for h in videos}) == 10  # limit counts videos: all ten
        assert {len(h.moments) for h in videos} >= {1, 3}  # capped at 3, fewer where fewer
        assert any(h.reranked for h in videos)
        # the sidecar's Rerank takes segment keys as candidates (by segment; by video, the
        # default, a segment key is refused: tests/integration/test_rerank_by_video.py)
        indicators = remote.encode(TEXTS[:1])
        remote_result = remote.rerank(indicators, [keys[:8]], candidates_are="segment")
        local_result = components.reranker.rerank(indicators, [keys[:8]], candidates_are="segment")
        assert [c.id for c in remote_result[0].candidates] == [
            c.id for c in local_result[0].candidates
        ]
        with pytest.raises(InvalidInputError, match="moments_per_video"):
            remote.search(TEXTS[:1], moments_per_video=17)


def test_bad_group_on_the_wire_is_invalid_argument(setup):
    running, _, _ = setup
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.SearchServiceStub(channel)
        for request in (
            pb.SearchRequest(text="a dog", group=7),
            pb.SearchRequest(text="a dog", moments_per_video=99),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Search(request, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        old_client = stub.Search(pb.SearchRequest(text="a dog", limit=3), timeout=30)
        assert len(old_client.hits) == 3 and len(old_client.hits[0].moments) >= 1
        assert np.isfinite(old_client.hits[0].start_s)
