"""Remote transport of the SDK: the gRPC sidecar (``tb serve``) behind the ``Reranker`` verbs.

``RemoteReranker(target)`` has the ``encode`` / ``rerank`` / ``invalidate`` / ``info`` verbs of
the in-process :class:`tb_reranker.rerank.Reranker` with the same result types, plus ``search``
(the sidecar's own two-stage search against *its* Milvus collection). ``RemoteBackend`` is the
``RerankBackend`` over it that ``TwoStageSearch`` uses (``Client(reranker="host:port")``).
``AsyncRemoteReranker`` is the asyncio twin (same verbs, awaitable).

Arguments are checked here for types and shapes (``tb_reranker.requests`` with
``Limits.syntax_only()``); the numeric limits are the server's own settings, checked there and
mapped back to the same error type. Conversions and error tables are ``tb_reranker.wire``: the
SDK never imports the server.

Every call carries a deadline (``timeout``). Only UNAVAILABLE is retried, with exponential
backoff and jitter (``retries`` extra attempts), and not when the server says the cause is not
retriable (a corrupt store entry, ``StoreError``); every other status maps straight back to the
``tb_reranker.errors`` type the server raised (sent in the ``tb-error-type`` trailer) or, for
statuses from the transport itself, to the type of ``wire.status.STATUS_ERRORS``.

The queries of one ``rerank``/``search`` call are sent as concurrent RPCs, which the server's
micro-batcher fuses into one device batch. A target that resolves to several sidecars
(``dns:///rerankers.internal:50051``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``) has its calls
spread over all of them by gRPC's round_robin load balancing (``docs/scaling.md``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tb_reranker.auth import check_token
from tb_reranker.errors import InvalidInputError, RerankerUnavailableError, TBError
from tb_reranker.numbers import MAX_INT32, SECONDS, Bound
from tb_reranker.requests import Limits, RerankRequest, SearchRequest, check_texts
from tb_reranker.rerank.model_info import ModelInfo
from tb_reranker.types import Hit, RerankResult
from tb_reranker.wire import pb, pb_grpc
from tb_reranker.wire.convert import (
    hit_from_proto,
    info_from_proto,
    rerank_request_to_proto,
    rerank_result_from_proto,
    search_request_to_proto,
    tensor_from_proto,
)
from tb_reranker.wire.status import ERROR_TYPE_KEY, STATUS_ERRORS, named_error

__all__ = [
    "Indicators",
    "RemoteReranker",
    "AsyncRemoteReranker",
    "RemoteBackend",
    "TLSConfig",
    "check_target",
    "map_rpc_error",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_SYNTAX = Limits.syntax_only()  # the server checks its own numeric limits


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


# gRPC's own client-side load balancing: every address the target resolves to (a headless
# Service's DNS name, ``dns:///host:port``, ``ipv4:a:p1,b:p2``) gets a connection and calls go
# round robin over the ready ones (gRPC's default, pick_first, sends them all to one replica).
# Used as the default service config: one that a resolver returns itself takes precedence.
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def _channel_options(tls: TLSConfig | None, max_message_bytes: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # retries are ours (UNAVAILABLE only, with backoff)
        ("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG),
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def _named_error(exc: grpc.RpcError) -> type[TBError] | None:
    """The ``TBError`` class the server named in the ``tb-error-type`` trailer, if any."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == ERROR_TYPE_KEY:
            return named_error(str(value))
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
    kind = STATUS_ERRORS.get(code.name)
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


# ---------------------------------------------------------------------- requests
class Indicators(np.ndarray):
    """Query indicators ``[Q, m, D]`` float32 from a sidecar's Encode, with the query side that
    made them: ``query_fingerprint`` (``EncodeResponse.query_fingerprint``; "" from a sidecar
    older than the field). ``rerank`` and ``search`` send it back with them, so a sidecar with
    another query side (another replica behind the same target, a model swapped in between)
    refuses them with ``ModelMismatchError`` instead of scoring them. Slices and views keep it;
    ``np.asarray`` and pickling drop it (then nothing is checked, as for any other array)."""

    query_fingerprint: str = ""

    def __array_finalize__(self, obj: Any) -> None:
        self.query_fingerprint = getattr(obj, "query_fingerprint", "")


def _encode_message(texts: Sequence[str]) -> pb.EncodeRequest:
    return pb.EncodeRequest(texts=check_texts(texts, _SYNTAX))


def _indicators(response: pb.EncodeResponse) -> Indicators:
    indicators = tensor_from_proto(response.indicators, name="indicators").view(Indicators)
    indicators.query_fingerprint = response.query_fingerprint
    return indicators


def _attached_fingerprint(indicators: Any) -> str:
    """The query side an :class:`Indicators` array came from ("" for any other value)."""
    return indicators.query_fingerprint if isinstance(indicators, Indicators) else ""


