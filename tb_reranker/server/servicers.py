"""The ``tb_reranker.v1`` servicers: thin translation between messages and the ``ServingEngine``.

Errors are mapped to status codes in one place (:func:`_rpc`): ``TBError`` subclasses through
``tb_reranker.wire.status.GRPC_STATUS``; anything else is logged once with its traceback and returned
as INTERNAL without internals.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

import tb_reranker
from tb_reranker.errors import (
    DeadlineExceededError,
    IndexUnavailableError,
    InvalidInputError,
    ModelMismatchError,
    TBError,
)
from tb_reranker.server.batcher import deadline_scope
from tb_reranker.server.engine import SearchDisabledError, ServingEngine
from tb_reranker.server.scrub import public_message
from tb_reranker.wire import pb, pb_grpc
from tb_reranker.wire.convert import (
    candidates_are_from_proto,
    hit_to_proto,
    metadata_to_proto,
    rerank_result_to_proto,
    search_options_from_proto,
    tensor_from_proto,
    tensor_to_proto,
)
from tb_reranker.wire.status import ERROR_TYPE_KEY, grpc_status_name, wire_error_name

__all__ = [
    "EncodeServicer",
    "RerankServicer",
    "SearchServicer",
    "InfoServicer",
    "SERVICE_NAMES",
    "add_servicers",
]

log = logging.getLogger(__name__)

API_VERSION = "tb_reranker.v1"
_DESCRIPTOR = pb.DESCRIPTOR
SERVICE_NAMES = {
    "encode": _DESCRIPTOR.services_by_name["EncodeService"].full_name,
    "rerank": _DESCRIPTOR.services_by_name["RerankService"].full_name,
    "search": _DESCRIPTOR.services_by_name["SearchService"].full_name,
    "info": _DESCRIPTOR.services_by_name["InfoService"].full_name,
}


# statuses that report the caller's own mistake (logged at debug level only)
_CALLER_STATUSES = frozenset(
    {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "UNAUTHENTICATED", "DEADLINE_EXCEEDED"}
)


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Deadline check + one error-to-status mapping for every RPC."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext) -> Any:
        try:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("the call's deadline expired before it started")
            with deadline_scope(remaining):  # the batchers drop the call once it expires
                coroutine = method(self, request, context)
                if remaining is None:
                    return await coroutine
                task = asyncio.ensure_future(coroutine)  # the task copies the scope's context
            try:
                return await asyncio.wait_for(task, remaining)
            except TimeoutError:
                raise DeadlineExceededError(
                    f"deadline of {remaining:.3f} s expired while the call was running"
                ) from None
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except SearchDisabledError as exc:
            log.debug("%s: %s", method.__qualname__, exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, public_message(exc))
        except TBError as exc:
            status = grpc_status_name(exc)
            # the full message (paths included) stays in the server log; the caller's own
            # mistakes are not worth more than a debug line
            log.log(
                logging.DEBUG if status in _CALLER_STATUSES else logging.WARNING,
                "%s: %s: %s",
                method.__qualname__,
                type(exc).__name__,
                exc,
            )
            await context.abort(
                grpc.StatusCode[status],
                public_message(exc),
                trailing_metadata=((ERROR_TYPE_KEY, wire_error_name(exc)),),
            )
        except Exception:
            log.exception("internal error in %s", method.__qualname__)
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal server error (details are in the server log)"
            )

    return wrapper


class EncodeServicer(pb_grpc.EncodeServiceServicer):
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    @_rpc
    async def Encode(self, request: pb.EncodeRequest, context: aio.ServicerContext):
        indicators, timings = await self.engine.encode(list(request.texts))
        return pb.EncodeResponse(
            indicators=tensor_to_proto(indicators),
            model_fingerprint=self.engine.fingerprint,
            metadata=metadata_to_proto(timings),
            query_fingerprint=self.engine.query_fingerprint,  # to send back with them
        )


class RerankServicer(pb_grpc.RerankServiceServicer):
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    @_rpc
    async def Rerank(self, request: pb.RerankRequest, context: aio.ServicerContext):
        _check_query_side(self.engine, request)
        query, result, timings = await self.engine.rerank(
            candidates_ids=list(request.candidates_ids),
            **_query_of(request),
            broad_scores=list(request.broad_scores) if len(request.broad_scores) else None,
            contents_hashes=list(request.contents_hashes) if len(request.contents_hashes) else None,
            top_n=int(request.top_n) or None,
            strict=bool(request.strict),
            candidates_are=candidates_are_from_proto(request),
        )
        return rerank_result_to_proto(result, query.candidates_ids, timings)

    @_rpc
    async def Invalidate(self, request: pb.InvalidateRequest, context: aio.ServicerContext):
        if request.all:
            await self.engine.invalidate(None)
        elif len(request.videos_ids):
            await self.engine.invalidate(list(request.videos_ids))
        return pb.InvalidateResponse()


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(
        self, engine: ServingEngine, on_milvus_status: Callable[[bool], Any] | None = None
    ):
        self.engine = engine
        self._on_milvus_status = on_milvus_status

    @_rpc
    async def Search(self, request: pb.SearchRequest, context: aio.ServicerContext):
        _check_query_side(self.engine, request)
        query = _query_of(request)
        try:
            hits, timings = await self.engine.search(
                query.get("text", query.get("indicators")), **search_options_from_proto(request)
            )
        except (IndexUnavailableError, SearchDisabledError):
            if self._on_milvus_status is not None:
                await self._on_milvus_status(False)
            raise
        if self._on_milvus_status is not None:
            await self._on_milvus_status(True)
        return pb.SearchResponse(
            hits=[hit_to_proto(hit) for hit in hits], metadata=metadata_to_proto(timings)
        )


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine

    @_rpc
    async def Info(self, request: pb.InfoRequest, context: aio.ServicerContext):
        engine, config = self.engine, self.engine.config
        response = pb.InfoResponse(
            server_version=tb_reranker.__version__,
            api_version=API_VERSION,
            grpc_version=grpc.__version__,
            batching=config.batching,
            limits=pb.Limits(
                max_candidates=config.max_candidates,
                max_text_chars=config.max_text_chars,
                max_texts=config.max_texts,
                max_batch=config.max_batch,
                max_wait_ms=round(config.max_wait_ms),
                max_concurrency=config.max_concurrency,
                max_message_bytes=config.max_message_bytes,
            ),
        )
        torch = sys.modules.get("torch")
        if torch is not None:
            response.torch_version = torch.__version__
        components = engine.components
        if components is None:
            return response  # still loading: versions and limits only
        model = components.reranker.model
        response.model_fingerprint = engine.fingerprint
        response.vision_fingerprint = engine.vision_fingerprint
        response.query_fingerprint = engine.query_fingerprint
        response.embed_dim = int(model.embed_dim)
        response.num_indicators = int(model.num_indicators)
        response.top_k = int(model.top_k)
        response.num_frames = int(model.num_frames)
        response.device = components.device
        response.dtype = components.dtype
        response.search_enabled = components.index is not None
        stats = engine.cache_stats()
        if stats is not None:
            response.cache.CopyFrom(pb.CacheStats(**stats))
        return response


def _query_of(request: pb.RerankRequest | pb.SearchRequest) -> dict[str, Any]:
    """The request's query oneof as ``{"text": str}`` or ``{"indicators": array}``."""
    which = request.WhichOneof("query")
    if which is None:
        raise InvalidInputError("the query is missing: set text or indicators")
    if which == "text":
        return {"text": request.text}
    return {"indicators": tensor_from_proto(request.indicators, name="indicators")}


