"""``ServingEngine``: the one core of the sidecar, over a ``Reranker`` (+ optional Milvus
``VideoIndex``); the gRPC servicers and the HTTP provider routes are thin adapters over it.

Device work runs on one dedicated thread (so the asyncio loop never blocks and device calls never
interleave), behind two micro-batchers (Encode, Rerank). Milvus calls (Search) run on a small I/O
pool through the one search pipeline, ``TwoStageSearch``. This is the server's input boundary
(for gRPC and HTTP alike): each verb checks its arguments once against ``config.limits``
(``tb_reranker.requests``), before a call takes a batch slot, and violations name the limit
(``max_candidates=1000``) so a client knows which knob it hit; the batch functions trust them.

Work per device call: an Encode call's texts go to the device :data:`ENCODE_CHUNK_TEXTS` at a
time, one chunk after the other, and an Encode batch (chunks of concurrent calls fused) holds at
most that many texts. Rerank batches queued meanwhile run between two chunks, so a Rerank waits
behind one chunk, never behind a whole ``max_texts`` Encode (``docs/security.md``, "Limits").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tb_reranker.errors import (
    IndexUnavailableError,
    InvalidInputError,
    NotFoundError,
    RerankerUnavailableError,
    TBError,
)
from tb_reranker.requests import RerankQuery, RerankRequest, SearchRequest, check_texts
from tb_reranker.rerank.in_process import InProcessBackend
from tb_reranker.rerank.pipeline import TwoStageSearch
from tb_reranker.rerank.query_cache import QueryCache
from tb_reranker.server.batcher import BatchInfo, MicroBatcher
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.metrics import ServerMetrics

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.index import VideoIndex
    from tb_reranker.rerank.local import Reranker
    from tb_reranker.types import Hit, RerankResult

__all__ = ["ServingEngine", "Components", "RerankItem", "SearchDisabledError", "ENCODE_CHUNK_TEXTS"]

log = logging.getLogger(__name__)

# texts per device call of Encode. ViT-B/32's text tower on this project's shared 2-core machine
# (benchmarks/tokenize_cost.py, load 4-4.6): 28-45 s for 256 texts that fill the context in one
# call, 2.3 s for 16 of them (short queries: about a tenth of that)
ENCODE_CHUNK_TEXTS = 16


@dataclass
class Components:
    """What the server serves: the reranker (model + store) and, for Search, a Milvus index."""

    reranker: Reranker  # the in-process pipeline (model, frame store, K/V cache)
    index: VideoIndex | None = None  # None: SearchService answers FAILED_PRECONDITION
    device: str = "cpu"  # where the model lives ("cpu", "cuda:0")
    dtype: str = "float32"  # the model's precision, "float32" or "bfloat16" (it runs the autocast)


@dataclass
class RerankItem:
    """One Rerank call in the batcher: the validated query and the batch's timings (ns)."""

    query: RerankQuery
    timings: dict[str, int]


