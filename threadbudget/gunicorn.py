"""gunicorn integration: each worker gets its share of the budget after fork.

In ``gunicorn.conf.py``::

    from threadbudget.gunicorn import post_fork

Works with sync, gthread and uvicorn (``-k uvicorn.workers.UvicornWorker``) workers. Keep
``preload_app = False`` (the default): with the app preloaded, torch and numpy start their pools
in the master, the variables come too late for the workers, and forking over a started OpenMP
pool can hang them (threadbudget warns when that happens).
"""

from __future__ import annotations

from typing import Any

from ._apply import AppliedBudget
from ._workers import apply_worker_budget

__all__ = ["post_fork"]

#: The budget applied in this worker process, once gunicorn forked it.
applied: AppliedBudget | None = None


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn's ``post_fork`` hook: apply this worker's share of the budget.

    The worker's index is its age (gunicorn numbers workers from 1 as it spawns them) modulo
    the worker count, so replacement workers take over the share of the one they replace on
    average. gthread workers plan for ``threads`` requests in flight each.
    """
    global applied
    workers = max(1, int(server.cfg.workers))
    threads = int(getattr(server.cfg, "threads", 1) or 1)
    index = (int(worker.age) - 1) % workers
    applied = apply_worker_budget(index, workers, concurrency=threads if threads > 1 else None)
    server.log.info(
        "threadbudget: worker %s (index %s of %s) gets %s CPU(s), %s thread(s) per task",
        worker.pid,
        index,
        workers,
        applied.plan.process_budget,
        applied.plan.threads,
    )