def _check_query_side(engine: ServingEngine, request: pb.RerankRequest | pb.SearchRequest) -> None:
    """Indicators made by another query side (text tower, indicators, fusion) than the served
    model's are refused: the fusion would score them without error, and wrongly. An empty
    ``query_fingerprint`` (an older client, or indicators from this server's Encode) is
    trusted; a text query is encoded here and needs no check."""
    claimed = request.query_fingerprint
    if not claimed or request.WhichOneof("query") != "indicators":
        return
    engine.reranker  # noqa: B018 - raises while the model is loading (UNAVAILABLE)
    served = engine.query_fingerprint
    if claimed != served:
        raise ModelMismatchError(
            f"the indicators were encoded by another query side (text tower, indicators, "
            f"fusion: {claimed[:12]}) than this server's model ({served[:12]}); encode them "
            "with the checkpoint the server runs, or send the query text instead"
        )


def add_servicers(
    server: aio.Server,
    engine: ServingEngine,
    on_milvus_status: Callable[[bool], Any] | None = None,
) -> None:
    pb_grpc.add_EncodeServiceServicer_to_server(EncodeServicer(engine), server)
    pb_grpc.add_RerankServiceServicer_to_server(RerankServicer(engine), server)
    pb_grpc.add_SearchServiceServicer_to_server(SearchServicer(engine, on_milvus_status), server)
    pb_grpc.add_InfoServiceServicer_to_server(InfoServicer(engine), server)
