"""Dynamic micro-batching: concurrent calls share one device batch.

The first call to arrive opens a batch; the batch closes when it holds ``max_batch`` calls or
``max_wait_ms`` after it opened, then runs as one function call on the (single-threaded) device
executor while the next batch fills. With ``max_wait_ms = 0`` (the server default) a batch takes
exactly the calls that queued while the previous batch ran: no added latency at low load, large
batches under load (on the 2-core test machine a 2 ms window added 5-13 ms to a lone call and
lowered throughput, see benchmarks/grpc_rerank.py). Calls whose caller has gone (cancelled, deadline) are dropped
before the batch runs. With ``enabled=False`` each call runs alone (batch size 1) on the same
executor, which is the comparison the benchmark draws.

Weights: with ``max_weight`` a batch also holds at most that much work (``weight(item)``, e.g. the
texts of an Encode call): the call that would overflow it opens the next batch instead (a call
heavier than ``max_weight`` runs alone). The worker runs one batch at a time, so work another
batcher queued on the device thread in the meantime runs between two batches.

Deadlines: a call submitted inside :func:`deadline_scope` (the gRPC servicers open one per call
with its deadline) carries it. Batchers of different kinds share one device thread, so a batch
may wait there behind another kind's work after it left the queue: on the device thread, just
before ``run``, every call whose deadline has passed gets ``DeadlineExceededError`` and is not
run (nor counted in ``on_batch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tb_reranker.errors import DeadlineExceededError

__all__ = ["MicroBatcher", "BatchInfo", "deadline_scope"]

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# run(items) -> one result or one exception per item, same order
BatchFn = Callable[[Sequence[Any]], Sequence[Any]]


# time.monotonic() by which the current call must be answered (None: no deadline)
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "tb_call_deadline", default=None
)


@contextlib.contextmanager
def deadline_scope(seconds: float | None) -> Iterator[None]:
    """Calls submitted inside (and in tasks created inside) carry ``seconds`` from now as
    their deadline; ``None``: no deadline."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@dataclass(frozen=True)
class BatchInfo:
    queue_ns: int  # time between submit() and the start of the batch
    batch_size: int  # calls in the batch this call ran in


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    submitted_ns: int
    deadline: float | None = None  # time.monotonic()


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _deadline_error() -> DeadlineExceededError:
    return DeadlineExceededError("the call's deadline expired before the device ran it")


def _live(batch: list[_Pending]) -> list[_Pending]:
    """The calls still wanted: not cancelled; an expired one is failed here, not run."""
    live = []
    for pending in batch:
        if pending.future.done():
            continue
        if _expired(pending.deadline):
            pending.future.set_exception(_deadline_error())
            continue
        live.append(pending)
    return live


class MicroBatcher(Generic[ItemT, ResultT]):
    """Collect concurrent ``submit`` calls into batches for ``run`` on ``executor``.

    Args:
        run: blocking function taking a list of items and returning, in order, one result or
            one ``BaseException`` instance per item (an exception fails that call alone).
        executor: where ``run`` executes (one thread for the device).
        max_batch: most items per batch.
        max_wait_ms: longest a batch waits to fill after its first item arrived.
        enabled: False → every item runs alone, at once.
        on_batch: optional callback ``(batch_size)`` for metrics.
        weight: the work of one item (default 1 each).
        max_weight: most work per batch (None: only ``max_batch`` bounds a batch).
    """

    def __init__(
        self,
        run: BatchFn,
        executor: Executor,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        enabled: bool = True,
        on_batch: Callable[[int], None] | None = None,
        name: str = "batch",
        weight: Callable[[Any], int] | None = None,
        max_weight: int | None = None,
    ) -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.enabled = enabled
        self._on_batch = on_batch
        self.name = name
        self._weight = weight if weight is not None else _one
        self.max_weight = max_weight
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._held: _Pending | None = None  # taken from the queue, opens the next batch

    async def submit(self, item: ItemT) -> tuple[ResultT, BatchInfo]:
        """Run ``item`` in the next batch; returns its result and how it was batched."""
        submitted = time.perf_counter_ns()
        deadline = _DEADLINE.get()
        loop = asyncio.get_running_loop()
        if not self.enabled:
            results = await loop.run_in_executor(self._executor, self._run_live, [item], [deadline])
            return _unwrap(results[0]), BatchInfo(queue_ns=0, batch_size=1)
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work(), name=f"tb-{self.name}-batcher")
        future: asyncio.Future = loop.create_future()
        assert self._queue is not None
        self._queue.put_nowait(_Pending(item, future, submitted, deadline))
        return await future

    async def close(self) -> None:
        """Stop the worker; calls still queued fail with ``CancelledError``."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._held is not None:
            if not self._held.future.done():
                self._held.future.cancel()
            self._held = None
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.cancel()

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            # callers that gave up or whose deadline passed are dropped
            batch = _live(await self._collect(queue, loop))
            if not batch:
                continue
            started = time.perf_counter_ns()
            try:
                results = await loop.run_in_executor(
                    self._executor,
                    self._run_live,
                    [p.item for p in batch],
                    [p.deadline for p in batch],
                )
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.cancel()
                raise
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                info = BatchInfo(queue_ns=started - pending.submitted_ns, batch_size=len(batch))
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result((result, info))

    async def _collect(
        self, queue: asyncio.Queue[_Pending], loop: asyncio.AbstractEventLoop
    ) -> list[_Pending]:
        """The next batch: the call held over (or the first to arrive), then the calls that
        arrive within ``max_wait_s`` while the batch has room (``max_batch``, ``max_weight``);
        once the window closed, only those already waiting."""
        first = self._held if self._held is not None else await queue.get()
        self._held = None
        batch, weight = [first], self._weight(first.item)
        close_at = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = close_at - loop.time()
            if remaining <= 0:
                if queue.empty():
                    break
                pending = queue.get_nowait()
            else:
                try:
                    pending = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            more = self._weight(pending.item)
            if self.max_weight is not None and weight + more > self.max_weight:
                self._held = pending
                break
            batch.append(pending)
            weight += more
        return batch

    def _run_live(self, items: list[Any], deadlines: list[float | None]) -> list[Any]:
        """Device thread: ``run`` the items whose deadline has not passed; the others get
        ``DeadlineExceededError`` without running."""
        live = [n for n, deadline in enumerate(deadlines) if not _expired(deadline)]
        results: list[Any] = [_deadline_error() for _ in items]
        if len(live) < len(items):
            log.debug("%s: %d expired calls dropped", self.name, len(items) - len(live))
        if not live:
            return results
        if self._on_batch is not None:
            self._on_batch(len(live))
        for n, result in zip(live, self._run_safely([items[n] for n in live]), strict=True):
            results[n] = result
        return results

    def _run_safely(self, items: list[Any]) -> list[Any]:
        """``run`` that never raises: a failing batch of several is retried item by item."""
        try:
            results = list(self._run(items))
        except Exception as exc:  # noqa: BLE001 - isolated per item below
            if len(items) == 1:
                return [exc]
            log.debug("%s batch of %d failed (%s); running items alone", self.name, len(items), exc)
            return [self._run_safely([item])[0] for item in items]
        if len(results) != len(items):
            raise RuntimeError(f"{self.name}: {len(items)} items but {len(results)} results")
        return results


def _one(item: Any) -> int:
    return 1


def _unwrap(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result
