"""The HTTP ports' transport rules: error bodies, auth, body reading, load shedding, shutdown.

Used by :mod:`tb_reranker.server.http` for the provider endpoints. A POST to a known route is
handled in this order, so that no client can hold anything it has not earned:

1. auth (with a token): 401 with ``WWW-Authenticate: Bearer`` before a byte of the body is read;
2. the media type: 415 unless JSON (``application/json``, ``text/json``, ``*/*+json``; a
   missing Content-Type too), or a charset other than UTF-8;
3. the body, whole, within ``http_body_timeout_s`` of the headers: 408 (and the connection
   closed) after that; 413 over ``max_message_bytes``; 400 when it does not decode; a client
   that goes away is counted as status 499 and answered nothing;
4. its JSON (400 when invalid);
5. one of the HTTP surface's own ``max_concurrency`` slots (429 when all are taken), held only
   while the route works. gRPC has its own slots: neither surface can starve the other.

Requests aiohttp's parser refuses before routing (a negative or duplicate Content-Length, an
unsupported Content-Encoding such as br or zstd, an over-long request line or header) get the
parser's 400 and one debug line (:class:`ParserLog`), never an ERROR with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tb_reranker.errors import TBError
from tb_reranker.server.interceptors import Slots, bearer_matches
from tb_reranker.server.metrics import ServerMetrics
from tb_reranker.server.scrub import public_message
from tb_reranker.wire.status import HTTP_STATUS, grpc_status_name

__all__ = [
    "BODY_KEY",
    "BodyError",
    "ParserLog",
    "error_response",
    "error_type",
    "guard_middleware",
    "http_runner",
    "parse_json",
    "stop_runners",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

BODY_KEY = web.RequestKey("tb_body", dict)  # the parsed JSON body of a POST (set by the guard)
CLIENT_GONE = 499  # status counted for a request whose client closed the connection (nginx's)
_CANCEL_WAIT_S = 0.5  # at shutdown, after the grace: how long a handler may take to unwind
_LINGER_S = 2.0  # after an error answered before the body was read: how long its rest is drained
_KEEPALIVE_S = 75.0  # an idle keep-alive connection is closed after this (aiohttp's default: 1 h)

# HTTP status -> error_type: gRPC's status code names, the one vocabulary of every error body
_ERROR_TYPES: dict[int, str] = {
    **{status: name for name, status in HTTP_STATUS.items()},
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    500: "INTERNAL",
}


def error_type(status: int) -> str:
    """The ``error_type`` of an HTTP error body: the gRPC status code name of ``status``.

    400 and 415 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 404 NOT_FOUND, 405 UNIMPLEMENTED, 408 and
    504 DEADLINE_EXCEEDED, 412 FAILED_PRECONDITION, 413 and 429 RESOURCE_EXHAUSTED, 500
    INTERNAL, 503 UNAVAILABLE; any other 4xx INVALID_ARGUMENT, any other 5xx INTERNAL.
    """
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "INTERNAL" if status >= 500 else "INVALID_ARGUMENT"


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"error": message, "error_type": error_type(status)}`` with ``status``."""
    return web.json_response(
        {"error": message, "error_type": error_type(status)}, status=status, headers=headers
    )


def _unauthorized(header: str | None) -> web.Response:
    """401 with the RFC 6750 challenge; ``error="invalid_token"`` when a Bearer token was sent."""
    challenge = 'Bearer realm="tb_reranker"'
    if header and header.strip().partition(" ")[0].lower() == "bearer":
        challenge += ', error="invalid_token"'
    return error_response(
        401,
        "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
        {"WWW-Authenticate": challenge},
    )


class BodyError(Exception):
    """A request body we cannot take: answered with ``status`` and a JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ClientGone(Exception):
    """The client closed the connection before its body arrived."""


_JSON_TYPES = ("application/json", "text/json")


def check_content_type(content_type: str | None) -> None:
    """:class:`BodyError` 415 unless ``content_type`` is JSON in UTF-8.

    A missing Content-Type is refused as well: browsers send a body without one (or as
    ``text/plain``) cross-origin without a CORS preflight, and every known client of these
    routes declares ``application/json``.
    """
    if not content_type or not content_type.strip():
        raise BodyError(415, "send JSON with 'Content-Type: application/json' (none was given)")
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media not in _JSON_TYPES and not media.endswith("+json"):
        raise BodyError(415, f"send JSON (Content-Type: application/json), not {media[:80]!r}")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise BodyError(415, f"JSON bodies are UTF-8, not charset={charset[:40]!r}")


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body → its JSON object, or :class:`BodyError` 400, never anything else.

    JSON is UTF-8 (RFC 8259). Invalid UTF-8, invalid JSON, ``NaN`` / ``Infinity``, nesting
    deeper than the parser allows and a non-object top level are 400.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise BodyError(400, "the body nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError and the NaN/Infinity refusal
        raise BodyError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BodyError(400, "the body must be a JSON object")
    return body


def _first_line(text: object, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line[:limit]


async def read_body(request: web.Request, timeout: float) -> dict[str, Any]:
    """The JSON object of ``request``'s body, read whole within ``timeout`` seconds."""
    check_content_type(request.headers.get("Content-Type"))
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()  # 413 (HTTPRequestEntityTooLarge) past client_max_size
    except TimeoutError:
        raise BodyError(
            408, f"the request body did not arrive within {timeout:g} s (http_body_timeout_s)"
        ) from None
    except ConnectionError:
        raise _ClientGone from None
    except (HttpProcessingError, web.RequestPayloadError) as exc:  # bad gzip/deflate, chunks
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        message = getattr(cause, "message", None) or str(cause)
        raise BodyError(400, f"unreadable request body: {_first_line(message)}") from None
    return parse_json(raw)


