"""Tests for dynamic micro-batching (threadbudget._batching).

Every wait here is bounded (``JOIN``, ``anyio.fail_after``, ``call(timeout=...)``), so a bug
fails a test instead of hanging the run. Batch functions that must stay "running" wait on a
``threading.Event`` gate, which the fixture opens at teardown whatever happened.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadbudget import BatcherSnapshot, BatchQueueFull, CpuSlots, MicroBatcher, batched
from threadbudget._slots import WAIT_BUCKETS

from .conftest import PYTHON, python_env

JOIN = 10.0  # seconds; the longest any test waits for something that should happen at once


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Poison(Exception):
    """What the batch function raises when a poison input is in its batch."""


class Recorder:
    """A batch function that records its batches and returns ``(x, batch_id, position)``.

    With a gate it waits for the gate to open before returning (a batch that "runs" for as
    long as the test wants). ``poison`` inputs make the whole batch raise ``Poison``.
    """

    def __init__(self, *, gated: bool = False, poison: object = None) -> None:
        self.batches: list[list[Any]] = []
        self.grants: list[int | None] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.poison = poison
        self.slots: CpuSlots | None = None
        self._lock = threading.Lock()

    def __call__(self, items: list[Any]) -> list[tuple[Any, int, int]]:
        with self._lock:
            batch_id = len(self.batches)
            self.batches.append(list(items))
            if self.slots is not None:
                self.grants.append(self.slots.current_grant())
        if not self.gate.wait(JOIN):
            raise AssertionError("the gate of a batch was never opened")
        if self.poison is not None and self.poison in items:
            raise Poison(f"poison in batch {batch_id}")
        return [(x, batch_id, position) for position, x in enumerate(items)]

    def seen(self) -> list[Any]:
        with self._lock:
            return [x for batch in self.batches for x in batch]

    def check(self, x: Any, result: tuple[Any, int, int]) -> None:
        """*result* is the one for *x*, and sits at *x*'s place in the batch that ran it."""
        value, batch_id, position = result
        assert value == x
        assert self.batches[batch_id][position] == x


class Kit:
    """Makes recorders and batchers, and cleans up after them whatever the test did."""

    def __init__(self) -> None:
        self.recorders: list[Recorder] = []
        self.batchers: list[MicroBatcher[Any, Any]] = []

    def recorder(self, **kwargs: Any) -> Recorder:
        recorder = Recorder(**kwargs)
        self.recorders.append(recorder)
        return recorder

    def batcher(self, function: Callable[[list[Any]], Sequence[Any]], **kwargs: Any) -> Any:
        kwargs.setdefault("slots", CpuSlots(2))
        batcher: MicroBatcher[Any, Any] = MicroBatcher(function, **kwargs)
        if isinstance(function, Recorder):
            function.slots = batcher.slots
        self.batchers.append(batcher)
        return batcher

    def close(self) -> None:
        for recorder in self.recorders:
            recorder.gate.set()
        for batcher in self.batchers:
            batcher.close(timeout=JOIN)
            dispatcher = batcher._dispatcher
            assert dispatcher is None or not dispatcher.is_alive(), "dispatcher did not stop"


@pytest.fixture
def kit() -> Iterator[Kit]:
    made = Kit()
    try:
        yield made
    finally:
        made.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


async def async_wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        with anyio.fail_after(JOIN):
            while not predicate():
                await anyio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def snap(batcher: MicroBatcher[Any, Any]) -> BatcherSnapshot:
    return batcher.snapshot()


class Caller(threading.Thread):
    """A thread that makes one ``call`` and keeps its result or error."""

    def __init__(self, batcher: MicroBatcher[Any, Any], x: Any, timeout: float = JOIN) -> None:
        super().__init__(daemon=True)
        self.batcher, self.x, self.timeout = batcher, x, timeout
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.batcher.call(self.x, timeout=self.timeout)
        except BaseException as error:
            self.error = error

    def outcome(self) -> Any:
        self.join(JOIN + 1)
        assert not self.is_alive(), f"caller of {self.x!r} still waiting"
        if self.error is not None:
            raise self.error
        return self.result


def queue_in_order(batcher: MicroBatcher[Any, Any], xs: Sequence[Any]) -> list[Caller]:
    """Callers of *xs* (size 1 each), each queued before the next starts: a known order."""
    callers = []
    for x in xs:
        queued = snap(batcher).queued
        callers.append(Caller(batcher, x))
        wait_until(lambda queued=queued: snap(batcher).queued == queued + 1, f"{x!r} queued")
    return callers


