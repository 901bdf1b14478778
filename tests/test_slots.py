"""Tests for the fair CPU token pool (threadbudget._slots).

Every blocking call here carries a timeout (``JOIN``) so that a bug fails the test instead of
hanging the run.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gc
import math
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadbudget import ThreadBudgetWarning, _slots
from threadbudget._slots import WAIT_BUCKETS, ElasticRule, Grant, PoolSnapshot, TokenPool

JOIN = 10.0  # seconds; the longest any test waits for something that should happen at once


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = JOIN) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


async def async_wait_until(predicate: Callable[[], bool], what: str) -> None:
    with anyio.fail_after(JOIN):
        while not predicate():
            await anyio.sleep(0.001)


def waiting(pool: TokenPool) -> int:
    return pool.snapshot().waiting


def has_waiting(pool: TokenPool, n: int) -> Callable[[], bool]:
    return lambda: waiting(pool) == n


class Holder:
    """A thread that holds a slot until told to let go; reports what it was granted."""

    def __init__(self, pool: TokenPool, k: int | None = None, **kwargs: Any) -> None:
        self.grant: int | None = None
        self.error: BaseException | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self._pool = pool
        self._k = k
        self._kwargs = kwargs
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self._pool.slot(self._k, **self._kwargs) as grant:
                self.grant = int(grant)
                self.entered.set()
                if not self.release.wait(JOIN):
                    raise AssertionError("holder was never released")
        except BaseException as exc:
            self.error = exc

    def wait_entered(self) -> int:
        assert self.entered.wait(JOIN), "holder never got its slot"
        assert self.grant is not None
        return self.grant

    def finish(self) -> None:
        self.release.set()
        self.thread.join(JOIN)
        assert not self.thread.is_alive(), "holder thread did not finish"
        if self.error is not None:
            raise self.error


def hold(pool: TokenPool, k: int | None = None) -> Holder:
    holder = Holder(pool, k)
    holder.wait_entered()
    return holder


def queue_holder(pool: TokenPool, k: int | None = None, **kwargs: Any) -> Holder:
    """Start a holder that must queue, and return once the pool shows it waiting."""
    before = waiting(pool)
    holder = Holder(pool, k, **kwargs)
    wait_until(lambda: waiting(pool) == before + 1, "the holder to queue")
    return holder


def assert_quiet(pool: TokenPool) -> PoolSnapshot:
    snap = pool.snapshot()
    assert (snap.in_use, snap.holders, snap.waiting) == (0, 0, 0), snap
    return snap


# -- construction and validation -------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -3, 2.0, "4", None, True])
def test_invalid_budget_names_value(budget: Any) -> None:
    with pytest.raises(ValueError, match=r"budget .*got " + re.escape(repr(budget))):
        TokenPool(budget)


@pytest.mark.parametrize("k", [0, -1, 5, 1.5, "2", True])
def test_invalid_k_names_value(k: Any) -> None:
    pool = TokenPool(4)
    pattern = r"k must be an integer from 1 to the budget \(4\), got " + re.escape(repr(k))
    with pytest.raises(ValueError, match=pattern):
        pool.slot(k)
    with pytest.raises(ValueError, match=pattern):
        pool.async_slot(k)
    with pytest.raises(ValueError, match=pattern):
        pool.limit(k)
    assert_quiet(pool)


def test_k_accepts_index_types() -> None:
    pool = TokenPool(4)
    with pool.slot(Grant(3)) as grant:
        assert grant == 3
    np = pytest.importorskip("numpy")
    with pool.slot(np.int64(2)) as grant:
        assert grant == 2


@pytest.mark.parametrize("threads", [0, 5, 1.0])
def test_invalid_threads_names_value(threads: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(threads))):
        TokenPool(4, threads=threads)


def test_invalid_policy_names_value() -> None:
    with pytest.raises(ValueError, match="'greedy'"):
        TokenPool(4, policy="greedy")  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_invalid_timeout_names_value(timeout: Any) -> None:
    pool = TokenPool(2)
    with pytest.raises(ValueError, match="timeout"):
        pool.slot(timeout=timeout)


def test_infinite_timeout_means_wait() -> None:
    pool = TokenPool(1)
    with pool.slot(timeout=float("inf")) as grant:
        assert grant == 1


def test_limit_without_parentheses_is_refused() -> None:
    pool = TokenPool(2)

    def work() -> None:
        pass

    with pytest.raises(ValueError, match="parentheses"):
        pool.limit(work)  # type: ignore[arg-type]


# -- static and elastic grants ---------------------------------------------------------------


def test_static_default_is_one_thread() -> None:
    pool = TokenPool(4)
    with pool.slot() as grant:
        assert isinstance(grant, Grant)
        assert grant.threads == 1
        assert grant == 1
        assert repr(grant) == "Grant(threads=1)"
        assert pool.snapshot().in_use == 1
    assert_quiet(pool)


def test_static_uses_constructor_threads_and_explicit_k_wins() -> None:
    pool = TokenPool(8, threads=3)
    assert (pool.budget, pool.policy, pool.threads) == (8, "static", 3)
    with pool.slot() as grant:
        assert grant.threads == 3
    with pool.slot(5) as grant:
        assert grant.threads == 5
    assert dict(pool.snapshot().grants_by_size) == {3: 1, 5: 1}


def test_grant_is_immutable() -> None:
    grant = Grant(2)
    with pytest.raises(AttributeError):
        grant.threads = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        grant.other = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("free", "behind", "in_flight", "demand", "cap", "expected"),
    [
        (8, 0, 1, 1.0, 8, 8),  # lone request in a quiet pool: everything free
        (8, 0, 1, 1.0, 3, 3),  # ... up to the cap
        (8, 0, 1, 0.0, 8, 8),  # a pool that does not track demand
        (8, 1, 2, 2.0, 8, 4),
        (8, 2, 3, 3.0, 8, 2),
        (8, 7, 8, 8.0, 8, 1),
        (8, 20, 21, 21.0, 8, 1),  # long queue: one each
        (0, 0, 1, 1.0, 8, 1),  # nothing free: asks for 1, which is more than free, so it waits
        (1, 5, 6, 6.0, 8, 1),
        # Lately more in flight than now: the share of those not here is kept for them.
        (8, 0, 1, 2.0, 8, 4),  # one of two is between requests: half the budget
        (8, 0, 1, 4.0, 8, 2),
        (8, 2, 3, 4.0, 8, 2),  # three waiters after a release, the fourth due back: 6 over 3
        (8, 0, 2, 2.0, 8, 8),  # both in flight: nothing to keep, all that is free
        (6, 0, 2, 2.0, 8, 6),  # ... e.g. beside a holder of an explicit k=2
        (8, 0, 1, 1.5, 8, 5),  # a peak fading from 2 to 1: keeps round(0.5 x 8 / 1.5) = 3
        (2, 0, 1, 2.0, 2, 1),
        (2, 0, 1, 1.2, 2, 2),  # the reserve rounds to 0
        (2, 0, 1, 100.0, 2, 1),  # reserve above what is free: still at least one
    ],
)
def test_elastic_rule(
    *, free: int, behind: int, in_flight: int, demand: float, cap: int, expected: int
) -> None:
    budget = 2 if cap == 2 else 8
    assert ElasticRule(cap, budget)(free, behind, in_flight, demand) == expected


@settings(database=None)
@given(
    free=st.integers(1, 64),
    queued=st.integers(1, 80),
    holders=st.integers(0, 64),
    cap=st.integers(1, 64),
    awaited=st.floats(0, 100),
)
def test_elastic_rule_hands_out_every_free_token_beyond_the_reserve(
    free: int, queued: int, holders: int, cap: int, awaited: float
) -> None:
    """Replaying a release over a queue: grants fit, are >= 1, and leave idle only the reserve
    for the work that was in flight lately and is not now."""
    budget = max(free, cap)
    in_flight = holders + queued
    demand = in_flight + awaited
    rule = ElasticRule(cap, budget)
    left, grants = free, []
    for behind in range(queued - 1, -1, -1):
        need = rule(left, behind, in_flight, demand)
        if need > left:
            break
        grants.append(need)
        left -= need
    assert all(1 <= g <= cap for g in grants)
    assert sum(grants) <= free
    reserve = math.floor(awaited * budget / demand + 0.5)
    # Tokens stay idle only as the reserve, or when every waiter got the cap or a grant.
    assert left <= reserve or len(grants) == queued
    if queued >= free:
        assert grants == [1] * free


class FakeClock:
    """Stands in for the pool's ``perf_counter``, so how fast demand is forgotten is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_slots, "perf_counter", fake)
    return fake


