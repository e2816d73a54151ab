"""``TBServer``: the grpc.aio sidecar with health, reflection, limits, metrics and HTTP endpoints.

Lifecycle: ``start()`` binds the ports at once with every health status NOT_SERVING, then loads
the model and store (and connects Milvus) in the background; statuses turn SERVING as parts
become ready. ``stop()`` drains: health goes NOT_SERVING, new calls are refused, in-flight calls
get ``grace_s`` to finish. :func:`serve` runs a server until SIGTERM/SIGINT.

Health services: ``""`` (overall) and Encode/Rerank/Info follow the model + store; SearchService
follows Milvus as well (NOT_SERVING while Milvus is down or not configured), so a server without
Milvus still serves Encode and Rerank. Once connected, Milvus is probed by itself every
``milvus_probe_s`` seconds (a round trip bounded by ``milvus_probe_timeout_s``): SearchService
follows it both ways without waiting for a client's Search, and a Milvus Lite database removed
or replaced under the server (or a dropped collection) is released and reopened when it is back,
never served from memory.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from tb_reranker.errors import (
    IndexUnavailableError,
    InvalidInputError,
    ModelMismatchError,
    NotFoundError,
    TBError,
)
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.engine import Components, SearchDisabledError, ServingEngine
from tb_reranker.server.interceptors import (
    AuthInterceptor,
    ConcurrencyLimitInterceptor,
    DecodeGuardInterceptor,
    MetricsInterceptor,
)
from tb_reranker.server.metrics import ServerMetrics
from tb_reranker.server.reflection import enable_reflection
from tb_reranker.server.servicers import SERVICE_NAMES, add_servicers

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from tb_reranker.config import Settings
    from tb_reranker.index import VideoIndex

__all__ = ["TBServer", "serve", "load_components"]

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

LoadFn = Callable[[], Components]  # blocking: builds model + store (+ index)
ConnectIndexFn = Callable[[], "VideoIndex"]  # blocking: opens the Milvus collection


class TBServer:
    """The sidecar. ``load`` builds the components (in a thread, after the ports are bound);
    ``connect_index`` (optional) opens Milvus and is retried every ``index_retry_s`` until it
    succeeds, so Encode/Rerank serve while Milvus is still down."""

    def __init__(
        self,
        config: ServerConfig,
        load: LoadFn,
        *,
        connect_index: ConnectIndexFn | None = None,
        index_retry_s: float = 5.0,
    ) -> None:
        self.config = config
        self._load = load
        self._connect_index = connect_index
        self._index_retry_s = index_retry_s
        self.metrics = ServerMetrics(cache_stats=lambda: self.engine.cache_stats())
        self.engine = ServingEngine(config, self.metrics)
        self.limiter = ConcurrencyLimitInterceptor(config.max_concurrency, self.metrics)
        self.health = health_aio.HealthServicer()
        self._server: aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task] = []
        self._ready = asyncio.Event()
        # Milvus probes run on their own thread: a frozen Milvus never holds up Search's pool
        self._probe_executor = ThreadPoolExecutor(1, thread_name_prefix="tb-milvus-probe")
        self._probe_pending: Future | None = None
        self.milvus_ok: bool | None = None  # what the last probe found (None: none yet)
        self.load_error: BaseException | None = None
        self.port = 0  # the bound gRPC port
        self.http_port: int | None = None  # the bound provider HTTP port
        self.metrics_port: int | None = None  # the bound /metrics port

    @property
    def backend(self) -> ServingEngine:
        """Deprecated name of :attr:`engine`."""
        warnings.warn(
            "TBServer.backend is deprecated: use TBServer.engine", DeprecationWarning, stacklevel=2
        )
        return self.engine

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        quiet_pymilvus_tracebacks()
        config = self.config
        interceptors: list[aio.ServerInterceptor] = [MetricsInterceptor(self.metrics)]
        if config.token:
            interceptors.append(AuthInterceptor(config.token))
        interceptors.append(self.limiter)
        # innermost: its never-failing request deserialiser is the one every outer wrapper copies
        interceptors.append(DecodeGuardInterceptor())
        server = aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=None,  # shedding is ConcurrencyLimitInterceptor's job
        )
        add_servicers(server, self.engine, self._set_milvus_status)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            *SERVICE_NAMES.values(),
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        enable_reflection(names, server)  # grpc.reflection.v1 and v1alpha
        for name in ("", *SERVICE_NAMES.values()):
            await self.health.set(name, NOT_SERVING)
        address = _address(config.host, config.port)
        # every port first: gRPC core would log its own error, and nothing starts half-way
        _check_port_free(config.host, config.port, "gRPC")
        _check_port_free(config.host, config.http_port, "HTTP")
        _check_port_free(config.host, config.metrics_port, "metrics")
        try:
            if config.tls:
                self.port = server.add_secure_port(address, _server_credentials(config))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            raise InvalidInputError(
                f"cannot bind gRPC to {address}: the port is in use or the address is not one "
                "of this machine's (choose another --port / --host)"
            )
        await server.start()
        self._server = server
        try:
            await self._start_http()
        except BaseException:
            await self.stop(0)
            raise
        log.info(
            "tb serve: gRPC on %s:%d (%s%s), batching %s",
            config.host,
            self.port,
            "TLS" if config.tls else "plaintext",
            ", mTLS" if config.tls_client_ca else "",
            "on" if config.batching else "off",
        )
        self._tasks.append(asyncio.create_task(self._load_in_background(), name="tb-load"))

    async def _start_http(self) -> None:
        from aiohttp import web

        from tb_reranker.server.http import build_metrics_app, build_provider_app

        config = self.config
        ssl_context = _ssl_context(config) if config.tls else None
        if config.http_port >= 0:
            app = build_provider_app(self.engine, token=config.token, metrics=self.metrics)
            self.http_port = await self._run_app(app, config.http_port, ssl_context, web)
            log.info("tb serve: provider HTTP endpoints on %s:%d", config.host, self.http_port)
        if config.metrics_port >= 0:
            self.metrics_port = await self._run_app(
                build_metrics_app(self.metrics), config.metrics_port, None, web
            )
            log.info(
                "tb serve: Prometheus metrics on %s:%d/metrics", config.host, self.metrics_port
            )

    async def _run_app(self, app: Any, port: int, ssl_context: Any, web: Any) -> int:
        from tb_reranker.server.http_wire import http_runner

        runner = http_runner(app, self.metrics)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise InvalidInputError(
                f"cannot bind HTTP to {_address(self.config.host, port)}: "
                f"{exc.strerror or exc} (choose another port)"
            ) from None
        return int(runner.addresses[-1][1]) if runner.addresses else port

    async def _load_in_background(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            components = await loop.run_in_executor(None, self._load)
            await self.engine.attach(components)
        except Exception as exc:  # stays NOT_SERVING; the cause is logged and kept
            self.load_error = exc
            log.error(
                "tb serve: loading the model/store failed: %s",
                exc,
                exc_info=not isinstance(exc, TBError),
            )
            self._ready.set()
            return
        for name in ("", SERVICE_NAMES["encode"], SERVICE_NAMES["rerank"], SERVICE_NAMES["info"]):
            await self.health.set(name, SERVING)
        log.info("tb serve: model ready (fingerprint %s)", self.engine.fingerprint[:12])
        self._ready.set()
        if components.index is not None:
            await self._set_milvus_status(True)
            await self._watch_index()
        elif self._connect_index is not None:
            self.engine.index_error = "still connecting"
            while True:  # connect; watch; when the database or collection is gone, again
                await self._connect_index_until_ready()
                if not await self._watch_index():
                    return

    async def _connect_index_until_ready(self) -> None:
        """Open the collection, retrying; Search stays NOT_SERVING until it is there.

        A missing Lite database or collection, or another model's collection, is reported to
        Search callers as FAILED_PRECONDITION with the reason (it will not heal by retrying the
        call, but an ingest may create it, so the server keeps looking); a Milvus that does not
        answer is UNAVAILABLE. Each new reason is logged once.
        """
        loop = asyncio.get_running_loop()
        assert self._connect_index is not None
        last_reason = None
        while True:
            try:
                index = await loop.run_in_executor(None, self._connect_index)
            except Exception as exc:
                reason = str(exc)
                if isinstance(exc, NotFoundError | ModelMismatchError):
                    self.engine.index_failure = (
                        exc
                        if isinstance(exc, ModelMismatchError)
                        else SearchDisabledError(f"Search is not serving: {reason}")
                    )
                    what = "Milvus collection unusable"
                else:
                    self.engine.index_failure = None
                    what = "Milvus not reachable"
                self.engine.index_error = reason
                log.log(
                    logging.WARNING if reason != last_reason else logging.DEBUG,
                    "tb serve: %s (%s); Search stays NOT_SERVING, retrying every %.0f s",
                    what,
                    reason,
                    self._index_retry_s,
                )
                last_reason = reason
                await asyncio.sleep(self._index_retry_s)
                continue
            assert self.engine.components is not None
            self.engine.components.index = index
            self.engine.index_error = None
            self.engine.index_failure = None
            self.milvus_ok = True
            log.info("tb serve: Milvus collection ready, Search is serving")
            await self._set_milvus_status(True)
            return

    async def _watch_index(self) -> bool:
        """Probe the connected index every ``milvus_probe_s`` seconds and set SearchService's
        health from what each probe finds. Returns True once the database or collection is
        gone (the index is released, Search is NOT_SERVING; the caller reconnects), False
        when probing is off."""
        period = self.config.milvus_probe_s
        if period <= 0:
            return False
        while True:
            await asyncio.sleep(period)
            components = self.engine.components
            index = components.index if components is not None else None
            if index is None:
                return True
            failure = await self._probe(index)
            if isinstance(failure, NotFoundError):
                await self._release_index(index, failure)
                return True
            await self._follow_probe(failure)

    async def _probe(self, index: VideoIndex) -> BaseException | None:
        """One probe on the probe thread, bounded by ``milvus_probe_timeout_s`` (plus a
        second): None when Milvus answered and the collection is there, else the failure. A
        probe still stuck from before counts as a failure without starting another."""
        timeout = self.config.milvus_probe_timeout_s
        if self._probe_pending is not None and not self._probe_pending.done():
            return IndexUnavailableError("Milvus has not answered the previous health probe")
        future = self._probe_executor.submit(index.probe, timeout)
        self._probe_pending = future
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), timeout + 1.0)
        except TimeoutError:
            return IndexUnavailableError(f"Milvus did not answer a health probe in {timeout:g} s")
        except Exception as exc:  # noqa: BLE001 - every failure is a probe result
            return exc
        return None

    async def _follow_probe(self, failure: BaseException | None) -> None:
        """SearchService SERVING when the probe passed, NOT_SERVING when Milvus failed it."""
        ok = failure is None
        if ok != self.milvus_ok:
            if ok:
                log.info("tb serve: Milvus answers health probes, Search is serving")
            else:
                log.warning("tb serve: Search is NOT_SERVING: %s", failure)
        self.milvus_ok = ok
        await self._set_milvus_status(ok)

    async def _release_index(self, index: VideoIndex, failure: BaseException) -> None:
        """The database or collection is gone: stop serving it, release it, reconnect later."""
        assert self.engine.components is not None
        self.engine.components.index = None
        self.engine.index_failure = SearchDisabledError(f"Search is not serving: {failure}")
        self.engine.index_error = str(failure)
        self.milvus_ok = False
        await self._set_milvus_status(False)
        log.warning("tb serve: %s; Search is NOT_SERVING until it is back", failure)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._probe_executor, index.release_database)
        except Exception:  # noqa: BLE001 - releasing a lost database is best effort
            log.debug("releasing the lost Milvus database failed", exc_info=True)

    async def _set_milvus_status(self, ok: bool) -> None:
        ready = (
            ok and self.engine.components is not None and self.engine.components.index is not None
        )
        await self.health.set(SERVICE_NAMES["search"], SERVING if ready else NOT_SERVING)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until loading finished; raises the load error if it failed."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self.load_error is not None:
            raise self.load_error

    # ------------------------------------------------------------------ stop
    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new calls, let in-flight ones finish."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        server, self._server = self._server, None
        if self._runners:  # HTTP drains within the same grace as gRPC, not after it
            from tb_reranker.server.http_wire import stop_runners

            await asyncio.gather(
                server.stop(grace) if server is not None else asyncio.sleep(0),
                stop_runners(self._runners, grace),
            )
        elif server is not None:
            await server.stop(grace)
        self._runners.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.engine.close()
        self._probe_executor.shutdown(wait=False, cancel_futures=True)
        log.info("tb serve: stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def __aenter__(self) -> TBServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)


class _NoPymilvusTraceback(logging.Filter):
    """pymilvus logs every failed call at ERROR with its own traceback in the message text, a
    caller's malformed filter included. The sidecar maps and logs those failures itself; keep
    pymilvus's first line, at WARNING, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\nTraceback:" in message:
            record.msg = message.split("\nTraceback:", 1)[0]
            record.args = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_PYMILVUS_FILTER = _NoPymilvusTraceback()