# --------------------------------------------------------------------------------------------
# Results return to the right caller, in order
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_async_callers_each_get_their_own_result(kit: Kit) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=8, max_wait=0.002, max_queue=1000)
    enqueued: list[int] = []
    results: dict[int, Any] = {}
    rng = random.Random(1)
    delays = [rng.random() * 0.01 for _ in range(200)]

    async def caller(x: int) -> None:
        await anyio.sleep(delays[x])
        enqueued.append(x)  # no await between this and the enqueue inside batcher(x)
        results[x] = await batcher(x)

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            for x in range(200):
                group.start_soon(caller, x)

    assert sorted(results) == list(range(200))
    for x, result in results.items():
        recorder.check(x, result)
    assert all(1 <= len(batch) <= 8 for batch in recorder.batches)
    assert max(len(batch) for batch in recorder.batches) > 1, "nothing was batched"
    # One batch at a time (max_concurrent=1): batches are the queue, first in first out.
    assert recorder.seen() == enqueued


def test_threads_each_get_their_own_result(kit: Kit) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=16, max_wait=0.001, max_queue=1000)
    results: dict[tuple[int, int], Any] = {}
    errors: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            for i in range(25):
                results[thread, i] = batcher.call((thread, i), timeout=JOIN)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN * 2)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(results) == 16 * 25
    for x, result in results.items():
        recorder.check(x, result)
    assert max(len(batch) for batch in recorder.batches) > 1, "nothing was batched"
    assert sorted(recorder.seen()) == sorted(results)


@pytest.mark.anyio
async def test_async_and_thread_callers_share_batches(kit: Kit) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=8, max_wait=0.005, max_queue=1000)
    results: dict[Any, Any] = {}

    async def task_caller(x: int) -> None:
        await anyio.sleep(x * 0.001)  # spread arrivals so that the two kinds interleave
        results["task", x] = await batcher(("task", x))

    def thread_caller(x: int) -> None:
        time.sleep(x * 0.001)
        results["thread", x] = batcher.call(("thread", x), timeout=JOIN)

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            for x in range(40):
                group.start_soon(task_caller, x)
                if x % 4 == 0:
                    group.start_soon(anyio.to_thread.run_sync, thread_caller, x)

    assert len(results) == 50
    for x, result in results.items():
        recorder.check(x, result)
    mixed = [b for b in recorder.batches if {kind for kind, _ in b} == {"task", "thread"}]
    assert mixed, "threads and tasks never shared a batch"


