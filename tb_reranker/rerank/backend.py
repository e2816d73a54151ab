"""What the search pipeline needs from a reranker: the ``RerankBackend`` protocol.

Two implementations: :class:`InProcessBackend` (a ``Reranker`` in this process) and
``tb_reranker.remote.RemoteBackend`` (a ``tb serve`` sidecar over gRPC). Both take requests that
the caller has validated (``tb_reranker.requests``) and check nothing again. Only the standard
library is imported here (torch on the first ``encode_texts``; no grpc).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tb_reranker.requests import RerankRequest
    from tb_reranker.rerank.local import Reranker
    from tb_reranker.types import RerankResult

__all__ = ["RerankBackend", "ModelInfo", "InProcessBackend", "encode_texts", "query_fingerprint"]


def query_fingerprint(model: Any) -> str:
    """What identifies the text side of ``model`` (the query encoder): the key of the query
    cache. The model's query-side fingerprint (config, text tower, indicators, fusion; computed
    from its weights, by a prepared model once): a new vision side alone never changes an
    encoded query."""
    return str(model.query_fingerprint())


def encode_texts(model: Any, texts: Sequence[str]) -> np.ndarray:
    """Validated texts → the model's indicators ``[Q, m, D]`` float32 (L2-normalised rows;
    I_1 = ``[:, 0]``), without gradients."""
    import torch

    with torch.inference_mode():
        indicators = model.encode_text(list(texts))
    return indicators.float().cpu().numpy()


@dataclass(frozen=True)
class ModelInfo:
    """The model facts the pipeline needs: indicator shape ``(m, D)`` and K."""

    embed_dim: int  # D
    num_indicators: int  # m
    top_k: int  # K: candidates the focused view compares jointly

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, D)`` of one query's indicators."""
        return (self.num_indicators, self.embed_dim)

    @classmethod
    def of(cls, model: Any) -> ModelInfo:
        """From a ``TokenBinder`` (or anything with the three attributes)."""
        return cls(int(model.embed_dim), int(model.num_indicators), int(model.top_k))


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


class InProcessBackend:
    """``RerankBackend`` over a ``Reranker`` (model, frame store and K/V cache) in this process."""

    def __init__(self, reranker: Reranker) -> None:
        self.reranker = reranker

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return encode_texts(self.reranker.model, texts)

    def rerank(self, request: RerankRequest) -> list[RerankResult]:
        return self.reranker.rerank_request(request)

    def info(self) -> ModelInfo:
        return self.reranker.info()

    def query_fingerprint(self) -> str | None:
        return query_fingerprint(self.reranker.model)

    def __repr__(self) -> str:
        return f"InProcessBackend({self.reranker!r})"
