"""What the search pipeline reads of a model: its shape and K (:class:`ModelInfo`), its encoded
queries (:func:`encode_texts`) and the identity of its text side (:func:`query_fingerprint`).

Shared by the ``RerankBackend`` protocol (``rerank.backend``), its in-process implementation
(``rerank.in_process``) and the ``Reranker`` (``rerank.local``); it imports none of them. Only the
standard library is imported here (torch on the first ``encode_texts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["ModelInfo", "encode_texts", "query_fingerprint"]


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