@settings(max_examples=40, deadline=None, database=None)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(0, 4), st.integers(1, 5)),  # (delay in ms, size)
        min_size=1,
        max_size=30,
    ),
    limits=st.fixed_dictionaries(
        {
            "max_batch_size": st.integers(1, 6),
            "max_wait": st.sampled_from([0.0, 0.001, 0.003]),
            "max_concurrent": st.integers(1, 2),
            "max_queue": st.integers(1, 40),
        }
    ),
    backend=st.sampled_from(["asyncio", "trio"]),
)
def test_any_arrival_pattern_returns_each_caller_its_own_result(
    arrivals: list[tuple[int, int]], limits: dict[str, Any], backend: str
) -> None:
    """Whatever the arrivals: own results, batch sizes within the limit, the queue bound held."""
    max_batch_size, max_queue = limits["max_batch_size"], limits["max_queue"]
    queue_seen: list[int] = []
    batches: list[list[tuple[int, int]]] = []
    lock = threading.Lock()

    def function(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
        with lock:
            batches.append(list(items))
            queue_seen.append(batcher.snapshot().queued)
        time.sleep(0.001)
        return [(index, len(batches)) for index, _ in items]

    batcher: MicroBatcher[tuple[int, int], tuple[int, int]] = MicroBatcher(
        function, slots=CpuSlots(2), size_of=lambda item: item[1], **limits
    )
    results: dict[int, tuple[int, int]] = {}
    rejected: set[int] = set()
    refusals: list[tuple[BatchQueueFull, int]] = []

    async def caller(index: int, delay_ms: int, size: int) -> None:
        await anyio.sleep(delay_ms / 1000)
        try:
            results[index] = await batcher((index, size))
        except BatchQueueFull as error:
            refusals.append((error, size))
            rejected.add(index)

    async def main() -> None:
        with anyio.fail_after(JOIN):
            async with anyio.create_task_group() as group:
                for index, (delay_ms, size) in enumerate(arrivals):
                    group.start_soon(caller, index, delay_ms, size)

    try:
        anyio.run(main, backend=backend)
    finally:
        batcher.close(timeout=JOIN)

    assert set(results) | rejected == set(range(len(arrivals)))
    for refusal, size in refusals:
        assert refusal.retry_after >= 1
        assert refusal.queued + size > max_queue
    assert not set(results) & rejected
    for index, (value, _) in results.items():
        assert value == index
    ran = [index for batch in batches for index, _ in batch]
    assert sorted(ran) == sorted(results), "an input ran twice, was lost, or was rejected"
    for batch in batches:
        size = sum(s for _, s in batch)
        assert size <= max_batch_size or len(batch) == 1, batch
    largest = max(size for _, size in arrivals)
    assert all(queued <= max(max_queue, largest) for queued in queue_seen)
    final = batcher.snapshot()
    assert final.rejected == len(rejected)
    assert final.items == len(results)
    assert final.queued == 0
    assert final.running_batches == 0


# --------------------------------------------------------------------------------------------
# Error isolation
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_failing_batch_fails_its_callers_only(kit: Kit) -> None:
    recorder = kit.recorder(poison=4)
    batcher = kit.batcher(recorder, max_batch_size=3, max_wait=0.05)
    outcomes: dict[int, Any] = {}

    async def caller(x: int) -> None:
        try:
            outcomes[x] = await batcher(x)
        except Poison as error:
            outcomes[x] = error

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            for x in range(9):
                group.start_soon(caller, x)

    poisoned = next(batch for batch in recorder.batches if 4 in batch)
    assert len(recorder.batches) >= 2
    for x, outcome in outcomes.items():
        if x in poisoned:
            assert isinstance(outcome, Poison), x
        else:
            recorder.check(x, outcome)
    assert sum(isinstance(o, Poison) for o in outcomes.values()) == len(poisoned)
    # The dispatcher is still there for the next callers.
    with anyio.fail_after(JOIN):
        recorder.check(100, await batcher(100))
    assert snap(batcher).failed_batches == 1


def test_a_failing_batch_fails_its_thread_callers_only(kit: Kit) -> None:
    recorder = kit.recorder(gated=True, poison="bad")
    batcher = kit.batcher(recorder, max_batch_size=3, max_wait=0.05)
    first = Caller(batcher, "first")
    wait_until(lambda: len(recorder.batches) == 1, "the first batch to start")
    # Queued while the first batch runs: two full batches, the first with the poison.
    callers = queue_in_order(batcher, ["a", "bad", "b", "c", "d", "e"])
    recorder.gate.set()
    recorder.check("first", first.outcome())
    for caller in callers[:3]:
        with pytest.raises(Poison, match="poison in batch 1"):
            caller.outcome()
    for caller in callers[3:]:
        recorder.check(caller.x, caller.outcome())
    assert recorder.batches[1:] == [["a", "bad", "b"], ["c", "d", "e"]]  # queued in order
    recorder.check("next", batcher.call("next", timeout=JOIN))


class Fatal(BaseException):
    """Not an Exception: the dispatcher must survive it too."""


@pytest.mark.parametrize(
    ("function", "error", "message"),
    [
        (lambda items: items[:-1], ValueError, r"returned 1 result\(s\) for 2 input\(s\)"),
        (lambda items: [*items, None], ValueError, r"returned 3 result\(s\) for 2 input\(s\)"),
        (iter, TypeError, "has no len"),
        (lambda items: (_ for _ in ()).throw(Fatal("boom")), Fatal, "boom"),
    ],
    ids=["too-few", "too-many", "no-len", "base-exception"],
)
def test_a_bad_batch_function_fails_that_batch_and_the_dispatcher_goes_on(
    kit: Kit, function: Callable[[list[Any]], Any], error: type[BaseException], message: str
) -> None:
    calls = []

    def switching(items: list[Any]) -> Any:
        calls.append(list(items))
        return function(items) if len(calls) == 1 else [x * 10 for x in items]

    batcher = kit.batcher(switching, max_batch_size=2, max_wait=1.0)
    callers = [Caller(batcher, 1), Caller(batcher, 2)]  # one full batch of two
    for caller in callers:
        with pytest.raises(error, match=message):
            caller.outcome()
    assert calls in ([[1, 2]], [[2, 1]])
    assert sorted(caller.outcome() for caller in (Caller(batcher, 3), Caller(batcher, 4))) == [
        30,
        40,
    ]
    s = snap(batcher)
    assert (s.batches, s.failed_batches, s.items) == (2, 1, 4)


@pytest.mark.anyio
async def test_each_caller_of_a_failed_batch_sees_only_its_own_stack(kit: Kit) -> None:
    recorder = kit.recorder(poison="a")
    batcher = kit.batcher(recorder, max_batch_size=2, max_wait=1.0)
    stacks: dict[str, list[str]] = {}

    async def caller_alpha() -> None:
        try:
            await batcher("a")
        except Poison as error:  # read at once: nothing else runs until this task yields
            stacks["alpha"] = [f.name for f in traceback.extract_tb(error.__traceback__)]

    async def caller_beta() -> None:
        try:
            await batcher("b")
        except Poison as error:
            stacks["beta"] = [f.name for f in traceback.extract_tb(error.__traceback__)]

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            group.start_soon(caller_alpha)
            group.start_soon(caller_beta)
    assert set(stacks) == {"alpha", "beta"}
    assert "Recorder.__call__" in stacks["alpha"] or "__call__" in stacks["alpha"]
    assert "caller_beta" not in stacks["alpha"]
    assert "caller_alpha" not in stacks["beta"]


# --------------------------------------------------------------------------------------------
# Cancellation and timeouts
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_caller_cancelled_while_queued_leaves_the_queue(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=4, max_wait=0.001)
    results: dict[str, Any] = {}

    async def caller(x: str) -> None:
        results[x] = await batcher(x)

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            group.start_soon(caller, "running")
            await async_wait_until(lambda: len(recorder.batches) == 1, "the first batch")
            with anyio.CancelScope() as doomed:
                group.start_soon(caller, "stays")
                async with anyio.create_task_group() as inner:
                    inner.start_soon(caller, "cancelled")
                    await async_wait_until(lambda: snap(batcher).queued == 2, "two queued")
                    doomed.cancel()
            assert doomed.cancelled_caught
            s = snap(batcher)
            assert (s.queued, s.abandoned) == (1, 1)
            recorder.gate.set()
    recorder.check("running", results["running"])
    recorder.check("stays", results["stays"])
    assert "cancelled" not in results
    assert "cancelled" not in recorder.seen()
    assert snap(batcher).abandoned == 1


@pytest.mark.anyio
async def test_a_caller_cancelled_while_its_batch_runs_leaves_batch_mates_alone(
    kit: Kit,
) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=3, max_wait=1.0)
    results: dict[str, Any] = {}
    cancelled = anyio.CancelScope()

    async def caller(x: str) -> None:
        results[x] = await batcher(x)

    async def doomed_caller() -> None:
        with cancelled:
            results["doomed"] = await batcher("doomed")

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            group.start_soon(caller, "a")
            group.start_soon(doomed_caller)
            group.start_soon(caller, "b")
            await async_wait_until(lambda: len(recorder.batches) == 1, "the batch to start")
            assert sorted(recorder.batches[0]) == ["a", "b", "doomed"]
            cancelled.cancel()
            await async_wait_until(lambda: snap(batcher).abandoned == 1, "the abandonment")
            recorder.gate.set()
    assert cancelled.cancelled_caught
    assert set(results) == {"a", "b"}
    recorder.check("a", results["a"])
    recorder.check("b", results["b"])
    s = snap(batcher)
    assert (s.batches, s.items, s.failed_batches, s.abandoned) == (1, 3, 0, 1)


