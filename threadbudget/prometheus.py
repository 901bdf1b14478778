"""Prometheus exposition of token pool metrics (needs the ``prometheus`` extra).

``register_pool(pool)`` adds a collector to a registry; every scrape reads one
:meth:`TokenPool.snapshot`, so the numbers in one scrape are consistent with each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._slots import TokenPool
from ._watchdog import Watchdog

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["PoolCollector", "WatchdogCollector", "register_pool", "register_watchdog"]


def _prometheus() -> Any:
    try:
        import prometheus_client.core
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "threadbudget.prometheus needs prometheus-client: "
            "pip install 'threadbudget[prometheus]'",
            name=error.name,
        ) from error
    return prometheus_client.core


class PoolCollector:
    """A prometheus-client collector for one pool, labelled ``pool=<name>``."""

    def __init__(self, pool: TokenPool, *, name: str = "default", namespace: str = "threadbudget"):
        if not isinstance(pool, TokenPool):
            raise TypeError(f"expected a TokenPool, got {pool!r}")
        self._core = _prometheus()
        self.pool = pool
        self.name = name
        self.namespace = namespace

    def describe(self) -> list[Any]:
        # Returning the metrics without values lets the registry check names at register time.
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        core = self._core
        snapshot = self.pool.snapshot()
        prefix = self.namespace
        labels = ["pool"]
        values = [self.name]

        def gauge(name: str, documentation: str, value: float) -> Any:
            metric = core.GaugeMetricFamily(f"{prefix}_{name}", documentation, labels=labels)
            metric.add_metric(values, value)
            return metric

        def counter(name: str, documentation: str, value: float) -> Any:
            metric = core.CounterMetricFamily(f"{prefix}_{name}", documentation, labels=labels)
            metric.add_metric(values, value)
            return metric

        yield gauge("budget_tokens", "CPU tokens in the pool (its budget).", snapshot.budget)
        yield gauge("tokens_in_use", "CPU tokens granted now.", snapshot.in_use)
        yield gauge("slot_holders", "Units of work holding a slot now.", snapshot.holders)
        yield gauge("slot_waiters", "Units of work waiting for a slot now.", snapshot.waiting)
        yield counter("slot_timeouts", "Slot waits that timed out.", snapshot.timeouts)
        yield counter(
            "slot_cancellations", "Slot waits cancelled or interrupted.", snapshot.cancellations
        )
        grants = core.CounterMetricFamily(
            f"{prefix}_slot_grants", "Slots granted, by tokens granted.", labels=["pool", "size"]
        )
        for size, count in sorted(snapshot.grants_by_size.items()):
            grants.add_metric([self.name, str(size)], count)
        yield grants

        cumulative = 0
        buckets = []
        for bound, count in zip(snapshot.wait_bounds, snapshot.wait_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        wait = core.HistogramMetricFamily(
            f"{prefix}_slot_wait_seconds",
            "Time from asking for a slot to getting it.",
            labels=labels,
        )
        wait.add_metric(values, buckets, snapshot.wait_seconds_total)
        yield wait


def register_pool(
    pool: TokenPool,
    *,
    name: str = "default",
    registry: CollectorRegistry | None = None,
    namespace: str = "threadbudget",
) -> PoolCollector:
    """Expose *pool* on *registry* (prometheus-client's default registry if omitted)."""
    collector = PoolCollector(pool, name=name, namespace=namespace)
    if registry is None:
        registry = _prometheus().REGISTRY
    registry.register(collector)
    return collector


class WatchdogCollector:
    """A prometheus-client collector for a :class:`Watchdog`."""

    def __init__(self, watchdog: Watchdog, *, namespace: str = "threadbudget") -> None:
        if not isinstance(watchdog, Watchdog):
            raise TypeError(f"expected a Watchdog, got {watchdog!r}")
        self._core = _prometheus()
        self.watchdog = watchdog
        self.namespace = namespace

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        core = self._core
        snapshot = self.watchdog.snapshot()
        prefix = self.namespace
        for name, documentation, value in (
            ("runnable_threads", "Runnable OS threads at the last sample.", snapshot.last_runnable),
            ("runnable_threads_peak", "Most runnable OS threads seen.", snapshot.peak_runnable),
            ("os_threads_peak", "Most OS threads seen in the process.", snapshot.peak_threads),
        ):
            yield core.GaugeMetricFamily(f"{prefix}_{name}", documentation, value=value)
        yield core.CounterMetricFamily(
            f"{prefix}_oversubscribed_seconds",
            "Seconds sampled with more runnable threads than the budget.",
            value=snapshot.oversubscribed_seconds,
        )
        yield core.CounterMetricFamily(
            f"{prefix}_oversubscription_warnings",
            "Persistent oversubscription warnings logged.",
            value=snapshot.warnings,
        )


def register_watchdog(
    watchdog: Watchdog,
    *,
    registry: CollectorRegistry | None = None,
    namespace: str = "threadbudget",
) -> WatchdogCollector:
    """Expose *watchdog* on *registry* (prometheus-client's default registry if omitted)."""
    collector = WatchdogCollector(watchdog, namespace=namespace)
    if registry is None:
        registry = _prometheus().REGISTRY
    registry.register(collector)
    return collector
