"""Server interceptors: metrics (outermost), bearer-token auth, bounded concurrency.

Each wraps unary-unary handlers (all ``tb_reranker.v1`` RPCs and Health.Check); streaming
handlers (Health.Watch, reflection) pass through metrics and the limiter untouched but are still
subject to auth, except the health service, which stays open so that load balancers and
orchestrators can probe without credentials.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from tb_reranker.server.metrics import ServerMetrics

__all__ = [
    "DecodeGuardInterceptor",
    "Undecodable",
    "MetricsInterceptor",
    "AuthInterceptor",
    "ConcurrencyLimitInterceptor",
    "Slots",
    "bearer_matches",
]

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
LIMITED_PREFIX = "/tb_reranker.v1."

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def bearer_matches(header: str | bytes | None, token: bytes) -> bool:
    """``Authorization`` value ``Bearer <token>`` (scheme case-insensitive, RFC 7235; Milvus sends
    ``bearer``), compared in constant time."""
    if not header or not token:
        return False
    value = header.encode() if isinstance(header, str) else bytes(header)
    scheme, _, given = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(given.strip(), token)


def _wrap_unary(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _rejecting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str):
    """A handler of the same kind as ``handler`` that fails every call with ``code``."""

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(code, details)

    async def streaming(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)


def _method_name(full: str) -> str:
    """'/tb_reranker.v1.RerankService/Rerank' -> 'RerankService/Rerank'."""
    service, _, method = full.lstrip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


class Undecodable:
    """Stands in for a request whose bytes did not parse (see :class:`DecodeGuardInterceptor`)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class DecodeGuardInterceptor(aio.ServerInterceptor):
    """Undecodable request bytes become INVALID_ARGUMENT, not UNKNOWN plus a traceback.

    grpc.aio deserialises a request just before it runs the handler, and a deserialiser that
    raises makes it log a traceback and answer UNKNOWN: one log flood per garbage call, even
    unauthenticated. This interceptor, placed innermost, gives every unary-request handler a
    deserialiser that never raises (it returns an :class:`Undecodable`) and answers such a
    request with INVALID_ARGUMENT once the outer interceptors (auth first) let it through. Each
    method is logged once at warning level, later ones at debug level.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def _note(self, method: str, reason: str) -> None:
        level = logging.DEBUG if method in self._warned else logging.WARNING
        self._warned.add(method)
        log.log(level, "undecodable request to %s (%s); answered INVALID_ARGUMENT", method, reason)

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        if not (handler.unary_unary or handler.unary_stream):
            return handler  # streamed requests are read by the servicer itself
        deserialize = handler.request_deserializer
        method = details.method
        message = f"the request is not a valid protobuf message for {method}"

        def safe_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:  # noqa: BLE001 - DecodeError, or anything odd in the bytes
                return Undecodable(f"{type(exc).__name__}: {exc}")

        async def reject_undecodable(request: Any, context: aio.ServicerContext) -> None:
            if isinstance(request, Undecodable):
                self._note(method, request.reason)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        kwargs = {
            "request_deserializer": safe_deserialize,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request: Any, context: aio.ServicerContext) -> Any:
                await reject_undecodable(request, context)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        stream_behavior = handler.unary_stream
        if inspect.isasyncgenfunction(stream_behavior):

            async def streaming(request: Any, context: aio.ServicerContext) -> Any:
                await reject_undecodable(request, context)
                async for item in stream_behavior(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)

        async def writing(request: Any, context: aio.ServicerContext) -> Any:
            # a servicer that sends with context.write (grpc_health's Watch)
            await reject_undecodable(request, context)
            return await stream_behavior(request, context)

        return grpc.unary_stream_rpc_method_handler(writing, **kwargs)


class MetricsInterceptor(aio.ServerInterceptor):
    """Counts unary calls and their latency by method and final status code."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary
        method = _method_name(details.method)
        metrics = self._metrics

        async def observed(request: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except aio.AbortError:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            except BaseException:
                code = "CANCELLED" if context.cancelled() else "UNKNOWN"
                raise
            finally:
                metrics.observe_call(method, code, time.perf_counter() - started)

        return _wrap_unary(handler, observed)


class AuthInterceptor(aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata (constant-time comparison)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("AuthInterceptor needs a non-empty token")
        self._token = token.encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return bearer_matches(value, self._token)
        return False

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(details):
            return handler
        log.debug("unauthenticated call to %s", details.method)
        return _rejecting(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
        )


class Slots:
    """At most ``limit`` calls in flight on one surface; the next ones are refused at once.

    gRPC and HTTP each hold their own ``Slots`` (both of ``max_concurrency``), so that a flood
    on one surface never starves the other. A slot is taken only once a call is complete and
    authenticated (HTTP: after its whole body arrived), for the time the call works.
    """

    def __init__(
        self,
        limit: int,
        *,
        gauge: Any | None = None,
        shed: Any | None = None,
        what: str = "calls",
    ) -> None:
        self.limit = limit
        self.in_flight = 0
        self._gauge = gauge  # a prometheus Gauge set to in_flight, or None
        self._shed = shed  # a prometheus Counter of refusals, or None
        self._what = what

    def try_acquire(self) -> bool:
        """Take a slot (event-loop thread only); False when all are taken (counted as shed)."""
        if self.in_flight >= self.limit:
            if self._shed is not None:
                self._shed.inc()
            return False
        self.in_flight += 1
        if self._gauge is not None:
            self._gauge.set(self.in_flight)
        return True

    def release(self) -> None:
        self.in_flight -= 1
        if self._gauge is not None:
            self._gauge.set(self.in_flight)

    def busy_message(self) -> str:
        return (
            f"server busy: {self.in_flight} {self._what} in flight "
            f"(max_concurrency={self.limit}); retry later"
        )


class ConcurrencyLimitInterceptor(aio.ServerInterceptor):
    """At most ``limit`` ``tb_reranker.v1`` calls in flight; the next ones get RESOURCE_EXHAUSTED.

    Load is shed at once instead of queueing without bound: a client should back off and retry
    (the remote SDK does not retry this code by itself; the caller decides). The slots are the
    gRPC surface's own (:class:`Slots`); the HTTP endpoints have theirs.
    """

    def __init__(self, limit: int, metrics: ServerMetrics | None = None) -> None:
        self.slots = Slots(
            limit,
            gauge=metrics.in_flight if metrics is not None else None,
            shed=metrics.shed if metrics is not None else None,
            what="gRPC calls",
        )

    @property
    def limit(self) -> int:
        return self.slots.limit

    @property
    def in_flight(self) -> int:
        return self.slots.in_flight

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if (
            handler is None
            or handler.unary_unary is None
            or not details.method.startswith(LIMITED_PREFIX)
        ):
            return handler
        behavior = handler.unary_unary

        slots = self.slots

        async def limited(request: Any, context: aio.ServicerContext) -> Any:
            if not slots.try_acquire():
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, slots.busy_message())
            try:
                return await behavior(request, context)
            finally:
                slots.release()

        return _wrap_unary(handler, limited)
