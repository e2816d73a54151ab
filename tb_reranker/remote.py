"""Remote transport of the SDK: the gRPC sidecar (``tb serve``) behind the ``Reranker`` verbs.

``RemoteReranker(target)`` has the same ``encode`` / ``rerank`` / ``search`` / ``invalidate``
signatures and result types as the in-process :class:`tb_reranker.rerank.Reranker`, so
``Client(reranker="host:port")`` swaps one for the other. ``AsyncRemoteReranker`` is its asyncio
twin (same verbs, awaitable).

Every call carries a deadline (``timeout``). Only UNAVAILABLE is retried, with exponential
backoff and jitter (``retries`` extra attempts), and not when the server says the cause is not
retriable (a corrupt store entry, ``StoreError``); every other status maps straight back to the
``tb_reranker.errors`` type the server raised (sent in the ``tb-error-type`` trailer) or, for
statuses from the transport itself, to the type of :data:`STATUS_ERRORS`.

The queries of one ``rerank``/``search`` call are sent as concurrent RPCs, which the server's
micro-batcher fuses into one device batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from tb_reranker import errors
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2 as pb
from tb_reranker._pb.tb_reranker.v1 import reranker_pb2_grpc as pb_grpc
from tb_reranker.auth import check_token
from tb_reranker.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    RerankerUnavailableError,
    ResourceExhaustedError,
    TBError,
)
from tb_reranker.filters import check_filter
from tb_reranker.server.convert import (
    hit_from_proto,
    metadata_from_proto,
    tensor_from_proto,
    tensor_to_proto,
)

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.types import Hit, RerankResult

__all__ = ["RemoteReranker", "AsyncRemoteReranker", "TLSConfig", "STATUS_ERRORS", "check_target"]

log = logging.getLogger(__name__)

ERROR_TYPE_KEY = "tb-error-type"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# status code -> error type when the server did not name one (transport-level failures)
STATUS_ERRORS: dict[grpc.StatusCode, type[TBError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: RerankerUnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
}


@dataclass(frozen=True)
class TLSConfig:
    """TLS towards the sidecar. Paths to PEM files; all optional."""

    ca_cert: str = ""  # CA bundle that signed the server certificate ("" = system roots)
    client_cert: str = ""  # client certificate chain for mTLS
    client_key: str = ""  # private key of client_cert
    server_name: str = ""  # expected name in the server certificate ("" = the target host)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None

        if bool(self.client_cert) != bool(self.client_key):
            raise InvalidInputError("client_cert and client_key must be given together")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def _tls_config(tls: TLSConfig | bool | None) -> TLSConfig | None:
    if tls is None or tls is False:
        return None
    if tls is True:
        return TLSConfig()
    if isinstance(tls, TLSConfig):
        return tls
    raise InvalidInputError(f"tls must be a TLSConfig, True or None, got {type(tls).__name__}")


def _channel_options(tls: TLSConfig | None, max_message_bytes: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are ours (UNAVAILABLE only, with backoff)
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def _named_error(exc: grpc.RpcError) -> type[TBError] | None:
    """The ``TBError`` class the server named in the ``tb-error-type`` trailer, if any."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == ERROR_TYPE_KEY:
            named = getattr(errors, str(value), None)
            if (
                isinstance(named, type)
                and issubclass(named, TBError)
                and named is not errors.VideoDecodeError  # (path, reason) constructor
            ):
                return named
    return None


