"""The sidecar over the embedded default, as a user runs it: ``tb synth`` → ``tb ingest`` into a
fresh ``--data-dir`` (Milvus Lite, which keeps a database as a directory, + the LMDB store) →
``tb search --json`` → ``tb serve``, every step a ``tb`` process, the sidecar over real sockets.

Milvus Lite is single-process (its database is locked by the process that opened it), so the
in-process ``tb search`` runs before ``tb serve`` starts: one sidecar then serves the whole
module, and every remote answer (gRPC Search, ``Client(reranker=...)`` without a checkpoint, the
provider HTTP endpoints) must equal what ``tb search`` printed.

Before (issue #19 §2): ``tb serve`` took the Lite database for a file, answered Search with
FAILED_PRECONDITION "database ... does not exist" and never turned SearchService SERVING.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc

SEARCH_SERVICE = "tb_reranker.v1.SearchService"
SERVING = health_pb2.HealthCheckResponse.SERVING
LIMIT = 8  # every video: the reranked candidates are the same set everywhere
SCORE_TOL = 2e-3  # the HTTP path's S' reads float16 tokens, Milvus a float32 vector
OVERFLOW = "duration_s > 1" + "0" * 30


def tb(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tb_reranker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env(root: Path) -> dict[str, str]:
    """The environment without any TB_* setting, run from ``root`` (nothing of the caller's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
    return env | {"TB_PROGRESS_INTERVAL_S": "60"}


class Sidecar:
    """A ``tb serve`` process; its ports are read from its log."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tb_reranker", "serve", "--port", "0", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_log(r"gRPC on 127\.0\.0\.1:(\d+)").group(1))
        self.http_port: int | None = None
        if "--http-port" in args:  # logged before the gRPC line
            self.http_port = int(self.wait_log(r"provider HTTP endpoints on \S+:(\d+)").group(1))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.search = pb_grpc.SearchServiceStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.process.stderr:
            self._queue.put(line)

    def wait_log(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first line logged so far or within ``timeout`` seconds that matches."""
        for line in self.lines:
            if match := re.search(pattern, line):
                return match
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.process.poll() is not None and self._queue.empty():
                    break
                continue
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"{pattern!r} not logged; stderr:\n{''.join(self.lines)}")

    def search_status(self) -> int:
        request = health_pb2.HealthCheckRequest(service=SEARCH_SERVICE)
        return self.health.Check(request, timeout=10).status

    def wait_search_status(self, wanted: int, timeout: float) -> float:
        """Seconds until SearchService's health is ``wanted`` (AssertionError past ``timeout``)."""
        started = time.monotonic()
        while (status := self.search_status()) != wanted:
            assert time.monotonic() - started < timeout, (
                f"SearchService stayed {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
                f" for {timeout} s; stderr so far:\n{''.join(self.lines)}"
            )
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Real MP4s (``tb synth``), a tiny checkpoint on disk, ``tb ingest`` into a fresh data dir
    and ``tb search --json`` over it (before any sidecar holds the Lite database)."""
    from tb_reranker.model import save_checkpoint
    from tb_reranker.server.testing import build_tiny_components

    root = tmp_path_factory.mktemp("user_path")
    components, _ = build_tiny_components(root / "scratch", num_videos=1)
    save_checkpoint(components.reranker.model, root / "checkpoint")
    components.reranker.store.close()
    env = clean_env(root)
    synth = tb("synth", str(root / "synth"), "--train", "0", "--test", str(LIMIT), env=env)
    assert synth.returncode == 0, synth.stderr
    captions = [json.loads(line) for line in (root / "synth" / "captions.jsonl").open()]
    queries = [captions[0]["captions"][0], captions[3]["captions"][0]]
    data = ["--data-dir", str(root / "data"), "--checkpoint", str(root / "checkpoint")]
    ingest = tb("ingest", str(root / "synth" / "videos"), *data, "--no-progress", env=env)
    assert ingest.returncode == 0, ingest.stderr
    assert (root / "data" / "milvus.db").is_dir()  # what Milvus Lite 3.x makes
    search = tb("search", *queries, "--limit", str(LIMIT), "--json", *data, env=env)
    assert search.returncode == 0, search.stderr
    expected = {entry["query"]: entry["hits"] for entry in json.loads(search.stdout)}
    assert all(len(hits) == LIMIT for hits in expected.values())
    bad = tb("search", queries[0], "--filter", OVERFLOW, *data, env=env)
    return {
        "root": root,
        "env": env,
        "data": data,
        "queries": queries,
        "expected": expected,
        "bad_filter": bad,
    }


@pytest.fixture(scope="module")
def sidecar(library):
    running = Sidecar(library["env"], *library["data"], "--http-port", "0", "--grace-s", "1")
    try:
        running.wait_log(r"model ready")
        yield running
    finally:
        running.stop()


def assert_same_hits(got: list[tuple[str, float]], hits: list[dict]) -> None:
    assert [video_id for video_id, _ in got] == [hit["id"] for hit in hits]
    for (_, score), hit in zip(got, hits, strict=True):
        assert score == pytest.approx(hit["score"], abs=SCORE_TOL)


def test_search_service_serves_the_embedded_default(sidecar):
    """Before: NOT_SERVING forever ("Milvus Lite database ... does not exist")."""
    sidecar.wait_search_status(SERVING, timeout=60)


def test_grpc_search_equals_tb_search(sidecar, library):
    sidecar.wait_search_status(SERVING, timeout=60)
    for query, hits in library["expected"].items():
        request = pb.SearchRequest(text=query, limit=LIMIT, rerank=True)
        answer = sidecar.search.Search(request, timeout=60)
        assert_same_hits([(h.id, h.score) for h in answer.hits], hits)
        assert [h.broad_rank for h in answer.hits] == [hit["broad_rank"] for hit in hits]


def test_remote_client_without_a_checkpoint_equals_tb_search(sidecar, library, tmp_path):
    from tb_reranker import Client

    sidecar.wait_search_status(SERVING, timeout=60)
    assert not (tmp_path / "checkpoint").exists()
    with Client(reranker=sidecar.target, data_dir=str(tmp_path)) as client:
        results = client.search_many(library["queries"], limit=LIMIT)
    for query, hits in zip(library["queries"], results, strict=True):
        assert all(hit.reranked for hit in hits)
        assert_same_hits([(hit.id, hit.score) for hit in hits], library["expected"][query])


def _post(port: int, path: str, body: dict) -> object:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_http_rerank_endpoints_equal_tb_search(sidecar, library):
    """The provider endpoints get the candidates (broad order) and must give tb search's
    reranked order and scores: TEI, Cohere v1/v2, Weaviate/vLLM."""
    sidecar.wait_search_status(SERVING, timeout=60)
    for query, hits in library["expected"].items():
        documents = [hit["id"] for hit in sorted(hits, key=lambda hit: hit["broad_rank"])]
        tei = _post(sidecar.http_port, "/rerank", {"query": query, "texts": documents})
        assert_same_hits([(documents[item["index"]], item["score"]) for item in tei], hits)
        for path in ("/v1/rerank", "/v2/rerank"):
            body = {"model": "tokenbinder", "query": query, "documents": documents}
            results = _post(sidecar.http_port, path, body)["results"]
            got = [(documents[item["index"]], item["relevance_score"]) for item in results]
            assert_same_hits(got, hits)
        both = _post(sidecar.http_port, "/rerank", {"query": query, "documents": documents})
        got = [(documents[item["index"]], item["relevance_score"]) for item in both["results"]]
        assert_same_hits(got, hits)
        weaviate = {item["document"]: item["score"] for item in both["scores"]}
        assert_same_hits(sorted(weaviate.items(), key=lambda item: -item[1]), hits)


def test_overflowing_filter_is_the_callers_mistake(sidecar, library):
    """Before: Milvus Lite's traceback, UNAVAILABLE, and SearchService NOT_SERVING."""
    bad = library["bad_filter"]  # tb search in process, before the sidecar
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "64-bit integer" in bad.stderr
    sidecar.wait_search_status(SERVING, timeout=60)
    request = pb.SearchRequest(text=library["queries"][0], limit=LIMIT, filter=OVERFLOW)
    with pytest.raises(grpc.RpcError) as caught:
        sidecar.search.Search(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sidecar.search_status() == SERVING
    assert "Traceback" not in "".join(sidecar.lines)


def test_removed_database_is_never_served_and_reopens(library, tmp_path):
    """``rm -rf DATA/milvus.db`` under a running sidecar. Before: stale hits and SERVING, and
    a database ingested at the same path afterwards stayed invisible. Now: NOT_SERVING within
    seconds (Search FAILED_PRECONDITION, never a ghost hit), and the new database is served."""
    env, root = library["env"], library["root"]
    data = tmp_path / "data"
    videos = sorted((root / "synth" / "videos").glob("*.mp4"))
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, chosen in ((first, videos[:4]), (second, videos[4:])):
        folder.mkdir()
        for video in chosen:
            shutil.copy(video, folder / video.name)
    checkpoint = ["--checkpoint", str(root / "checkpoint")]
    done = tb("ingest", str(first), "--data-dir", str(data), *checkpoint, "--no-progress", env=env)
    assert done.returncode == 0, done.stderr
    probing = env | {"TB_SERVE_MILVUS_PROBE_S": "0.5"}
    running = Sidecar(probing, "--data-dir", str(data), *checkpoint, "--grace-s", "1")
    try:
        running.wait_search_status(SERVING, timeout=60)
        query = pb.SearchRequest(text=library["queries"][0], limit=LIMIT, rerank=True)
        assert {hit.id for hit in running.search.Search(query, timeout=60).hits} == {
            video.stem for video in videos[:4]
        }
        shutil.rmtree(data / "milvus.db")
        with pytest.raises(grpc.RpcError) as caught:  # at once, before any probe
            running.search.Search(query, timeout=60)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "removed" in caught.value.details()
        running.wait_search_status(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        # another database at the same path: ingested aside, then moved into place
        aside = ["--uri", str(tmp_path / "aside" / "milvus.db"), "--store", str(data / "frames")]
        done = tb("ingest", str(second), *aside, *checkpoint, "--no-progress", env=env)
        assert done.returncode == 0, done.stderr
        os.rename(tmp_path / "aside" / "milvus.db", data / "milvus.db")
        running.wait_search_status(SERVING, timeout=30)
        assert {hit.id for hit in running.search.Search(query, timeout=60).hits} == {
            video.stem for video in videos[4:]
        }
    finally:
        running.stop()
