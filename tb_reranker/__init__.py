"""tb_reranker: text-to-video search with the TokenBinder one-to-many reranker, for Milvus.

Nothing heavy is imported here: ``torch``, ``pymilvus`` and ``grpc`` load on first use of the
names that need them (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tb_reranker._lazy import lazy_attributes
from tb_reranker.errors import *  # noqa: F403 - every typed error is public API
from tb_reranker.errors import __all__ as _errors

__version__ = "0.1.0"

_LAZY = {
    "Client": "tb_reranker.client",
    "AsyncClient": "tb_reranker.client",
    "Hit": "tb_reranker.types",
    "TokenBinder": "tb_reranker.model",
    "TokenBinderConfig": "tb_reranker.model",
}

__all__ = [
    "__version__",
    "Client",
    "AsyncClient",
    "Hit",
    "TokenBinder",
    "TokenBinderConfig",
    *_errors,  # TBError and every subclass a caller may catch
]

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.client import AsyncClient, Client
    from tb_reranker.model import TokenBinder, TokenBinderConfig
    from tb_reranker.types import Hit


__getattr__ = lazy_attributes(__name__, _LAZY)
