"""Rerank by video id over a real ``tb serve`` process (issue 22 §4).

The frame store holds a cut video (``long``: 4 segments of 10 s, written as ingest writes them;
its best segment for the query is segment 2, segment 0 its worst), a video of 2 segments and
one-segment videos. Over real sockets:

- the Rerank RPC by video id (the request as every older client sends it) scores ``long`` as its
  best segment (equal to reranking its segments by key and taking the max) and returns that
  segment's span; before, ``long`` was scored as its segment 0 alone;
- the HTTP provider endpoints (TEI, Cohere/vLLM, Weaviate) give the same scores, contracts kept;
- on one-segment videos the unset field gives exactly the by-segment (pre-change) answer;
- a segment key by video, an unknown ``candidates_are``: INVALID_ARGUMENT / 400.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.model import save_checkpoint
from tb_reranker.remote import RemoteReranker
from tb_reranker.server.testing import build_tiny_components

QUERY = "a red square then a blue circle"
SPAN = 10.0
SEGMENTS = {"long": 4, "mid": 2, "s0": 1, "s1": 1, "s2": 1, "s3": 1}
VIDEOS = ["s0", "long", "mid", "ghost", "s1"]  # ghost: not stored


def _keys(video: str) -> list[str]:
    return [video] + [f"{video}~{n}" for n in range(1, SEGMENTS[video])]


def _cut_store(components) -> None:
    """Regroup the tiny records as the videos of SEGMENTS; ``long``'s segment 2 is the record
    most similar to QUERY, its segment 0 the least."""
    reranker = components.reranker
    store = reranker.store
    ids = list(store.list_ids())
    records = store.get_many(ids)
    i_1 = reranker.encode([QUERY])[0, 0]
    by_cosine = sorted(ids, key=lambda i: float(records[i].video_cls() @ i_1))
    order = [by_cosine[0], by_cosine[1], by_cosine[-1], by_cosine[2], *by_cosine[3:-1]]
    source = iter(order)
    cut = {}
    for video, count in SEGMENTS.items():
        for s, key in enumerate(_keys(video)):
            record = records[next(source)]
            cut[key] = dataclasses.replace(
                record,
                timestamps=SPAN * s + np.arange(record.num_frames, dtype=np.float32),
                segment=s,
                segments=count,
                start_s=SPAN * s,
                end_s=SPAN * (s + 1),
                duration_s=SPAN * count,
            )
    store.delete_many(ids)
    store.put_many(cut)


class Serve:
    """``tb serve`` as a child process (gRPC + provider HTTP, no Milvus)."""

    def __init__(self, root) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TB_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tb_reranker", "serve", "--port", "0", "--http-port", "0"]
            + ["--no-search", "--checkpoint", str(root / "checkpoint")]
            + ["--store", str(root / "frames"), "--data-dir", str(root / "data")],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.grpc_port = int(self.wait_for(r"gRPC on 127\.0\.0\.1:(\d+)").group(1))
        self.http_port = int(self.wait_for(r"provider HTTP endpoints on 127\.0\.0\.1:(\d+)")[1])
        self.wait_for(r"model ready")

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen; stderr:\n{''.join(self.lines)}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._reader.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("by_video")
    components, _ = build_tiny_components(root, num_videos=12)
    _cut_store(components)
    save_checkpoint(components.reranker.model, root / "checkpoint")
    components.reranker.store.close()
    serve = Serve(root)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve.grpc_port}") as channel:
            yield serve, pb_grpc.RerankServiceStub(channel)
    finally:
        serve.close()


def _fields(rank) -> tuple:
    frame = rank.best_frame_s if rank.HasField("best_frame_s") else None
    return (rank.id, rank.index, rank.score, rank.broad_score, rank.delta, frame, rank.reranked)


def _post(serve: Serve, path: str, body: dict):
    request = urllib.request.Request(
        f"http://127.0.0.1:{serve.http_port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _by_video(stub) -> pb.RerankResponse:
    """Rerank by video ids, the field unset: what every older client sends."""
    request = pb.RerankRequest(text=QUERY, candidates_ids=VIDEOS)
    assert request.candidates_are == pb.CANDIDATES_ARE_UNSPECIFIED
    return stub.Rerank(request, timeout=60)


def test_rerank_by_video_id_scores_the_best_segment_and_returns_its_span(served):
    _, stub = served
    response = _by_video(stub)
    keys = [key for video in VIDEOS if video in SEGMENTS for key in _keys(video)]
    explicit = stub.Rerank(
        pb.RerankRequest(text=QUERY, candidates_ids=keys, candidates_are=pb.CANDIDATES_ARE_SEGMENT),
        timeout=60,
    )
    assert all(rank.reranked for rank in explicit.ranks)  # 9 segments <= K = 10
    by_key = {rank.id: rank for rank in explicit.ranks}
    best_of_long = max(_keys("long"), key=lambda k: by_key[k].score)
    assert best_of_long == "long~2" and by_key["long"].score < by_key["long~2"].score
    expected = sorted(
        (video for video in VIDEOS if video in SEGMENTS),
        key=lambda v: -max(by_key[k].score for k in _keys(v)),
    )
    assert [rank.id for rank in response.ranks] == expected
    for rank in response.ranks:
        best = max((by_key[k] for k in _keys(rank.id)), key=lambda r: r.score)
        assert rank.score == best.score  # before: long scored as its segment 0
        assert (rank.broad_score, rank.delta, rank.best_frame_s) == (
            best.broad_score,
            best.delta,
            best.best_frame_s,
        )
        assert rank.index == VIDEOS.index(rank.id)
        segment = int(best.id.partition("~")[2] or 0)
        assert (rank.start_s, rank.end_s) == (SPAN * segment, SPAN * (segment + 1))
    long = next(rank for rank in response.ranks if rank.id == "long")
    assert (long.start_s, long.end_s) == (20.0, 30.0)
    assert [(m.id, m.index) for m in response.missing] == [("ghost", 3)]


def test_the_sdk_gets_the_span_and_the_same_answer(served):
    serve, stub = served
    response = _by_video(stub)
    with RemoteReranker(f"127.0.0.1:{serve.grpc_port}", timeout=60) as remote:
        (result,) = remote.rerank(remote.encode([QUERY]), [VIDEOS])
    assert [(c.id, c.start_s, c.end_s) for c in result.candidates] == [
        (rank.id, rank.start_s, rank.end_s) for rank in response.ranks
    ]
    assert [c.score for c in result.candidates] == pytest.approx(
        [rank.score for rank in response.ranks], abs=1e-5
    )
    assert result.missing_ids == ["ghost"]


def test_http_documents_score_as_their_best_segment(served):
    serve, stub = served
    grpc_scores = {VIDEOS[rank.index]: rank.score for rank in _by_video(stub).ranks}
    order = [rank.id for rank in _by_video(stub).ranks]
    status, cohere = _post(serve, "/v2/rerank", {"query": QUERY, "documents": VIDEOS})
    assert status == 200 and set(cohere) == {"id", "results", "meta"}
    assert all(set(item) == {"index", "relevance_score"} for item in cohere["results"])
    assert [VIDEOS[item["index"]] for item in cohere["results"]] == [*order, "ghost"]
    status, tei = _post(serve, "/rerank", {"query": QUERY, "texts": VIDEOS})
    assert status == 200 and all(set(item) == {"index", "score"} for item in tei)
    status, weaviate = _post(serve, "/rerank", {"query": QUERY, "documents": VIDEOS})
    assert status == 200 and set(weaviate) == {"id", "model", "query", "scores", "results"}
    assert [item["document"] for item in weaviate["scores"]] == VIDEOS  # input order
    for answer in (
        {VIDEOS[item["index"]]: item["relevance_score"] for item in cohere["results"]},
        {VIDEOS[item["index"]]: item["score"] for item in tei},
        {item["document"]: item["score"] for item in weaviate["scores"]},
    ):
        assert answer.pop("ghost") == -1000.0
        assert answer == pytest.approx(grpc_scores, abs=1e-5)
    status, body = _post(serve, "/v2/rerank", {"query": QUERY, "documents": ["s0", "long~1"]})
    assert status == 400 and body["error_type"] == "INVALID_ARGUMENT"
    assert "'long~1' is a segment key" in body["error"]


def test_unset_field_on_one_segment_videos_is_todays_answer(served):
    _, stub = served
    one_segment = ["s2", "s0", "ghost", "s3", "s1"]
    for scores in ([], [0.3, 0.6, 0.2, 0.3, 0.1]):
        old = stub.Rerank(
            pb.RerankRequest(text=QUERY, candidates_ids=one_segment, broad_scores=scores),
            timeout=60,
        )
        by_key = stub.Rerank(
            pb.RerankRequest(
                text=QUERY,
                candidates_ids=one_segment,
                broad_scores=scores,
                candidates_are=pb.CANDIDATES_ARE_SEGMENT,
            ),
            timeout=60,
        )
        assert [_fields(r) for r in old.ranks] == [_fields(r) for r in by_key.ranks]
        assert list(old.missing) == list(by_key.missing)
        assert all((r.start_s, r.end_s) == (0.0, SPAN) for r in old.ranks)
        assert not any(r.HasField("start_s") for r in by_key.ranks)


def test_a_callers_mistakes_are_invalid_argument(served):
    _, stub = served
    for request in (
        pb.RerankRequest(text=QUERY, candidates_ids=["s0", "long~1"]),
        pb.RerankRequest(text=QUERY, candidates_ids=["s0"], candidates_are=7),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rerank(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
