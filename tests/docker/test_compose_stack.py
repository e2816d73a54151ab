"""End to end on the real compose stack: etcd + S3 (MinIO) + Milvus standalone + the CPU sidecar.

``docker compose -f docker/docker-compose.yml up --wait`` (testcontainers ``DockerCompose``)
under a private project name and free host ports, with a tiny checkpoint mounted and the images
that ``make images`` built (the stand-ins of build/docker/images.env where no registry is
reachable, or whatever TB_*_IMAGE names). From this process: ingest generated MP4s through the
SDK into that Milvus and S3 store, search in-process, through the sidecar (gRPC Rerank and its
Search RPC) and through the provider HTTP endpoint, compare with an embedded run (Milvus Lite +
LMDB) on the same checkpoint and videos, then fault drills: the sidecar stopped and started,
Milvus stopped, the whole stack restarted. ``down --volumes`` at the end, even on failure.
Figures (start-up to all-healthy, search p50 through the containers vs in-process) are written
to build/docker/stack-measurements.json; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from docker_support import (
    ROOT,
    STACK_PORTS,
    free_ports,
    missing_images,
    private_stack_env,
    project_containers,
    skip_or_fail,
)

DOCKER_DIR = ROOT / "docker"
MEASUREMENTS = ROOT / "build" / "docker" / "stack-measurements.json"
BUCKET = "tb-frames"  # created by the stack's createbuckets job
MINIO_USER = MINIO_PASSWORD = "minioadmin"  # the compose defaults
COLLECTION = "tb_videos"  # the sidecar's TB_COLLECTION default: its Search RPC reads it
HEALTHCHECKED = ("etcd", "minio", "milvus-standalone", "tb-reranker")

pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]


@dataclass
class Stack:
    project: str
    compose_cli: list[str]
    ports: dict[str, int]
    startup_s: float
    env: dict[str, str]  # the environment compose runs in, fixed when the stack was made
    measurements: dict[str, object] = field(default_factory=dict)

    @property
    def milvus_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['MILVUS_PORT']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['MINIO_PORT']}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['TB_GRPC_PORT']}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TB_HTTP_PORT']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['TB_METRICS_PORT']}/metrics"

    def compose(self, *args: str, timeout: float = 600) -> str:
        """Run ``docker compose -f docker-compose.yml ARGS`` for this project; its stdout."""
        cmd = [*self.compose_cli, "-f", str(DOCKER_DIR / "docker-compose.yml"), *args]
        done = subprocess.run(
            cmd, cwd=DOCKER_DIR, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def containers(self) -> dict[str, object]:
        """service name -> docker SDK container (all, running or not)."""
        return project_containers(self.project)


@pytest.fixture(scope="module")
def stack(compose_cli: list[str], tiny_checkpoint: Path) -> Iterator[Stack]:
    ports = free_ports(STACK_PORTS)
    project = f"tb-test-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        private_stack_env(mp, project, tiny_checkpoint, ports)
        # later fixtures change this process's environment (s3_env drops TB_*): compose must
        # keep seeing the stack's own variables, or `up` would reconcile towards another config
        stack = Stack(project, compose_cli, ports, startup_s=0.0, env=dict(os.environ))
        images = stack.compose("config", "--images").split()
        missing = missing_images(images)
        if missing:
            skip_or_fail(f"images not built: {', '.join(missing)} (run `make images`)")
        started = time.monotonic()
        try:
            stack.compose("up", "--detach", "--wait", "--no-build", "--pull", "never")
        except AssertionError as exc:
            logs = _logs(stack)
            stack.compose("down", "--volumes", "--timeout", "10")
            pytest.fail(f"the compose stack did not come up healthy: {exc}\n{logs}")
        stack.startup_s = time.monotonic() - started
        stack.measurements["startup_to_all_healthy_s"] = round(stack.startup_s, 1)
        stack.measurements["images"] = images
        try:
            yield stack
        finally:
            MEASUREMENTS.parent.mkdir(parents=True, exist_ok=True)
            MEASUREMENTS.write_text(json.dumps(stack.measurements, indent=2) + "\n")
            stack.compose("down", "--volumes", "--timeout", "10")


def _logs(stack: Stack) -> str:
    try:
        return stack.compose("logs", "--no-color", "--tail", "60", timeout=60)
    except Exception as exc:  # noqa: BLE001 - best effort, for the failure message only
        return f"(no logs: {exc})"


@pytest.fixture(scope="module")
def s3_env(stack: Stack) -> Iterator[None]:
    """The SDK here reaches the stack's S3 store through its published port."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("TB_") and n != "TB_REQUIRE_DOCKER"]:
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
        # store and index agree (ingest writes S3 first, then Milvus)
        check = client.check()
        assert not check.only_in_store and not check.only_in_index
        # the collection reads with Bounded consistency: wait until searches see every row
        query = next(iter(captions.values()))
        _wait_until(
            lambda: len(client.search(query, limit=len(captions), rerank=False)) == len(captions)
        )
    return captions


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_checkpoint: Path, synth_videos):
    """The same videos and checkpoint in the embedded default: Milvus Lite + LMDB, in-process."""
    from tb_reranker import Client

    root = tmp_path_factory.mktemp("embedded")
    client = Client(
        uri=str(root / "milvus.db"),
        collection=COLLECTION,
        store=str(root / "frames"),
        checkpoint=str(tiny_checkpoint),
        device="cpu",
        reranker="local",
    )
    report = client.ingest(synth_videos[0], progress=False)
    assert not report.failed and report.ingested == len(synth_videos[1])
    yield client
    client.close()