def test_two_alternating_clients_run_side_by_side(clock: FakeClock) -> None:
    """The case the demand is for: two clients on two tokens get one each, not both in turn."""
    pool = TokenPool(2, policy="elastic")
    first = hold(pool)
    assert first.grant == 2  # alone: the whole budget
    second = queue_holder(pool)
    clock.now += 0.1
    first.finish()
    # The queue alone would give the head both tokens; two were in flight a moment ago.
    assert second.wait_entered() == 1
    clock.now += 0.001  # the first client comes back with its next request
    again = hold(pool)
    assert again.grant == 1
    assert pool.snapshot().recent_demand == 2.0
    second.finish()
    again.finish()
    assert_quiet(pool)


def test_demand_is_forgotten_with_a_half_life_of_slot_durations(clock: FakeClock) -> None:
    assert TokenPool(8, policy="elastic").demand_memory == 1.0
    pool = TokenPool(8, policy="elastic", demand_memory=2.0)
    assert pool.demand_memory == 2.0
    holders = [hold(pool, 2) for _ in range(4)]
    clock.now += 0.5  # every slot held 0.5 s
    for holder in holders:
        holder.finish()
    assert pool.snapshot().recent_demand == 4.0
    # Half-life: 2 x 0.5 s. After one, the demand is 2 and a lone request gets half the budget.
    clock.now += 1.0
    assert pool.snapshot().recent_demand == pytest.approx(2.0)
    with pool.slot() as grant:
        assert grant == 4
        clock.now += 0.5  # held as long as the others, so the half-life stays 1 s
    # Three half-lives after the 2: the burst is forgotten, below the one request in flight.
    clock.now += 2.5
    assert pool.snapshot().recent_demand == pytest.approx(2.0 / 8)
    with pool.slot() as grant:
        assert grant == 8
    assert pool.snapshot().recent_demand == 1.0


