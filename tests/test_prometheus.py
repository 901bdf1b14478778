"""Tests for the Prometheus exposition of token pools (threadbudget.prometheus).

Every scrape goes through prometheus-client's own text format and parser, on a fresh
``CollectorRegistry`` per test; every blocking call carries a timeout.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from threadbudget import CpuSlots, PoolSnapshot, TokenPool, _slots
from threadbudget.prometheus import PoolCollector, register_pool

from .conftest import PYTHON, python_env

JOIN = 10.0  # seconds; the longest any test waits for something that should happen at once

POOL_METRICS = (
    "budget_tokens",
    "tokens_in_use",
    "slot_holders",
    "slot_waiters",
    "slot_recent_demand",
    "slot_timeouts_total",
    "slot_cancellations_total",
    "slot_grants_total",
    "slot_wait_seconds_bucket",
    "slot_wait_seconds_sum",
    "slot_wait_seconds_count",
)


# -- helpers -----------------------------------------------------------------------------------


def scrape(registry: CollectorRegistry) -> list[Sample]:
    """Every sample of one scrape, parsed back from the text exposition format."""
    text = generate_latest(registry).decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, f"expected one sample {name}{labels}, found {found}"
    return found[0]


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOIN
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Holder:
    """A thread that takes a sync slot (queueing if it must) and holds it until released."""

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
    holder = Holder(pool, k)
    try:
        assert holder.entered.wait(JOIN), "holder never got its slot"
        yield holder
    finally:
        holder.finish()


def cancel_one_async_wait(pool: TokenPool) -> None:
    """An async waiter that gives up (a cancellation, not a slot timeout) while the pool is full."""

    async def main() -> None:
        with anyio.fail_after(JOIN):
            with anyio.move_on_after(0.02) as scope:
                async with pool.async_slot(1):
                    raise AssertionError("the pool was supposed to be full")
            assert scope.cancelled_caught

    anyio.run(main)


def exercise(pool: TokenPool) -> None:
    """Uncontended grants of two sizes, one contended grant, one timeout, one cancellation."""
    for k in (1, 1, 2):
        with pool.slot(k):
            pass
    with held(pool, 2) as first:
        waiter = Holder(pool, 1)
        wait_until(lambda: pool.snapshot().waiting == 1, "the waiter to queue")
        with pytest.raises(TimeoutError):
            pool.slot(1, timeout=0.01).__enter__()
        cancel_one_async_wait(pool)
        time.sleep(0.02)  # the queued waiter's wait lands above the first bucket
        first.release.set()
        assert waiter.entered.wait(JOIN)
        waiter.finish()


def assert_matches_snapshot(samples: list[Sample], snap: PoolSnapshot, pool: str) -> None:
    ns = "threadbudget"
    assert value(samples, f"{ns}_budget_tokens", pool=pool) == snap.budget
    assert value(samples, f"{ns}_tokens_in_use", pool=pool) == snap.in_use
    assert value(samples, f"{ns}_slot_holders", pool=pool) == snap.holders
    assert value(samples, f"{ns}_slot_waiters", pool=pool) == snap.waiting
    # It fades between the scrape and the snapshot, but never below what is in flight.
    assert value(samples, f"{ns}_slot_recent_demand", pool=pool) >= snap.holders + snap.waiting
    assert value(samples, f"{ns}_slot_timeouts_total", pool=pool) == snap.timeouts
    assert value(samples, f"{ns}_slot_cancellations_total", pool=pool) == snap.cancellations
    grants = {
        int(s.labels["size"]): s.value
        for s in samples
        if s.name == f"{ns}_slot_grants_total" and s.labels.get("pool") == pool
    }
    assert grants == dict(snap.grants_by_size)
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in samples
        if s.name == f"{ns}_slot_wait_seconds_bucket" and s.labels.get("pool") == pool
    ]
    assert [bound for bound, _ in buckets] == list(snap.wait_bounds)
    cumulative = 0
    for (_, count), per_bucket in zip(buckets, snap.wait_counts, strict=True):
        cumulative += per_bucket
        assert count == cumulative
    assert buckets[-1] == (math.inf, snap.grants_total)
    assert value(samples, f"{ns}_slot_wait_seconds_count", pool=pool) == snap.grants_total
    assert value(samples, f"{ns}_slot_wait_seconds_sum", pool=pool) == pytest.approx(
        snap.wait_seconds_total, abs=1e-9
    )


# -- exposition --------------------------------------------------------------------------------


def test_fresh_pool_exposes_every_metric_at_zero() -> None:
    registry = CollectorRegistry()
    pool = TokenPool(3)
    collector = register_pool(pool, registry=registry)
    assert isinstance(collector, PoolCollector)
    text = generate_latest(registry).decode()
    for name in POOL_METRICS:
        assert f"threadbudget_{name}" in text, name
    assert "# TYPE threadbudget_slot_wait_seconds histogram" in text
    assert "# TYPE threadbudget_slot_timeouts_total counter" in text
    assert "# TYPE threadbudget_tokens_in_use gauge" in text
    samples = scrape(registry)
    assert value(samples, "threadbudget_budget_tokens", pool="default") == 3
    assert_matches_snapshot(samples, pool.snapshot(), "default")
    assert not [s for s in samples if s.name == "threadbudget_slot_grants_total"]


@pytest.mark.parametrize("make_pool", [TokenPool, lambda n: CpuSlots(n, native_limits=False)])
def test_scrape_matches_the_snapshot_after_real_activity(make_pool: Callable[[int], Any]) -> None:
    registry = CollectorRegistry()
    pool = make_pool(2)
    register_pool(pool, name="work", registry=registry)
    exercise(pool)
    snap = pool.snapshot()
    # What exercise() did, so the comparison below is not between two empty sets.
    assert snap.timeouts == 1
    assert snap.cancellations == 1
    assert dict(snap.grants_by_size) == {1: 3, 2: 2}
    assert snap.grants_total == 5
    assert snap.wait_counts[0] < snap.grants_total  # the queued waiter waited > 1 ms
    assert snap.wait_seconds_total >= 0.02
    samples = scrape(registry)
    assert_matches_snapshot(samples, snap, "work")
    assert value(samples, "threadbudget_slot_grants_total", pool="work", size="1") == 3
    assert value(samples, "threadbudget_slot_grants_total", pool="work", size="2") == 2
    assert value(samples, "threadbudget_slot_wait_seconds_bucket", pool="work", le="+Inf") == 5
    assert value(samples, "threadbudget_slot_wait_seconds_bucket", pool="work", le="0.001") < 5


def test_recent_demand_gauge(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stopped clock: slots last 0 s, so the pool never learns a duration and keeps its peak.
    monkeypatch.setattr(_slots, "perf_counter", lambda: 5.0)
    registry = CollectorRegistry()
    pool = TokenPool(4, policy="elastic")
    register_pool(pool, name="elastic", registry=registry)
    register_pool(TokenPool(4), name="static", registry=registry)
    holders = [Holder(pool, 1) for _ in range(3)]
    for holder in holders:
        assert holder.entered.wait(JOIN)
    for holder in holders:
        holder.finish()
    samples = scrape(registry)
    assert value(samples, "threadbudget_slot_recent_demand", pool="elastic") == 3
    assert value(samples, "threadbudget_slot_recent_demand", pool="static") == 0


def test_gauges_show_holders_and_waiters_during_a_scrape() -> None:
    registry = CollectorRegistry()
    pool = TokenPool(3)
    register_pool(pool, name="busy", registry=registry)
    holders = [Holder(pool, 2), Holder(pool, 1)]
    waiter: Holder | None = None
    try:
        for holder in holders:
            assert holder.entered.wait(JOIN)
        waiter = Holder(pool, 2)
        wait_until(lambda: pool.snapshot().waiting == 1, "the waiter to queue")
        samples = scrape(registry)
    finally:
        for holder in holders:
            holder.finish()
        if waiter is not None:
            waiter.finish()
    assert value(samples, "threadbudget_tokens_in_use", pool="busy") == 3
    assert value(samples, "threadbudget_slot_holders", pool="busy") == 2
    assert value(samples, "threadbudget_slot_waiters", pool="busy") == 1
    after = scrape(registry)
    assert value(after, "threadbudget_tokens_in_use", pool="busy") == 0
    assert value(after, "threadbudget_slot_holders", pool="busy") == 0
    assert value(after, "threadbudget_slot_waiters", pool="busy") == 0
    assert_matches_snapshot(after, pool.snapshot(), "busy")


def test_every_sample_carries_the_pool_label() -> None:
    registry = CollectorRegistry()
    pool = TokenPool(2)
    register_pool(pool, name="inference", registry=registry)
    with pool.slot(2):
        pass
    samples = scrape(registry)
    assert {s.name for s in samples} >= {f"threadbudget_{name}" for name in POOL_METRICS}
    assert all(s.labels.get("pool") == "inference" for s in samples)


def test_custom_namespace_prefixes_every_metric() -> None:
    registry = CollectorRegistry()
    pool = TokenPool(2)
    register_pool(pool, name="p", namespace="myservice", registry=registry)
    with pool.slot(1):
        pass
    text = generate_latest(registry).decode()
    assert "threadbudget_" not in text
    samples = scrape(registry)
    for name in POOL_METRICS:
        assert any(s.name == f"myservice_{name}" for s in samples), name
    assert value(samples, "myservice_slot_grants_total", pool="p", size="1") == 1


# -- registration ------------------------------------------------------------------------------


def test_pools_on_separate_registries_are_independent() -> None:
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first, second = TokenPool(2), TokenPool(4)
    register_pool(first, name="a", registry=first_registry)
    register_pool(second, name="b", registry=second_registry)
    with first.slot(2):
        pass
    a, b = scrape(first_registry), scrape(second_registry)
    assert value(a, "threadbudget_budget_tokens", pool="a") == 2
    assert value(b, "threadbudget_budget_tokens", pool="b") == 4
    assert value(a, "threadbudget_slot_wait_seconds_count", pool="a") == 1
    assert value(b, "threadbudget_slot_wait_seconds_count", pool="b") == 0


def test_two_pools_with_different_namespaces_share_a_registry() -> None:
    registry = CollectorRegistry()
    register_pool(TokenPool(2), name="a", namespace="first", registry=registry)
    register_pool(TokenPool(3), name="b", namespace="second", registry=registry)
    samples = scrape(registry)
    assert value(samples, "first_budget_tokens", pool="a") == 2
    assert value(samples, "second_budget_tokens", pool="b") == 3


def test_two_pools_with_different_names_share_a_registry() -> None:
    registry = CollectorRegistry()
    register_pool(TokenPool(2), name="cpu", registry=registry)
    register_pool(TokenPool(4), name="gpu-feed", registry=registry)
    samples = scrape(registry)
    assert value(samples, "threadbudget_budget_tokens", pool="cpu") == 2
    assert value(samples, "threadbudget_budget_tokens", pool="gpu-feed") == 4


def test_same_pool_name_twice_on_one_registry_raises() -> None:
    registry = CollectorRegistry()
    register_pool(TokenPool(2), name="same", registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_pool(TokenPool(2), name="same", registry=registry)
    # The first registration still works.
    assert value(scrape(registry), "threadbudget_budget_tokens", pool="same") == 2


def test_default_registry_is_used_when_none_is_given() -> None:
    from prometheus_client import REGISTRY

    pool = TokenPool(2)
    collector = register_pool(pool, name="default-registry-test", namespace="tbtestdefault")
    try:
        text = generate_latest(REGISTRY).decode()
        assert 'tbtestdefault_budget_tokens{pool="default-registry-test"} 2.0' in text
    finally:
        REGISTRY.unregister(collector)


@pytest.mark.parametrize("thing", [object(), None, 4, "pool", TokenPool])
def test_pool_collector_of_a_non_pool_raises_type_error(thing: Any) -> None:
    with pytest.raises(TypeError, match="TokenPool"):
        PoolCollector(thing)
    with pytest.raises(TypeError, match="TokenPool"):
        register_pool(thing, registry=CollectorRegistry())


def test_without_prometheus_client_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    with pytest.raises(ModuleNotFoundError, match=r"threadbudget\[prometheus\]") as info:
        PoolCollector(TokenPool(1))
    assert info.value.name is not None
    assert info.value.name.startswith("prometheus_client")
    with pytest.raises(ModuleNotFoundError, match=r"threadbudget\[prometheus\]"):
        register_pool(TokenPool(1))


def test_module_imports_without_prometheus_client() -> None:
    probe = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import threadbudget.prometheus as p\n"
        "try:\n"
        "    p.PoolCollector(__import__('threadbudget').TokenPool(1))\n"
        "except ModuleNotFoundError as error:\n"
        "    print('missing:', error)\n"
    )
    result = subprocess.run(
        [PYTHON, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "missing:" in result.stdout
    assert "threadbudget[prometheus]" in result.stdout


# -- the watchdog ------------------------------------------------------------------------------


def test_watchdog_scrape_matches_its_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import Counter

    from threadbudget import Watchdog, _watchdog
    from threadbudget.prometheus import WatchdogCollector, register_watchdog

    runnable = iter([5, 5, 5, 5, 1])

    def sample(exclude: int | None = None) -> tuple[int, int, Counter[str]]:
        count = next(runnable)
        return count, count + 3, Counter({"python": count})

    monkeypatch.setattr(_watchdog, "runnable_threads", sample)
    watchdog = Watchdog(2, interval=1.0, persist=2.0)
    registry = CollectorRegistry()
    collector = register_watchdog(watchdog, registry=registry)
    assert isinstance(collector, WatchdogCollector)
    for second in range(5):
        watchdog.sample(now=float(second))
    snap = watchdog.snapshot()
    assert snap.warnings == 1  # what the scrape must show, not only zeros
    samples = scrape(registry)
    assert value(samples, "threadbudget_runnable_threads") == snap.last_runnable == 1
    assert value(samples, "threadbudget_runnable_threads_peak") == snap.peak_runnable == 5
    assert value(samples, "threadbudget_os_threads_peak") == snap.peak_threads == 8
    assert value(samples, "threadbudget_oversubscribed_seconds_total") == pytest.approx(
        snap.oversubscribed_seconds
    )
    assert snap.oversubscribed_seconds > 0
    assert value(samples, "threadbudget_oversubscription_warnings_total") == 1
    with pytest.raises(TypeError, match="expected a Watchdog"):
        WatchdogCollector(object())  # type: ignore[arg-type]