def _wait_until(predicate, timeout_s: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    last: object = "predicate false"
    while True:
        try:
            if predicate():
                return
        except Exception as exc:  # noqa: BLE001 - a service still coming back
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout_s:.0f} s (last: {last})")
        time.sleep(1)


def _health(target: str, service: str) -> int | grpc.StatusCode:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
        except grpc.RpcError as exc:
            return exc.code()


def _wait_serving(target: str, service: str, timeout_s: float = 180.0) -> None:
    from grpc_health.v1 import health_pb2

    _wait_until(
        lambda: _health(target, service) == health_pb2.HealthCheckResponse.SERVING,
        timeout_s,
        f"{service or 'the sidecar'} SERVING",
    )


def _search_service() -> str:
    from tb_reranker.server.servicers import SERVICE_NAMES

    return SERVICE_NAMES["search"]


# ---------------------------------------------------------------------------- the running stack
def test_every_service_turns_healthy_through_its_own_healthcheck(stack: Stack):
    containers = stack.containers()
    for service in HEALTHCHECKED:
        state = containers[service].attrs["State"]
        assert state["Running"], f"{service} is not running"
        assert "Health" in state, f"{service} has no healthcheck"
        assert state["Health"]["Status"] == "healthy", (service, state["Health"]["Log"][-1:])
    bucket_job = containers["createbuckets"].attrs["State"]
    assert bucket_job["Status"] == "exited" and bucket_job["ExitCode"] == 0


def test_sidecar_image_runs_as_a_non_root_user(stack: Stack):
    sidecar = stack.containers()["tb-reranker"]
    assert sidecar.attrs["Config"]["User"] not in ("", "0", "root", "0:0")
    code, output = sidecar.exec_run(["cat", "/proc/1/status"])  # the server process itself
    assert code == 0
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", output.decode(), re.M)
    assert uids is not None and uids.group(1) == uids.group(2) == "10001"
    code, _ = sidecar.exec_run(["touch", "/models/checkpoint/x"])  # the checkpoint is read-only
    assert code != 0


