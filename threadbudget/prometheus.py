"""Prometheus exposition of pool and watchdog metrics (needs the ``prometheus`` extra).

``register_pool(pool)`` exposes a pool on a registry; every scrape reads one
:meth:`TokenPool.snapshot` per pool, so the numbers of one pool are consistent with each other.
"""

from __future__ import annotations

import threading
import weakref
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


_POOL_METRICS = (
    ("gauge", "budget_tokens", "CPU tokens in the pool (its budget).", "budget"),
    ("gauge", "tokens_in_use", "CPU tokens granted now.", "in_use"),
    ("gauge", "slot_holders", "Units of work holding a slot now.", "holders"),
    ("gauge", "slot_waiters", "Units of work waiting for a slot now.", "waiting"),
    (
        "gauge",
        "slot_recent_demand",
        "Most units of work in flight lately, as elastic grants see it (0 under static).",
        "recent_demand",
    ),
    ("counter", "slot_timeouts", "Slot waits that timed out.", "timeouts"),
    ("counter", "slot_cancellations", "Slot waits cancelled or interrupted.", "cancellations"),
)


class PoolCollector:
    """A prometheus-client collector for one or more pools, each labelled ``pool=<name>``.

    One collector serves every pool of a namespace on a registry (:func:`register_pool` adds
    to it), because a registry refuses two collectors that describe the same metric names.
    """

    def __init__(
        self, pool: TokenPool, *, name: str = "default", namespace: str = "threadbudget"
    ) -> None:
        self._core = _prometheus()
        self.namespace = namespace
        self._lock = threading.Lock()
        self._pools: dict[str, TokenPool] = {}
        self.add(pool, name=name)

    def add(self, pool: TokenPool, *, name: str) -> None:
        """Also expose *pool*, labelled *name*; names are unique per collector."""
        if not isinstance(pool, TokenPool):
            raise TypeError(f"expected a TokenPool, got {pool!r}")
        with self._lock:
            if name in self._pools:
                raise ValueError(
                    f"Duplicated timeseries: a pool named {name!r} is already exposed under "
                    f"the namespace {self.namespace!r}"
                )
            self._pools[name] = pool

    def describe(self) -> list[Any]:
        # Returning the metrics without values lets the registry check names at register time.
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        core = self._core
        prefix = self.namespace
        with self._lock:
            pools = sorted(self._pools.items())
        snapshots = [(name, pool.snapshot()) for name, pool in pools]

        for kind, name, documentation, attribute in _POOL_METRICS:
            maker = core.GaugeMetricFamily if kind == "gauge" else core.CounterMetricFamily
            metric = maker(f"{prefix}_{name}", documentation, labels=["pool"])
            for pool_name, snapshot in snapshots:
                metric.add_metric([pool_name], getattr(snapshot, attribute))
            yield metric

        grants = core.CounterMetricFamily(
            f"{prefix}_slot_grants", "Slots granted, by tokens granted.", labels=["pool", "size"]
        )
        for pool_name, snapshot in snapshots:
            for size, count in sorted(snapshot.grants_by_size.items()):
                grants.add_metric([pool_name, str(size)], count)
        yield grants

        wait = core.HistogramMetricFamily(
            f"{prefix}_slot_wait_seconds",
            "Time from asking for a slot to getting it.",
            labels=["pool"],
        )
        for pool_name, snapshot in snapshots:
            cumulative = 0
            buckets = []
            for bound, count in zip(snapshot.wait_bounds, snapshot.wait_counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            wait.add_metric([pool_name], buckets, snapshot.wait_seconds_total)
        yield wait


# One pool collector per (registry, namespace); weak, so a dropped registry is not kept alive.
_collectors: weakref.WeakKeyDictionary[Any, dict[str, PoolCollector]] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def register_pool(
    pool: TokenPool,
    *,
    name: str = "default",
    registry: CollectorRegistry | None = None,
    namespace: str = "threadbudget",
) -> PoolCollector:
    """Expose *pool* on *registry* (prometheus-client's default registry if omitted).

    Pools registered under one namespace on one registry share a collector and differ by their
    ``pool`` label; a name used twice raises ``ValueError``.
    """
    if registry is None:
        registry = _prometheus().REGISTRY
    with _collectors_lock:
        by_namespace = _collectors.setdefault(registry, {})
        collector = by_namespace.get(namespace)
        if collector is not None and collector in getattr(registry, "_collector_to_names", {}):
            collector.add(pool, name=name)
            return collector
        collector = PoolCollector(pool, name=name, namespace=namespace)
        registry.register(collector)
        by_namespace[namespace] = collector
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
