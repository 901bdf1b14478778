"""Validated settings from arguments and environment variables, each with its source.

Precedence is argument > environment > default. An invalid argument raises (the caller can fix
it); an invalid environment value is reported and ignored, because it must never take down the
process that merely imported us.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar, get_args

__all__ = [
    "APPLIED_MARKER",
    "ENV_CONCURRENCY",
    "ENV_CPUS",
    "ENV_RESERVE",
    "ENV_ROUNDING",
    "ENV_THREADS",
    "ENV_WAIT_POLICY",
    "ENV_WORKERS",
    "ENV_WORKER_INDEX",
    "Rounding",
    "Setting",
    "WaitPolicy",
    "parse_index",
    "parse_marker",
    "parse_positive_int",
    "parse_reserve",
    "parse_rounding",
    "parse_wait_policy",
    "resolve",
    "set_by_us",
]

Rounding = Literal["floor", "ceil", "nearest"]
WaitPolicy = Literal["auto", "passive", "active"]

ENV_CPUS = "THREADBUDGET_CPUS"
ENV_ROUNDING = "THREADBUDGET_ROUNDING"
ENV_RESERVE = "THREADBUDGET_RESERVE"
ENV_CONCURRENCY = "THREADBUDGET_CONCURRENCY"
ENV_WORKERS = "THREADBUDGET_WORKERS"
ENV_THREADS = "THREADBUDGET_THREADS"
ENV_WAIT_POLICY = "THREADBUDGET_WAIT_POLICY"
ENV_WORKER_INDEX = "THREADBUDGET_WORKER_INDEX"
# Lists NAME=VALUE pairs that threadbudget itself exported, so a child process (after
# ``threadbudget run`` or a fork) can tell our values from the user's and re-plan them.
APPLIED_MARKER = "THREADBUDGET_APPLIED"

# Far above any real machine; refusing larger values catches typos such as 40000000.
MAX_CPUS = 1 << 16

T = TypeVar("T")

# ASCII only: str.isdecimal() and float() also take Unicode digits and "1_0".
_WHOLE = re.compile(r"[0-9]{1,9}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]*)?|\.[0-9]+")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """A resolved value and where it came from (``argument``, ``env:NAME`` or ``default``)."""

    value: T
    source: str
    problems: tuple[str, ...] = ()

    @property
    def overridden(self) -> bool:
        return self.source != "default"


def parse_positive_int(raw: object, what: str) -> int:
    """An integer in 1..65536; accepts ``int`` or its decimal text."""
    if isinstance(raw, bool):
        raise ValueError(f"{what} must be a whole number >= 1, got {raw!r}")
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, str) and _WHOLE.fullmatch(raw.strip()):
        value = int(raw.strip())
    else:
        raise ValueError(f"{what} must be a whole number >= 1, got {raw!r}")
    if not 1 <= value <= MAX_CPUS:
        raise ValueError(f"{what} must be between 1 and {MAX_CPUS}, got {raw!r}")
    return value


def parse_index(raw: object, what: str) -> int:
    """A 0-based index: a whole number >= 0."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < MAX_CPUS:
        return raw
    if isinstance(raw, str) and _WHOLE.fullmatch(raw.strip()) and int(raw) < MAX_CPUS:
        return int(raw)
    raise ValueError(f"{what} must be a whole number >= 0, got {raw!r}")


def parse_rounding(raw: object, what: str) -> Rounding:
    text = raw.strip().lower() if isinstance(raw, str) else raw
    for choice in get_args(Rounding):
        if text == choice:
            return choice  # type: ignore[no-any-return]
    raise ValueError(f"{what} must be one of floor, ceil, nearest; got {raw!r}")


def parse_wait_policy(raw: object, what: str) -> WaitPolicy:
    text = raw.strip().lower() if isinstance(raw, str) else raw
    for choice in get_args(WaitPolicy):
        if text == choice:
            return choice  # type: ignore[no-any-return]
    raise ValueError(f"{what} must be one of auto, passive, active; got {raw!r}")


def parse_reserve(raw: object, what: str) -> float:
    """CPUs held back from the budget: a finite number >= 0."""
    if isinstance(raw, bool):
        raise ValueError(f"{what} must be a number of CPUs >= 0, got {raw!r}")
    try:
        if isinstance(raw, str):
            if not _DECIMAL.fullmatch(raw.strip()):
                raise ValueError
            value = float(raw.strip())
        else:
            value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of CPUs >= 0, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or value > MAX_CPUS:
        raise ValueError(f"{what} must be a number of CPUs >= 0, got {raw!r}")
    return value


def resolve(
    argument: object,
    env_names: tuple[str, ...],
    parse: Callable[[object, str], T],
    default: T,
    *,
    argument_name: str,
    environ: Mapping[str, str] | None = None,
    ignore_env_values: frozenset[str] = frozenset(),
) -> Setting[T]:
    """Resolve one setting; a bad argument raises ``ValueError``, a bad env value is skipped.

    Problems found on the way are returned (not raised or warned here), so the caller decides
    how to surface them and can record them in its result.
    """
    if argument is not None:
        return Setting(parse(argument, argument_name), "argument")
    env = os.environ if environ is None else environ
    problems: list[str] = []
    for name in env_names:
        raw = env.get(name)
        if raw is None or raw.strip().lower() in ignore_env_values:
            continue
        try:
            return Setting(parse(raw, name), f"env:{name}", tuple(problems))
        except ValueError as error:
            problems.append(f"ignoring {name}={raw!r}: {error}")
    return Setting(default, "default", tuple(problems))


def parse_marker(environ: Mapping[str, str]) -> dict[str, str]:
    """The NAME=VALUE pairs threadbudget exported, from ``THREADBUDGET_APPLIED``."""
    pairs: dict[str, str] = {}
    for item in environ.get(APPLIED_MARKER, "").split(","):
        name, sep, value = item.partition("=")
        if sep and name:
            pairs[name] = value
    return pairs


def set_by_us(name: str, environ: Mapping[str, str]) -> bool:
    """True when *name* holds the value threadbudget itself exported (here or in a parent)."""
    value = environ.get(name)
    return value is not None and parse_marker(environ).get(name) == value