def test_call_timeout_abandons_a_queued_input(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=2, max_wait=0.001)
    running = Caller(batcher, "running")
    wait_until(lambda: len(recorder.batches) == 1, "the first batch")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 0\.05 s"):
        batcher.call("late", timeout=0.05)
    assert time.monotonic() - started < JOIN
    s = snap(batcher)
    assert (s.queued, s.abandoned) == (0, 1)
    recorder.gate.set()
    recorder.check("running", running.outcome())
    recorder.check("after", batcher.call("after", timeout=JOIN))
    assert "late" not in recorder.seen()


def test_call_timeout_while_running_leaves_batch_mates_alone(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=2, max_wait=1.0)
    [mate] = queue_in_order(batcher, ["mate"])
    impatient = Caller(batcher, "impatient", timeout=0.3)  # fills the batch: it starts at once
    with pytest.raises(TimeoutError):
        impatient.outcome()
    assert sorted(recorder.batches[0]) == ["impatient", "mate"]
    recorder.gate.set()
    recorder.check("mate", mate.outcome())
    s = snap(batcher)
    assert (s.abandoned, s.failed_batches, s.items) == (1, 0, 2)


# --------------------------------------------------------------------------------------------
# max_wait, queue bound, filling while a batch runs
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_lone_input_waits_about_max_wait(kit: Kit) -> None:
    dispatched: list[float] = []

    def function(items: list[int]) -> list[int]:
        dispatched.append(time.perf_counter())
        return items

    batcher = kit.batcher(function, max_batch_size=8, max_wait=0.05)
    for attempt in range(3):
        started = time.perf_counter()
        with anyio.fail_after(JOIN):
            assert await batcher(attempt) == attempt
        latency = time.perf_counter() - started
        waited = dispatched[-1] - started
        assert 0.045 <= waited <= 0.5, waited
        assert 0.045 <= latency <= 0.5, latency


def test_a_lone_thread_input_waits_about_max_wait(kit: Kit) -> None:
    batcher = kit.batcher(lambda items: items, max_batch_size=8, max_wait=0.05)
    started = time.perf_counter()
    assert batcher.call(1, timeout=JOIN) == 1
    assert 0.045 <= time.perf_counter() - started <= 0.5


