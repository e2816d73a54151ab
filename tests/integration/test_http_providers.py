"""Provider-compatible HTTP endpoints (TEI, Cohere/vLLM, Weaviate) with a real sidecar, and a
Milvus Lite search whose ``provider: cohere`` model reranker calls our endpoint."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from tb_reranker.index.milvus_index import LITE_GRPC_OPTIONS
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.http import MISSING_SCORE
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