def _fingerprint_option(options: dict[str, Any], indicators: Any = None) -> str:
    """``query_fingerprint`` popped from ``options``: the query side that encoded the given
    indicators (``TokenBinder.query_fingerprint()``); when not given, the one an
    :class:`Indicators` array carries from Encode; "" = unknown, not checked."""
    value = options.pop("query_fingerprint", None) or _attached_fingerprint(indicators)
    if not isinstance(value, str):
        raise InvalidInputError("query_fingerprint must be a string")
    return value


def _rerank_messages(
    indicators: Any, candidates_ids: Any, broad_scores: Any, options: dict[str, Any]
) -> list[pb.RerankRequest]:
    """``rerank``'s arguments (``options``: top_n, strict, contents_hashes, candidates_are,
    query_fingerprint) → one message per query, checked for types and shapes first."""
    fingerprint = _fingerprint_option(options, indicators)
    request = RerankRequest.build(
        indicators, candidates_ids, broad_scores, shape=None, limits=_SYNTAX, **options
    )
    return rerank_request_to_proto(request, fingerprint)


def _search_messages(queries: Any, options: dict[str, Any]) -> list[pb.SearchRequest]:
    """``search``'s arguments (``options``: limit, rerank, filter, group, moments_per_video,
    query_fingerprint) → one message per query."""
    fingerprint = _fingerprint_option(options, queries)
    return search_request_to_proto(
        SearchRequest.build(queries, shape=None, limits=_SYNTAX, **options), fingerprint
    )


def _invalidate_message(videos_ids: Sequence[str] | None) -> pb.InvalidateRequest:
    if videos_ids is None:
        return pb.InvalidateRequest(all=True)
    return pb.InvalidateRequest(videos_ids=list(videos_ids))