def test_inputs_within_max_wait_of_the_oldest_share_its_batch(kit: Kit) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=8, max_wait=0.3)
    first = Caller(batcher, "first")
    time.sleep(0.05)
    second = Caller(batcher, "second")
    recorder.check("first", first.outcome())
    recorder.check("second", second.outcome())
    assert recorder.batches == [["first", "second"]]


def test_max_wait_counts_from_the_oldest_input(kit: Kit) -> None:
    """Later arrivals do not postpone the batch: it is due max_wait after its oldest input."""
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=8, max_wait=0.25)
    started = time.perf_counter()
    callers = [Caller(batcher, 0)]
    for x in (1, 2, 3):
        time.sleep(0.1)
        callers.append(Caller(batcher, x))
    callers[0].outcome()
    first_latency = time.perf_counter() - started
    for caller in callers:
        recorder.check(caller.x, caller.outcome())
    # Due at 0.25 s; were the newest input's wait the one that counted, each arrival would
    # push it back and one batch of all four would start at 0.55 s.
    assert 0.24 <= first_latency <= 0.45, first_latency
    assert recorder.batches[0][0] == 0


@pytest.mark.anyio
async def test_a_full_batch_does_not_wait_for_max_wait(kit: Kit) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=4, max_wait=5.0)
    results: dict[int, Any] = {}

    async def caller(x: int) -> None:
        results[x] = await batcher(x)

    started = time.perf_counter()
    with anyio.fail_after(4.0):
        async with anyio.create_task_group() as group:
            for x in range(4):
                group.start_soon(caller, x)
    assert time.perf_counter() - started < 2.0
    assert len(recorder.batches) == 1
    for x, result in results.items():
        recorder.check(x, result)


@pytest.mark.anyio
async def test_the_queue_bound_rejects_overflow_with_retry_after(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=1, max_queue=3, max_wait=0.0)
    results: dict[int, Any] = {}

    async def caller(x: int) -> None:
        results[x] = await batcher(x)

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as group:
            group.start_soon(caller, 0)
            await async_wait_until(lambda: snap(batcher).running_batches == 1, "batch 0")
            for x in (1, 2, 3):
                group.start_soon(caller, x)
                await async_wait_until(lambda x=x: snap(batcher).queued == x, f"{x} queued")
            with pytest.raises(BatchQueueFull, match="3 queued") as full:
                await batcher(4)
            assert full.value.retry_after >= 1
            assert isinstance(full.value.retry_after, int)
            assert full.value.queued == 3
            s = snap(batcher)
            assert (s.queued, s.rejected) == (3, 1)
            recorder.gate.set()
    assert sorted(results) == [0, 1, 2, 3]
    for x, result in results.items():
        recorder.check(x, result)
    assert 4 not in recorder.seen()


def test_the_queue_bound_counts_by_size(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(
        recorder, max_batch_size=2, max_queue=5, max_wait=0.0, size_of=lambda item: item[1]
    )
    running = Caller(batcher, ("running", 2))
    wait_until(lambda: snap(batcher).running_batches == 1, "the first batch")
    accepted = [Caller(batcher, ("a", 2)), Caller(batcher, ("b", 2))]
    wait_until(lambda: snap(batcher).queued == 4, "size 4 queued")
    with pytest.raises(BatchQueueFull):
        batcher.call(("too big", 2), timeout=JOIN)  # 4 + 2 > 5
    accepted.append(Caller(batcher, ("fits", 1)))  # 4 + 1 <= 5
    wait_until(lambda: snap(batcher).queued == 5, "size 5 queued")
    with pytest.raises(BatchQueueFull):
        batcher.call(("one more", 1), timeout=JOIN)
    recorder.gate.set()
    recorder.check(("running", 2), running.outcome())
    for caller in accepted:
        recorder.check(caller.x, caller.outcome())
    assert snap(batcher).rejected == 2


def test_an_input_larger_than_the_queue_bound_is_accepted_into_an_empty_queue(
    kit: Kit,
) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(
        recorder, max_batch_size=2, max_queue=3, max_wait=0.0, size_of=lambda item: item[1]
    )
    recorder.check(("huge", 10), batcher.call(("huge", 10), timeout=JOIN))
    assert recorder.batches == [[("huge", 10)]]


def test_batches_fill_while_one_runs(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=8, max_wait=0.001, max_concurrent=1)
    first = Caller(batcher, 0)
    wait_until(lambda: len(recorder.batches) == 1, "the first batch")
    callers = queue_in_order(batcher, range(1, 11))
    time.sleep(0.02)  # many times max_wait: still nothing may start while batch 0 runs
    assert len(recorder.batches) == 1
    recorder.gate.set()
    recorder.check(0, first.outcome())
    for caller in callers:
        recorder.check(caller.x, caller.outcome())
    assert recorder.batches == [[0], list(range(1, 9)), [9, 10]]


def test_max_concurrent_batches_run_at_once(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=1, max_wait=0.0, max_concurrent=2)
    callers = [Caller(batcher, x) for x in range(3)]
    wait_until(lambda: snap(batcher).running_batches == 2, "two running batches")
    time.sleep(0.02)
    s = snap(batcher)
    assert (s.running_batches, s.queued) == (2, 1)
    recorder.gate.set()
    for caller in callers:
        recorder.check(caller.x, caller.outcome())


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------


def test_each_batch_runs_in_a_slot_of_the_pool(kit: Kit) -> None:
    slots = CpuSlots(2)
    seen: list[tuple[int | None, int, int]] = []

    def function(items: list[int]) -> list[int]:
        grant = slots.current_grant()
        pool = slots.snapshot()
        seen.append((None if grant is None else int(grant), pool.holders, pool.in_use))
        return items

    one = kit.batcher(function, slots=slots, k=1, max_wait=0.0)
    whole = kit.batcher(function, slots=slots, max_wait=0.0)
    assert one.call(1, timeout=JOIN) == 1
    assert whole.call(2, timeout=JOIN) == 2
    # k=1: one token; no k: the elastic default, the whole budget for a lone unit of work.
    assert seen == [(1, 1, 1), (2, 1, 2)]
    assert slots.snapshot().in_use == 0


def test_a_batch_waits_for_the_budget_held_elsewhere(kit: Kit) -> None:
    slots = CpuSlots(2)
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, slots=slots, max_wait=0.0)
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with slots.slot(2):
            holding.set()
            release.wait(JOIN)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(JOIN)
    try:
        caller = Caller(batcher, "x")
        wait_until(lambda: slots.snapshot().waiting == 1, "the batch to wait for a slot")
        assert recorder.batches == []
        assert snap(batcher).running_batches == 1
    finally:
        release.set()
    recorder.check("x", caller.outcome())
    holder.join(JOIN)


