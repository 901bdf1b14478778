"""Give each worker process its share of the budget, in the hook that runs inside it."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from ._apply import AppliedBudget, apply_plan
from ._detect import detect_budget
from ._forksafety import install_fork_safety
from ._plan import make_plan
from ._settings import ENV_CONCURRENCY, ENV_WORKER_INDEX, ENV_WORKERS

__all__ = ["apply_worker_budget"]


def apply_worker_budget(
    index: int | None,
    workers: int,
    *,
    concurrency: int | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> AppliedBudget:
    """Apply this worker's share of the budget: call it first thing in the worker process.

    Worker *index* (0-based) of *workers* gets ``budget // workers``, plus one CPU for the
    first ``budget % workers``; without an index, ``budget // workers``. The worker count and
    index are exported as ``THREADBUDGET_WORKERS`` / ``THREADBUDGET_WORKER_INDEX`` so that a
    later plan in the same process (``CpuSlots()``, ``threadbudget.auto``) gets the same share.
    """
    env = os.environ if environ is None else environ
    install_fork_safety()
    plan = make_plan(
        detect_budget(environ=env),
        workers=workers,
        worker_index=index,
        concurrency=concurrency,
        environ=env,
    )
    env[ENV_WORKERS] = str(plan.workers)
    if index is not None:
        env[ENV_WORKER_INDEX] = str(index)
    if concurrency is not None:
        env[ENV_CONCURRENCY] = str(plan.concurrency)
    return apply_plan(plan, environ=env)
