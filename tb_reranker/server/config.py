"""``ServerConfig``: every knob of ``tb serve``; each field also reads ``TB_SERVE_<FIELD>``.

Secure defaults: bind ``127.0.0.1`` (loopback only) unless told otherwise, bounded concurrency,
bounded message sizes. Auth (bearer token) and TLS are off until configured; turn both on
before binding a non-loopback address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tb_reranker.auth import check_token
from tb_reranker.config import fields_from_env
from tb_reranker.errors import InvalidInputError
from tb_reranker.numbers import COUNT, MAX_INT32, PORT, PORT_OR_OFF, POSITIVE_INT, Bound
from tb_reranker.requests import DEFAULT_LIMITS, MAX_TEXTS, Limits

__all__ = ["ServerConfig", "ENV_PREFIX", "BOUNDS"]

ENV_PREFIX = "SERVE_"  # fields read TB_SERVE_<FIELD> (tb_reranker.config adds "TB_")


# What each numeric field accepts (flags, TB_SERVE_* variables and arguments alike): finite,
# in range; the limits also fit the uint32 fields of InfoResponse.limits.
BOUNDS: dict[str, Bound] = {
    "port": PORT,
    "http_port": PORT_OR_OFF,
    "metrics_port": PORT_OR_OFF,
    "max_candidates": POSITIVE_INT,
    "max_text_chars": POSITIVE_INT,
    "max_texts": POSITIVE_INT,
    "max_message_bytes": Bound(1024, MAX_INT32),
    "http_body_timeout_s": Bound(0, 3600, integer=False, low_open=True),
    "max_concurrency": POSITIVE_INT,
    "max_batch": POSITIVE_INT,
    "max_wait_ms": Bound(0, 60_000, integer=False),  # a batch window beyond a minute is a typo
    "cache_size": COUNT,
    "query_cache_size": COUNT,
    "grace_s": Bound(0, 3600, integer=False),
    "io_threads": Bound(1, 1024),
    "milvus_probe_s": Bound(0, 3600, integer=False),
    "milvus_probe_timeout_s": Bound(0, 600, integer=False, low_open=True),
    "max_filter_chars": POSITIVE_INT,
    "max_filter_depth": POSITIVE_INT,
}


@dataclass(frozen=True)
class ServerConfig:
    """Sidecar settings. Arguments win over ``TB_SERVE_*`` variables, which win over defaults."""

    host: str = "127.0.0.1"  # bind address; 0.0.0.0 / [::] exposes the port to the network
    port: int = 50051  # gRPC port; 0 = any free port (the bound one is TBServer.port)
    http_port: int = -1  # provider HTTP endpoints (TEI / Cohere / Weaviate); -1 = off, 0 = any
    metrics_port: int = -1  # Prometheus /metrics; -1 = off, 0 = any free port
    # bearer token required on every call ("" = no auth); health is exempt; kept out of repr()
    token: str = field(default="", repr=False)
    tls_cert: str = ""  # PEM server certificate chain file ("" = plaintext)
    tls_key: str = ""  # PEM private key file of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a cert it signed (mTLS)
    # input limits (defaults: tb_reranker.requests.DEFAULT_LIMITS; see ``limits``)
    max_candidates: int = DEFAULT_LIMITS.max_candidates  # ids per Rerank, largest Search limit
    max_text_chars: int = DEFAULT_LIMITS.max_text_chars  # characters per query text
    max_texts: int = MAX_TEXTS  # texts per Encode call
    max_message_bytes: int = 16 * 1024 * 1024  # gRPC message / HTTP body size limit
    http_body_timeout_s: float = 5.0  # an HTTP request body must arrive whole within this (408)
    max_concurrency: int = 64  # calls in flight (queued in a batch included) before shedding
    batching: bool = True  # dynamic micro-batching of concurrent Encode/Rerank calls
    max_batch: int = 32  # calls fused into one device batch
    max_wait_ms: float = 0.0  # batch window; 0 = batch only what queued while the device was busy
    cache_size: int = 4096  # videos whose frame tokens (K/V with cache_kv) the Reranker keeps
    cache_kv: bool = False  # cache projected K/V instead of tokens (pays above ~80% hit rate)
    query_cache_size: int = 1024  # Search: encoded query texts kept (LRU); 0 = off
    device: str = "auto"  # "auto" (cuda when present), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bfloat16 autocast on cuda, float32 on cpu), "float32", "bfloat16"
    grace_s: float = 10.0  # graceful shutdown: in-flight calls get this long to finish
    io_threads: int = 4  # threads for Milvus calls (Search)
    # SearchService health follows a probe of Milvus every milvus_probe_s seconds (0 = no
    # probe: health then changes only with Search calls), each bounded by the timeout
    milvus_probe_s: float = 5.0
    milvus_probe_timeout_s: float = 2.0
    max_filter_chars: int = DEFAULT_LIMITS.max_filter_chars  # characters of a Search filter
    max_filter_depth: int = DEFAULT_LIMITS.max_filter_depth  # nested (), [] and {} in a filter

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            object.__setattr__(self, name, bound.check(getattr(self, name), name))
        # a blank token is an error, never "auth off"; a trailing newline is trimmed
        object.__setattr__(self, "token", check_token(self.token, what="the server token"))
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidInputError("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidInputError("mTLS (tls_client_ca) needs tls_cert and tls_key")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise InvalidInputError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not self.http_body_timeout_s > 0:  # NaN included
            raise InvalidInputError(
                f"http_body_timeout_s must be positive, got {self.http_body_timeout_s}"
            )

    @property
    def limits(self) -> Limits:
        """The input limits every RPC and HTTP route is checked against."""
        return Limits(
            max_text_chars=self.max_text_chars,
            max_texts=self.max_texts,
            max_candidates=self.max_candidates,
            max_filter_chars=self.max_filter_chars,
            max_filter_depth=self.max_filter_depth,
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerConfig:
        """Build from arguments (``None`` = not given), then ``TB_SERVE_*``, then defaults."""
        return cls(**fields_from_env(cls, overrides, ENV_PREFIX, _parse, "server settings"))


def _parse(name: str, raw: str, kind: type) -> Any:
    if name in BOUNDS:
        try:
            return BOUNDS[name].parse(raw)
        except ValueError as exc:
            raise InvalidInputError(f"TB_{ENV_PREFIX}{name.upper()}={exc}") from None
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise InvalidInputError(
            f"TB_{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}"
        ) from None