@pytest.mark.anyio
async def test_awaiting_a_batch_while_holding_a_slot_of_its_pool_does_not_hang(
    kit: Kit,
) -> None:
    slots = CpuSlots(2)
    batcher = kit.batcher(lambda items: items, slots=slots, max_wait=0.0)
    outcome: object = "hung"
    with anyio.move_on_after(2.0):
        async with slots.async_slot():  # a lone request: the elastic grant is the whole budget
            try:
                outcome = await batcher(1)
            except RuntimeError as error:  # refusing with a clear error would do as well
                outcome = error
    assert outcome != "hung", "the batch never got a slot: its caller holds the whole budget"


def test_k_is_checked_against_the_pool_at_construction() -> None:
    with pytest.raises(ValueError, match="k"):
        MicroBatcher(lambda items: items, slots=CpuSlots(2), k=3)


# --------------------------------------------------------------------------------------------
# size_of
# --------------------------------------------------------------------------------------------


def test_size_of_counts_inputs_by_their_size(kit: Kit) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_batch_size=4, max_wait=0.05, size_of=len)
    callers = [Caller(batcher, "ab")]
    wait_until(lambda: snap(batcher).queued == 2, "two queued")
    callers.append(Caller(batcher, "cd"))  # 2 + 2 = 4: a full batch, no waiting
    wait_until(lambda: len(recorder.batches) == 1, "the first batch")
    callers.append(Caller(batcher, "efg"))  # alone, after max_wait
    callers.append(Caller(batcher, "hijklm"))  # larger than the batch: alone
    for caller in callers:
        recorder.check(caller.x, caller.outcome())
    assert recorder.batches == [["ab", "cd"], ["efg"], ["hijklm"]]
    s = snap(batcher)
    assert dict(s.batch_sizes) == {3: 1, 4: 1, 6: 1}
    assert s.items == 4  # items count inputs; batch_sizes count by size


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.0, None, "1"])
def test_size_of_must_return_a_whole_number(kit: Kit, bad: object) -> None:
    recorder = kit.recorder()
    batcher = kit.batcher(recorder, max_wait=0.0, size_of=lambda item: bad if item == "bad" else 1)
    with pytest.raises(ValueError, match=f"size_of returned {bad!r}"):
        batcher.call("bad", timeout=JOIN)
    assert snap(batcher).queued == 0
    recorder.check("good", batcher.call("good", timeout=JOIN))
    assert recorder.seen() == ["good"]