def quiet_pymilvus_tracebacks() -> None:
    """Install the filter on pymilvus's call logger (once; idempotent)."""
    logger = logging.getLogger("pymilvus.decorators")
    if _PYMILVUS_FILTER not in logger.filters:
        logger.addFilter(_PYMILVUS_FILTER)


def _check_port_free(host: str, port: int, what: str) -> None:
    """``InvalidInputError`` when ``host:port`` is taken (port 0 is always free, -1 is off)."""
    import socket

    if port <= 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise InvalidInputError(f"cannot bind {what} to {host}: {exc.strerror or exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise InvalidInputError(
                f"cannot bind {what} to {_address(host, port)}: {exc.strerror or exc} "
                "(another process holds the port? choose another one)"
            ) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    key = _read(config.tls_key, "TLS key")
    cert = _read(config.tls_cert, "TLS certificate")
    ca = _read(config.tls_client_ca, "client CA bundle") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _ssl_context(config: ServerConfig) -> Any:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def load_components(settings: Settings, config: ServerConfig) -> Components:
    """Model (checkpoint) + frame store from ``settings``; Milvus is connected separately."""
    from tb_reranker.model import load_checkpoint
    from tb_reranker.model.precision import resolve_device, resolve_precision
    from tb_reranker.rerank import Reranker
    from tb_reranker.stores import open_store

    device = resolve_device(config.device)
    dtype = resolve_precision(config.dtype, device)  # the model runs this autocast itself
    # the sidecar never encodes a video (frame tokens come from the store): no vision tower
    model = load_checkpoint(settings.checkpoint, device=device, inference=True, vision=False)
    model.precision = dtype
    store = open_store(settings.store)
    reranker = Reranker(
        model,
        store,
        cache_size=config.cache_size,
        max_candidates=config.max_candidates,
        cache_kv=config.cache_kv,
    )
    return Components(reranker=reranker, index=None, device=str(device), dtype=dtype)


