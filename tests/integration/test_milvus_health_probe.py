"""SearchService health follows a real Milvus 2.3.5 server by itself (issue #20).

Before: with Milvus frozen (SIGSTOP), every Search hung into DEADLINE_EXCEEDED while health said
SERVING; once Milvus answered again, SearchService stayed NOT_SERVING until some client's Search
happened to succeed. Now a background probe (``milvus_probe_s``, bounded by
``milvus_probe_timeout_s``) moves the health both ways within seconds, with no Search at all.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.testing import ServerThread, build_tiny_components

pytestmark = pytest.mark.server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _wait_status(health, wanted: int, timeout: float) -> float:
    request = health_pb2.HealthCheckRequest(service="tb_reranker.v1.SearchService")
    started = time.monotonic()
    while health.Check(request, timeout=5).status != wanted:
        assert time.monotonic() - started < timeout, f"SearchService not {wanted} in {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - started


def test_health_follows_a_frozen_and_resumed_milvus(tmp_path, milvus_server, unique_collection):
    from tb_reranker.index import VideoIndex

    components, ids = build_tiny_components(tmp_path, num_videos=6)
    model = components.reranker.model
    index = VideoIndex(
        milvus_server.uri,
        collection=unique_collection,
        dim=model.embed_dim,
        fingerprint=model.vision_fingerprint(),
        model_fingerprint=model.fingerprint(),
        timeout=10,
    )
    index.create()
    records = components.reranker.store.get_many(ids)
    index.upsert({"id": i, "cls": records[i].video_cls()} for i in ids)
    index.wait_until_indexed()
    components.index = index
    config = ServerConfig(port=0, milvus_probe_s=0.3, milvus_probe_timeout_s=1.0)
    group = milvus_server._proc.pid  # its own process group (start_new_session)
    with (
        ServerThread(config, lambda: components) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        search = pb_grpc.SearchServiceStub(channel)
        _wait_status(health, SERVING, timeout=30)
        assert len(search.Search(pb.SearchRequest(text="a dog", limit=4), timeout=30).hits) == 4
        os.killpg(group, signal.SIGSTOP)
        try:
            _wait_status(health, NOT_SERVING, timeout=10)  # no Search needed
        finally:
            os.killpg(group, signal.SIGCONT)
        _wait_status(health, SERVING, timeout=30)  # back without any client's Search
        assert len(search.Search(pb.SearchRequest(text="a dog", limit=4), timeout=30).hits) == 4
    index.close()