def test_sidecar_image_holds_exactly_the_locked_versions(stack: Stack):
    """The image was built from requirements/lock.txt: every distribution in its venv (but the
    project and torch's pruned Triton) is in the lock, at the lock's version."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from packaging.markers import default_environment
    from packaging.utils import canonicalize_name
    from test_lock import LOCK, locked_version, parse_lock

    lock = parse_lock(LOCK.read_text())
    sidecar = stack.containers()["tb-reranker"]
    code, output = sidecar.exec_run(["python", "-m", "pip", "list", "--format", "json"])
    assert code == 0, output
    installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(output.decode())}
    assert {"torch", "grpcio", "pymilvus", "open-clip-torch", "pip"} <= set(installed)
    code, version = sidecar.exec_run(
        ["python", "-c", "import platform; print(platform.python_version())"]
    )
    env = default_environment() | {"python_full_version": version.decode().strip(), "extra": ""}
    drift = []
    for name, version in installed.items():
        if name == "tb-reranker":
            continue
        locked = locked_version(lock, name, env)
        if locked is None or str(locked) != version.split("+")[0]:
            drift.append(f"{name} {version} (lock: {locked})")
    assert not drift, "the image drifted from the lock: " + ", ".join(drift)


def test_health_and_metrics_answer_through_published_ports(stack: Stack):
    from grpc_health.v1 import health_pb2

    assert _health(stack.grpc_target, "") == health_pb2.HealthCheckResponse.SERVING
    # (the Search service turns SERVING once the collection exists: see the Search RPC test)
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as reply:
        assert reply.status == 200 and "tb_" in reply.read().decode()


def test_stack_search_equals_an_embedded_in_process_run(stack, ingested, embedded, tiny_checkpoint):
    """Milvus server + S3 + the sidecar's rerank give the hits of Milvus Lite + LMDB in-process."""
    queries = list(ingested.values())[:3]
    with _client(stack, tiny_checkpoint, reranker=stack.grpc_target, strict=True) as remote:
        for query in queries:
            got = remote.search(query, limit=len(ingested), rerank=True)
            expected = embedded.search(query, limit=len(ingested), rerank=True)
            assert [h.id for h in got] == [h.id for h in expected], query
            assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-3)
            assert [h.broad_score for h in got] == pytest.approx(
                [h.broad_score for h in expected], abs=1e-3
            )
            assert all(h.reranked for h in got)
        # figures for the closing note (same queries, same machine, one run): not asserted
        stack.measurements["search_p50_ms"] = {
            "stack_sidecar_rerank": _p50_ms(lambda: remote.search(queries[0], limit=5)),
            "embedded_in_process": _p50_ms(lambda: embedded.search(queries[0], limit=5)),
        }


def _p50_ms(call, repeats: int = 20) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def test_in_process_rerank_over_the_stack(stack, ingested, tiny_checkpoint):
    query_id, query = next(iter(ingested.items()))
    with _client(stack, tiny_checkpoint) as client:
        hits = client.search(query, limit=len(ingested), rerank=True)
        broad = client.search(query, limit=len(ingested), rerank=False)
    assert {h.id for h in hits} == set(ingested)  # every video found, nothing invented
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    assert all(h.reranked for h in hits) and not any(h.reranked for h in broad)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    for hit in hits:  # S = S' + delta, S' being Milvus' cosine
        assert hit.score == pytest.approx(hit.broad_score + hit.delta, abs=1e-4)


def test_sidecar_search_rpc_queries_milvus_itself(stack, ingested, tiny_checkpoint):
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
    from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
    from tb_reranker.model import load_checkpoint

    _wait_serving(stack.grpc_target, _search_service())
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


