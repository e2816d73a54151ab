"""Reranker-provider HTTP endpoints (aiohttp), so vector databases can call TokenBinder.

Documents are **video ids** (the Milvus primary key or any field holding it); the query is the
search text. Scores are TokenBinder's final scores S = S' + Δ with S' computed from the stored
frame tokens, made non-increasing along TokenBinder's order (candidates past K keep their broad
order below the reranked ones). Ids absent from the frame store come last with score
``MISSING_SCORE``.

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

TEI, Weaviate and vLLM share ``POST /rerank``: a body with ``texts`` is TEI; a body with
``documents`` is Weaviate/vLLM, answered with both ``scores`` and ``results`` (both keys, or
neither → 400).

Auth: with a server token, POST routes need ``Authorization: Bearer <token>`` (scheme
case-insensitive; Milvus sends its provider API key as ``bearer <key>``); the GET probes stay open. ``/metrics`` serves Prometheus text.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

import tb_reranker
from tb_reranker.errors import InvalidInputError, TBError
from tb_reranker.server.backend import Backend
from tb_reranker.server.interceptors import ConcurrencyLimitInterceptor, bearer_matches
from tb_reranker.server.metrics import ServerMetrics
from tb_reranker.server.scrub import public_message
from tb_reranker.wire.status import HTTP_STATUS, grpc_status_name

__all__ = ["build_provider_app", "build_metrics_app", "MISSING_SCORE"]

log = logging.getLogger(__name__)

MISSING_SCORE = -1000.0  # score of documents whose id has no frame tokens in the store
_MIN_STEP = 1e-6  # gap that keeps the scores strictly decreasing along TokenBinder's order

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BACKEND_KEY = web.AppKey("backend", Backend)


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": message, "error_type": kind}, status=status)


async def scored_documents(
    backend: Backend, query: Any, documents: list[str], top_n: int | None = None
) -> list[tuple[int, float]]:
    """(index into ``documents``, score) in TokenBinder order, missing ids last."""
    if not isinstance(query, str):
        raise InvalidInputError("'query' must be a string")
    _, result, _ = await backend.rerank(candidates_ids=documents, text=query)
    ranked: list[tuple[int, float]] = []
    previous = float("inf")
    for candidate in result.candidates:
        score = min(float(candidate.score), previous - _MIN_STEP)
        ranked.append((candidate.index, score))
        previous = score
    seen = {index for index, _ in ranked}
    ranked.extend((n, MISSING_SCORE) for n in range(len(documents)) if n not in seen)
    return ranked[:top_n] if top_n else ranked


class BodyError(Exception):
    """A request body we cannot read: answered with ``status`` and a JSON error."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


_JSON_TYPES = ("application/json", "text/json", "text/plain")


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """A request body → its JSON object, or :class:`BodyError` (415 / 400), never anything else.

    JSON is UTF-8 (RFC 8259); a declared charset other than UTF-8 is 415, as is a non-JSON
    media type (an absent Content-Type is accepted). Invalid UTF-8, invalid JSON, ``NaN`` /
    ``Infinity``, nesting deeper than the parser allows and a non-object top level are 400.
    """
    if content_type:
        media, _, params = content_type.partition(";")
        media = media.strip().lower()
        if media not in _JSON_TYPES and not media.endswith("+json"):
            raise BodyError(
                415,
                f"send JSON (Content-Type: application/json), not {media!r}",
                "UnsupportedMediaType",
            )
        for param in params.split(";"):
            key, _, value = param.partition("=")
            charset = value.strip().strip('"').lower()
            if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
                raise BodyError(
                    415, f"JSON bodies are UTF-8, not charset={charset!r}", "UnsupportedMediaType"
                )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the body is not UTF-8 (byte {exc.start})", "Validation") from None
    try:
        body = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise BodyError(400, "the body nests JSON too deeply", "Validation") from None
    except ValueError as exc:  # JSONDecodeError and the NaN/Infinity refusal
        raise BodyError(400, f"the body is not valid JSON: {exc}", "Validation") from None
    if not isinstance(body, dict):
        raise BodyError(400, "the body must be a JSON object", "Validation")
    return body


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


