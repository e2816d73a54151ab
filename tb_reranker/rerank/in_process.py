"""``InProcessBackend``: the ``RerankBackend`` over a ``Reranker`` in this process.

One of the protocol's two implementations (the other is ``tb_reranker.remote.RemoteBackend``);
beside the ``Reranker`` it wraps, and importing neither the protocol module nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tb_reranker.rerank.model_info import ModelInfo, encode_texts, query_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from tb_reranker.requests import RerankRequest
    from tb_reranker.rerank.local import Reranker
    from tb_reranker.types import RerankResult

__all__ = ["InProcessBackend"]


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
