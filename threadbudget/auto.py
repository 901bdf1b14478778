"""``import threadbudget.auto`` applies a plan configured from ``THREADBUDGET_*`` variables.

Import it before numpy, torch or anything else with a native thread pool, so the pools read
the planned sizes when they load. A problem becomes a :class:`ThreadBudgetWarning`; the import
itself never fails. The handle is kept as :data:`applied` (``None`` if applying failed).

When several worker processes share the budget (``THREADBUDGET_WORKERS`` or ``WEB_CONCURRENCY``
above 1) and nothing gave this one an index (``THREADBUDGET_WORKER_INDEX``), as with
``uvicorn --workers``, it takes the lowest index no live sibling holds, so the workers' shares
add up to the whole budget.
"""

from __future__ import annotations

import os

from ._apply import AppliedBudget, apply_plan
from ._plan import planned_workers
from ._settings import ENV_WORKER_INDEX
from ._siblings import claim_sibling_index
from ._warnings import warn

__all__ = ["applied"]

applied: AppliedBudget | None = None
try:
    if ENV_WORKER_INDEX not in os.environ:
        # From the environment only: apply_plan() below detects the budget, once.
        workers = planned_workers()
        index = claim_sibling_index(workers) if workers > 1 else None
        if index is not None:
            os.environ[ENV_WORKER_INDEX] = str(index)
    applied = apply_plan()
except Exception as error:  # importing must never take the application down
    warn(f"threadbudget.auto could not apply the budget: {error!r}", stacklevel=2)
