"""``tb serve``: run the gRPC reranker sidecar (plus optional provider HTTP and metrics ports).

Every flag also reads an environment variable: server flags ``TB_SERVE_<FLAG>`` (e.g.
``TB_SERVE_PORT``, ``TB_SERVE_TOKEN``), data flags the shared ``TB_<FIELD>`` settings
(``TB_CHECKPOINT``, ``TB_STORE``, ``TB_MILVUS_URI``, ...). Binds 127.0.0.1 unless ``--host`` says
otherwise; set ``--token`` and ``--tls-cert/--tls-key`` before exposing it to a network.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import fields
from typing import Any

from tb_reranker.auth import read_token_file
from tb_reranker.errors import InvalidInputError

__all__ = ["register", "run"]

log = logging.getLogger(__name__)

# ServerConfig fields exposed as flags: (flag, help)
_SERVER_FLAGS: dict[str, str] = {
    "host": "bind address (default 127.0.0.1; 0.0.0.0 exposes the port)",
    "port": "gRPC port (0 = any free port; default 50051)",
    "http_port": "port of the TEI/Cohere/Weaviate rerank endpoints (-1 = off, default)",
    "metrics_port": "port of Prometheus /metrics (-1 = off, default)",
    "token": "bearer token required from clients (prefer --token-file or TB_SERVE_TOKEN)",
    "tls_cert": "PEM server certificate chain (enables TLS)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle; clients must present a certificate it signed (mTLS)",
    "max_candidates": "candidate ids per Rerank call and largest Search limit (default 1000)",
    "max_text_chars": "characters per query text (default 2048)",
    "max_texts": "texts per Encode call (default 256)",
    "max_message_bytes": "gRPC message and HTTP body size limit in bytes (default 16 MiB)",
    "http_body_timeout_s": "seconds an HTTP request body may take to arrive (default 5; then 408)",
    "max_concurrency": "calls in flight before RESOURCE_EXHAUSTED (default 64)",
    "max_batch": "calls fused into one device batch (default 32)",
    "max_wait_ms": "batch window in ms (default 0: batch what queued while the device was busy)",
    "cache_size": "videos whose frame tokens (K/V with --cache-kv) stay cached (default 4096)",
    "query_cache_size": "Search: encoded query texts kept in an LRU (default 1024; 0 = off)",
    "device": "auto (cuda when present), cpu, cuda, cuda:1 ...",
    "dtype": "auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16",
    "grace_s": "seconds in-flight calls get to finish on SIGTERM/SIGINT (default 10)",
    "io_threads": "threads for Milvus calls (default 4)",
    "milvus_probe_s": "seconds between the health probes of Milvus (default 5; 0 = none)",
    "milvus_probe_timeout_s": "seconds a Milvus health probe may take (default 2)",
    "max_filter_chars": "characters of a Search filter expression (default 16384)",
    "max_filter_depth": "nested brackets in a Search filter expression (default 32)",
}

# Settings fields exposed as flags: (flag, help). The Milvus URI is ``--uri`` as in every other
# command; ``--token`` here is the clients' bearer token (a server flag), so the Milvus token
# keeps its qualified name ``--milvus-token``.
_SETTINGS_FLAGS: dict[str, tuple[str, str]] = {
    "data_dir": ("--data-dir", "root of the embedded defaults (TB_DATA_DIR, default ./tb_data)"),
    "checkpoint": ("--checkpoint", "TokenBinder checkpoint directory (TB_CHECKPOINT)"),
    "store": ("--store", "frame-token store: directory or s3://bucket/prefix (TB_STORE)"),
    "milvus_uri": ("--uri", "Milvus URI: Lite file or http://host:19530 (TB_MILVUS_URI)"),
    "milvus_token": (
        "--milvus-token",
        "Milvus token 'user:password' (TB_MILVUS_TOKEN; --token is the clients' bearer token)",
    ),
    "collection": ("--collection", "Milvus collection (TB_COLLECTION)"),
}

# old spellings still accepted, with a deprecation warning: alias -> (settings field, new flag)
_DEPRECATED_ALIASES: dict[str, tuple[str, str]] = {"--milvus-uri": ("milvus_uri", "--uri")}


def register(subparsers: Any) -> None:
    from tb_reranker.server.config import BOUNDS, ServerConfig

    parser = subparsers.add_parser(
        "serve",
        help="run the gRPC reranker sidecar",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = {f.name: type(f.default) for f in fields(ServerConfig)}
    for name, help_text in _SERVER_FLAGS.items():
        kind = BOUNDS[name].parse if name in BOUNDS else kinds[name]  # numbers: checked ranges
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text
        )
    parser.add_argument(
        "--token-file",
        default=None,
        help="read the bearer token from this file (its one non-blank line; an empty file is "
        "an error)",
    )
    batching = parser.add_mutually_exclusive_group()
    batching.add_argument(
        "--batching", dest="batching", action="store_true", default=None, help="micro-batching on"
    )
    batching.add_argument(
        "--no-batching", dest="batching", action="store_false", help="micro-batching off"
    )
    parser.add_argument(
        "--cache-kv",
        dest="cache_kv",
        action="store_true",
        default=None,
        help="cache each video's projected K/V instead of its frame tokens: cheaper hits, "
        "dearer misses (pays above a ~80%% candidate hit rate; docs/benchmarks.md §6)",
    )
    parser.add_argument(
        "--no-search",
        action="store_true",
        help="serve Encode/Rerank only (no Milvus connection; Search is NOT_SERVING)",
    )
    for name, (flag, help_text) in _SETTINGS_FLAGS.items():
        parser.add_argument(flag, dest=name, default=None, help=help_text)
    for alias, (_name, flag) in _DEPRECATED_ALIASES.items():
        parser.add_argument(
            alias, dest=_alias_dest(alias), default=None, help=f"deprecated spelling of {flag}"
        )
    parser.set_defaults(func=run)


def _alias_dest(alias: str) -> str:
    return "deprecated_" + alias.lstrip("-").replace("-", "_")


def _settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Settings`` fields given on the command line; a deprecated spelling logs a warning
    and counts as the new one (both given with different values is an error)."""
    overrides = {name: getattr(args, name, None) for name in _SETTINGS_FLAGS}
    for alias, (name, flag) in _DEPRECATED_ALIASES.items():
        value = getattr(args, _alias_dest(alias), None)
        if value is None:
            continue
        log.warning("tb serve: %s is deprecated, use %s (same meaning)", alias, flag)
        if overrides[name] is not None and overrides[name] != value:
            raise InvalidInputError(f"give {flag} or {alias} (deprecated), not both")
        overrides[name] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    from tb_reranker.config import Settings
    from tb_reranker.server.app import serve
    from tb_reranker.server.config import ServerConfig

    overrides = {
        name: getattr(args, name, None) for name in (*_SERVER_FLAGS, "batching", "cache_kv")
    }
    if args.token_file is not None:
        if overrides.get("token") is not None:
            raise InvalidInputError("give --token or --token-file, not both")
        overrides["token"] = read_token_file(args.token_file)
    config = ServerConfig.from_env(**overrides)
    settings = Settings.from_env(**_settings_overrides(args))
    if config.host not in ("127.0.0.1", "localhost", "::1") and not (config.token and config.tls):
        log.warning(
            "tb serve: binding %s without %s: anyone who reaches the port can use it",
            config.host,
            " and ".join(w for w, on in (("a token", config.token), ("TLS", config.tls)) if not on),
        )
    asyncio.run(serve(config, settings, search=not args.no_search))
    return 0
