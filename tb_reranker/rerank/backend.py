"""What the search pipeline needs from a reranker: the ``RerankBackend`` protocol.

Two implementations: ``tb_reranker.rerank.in_process.InProcessBackend`` (a ``Reranker`` in this
process) and ``tb_reranker.remote.RemoteBackend`` (a ``tb serve`` sidecar over gRPC). Both take
requests that the caller has validated (``tb_reranker.requests``) and check nothing again.
``ModelInfo``, ``encode_texts`` and ``query_fingerprint`` live in ``rerank.model_info`` and are
re-exported here; ``InProcessBackend`` is still answered here as a deprecated alias. Only the
standard library is imported here (no torch, no grpc).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tb_reranker.rerank.model_info import ModelInfo, encode_texts, query_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tb_reranker.requests import RerankRequest
    from tb_reranker.types import RerankResult

__all__ = ["RerankBackend", "ModelInfo", "encode_texts", "query_fingerprint"]


@runtime_checkable
class RerankBackend(Protocol):
    """Encodes texts and reranks candidates; in process or remote."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Validated texts → indicators ``[Q, m, D]`` float32."""
        ...

    def rerank(self, request: RerankRequest) -> list[RerankResult]:
        """A validated request → one ``RerankResult`` per query."""
        ...

    def info(self) -> ModelInfo:
        """The served model's shape and K."""
        ...

    def query_fingerprint(self) -> str | None:
        """What identifies ``encode``'s text side (:func:`query_fingerprint`); ``None`` when
        unknown here (encoded queries are then not cached)."""
        ...


def __getattr__(name: str) -> Any:
    """``InProcessBackend``, moved beside the ``Reranker``: warns once, then a plain attribute."""
    if name != "InProcessBackend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tb_reranker.rerank.in_process import InProcessBackend

    warnings.warn(
        "tb_reranker.rerank.backend.InProcessBackend is deprecated: import it from "
        "tb_reranker.rerank (or tb_reranker.rerank.in_process)",
        DeprecationWarning,
        stacklevel=2,
    )
    globals()[name] = InProcessBackend
    return InProcessBackend