def _should_retry(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE from the transport, or from a server error that says it is retriable
    (model still loading, Milvus down); not a corrupt store entry, which stays corrupt."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    named = _named_error(exc)
    return named is None or named.retriable


def map_rpc_error(exc: grpc.RpcError, target: str = "") -> TBError:
    """A gRPC error → the ``tb_reranker.errors`` type it stands for (message kept)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    named = _named_error(exc)
    if named is not None:
        return named(details)
    kind = STATUS_ERRORS.get(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        return RerankerUnavailableError(f"reranker at {target} is unavailable: {details}")
    if kind is not None:
        return kind(details)
    return TBError(f"reranker call failed with {code.name}: {details}")


def _backoff(attempt: int, base: float = 0.1, cap: float = 2.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * (2**attempt)))


# gRPC name-resolver schemes a target may carry (https://grpc.github.io/grpc/core/md_doc_naming.html)
_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def check_target(target: Any) -> str:
    """``host:port`` (or a gRPC resolver URI such as ``dns:///host:port``, ``unix:/path``);
    an ``http(s)://`` URL or a target without a port is a configuration error, said at once
    instead of being retried as if the server were down."""
    if not isinstance(target, str) or not target.strip():
        raise InvalidInputError("target must be 'host:port' of a tb serve sidecar")
    target = target.strip()
    lowered = target.lower()
    if lowered.startswith(_GRPC_SCHEMES):
        return target
    if "://" in target:
        scheme = target.split("://", 1)[0]
        hint = " and tls=True" if lowered.startswith("https") else ""
        raise InvalidInputError(
            f"reranker target {target!r} is a {scheme}:// URL; the sidecar speaks gRPC: give "
            f"'host:port'{hint} (e.g. {target.split('://', 1)[1].split('/', 1)[0]!r})"
        )
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(
            f"reranker target {target!r} is not 'host:port' (e.g. '127.0.0.1:50051')"
        )
    if any(c.isspace() or c in "/?#@" for c in host):
        raise InvalidInputError(f"reranker target {target!r} has an invalid host part")
    return target


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


# ---------------------------------------------------------------------- request/response helpers
def _queries(indicators: Any) -> np.ndarray:
    array = np.asarray(indicators, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] == 0:
        raise InvalidInputError(f"indicators must have shape [Q, m, D], got {list(array.shape)}")
    return array


def _rerank_requests(
    indicators: Any,
    candidates_ids: Sequence[Sequence[str]],
    broad_scores: Sequence[Sequence[float]] | None,
    top_n: int | None,
    strict: bool,
    contents_hashes: Sequence[Sequence[str | None]] | None,
) -> list[pb.RerankRequest]:
    queries = _queries(indicators)
    if isinstance(candidates_ids, str) or len(candidates_ids) != len(queries):
        raise InvalidInputError(f"{len(queries)} queries but {len(candidates_ids)} candidate lists")
    if broad_scores is not None and len(broad_scores) != len(queries):
        raise InvalidInputError(f"{len(queries)} queries but {len(broad_scores)} score lists")
    if top_n is not None and top_n <= 0:
        raise InvalidInputError(f"top_n must be positive, got {top_n}")
    requests = []
    for q, ids in enumerate(candidates_ids):
        if isinstance(ids, str):
            raise InvalidInputError("each query's candidates must be a list of ids")
        request = pb.RerankRequest(
            indicators=tensor_to_proto(queries[q]),
            candidates_ids=list(ids),
            top_n=top_n or 0,
            strict=strict,
        )
        if broad_scores is not None:
            request.broad_scores.extend(float(s) for s in broad_scores[q])
        if contents_hashes is not None and contents_hashes[q] is not None:
            request.contents_hashes.extend(h or "" for h in contents_hashes[q])
        requests.append(request)
    return requests


def _rerank_result(response: pb.RerankResponse) -> RerankResult:
    from tb_reranker.types import RerankedCandidate, RerankResult

    candidates = [
        RerankedCandidate(
            id=rank.id,
            index=int(rank.index),
            score=float(rank.score),
            broad_score=float(rank.broad_score),
            delta=float(rank.delta),
            best_frame_s=float(rank.best_frame_s) if rank.HasField("best_frame_s") else None,
            reranked=bool(rank.reranked),
        )
        for rank in response.ranks
    ]
    return RerankResult(
        candidates=candidates,
        missing_ids=[missing.id for missing in response.missing],
        timings=metadata_from_proto(response.metadata),
    )


def _search_requests(
    queries: Any, limit: int, rerank: bool, filter: str | None
) -> list[pb.SearchRequest]:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise InvalidInputError(f"limit must be a positive integer, got {limit!r}")
    if isinstance(queries, str):
        raise InvalidInputError("queries must be a list (use Client.search for one text)")
    # syntax and type here; the length and depth limits are the server's (its own settings)
    filter = check_filter(filter, max_chars=sys.maxsize, max_depth=sys.maxsize)
    common = {"limit": limit, "rerank": rerank, "filter": filter or ""}
    if len(queries) and isinstance(queries[0], str):
        return [pb.SearchRequest(text=text, **common) for text in queries]
    return [
        pb.SearchRequest(indicators=tensor_to_proto(query), **common) for query in _queries(queries)
    ]


def _info_dict(response: pb.InfoResponse) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# ---------------------------------------------------------------------- sync
class _RemoteBase:
    """Arguments and channel settings shared by the sync and async transports."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLSConfig | bool | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        target = check_target(target)
        if timeout <= 0 or retries < 0:
            raise InvalidInputError("timeout must be positive and retries not negative")
        self.target = target
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._metadata = _metadata(check_token(token, what="the reranker token"))
        self._tls = _tls_config(tls)
        self._options = _channel_options(self._tls, max_message_bytes)
        self._info: dict[str, Any] | None = None


class RemoteReranker(_RemoteBase):
    """The ``Reranker`` verbs over gRPC.

    Args:
        target: ``host:port`` of ``tb serve``.
        token: bearer token (``tb serve --token``).
        tls: ``TLSConfig`` (or True for system roots); None = plaintext.
        timeout: deadline of each call, seconds.
        retries: extra attempts on UNAVAILABLE (exponential backoff with jitter).
        max_message_bytes: gRPC message size limit of this channel.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TLSConfig | bool | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        super().__init__(
            target,
            token=token,
            tls=tls,
            timeout=timeout,
            retries=retries,
            max_message_bytes=max_message_bytes,
        )
        self._channel = (
            grpc.secure_channel(target, self._tls.credentials(), options=self._options)
            if self._tls is not None
            else grpc.insecure_channel(target, options=self._options)
        )
        self._encode = pb_grpc.EncodeServiceStub(self._channel)
        self._rerank = pb_grpc.RerankServiceStub(self._channel)
        self._search = pb_grpc.SearchServiceStub(self._channel)
        self._info_stub = pb_grpc.InfoServiceStub(self._channel)

    # -- plumbing
    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return self._call_many(method, [request])[0]

    def _call_many(self, method: Callable[..., Any], requests: Sequence[Any]) -> list[Any]:
        """Send all requests concurrently (futures); retry the UNAVAILABLE ones with backoff."""
        results: list[Any] = [None] * len(requests)
        pending = list(range(len(requests)))
        for attempt in range(self.retries + 1):
            deadline_s = self.timeout
            futures = {
                n: method.future(requests[n], timeout=deadline_s, metadata=self._metadata)
                for n in pending
            }
            failed: list[int] = []
            last_error: grpc.RpcError | None = None
            for n, future in futures.items():
                try:
                    results[n] = future.result()
                except grpc.RpcError as exc:
                    if _should_retry(exc) and attempt < self.retries:
                        failed.append(n)
                        last_error = exc
                        continue
                    for other in futures.values():
                        other.cancel()
                    raise map_rpc_error(exc, self.target) from None
            if not failed:
                return results
            delay = _backoff(attempt)
            log.debug(
                "reranker %s unavailable (%s); retry %d/%d in %.2f s",
                self.target,
                last_error.details() if last_error is not None else "",
                attempt + 1,
                self.retries,
                delay,
            )
            time.sleep(delay)
            pending = failed
        raise AssertionError("unreachable")  # pragma: no cover

    # -- verbs
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → indicators ``[Q, m, D]`` float32."""
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        response = self._call(self._encode.Encode, pb.EncodeRequest(texts=list(texts)))
        return tensor_from_proto(response.indicators, name="indicators")

    def rerank(
        self,
        indicators: Any,
        candidates_ids: Sequence[Sequence[str]],
        broad_scores: Sequence[Sequence[float]] | None = None,
        *,
        top_n: int | None = None,
        strict: bool = False,
        contents_hashes: Sequence[Sequence[str | None]] | None = None,
    ) -> list[RerankResult]:
        """Same contract as ``Reranker.rerank``; one RPC per query, sent concurrently."""
        requests = _rerank_requests(
            indicators, candidates_ids, broad_scores, top_n, strict, contents_hashes
        )
        return [_rerank_result(r) for r in self._call_many(self._rerank.Rerank, requests)]

    def search(
        self,
        index_or_queries: Any,
        queries: Sequence[str] | Any | None = None,
        *,
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        max_limit: int = 1024,
    ) -> list[list[Hit]]:
        """Same contract as ``Reranker.search``, run by the sidecar against *its* collection.

        Call as ``search(queries, ...)`` or, like ``Reranker.search``, ``search(index, queries,
        ...)``: the index is then ignored, the sidecar queries the Milvus collection it was
        started with.
        """
        queries = index_or_queries if queries is None else queries
        if limit > max_limit:
            raise InvalidInputError(f"limit {limit} exceeds the maximum of {max_limit}")
        requests = _search_requests(queries, limit, rerank, filter)
        responses = self._call_many(self._search.Search, requests)
        return [[hit_from_proto(hit) for hit in response.hits] for response in responses]

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        """Forget the sidecar's cached projections of these videos (all when ``None``)."""
        request = (
            pb.InvalidateRequest(all=True)
            if videos_ids is None
            else pb.InvalidateRequest(videos_ids=list(videos_ids))
        )
        self._call(self._rerank.Invalidate, request)

    def info(self) -> dict[str, Any]:
        """Server versions, model fingerprint and dims, limits, cache stats."""
        return _info_dict(self._call(self._info_stub.Info, pb.InfoRequest()))

    # -- model facts (cached from Info)
    def _model_info(self) -> dict[str, Any]:
        if self._info is None or not self._info.get("model_fingerprint"):
            self._info = self.info()
        return self._info

    @property
    def embed_dim(self) -> int:
        return int(self._model_info()["embed_dim"])

    @property
    def num_indicators(self) -> int:
        return int(self._model_info()["num_indicators"])

    @property
    def top_k(self) -> int:
        return int(self._model_info()["top_k"])

    @property
    def fingerprint(self) -> str:
        return str(self._model_info()["model_fingerprint"])

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteReranker({self.target!r})"


# ---------------------------------------------------------------------- async
class AsyncRemoteReranker(_RemoteBase):
    """The asyncio twin of :class:`RemoteReranker` (same arguments, awaitable verbs)."""

    _channel: grpc.aio.Channel | None = None  # created on first use inside the running loop

    def _get_channel(self) -> grpc.aio.Channel:
        # the aio channel binds to the running loop: create it on first use inside the loop
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self._tls.credentials(), options=self._options)
                if self._tls is not None
                else grpc.aio.insecure_channel(self.target, options=self._options)
            )
        return self._channel

    async def _call(self, service: str, method: str, request: Any, response_type: Any) -> Any:
        channel = self._get_channel()
        callable_ = channel.unary_unary(
            f"/tb_reranker.v1.{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        for attempt in range(self.retries + 1):
            try:
                return await callable_(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if _should_retry(exc) and attempt < self.retries:
                    delay = _backoff(attempt)
                    log.debug("reranker %s unavailable; retry in %.2f s", self.target, delay)
                    await asyncio.sleep(delay)
                    continue
                raise map_rpc_error(exc, self.target) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        response = await self._call(
            "EncodeService", "Encode", pb.EncodeRequest(texts=list(texts)), pb.EncodeResponse
        )
        return tensor_from_proto(response.indicators, name="indicators")

    async def rerank(
        self,
        indicators: Any,
        candidates_ids: Sequence[Sequence[str]],
        broad_scores: Sequence[Sequence[float]] | None = None,
        *,
        top_n: int | None = None,
        strict: bool = False,
        contents_hashes: Sequence[Sequence[str | None]] | None = None,
    ) -> list[RerankResult]:
        requests = _rerank_requests(
            indicators, candidates_ids, broad_scores, top_n, strict, contents_hashes
        )
        responses = await asyncio.gather(
            *(self._call("RerankService", "Rerank", r, pb.RerankResponse) for r in requests)
        )
        return [_rerank_result(r) for r in responses]

    async def search(
        self,
        index_or_queries: Any,
        queries: Sequence[str] | Any | None = None,
        *,
        limit: int = 10,
        rerank: bool = True,
        filter: str | None = None,
        max_limit: int = 1024,
    ) -> list[list[Hit]]:
        queries = index_or_queries if queries is None else queries
        if limit > max_limit:
            raise InvalidInputError(f"limit {limit} exceeds the maximum of {max_limit}")
        requests = _search_requests(queries, limit, rerank, filter)
        responses = await asyncio.gather(
            *(self._call("SearchService", "Search", r, pb.SearchResponse) for r in requests)
        )
        return [[hit_from_proto(hit) for hit in response.hits] for response in responses]

    async def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        request = (
            pb.InvalidateRequest(all=True)
            if videos_ids is None
            else pb.InvalidateRequest(videos_ids=list(videos_ids))
        )
        await self._call("RerankService", "Invalidate", request, pb.InvalidateResponse)

    async def info(self) -> dict[str, Any]:
        response = await self._call("InfoService", "Info", pb.InfoRequest(), pb.InfoResponse)
        self._info = _info_dict(response)
        return self._info

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncRemoteReranker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncRemoteReranker({self.target!r})"