def _hits(response: pb.SearchResponse) -> list[Hit]:
    return [hit_from_proto(hit) for hit in response.hits]


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
        self.target = target
        self.timeout = SECONDS.check(timeout, "timeout")  # inf/nan: never a deadline of 0
        self.retries = Bound(0, 100).check(retries, "retries")
        max_message_bytes = Bound(1024, MAX_INT32).check(max_message_bytes, "max_message_bytes")
        self._metadata = _metadata(check_token(token, what="the reranker token"))
        self._tls = _tls_config(tls)
        self._options = _channel_options(self._tls, max_message_bytes)
        self._info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class RemoteReranker(_RemoteBase):
    """The ``Reranker`` verbs over gRPC.

    Args:
        target: ``host:port`` of ``tb serve``, or a gRPC target naming several (``dns:///name:port``,
            ``ipv4:a:port,b:port``): calls go round robin over every address it resolves to.
        token: bearer token (``tb serve --token``).
        tls: ``TLSConfig`` (or True for system roots); None = plaintext.
        timeout: deadline of each call, seconds.
        retries: extra attempts on UNAVAILABLE (exponential backoff with jitter).
        max_message_bytes: gRPC message size limit of this channel.
    """

    def __init__(self, target: str, **options: Any) -> None:
        super().__init__(target, **options)
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
            futures = {
                n: method.future(requests[n], timeout=self.timeout, metadata=self._metadata)
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
    def encode(self, texts: Sequence[str]) -> Indicators:
        """Texts → indicators ``[Q, m, D]`` float32, an :class:`Indicators` array that carries
        the sidecar's query side to ``rerank`` and ``search``."""
        return _indicators(self._call(self._encode.Encode, _encode_message(texts)))

    def rerank(
        self, indicators: Any, candidates_ids: Any, broad_scores: Any = None, **options: Any
    ) -> list[RerankResult]:
        """Same contract as ``Reranker.rerank`` (``top_n``, ``strict``, ``contents_hashes``,
        ``candidates_are``: "video" by default, "segment" for record keys), plus
        ``query_fingerprint``: the ``query_fingerprint()`` of the model that encoded
        ``indicators`` (the sidecar refuses another query side with ``ModelMismatchError``;
        None: not checked). One RPC per query, sent concurrently."""
        return self._reranked(_rerank_messages(indicators, candidates_ids, broad_scores, options))

    def rerank_request(
        self, request: RerankRequest, *, query_fingerprint: str | None = None
    ) -> list[RerankResult]:
        """``rerank`` of an already validated request; ``query_fingerprint``: the query side
        that encoded its indicators (the sidecar refuses another one: ``ModelMismatchError``;
        None: the one its :class:`Indicators` carry from Encode, if any)."""
        fingerprint = query_fingerprint or _attached_fingerprint(request.indicators)
        return self._reranked(rerank_request_to_proto(request, fingerprint))

    def _reranked(self, messages: list[pb.RerankRequest]) -> list[RerankResult]:
        return [rerank_result_from_proto(r) for r in self._call_many(self._rerank.Rerank, messages)]

    def search(self, queries: Sequence[str] | Any, **options: Any) -> list[list[Hit]]:
        """Two-stage search run by the sidecar against *its* Milvus collection: one hit list
        per query text (or indicator set of ``[Q, m, D]``); ``limit`` (10), ``rerank`` (True),
        ``filter`` (None), ``group`` ("video"), ``moments_per_video`` (3) as in
        ``Client.search``."""
        return self._searched(_search_messages(queries, options))

    def search_request(self, request: SearchRequest) -> list[list[Hit]]:
        """``search`` of an already validated request."""
        return self._searched(search_request_to_proto(request))

    def _searched(self, messages: list[pb.SearchRequest]) -> list[list[Hit]]:
        return [_hits(r) for r in self._call_many(self._search.Search, messages)]

    def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        """Forget the sidecar's cached projections of these videos (all when ``None``)."""
        self._call(self._rerank.Invalidate, _invalidate_message(videos_ids))

    def info(self) -> dict[str, Any]:
        """Server versions, model fingerprint and dims, limits, cache stats."""
        return info_from_proto(self._call(self._info_stub.Info, pb.InfoRequest()))

    # -- model facts (cached from Info)
    def _model_info(self) -> dict[str, Any]:
        if self._info is None or not self._info.get("model_fingerprint"):
            self._info = self.info()
        return self._info

    def model_info(self) -> ModelInfo:
        """The served model's shape and K (one Info call, then cached)."""
        return ModelInfo.of(self)

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

    @property
    def vision_fingerprint(self) -> str:
        """The served model's vision fingerprint ("" from a sidecar older than the field)."""
        return str(self._model_info().get("vision_fingerprint", ""))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteBackend:
    """``RerankBackend`` over a sidecar: reranks there; encodes there too, or here with
    ``encode`` (a local text tower keeps broad-only search alive while the sidecar is down).

    Args:
        remote: the ``RemoteReranker`` of the sidecar.
        encode: validated texts → indicators ``[Q, m, D]`` in this process (None: the sidecar).
        info: the model's ``ModelInfo`` when known here (None: asked from the sidecar once).
        fingerprint: the local encoder's ``query_fingerprint`` (None: encoded queries are not
            cached by the search pipeline).
    """

    def __init__(
        self,
        remote: RemoteReranker,
        *,
        encode: Callable[[Sequence[str]], np.ndarray] | None = None,
        info: ModelInfo | None = None,
        fingerprint: Callable[[], str] | None = None,
    ) -> None:
        self.remote = remote
        self._encode = encode
        self._info = info
        self._fingerprint = fingerprint if encode is not None else None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self._encode is not None:
            return self._encode(texts)
        return self.remote.encode(texts)

    def rerank(self, request: RerankRequest) -> list[RerankResult]:
        # the sidecar checks that the indicators come from its own query side: the local
        # encoder's fingerprint, or the one the sidecar's Encode gave with them
        return self.remote.rerank_request(request, query_fingerprint=self.query_fingerprint())

    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = self.remote.model_info()
        return self._info

    def query_fingerprint(self) -> str | None:
        return None if self._fingerprint is None else self._fingerprint()

    def __repr__(self) -> str:
        return f"RemoteBackend({self.remote!r})"


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

    async def _call_many(
        self, service: str, method: str, requests: Sequence[Any], response_type: Any
    ) -> list[Any]:
        return list(
            await asyncio.gather(*(self._call(service, method, r, response_type) for r in requests))
        )

    async def encode(self, texts: Sequence[str]) -> Indicators:
        request = _encode_message(texts)
        response = await self._call("EncodeService", "Encode", request, pb.EncodeResponse)
        return _indicators(response)

    async def rerank(
        self, indicators: Any, candidates_ids: Any, broad_scores: Any = None, **options: Any
    ) -> list[RerankResult]:
        messages = _rerank_messages(indicators, candidates_ids, broad_scores, options)
        responses = await self._call_many("RerankService", "Rerank", messages, pb.RerankResponse)
        return [rerank_result_from_proto(r) for r in responses]

    async def search(self, queries: Sequence[str] | Any, **options: Any) -> list[list[Hit]]:
        """Like ``RemoteReranker.search`` (``limit``, ``rerank``, ``filter``)."""
        messages = _search_messages(queries, options)
        responses = await self._call_many("SearchService", "Search", messages, pb.SearchResponse)
        return [_hits(r) for r in responses]

    async def invalidate(self, videos_ids: Sequence[str] | None = None) -> None:
        request = _invalidate_message(videos_ids)
        await self._call("RerankService", "Invalidate", request, pb.InvalidateResponse)

    async def info(self) -> dict[str, Any]:
        response = await self._call("InfoService", "Info", pb.InfoRequest(), pb.InfoResponse)
        self._info = info_from_proto(response)
        return self._info

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncRemoteReranker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
