"""Split a CPU budget between worker processes, in-flight requests and intra-op threads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ._detect import CpuBudget, detect_budget
from ._settings import (
    ENV_CONCURRENCY,
    ENV_THREADS,
    ENV_WAIT_POLICY,
    ENV_WORKER_INDEX,
    ENV_WORKERS,
    Setting,
    WaitPolicy,
    parse_index,
    parse_positive_int,
    parse_wait_policy,
    resolve,
)
from ._warnings import warn

__all__ = ["Plan", "make_plan", "planned_workers", "worker_share"]


@dataclass(frozen=True)
class Plan:
    """How many threads each unit of work may use.

    ``concurrency`` (C) is the in-flight work per process, ``workers`` (W) the processes
    sharing the budget, ``threads`` (T) the intra-op threads of each unit, chosen so that
    C x W x T <= budget whenever C x W <= budget. ``process_budget`` is this process's share.
    """

    budget: int
    concurrency: int
    workers: int
    threads: int
    process_budget: int
    wait_policy: WaitPolicy
    passive_wait: bool
    oversubscribed: bool
    sources: Mapping[str, str]
    notes: tuple[str, ...]
    cpu_budget: CpuBudget | None = None

    @property
    def total_threads(self) -> int:
        """Native threads the whole service may run at once under this plan."""
        return self.concurrency * self.workers * self.threads

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cpu_budget")
        data["sources"] = dict(self.sources)
        data["total_threads"] = self.total_threads
        return data

    def explain(self) -> str:
        lines = [
            f"Plan: {self.workers} worker process(es) x {self.concurrency} in-flight task(s) x "
            f"{self.threads} thread(s) = {self.total_threads} thread(s) for a budget of "
            f"{self.budget}.",
            f"Each process may use {self.process_budget} CPU(s); native pools wait "
            + ("passively (no long spins)." if self.passive_wait else "as their defaults say."),
        ]
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)


def worker_share(budget: int, workers: int, index: int | None = None) -> int:
    """CPUs for worker *index* of *workers* sharing *budget*: the remainder goes to the first.

    Without an index (the worker does not know its rank) every worker gets ``budget //
    workers``, which never oversubscribes. Never below 1.
    """
    if index is None:
        return max(1, budget // workers)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"worker_index must be a whole number >= 0, got {index!r}")
    return max(1, budget // workers + (1 if index % workers < budget % workers else 0))


def _workers_setting(workers: int | None, environ: Mapping[str, str] | None) -> Setting[int]:
    return resolve(
        workers,
        (ENV_WORKERS, "WEB_CONCURRENCY"),
        parse_positive_int,
        1,
        argument_name="workers",
        environ=environ,
    )


def planned_workers(environ: Mapping[str, str] | None = None) -> int:
    """The worker processes a plan from *environ* (default ``os.environ``) would assume, without
    detecting the budget; a bad value counts as the default, 1, as in :func:`make_plan`."""
    return _workers_setting(None, environ).value


def make_plan(
    budget: CpuBudget | int | None = None,
    *,
    concurrency: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    wait_policy: WaitPolicy | None = None,
    worker_index: int | None = None,
    environ: Mapping[str, str] | None = None,
    emit_warnings: bool = True,
) -> Plan:
    """Plan intra-op threads so that concurrency x workers x threads fits the budget.

    *budget* is a detected :class:`CpuBudget`, a plain count, or ``None`` to detect now. Each
    other argument falls back to its ``THREADBUDGET_*`` environment variable, then to 1
    (``threads``: derived; ``wait_policy``: ``auto``, passive when more than one task runs at
    once). An explicit *threads* wins even when it oversubscribes, and the plan says so.

    ``workers`` also falls back to ``WEB_CONCURRENCY`` (what gunicorn and uvicorn read for
    their worker count). With *worker_index* (0-based; ``THREADBUDGET_WORKER_INDEX``) this
    process gets its exact share: ``budget // workers``, plus one for the first
    ``budget % workers`` workers.
    """
    if budget is None:
        budget = detect_budget(environ=environ, emit_warnings=emit_warnings)
    cpu_budget = budget if isinstance(budget, CpuBudget) else None
    total = budget.budget if isinstance(budget, CpuBudget) else parse_positive_int(budget, "budget")

    concurrency_setting = resolve(
        concurrency,
        (ENV_CONCURRENCY,),
        parse_positive_int,
        1,
        argument_name="concurrency",
        environ=environ,
    )
    workers_setting = _workers_setting(workers, environ)
    threads_setting = resolve(
        threads, (ENV_THREADS,), parse_positive_int, 0, argument_name="threads", environ=environ
    )
    policy: Setting[WaitPolicy] = resolve(
        wait_policy,
        (ENV_WAIT_POLICY,),
        parse_wait_policy,
        "auto",
        argument_name="wait_policy",
        environ=environ,
    )
    sources = {
        "concurrency": concurrency_setting.source,
        "workers": workers_setting.source,
        "threads": threads_setting.source,
        "wait_policy": policy.source,
    }
    if emit_warnings:
        for setting in (concurrency_setting, workers_setting, threads_setting, policy):
            for problem in setting.problems:
                warn(problem)

    c = concurrency_setting.value
    w = workers_setting.value
    index_setting = resolve(
        worker_index,
        (ENV_WORKER_INDEX,),
        parse_index,
        None,
        argument_name="worker_index",
        environ=environ,
    )
    if emit_warnings:
        for problem in index_setting.problems:
            warn(problem)
    process_budget = worker_share(total, w, index_setting.value)
    notes: list[str] = []
    if w > total:
        notes.append(
            f"{w} worker processes exceed the budget of {total}: each still gets 1 CPU, so the "
            f"service runs {w} processes on {total} CPU(s)"
        )
    derived = max(1, process_budget // c)
    chosen = threads_setting.value or derived
    if threads_setting.value and chosen > derived:
        notes.append(
            f"threads={chosen} ({threads_setting.source}) is more than the {derived} that "
            f"fit {c} task(s) in {process_budget} CPU(s)"
        )
    oversubscribed = c * w * chosen > total
    if c * w > total:
        notes.append(
            f"{c} in-flight task(s) x {w} worker(s) = {c * w} exceeds the budget of {total}: "
            f"even at 1 thread each the CPUs are oversubscribed; admit at most "
            f"{max(1, total // w)} task(s) per process at a time (threadbudget's slots do this)"
        )
    passive = policy.value == "passive" or (policy.value == "auto" and c * w > 1)
    return Plan(
        budget=total,
        concurrency=c,
        workers=w,
        threads=chosen,
        process_budget=process_budget,
        wait_policy=policy.value,
        passive_wait=passive,
        oversubscribed=oversubscribed,
        sources=sources,
        notes=tuple(notes),
        cpu_budget=cpu_budget,
    )