def _index_connector(
    settings: Settings, fingerprints: Callable[[], tuple[str, str]]
) -> ConnectIndexFn:
    """Opens the configured collection, never creating anything: a Lite database that is not
    there, or a collection that does not exist, is ``NotFoundError`` (the sidecar only reads;
    ``tb ingest`` creates them). Milvus Lite 3.x keeps a database as a directory (2.x: a file);
    either is a database."""

    def connect() -> VideoIndex:
        from tb_reranker.index import VideoIndex
        from tb_reranker.index.milvus_index import lite_path
        from tb_reranker.index.schema import is_lite_uri

        uri = settings.milvus_uri
        where = uri
        if is_lite_uri(uri):
            where = lite_path(uri)
            if not Path(where).exists():
                raise NotFoundError(
                    f"Milvus Lite database {where} does not exist (ingest videos into it first, "
                    "or point --uri at an existing database)"
                )
        vision, whole = fingerprints()
        index = VideoIndex(
            uri,
            token=settings.milvus_token,
            collection=settings.collection,
            fingerprint=vision,
            model_fingerprint=whole,
        )
        try:
            if not index.exists():
                raise NotFoundError(
                    f"Milvus collection {settings.collection!r} does not exist at {where} "
                    "(ingest videos into it first, or choose --collection)"
                )
            index.count()  # checks the dimension and the vision fingerprint, loads the collection
        except BaseException:
            index.close()
            raise
        return index

    return connect