def test_cohere_rerank_endpoint_through_the_published_port(stack, ingested, tiny_checkpoint):
    """`POST /v1/rerank` (what Milvus' cohere provider calls) orders ids as the sidecar does."""
    query = next(iter(ingested.values()))
    with _client(stack, tiny_checkpoint, reranker=stack.grpc_target, strict=True) as remote:
        hits = remote.search(query, limit=len(ingested), rerank=True)
    documents = sorted(ingested)
    body = json.dumps({"model": "tokenbinder", "query": query, "documents": documents}).encode()
    request = urllib.request.Request(
        f"{stack.http_url}/v1/rerank", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200
        answer = json.loads(reply.read())
    results = answer["results"]
    assert sorted(r["index"] for r in results) == list(range(len(documents)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert [documents[r["index"]] for r in results] == [h.id for h in hits]
    # a client's malformed body is its own 4xx, never a 5xx
    bad = urllib.request.Request(f"{stack.http_url}/v1/rerank", data=b"{not json")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=30)
    assert 400 <= caught.value.code < 500


# ------------------------------------------------------------------------------ fault drills
def test_sidecar_stopped_gives_broad_only_hits_then_reranked_again(
    stack, ingested, tiny_checkpoint
):
    from tb_reranker.errors import RerankerUnavailableError

    query = next(iter(ingested.values()))
    stack.compose("stop", "--timeout", "10", "tb-reranker")
    try:
        with _client(stack, tiny_checkpoint, reranker=stack.grpc_target, timeout=5) as client:
            started = time.monotonic()
            hits = client.search(query, limit=len(ingested), rerank=True)
            elapsed = time.monotonic() - started
            broad = client.search(query, limit=len(ingested), rerank=False)
        assert [h.id for h in hits] == [h.id for h in broad]  # the broad order, nothing lost
        assert not any(h.reranked for h in hits)
        assert elapsed < 30, f"degrading took {elapsed:.1f} s"  # the deadline, plus retries
        with (
            _client(
                stack, tiny_checkpoint, reranker=stack.grpc_target, timeout=5, strict=True
            ) as c,
            pytest.raises(RerankerUnavailableError),
        ):
            c.search(query, limit=3)
    finally:
        stack.compose("start", "tb-reranker")
    _wait_serving(stack.grpc_target, "")
    with _client(stack, tiny_checkpoint, reranker=stack.grpc_target, timeout=10) as client:
        _wait_until(
            lambda: all(h.reranked for h in client.search(query, limit=3)),
            what="reranked hits after the sidecar's restart",
        )


def test_milvus_stopped_is_a_typed_error_not_a_hang(stack, ingested, tiny_checkpoint):
    from tb_reranker.errors import TBError

    query = next(iter(ingested.values()))
    with _client(stack, tiny_checkpoint, timeout=10) as client:
        client.search(query, limit=3)  # connected before the fault
        stack.compose("stop", "--timeout", "10", "milvus-standalone")
        try:
            started = time.monotonic()
            with pytest.raises(TBError) as caught:
                client.search(query, limit=3)
            elapsed = time.monotonic() - started
            assert caught.value.retriable, caught.value  # a server fault: worth retrying later
            assert elapsed < 120, f"the error took {elapsed:.1f} s"
        finally:
            stack.compose("up", "--detach", "--wait", "--no-build", "--pull", "never")
    with _client(stack, tiny_checkpoint, timeout=30) as client:
        _wait_until(
            lambda: len(client.search(query, limit=len(ingested))) == len(ingested),
            timeout_s=180,
            what="searches after Milvus came back",
        )


def test_delete_removes_from_milvus_and_the_s3_store(stack, ingested, tiny_checkpoint):
    victim = sorted(ingested)[-1]
    with _client(stack, tiny_checkpoint) as client:
        assert client.delete([victim]) == 1
        assert not client.store.contains(victim)
        query = next(iter(ingested.values()))
        _wait_until(lambda: len(client.search(query, limit=len(ingested))) == len(ingested) - 1)
        hits = client.search(query, limit=len(ingested))
    assert victim not in {h.id for h in hits}


def test_restarted_stack_keeps_its_data_and_tb_check_agrees(stack, ingested, tiny_checkpoint):
    remaining = set(sorted(ingested)[:-1])  # the previous test deleted the last id
    stack.compose("stop", "--timeout", "20")
    started = time.monotonic()
    stack.compose("up", "--detach", "--wait", "--no-build", "--pull", "never")
    stack.measurements["restart_to_all_healthy_s"] = round(time.monotonic() - started, 1)
    query = next(iter(ingested.values()))
    with _client(stack, tiny_checkpoint, timeout=30) as client:
        _wait_until(
            lambda: {h.id for h in client.search(query, limit=len(ingested))} == remaining,
            timeout_s=180,
            what="every remaining video searchable after the restart",
        )
    env = {
        **os.environ,
        "TB_MILVUS_URI": stack.milvus_uri,
        "TB_COLLECTION": COLLECTION,
        "TB_STORE": f"s3://{BUCKET}/frames",
        "TB_CHECKPOINT": str(tiny_checkpoint),
        "TB_DEVICE": "cpu",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tb_reranker", "check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["fingerprint_ok"]
    assert not report["only_in_store"] and not report["only_in_index"], report


# --------------------------------------------------------------------------- GPU override file
def test_gpu_override_still_merges(compose_cli: list[str]):
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]
    env = {**os.environ, "TB_CHECKPOINT_DIR": str(DOCKER_DIR / "checkpoint")}
    done = subprocess.run(
        [*compose_cli, *files, "config", "--format", "json"],
        cwd=DOCKER_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(done.stdout)["services"]["tb-reranker"]
    devices = sidecar["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert sidecar["environment"]["TB_SERVE_DEVICE"] == "cuda"
    assert sidecar["build"]["dockerfile"].endswith("Dockerfile.cuda")
    # the CPU file's settings survive the merge (Milvus, store, ports, healthcheck)
    assert sidecar["environment"]["TB_MILVUS_URI"] == "http://milvus-standalone:19530"
    assert sidecar["healthcheck"]["test"][-1].endswith("healthcheck.py")
