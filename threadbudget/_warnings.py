"""The warning category threadbudget uses for every problem it recovers from."""

from __future__ import annotations

import warnings

__all__ = ["ThreadBudgetWarning", "warn"]


class ThreadBudgetWarning(UserWarning):
    """Bad input or a late setting that threadbudget worked around; the message names both."""


def warn(message: str, *, stacklevel: int = 3) -> None:
    warnings.warn(message, ThreadBudgetWarning, stacklevel=stacklevel)