def test_a_client_left_alone_gets_the_whole_budget_on_its_second_request(
    clock: FakeClock,
) -> None:
    # Two clients established a demand of 2; then one stops. With the default memory (one slot
    # duration) the remaining client's first request still keeps a token for the other, its
    # second one no longer does.
    pool = TokenPool(2, policy="elastic")
    first, second = hold(pool, 1), hold(pool, 1)
    clock.now += 0.2
    first.finish()
    second.finish()
    with pool.slot() as grant:
        assert grant == 1  # a moment ago two were in flight
        clock.now += 0.2  # held as long as the others
    with pool.slot() as grant:
        assert grant == 2  # one half-life later the demand is 1: nothing to keep


def test_without_demand_memory_only_the_queue_counts(clock: FakeClock) -> None:
    pool = TokenPool(2, policy="elastic", demand_memory=0)
    first = hold(pool)
    second = queue_holder(pool)
    clock.now += 0.1
    first.finish()
    assert second.wait_entered() == 2
    second.finish()
    assert pool.snapshot().recent_demand == 0.0


def test_demand_before_any_slot_ended_is_kept(clock: FakeClock) -> None:
    # No slot duration yet to scale the memory by: the peak stays until a slot ends.
    pool = TokenPool(4, policy="elastic", demand_memory=2.0)
    first = hold(pool)
    with pytest.raises(TimeoutError):
        pool.slot(timeout=0.01).__enter__()  # a second unit came and went
    clock.now += 100.0
    assert pool.snapshot().recent_demand == 2.0
    first.finish()  # held 100 s: half-life 200 s, so 100 s after the peak it is 2 / sqrt(2)
    assert pool.snapshot().recent_demand == pytest.approx(2**0.5)


def test_static_pools_do_not_track_demand(clock: FakeClock) -> None:
    pool = TokenPool(4, policy="static")
    holders = [hold(pool) for _ in range(3)]
    assert pool.snapshot().recent_demand == 0.0
    for holder in holders:
        holder.finish()


@pytest.mark.parametrize("memory", [-1, float("nan"), float("inf"), "2", True, None])
def test_invalid_demand_memory_names_value(memory: Any) -> None:
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"demand_memory must be a finite number of slot durations >= 0, got {memory!r}"
        ),
    ):
        TokenPool(2, policy="elastic", demand_memory=memory)


def test_elastic_lone_request_gets_the_budget() -> None:
    pool = TokenPool(8, policy="elastic")
    assert pool.threads == 8
    with pool.slot() as grant:
        assert grant.threads == 8
    capped = TokenPool(8, policy="elastic", threads=3)
    with capped.slot() as grant:
        assert grant.threads == 3


def test_elastic_explicit_k_wins() -> None:
    pool = TokenPool(8, policy="elastic")
    with pool.slot(2) as grant:
        assert grant.threads == 2
        # The next lone arrival gets what is free, not the whole budget.
        holder = hold(pool)
        assert holder.grant == 6
        holder.finish()
    assert_quiet(pool)


def test_elastic_grants_shrink_to_one_under_contention() -> None:
    pool = TokenPool(4, policy="elastic")
    first = hold(pool)
    assert first.grant == 4
    queued = [queue_holder(pool) for _ in range(6)]
    first.finish()
    # 4 tokens over 6 waiters: the first four get one each, the last two still wait.
    for holder in queued[:4]:
        assert holder.wait_entered() == 1
    assert pool.snapshot().waiting == 2
    # Tokens come back one at a time, and each goes to the head at once (work-conserving).
    for holder in queued[:4]:
        holder.finish()
    assert [h.wait_entered() for h in queued[4:]] == [1, 1]
    for holder in queued[4:]:
        holder.finish()
    snap = assert_quiet(pool)
    assert dict(snap.grants_by_size) == {4: 1, 1: 6}


def test_elastic_release_splits_free_tokens_over_the_queue() -> None:
    pool = TokenPool(8, policy="elastic", demand_memory=0)
    first = hold(pool)
    queued = [queue_holder(pool) for _ in range(3)]
    first.finish()
    assert [h.wait_entered() for h in queued] == [2, 3, 3]
    for holder in queued:
        holder.finish()
    assert_quiet(pool)