class ServingEngine:
    """The core gRPC and HTTP both adapt: validation (once), micro-batching and threading around
    the in-process ``Reranker``, and Search through ``TwoStageSearch``."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics
        self.components: Components | None = None
        self.fingerprint = ""  # the whole model's
        self.vision_fingerprint = ""  # what the collection and the store must record
        self.query_fingerprint = ""
        self.index_error: str | None = None  # why Milvus is not connected (None: not tried/ok)
        # a non-transient reason Search cannot serve (missing database or collection, another
        # model's collection): raised as is instead of "not reachable yet"
        self.index_failure: TBError | None = None
        self.query_cache = QueryCache(config.query_cache_size)  # Search's encoded texts
        self._device_executor = ThreadPoolExecutor(1, thread_name_prefix="tb-device")
        self._io_executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="tb-io")
        self.encode_batcher: MicroBatcher = self._batcher(
            "encode", self._run_encode, weight=len, max_weight=ENCODE_CHUNK_TEXTS
        )
        self.rerank_batcher: MicroBatcher = self._batcher("rerank", self._run_rerank)

    def _batcher(self, kind: str, run: Any, **weights: Any) -> MicroBatcher:
        histogram = self.metrics.batch_size.labels(kind) if self.metrics is not None else None
        return MicroBatcher(
            run,
            self._device_executor,
            max_batch=self.config.max_batch,
            max_wait_ms=self.config.max_wait_ms,
            enabled=self.config.batching,
            on_batch=histogram.observe if histogram is not None else None,
            name=kind,
            **weights,
        )

    # ------------------------------------------------------------------ lifecycle
    async def attach(self, components: Components) -> None:
        """Start serving ``components`` (computes the model fingerprints once, off the loop)."""
        loop = asyncio.get_running_loop()
        model = components.reranker.model
        self.fingerprint = await loop.run_in_executor(self._device_executor, model.fingerprint)
        self.vision_fingerprint = model.vision_fingerprint()  # cached by the same pass
        self.query_fingerprint = model.query_fingerprint()
        self.components = components

    async def close(self) -> None:
        await self.encode_batcher.close()
        await self.rerank_batcher.close()
        self._device_executor.shutdown(wait=True, cancel_futures=True)
        self._io_executor.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.components is not None

    @property
    def reranker(self) -> Reranker:
        if self.components is None:
            raise RerankerUnavailableError("the server is still loading the model; retry shortly")
        return self.components.reranker

    def cache_stats(self) -> dict[str, Any] | None:
        if self.components is None:
            return None
        cache = getattr(self.components.reranker, "cache", None)
        return None if cache is None else cache.stats()

    def _shape(self) -> tuple[int, int]:
        """``(m, D)`` of the served model (``RerankerUnavailableError`` while loading)."""
        return self.reranker.info().shape

    def _search_index(self) -> VideoIndex:
        """The connected index, or the reason Search cannot serve."""
        index = self.components.index if self.components is not None else None
        if index is not None:
            return index
        if self.index_failure is not None:
            failure = self.index_failure  # e.g. the collection does not exist: a clear reason
            raise type(failure)(failure.message)  # a fresh instance per call
        if self.index_error is not None:
            raise IndexUnavailableError(
                f"Milvus is not reachable yet (the server keeps retrying): {self.index_error}"
            )
        raise SearchDisabledError("search is not enabled on this server (no Milvus collection)")

    # ------------------------------------------------------------------ verbs
    async def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, int]]:
        """Texts → indicators ``[Q, m, D]`` and timings (ns, batch_size), encoded
        :data:`ENCODE_CHUNK_TEXTS` texts at a time (other work runs between two chunks)."""
        texts = check_texts(texts, self.limits)
        self.reranker  # noqa: B018 - raises while loading
        started = time.perf_counter_ns()
        parts, encode_ns, queue_ns, batch_size = [], 0, 0, 0
        for start in range(0, len(texts), ENCODE_CHUNK_TEXTS):
            chunk = texts[start : start + ENCODE_CHUNK_TEXTS]
            (indicators, chunk_ns), info = await self.encode_batcher.submit(chunk)
            parts.append(indicators)
            encode_ns += chunk_ns
            queue_ns += info.queue_ns
            batch_size = max(batch_size, info.batch_size)
        indicators = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return indicators, _timings(BatchInfo(queue_ns, batch_size), started, encode_ns=encode_ns)

    async def rerank(self, **fields: Any) -> tuple[RerankQuery, RerankResult, dict[str, int]]:
        """One query (``RerankQuery.build``'s fields: candidates_ids, text | indicators,
        broad_scores, contents_hashes, top_n, strict, candidates_are) → the validated query, its
        ``RerankResult`` and timings."""
        query = RerankQuery.build(shape=self._shape(), limits=self.limits, **fields)
        item = RerankItem(query, {})
        started = time.perf_counter_ns()
        result, info = await self.rerank_batcher.submit(item)
        return query, result, _timings(info, started, **item.timings)

    async def search(
        self, query: str | np.ndarray, **options: Any
    ) -> tuple[list[Hit], dict[str, int]]:
        """Milvus broad search (+ rerank) for one query, on the I/O pool; ``options`` as
        ``SearchRequest.build`` takes them (limit, rerank, filter, group, moments_per_video)."""
        reranker = self.reranker
        index = self._search_index()
        request = SearchRequest.build(
            [query] if isinstance(query, str) else query,
            shape=self._shape(),
            limits=self.limits,
            **options,
        )
        if request.num_queries != 1:
            raise InvalidInputError("one query per Search call: indicators must be [m, D]")
        pipeline = TwoStageSearch(
            index, InProcessBackend(reranker), limits=self.limits, query_cache=self.query_cache
        )
        started = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(self._io_executor, self._run_search, pipeline, request)
        return hits, {"total_ns": time.perf_counter_ns() - started, "batch_size": 1}

    async def invalidate(self, videos_ids: Sequence[str] | None) -> None:
        """Drop cached K/V of these videos (all with ``None``), on the device thread."""
        reranker = self.reranker
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._device_executor,
            reranker.invalidate,
            None if videos_ids is None else list(videos_ids),
        )

    # ------------------------------------------------------------------ pool functions
    def _run_search(self, pipeline: TwoStageSearch, request: SearchRequest) -> list[Hit]:
        """I/O thread: one two-stage search; Milvus failures become the server's errors."""
        try:
            return pipeline.run(request)[0]  # VideoIndex.search refuses a removed Lite database
        except NotFoundError as exc:  # the database or collection is gone: the server's problem
            log.warning("Search is not serving: %s", exc)
            raise SearchDisabledError(f"Search is not serving: {exc}") from exc
        except TBError:
            raise
        except Exception as exc:
            if _is_milvus_error(exc):
                raise IndexUnavailableError(f"Milvus search failed: {exc}") from exc
            raise

    def _run_encode(self, items: Sequence[list[str]]) -> list[tuple[np.ndarray, int]]:
        """Device thread: one encoder call for all texts of the batch, split per call."""
        flat = [text for texts in items for text in texts]
        started = time.perf_counter_ns()
        indicators = InProcessBackend(self.reranker).encode(flat)  # [sum Q, m, D]
        encode_ns = time.perf_counter_ns() - started
        out, start = [], 0
        for texts in items:
            out.append((indicators[start : start + len(texts)], encode_ns))
            start += len(texts)
        return out

    def _run_rerank(self, items: Sequence[RerankItem]) -> list[Any]:
        """Device thread: encode the text queries at once, then one fusion for the batch (one
        per ``candidates_are`` present: by video and by segment do not share a request)."""
        backend = InProcessBackend(self.reranker)
        indicators = self._indicators(backend, items)
        results: list[Any] = [None] * len(items)
        for kind in sorted({item.query.candidates_are for item in items}):
            picked = [n for n, item in enumerate(items) if item.query.candidates_are == kind]
            stacked = indicators if len(picked) == len(items) else indicators[picked]
            request = RerankRequest.of_queries([items[n].query for n in picked], stacked)
            for n, result in zip(picked, backend.rerank(request), strict=True):
                results[n] = _finish(items[n], result)
        return results

    @staticmethod
    def _indicators(backend: InProcessBackend, items: Sequence[RerankItem]) -> np.ndarray:
        """``[B, m, D]``: the given indicators, and the texts' encoded in one call."""
        texts = [n for n, item in enumerate(items) if item.query.indicators is None]
        encoded = None
        if texts:
            started = time.perf_counter_ns()
            encoded = backend.encode([items[n].query.text or "" for n in texts])
            encode_ns = time.perf_counter_ns() - started
            for n in texts:
                items[n].timings["encode_ns"] = encode_ns
        rows = dict(zip(texts, encoded, strict=True)) if encoded is not None else {}
        return np.stack([rows.get(n, item.query.indicators) for n, item in enumerate(items)])


def _finish(item: RerankItem, result: RerankResult) -> Any:
    """Apply the per-call options (strict, top_n) to a batched result."""
    query = item.query
    if query.strict and result.missing_ids:
        return NotFoundError(
            f"{len(result.missing_ids)} candidate ids not in the frame store: "
            f"{sorted(result.missing_ids)[:10]}"
        )
    if query.top_n is not None:
        result.candidates = result.candidates[: query.top_n]
    item.timings.update(
        {k: int(v) for k, v in result.timings.items() if k in ("fetch_ns", "fusion_ns")}
    )
    return result


class SearchDisabledError(TBError):
    """Search was called on a server without Milvus (FAILED_PRECONDITION)."""


def _timings(info: BatchInfo, started_ns: int, **extra: int) -> dict[str, int]:
    return {
        **extra,
        "queue_ns": info.queue_ns,
        "batch_size": info.batch_size,
        "total_ns": time.perf_counter_ns() - started_ns,
    }


def _is_milvus_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("pymilvus", "grpc", "milvus_lite")) or isinstance(
        exc, ConnectionError | TimeoutError
    )
