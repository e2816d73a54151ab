"""The micro-batcher on a real event loop and a real executor thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tb_reranker.errors import InvalidInputError
from tb_reranker.server.batcher import MicroBatcher


def _double(items):
    """Batch function: doubles each item, fails the item -1 alone, records batch sizes."""
    _double.sizes.append(len(items))
    if -1 in items and len(items) == 1:
        raise InvalidInputError("bad item")
    if -1 in items:
        raise InvalidInputError("a batch holding a bad item fails as a whole")
    return [2 * item for item in items]


def _run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(1) as pool:
        yield pool


def test_concurrent_calls_share_batches(executor):
    _double.sizes = []

    async def main():
        batcher = MicroBatcher(_double, executor, max_batch=8, max_wait_ms=50)
        results = await asyncio.gather(*(batcher.submit(n) for n in range(20)))
        await batcher.close()
        return results

    results = _run(main())
    assert [value for value, _ in results] == [2 * n for n in range(20)]
    assert sum(_double.sizes) == 20 and max(_double.sizes) == 8 and len(_double.sizes) == 3
    assert all(info.batch_size in (8, 4) for _, info in results)
    assert all(info.queue_ns >= 0 for _, info in results)


def test_disabled_runs_each_call_alone(executor):
    _double.sizes = []

    async def main():
        batcher = MicroBatcher(_double, executor, max_batch=8, enabled=False)
        return await asyncio.gather(*(batcher.submit(n) for n in range(5)))

    results = _run(main())
    assert _double.sizes == [1] * 5 and [i.batch_size for _, i in results] == [1] * 5


def test_a_bad_item_fails_alone(executor):
    _double.sizes = []

    async def main():
        batcher = MicroBatcher(_double, executor, max_batch=8, max_wait_ms=50)
        outcomes = await asyncio.gather(
            *(batcher.submit(n) for n in (1, -1, 3)), return_exceptions=True
        )
        await batcher.close()
        return outcomes

    good, bad, other = _run(main())
    assert good[0] == 2 and other[0] == 6
    assert isinstance(bad, InvalidInputError) and "bad item" in str(bad)


def test_callers_that_gave_up_are_dropped(executor):
    seen: list[list[int]] = []
    gate = threading.Event()

    def slow(items):
        seen.append(list(items))
        gate.wait(5)
        return list(items)

    async def main():
        batcher = MicroBatcher(slow, executor, max_batch=4, max_wait_ms=1)
        first = asyncio.create_task(batcher.submit(0))  # occupies the device
        await asyncio.sleep(0.05)
        doomed = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.01)
        doomed.cancel()  # e.g. its deadline expired while it queued
        gate.set()
        started = time.monotonic()
        results = await asyncio.gather(first, kept)
        await batcher.close()
        return results, time.monotonic() - started

    (first, kept), _ = _run(main())
    assert first[0] == 0 and kept[0] == 2
    assert [1] not in seen and all(1 not in batch for batch in seen)


def test_expired_calls_are_not_run_behind_another_batchers_work(executor):
    """Two batchers share the device thread. A call of the second whose deadline passes while
    the first's work holds the thread is answered DEADLINE_EXCEEDED and never run (before: it
    left its queue at once, waited in the executor, and ran after its caller had gone)."""
    from tb_reranker.errors import DeadlineExceededError
    from tb_reranker.server.batcher import deadline_scope

    gate = threading.Event()
    ran: list[list[int]] = []

    def hold(items):
        gate.wait(5)
        return list(items)

    def record(items):
        ran.append(list(items))
        return list(items)

    async def main():
        encode = MicroBatcher(hold, executor, max_batch=4, max_wait_ms=0)
        rerank = MicroBatcher(record, executor, max_batch=4, max_wait_ms=0)
        blocker = asyncio.create_task(encode.submit(0))
        await asyncio.sleep(0.05)
        with deadline_scope(0.05):
            doomed = asyncio.create_task(rerank.submit(1))
        with deadline_scope(30):
            kept = asyncio.create_task(rerank.submit(2))
        await asyncio.sleep(0.2)  # both deadlines known; the first has passed
        gate.set()
        outcomes = await asyncio.gather(blocker, doomed, kept, return_exceptions=True)
        await encode.close()
        await rerank.close()
        return outcomes

    blocker, doomed, kept = _run(main())
    assert blocker[0] == 0 and kept[0] == 2
    assert isinstance(doomed, DeadlineExceededError)
    assert all(1 not in batch for batch in ran) and any(2 in batch for batch in ran)


def test_a_call_expired_in_the_queue_fails_with_deadline_exceeded(executor):
    """Same batcher: the expired call gets its error (it is not left waiting)."""
    from tb_reranker.errors import DeadlineExceededError
    from tb_reranker.server.batcher import deadline_scope

    gate = threading.Event()
    ran: list[list[int]] = []

    def slow(items):
        ran.append(list(items))
        gate.wait(5)
        return list(items)

    async def main():
        batcher = MicroBatcher(slow, executor, max_batch=4, max_wait_ms=0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)
        with deadline_scope(0.01):
            doomed = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.1)
        gate.set()
        outcomes = await asyncio.gather(first, doomed, return_exceptions=True)
        await batcher.close()
        return outcomes

    first, doomed = _run(main())
    assert first[0] == 0 and isinstance(doomed, DeadlineExceededError)
    assert ran == [[0]]


# ---------------------------------------------------------------------- weights
@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 80), min_size=1, max_size=30),
    max_weight=st.integers(1, 64),
    max_batch=st.integers(1, 8),
)
def test_weighted_batches_hold_at_most_max_weight(sizes, max_weight, max_batch):
    """Before: a batch took up to max_batch calls whatever their size (32 Encode calls of 256
    texts were one device call of 8,192 texts). Now at most max_weight (a heavier call runs
    alone), every call once, in arrival order, each with its own result."""
    batches: list[list[int]] = []

    def run(items):
        batches.append([len(item) for item in items])
        return [sum(item) for item in items]

    async def main():
        batcher = MicroBatcher(
            run, pool, max_batch=max_batch, max_wait_ms=20, weight=len, max_weight=max_weight
        )
        calls = [list(range(size)) for size in sizes]
        results = await asyncio.gather(*(batcher.submit(call) for call in calls))
        await batcher.close()
        return [value for value, _ in results]

    with ThreadPoolExecutor(1) as pool:
        assert _run(main()) == [sum(range(size)) for size in sizes]
    assert [size for batch in batches for size in batch] == sizes
    for batch in batches:
        assert len(batch) <= max_batch
        assert sum(batch) <= max_weight or len(batch) == 1


def test_close_cancels_the_call_held_for_the_next_batch(executor):
    """The call that did not fit the running batch is not left waiting forever."""
    gate = threading.Event()

    def hold(items):
        gate.wait(5)
        return [len(item) for item in items]

    async def main():
        batcher = MicroBatcher(
            hold, executor, max_batch=8, max_wait_ms=50, weight=len, max_weight=4
        )
        first = asyncio.create_task(batcher.submit([1, 2, 3]))
        held = asyncio.create_task(batcher.submit([4, 5, 6]))  # 3 + 3 > 4: the next batch
        await asyncio.sleep(0.2)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.05)
        gate.set()
        await closing
        return await asyncio.gather(first, held, return_exceptions=True)

    first, held = _run(main())
    assert isinstance(held, asyncio.CancelledError)
    assert isinstance(first, asyncio.CancelledError) or first[0] == 3
