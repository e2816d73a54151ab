"""End to end on the real compose stack: etcd + MinIO + Milvus standalone + the CPU sidecar image.

``docker compose -f docker/docker-compose.yml up --build --wait`` (testcontainers
``DockerCompose``) under a private project name and free host ports, with a tiny checkpoint
mounted; then, from this process: ingest generated MP4s through the SDK into that Milvus and the
MinIO frame store, search with the in-process reranker, search again with the sidecar as the
reranker (gRPC) and with the sidecar's own Search RPC, and compare. ``down --volumes`` at the end.
Skipped (conftest) where no Docker engine is reachable. The first run builds the image and pulls
Milvus/MinIO/etcd: allow several minutes.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

DOCKER_DIR = Path(__file__).resolve().parents[2] / "docker"
BUCKET = "tb-frames"  # created by the stack's createbuckets job
MINIO_USER = MINIO_PASSWORD = "minioadmin"  # the compose defaults
COLLECTION = "tb_videos"  # the sidecar's TB_COLLECTION default: its Search RPC reads it

pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]


def compose_unavailable_reason() -> str | None:
    """Why `docker compose` cannot run here (None = it can)."""
    import shutil
    import subprocess

    binary = shutil.which("docker")
    if binary is None:
        return "the `docker` CLI is not on PATH"
    probe = subprocess.run([binary, "compose", "version"], capture_output=True, timeout=30)
    return None if probe.returncode == 0 else "`docker compose` (Compose v2) is not installed"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Stack:
    milvus_uri: str  # http://127.0.0.1:<port>
    s3_endpoint: str  # http://127.0.0.1:<port>
    grpc_target: str  # 127.0.0.1:<port> of the sidecar
    metrics_url: str  # http://127.0.0.1:<port>/metrics


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[Stack]:
    from testcontainers.compose import DockerCompose

    reason = compose_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)

    ports = {
        name: _free_port()
        for name in (
            "MILVUS_PORT",
            "MILVUS_HTTP_PORT",
            "MINIO_PORT",
            "MINIO_CONSOLE_PORT",
            "TB_GRPC_PORT",
            "TB_HTTP_PORT",
            "TB_METRICS_PORT",
        )
    }
    with pytest.MonkeyPatch.context() as mp:
        # a private project: `down --volumes` must never touch a user's own tb-reranker stack
        mp.setenv("COMPOSE_PROJECT_NAME", f"tb-test-{uuid.uuid4().hex[:8]}")
        # the file's own defaults, not whatever this shell exports (TB_COLLECTION, MINIO_*, ...)
        compose_text = (DOCKER_DIR / "docker-compose.yml").read_text()
        for name in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text)):
            mp.delenv(name, raising=False)
        mp.setenv("TB_CHECKPOINT_DIR", str(tiny_checkpoint))
        for name, port in ports.items():
            mp.setenv(name, str(port))
        compose = DockerCompose(
            DOCKER_DIR, compose_file_name="docker-compose.yml", build=True, wait=True
        )
        try:
            compose.start()  # `up --build --wait`: returns once every healthcheck passes
        except Exception:
            stdout, stderr = _logs(compose)
            compose.stop()
            pytest.fail(f"the compose stack did not come up healthy:\n{stdout}\n{stderr}")
        try:
            yield Stack(
                milvus_uri=f"http://127.0.0.1:{ports['MILVUS_PORT']}",
                s3_endpoint=f"http://127.0.0.1:{ports['MINIO_PORT']}",
                grpc_target=f"127.0.0.1:{ports['TB_GRPC_PORT']}",
                metrics_url=f"http://127.0.0.1:{ports['TB_METRICS_PORT']}/metrics",
            )
        finally:
            compose.stop()  # down --volumes


def _logs(compose) -> tuple[str, str]:
    try:
        return compose.get_logs()
    except Exception as exc:  # noqa: BLE001 - best effort, for the failure message only
        return "", f"(no logs: {exc})"


@pytest.fixture(scope="module")
def s3_env(stack: Stack) -> Iterator[None]:
    """The SDK here reaches the stack's MinIO through its published port."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("TB_")]:
            mp.delenv(name)  # e.g. a TB_RERANKER in this shell would make "local" clients remote
        mp.setenv("TB_S3_ENDPOINT", stack.s3_endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", MINIO_USER)
        mp.setenv("AWS_SECRET_ACCESS_KEY", MINIO_PASSWORD)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield


def _client(stack: Stack, checkpoint: Path, **options):
    from tb_reranker import Client

    return Client(
        uri=stack.milvus_uri,
        collection=COLLECTION,
        store=f"s3://{BUCKET}/frames",
        checkpoint=str(checkpoint),
        device="cpu",
        **options,
    )


@pytest.fixture(scope="module")
def ingested(stack: Stack, s3_env: None, tiny_checkpoint: Path, synth_videos) -> dict[str, str]:
    videos_dir, captions = synth_videos
    with _client(stack, tiny_checkpoint) as client:
        report = client.ingest(videos_dir, progress=False)
        assert not report.failed, report.failed
        assert report.ingested == len(captions)
        # store and index agree (ingest writes MinIO first, then Milvus)
        check = client.check()
        assert not check.only_in_store and not check.only_in_index
        # the collection reads with Bounded consistency: wait until searches see every row
        query = next(iter(captions.values()))
        _wait_until(
            lambda: len(client.search(query, limit=len(captions), rerank=False)) == len(captions)
        )
    return captions


def _wait_until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s:.0f} s")
        time.sleep(1)


