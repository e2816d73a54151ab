"""The sidecar's runtime over a ``Reranker`` (+ optional Milvus ``VideoIndex``).

Device work runs on one dedicated thread (so the asyncio loop never blocks and device calls never
interleave), behind two micro-batchers (Encode, Rerank). Milvus calls (Search) run on a small I/O
pool. Input limits are checked here, before a call takes a batch slot, and violations name the
limit (``max_candidates=1000``) so a client knows which knob it hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tb_reranker.errors import (
    IndexBackendError,
    InvalidInputError,
    NotFoundError,
    RerankerUnavailableError,
    TBError,
)
from tb_reranker.filters import check_filter
from tb_reranker.server.batcher import BatchInfo, MicroBatcher
from tb_reranker.server.config import ServerConfig
from tb_reranker.server.metrics import ServerMetrics

if TYPE_CHECKING:  # pragma: no cover
    from tb_reranker.index import VideoIndex
    from tb_reranker.rerank import Reranker, RerankResult
    from tb_reranker.types import Hit

__all__ = ["Backend", "Components", "RerankItem", "SearchDisabledError"]

log = logging.getLogger(__name__)

# the frame store's id rule (tb_reranker.stores.record.VIDEO_ID_PATTERN), without importing it
_VALID_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")

# largest |broad score| a caller may send: far beyond any similarity, small enough that
# S = S' + delta stays finite and exact enough to order
MAX_BROAD_SCORE_ABS = 1e12


@dataclass
class Components:
    """What the server serves: the reranker (model + store) and, for Search, a Milvus index."""

    reranker: Reranker  # the in-process pipeline (model, frame store, K/V cache)
    index: VideoIndex | None = None  # None: SearchService answers FAILED_PRECONDITION
    device: str = "cpu"  # where the model lives ("cpu", "cuda:0")
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast on cuda)


@dataclass
class RerankItem:
    """One Rerank call, validated: exactly one of ``text`` / ``indicators``."""

    candidates_ids: list[str]  # K' distinct ids
    text: str | None = None  # query text, encoded in the batch
    indicators: np.ndarray | None = None  # [m, D] float32
    broad_scores: list[float] | None = None  # [K'] S', None = computed from stored tokens
    top_n: int | None = None  # keep the best top_n
    strict: bool = False  # missing ids → NotFoundError
    contents_hashes: list[str] | None = None  # [K'] content hashes validating cached K/V
    timings: dict[str, int] = field(default_factory=dict)  # filled by the batch (ns)


class Backend:
    """Validation, micro-batching and threading around the in-process ``Reranker``."""

    def __init__(self, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.components: Components | None = None
        self.fingerprint = ""
        self.index_error: str | None = None  # why Milvus is not connected (None: not tried/ok)
        # a non-transient reason Search cannot serve (missing database or collection, another
        # model's collection): raised as is instead of "not reachable yet"
        self.index_failure: TBError | None = None
        self._device_executor = ThreadPoolExecutor(1, thread_name_prefix="tb-device")
        self._io_executor = ThreadPoolExecutor(config.io_threads, thread_name_prefix="tb-io")

        def observer(kind: str):
            if metrics is None:
                return None
            histogram = metrics.batch_size.labels(kind)
            return histogram.observe

        self.encode_batcher: MicroBatcher = MicroBatcher(
            self._run_encode,
            self._device_executor,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            enabled=config.batching,
            on_batch=observer("encode"),
            name="encode",
        )
        self.rerank_batcher: MicroBatcher = MicroBatcher(
            self._run_rerank,
            self._device_executor,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            enabled=config.batching,
            on_batch=observer("rerank"),
            name="rerank",
        )

    # ------------------------------------------------------------------ lifecycle
    async def attach(self, components: Components) -> None:
        """Start serving ``components`` (computes the model fingerprint once, off the loop)."""
        loop = asyncio.get_running_loop()
        model = components.reranker.model
        self.fingerprint = await loop.run_in_executor(self._device_executor, model.fingerprint)
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
        if cache is None:
            return None
        return {
            "hits": int(cache.hits),
            "misses": int(cache.misses),
            "size": len(cache),
            "capacity": int(cache.capacity),
            "hit_rate": float(cache.hit_rate),
        }

    def _device_context(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on cuda when configured; nothing on cpu."""
        components = self.components
        if components is not None and components.dtype == "bfloat16":
            import torch

            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ validation
    def check_texts(self, texts: Sequence[str], *, what: str = "texts") -> list[str]:
        texts = list(texts)
        if not texts:
            raise InvalidInputError(f"no {what} given")
        if len(texts) > self.config.max_texts:
            raise InvalidInputError(f"{len(texts)} {what} exceed max_texts={self.config.max_texts}")
        for text in texts:
            self.check_text(text)
        return texts

    def check_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("query text is empty")
        if len(text) > self.config.max_text_chars:
            raise InvalidInputError(
                f"query text has {len(text)} characters, over max_text_chars="
                f"{self.config.max_text_chars}"
            )
        return text

    def check_indicators(self, indicators: np.ndarray) -> np.ndarray:
        """``[m, D]`` or ``[1, m, D]`` finite float32 matching the model → ``[m, D]``."""
        from tb_reranker.rerank import MAX_INDICATOR_ABS

        model = self.reranker.model
        m, dim = int(model.num_indicators), int(model.embed_dim)
        array = np.asarray(indicators, dtype=np.float32)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.shape != (m, dim):
            raise InvalidInputError(
                f"indicators must have shape [{m}, {dim}] (m, D of the served model), "
                f"got {list(np.shape(indicators))}"
            )
        if not np.isfinite(array).all():
            raise InvalidInputError("indicators contain NaN or infinity")
        if array.size and float(np.abs(array).max()) > MAX_INDICATOR_ABS:
            raise InvalidInputError(
                f"indicator values must lie in [-{MAX_INDICATOR_ABS:g}, {MAX_INDICATOR_ABS:g}] "
                "(Encode gives L2-normalised rows); larger ones overflow the scores"
            )
        return array

    def check_candidates(
        self, candidates_ids: Sequence[str], broad_scores: Sequence[float] | None
    ) -> tuple[list[str], list[float] | None]:
        ids = list(candidates_ids)
        if not ids:
            raise InvalidInputError("no candidate ids given")
        if len(ids) > self.config.max_candidates:
            raise InvalidInputError(
                f"{len(ids)} candidates exceed max_candidates={self.config.max_candidates}"
            )
        if any(not isinstance(i, str) or not i for i in ids):
            raise InvalidInputError("candidate ids must be non-empty strings")
        bad = next((i for i in ids if not _VALID_ID.fullmatch(i) or ".." in i), None)
        if bad is not None:  # refused here, before it can fail a whole batch of other calls
            from tb_reranker.stores import validate_video_id

            validate_video_id(bad)  # raises with the rule spelled out
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dupes = sorted({i for i in ids if i in seen or seen.add(i)})
            raise InvalidInputError(f"duplicate candidate ids: {dupes[:10]}")
        if broad_scores is None:
            return ids, None
        scores = [float(s) for s in broad_scores]
        if len(scores) != len(ids):
            raise InvalidInputError(
                f"{len(ids)} candidate ids but {len(scores)} broad scores (give one per id, "
                "or none to compute them from the stored tokens)"
            )
        if not all(math.isfinite(s) for s in scores):
            raise InvalidInputError("broad scores contain NaN or infinity")
        if any(abs(s) > MAX_BROAD_SCORE_ABS for s in scores):
            raise InvalidInputError(
                f"broad scores must lie in [-{MAX_BROAD_SCORE_ABS:g}, {MAX_BROAD_SCORE_ABS:g}]"
            )
        return ids, scores

    def check_top_n(self, top_n: int | None) -> int | None:
        if top_n is None or top_n == 0:
            return None
        if top_n < 0:
            raise InvalidInputError(f"top_n must be positive, got {top_n}")
        return int(top_n)

    # ------------------------------------------------------------------ verbs
    async def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, dict[str, int]]:
        """Texts → indicators ``[Q, m, D]`` and timings (ns, batch_size)."""
        texts = self.check_texts(texts)
        self.reranker  # noqa: B018 - raises while loading
        started = time.perf_counter_ns()
        (indicators, encode_ns), info = await self.encode_batcher.submit(texts)
        return indicators, _timings(info, started, encode_ns=encode_ns)

    async def rerank(self, item: RerankItem) -> tuple[RerankResult, dict[str, int]]:
        """One validated query → its ``RerankResult`` and timings."""
        self.reranker  # noqa: B018
        if (item.text is None) == (item.indicators is None):
            raise InvalidInputError("give the query as text or as indicators (exactly one)")
        if item.text is not None:
            self.check_text(item.text)
        else:
            item.indicators = self.check_indicators(item.indicators)
        item.candidates_ids, item.broad_scores = self.check_candidates(
            item.candidates_ids, item.broad_scores
        )
        item.top_n = self.check_top_n(item.top_n)
        if item.contents_hashes is not None and len(item.contents_hashes) != len(
            item.candidates_ids
        ):
            raise InvalidInputError(
                f"{len(item.candidates_ids)} candidate ids but {len(item.contents_hashes)} "
                "content hashes"
            )
        started = time.perf_counter_ns()
        result, info = await self.rerank_batcher.submit(item)
        return result, _timings(info, started, **item.timings)

    async def search(
        self,
        query: str | np.ndarray,
        *,
        limit: int,
        rerank: bool,
        filter: str | None,
    ) -> tuple[list[Hit], dict[str, int]]:
        """Milvus broad search (+ rerank) for one query, on the I/O pool."""
        reranker = self.reranker
        index = self.components.index if self.components is not None else None
        if index is None and self.index_failure is not None:
            failure = self.index_failure  # e.g. the collection does not exist: a clear reason
            raise type(failure)(failure.message)  # a fresh instance per call
        if index is None and self.index_error is not None:
            raise IndexBackendError(
                f"Milvus is not reachable yet (the server keeps retrying): {self.index_error}"
            )
        if index is None:
            raise SearchDisabledError("search is not enabled on this server (no Milvus collection)")
        if limit <= 0 or limit > self.config.max_candidates:
            raise InvalidInputError(
                f"limit must be in 1..{self.config.max_candidates} (max_candidates), got {limit}"
            )
        filter = check_filter(
            filter,
            max_chars=self.config.max_filter_chars,
            max_depth=self.config.max_filter_depth,
        )
        queries: Any
        if isinstance(query, str):
            queries = [self.check_text(query)]
        else:
            queries = self.check_indicators(query)[None]
        started = time.perf_counter_ns()

        def run() -> list[Hit]:
            with self._device_context():
                try:
                    return reranker.search(
                        index,
                        queries,
                        limit=limit,
                        rerank=rerank,
                        filter=filter or None,
                        max_limit=self.config.max_candidates,
                    )[0]
                except NotFoundError as exc:  # the collection is gone: the server's problem
                    log.warning("Search is not serving: %s", exc)
                    raise SearchDisabledError(f"Search is not serving: {exc}") from exc
                except TBError:
                    raise
                except Exception as exc:
                    if _is_milvus_error(exc):
                        raise IndexBackendError(f"Milvus search failed: {exc}") from exc
                    raise

        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(self._io_executor, run)
        total = time.perf_counter_ns() - started
        return hits, {"total_ns": total, "batch_size": 1}

    async def invalidate(self, videos_ids: Sequence[str] | None) -> None:
        """Drop cached K/V of these videos (all with ``None``), on the device thread."""
        reranker = self.reranker
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._device_executor,
            reranker.invalidate,
            None if videos_ids is None else list(videos_ids),
        )

    # ------------------------------------------------------------------ batch functions
    def _run_encode(self, items: Sequence[list[str]]) -> list[tuple[np.ndarray, int]]:
        """Device thread: one encoder call for all texts of the batch, split per call."""
        flat = [text for texts in items for text in texts]
        started = time.perf_counter_ns()
        with self._device_context():
            indicators = self.reranker.encode(flat)  # [sum Q, m, D]
        encode_ns = time.perf_counter_ns() - started
        out, start = [], 0
        for texts in items:
            out.append((indicators[start : start + len(texts)], encode_ns))
            start += len(texts)
        return out

    def _run_rerank(self, items: Sequence[RerankItem]) -> list[Any]:
        """Device thread: encode the text queries at once, then one fusion per group."""
        reranker = self.reranker
        queries: list[np.ndarray | None] = [item.indicators for item in items]
        text_positions = [n for n, item in enumerate(items) if item.indicators is None]
        with self._device_context():
            if text_positions:
                started = time.perf_counter_ns()
                encoded = reranker.encode([items[n].text for n in text_positions])
                encode_ns = time.perf_counter_ns() - started
                for row, n in enumerate(text_positions):
                    queries[n] = encoded[row]
                    items[n].timings["encode_ns"] = encode_ns
            results: list[Any] = [None] * len(items)
            # calls with and without broad scores cannot share one Reranker.rerank call
            for with_scores in (True, False):
                group = [
                    n
                    for n, item in enumerate(items)
                    if (item.broad_scores is not None) == with_scores
                ]
                if not group:
                    continue
                hashes = [items[n].contents_hashes for n in group]
                group_results = reranker.rerank(
                    np.stack([queries[n] for n in group]),
                    [items[n].candidates_ids for n in group],
                    [items[n].broad_scores for n in group] if with_scores else None,
                    contents_hashes=(
                        None
                        if all(h is None for h in hashes)
                        else [
                            h if h is not None else [None] * len(items[n].candidates_ids)
                            for n, h in zip(group, hashes, strict=True)
                        ]
                    ),
                )
                for n, result in zip(group, group_results, strict=True):
                    results[n] = self._finish(items[n], result)
        return results

    @staticmethod
    def _finish(item: RerankItem, result: RerankResult) -> Any:
        """Apply the per-call options (strict, top_n) to a batched result."""
        if item.strict and result.missing_ids:
            return NotFoundError(
                f"{len(result.missing_ids)} candidate ids not in the frame store: "
                f"{sorted(result.missing_ids)[:10]}"
            )
        if item.top_n is not None:
            result.candidates = result.candidates[: item.top_n]
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
