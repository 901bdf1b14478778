"""Tests for CPU slots: native thread limits, executors, anyio (threadbudget._coordinate).

Native limits are observed through fake controllers registered next to the real ones (torch's
and threadpoolctl's stay registered, so the assertions look only at the fakes' own records).
Every blocking call carries a timeout so that a bug fails a test instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import operator
import os
import re
import subprocess
import sys
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import pytest

import threadbudget
from threadbudget import (
    CpuExecutor,
    CpuSlots,
    RuntimeChange,
    RuntimeController,
    ThreadBudgetWarning,
    ThreadSetter,
    TokenPool,
    detect_budget,
    make_plan,
    register_controller,
    set_default_thread_limiter,
    unregister_controller,
)

from .conftest import PYTHON, python_env

JOIN = 10.0  # seconds; the longest any test waits for something that should happen at once
DEFAULT = -1  # what a fake per-thread pool reads in a thread no slot has set yet
RESTING = 8  # what a fake process-wide pool reads before any slot resolved it


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True, scope="module")
def _put_process_wide_pools_back() -> Iterator[None]:
    """Slots rest process-wide pools (OpenBLAS) at one thread and may leave a worker thread in
    threadpoolctl's control of OpenBLAS; put both back for the tests of other modules."""
    from threadpoolctl import threadpool_info

    before = {
        pool["filepath"]: pool["num_threads"]
        for pool in threadpool_info()
        if pool["user_api"] != "openmp"
    }
    yield
    from threadpoolctl import ThreadpoolController

    _clear_openblas_controlling_thread()
    for lib in ThreadpoolController().lib_controllers:
        if lib.filepath in before:
            lib.set_num_threads(before[lib.filepath])
    _clear_openblas_controlling_thread()


# -- fakes and helpers -------------------------------------------------------------------------


class FakeController(RuntimeController):
    """Records every per-thread and process-wide change the slots make, and who made it.

    ``thread_events`` holds ``(what, calling thread, value)`` for each set and undo;
    ``thread_values`` the limit each thread has now. The process-wide pool is one value.
    """

    def __init__(
        self,
        name: str,
        *,
        loaded: bool = True,
        per_thread: bool = True,
        process: bool = False,
        resolve_error: Exception | None = None,
        set_error: Exception | None = None,
    ) -> None:
        self.name = name
        self.loaded = loaded
        self.per_thread = per_thread
        self.process = process
        self.resolve_error = resolve_error
        self.set_error = set_error
        self._lock = threading.Lock()
        self.thread_events: list[tuple[str, int, int]] = []
        self.thread_values: dict[int, int] = {}
        self.process_value = RESTING
        self.process_sets: list[int] = []

    def is_loaded(self) -> bool:
        return self.loaded

    def pools(self) -> list[dict[str, Any]]:
        return [{"num_threads": self.process_value}]

    def limit(self, threads: int) -> list[RuntimeChange]:
        return []

    def thread_setter(self) -> ThreadSetter | None:
        if self.resolve_error is not None:
            raise self.resolve_error
        if not self.per_thread:
            return None
        if self.set_error is not None:
            error = self.set_error

            def failing(threads: int) -> Callable[[], None]:
                raise error

            return failing
        return self._set_thread

    def process_setter(self) -> ThreadSetter | None:
        return self._set_process if self.process else None

    def _set_thread(self, threads: int) -> Callable[[], None]:
        ident = threading.get_ident()
        with self._lock:
            previous = self.thread_values.get(ident, DEFAULT)
            self.thread_values[ident] = threads
            self.thread_events.append(("set", ident, threads))

        def undo() -> None:
            with self._lock:
                self.thread_values[ident] = previous
                self.thread_events.append(("undo", threading.get_ident(), previous))

        return undo

    def _set_process(self, threads: int) -> Callable[[], None]:
        with self._lock:
            previous = self.process_value
            self.process_value = threads
            self.process_sets.append(threads)

        def undo() -> None:
            with self._lock:
                self.process_value = previous

        return undo

    def value_in(self, ident: int) -> int:
        with self._lock:
            return self.thread_values.get(ident, DEFAULT)

    def events_in(self, ident: int) -> list[tuple[str, int, int]]:
        with self._lock:
            return [event for event in self.thread_events if event[1] == ident]


@pytest.fixture
def controllers() -> Iterator[Callable[..., FakeController]]:
    """Register fake controllers for one test; they are always unregistered afterwards."""
    names: list[str] = []

    def add(**kwargs: Any) -> FakeController:
        controller = FakeController(f"test-fake-{uuid.uuid4().hex[:10]}", **kwargs)
        register_controller(controller)
        names.append(controller.name)
        return controller

    try:
        yield add
    finally:
        for name in names:
            unregister_controller(name)