@pytest.mark.anyio
async def test_size_of_errors_reach_async_callers(kit: Kit) -> None:
    batcher = kit.batcher(lambda items: items, max_wait=0.0, size_of=lambda item: 0)
    with pytest.raises(ValueError, match="size_of returned 0"):
        await batcher("x")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size .* got 0"),
        ({"max_batch_size": True}, "max_batch_size .* got True"),
        ({"max_batch_size": 2.0}, "max_batch_size .* got 2.0"),
        ({"max_wait": -1}, "max_wait .* got -1"),
        ({"max_wait": True}, "max_wait .* got True"),
        ({"max_wait": "0.1"}, "max_wait .* got '0.1'"),
        ({"max_queue": 0}, "max_queue .* got 0"),
        ({"max_concurrent": 0}, "max_concurrent .* got 0"),
        ({"max_concurrent": -2}, "max_concurrent .* got -2"),
        ({"k": 3}, "k .*3"),
        ({"k": 0}, "k .*0"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MicroBatcher(lambda items: items, slots=CpuSlots(2), **kwargs)


def test_a_function_that_is_not_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="function must be callable, got 42"):
        MicroBatcher(42, slots=CpuSlots(2))  # type: ignore[arg-type]


def test_a_nan_max_wait_is_refused() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        MicroBatcher(lambda items: items, slots=CpuSlots(2), max_wait=math.nan)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_infinite_max_wait_is_refused_or_means_full_batches_only(kit: Kit) -> None:
    refusal = ""
    try:
        batcher = kit.batcher(lambda items: items, max_batch_size=2, max_wait=math.inf)
    except ValueError as error:
        refusal = str(error)
    if refusal:
        assert "max_wait" in refusal
        return
    with pytest.raises(TimeoutError):
        batcher.call("lone", timeout=0.2)  # waits for a batch-mate, as asked
    callers = [Caller(batcher, x, timeout=1.0) for x in ("a", "b")]
    assert sorted(caller.outcome() for caller in callers) == ["a", "b"]


# --------------------------------------------------------------------------------------------
# close()
# --------------------------------------------------------------------------------------------


def test_close_lets_queued_inputs_finish_and_refuses_new_ones(kit: Kit) -> None:
    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=2, max_wait=5.0)
    callers = [Caller(batcher, x) for x in range(2)]  # a full batch: runs at once
    wait_until(lambda: len(recorder.batches) == 1, "the first batch")
    callers.append(Caller(batcher, 2))  # queued behind it, max_wait far away
    wait_until(lambda: snap(batcher).queued == 1, "one queued")
    closer = threading.Thread(target=batcher.close, args=(JOIN,), daemon=True)
    closer.start()
    wait_until(lambda: batcher._closed, "close to start")
    with pytest.raises(RuntimeError, match="closed"):
        batcher.call(99, timeout=JOIN)
    started = time.perf_counter()
    recorder.gate.set()
    for caller in callers:
        recorder.check(caller.x, caller.outcome())
    # Closing flushes: the last input did not wait out its max_wait of 5 s.
    assert time.perf_counter() - started < 2.5
    closer.join(JOIN)
    assert not closer.is_alive()
    assert batcher._dispatcher is not None
    assert not batcher._dispatcher.is_alive()
    assert 99 not in recorder.seen()


@pytest.mark.anyio
async def test_async_calls_after_close_raise(kit: Kit) -> None:
    batcher = kit.batcher(lambda items: items, max_wait=0.0)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher(1)
    batcher.close()  # idempotent


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_snapshot_counts_what_happened(kit: Kit) -> None:
    recorder = kit.recorder(gated=True, poison="poison")
    batcher = kit.batcher(recorder, max_batch_size=3, max_queue=4, max_wait=0.001)
    empty = snap(batcher)
    assert (empty.batches, empty.items, empty.queued, empty.mean_batch_size) == (0, 0, 0, 0.0)
    assert sum(empty.queue_wait_counts) == sum(empty.service_counts) == 0
    assert empty.wait_bounds == WAIT_BUCKETS

    first = Caller(batcher, "first")  # batch of 1, held 0.1 s
    wait_until(lambda: len(recorder.batches) == 1, "batch 1")
    queued = queue_in_order(batcher, ["a", "b", "c"])
    cancelled = Caller(batcher, "gives up", timeout=0.01)
    with pytest.raises(TimeoutError):
        cancelled.outcome()
    queued += queue_in_order(batcher, ["d"])
    with pytest.raises(BatchQueueFull):
        batcher.call("rejected", timeout=JOIN)
    during = snap(batcher)
    assert (during.running_batches, during.queued, during.rejected, during.abandoned) == (
        1,
        4,
        1,
        1,
    )
    time.sleep(0.1)
    recorder.gate.set()
    recorder.check("first", first.outcome())
    for caller in queued:
        recorder.check(caller.x, caller.outcome())
    with pytest.raises(Poison):
        batcher.call("poison", timeout=JOIN)

    s = snap(batcher)
    assert recorder.batches == [["first"], ["a", "b", "c"], ["d"], ["poison"]]
    assert (s.batches, s.items, s.failed_batches, s.rejected, s.abandoned) == (4, 6, 1, 1, 1)
    assert dict(s.batch_sizes) == {1: 3, 3: 1}
    assert s.mean_batch_size == 6 / 4
    assert (s.queued, s.running_batches) == (0, 0)
    assert sum(s.queue_wait_counts) == s.items
    assert sum(s.service_counts) == s.batches
    assert len(s.queue_wait_counts) == len(s.service_counts) == len(WAIT_BUCKETS)
    # a, b, c (and d) waited behind the first batch, which was held >= 0.1 s.
    slow = WAIT_BUCKETS.index(0.1)
    assert sum(s.queue_wait_counts[slow:]) >= 4
    assert s.queue_wait_seconds_total >= 4 * 0.1
    assert sum(s.service_counts[slow:]) >= 1
    assert s.service_seconds_total >= 0.1


