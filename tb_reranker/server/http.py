"""Reranker-provider HTTP endpoints (aiohttp), so vector databases can call TokenBinder.

Documents are **video ids** (for Milvus: a VARCHAR field holding them, not the primary key; see
docs/providers.md); the query is the search text. Scores are TokenBinder's final scores S = S' + Δ with S' computed from the stored
frame tokens, made non-increasing along TokenBinder's order (candidates past K keep their broad
order below the reranked ones). A video cut into segments at ingest is reranked as all of its
segments and scores as its best one (the Rerank RPC's rerank by video, ``rerank.videos``); a
segment key (``<video id>~<n>``) as a document is a 400. Ids absent from the frame store come
last with score ``MISSING_SCORE``.

Routes (``tb serve --http-port``):

- TEI (text-embeddings-inference): ``POST /rerank`` ``{"query", "texts": [...]}`` →
  ``[{"index", "score"}]`` sorted by score (``"text"`` too with ``return_text``).
- Cohere / vLLM / Milvus ``provider: cohere``: ``POST /v1/rerank`` and ``POST /v2/rerank``
  ``{"query", "documents": [str | {"text"}], "top_n"?}`` →
  ``{"id", "results": [{"index", "relevance_score"}], "meta"}``.
- Weaviate reranker-transformers: ``GET /.well-known/ready``, ``GET /.well-known/live``,
  ``GET /meta``, ``POST /rerank`` ``{"query", "documents": [...]}`` →
  ``{"query", "scores": [{"document", "score"}]}`` in input order.
- vLLM (Milvus 2.6 provider ``vllm`` posts ``{endpoint}/rerank`` ``{"query", "documents"}``):
  the same ``POST /rerank`` answer also carries ``"results": [{"index", "relevance_score"}]``.

TEI probes: ``GET /health`` (200 once the model is loaded, 503 before) and ``GET /info`` (the
model id, version and limits, as TEI's ``/info``).

TEI, Weaviate and vLLM share ``POST /rerank``: a body with ``texts`` is TEI; a body with
``documents`` is Weaviate/vLLM, answered with both ``scores`` and ``results`` (both keys, or
neither → 400).

Auth: with a server token, POST routes need ``Authorization: Bearer <token>`` (scheme
case-insensitive; Milvus sends its provider API key as ``bearer <key>``), else 401 with
``WWW-Authenticate: Bearer`` (RFC 6750); the GET probes stay open. ``/metrics`` serves Prometheus
text.

A POST is handled in this order: auth (no byte of the body is read before), the media type (415
unless JSON), the body (whole, within ``http_body_timeout_s``: 408 after), its JSON, and only then
one of the HTTP surface's own ``max_concurrency`` slots (429 when all are taken). Every error
body is ``{"error": message, "error_type": NAME}`` with NAME from :func:`error_type`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web

import tb_reranker
from tb_reranker.errors import InvalidInputError
from tb_reranker.server.engine import ServingEngine
from tb_reranker.server.http_wire import (
    BODY_KEY,
    REQUESTS_KEY,
    Handler,
    error_response,
    guard_middleware,
)
from tb_reranker.server.interceptors import Slots
from tb_reranker.server.metrics import ServerMetrics

__all__ = ["build_provider_app", "build_metrics_app", "MISSING_SCORE"]

log = logging.getLogger(__name__)

MISSING_SCORE = -1000.0  # score of documents whose id has no frame tokens in the store
_MIN_STEP = 1e-6  # gap that keeps the scores strictly decreasing along TokenBinder's order

ENGINE_KEY = web.AppKey("engine", ServingEngine)


async def scored_documents(
    engine: ServingEngine, query: Any, documents: list[str], top_n: int | None = None
) -> list[tuple[int, float]]:
    """(index into ``documents``, score) in TokenBinder order, missing ids last; a document is
    a video id, scored as its best segment (the engine's rerank by video)."""
    if not isinstance(query, str):
        raise InvalidInputError("'query' must be a string")
    _, result, _ = await engine.rerank(candidates_ids=documents, text=query)
    ranked: list[tuple[int, float]] = []
    previous = float("inf")
    for candidate in result.candidates:
        score = min(float(candidate.score), previous - _MIN_STEP)
        ranked.append((candidate.index, score))
        previous = score
    seen = {index for index, _ in ranked}
    ranked.extend((n, MISSING_SCORE) for n in range(len(documents)) if n not in seen)
    return ranked[:top_n] if top_n else ranked


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInputError(f"{key!r} must be true or false, got {type(value).__name__}")
    return value


def _documents(body: dict[str, Any], key: str) -> list[str]:
    documents = body.get(key)
    if not isinstance(documents, list) or not documents:
        raise InvalidInputError(f"'{key}' must be a non-empty list of video ids")
    out = []
    for document in documents:
        if isinstance(document, dict):  # Cohere also accepts {"text": ...}
            document = document.get("text")
        if not isinstance(document, str):
            raise InvalidInputError(f"every entry of '{key}' must be a video id string")
        out.append(document)
    return out


def _top_n(body: dict[str, Any]) -> int | None:
    top_n = body.get("top_n")
    if top_n is None:
        return None
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n <= 0:
        raise InvalidInputError(f"'top_n' must be a positive integer, got {top_n!r}")
    return top_n


def _tei_answer(texts: list[str], ranked: list[tuple[int, float]], return_text: bool) -> Any:
    return [
        {"index": n, "score": score, **({"text": texts[n]} if return_text else {})}
        for n, score in ranked
    ]


def _weaviate_answer(query: Any, documents: list[str], ranked: list[tuple[int, float]]) -> Any:
    """Weaviate reads "scores" (input order), vLLM clients "results" (best first)."""
    scores = dict(ranked)
    return {
        "id": str(uuid.uuid4()),
        "model": "tokenbinder",
        "query": query,
        "scores": [
            {"document": d, "score": scores[n]} for n, d in enumerate(documents) if n in scores
        ],
        "results": [{"index": n, "relevance_score": score} for n, score in ranked],
    }


def _cohere_answer(
    documents: list[str], ranked: list[tuple[int, float]], return_documents: bool, version: str
) -> Any:
    return {
        "id": str(uuid.uuid4()),
        "results": [
            {
                "index": n,
                "relevance_score": score,
                **({"document": {"text": documents[n]}} if return_documents else {}),
            }
            for n, score in ranked
        ],
        "meta": {"api_version": {"version": version}, "billed_units": {"search_units": 1}},
    }


def _tei_info(engine: ServingEngine) -> dict[str, Any]:
    """TEI's ``/info`` fields for the loaded model (a reranker with one score per text)."""
    assert engine.components is not None
    config = engine.config
    context = int(engine.components.reranker.model.context_length)
    return {
        "model_id": "tokenbinder",
        "model_sha": engine.fingerprint,
        "model_dtype": engine.components.dtype,
        "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
        "max_concurrent_requests": config.max_concurrency,
        "max_input_length": context,  # query tokens; longer queries are truncated
        "max_batch_tokens": context * config.max_batch,
        "max_batch_requests": config.max_batch,
        "max_client_batch_size": config.max_candidates,  # texts (video ids) per call
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": tb_reranker.__version__,
        "sha": None,
        "docker_label": None,
    }


class _Routes:
    """The provider routes over one ``ServingEngine``."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    async def rerank(self, request: web.Request) -> web.Response:
        """TEI (``texts``) or Weaviate (``documents``), told apart by the body's keys."""
        body = request[BODY_KEY]
        if ("texts" in body) == ("documents" in body):
            raise InvalidInputError(
                "POST /rerank takes either 'texts' (TEI) or 'documents' (Weaviate), not both"
            )
        if "texts" in body:
            texts = _documents(body, "texts")
            return_text = _flag(body, "return_text")
            ranked = await scored_documents(self.engine, body.get("query"), texts)
            return web.json_response(_tei_answer(texts, ranked, return_text))
        # Weaviate reranker-transformers and vLLM (Milvus provider "vllm") post the same body
        documents = _documents(body, "documents")
        top_n = _top_n(body)
        ranked = await scored_documents(self.engine, body.get("query"), documents, top_n)
        return web.json_response(_weaviate_answer(body.get("query"), documents, ranked))

    async def _cohere(self, request: web.Request, version: str) -> web.Response:
        body = request[BODY_KEY]
        documents = _documents(body, "documents")
        return_documents = _flag(body, "return_documents")
        top_n = _top_n(body)
        ranked = await scored_documents(self.engine, body.get("query"), documents, top_n)
        return web.json_response(_cohere_answer(documents, ranked, return_documents, version))

    async def cohere_v1(self, request: web.Request) -> web.Response:
        return await self._cohere(request, "1")

    async def cohere_v2(self, request: web.Request) -> web.Response:
        return await self._cohere(request, "2")

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=204 if self.engine.ready else 503)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def health(self, request: web.Request) -> web.Response:
        """TEI's probe: 200 (no body) once the model is loaded, 503 with a JSON error before."""
        if self.engine.ready:
            return web.Response(status=200)
        return error_response(503, "the model is not loaded yet")

    async def info(self, request: web.Request) -> web.Response:
        """TEI's ``/info``; 503 until the model is loaded (TEI answers only once it is)."""
        if not self.engine.ready:
            return error_response(503, "the model is not loaded yet")
        return web.json_response(_tei_info(self.engine))

    async def meta(self, request: web.Request) -> web.Response:
        engine = self.engine
        info: dict[str, Any] = {"name": "tokenbinder", "version": tb_reranker.__version__}
        if engine.components is not None:
            model = engine.components.reranker.model
            info.update(
                fingerprint=engine.fingerprint,
                vision_fingerprint=engine.vision_fingerprint,
                query_fingerprint=engine.query_fingerprint,
                embed_dim=int(model.embed_dim),
                num_indicators=int(model.num_indicators),
                top_k=int(model.top_k),
                num_frames=int(model.num_frames),
                device=engine.components.device,
            )
        return web.json_response({"model": info})