def test_elastic_release_keeps_the_share_of_a_client_that_just_left(clock: FakeClock) -> None:
    # Four in flight a moment ago: each waiter gets 8 // 4, and the leaver's share stays free
    # for its next request instead of making it wait behind bigger grants.
    pool = TokenPool(8, policy="elastic")
    first = hold(pool)
    queued = [queue_holder(pool) for _ in range(3)]
    clock.now += 0.2
    first.finish()
    assert [h.wait_entered() for h in queued] == [2, 2, 2]
    assert hold(pool).grant == 2
    for holder in queued:
        holder.finish()


# -- FIFO, no barging ------------------------------------------------------------------------


def test_small_request_does_not_barge_past_a_waiting_large_one() -> None:
    pool = TokenPool(4)
    big_holder = hold(pool, 3)
    large = queue_holder(pool, 2)  # needs 2, only 1 free
    small = queue_holder(pool, 1)  # 1 is free, but it arrived later
    time.sleep(0.05)
    assert small.grant is None
    assert large.grant is None
    assert pool.snapshot().in_use == 3
    big_holder.finish()
    assert large.wait_entered() == 2
    assert small.wait_entered() == 1
    large.finish()
    small.finish()
    assert_quiet(pool)


def test_release_does_not_let_a_small_waiter_overtake_the_head() -> None:
    pool = TokenPool(4)
    first, second = hold(pool, 2), hold(pool, 2)
    large = queue_holder(pool, 3)
    small = queue_holder(pool, 1)
    first.finish()  # 2 free: the small one would fit, but the large one is first in line
    time.sleep(0.05)
    snap = pool.snapshot()
    assert (snap.in_use, snap.waiting) == (2, 2)
    assert small.grant is None
    second.finish()
    assert large.wait_entered() == 3
    assert small.wait_entered() == 1
    large.finish()
    small.finish()
    assert_quiet(pool)


def test_fifo_order_with_mixed_sizes() -> None:
    # Sizes 2 and 3 in a budget of 3 never fit together, so grants happen one at a time and
    # the order they are recorded in is the order the pool granted them.
    pool = TokenPool(3)
    order: list[int] = []
    order_lock = threading.Lock()
    blocker = hold(pool, 3)
    sizes = [2, 3, 2, 2, 3, 3, 2, 3]
    threads = []

    def worker(index: int, k: int) -> None:
        with pool.slot(k, timeout=JOIN):
            with order_lock:
                order.append(index)
            time.sleep(0.001)

    for index, k in enumerate(sizes):
        thread = threading.Thread(target=worker, args=(index, k), daemon=True)
        thread.start()
        threads.append(thread)
        wait_until(has_waiting(pool, index + 1), "worker to queue")
    blocker.finish()
    for thread in threads:
        thread.join(JOIN)
        assert not thread.is_alive()
    assert order == list(range(len(sizes)))
    assert_quiet(pool)


def test_head_leaving_unblocks_the_queue_behind_it() -> None:
    pool = TokenPool(2)
    holder = hold(pool, 1)
    # The head wants 2 while 1 is free; the small request behind it must wait (no barging),
    # and must get its token as soon as the head gives up, not when the holder releases.
    head = queue_holder(pool, 2, timeout=0.2)
    small = queue_holder(pool, 1)
    assert small.grant is None
    head.thread.join(JOIN)
    assert isinstance(head.error, TimeoutError)
    assert small.wait_entered() == 1
    assert pool.snapshot().in_use == 2
    small.finish()
    holder.finish()
    snap = assert_quiet(pool)
    assert snap.timeouts == 1


# -- budget under real threads ---------------------------------------------------------------


@pytest.mark.parametrize("policy", ["static", "elastic"])
def test_budget_never_exceeded_by_many_threads(policy: Any) -> None:
    budget = 4
    pool = TokenPool(budget, policy=policy)
    in_use = 0
    peak = 0
    over: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        nonlocal in_use, peak
        try:
            for i in range(40):
                k = None if (seed + i) % 3 == 0 else 1 + (seed * 7 + i) % budget
                with pool.slot(k, timeout=JOIN) as grant:
                    with lock:
                        in_use += grant
                        peak = max(peak, in_use)
                        if in_use > budget:
                            over.append(in_use)
                    time.sleep(0.0002)
                    with lock:
                        in_use -= grant
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN * 2)
        assert not thread.is_alive()
    assert errors == []
    assert over == []
    assert peak >= 2  # the pool was actually shared, or this test proves nothing
    snap = assert_quiet(pool)
    assert snap.grants_total == 12 * 40
    assert sum(snap.wait_counts) == snap.grants_total


# -- timeouts and interrupts -----------------------------------------------------------------


def test_timeout_raises_and_leaks_nothing() -> None:
    pool = TokenPool(1)
    holder = hold(pool)
    start = time.monotonic()
    with pytest.raises(TimeoutError), pool.slot(timeout=0.05):
        pytest.fail("must not enter")
    assert time.monotonic() - start >= 0.05
    snap = pool.snapshot()
    assert (snap.in_use, snap.waiting, snap.timeouts) == (1, 0, 1)
    with pytest.raises(TimeoutError, match="timeout=0"), pool.slot(timeout=0):
        pytest.fail("must not enter")
    holder.finish()
    snap = assert_quiet(pool)
    assert snap.timeouts == 2
    assert snap.grants_total == 1
    with pool.slot(timeout=0) as grant:
        assert grant == 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, RuntimeError])