def _guard_middleware(
    token: str, limiter: ConcurrencyLimitInterceptor | None, metrics: ServerMetrics | None
) -> Any:
    """Auth and load shedding on POST routes, one error mapping, request metrics."""
    expected = token.encode()

    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        if expected and not bearer_matches(request.headers.get("Authorization"), expected):
            return _error(401, "missing or invalid bearer token", "Unauthorized")
        if limiter is None:
            return await handler(request)
        if not limiter.try_acquire():
            return _error(429, limiter.busy_message(), "Overloaded")
        try:
            return await handler(request)
        finally:
            limiter.release()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        response: web.StreamResponse | None = None
        try:
            response = await answer(request, handler)
        except web.HTTPException as exc:
            if exc.status < 400:
                response = exc
                raise
            # aiohttp's own refusals (413 body too large, 404, 405) as JSON like ours
            response = _error(exc.status, exc.reason, type(exc).__name__.removeprefix("HTTP"))
        except BodyError as exc:
            response = _error(exc.status, exc.message, exc.kind)
        except TBError as exc:
            response = _tb_error(request, exc)
        except Exception:
            log.exception("internal error in %s %s", request.method, request.path)
            response = _error(500, "internal server error (details in the server log)", "Internal")
        finally:
            if metrics is not None:
                status = response.status if response is not None else 500
                metrics.http_requests.labels(route, str(status)).inc()
        return response

    return guard


def _tb_error(request: web.Request, exc: TBError) -> web.Response:
    name = grpc_status_name(exc)
    status = HTTP_STATUS.get(name, 500)
    log.log(
        logging.DEBUG if status < 500 and status != 412 else logging.WARNING,
        "%s %s: %s: %s",
        request.method,
        request.path,
        type(exc).__name__,
        exc,
    )
    return _error(status, public_message(exc), name)


async def _read_json(request: web.Request) -> dict[str, Any]:
    return parse_body(await request.read(), request.headers.get("Content-Type"))


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
    documents: list[str], ranked: list[tuple[int, float]], return_documents: bool
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
        "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
    }


class _Routes:
    """The provider routes over one ``Backend``."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def rerank(self, request: web.Request) -> web.Response:
        """TEI (``texts``) or Weaviate (``documents``), told apart by the body's keys."""
        body = await _read_json(request)
        if ("texts" in body) == ("documents" in body):
            raise InvalidInputError(
                "POST /rerank takes either 'texts' (TEI) or 'documents' (Weaviate), not both"
            )
        if "texts" in body:
            texts = _documents(body, "texts")
            return_text = _flag(body, "return_text")
            ranked = await scored_documents(self.backend, body.get("query"), texts)
            return web.json_response(_tei_answer(texts, ranked, return_text))
        # Weaviate reranker-transformers and vLLM (Milvus provider "vllm") post the same body
        documents = _documents(body, "documents")
        top_n = _top_n(body)
        ranked = await scored_documents(self.backend, body.get("query"), documents, top_n)
        return web.json_response(_weaviate_answer(body.get("query"), documents, ranked))

    async def cohere_rerank(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        documents = _documents(body, "documents")
        return_documents = _flag(body, "return_documents")
        top_n = _top_n(body)
        ranked = await scored_documents(self.backend, body.get("query"), documents, top_n)
        return web.json_response(_cohere_answer(documents, ranked, return_documents))

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=204 if self.backend.ready else 503)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def meta(self, request: web.Request) -> web.Response:
        backend = self.backend
        info: dict[str, Any] = {"name": "tokenbinder", "version": tb_reranker.__version__}
        if backend.components is not None:
            model = backend.components.reranker.model
            info.update(
                fingerprint=backend.fingerprint,
                vision_fingerprint=backend.vision_fingerprint,
                query_fingerprint=backend.query_fingerprint,
                embed_dim=int(model.embed_dim),
                num_indicators=int(model.num_indicators),
                top_k=int(model.top_k),
                num_frames=int(model.num_frames),
                device=backend.components.device,
            )
        return web.json_response({"model": info})


def build_provider_app(
    backend: Backend,
    *,
    token: str = "",
    limiter: ConcurrencyLimitInterceptor | None = None,
    metrics: ServerMetrics | None = None,
) -> web.Application:
    """The aiohttp application of the provider endpoints (plus ``/metrics`` when ``metrics``)."""
    routes = _Routes(backend)
    app = web.Application(
        middlewares=[_guard_middleware(token, limiter, metrics)],
        client_max_size=backend.config.max_message_bytes,
    )
    app[BACKEND_KEY] = backend
    app.router.add_post("/rerank", routes.rerank)
    app.router.add_post("/v1/rerank", routes.cohere_rerank)
    app.router.add_post("/v2/rerank", routes.cohere_rerank)
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
