"""The gRPC reranker sidecar (``tb serve``) and its provider-compatible HTTP endpoints.

Public API: :class:`ServerConfig`, :class:`TBServer`, :class:`Components`, :func:`serve`,
:func:`load_components`. Imports are lazy so that ``import tb_reranker.server.protogen`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tb_reranker._lazy import lazy_attributes

__all__ = ["ServerConfig", "TBServer", "Components", "serve", "load_components"]

_LAZY = {
    "ServerConfig": "tb_reranker.server.config",
    "TBServer": "tb_reranker.server.app",
    "serve": "tb_reranker.server.app",
    "load_components": "tb_reranker.server.app",
    "Components": "tb_reranker.server.engine",
}

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.server.app import TBServer, load_components, serve
    from tb_reranker.server.config import ServerConfig
    from tb_reranker.server.engine import Components


__getattr__ = lazy_attributes(__name__, _LAZY)