def build_provider_app(
    engine: ServingEngine, *, token: str = "", metrics: ServerMetrics | None = None
) -> web.Application:
    """The aiohttp application of the provider endpoints (plus ``/metrics`` when ``metrics``).

    It sheds load with slots of its own (``max_concurrency`` of them), apart from gRPC's.
    """
    config = engine.config
    slots = Slots(
        config.max_concurrency,
        gauge=metrics.http_in_flight if metrics is not None else None,
        shed=metrics.http_shed if metrics is not None else None,
        what="HTTP requests",
    )
    guard, requests = guard_middleware(token, slots, metrics, config.http_body_timeout_s)
    app = web.Application(middlewares=[guard], client_max_size=config.max_message_bytes)
    app[ENGINE_KEY] = engine
    app[REQUESTS_KEY] = requests
    routes = _Routes(engine)
    app.router.add_post("/rerank", routes.rerank)
    app.router.add_post("/v1/rerank", routes.cohere_v1)
    app.router.add_post("/v2/rerank", routes.cohere_v2)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/info", routes.info)
    app.router.add_get("/.well-known/ready", routes.ready)
    app.router.add_get("/.well-known/live", routes.live)
    app.router.add_get("/meta", routes.meta)
    if metrics is not None:
        app.router.add_get("/metrics", _metrics_handler(metrics))
    return app


def build_metrics_app(metrics: ServerMetrics) -> web.Application:
    """A one-route application: ``GET /metrics`` in the Prometheus text format."""
    app = web.Application()
    app.router.add_get("/metrics", _metrics_handler(metrics))
    return app


def _metrics_handler(metrics: ServerMetrics) -> Handler:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def handler(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return handler
