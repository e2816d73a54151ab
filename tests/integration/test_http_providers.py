"""Provider-compatible HTTP endpoints (TEI, Cohere/vLLM, Weaviate) with a real sidecar, and a
Milvus Lite search whose ``provider: cohere`` model reranker calls our endpoint."""

from __future__ import annotations

import json
import os
import socket
import string
import threading
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tb_reranker
from tb_reranker.index.milvus_index import LITE_GRPC_OPTIONS
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.http import MISSING_SCORE
from tb_reranker.server.http_wire import error_type
from tb_reranker.server.testing import ServerThread, build_tiny_components

QUERY = "a dog runs on the beach"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    components, ids = build_tiny_components(tmp_path_factory.mktemp("http"), num_videos=20)
    config = ServerConfig(port=0, http_port=0, token="api-key-1", max_candidates=200)
    with ServerThread(config, lambda: components) as running:
        yield running, components, ids


def _post(running, path: str, body, token: str | None = "api-key-1"):
    request = urllib.request.Request(
        f"http://127.0.0.1:{running.server.http_port}{path}",
        data=json.dumps(body).encode() if not isinstance(body, bytes) else body,
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(running, path: str):
    url = f"http://127.0.0.1:{running.server.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _tokenbinder_order(components, documents: list[str]) -> list[int]:
    reranker = components.reranker
    result = reranker.rerank(reranker.encode([QUERY]), [documents])[0]
    return [c.index for c in result.candidates]


def test_tei_rerank(setup):
    running, components, ids = setup
    documents = [*ids[:12], "ghost"]
    status, body = _post(
        running, "/rerank", {"query": QUERY, "texts": documents, "return_text": True}
    )
    assert status == 200
    order = _tokenbinder_order(components, documents)
    assert [item["index"] for item in body] == [*order, 12]  # missing id last
    scores = [item["score"] for item in body]
    assert scores == sorted(scores, reverse=True) and scores[-1] == MISSING_SCORE
    assert body[0]["text"] == documents[body[0]["index"]]


def test_cohere_rerank(setup):
    running, components, ids = setup
    documents = ids[:15]
    for path in ("/v1/rerank", "/v2/rerank"):
        status, body = _post(
            running,
            path,
            {"model": "tokenbinder", "query": QUERY, "documents": documents, "top_n": 5},
        )
        assert status == 200
        assert [r["index"] for r in body["results"]] == _tokenbinder_order(components, documents)[
            :5
        ]
        scores = [r["relevance_score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
    # documents as {"text": id} objects, as Cohere also accepts
    status, body = _post(
        running, "/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in documents[:3]]}
    )
    assert status == 200 and len(body["results"]) == 3


def test_weaviate_rerank_ready_meta(setup):
    running, components, ids = setup
    documents = ids[:6]
    status, body = _post(running, "/rerank", {"query": QUERY, "documents": documents})
    assert status == 200
    assert [s["document"] for s in body["scores"]] == documents  # input order
    by_score = sorted(range(6), key=lambda n: -body["scores"][n]["score"])
    assert by_score == _tokenbinder_order(components, documents)
    # the same answer serves vLLM clients (Milvus provider "vllm" posts {endpoint}/rerank)
    assert [r["index"] for r in body["results"]] == by_score
    assert _get(running, "/.well-known/ready")[0] == 204
    assert _get(running, "/.well-known/live")[0] == 204
    status, meta = _get(running, "/meta")
    assert status == 200 and meta["model"]["embed_dim"] == 64
    model = components.reranker.model
    assert meta["model"]["vision_fingerprint"] == model.vision_fingerprint()
    assert meta["model"]["query_fingerprint"] == model.query_fingerprint()


def test_http_errors(setup):
    running, _, ids = setup
    assert (
        _post(running, "/v1/rerank", {"query": QUERY, "documents": ids[:2]}, token=None)[0] == 401
    )
    assert (
        _post(running, "/v1/rerank", {"query": QUERY, "documents": ids[:2]}, token="bad")[0] == 401
    )
    # Milvus 2.6's cohere client writes the scheme in lower case: accepted (RFC 7235)
    request = urllib.request.Request(
        f"http://127.0.0.1:{running.server.http_port}/v2/rerank",
        data=json.dumps({"query": QUERY, "documents": ids[:2]}).encode(),
        headers={"Content-Type": "application/json", "authorization": "bearer api-key-1"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    status, body = _post(
        running, "/rerank", {"query": QUERY, "texts": ids[:2], "documents": ids[:2]}
    )
    assert status == 400 and "either" in body["error"]
    assert _post(running, "/v1/rerank", {"query": "", "documents": ids[:2]})[0] == 400
    assert _post(running, "/v1/rerank", {"query": QUERY, "documents": []})[0] == 400
    assert _post(running, "/v1/rerank", {"query": QUERY, "documents": [ids[0], ids[0]]})[0] == 400
    assert (
        _post(running, "/v1/rerank", {"query": QUERY, "documents": ids[:2], "top_n": 0})[0] == 400
    )
    assert _post(running, "/v1/rerank", b"{not json")[0] == 400
    status, body = _post(
        running, "/v1/rerank", {"query": QUERY, "documents": [f"v{n}" for n in range(201)]}
    )
    assert status == 400 and "max_candidates=200" in body["error"]


def test_milvus_lite_cohere_provider_uses_tokenbinder(setup, milvus_lite_uri):
    """Milvus Lite 3.2.2's model reranker (provider "cohere") POSTs {base_url}/rerank with
    {model, query, documents, top_n} and a Bearer api_key: pointed at our /v2 endpoint, the
    search comes back in TokenBinder's order."""
    from pymilvus import DataType, Function, FunctionType, MilvusClient

    running, components, ids = setup
    client = MilvusClient(uri=milvus_lite_uri, grpc_options=LITE_GRPC_OPTIONS)
    collection = f"t_http_cohere_{os.getpid()}"
    schema = client.create_schema(auto_id=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("video_id", DataType.VARCHAR, max_length=64)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=4)
    index_params = client.prepare_index_params()
    index_params.add_index("vec", index_type="FLAT", metric_type="COSINE")
    client.create_collection(collection, schema=schema, index_params=index_params)
    try:
        client.insert(
            collection,
            [
                {"pk": n, "video_id": video_id, "vec": [1.0, 0.1 * n, 0.0, 0.5]}
                for n, video_id in enumerate(ids[:12])
            ],
        )
        ranker = Function(
            name="tokenbinder",
            input_field_names=["video_id"],
            function_type=FunctionType.RERANK,
            params={
                "reranker": "model",
                "provider": "cohere",
                "model_name": "tokenbinder",
                "queries": [QUERY],
                "base_url": f"http://127.0.0.1:{running.server.http_port}/v2",
                "api_key": "api-key-1",
            },
        )
        calls = running.server.metrics.http_requests.labels("/v2/rerank", "200")
        before = calls._value.get()  # noqa: SLF001
        results = client.search(
            collection,
            data=[[1.0, 0.0, 0.0, 0.5]],
            anns_field="vec",
            limit=5,
            output_fields=["video_id"],
            ranker=ranker,
        )
        got = [hit["entity"]["video_id"] for hit in results[0]]
        # Milvus sends its candidate window (all 12 here) and keeps the top 5 by our score
        documents = ids[:12]
        expected = [documents[n] for n in _tokenbinder_order(components, documents)][:5]
        assert got == expected
        assert calls._value.get() == before + 1  # noqa: SLF001 - Milvus called us once
    finally:
        client.drop_collection(collection)
        client.close()


# ---------------------------------------------------------------------- what real clients expect
def _request(running, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, parsed JSON or None) of any request to the provider port."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{running.server.http_port}{path}",
        data=body,
        headers=headers or {},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, got, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, got, raw = exc.code, exc.headers, exc.read()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = None
    return status, got, parsed


def test_tei_health_and_info(setup):
    """TEI clients probe GET /health (200 when ready) and read GET /info."""
    running, components, _ = setup
    status, _, body = _request(running, "GET", "/health")
    assert status == 200 and body is None
    status, _, info = _request(running, "GET", "/info")
    assert status == 200
    model = components.reranker.model
    assert info["model_id"] == "tokenbinder"
    assert info["model_sha"] == model.fingerprint()
    assert info["model_dtype"] == "float32"
    assert set(info["model_type"]) == {"reranker"}
    assert info["max_input_length"] == model.context_length
    assert info["max_client_batch_size"] == 200  # the server's max_candidates
    assert info["max_concurrent_requests"] == 64
    assert info["version"] == tb_reranker.__version__


def test_tei_health_is_503_until_the_model_is_loaded(tmp_path):
    components, _ = build_tiny_components(tmp_path, num_videos=2)
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return components

    config = ServerConfig(port=0, http_port=0)
    running = ServerThread(config, slow_load, wait_ready=False).start()
    try:
        for path in ("/health", "/info"):
            status, _, body = _request(running, "GET", path)
            assert status == 503 and body["error_type"] == "UNAVAILABLE", (path, status, body)
        release.set()
        running.run(running.server.wait_ready(30))
        assert _request(running, "GET", "/health")[0] == 200
        assert _request(running, "GET", "/info")[0] == 200
    finally:
        release.set()
        running.stop()


def test_401_carries_the_bearer_challenge(setup):
    """RFC 6750: a 401 names the Bearer scheme; a wrong Bearer token is invalid_token."""
    running, _, ids = setup
    body = json.dumps({"query": QUERY, "documents": ids[:2]}).encode()
    json_type = {"Content-Type": "application/json"}
    for auth, invalid in ((None, False), ("Basic eDp5", False), ("Bearer wrong", True)):
        headers = json_type | ({"Authorization": auth} if auth else {})
        status, got, parsed = _request(running, "POST", "/v2/rerank", body, headers)
        assert status == 401 and parsed["error_type"] == "UNAUTHENTICATED"
        challenge = got["WWW-Authenticate"]
        assert challenge.startswith("Bearer "), challenge
        assert ('error="invalid_token"' in challenge) == invalid, challenge


def test_cohere_meta_names_the_route_version(setup):
    running, _, ids = setup
    for path, version in (("/v1/rerank", "1"), ("/v2/rerank", "2")):
        status, body = _post(running, path, {"query": QUERY, "documents": ids[:3]})
        assert status == 200 and body["meta"]["api_version"]["version"] == version, path


_TOKEN = st.text(alphabet=string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    media=st.one_of(
        st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]),
        st.tuples(st.sampled_from(["text", "application", "image", "x"]), _TOKEN).map("/".join),
    ),
    path=st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank"]),
)
def test_non_json_media_types_are_415(setup, media, path):
    """Only JSON media types are read (docs/security.md); a JSON body sent as text/plain too."""
    assume(media not in ("application/json", "text/json") and not media.endswith("+json"))
    running, _, ids = setup
    body = json.dumps({"query": QUERY, "documents": ids[:2], "texts": None}).encode()
    headers = {"Content-Type": media, "Authorization": "Bearer api-key-1"}
    status, _, parsed = _request(running, "POST", path, body, headers)
    assert status == 415 and parsed["error_type"] == "INVALID_ARGUMENT", (media, status, parsed)


def test_missing_content_type_is_415(setup):
    """A body without Content-Type is refused (browsers send one cross-origin unpreflighted)."""
    running, _, ids = setup
    port = running.server.http_port
    body = json.dumps({"query": QUERY, "documents": ids[:2]}).encode()
    head = (
        f"POST /v2/rerank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
        f"Authorization: Bearer api-key-1\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 415 "), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error_type"] == "INVALID_ARGUMENT"


GRPC_CODE_NAMES = {code.name for code in grpc.StatusCode}
ERROR_REQUESTS = st.one_of(
    st.just(("POST", "/v9/rerank", b"{}", "application/json", "api-key-1")),  # 404
    st.just(("GET", "/v1/rerank", None, None, None)),  # 405
    st.just(("POST", "/v1/rerank", b"{}", "application/json", None)),  # 401
    st.just(("POST", "/v1/rerank", b"{}", "text/plain", "api-key-1")),  # 415
    st.just(("POST", "/rerank", b" " * (17 * 1024 * 1024), "application/json", "api-key-1")),
    st.tuples(  # 400: anything that is not a valid request body
        st.just("POST"),
        st.sampled_from(["/rerank", "/v1/rerank", "/v2/rerank"]),
        st.binary(max_size=40),
        st.just("application/json"),
        st.just("api-key-1"),
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ERROR_REQUESTS)
def test_every_error_body_speaks_one_vocabulary(setup, case):
    """Every HTTP error body's error_type is the gRPC code name error_type() gives its status."""
    method, path, body, media, token = case
    running, _, _ = setup
    headers = {"Content-Type": media} if media else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    status, _, parsed = _request(running, method, path, body, headers)
    if status == 200:
        return  # random bytes that happen to be a valid request
    assert 400 <= status < 500, (case, status, parsed)
    assert set(parsed) == {"error", "error_type"}, parsed
    assert parsed["error_type"] in GRPC_CODE_NAMES, parsed
    assert parsed["error_type"] == error_type(status), (status, parsed)


def test_error_type_names():
    assert {s: error_type(s) for s in (400, 401, 404, 405, 408, 412, 413, 415, 429)} == {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        404: "NOT_FOUND",
        405: "UNIMPLEMENTED",
        408: "DEADLINE_EXCEEDED",
        412: "FAILED_PRECONDITION",
        413: "RESOURCE_EXHAUSTED",
        415: "INVALID_ARGUMENT",
        429: "RESOURCE_EXHAUSTED",
    }
    assert error_type(418) == "INVALID_ARGUMENT" and error_type(599) == "INTERNAL"
    assert error_type(503) == "UNAVAILABLE" and error_type(500) == "INTERNAL"


def test_http_latency_histogram_by_route_and_status_class(setup):
    running, _, ids = setup
    before = {c: _count(running, "/v2/rerank", c) for c in ("2xx", "4xx")}
    assert _post(running, "/v2/rerank", {"query": QUERY, "documents": ids[:3]})[0] == 200
    assert _post(running, "/v2/rerank", {"query": QUERY, "documents": []})[0] == 400
    assert _count(running, "/v2/rerank", "2xx") == before["2xx"] + 1
    assert _count(running, "/v2/rerank", "4xx") == before["4xx"] + 1
    with urllib.request.urlopen(
        f"http://127.0.0.1:{running.server.http_port}/metrics", timeout=30
    ) as response:
        text = response.read().decode()
    assert 'tb_http_request_seconds_bucket{le="0.25",route="/v2/rerank",status_class="2xx"}' in text


def _count(running, route: str, status_class: str) -> float:
    for metric in running.server.metrics.http_latency.collect():
        for sample in metric.samples:
            if (
                sample.name.endswith("_count")
                and sample.labels.get("route") == route
                and sample.labels.get("status_class") == status_class
            ):
                return sample.value
    return 0.0
