"""gunicorn integration: each worker gets its share of the budget after fork.

In ``gunicorn.conf.py``::

    from threadbudget.gunicorn import post_fork, pre_fork

Works with sync, gthread and uvicorn (``-k uvicorn.workers.UvicornWorker``) workers. Keep
``preload_app = False`` (the default): with the app preloaded, torch and numpy start their pools
in the master, the variables come too late for the workers, and forking over a started OpenMP
pool can hang them (threadbudget warns when that happens).
"""

from __future__ import annotations

from typing import Any

from ._apply import AppliedBudget
from ._forksafety import install_fork_safety
from ._workers import apply_worker_budget

__all__ = ["post_fork", "pre_fork"]

_INDEX = "threadbudget_index"

#: The budget applied in this worker process, once gunicorn forked it.
applied: AppliedBudget | None = None


def pre_fork(server: Any, worker: Any) -> None:
    """gunicorn's ``pre_fork`` hook (runs in the master): give the new worker a free index.

    A replacement worker (after a crash, ``max_requests`` or a reload) takes the lowest index
    no live worker holds, so the shares stay spread over the live workers. It also arms the
    fork-safety check in the master, so a master that started a native pool (``preload_app``
    with torch or numpy) is warned about before the fork, with the fix.
    """
    install_fork_safety()
    taken = {getattr(live, _INDEX, None) for live in getattr(server, "WORKERS", {}).values()}
    index = 0
    while index in taken:
        index += 1
    setattr(worker, _INDEX, index)


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn's ``post_fork`` hook: apply this worker's share of the budget.

    The index comes from :func:`pre_fork` when it is configured too; otherwise from the
    worker's age (gunicorn numbers workers from 1 as it spawns them) modulo the worker count,
    which a replacement worker can share with a live one. gthread workers plan for
    ``threads`` requests in flight each.
    """
    global applied
    workers = max(1, int(getattr(server, "num_workers", 0) or server.cfg.workers))
    threads = int(getattr(server.cfg, "threads", 1) or 1)
    index = getattr(worker, _INDEX, None)
    if not isinstance(index, int):
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