async def serve(
    config: ServerConfig,
    settings: Settings,
    *,
    search: bool = True,
    install_signal_handlers: bool = True,
    on_started: Callable[[TBServer], Any] | None = None,
) -> None:
    """Run the sidecar until SIGTERM/SIGINT, then drain for ``config.grace_s`` seconds.

    A failure to load the model or the store (missing checkpoint, unreadable store) ends it at
    once with that error, so that ``tb serve`` exits 2 with the reason instead of idling
    NOT_SERVING; Milvus being down does not (Search retries the connection in the background).
    """
    server: TBServer | None = None

    def fingerprints() -> tuple[str, str]:
        """(vision, whole-model) fingerprints of the served model."""
        if server is None:
            return "", ""
        return server.engine.vision_fingerprint, server.engine.fingerprint

    server = TBServer(
        config,
        lambda: load_components(settings, config),
        connect_index=_index_connector(settings, fingerprints) if search else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    await server.start()  # cleans up after itself when a port cannot be bound
    if on_started is not None:
        on_started(server)
    try:
        stopping = asyncio.create_task(stop.wait())
        loading = asyncio.create_task(server.wait_ready())
        await asyncio.wait({stopping, loading}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            stopping.cancel()
            raise loading.exception()  # e.g. no checkpoint: exit at once with the reason
        await stopping
        loading.cancel()
        log.info("tb serve: signal received, draining for up to %.1f s", config.grace_s)
    finally:
        await server.stop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
