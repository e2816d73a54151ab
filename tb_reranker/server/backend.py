"""Deprecated: the sidecar's core is :mod:`tb_reranker.server.engine` (``ServingEngine``).

Old imports keep working with a ``DeprecationWarning`` (once per name): ``Backend`` is
``ServingEngine``; ``Components``, ``RerankItem``, ``SearchDisabledError`` and
``ENCODE_CHUNK_TEXTS`` are the engine module's.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__: list[str] = []

_RENAMED = {"Backend": "ServingEngine"}
_MOVED = frozenset({"Components", "RerankItem", "SearchDisabledError", "ENCODE_CHUNK_TEXTS"})


def __getattr__(name: str) -> Any:
    if name not in _RENAMED and name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tb_reranker.server import engine

    new = _RENAMED.get(name, name)
    warnings.warn(
        f"tb_reranker.server.backend.{name} is deprecated: use tb_reranker.server.engine.{new}",
        DeprecationWarning,
        stacklevel=2,
    )
    value = getattr(engine, new)
    globals()[name] = value  # one warning per name and process
    return value
