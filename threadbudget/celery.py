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
from ._settings import ENV_WORKERS, parse_positive_int
from ._warnings import warn
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


_worker: Any = None


def _record_pool_size(sender: Any = None, **_: Any) -> None:
    # Kept for the children: with --concurrency auto the pool size is known only after this
    # signal, by the time the children fork.
    global _worker
    _worker = sender
    concurrency = getattr(sender, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0 and ENV_WORKERS not in os.environ:
        os.environ[ENV_WORKERS] = str(concurrency)
    install_fork_safety()


def _pool_size() -> int:
    """This worker's pool size: THREADBUDGET_WORKERS if valid, else what Celery resolved."""
    resolved = getattr(_worker, "concurrency", None)
    fallback = resolved if isinstance(resolved, int) and resolved > 0 else 1
    raw = os.environ.get(ENV_WORKERS)
    if raw is not None:
        try:
            return parse_positive_int(raw, ENV_WORKERS)
        except ValueError as error:
            warn(f"ignoring {ENV_WORKERS}={raw!r}: {error}; using the pool size {fallback}")
    return fallback


def _apply_child_share(**_: Any) -> None:
    global applied
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    workers = _pool_size()
    os.environ[ENV_WORKERS] = str(workers)
    applied = apply_worker_budget(index if isinstance(index, int) else None, workers)