def run_in_thread(function: Callable[[], Any]) -> Any:
    """Run *function* in a new thread and return its result (or raise its exception)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(JOIN)
    assert not thread.is_alive(), "thread did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


async def async_wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Holder:
    """A thread that holds a sync slot until released."""

    def __init__(self, pool: TokenPool, k: int | None = None) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self._pool = pool
        self._k = k
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self._pool.slot(self._k, timeout=JOIN):
                self.entered.set()
                if not self.release.wait(JOIN):
                    raise AssertionError("holder was never released")
        except BaseException as error:
            self.error = error

    def finish(self) -> None:
        self.release.set()
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), "holder thread did not finish"
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def held(pool: TokenPool, k: int | None = None) -> Iterator[Holder]:
    """Hold *k* tokens from another thread for the body of the block."""
    holder = Holder(pool, k)
    try:
        assert holder.entered.wait(JOIN), "holder never got its slot"
        yield holder
    finally:
        holder.finish()


ENTRIES = ["thread", "executor", "run_sync-asyncio", "run_sync-trio"]


def call_in_slot(entry: str, slots: CpuSlots, k: int | None, function: Callable[[], Any]) -> Any:
    """Run *function* inside a slot of *k* tokens, entered the way *entry* names."""
    if entry == "thread":

        def in_slot() -> Any:
            with slots.slot(k, timeout=JOIN):
                return function()

        return run_in_thread(in_slot)
    if entry == "executor":
        with slots.executor(1, k=k, timeout=JOIN) as executor:
            return executor.submit(function).result(timeout=JOIN)
    backend = entry.removeprefix("run_sync-")

    async def main() -> Any:
        with anyio.fail_after(JOIN):
            return await slots.run_sync(function, k=k)

    return anyio.run(main, backend=backend)


def assert_quiet(pool: TokenPool) -> None:
    snap = pool.snapshot()
    assert (snap.in_use, snap.holders, snap.waiting) == (0, 0, 0), snap


# -- sizing ------------------------------------------------------------------------------------


def test_budget_from_int() -> None:
    slots = CpuSlots(3)
    assert slots.budget == 3
    assert slots.snapshot().budget == 3


def test_budget_from_cpu_budget() -> None:
    budget = detect_budget(cpus=5, environ={}, emit_warnings=False)
    assert CpuSlots(budget).budget == 5


@pytest.mark.parametrize(
    ("cpus", "workers", "expected"), [(4, 2, 2), (6, 4, 1), (3, 1, 3), (2, 5, 1)]
)
def test_budget_from_plan_is_the_process_share(cpus: int, workers: int, expected: int) -> None:
    plan = make_plan(cpus, workers=workers, environ={}, emit_warnings=False)
    assert plan.process_budget == expected
    assert CpuSlots(plan).budget == expected


@pytest.mark.parametrize(
    ("cpus", "workers", "expected"),
    [("1", None, 1), ("12", "4", 3), ("12", "5", 2), ("7", None, 7)],
)
def test_budget_none_plans_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, cpus: str, workers: str | None, expected: int
) -> None:
    for name in list(os.environ):
        if name.startswith("THREADBUDGET_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("PYTHON_CPU_COUNT", raising=False)
    monkeypatch.setenv("THREADBUDGET_CPUS", cpus)
    if workers is not None:
        monkeypatch.setenv("THREADBUDGET_WORKERS", workers)
    with warnings.catch_warnings():
        # More CPUs than this host has is honoured with a warning; the count is what matters.
        warnings.simplefilter("ignore", ThreadBudgetWarning)
        slots = CpuSlots()
        also = CpuSlots(None)
    assert slots.budget == expected
    assert also.budget == expected


def test_default_policy_is_elastic_with_the_whole_budget_as_cap() -> None:
    slots = CpuSlots(4)
    assert slots.policy == "elastic"
    assert slots.threads == 4
    with slots.slot() as grant:
        assert grant == 4  # a lone request gets everything
    static = CpuSlots(4, policy="static")
    with static.slot() as grant:
        assert grant == 1
    capped = CpuSlots(4, threads=2)
    with capped.slot() as grant:
        assert grant == 2
    assert slots.demand_memory == 1.0
    assert CpuSlots(4, demand_memory=0.5).demand_memory == 0.5
    with pytest.raises(ValueError, match="demand_memory must be a finite number"):
        CpuSlots(4, demand_memory=-1)


@pytest.mark.parametrize("budget", [0, -2, 1.5, True])
def test_invalid_budget_raises_value_error(budget: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(budget))):
        CpuSlots(budget)


def test_native_limits_false_is_a_plain_pool(controllers: Callable[..., FakeController]) -> None:
    fake = controllers(process=True)
    slots = CpuSlots(2, native_limits=False)
    assert slots.native_limits is None
    assert isinstance(CpuSlots(2).native_limits, threadbudget.NativeThreadLimits)
    for entry in ENTRIES:
        assert call_in_slot(entry, slots, 2, lambda: slots.snapshot().in_use) == 2
    with slots.slot(2):
        pass
    assert fake.thread_events == []
    assert fake.process_sets == []
    assert fake.process_value == RESTING
    assert_quiet(slots)


# -- native limits, per thread -----------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_per_thread_limit_is_set_in_the_thread_doing_the_work(
    controllers: Callable[..., FakeController], entry: str, k: int
) -> None:
    fake = controllers()
    slots = CpuSlots(3)
    main = threading.get_ident()

    def work() -> tuple[int, int, int]:
        ident = threading.get_ident()
        return ident, fake.value_in(ident), slots.snapshot().in_use

    ident, inside, in_use = call_in_slot(entry, slots, k, work)
    assert ident != main, "the work ran in the calling thread"
    assert inside == k
    assert in_use == k
    # Set on entry and undone on exit, both in the worker thread itself.
    assert fake.events_in(ident) == [("set", ident, k), ("undo", ident, DEFAULT)]
    assert fake.value_in(ident) == DEFAULT
    # Nothing is set in the calling thread (for run_sync: the event loop's thread).
    assert fake.events_in(main) == []
    assert_quiet(slots)


def test_sync_slot_sets_the_limit_of_the_thread_that_enters_it(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers()
    slots = CpuSlots(4)
    main = threading.get_ident()
    with slots.slot(3) as grant:
        assert grant == 3
        assert fake.value_in(main) == 3
        # A second thread entering with an elastic request gets the one free token.
        ident, inside = run_in_thread(
            lambda: _enter_and_read(slots, fake, None),
        )
        assert inside == 1
        assert fake.value_in(main) == 3
    assert fake.value_in(main) == DEFAULT
    assert fake.events_in(main) == [("set", main, 3), ("undo", main, DEFAULT)]
    assert fake.events_in(ident) == [("set", ident, 1), ("undo", ident, DEFAULT)]


def _enter_and_read(slots: CpuSlots, fake: FakeController, k: int | None) -> tuple[int, int]:
    ident = threading.get_ident()
    with slots.slot(k, timeout=JOIN):
        return ident, fake.value_in(ident)


def test_nested_slot_reuses_the_grant_without_setting_limits_again(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers()
    slots = CpuSlots(2)

    def work() -> tuple[int, int, int]:
        ident = threading.get_ident()
        with slots.slot(2, timeout=JOIN), slots.slot(1, timeout=JOIN) as inner:
            return ident, int(inner), fake.value_in(ident)

    ident, inner, inside = run_in_thread(work)
    assert (inner, inside) == (2, 2)
    assert fake.events_in(ident) == [("set", ident, 2), ("undo", ident, DEFAULT)]
    assert slots.snapshot().grants_total == 1


# -- native limits, process-wide ---------------------------------------------------------------


def test_process_pool_rests_at_one_once_resolved(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers(per_thread=False, process=True)
    slots = CpuSlots(2)
    native = slots.native_limits
    assert native is not None
    native.refresh()
    assert fake.process_value == 1
    assert fake.process_sets == [1]


@pytest.mark.parametrize("entry", ENTRIES)
def test_process_pool_rises_only_while_one_slot_holds_the_whole_budget(
    controllers: Callable[..., FakeController], entry: str
) -> None:
    fake = controllers(per_thread=False, process=True)
    slots = CpuSlots(3)

    def read() -> int:
        return fake.process_value

    # Smaller grants never touch the shared pool, which rests at one thread.
    assert call_in_slot(entry, slots, 1, read) == 1
    assert call_in_slot(entry, slots, 2, read) == 1
    assert set(fake.process_sets) == {1}
    # The whole budget: nobody else can be inside the shared pool, so it gets every token.
    assert call_in_slot(entry, slots, 3, read) == 3
    # It stays raised until a smaller grant starts (a pthreads OpenBLAS restarts its threads
    # on every change, so back-to-back whole-budget grants must not pay for two changes each).
    assert fake.process_value == 3
    sets_before = len(fake.process_sets)
    assert call_in_slot(entry, slots, None, read) == 3  # an elastic request alone: whole budget
    assert len(fake.process_sets) == sets_before  # no change between whole-budget grants
    # The next smaller grant lowers it before its work runs.
    assert call_in_slot(entry, slots, 1, read) == 1
    assert fake.process_value == 1
    assert set(fake.process_sets) == {1, 3}
    assert_quiet(slots)


def test_process_pool_stays_at_one_while_the_budget_is_shared(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers(per_thread=False, process=True)
    slots = CpuSlots(2)
    with slots.slot(1):
        assert fake.process_value == 1
        assert run_in_thread(lambda: _enter_and_read_process(slots, fake)) == 1
    assert fake.process_value == 1
    assert set(fake.process_sets) == {1}


def _enter_and_read_process(slots: CpuSlots, fake: FakeController) -> int:
    with slots.slot(timeout=JOIN) as grant:
        assert grant == 1
        return fake.process_value


def test_process_pool_is_not_raised_for_a_budget_of_one(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers(per_thread=False, process=True)
    slots = CpuSlots(1)
    with slots.slot(1):
        assert fake.process_value == 1
    assert fake.process_sets == [1]  # put at rest when resolved, never "raised" to 1


# -- controllers that arrive late or break ---------------------------------------------------


def test_controller_loaded_later_is_picked_up_after_an_import(
    controllers: Callable[..., FakeController],
) -> None:
    late = controllers(loaded=False, process=True)
    slots = CpuSlots(2)
    main = threading.get_ident()
    with slots.slot(1):
        pass
    assert late.thread_events == []
    assert late.process_sets == []
    late.loaded = True  # the library arrived, and with it a new module
    name = f"_tb_fake_mod_{uuid.uuid4().hex[:10]}"
    sys.modules[name] = types.ModuleType(name)
    try:
        with slots.slot(1):
            inside = late.value_in(main)
    finally:
        del sys.modules[name]
    assert inside == 1
    assert late.events_in(main) == [("set", main, 1), ("undo", main, DEFAULT)]
    assert late.process_value == 1


def test_controller_loaded_later_is_picked_up_by_refresh(
    controllers: Callable[..., FakeController],
) -> None:
    late = controllers(loaded=False, process=True)
    slots = CpuSlots(2)
    native = slots.native_limits
    assert native is not None
    main = threading.get_ident()
    with slots.slot(1):
        pass
    assert late.thread_events == []
    late.loaded = True
    native.refresh()
    assert late.process_value == 1  # resolving puts the shared pool at rest
    with slots.slot(2):
        assert late.value_in(main) == 2
        assert late.process_value == 2
    assert late.value_in(main) == DEFAULT
    assert late.process_value == 2  # shared pools go back to one when a smaller grant starts
    with slots.slot(1):
        assert late.process_value == 1


def test_controller_whose_thread_setter_raises_warns_and_others_still_run(
    controllers: Callable[..., FakeController],
) -> None:
    broken = controllers(resolve_error=RuntimeError("setter exploded"))
    healthy = controllers(process=True)
    slots = CpuSlots(2)
    main = threading.get_ident()

    def enter() -> tuple[int, int]:
        with slots.slot(2):
            return healthy.value_in(main), healthy.process_value

    with pytest.warns(ThreadBudgetWarning, match=re.escape(repr(broken.name))) as record:
        inside, shared = enter()
    assert any("setter exploded" in str(item.message) for item in record)
    assert (inside, shared) == (2, 2)
    assert healthy.value_in(main) == DEFAULT
    with slots.slot(1):
        assert healthy.process_value == 1
    assert broken.thread_events == []
    assert_quiet(slots)


def test_setter_failing_on_entry_undoes_the_setters_already_applied(
    controllers: Callable[..., FakeController],
) -> None:
    # A setter that fails after others ran must not leave their limits on this thread.
    good = controllers()
    controllers(set_error=RuntimeError("set failed"))
    slots = CpuSlots(2)
    main = threading.get_ident()
    with contextlib.suppress(RuntimeError), slots.slot(2):
        pass
    assert_quiet(slots)
    assert good.value_in(main) == DEFAULT


# -- run_sync ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_run_sync_returns_the_value_from_a_worker_thread() -> None:
    slots = CpuSlots(2)
    loop_thread = threading.get_ident()
    with anyio.fail_after(JOIN):
        assert await slots.run_sync(operator.add, 2, 3) == 5
        ident = await slots.run_sync(threading.get_ident)
    assert ident != loop_thread
    assert_quiet(slots)
    assert slots.snapshot().grants_total == 2


@pytest.mark.anyio
async def test_run_sync_propagates_exceptions_and_releases_tokens() -> None:
    slots = CpuSlots(2)

    def fail() -> None:
        raise LookupError("inside the worker")

    with anyio.fail_after(JOIN), pytest.raises(LookupError, match="inside the worker"):
        await slots.run_sync(fail, k=2)
    assert_quiet(slots)


@pytest.mark.anyio
@pytest.mark.parametrize("k", [None, 1, 2, 3])
async def test_run_sync_holds_k_tokens_while_the_function_runs(k: int | None) -> None:
    slots = CpuSlots(3)
    with anyio.fail_after(JOIN):
        snap = await slots.run_sync(slots.snapshot, k=k)
    assert snap.in_use == (3 if k is None else k)
    assert snap.holders == 1
    assert_quiet(slots)


@pytest.mark.anyio
async def test_run_sync_times_out_when_every_token_is_held() -> None:
    slots = CpuSlots(2)
    calls: list[int] = []
    with held(slots, 2):
        with anyio.fail_after(JOIN), pytest.raises(TimeoutError):
            await slots.run_sync(calls.append, 1, timeout=0.05)
        snap = slots.snapshot()
        assert (snap.in_use, snap.holders, snap.waiting, snap.timeouts) == (2, 1, 0, 1)
    assert calls == []
    assert_quiet(slots)


@pytest.mark.anyio
async def test_run_sync_cancelled_while_waiting_leaves_nothing_held() -> None:
    slots = CpuSlots(2)
    calls: list[int] = []
    scope = anyio.CancelScope()
    finished = anyio.Event()

    async def call() -> None:
        with scope:
            await slots.run_sync(calls.append, 1)
        finished.set()

    with held(slots, 2):
        with anyio.fail_after(JOIN):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await async_wait_until(lambda: slots.snapshot().waiting == 1, "run_sync to queue")
                scope.cancel()
                await finished.wait()
        assert scope.cancelled_caught
        snap = slots.snapshot()
        assert (snap.in_use, snap.holders, snap.waiting, snap.cancellations) == (2, 1, 0, 1)
    assert calls == []
    assert_quiet(slots)


@pytest.mark.anyio
async def test_run_sync_does_not_need_anyios_default_thread_limiter() -> None:
    # Seed 004: every token of anyio's default limiter is held by blocked sync work (sync
    # endpoints, file I/O); CPU work must still get a thread.
    slots = CpuSlots(2)
    default = anyio.to_thread.current_default_thread_limiter()
    previous = default.total_tokens
    default.total_tokens = 1
    blocker_release = threading.Event()
    job_release = threading.Event()
    results: list[str] = []

    def job() -> str:
        assert job_release.wait(JOIN), "job was never released"
        return "done"

    async def call() -> None:
        results.append(await slots.run_sync(job))

    try:
        with anyio.fail_after(JOIN):
            async with anyio.create_task_group() as tg:
                try:
                    tg.start_soon(anyio.to_thread.run_sync, blocker_release.wait, JOIN)
                    await async_wait_until(
                        lambda: default.borrowed_tokens == 1, "the blocker to take the token"
                    )
                    # The setup really starves anyio's default limiter:
                    with anyio.move_on_after(0.1) as starved:
                        await anyio.to_thread.run_sync(time.sleep, 0)
                    assert starved.cancelled_caught
                    tg.start_soon(call)
                    await async_wait_until(
                        lambda: slots.thread_limiter().borrowed_tokens == 1,
                        "run_sync to take a thread from the pool's own limiter",
                    )
                    assert default.borrowed_tokens == 1  # still only the blocker
                    job_release.set()
                    await async_wait_until(lambda: bool(results), "run_sync to finish")
                finally:
                    job_release.set()
                    blocker_release.set()
    finally:
        blocker_release.set()
        job_release.set()
        default.total_tokens = previous
    assert results == ["done"]
    assert_quiet(slots)


@pytest.mark.anyio
async def test_thread_limiter_is_one_per_loop_with_budget_tokens() -> None:
    slots = CpuSlots(3)
    limiter = slots.thread_limiter()
    assert slots.thread_limiter() is limiter
    assert limiter.total_tokens == 3
    assert limiter is not anyio.to_thread.current_default_thread_limiter()
    with anyio.fail_after(JOIN):
        await slots.run_sync(time.sleep, 0)
    assert slots.thread_limiter() is limiter
    assert limiter.borrowed_tokens == 0


@pytest.mark.parametrize(
    ("first", "second"),
    [("asyncio", "asyncio"), ("asyncio", "trio"), ("trio", "trio"), ("trio", "asyncio")],
)
def test_thread_limiter_is_fresh_in_another_event_loop(first: str, second: str) -> None:
    slots = CpuSlots(3)

    async def limiter_after_a_call() -> anyio.CapacityLimiter:
        limiter = slots.thread_limiter()
        with anyio.fail_after(JOIN):
            assert await slots.run_sync(operator.mul, 6, 7) == 42
        assert slots.thread_limiter() is limiter
        return limiter

    one = anyio.run(limiter_after_a_call, backend=first)
    two = anyio.run(limiter_after_a_call, backend=second)
    assert one is not two
    assert two.total_tokens == 3


def test_thread_limiter_stays_one_per_loop_with_two_loops_running() -> None:
    # Two event loops in two threads share one pool: each keeps its own limiter.
    slots = CpuSlots(2)
    a_asked = threading.Event()
    b_asked = threading.Event()
    seen: dict[str, Any] = {}

    async def loop_a() -> None:
        seen["a-first"] = slots.thread_limiter()
        a_asked.set()
        with anyio.fail_after(JOIN):
            while not b_asked.is_set():
                await anyio.sleep(0.001)
        seen["a-second"] = slots.thread_limiter()

    async def loop_b() -> None:
        seen["b"] = slots.thread_limiter()

    def run_b() -> None:
        assert a_asked.wait(JOIN)
        try:
            anyio.run(loop_b)
        finally:
            b_asked.set()

    thread = threading.Thread(target=run_b, daemon=True)
    thread.start()
    try:
        anyio.run(loop_a)
    finally:
        b_asked.set()
        thread.join(JOIN)
    assert seen["b"] is not seen["a-first"]
    assert seen["a-second"] is seen["a-first"]


@pytest.mark.anyio
async def test_overlapping_run_sync_calls_leave_the_loop_threads_limits_alone(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers()
    slots = CpuSlots(3)
    loop_thread = threading.get_ident()
    a_running = threading.Event()
    b_running = threading.Event()
    a_done = threading.Event()

    workers: dict[str, tuple[int, int]] = {}

    def first() -> None:
        ident = threading.get_ident()
        workers["first"] = (ident, fake.value_in(ident))
        a_running.set()
        assert b_running.wait(JOIN)

    def second() -> None:
        ident = threading.get_ident()
        workers["second"] = (ident, fake.value_in(ident))
        b_running.set()
        assert a_done.wait(JOIN)

    async def call_a() -> None:
        try:
            await slots.run_sync(first, k=1)
        finally:
            a_done.set()

    async def call_b() -> None:
        try:
            await async_wait_until(a_running.is_set, "the first call to start")
            await slots.run_sync(second, k=2)
        finally:
            b_running.set()

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call_a)
            tg.start_soon(call_b)
    assert_quiet(slots)
    # The calls finish in the order they started (not LIFO); a limit saved and restored on the
    # shared loop thread would be left at the first call's grant.
    assert fake.value_in(loop_thread) == DEFAULT
    assert fake.events_in(loop_thread) == []
    assert workers["first"][1] == 1
    assert workers["second"][1] == 2
    for ident, _ in workers.values():
        assert fake.value_in(ident) == DEFAULT


@pytest.mark.anyio
async def test_overlapping_async_slots_leave_the_loop_threads_limits_as_before(
    controllers: Callable[..., FakeController],
) -> None:
    fake = controllers()
    slots = CpuSlots(3)
    loop_thread = threading.get_ident()
    a_in = anyio.Event()
    b_in = anyio.Event()
    a_out = anyio.Event()

    async def task_a() -> None:
        async with slots.async_slot(1):
            a_in.set()
            await b_in.wait()
        a_out.set()

    async def task_b() -> None:
        await a_in.wait()
        async with slots.async_slot(2):
            b_in.set()
            await a_out.wait()

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            tg.start_soon(task_a)
            tg.start_soon(task_b)
    assert_quiet(slots)
    # An async slot only holds tokens: the loop thread is shared by every task.
    assert fake.value_in(loop_thread) == DEFAULT
    assert fake.events_in(loop_thread) == []


@pytest.mark.anyio
async def test_run_sync_nested_in_a_run_sync_worker_does_not_deadlock() -> None:
    # The nested call reuses the outer grant; it must not wait for the thread its caller holds.
    slots = CpuSlots(1, native_limits=False)

    def inner() -> str:
        return "inner"

    def outer() -> str:
        return anyio.from_thread.run(slots.run_sync, inner)

    with anyio.fail_after(JOIN):
        assert await slots.run_sync(outer) == "inner"


# -- CpuExecutor -------------------------------------------------------------------------------


def test_executor_map_and_submit_return_results_in_order() -> None:
    slots = CpuSlots(2)
    with slots.executor() as executor:
        assert isinstance(executor, CpuExecutor)
        assert list(executor.map(operator.neg, range(20), timeout=JOIN)) == [-n for n in range(20)]
        assert executor.submit(pow, 2, 10).result(timeout=JOIN) == 1024
        assert executor.submit(int, "ff", base=16).result(timeout=JOIN) == 255
    snap = slots.snapshot()
    assert snap.grants_total == 22
    assert_quiet(slots)


@pytest.mark.parametrize(("k", "expected"), [(None, 2), (1, 1), (2, 2)])
def test_executor_jobs_run_inside_slots(k: int | None, expected: int) -> None:
    slots = CpuSlots(2)

    def job() -> tuple[int, int, int]:
        snap = slots.snapshot()
        # A slot opened inside the job reuses the job's grant.
        with slots.slot(timeout=JOIN) as grant:
            return snap.holders, snap.in_use, int(grant)

    with slots.executor(1, k=k) as executor:
        assert executor.submit(job).result(timeout=JOIN) == (1, expected, expected)
    assert_quiet(slots)


@pytest.mark.parametrize("k", [None, 1])
def test_executor_never_uses_more_than_the_budget(k: int | None) -> None:
    slots = CpuSlots(2)
    lock = threading.Lock()
    running = 0
    peaks = {"tokens": 0, "in_use": 0, "holders": 0}

    def job(n: int) -> int:
        nonlocal running
        with slots.slot(timeout=JOIN) as grant:  # nested: this job's own grant
            with lock:
                running += grant
                snap = slots.snapshot()
                peaks["tokens"] = max(peaks["tokens"], running)
                peaks["in_use"] = max(peaks["in_use"], snap.in_use)
                peaks["holders"] = max(peaks["holders"], snap.holders)
            time.sleep(0.002)
            with lock:
                running -= grant
        return n

    with slots.executor(8, k=k) as executor:
        assert list(executor.map(job, range(60), timeout=JOIN)) == list(range(60))
    assert peaks["tokens"] == 2
    assert peaks["in_use"] == 2
    assert 1 <= peaks["holders"] <= 2
    assert slots.snapshot().grants_total == 60
    assert_quiet(slots)


def test_executor_workers_default_to_the_budget() -> None:
    slots = CpuSlots(3)
    with slots.executor() as executor:
        assert executor._max_workers == 3
    with CpuExecutor(slots) as executor:
        assert executor._max_workers == 3
    with CpuExecutor(TokenPool(5)) as executor:
        assert executor._max_workers == 5
    with slots.executor(7) as executor:
        assert executor._max_workers == 7


@pytest.mark.parametrize("k", [0, -1, 3, True, 1.5])
def test_executor_validates_k_at_construction(k: Any) -> None:
    slots = CpuSlots(2)
    pattern = r"k must be an integer from 1 to the budget \(2\), got " + re.escape(repr(k))
    with pytest.raises(ValueError, match=pattern):
        CpuExecutor(slots, k=k)
    with pytest.raises(ValueError, match=pattern):
        slots.executor(k=k)
    assert_quiet(slots)


def test_executor_validates_timeout_at_construction() -> None:
    with pytest.raises(ValueError, match="timeout"):
        CpuSlots(2).executor(timeout=-1)


def test_executor_exceptions_propagate_and_release_tokens() -> None:
    slots = CpuSlots(2)

    def fail(n: int) -> None:
        raise KeyError(f"job {n}")

    with slots.executor() as executor:
        futures = [executor.submit(fail, n) for n in range(5)]
        for n, future in enumerate(futures):
            with pytest.raises(KeyError, match=f"job {n}"):
                future.result(timeout=JOIN)
    assert_quiet(slots)
    assert slots.snapshot().grants_total == 5


def test_executor_job_times_out_waiting_for_its_slot() -> None:
    slots = CpuSlots(1)
    with held(slots, 1), slots.executor(timeout=0.05) as executor:
        future = executor.submit(time.sleep, 0)
        with pytest.raises(TimeoutError):
            future.result(timeout=JOIN)
    snap = slots.snapshot()
    assert snap.timeouts == 1
    assert_quiet(slots)


def test_nested_slot_in_a_job_reuses_the_grant_with_budget_one() -> None:
    slots = CpuSlots(1)

    def job() -> tuple[int, int]:
        with slots.slot(timeout=JOIN) as outer, slots.slot(1, timeout=JOIN) as inner:
            return int(outer), int(inner)

    with slots.executor() as executor:
        assert executor.submit(job).result(timeout=JOIN) == (1, 1)
    assert slots.snapshot().grants_total == 1
    assert_quiet(slots)


# -- set_default_thread_limiter ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_set_default_thread_limiter_resizes_anyios_default(backend: str) -> None:
    async def main() -> tuple[int, int, int, int]:
        limiter = anyio.to_thread.current_default_thread_limiter()
        original = limiter.total_tokens
        try:
            first = set_default_thread_limiter(3)
            now = anyio.to_thread.current_default_thread_limiter().total_tokens
            second = set_default_thread_limiter(5)
            return original, first, now, second
        finally:
            limiter.total_tokens = original

    original, first, now, second = anyio.run(main, backend=backend)
    assert original == 40
    assert first == 40
    assert now == 3
    assert second == 3


def test_set_default_thread_limiter_outside_a_loop_raises() -> None:
    with pytest.raises(RuntimeError, match="inside a running event loop"):
        set_default_thread_limiter(4)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "4", None])
def test_set_default_thread_limiter_rejects_bad_values(value: Any) -> None:
    async def main() -> float:
        with pytest.raises(ValueError, match=re.escape(repr(value))):
            set_default_thread_limiter(value)
        return anyio.to_thread.current_default_thread_limiter().total_tokens

    assert anyio.run(main) == 40
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        set_default_thread_limiter(value)  # checked before looking for a loop


# -- real native libraries ---------------------------------------------------------------------


def _openblas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["internal_api"] == "openblas"]


def _clear_openblas_controlling_thread() -> None:
    # threadpoolctl (3.8.0 here) lets only one live "controlling" thread resize a pthreads OpenBLAS
    # (others are silently ignored); start and end each test with nobody in control.
    from threadpoolctl import OpenBLASController

    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@pytest.fixture
def openblas() -> Iterator[int]:
    """A process-wide (pthreads) OpenBLAS, put back as it was afterwards; yields its pools."""
    pytest.importorskip("numpy")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs for OpenBLAS to run two threads")
    pools = [
        pool
        for pool in threadpoolctl.threadpool_info()
        if pool["internal_api"] == "openblas" and pool.get("threading_layer") != "openmp"
    ]
    if not pools:
        pytest.skip("numpy is not linked against a pthreads OpenBLAS here")
    original = pools[0]["num_threads"]
    _clear_openblas_controlling_thread()
    try:
        yield len(pools)
    finally:
        _clear_openblas_controlling_thread()
        threadpoolctl.ThreadpoolController().select(internal_api="openblas").limit(limits=original)
        _clear_openblas_controlling_thread()


@pytest.mark.parametrize("entry", ["thread", "executor"])
def test_openblas_follows_a_whole_budget_slot_in_a_worker_thread(openblas: int, entry: str) -> None:
    slots = CpuSlots(2)
    assert call_in_slot(entry, slots, 2, _openblas_threads) == [2] * openblas
    # Lowered by the next smaller grant, not at exit (OpenBLAS restarts threads on a change).
    assert _openblas_threads() == [2] * openblas
    assert call_in_slot(entry, slots, 1, _openblas_threads) == [1] * openblas
    assert _openblas_threads() == [1] * openblas


def test_openblas_rises_for_a_whole_budget_slot_after_another_live_thread_resolved(
    openblas: int,
) -> None:
    # threadpoolctl lets only one live thread resize a pthreads OpenBLAS; slots run in many.
    slots = CpuSlots(2)
    first_done = threading.Event()
    let_first_go = threading.Event()
    seen: dict[str, list[int]] = {}

    def first() -> None:  # a long-lived worker (an executor's, anyio's) that entered first
        with slots.slot(1, timeout=JOIN):
            seen["first"] = _openblas_threads()
        first_done.set()
        assert let_first_go.wait(JOIN)

    def second() -> list[int]:
        with slots.slot(2, timeout=JOIN):
            return _openblas_threads()

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    try:
        assert first_done.wait(JOIN)
        seen["second"] = run_in_thread(second)
    finally:
        let_first_go.set()
        thread.join(JOIN)
    assert seen["first"] == [1] * openblas
    assert seen["second"] == [2] * openblas


def test_openblas_rests_at_one_in_a_slot_after_the_main_thread_applied_a_limit(
    openblas: int,
) -> None:
    # What apply_plan does at start-up: threadbudget's own controller, in the main thread.
    changes = threadbudget.ThreadpoolctlController().limit(2)
    try:
        assert _openblas_threads() == [2] * openblas
        slots = CpuSlots(2)
        inside = call_in_slot("executor", slots, 1, _openblas_threads)
    finally:
        for change in changes:
            if change.undo is not None:
                change.undo()
    assert inside == [1] * openblas


TORCH_PROBE = r"""
import json, threading
import torch
import threadbudget

slots = threadbudget.CpuSlots(3)
out = {}

def work():
    out["before"] = torch.get_num_threads()
    with slots.slot(1):
        out["k=1"] = torch.get_num_threads()
    with slots.slot(3):
        out["k=3"] = torch.get_num_threads()
    out["after"] = torch.get_num_threads()

def fresh():
    out["fresh"] = torch.get_num_threads()

for target in (work, fresh):
    thread = threading.Thread(target=target)
    thread.start()
    thread.join(60)
with slots.executor(1, k=1) as executor:
    out["executor"] = executor.submit(torch.get_num_threads).result(timeout=60)
print(json.dumps(out))
"""


@pytest.mark.torch
def test_torch_threads_follow_the_slot_in_the_thread_that_holds_it() -> None:
    if importlib.util.find_spec("torch") is None:  # not imported here: it runs in a child
        pytest.skip("torch is not installed")
    result = subprocess.run(
        [PYTHON, "-c", TORCH_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=python_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # 3 is more than this host's default on small machines, so only the slot can produce it.
    assert out["k=1"] == 1
    assert out["k=3"] == 3
    assert out["executor"] == 1
    assert out["after"] == out["before"] == out["fresh"]
