"""Celery integration: each prefork child gets its share of the budget.

Call once where the Celery app is defined::

    from threadbudget.celery import setup_celery
    setup_celery()

The main worker process records its pool size (``--concurrency``) in ``THREADBUDGET_WORKERS``
before it forks; each child, in ``worker_process_init``, applies ``budget // concurrency``
(plus one CPU for the first ``budget % concurrency`` children) with one task at a time. Import
torch and numpy in tasks or in the child, not in the module the parent loads, or the variables
come too late and forking over a started OpenMP pool can hang the children.
"""

from __future__ import annotations

import os
from typing import Any

from ._apply import AppliedBudget
from ._forksafety import install_fork_safety
from ._settings import ENV_WORKERS
from ._workers import apply_worker_budget

try:
    from celery import signals
except ModuleNotFoundError as error:  # pragma: no cover - exercised with celery hidden
    raise ModuleNotFoundError(
        "threadbudget.celery needs Celery: pip install 'threadbudget[celery]'", name=error.name
    ) from error

__all__ = ["setup_celery"]

#: The budget applied in this child process.
applied: AppliedBudget | None = None


def setup_celery() -> None:
    """Connect the worker signals (safe to call more than once)."""
    signals.worker_init.connect(_record_pool_size, weak=False, dispatch_uid="threadbudget-init")
    signals.worker_process_init.connect(
        _apply_child_share, weak=False, dispatch_uid="threadbudget-child"
    )


def _record_pool_size(sender: Any = None, **_: Any) -> None:
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0 and ENV_WORKERS not in os.environ:
        os.environ[ENV_WORKERS] = str(concurrency)
    install_fork_safety()


def _apply_child_share(**_: Any) -> None:
    global applied
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    workers = int(os.environ.get(ENV_WORKERS, "1") or 1)
    applied = apply_worker_budget(index if isinstance(index, int) else None, workers)
