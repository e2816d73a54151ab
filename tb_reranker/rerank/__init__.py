"""Reranking: the in-process ``Reranker``, the ``RerankBackend`` protocol and the one search
pipeline ``TwoStageSearch``.

| module | concern |
|---|---|
| ``backend`` | ``RerankBackend``: the protocol the pipeline calls (encode, rerank, info) |
| ``in_process`` | ``InProcessBackend``: the protocol over a ``Reranker`` in this process |
| ``model_info`` | ``ModelInfo``, ``encode_texts``, ``query_fingerprint``: what the pipeline reads of a model |
| ``pipeline`` | ``TwoStageSearch``: Milvus broad search + rerank, the one place hits are made |
| ``query_cache`` | ``QueryCache``: the pipeline's LRU of encoded queries (text × model fingerprint) |
| ``local`` | ``Reranker``: model + frame store + K/V cache, in process |
| ``cache`` | ``KVCache``: the per-video K/V slab (LRU, content hashes, lock choreography) |
| ``batch`` | one rerank call's steps: plan, gather, fuse, assemble |

Importing the package does not import torch: ``Reranker`` loads on first use (PEP 562). The input limits are ``tb_reranker.requests``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tb_reranker._lazy import lazy_attributes
from tb_reranker.rerank.backend import RerankBackend
from tb_reranker.rerank.in_process import InProcessBackend
from tb_reranker.rerank.model_info import ModelInfo
from tb_reranker.rerank.pipeline import TwoStageSearch
from tb_reranker.rerank.query_cache import QueryCache
from tb_reranker.types import RerankedCandidate, RerankResult

__all__ = [
    "Reranker",
    "RerankBackend",
    "InProcessBackend",
    "ModelInfo",
    "TwoStageSearch",
    "QueryCache",
    "RerankResult",
    "RerankedCandidate",
]

_LAZY = {"Reranker": "tb_reranker.rerank.local"}  # imports torch

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.rerank.local import Reranker


__getattr__ = lazy_attributes(__name__, _LAZY)