class _Requests:
    """Requests inside the guard, so that a shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.count += 1
        self.idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


REQUESTS_KEY = web.AppKey("tb_requests", _Requests)


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _tb_error(request: web.Request, exc: TBError) -> web.Response:
    status = HTTP_STATUS.get(grpc_status_name(exc), 500)
    log.log(
        logging.DEBUG if status < 500 and status != 412 else logging.WARNING,
        "%s %s: %s: %s",
        request.method,
        request.path,
        type(exc).__name__,
        exc,
    )
    return error_response(status, public_message(exc))


async def _respond(
    request: web.Request, handler: Handler, answer: Callable[..., Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """``answer``'s response, with every failure turned into a JSON error (one mapping)."""
    try:
        return await answer(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own refusals (413 body too large, 404, 405) as JSON like ours
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, allow)
    except BodyError as exc:
        response = error_response(exc.status, exc.message)
        if exc.status == 408:
            response.force_close()  # the rest of a stalled body is not waited for
        return response
    except _ClientGone:
        log.debug("%s %s: the client closed the connection mid-body", request.method, request.path)
        return web.Response(status=CLIENT_GONE)  # never delivered: counted, not logged as ours
    except TBError as exc:
        return _tb_error(request, exc)
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        return error_response(500, "internal server error (details in the server log)")


def guard_middleware(
    token: str, slots: Slots, metrics: ServerMetrics | None, body_timeout: float
) -> tuple[Any, _Requests]:
    """The provider app's middleware (auth, body, slots, errors, metrics) and its request count."""
    expected = token.encode()
    requests = _Requests()

    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.match_info.http_exception is not None:
            return await handler(request)  # probes, and aiohttp's 404/405
        header = request.headers.get("Authorization")
        if expected and not bearer_matches(header, expected):
            return _unauthorized(header)
        request[BODY_KEY] = await read_body(request, body_timeout)
        if not slots.try_acquire():
            return error_response(429, slots.busy_message())
        try:
            return await handler(request)
        finally:
            slots.release()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = CLIENT_GONE  # cancelled: the connection was closed under the request
        requests.enter()
        try:
            response = await _respond(request, handler, answer)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            requests.leave()
            if metrics is not None:
                metrics.observe_http(_route(request), status, time.perf_counter() - started)

    return guard, requests


class ParserLog(logging.LoggerAdapter):
    """aiohttp's server logger for our ports. A request its parser refuses (bad framing, an
    unsupported Content-Encoding, an over-long line) is the client's mistake: one debug line
    and ``tb_http_malformed``, not an ERROR with a traceback. Anything else is logged as
    aiohttp would."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._malformed = metrics.http_malformed if metrics is not None else None

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            if self._malformed is not None:
                self._malformed.inc()
            log.debug("malformed HTTP request refused: %s", _first_line(exc.message))
            return
        if isinstance(exc, web.RequestPayloadError):  # the rest of a body we already refused
            log.debug("undecodable HTTP request body dropped: %s", _first_line(exc))
            return
        if isinstance(exc, ConnectionError):
            log.debug("HTTP client went away: %s", exc)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


def http_runner(app: web.Application, metrics: ServerMetrics | None = None) -> web.AppRunner:
    """An ``AppRunner`` for one of our ports: quiet parser errors, bounded lingering and
    keep-alive, and a shutdown that :func:`stop_runners` bounds by the grace."""
    return web.AppRunner(
        app,
        access_log=None,
        logger=ParserLog(metrics),
        shutdown_timeout=_CANCEL_WAIT_S,
        lingering_time=_LINGER_S,
        keepalive_timeout=_KEEPALIVE_S,
    )


async def stop_runners(runners: list[web.AppRunner], grace: float) -> None:
    """Stop the HTTP ports within ``grace`` seconds (plus at most about a second to unwind).

    New connections are refused at once and idle keep-alive ones closed; requests in progress
    (a body still arriving included: it ends at ``http_body_timeout_s`` with 408) get until the
    grace runs out; whatever is left then is cancelled and its connection closed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for runner in runners:
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()  # idle connections close, busy ones after their answer
    for runner in runners:
        requests = runner.app.get(REQUESTS_KEY)
        if requests is None:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(requests.idle.wait(), max(0.0, deadline - loop.time()))
    for runner in runners:
        await runner.cleanup()
