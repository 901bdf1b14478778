"""``import threadbudget.auto`` applies a plan configured from ``THREADBUDGET_*`` variables.

Import it before numpy, torch or anything else with a native thread pool, so the pools read
the planned sizes when they load. A problem becomes a :class:`ThreadBudgetWarning`; the import
itself never fails. The handle is kept as :data:`applied` (``None`` if applying failed).
"""

from __future__ import annotations

from ._apply import AppliedBudget, apply_plan
from ._warnings import warn

__all__ = ["applied"]

applied: AppliedBudget | None = None
try:
    applied = apply_plan()
except Exception as error:  # importing must never take the application down
    warn(f"threadbudget.auto could not apply the budget: {error!r}", stacklevel=2)