def test_exception_while_waiting_leaks_nothing(
    monkeypatch: pytest.MonkeyPatch, exc_type: type[BaseException]
) -> None:
    pool = TokenPool(1)
    holder = hold(pool)

    def interrupted(lock: threading.Lock, timeout: float | None) -> bool:
        assert waiting(pool) == 1
        raise exc_type("interrupted while waiting")

    monkeypatch.setattr(_slots, "_park", interrupted)
    with pytest.raises(exc_type), pool.slot():
        pytest.fail("must not enter")
    monkeypatch.undo()
    snap = pool.snapshot()
    assert (snap.in_use, snap.waiting, snap.cancellations) == (1, 0, 1)
    holder.finish()
    assert_quiet(pool)


def test_interrupt_at_hand_over_gives_tokens_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The grant lands, then the interrupt: the tokens must go to the next waiter."""
    pool = TokenPool(1)
    holder = hold(pool)
    real_park = _slots._park

    def granted_then_interrupted(lock: threading.Lock, timeout: float | None) -> bool:
        assert real_park(lock, JOIN)
        raise KeyboardInterrupt

    monkeypatch.setattr(_slots, "_park", granted_then_interrupted)
    releaser = threading.Timer(0.05, holder.release.set)
    releaser.start()
    with pytest.raises(KeyboardInterrupt), pool.slot():
        pytest.fail("must not enter")
    monkeypatch.undo()
    releaser.join(JOIN)
    holder.finish()
    snap = assert_quiet(pool)
    assert (snap.grants_total, snap.cancellations) == (2, 1)


def test_real_sigint_while_waiting_leaks_nothing() -> None:
    assert threading.current_thread() is threading.main_thread()
    pool = TokenPool(1)
    holder = hold(pool)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt_when_queued() -> None:
        wait_until(lambda: waiting(pool) == 1, "the main thread to queue")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    sender = threading.Thread(target=interrupt_when_queued, daemon=True)
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt), pool.slot(timeout=JOIN):
            pytest.fail("must not enter")
    finally:
        signal.signal(signal.SIGINT, previous)
        sender.join(JOIN)
    snap = pool.snapshot()
    assert (snap.in_use, snap.waiting, snap.cancellations) == (1, 0, 1)
    holder.finish()
    assert_quiet(pool)


# -- re-entrancy -----------------------------------------------------------------------------


def test_nested_sync_slot_reuses_the_outer_grant() -> None:
    pool = TokenPool(2)
    # Taking more would deadlock (the budget is all ours); the timeout turns that into a
    # failure instead of a hang.
    with pool.slot(2) as outer, pool.slot(1, timeout=1) as inner:
        assert inner is outer
        with pool.slot(timeout=1) as innermost:
            assert innermost is outer
        snap = pool.snapshot()
        assert (snap.in_use, snap.holders, snap.grants_total) == (2, 1, 1)
    assert_quiet(pool)
    # The outer exit really released: the next slot is a fresh grant.
    with pool.slot(1) as fresh:
        assert fresh == 1


def test_other_thread_does_not_reuse_the_grant() -> None:
    pool = TokenPool(1)
    with pool.slot():
        other = queue_holder(pool, timeout=JOIN)
        assert other.grant is None
    assert other.wait_entered() == 1
    other.finish()
    assert_quiet(pool)


def test_context_copied_inside_a_slot_does_not_reuse_it_after_exit() -> None:
    pool = TokenPool(2)
    with pool.slot(1):
        copied = contextvars.copy_context()
        assert copied.run(lambda: pool.slot(1).__enter__()) == 1
        assert pool.snapshot().in_use == 1  # reused while the outer is live
    assert_quiet(pool)

    def enter_and_exit() -> int:
        with pool.slot(1):
            return pool.snapshot().in_use

    assert copied.run(enter_and_exit) == 1  # a real grant, not the dead outer one
    assert_quiet(pool)


def test_slot_context_manager_is_single_use() -> None:
    pool = TokenPool(2)
    slot = pool.slot()
    with slot:
        pass
    with pytest.raises(RuntimeError, match="single-use"), slot:
        pass
    assert_quiet(pool)


# -- hooks -----------------------------------------------------------------------------------


def test_hooks_run_in_entering_thread_with_k_and_restore() -> None:
    calls: list[tuple[str, int, object]] = []

    def on_enter(k: int) -> object:
        token = ("previous", threading.get_ident(), k)
        calls.append(("enter", threading.get_ident(), k))
        return token

    def on_exit(token: object) -> None:
        calls.append(("exit", threading.get_ident(), token))

    pool = TokenPool(4, threads=2, on_enter=on_enter, on_exit=on_exit)
    holder = hold(pool, 3)
    ident = holder.thread.ident
    assert calls == [("enter", ident, 3)]
    holder.finish()
    assert calls[1] == ("exit", ident, ("previous", ident, 3))
    calls.clear()
    with pool.slot() as grant:
        with pool.slot(1):
            pass  # nested: no hook calls
        assert grant == 2
    main = threading.get_ident()
    assert calls == [("enter", main, 2), ("exit", main, ("previous", main, 2))]
    assert_quiet(pool)


def test_failing_on_enter_releases_tokens() -> None:
    exits: list[object] = []

    def on_enter(k: int) -> object:
        raise OSError("cannot set threads")

    pool = TokenPool(2, on_enter=on_enter, on_exit=exits.append)
    with pytest.raises(OSError, match="cannot set"), pool.slot():
        pytest.fail("must not enter")
    assert exits == []  # nothing to restore: on_enter never returned
    assert_quiet(pool)
    with pytest.raises(OSError, match="cannot set"), pool.slot():
        pass  # the nesting marker was cleared too, or this would silently reuse


def test_failing_on_exit_still_releases_tokens() -> None:
    def on_exit(token: object) -> None:
        raise OSError("cannot restore")

    pool = TokenPool(2, on_enter=lambda k: k, on_exit=on_exit)
    with pytest.raises(OSError, match="cannot restore"), pool.slot():
        pass
    assert_quiet(pool)


# -- decorators ------------------------------------------------------------------------------


def test_limit_decorates_sync_functions() -> None:
    pool = TokenPool(4)

    @pool.limit(k=3)
    def work(x: int, *, y: int) -> tuple[int, int]:
        """Docstring survives."""
        return x + y, pool.snapshot().in_use

    assert work(1, y=2) == (3, 3)
    assert work.__name__ == "work"
    assert work.__doc__ == "Docstring survives."
    assert dict(pool.snapshot().grants_by_size) == {3: 1}
    assert_quiet(pool)


def test_limit_timeout_applies() -> None:
    pool = TokenPool(1)

    @pool.limit(timeout=0.01)
    def work() -> None:
        pytest.fail("must not run")

    holder = hold(pool)
    with pytest.raises(TimeoutError):
        work()
    holder.finish()
    assert_quiet(pool)


@pytest.mark.anyio
async def test_limit_decorates_async_functions() -> None:
    pool = TokenPool(4, threads=2)
    seen: list[int] = []

    @pool.limit()
    async def work(x: int) -> int:
        seen.append(pool.snapshot().in_use)
        await anyio.sleep(0)
        return x * 2

    assert await work(21) == 42
    assert seen == [2]
    assert work.__name__ == "work"
    assert_quiet(pool)


# -- snapshot --------------------------------------------------------------------------------


def test_snapshot_contents() -> None:
    pool = TokenPool(3, threads=1)
    snap = pool.snapshot()
    assert snap == PoolSnapshot(
        budget=3,
        policy="static",
        threads=1,
        in_use=0,
        holders=0,
        waiting=0,
        recent_demand=0.0,
        grants_total=0,
        grants_by_size=snap.grants_by_size,
        timeouts=0,
        cancellations=0,
        wait_bounds=WAIT_BUCKETS,
        wait_counts=(0,) * len(WAIT_BUCKETS),
        wait_seconds_total=0.0,
    )
    assert dict(snap.grants_by_size) == {}
    assert (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, float("inf")) == WAIT_BUCKETS

    with pool.slot(2), pool.slot(1, timeout=None):
        pass  # nested: one grant of 2
    with pool.slot(3):
        pass
    with pool.slot():
        holder = queue_holder(pool, 3)
        mid = pool.snapshot()
        assert (mid.in_use, mid.free, mid.holders, mid.waiting) == (1, 2, 1, 1)
        time.sleep(0.03)
    assert holder.wait_entered() == 3
    holder.finish()
    snap = pool.snapshot()
    assert dict(snap.grants_by_size) == {1: 1, 2: 1, 3: 2}
    assert snap.grants_total == 4
    assert sum(snap.wait_counts) == 4
    assert snap.wait_counts[0] == 3  # the uncontended ones
    assert snap.wait_seconds_total >= 0.03
    assert pool.snapshot() is not snap
    assert "in_use=0" in repr(pool)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.in_use = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.grants_by_size[1] = 7  # type: ignore[index]


# -- async -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_slot_grants_and_releases() -> None:
    pool = TokenPool(4, threads=2)
    async with pool.async_slot() as grant:
        assert grant.threads == 2
        async with pool.async_slot(3) as explicit:
            assert explicit is grant  # nested in the same task
        assert pool.snapshot().in_use == 2
    assert_quiet(pool)


@pytest.mark.anyio
async def test_async_budget_never_exceeded() -> None:
    budget = 3
    pool = TokenPool(budget, policy="elastic")
    in_use = 0
    peak = 0

    async def worker(seed: int) -> None:
        nonlocal in_use, peak
        for i in range(20):
            k = None if (seed + i) % 2 else 1 + (seed + i) % budget
            async with pool.async_slot(k) as grant:
                in_use += grant
                peak = max(peak, in_use)
                assert in_use <= budget
                await anyio.sleep(0)
                in_use -= grant

    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            for seed in range(10):
                tg.start_soon(worker, seed)
    assert peak >= 2
    snap = assert_quiet(pool)
    assert snap.grants_total == 200


async def _queue_task(
    tg: anyio.abc.TaskGroup,
    pool: TokenPool,
    k: int | None = None,
    *,
    timeout: float | None = None,
    log: list[str] | None = None,
    name: str = "",
) -> anyio.CancelScope:
    """Start a task that queues for a slot (and holds it until cancelled)."""
    before = waiting(pool)
    scope = anyio.CancelScope()

    async def run() -> None:
        with scope:
            async with pool.async_slot(k, timeout=timeout):
                if log is not None:
                    log.append(name)
                await anyio.sleep_forever()

    tg.start_soon(run)
    await async_wait_until(lambda: waiting(pool) == before + 1, "the task to queue")
    return scope


class AsyncHolder:
    """A sibling task holding a slot until ``release`` is set.

    A sibling, because a task spawned from inside a slot inherits its context and would reuse
    the grant instead of queueing. ``before_exit`` / ``after_exit`` run right around the
    release, with no checkpoint in between.
    """

    def __init__(self, pool: TokenPool, k: int | None = None) -> None:
        self.pool = pool
        self.k = k
        self.grant: int | None = None
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.before_exit: Callable[[], object] = lambda: None
        self.after_exit: Callable[[], object] = lambda: None

    async def run(self) -> None:
        slot = self.pool.async_slot(self.k)
        self.grant = int(await slot.__aenter__())
        self.entered.set()
        try:
            await self.release.wait()
        finally:
            self.before_exit()
            await slot.__aexit__(None, None, None)
            self.after_exit()


async def start_holder(
    tg: anyio.abc.TaskGroup, pool: TokenPool, k: int | None = None
) -> AsyncHolder:
    holder = AsyncHolder(pool, k)
    tg.start_soon(holder.run)
    with anyio.fail_after(JOIN):
        await holder.entered.wait()
    return holder


@pytest.mark.anyio
async def test_async_cancel_while_waiting_leaks_nothing() -> None:
    pool = TokenPool(1)
    log: list[str] = []
    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            holder = await start_holder(tg, pool)
            scope = await _queue_task(tg, pool, log=log, name="waiter")
            scope.cancel()
            await async_wait_until(lambda: waiting(pool) == 0, "the waiter to leave")
            assert pool.snapshot().in_use == 1
            holder.release.set()
    assert log == []
    snap = assert_quiet(pool)
    assert (snap.cancellations, snap.grants_total) == (1, 1)


@pytest.mark.anyio
async def test_async_cancel_at_hand_over_gives_tokens_back() -> None:
    pool = TokenPool(1)
    log: list[str] = []
    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            holder = await start_holder(tg, pool)
            scope = await _queue_task(tg, pool, log=log, name="waiter")
            # Cancel, then release in the same step: the release hands the token to a waiter
            # whose wait is already being cancelled, so the waiter must hand it back.
            holder.before_exit = scope.cancel
            holder.release.set()
    assert log == []
    snap = assert_quiet(pool)
    assert (snap.grants_total, snap.cancellations) == (2, 1)


@pytest.mark.anyio
async def test_async_release_then_cancel_leaks_nothing() -> None:
    pool = TokenPool(1)
    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            holder = await start_holder(tg, pool)
            scope = await _queue_task(tg, pool)
            holder.after_exit = scope.cancel
            holder.release.set()
    assert_quiet(pool)


@pytest.mark.anyio
async def test_async_timeout_leaks_nothing() -> None:
    pool = TokenPool(2)
    async with anyio.create_task_group() as tg:
        holder = await start_holder(tg, pool, 2)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with pool.async_slot(1, timeout=0.05):
                pytest.fail("must not enter")
        assert time.monotonic() - start >= 0.04
        with pytest.raises(TimeoutError, match="timeout=0"):
            async with pool.async_slot(timeout=0):
                pytest.fail("must not enter")
        snap = pool.snapshot()
        assert (snap.in_use, snap.waiting, snap.timeouts) == (2, 0, 2)
        holder.release.set()
    assert_quiet(pool)


@pytest.mark.anyio
async def test_async_cancelled_task_does_not_take_free_tokens() -> None:
    pool = TokenPool(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with pool.async_slot():
            pytest.fail("a cancelled task must not enter")
    assert scope.cancelled_caught
    assert pool.snapshot().grants_total == 0


@pytest.mark.anyio
async def test_async_waiter_woken_from_another_thread() -> None:
    pool = TokenPool(1)
    holder = await anyio.to_thread.run_sync(hold, pool)
    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            log: list[str] = []
            await _queue_task(tg, pool, log=log, name="async")
            # The release runs in the holder's thread, not the event loop's.
            await anyio.to_thread.run_sync(holder.finish)
            await async_wait_until(lambda: log == ["async"], "the async waiter to enter")
            tg.cancel_scope.cancel()
    assert_quiet(pool)


@pytest.mark.anyio
async def test_sync_and_async_waiters_share_one_fifo() -> None:
    pool = TokenPool(1)
    order: list[str] = []
    blocker = await anyio.to_thread.run_sync(hold, pool)

    def sync_worker(name: str) -> None:
        with pool.slot(timeout=JOIN):
            order.append(name)

    async def async_worker(name: str) -> None:
        async with pool.async_slot(timeout=JOIN):
            order.append(name)
            await anyio.sleep(0)

    names = ["a0", "s0", "a1", "s1", "s2", "a2"]
    with anyio.fail_after(JOIN):
        async with anyio.create_task_group() as tg:
            for index, name in enumerate(names):
                if name.startswith("s"):
                    tg.start_soon(anyio.to_thread.run_sync, sync_worker, name)
                else:
                    tg.start_soon(async_worker, name)
                await async_wait_until(has_waiting(pool, index + 1), f"{name} queued")
            await anyio.to_thread.run_sync(blocker.finish)
    assert order == names
    assert_quiet(pool)


@pytest.mark.anyio
async def test_async_reentrancy_and_child_tasks() -> None:
    pool = TokenPool(2)
    with anyio.fail_after(JOIN):
        async with pool.async_slot(2) as outer:
            # Same task: reuse, or this would deadlock on a full budget.
            async with pool.async_slot(1) as inner:
                assert inner is outer
            # Sync code on the loop thread inside the async slot: reuse, never block the loop.
            with pool.slot(1, timeout=1) as sync_inner:
                assert sync_inner is outer
            grants: list[int] = []

            async def child() -> None:
                async with pool.async_slot(1, timeout=1) as grant:
                    grants.append(int(grant))

            # Child tasks inherit the context: part of the same unit of work, so they reuse
            # (a parent holding tokens while its children wait for more can deadlock).
            async with anyio.create_task_group() as tg:
                tg.start_soon(child)
            # A worker thread running on our behalf inherits it as well.
            in_thread = await anyio.to_thread.run_sync(
                lambda: int(pool.slot(1, timeout=1).__enter__())
            )
            assert grants == [2]
            assert in_thread == 2
            assert pool.snapshot().grants_total == 1
    assert_quiet(pool)


@pytest.mark.anyio
async def test_async_hooks_called_in_task_with_k() -> None:
    calls: list[object] = []
    loop_thread = threading.get_ident()

    def on_enter(k: int) -> object:
        calls.append(("enter", k, threading.get_ident() == loop_thread))
        return ("token", k)

    def on_exit(token: object) -> None:
        calls.append(("exit", token))

    pool = TokenPool(4, policy="elastic", on_enter=on_enter, on_exit=on_exit)
    async with pool.async_slot() as grant, pool.async_slot():
        assert grant == 4
    assert calls == [("enter", 4, True), ("exit", ("token", 4))]
    assert_quiet(pool)


@pytest.mark.anyio
async def test_sync_wait_on_event_loop_thread_warns() -> None:
    pool = TokenPool(1)
    holder = await anyio.to_thread.run_sync(hold, pool)
    with warnings.catch_warnings():
        warnings.simplefilter("default", ThreadBudgetWarning)
        with (
            pytest.warns(ThreadBudgetWarning, match="event loop thread") as caught,
            pytest.raises(TimeoutError),
            pool.slot(timeout=0.02),
        ):
            pytest.fail("must not enter")
    assert caught[0].filename == __file__  # points at the caller, not at threadbudget
    # Made an error (as this project's test settings do), it must not leave a stale waiter.
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThreadBudgetWarning)
        with pytest.raises(ThreadBudgetWarning), pool.slot():
            pytest.fail("must not enter")
    snap = pool.snapshot()
    assert (snap.in_use, snap.waiting, snap.timeouts, snap.cancellations) == (1, 0, 1, 1)
    await anyio.to_thread.run_sync(holder.finish)
    assert_quiet(pool)


# -- a waiter whose event loop is gone --------------------------------------------------------


def test_grant_to_a_dead_event_loop_is_reclaimed() -> None:
    pool = TokenPool(1)
    holder = hold(pool)
    loop = asyncio.new_event_loop()

    async def waiter() -> None:
        async with pool.async_slot():
            pytest.fail("the loop is closed; this can never run")

    async def until_queued() -> None:
        while waiting(pool) == 0:
            await asyncio.sleep(0.001)

    task = loop.create_task(waiter())
    loop.run_until_complete(asyncio.wait_for(until_queued(), JOIN))
    loop.close()  # the waiting task is abandoned without being cancelled
    holder.finish()
    snap = assert_quiet(pool)
    assert (snap.grants_total, snap.cancellations) == (2, 1)
    # Closing the orphaned coroutine runs its cleanup, which must not give tokens back twice.
    task.get_coro().close()
    del task
    gc.collect()
    assert_quiet(pool)