# --------------------------------------------------------------------------------------------
# The decorator and FastAPI
# --------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_batched_decorator(kit: Kit) -> None:
    calls: list[list[int]] = []

    @batched(slots=CpuSlots(2), max_batch_size=4, max_wait=0.001, k=1)
    def double(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [2 * x for x in items]

    kit.batchers.append(double)
    assert isinstance(double, MicroBatcher)
    assert (double.name, double.max_batch_size, double.max_wait, double.k) == (
        "double",
        4,
        0.001,
        1,
    )
    with anyio.fail_after(JOIN):
        assert await double(3) == 6
        assert await anyio.to_thread.run_sync(lambda: double.call(4, timeout=JOIN)) == 8
    assert calls == [[3], [4]]


@pytest.mark.anyio
@pytest.mark.parametrize("status_code", [503, 429])
async def test_fastapi_answers_overflow_with_retry_after(kit: Kit, status_code: int) -> None:
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from threadbudget.fastapi import add_batch_overflow_handler

    recorder = kit.recorder(gated=True)
    batcher = kit.batcher(recorder, max_batch_size=1, max_queue=1, max_wait=0.0)
    app = fastapi.FastAPI()
    add_batch_overflow_handler(app, status_code=status_code)

    @app.get("/double/{x}")
    async def double(x: int) -> dict[str, Any]:
        value, batch_id, _ = await batcher(x)
        return {"value": value * 2, "batch": batch_id}

    responses: dict[int, Any] = {}
    transport = httpx.ASGITransport(app=app)
    with anyio.fail_after(JOIN):
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
            anyio.create_task_group() as group,
        ):

            async def get(x: int) -> None:
                responses[x] = await client.get(f"/double/{x}")

            group.start_soon(get, 1)
            await async_wait_until(lambda: snap(batcher).running_batches == 1, "batch 1")
            group.start_soon(get, 2)
            await async_wait_until(lambda: snap(batcher).queued == 1, "one queued")
            overflow = await client.get("/double/3")
            assert overflow.status_code == status_code
            assert int(overflow.headers["retry-after"]) >= 1
            assert "batch queue full" in overflow.text
            recorder.gate.set()
    assert responses[1].status_code == responses[2].status_code == 200
    assert responses[1].json() == {"value": 2, "batch": 0}
    assert responses[2].json() == {"value": 4, "batch": 1}
    assert 3 not in recorder.seen()


def test_fastapi_handler_refuses_other_status_codes() -> None:
    fastapi = pytest.importorskip("fastapi")
    from threadbudget.fastapi import add_batch_overflow_handler

    with pytest.raises(ValueError, match="got 500"):
        add_batch_overflow_handler(fastapi.FastAPI(), status_code=500)


# --------------------------------------------------------------------------------------------
# Native threads of a real batch
# --------------------------------------------------------------------------------------------

TORCH_PROBE = r"""
import json, time
import torch
import threadbudget

x = torch.randn(1000, 1000)
op = lambda: [x @ x for _ in range(6)]
op()
slots = threadbudget.CpuSlots(2)

def busy(items):
    # Idle pool threads spin a while after their last job; let them sleep first.
    time.sleep(0.4)
    count = threadbudget.measure_busy_threads(op)[1].busy_count
    return [(count, int(slots.current_grant()))] * len(items)

one = threadbudget.MicroBatcher(busy, slots=slots, k=1, max_wait=0.0)
whole = threadbudget.MicroBatcher(busy, slots=slots, max_wait=0.0)
print(json.dumps({"k1": one.call(0, timeout=120), "whole": whole.call(0, timeout=120)}))
one.close(); whole.close()
"""


@pytest.mark.torch
def test_a_batch_runs_its_grant_of_native_threads() -> None:
    pytest.importorskip("torch")
    assert len(os.sched_getaffinity(0)) >= 2, "needs two CPUs to tell one thread from two"
    result = subprocess.run(
        [PYTHON, "-c", TORCH_PROBE],
        capture_output=True,
        text=True,
        timeout=240,
        env=python_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["k1"] == [1, 1]  # one busy native thread under a grant of one
    assert counts["whole"] == [2, 2]  # and two under the whole budget: the measure can tell