def _wait_serving(target: str, service: str, timeout_s: float = 120.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    status = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                status = reply.status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                status = exc.code()
            time.sleep(2)
    pytest.fail(f"{service or 'the sidecar'} not SERVING after {timeout_s:.0f} s (last: {status})")


def test_sidecar_is_healthy_over_grpc(stack: Stack):
    _wait_serving(stack.grpc_target, "")
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    assert reply.status == 200 and "tb_" in text


def test_ingest_and_search_with_local_rerank(stack, ingested, tiny_checkpoint):
    query_id, query = next(iter(ingested.items()))
    with _client(stack, tiny_checkpoint) as client:
        hits = client.search(query, limit=len(ingested), rerank=True)
        broad = client.search(query, limit=len(ingested), rerank=False)
    assert {h.id for h in hits} == set(ingested)  # every video found, nothing invented
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(h.reranked for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:  # S = S' + delta, S' being Milvus' cosine
        assert hit.score == pytest.approx(hit.broad_score + hit.delta, abs=1e-4)
    assert {h.id for h in broad} == set(ingested)
    assert not any(h.reranked for h in broad)
    assert query_id in {h.id for h in hits}


def test_rerank_through_the_sidecar_matches_in_process(stack, ingested, tiny_checkpoint):
    """The sidecar (same checkpoint, frame tokens read from MinIO) reorders exactly as we do."""
    _wait_serving(stack.grpc_target, "")
    query = next(iter(ingested.values()))
    with _client(stack, tiny_checkpoint) as local:
        expected = local.search(query, limit=len(ingested), rerank=True)
    with _client(stack, tiny_checkpoint, reranker=stack.grpc_target, strict=True) as remote:
        got = remote.search(query, limit=len(ingested), rerank=True)
    assert [h.id for h in got] == [h.id for h in expected]
    assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-3)
    assert all(h.reranked for h in got)


def test_sidecar_search_rpc_queries_milvus_itself(stack, ingested, tiny_checkpoint):
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
    from tb_reranker.model import load_checkpoint
    from tb_reranker.server.servicers import SERVICE_NAMES

    # Search turns SERVING once the sidecar has opened the collection (it retries until then)
    _wait_serving(stack.grpc_target, SERVICE_NAMES["search"], timeout_s=180)
    query = next(iter(ingested.values()))
    with _client(stack, tiny_checkpoint) as local:
        expected = local.search(query, limit=len(ingested), rerank=True)
    with grpc.insecure_channel(stack.grpc_target) as channel:
        info = pb_grpc.InfoServiceStub(channel).Info(pb.InfoRequest(), timeout=30)
        reply = pb_grpc.SearchServiceStub(channel).Search(
            pb.SearchRequest(text=query, limit=len(ingested), rerank=True), timeout=60
        )
    assert info.model_fingerprint == load_checkpoint(tiny_checkpoint).fingerprint()
    assert info.search_enabled
    assert [h.id for h in reply.hits] == [h.id for h in expected]
    assert [h.score for h in reply.hits] == pytest.approx([h.score for h in expected], abs=1e-3)


def test_delete_removes_from_milvus_and_minio(stack, ingested, tiny_checkpoint):
    victim = sorted(ingested)[-1]
    with _client(stack, tiny_checkpoint) as client:
        assert client.delete([victim]) == 1
        assert not client.store.contains(victim)
        query = next(iter(ingested.values()))
        _wait_until(lambda: len(client.search(query, limit=len(ingested))) == len(ingested) - 1)
        hits = client.search(query, limit=len(ingested))
    assert victim not in {h.id for h in hits}
