"""Apply a plan: environment variables for libraries not yet loaded, runtime limits for the rest.

The handle returned by :func:`apply_plan` restores both, and works as a context manager.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ._controllers import RuntimeChange, ThreadSetter, registered_controllers
from ._envvars import APPLIED_MARKER, parse_marker, planned_values, set_by_us
from ._plan import Plan, make_plan
from ._warnings import warn

__all__ = ["AppliedBudget", "EnvConflict", "apply_plan"]

logger = logging.getLogger("threadbudget")


class _ThreadStartHook:
    """Sizes per-thread runtimes at the start of every thread that ``threading`` starts later.

    OpenMP keeps one limit per thread and new threads start from the value the library loaded
    with, so a limit set at runtime in one thread reaches no other. ``threading.setprofile``
    is the one documented hook that runs inside each new thread before its target; it removes
    itself from the thread after the first event, so the thread runs unprofiled.
    """

    def __init__(self, setters: list[ThreadSetter], threads: int) -> None:
        self.setters = setters
        self.threads = threads

    def __call__(self, frame: object, event: str, arg: object) -> None:
        sys.setprofile(None)
        for setter in self.setters:
            try:
                setter(self.threads)
            except Exception as error:  # a thread must start even if a setter breaks
                logger.warning("per-thread limit failed in a new thread: %r", error)


@dataclass(frozen=True)
class EnvConflict:
    """A variable the user had set to something other than the plan's value; theirs is kept."""

    name: str
    user_value: str
    planned_value: str


@dataclass
class AppliedBudget:
    """What :func:`apply_plan` changed; :meth:`restore` undoes it (once; later calls do nothing)."""

    plan: Plan
    env_set: dict[str, str]
    env_kept: dict[str, str]
    env_conflicts: list[EnvConflict]
    runtime_changes: list[RuntimeChange]
    warnings: list[str]
    _environ: MutableMapping[str, str] = field(repr=False, default_factory=dict)
    _previous_env: dict[str, str | None] = field(repr=False, default_factory=dict)
    _restored: bool = field(repr=False, default=False)
    _thread_hook: _ThreadStartHook | None = field(repr=False, default=None)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    @property
    def restored(self) -> bool:
        return self._restored

    def restore(self) -> None:
        """Put back the environment and the runtime limits as they were before applying."""
        with self._lock:
            if self._restored:
                return
            self._restored = True
        if self._thread_hook is not None and threading.getprofile() is self._thread_hook:
            threading.setprofile(None)
        for change in reversed(self.runtime_changes):
            if change.undo is not None:
                change.undo()
        for name, value in self._previous_env.items():
            if value is None:
                self._environ.pop(name, None)
            else:
                self._environ[name] = value

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "env_set": dict(self.env_set),
            "env_kept": dict(self.env_kept),
            "env_conflicts": [vars(conflict) for conflict in self.env_conflicts],
            "runtime_changes": [
                {
                    "controller": change.controller,
                    "library": change.library,
                    "before": change.before,
                    "after": change.after,
                    "notes": list(change.notes),
                }
                for change in self.runtime_changes
            ],
            "warnings": list(self.warnings),
        }

    def __enter__(self) -> AppliedBudget:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()


def apply_plan(
    plan: Plan | None = None,
    *,
    concurrency: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    cpus: int | None = None,
    runtime: bool = True,
    environ: MutableMapping[str, str] | None = None,
    emit_warnings: bool = True,
) -> AppliedBudget:
    """Give every native thread pool the plan's thread count.

    Sets each variable of :data:`NATIVE_ENV_VARS` that the user has not set (a user's value is
    kept and reported as a conflict when it differs), then, with *runtime*, resizes the pools of
    libraries that are already loaded and warns that the variables came too late for them.
    Without *plan*, one is made from the other arguments and the ``THREADBUDGET_*`` variables.
    """
    env = os.environ if environ is None else environ
    if plan is None:
        from ._detect import detect_budget

        budget = detect_budget(cpus=cpus, environ=env, emit_warnings=emit_warnings)
        plan = make_plan(
            budget,
            concurrency=concurrency,
            workers=workers,
            threads=threads,
            environ=env,
            emit_warnings=emit_warnings,
        )
    elif any(value is not None for value in (concurrency, workers, threads, cpus)):
        raise TypeError("pass either a plan or concurrency/workers/threads/cpus, not both")

    applied = AppliedBudget(
        plan=plan,
        env_set={},
        env_kept={},
        env_conflicts=[],
        runtime_changes=[],
        warnings=[],
        _environ=env,
    )
    marker = parse_marker(env)
    planned = planned_values(plan)
    for name, value in planned.items():
        current = env.get(name)
        if current is not None and not set_by_us(name, env):
            applied.env_kept[name] = current
            marker.pop(name, None)
            if current.strip() != value:
                applied.env_conflicts.append(EnvConflict(name, current, value))
                logger.info(
                    "keeping %s=%r set by the user (the plan says %s)", name, current, value
                )
                _check_user_threads(applied, name, current)
            continue
        applied._previous_env[name] = current
        env[name] = value
        applied.env_set[name] = value
        marker[name] = value
    for name in [name for name in marker if name not in planned]:
        # Exported by an earlier plan that this one no longer makes (passive waiting, T=1).
        if set_by_us(name, env):
            applied._previous_env[name] = env.pop(name)
        del marker[name]
    applied._previous_env.setdefault(APPLIED_MARKER, env.get(APPLIED_MARKER))
    env[APPLIED_MARKER] = ",".join(f"{name}={value}" for name, value in sorted(marker.items()))

    if runtime:
        _apply_runtime(applied)
    if emit_warnings:
        for message in applied.warnings:
            warn(message)
    return applied


def _check_user_threads(applied: AppliedBudget, name: str, value: str) -> None:
    """A user's thread count above this process's share is kept, but not silently."""
    from ._envvars import NATIVE_ENV_VARS

    role = next((var.role for var in NATIVE_ENV_VARS if var.name == name), None)
    if role != "threads" or not value.strip().isdecimal():
        return
    limit = applied.plan.process_budget // applied.plan.concurrency or 1
    if int(value) > limit:
        applied.warnings.append(
            f"{name}={value} was set by the user and is kept, but {applied.plan.concurrency} "
            f"in-flight task(s) x {value} thread(s) exceed this process's budget of "
            f"{applied.plan.process_budget} CPU(s)"
        )


def _apply_runtime(applied: AppliedBudget) -> None:
    threads = applied.plan.threads
    setters: list[ThreadSetter] = []
    for controller in registered_controllers():
        try:
            if not controller.is_loaded():
                continue
            changes = controller.limit(threads)
            setter = controller.thread_setter()
        except Exception as error:  # a broken third-party controller must not stop the others
            applied.warnings.append(f"controller {controller.name!r} failed: {error!r}")
            continue
        if setter is not None:
            setters.append(setter)
        applied.runtime_changes.extend(changes)
        late = sorted({c.library for c in changes if c.before is not None and c.before != threads})
        if late:
            applied.warnings.append(
                f"{', '.join(late)} {'was' if len(late) == 1 else 'were'} loaded before "
                f"threadbudget set the environment, so the variables came too late; resized at "
                f"runtime to {threads} thread(s) instead. Apply the budget before importing "
                "numerical libraries (`import threadbudget.auto` first, or `threadbudget run`)."
            )
        for change in changes:
            applied.warnings.extend(change.notes)
    if setters:
        if threading.getprofile() is None:
            applied._thread_hook = _ThreadStartHook(setters, threads)
            threading.setprofile(applied._thread_hook)
        else:
            applied.warnings.append(
                "a profiler is installed with threading.setprofile, so threads started from now "
                "on keep their OpenMP default; apply the budget before importing native "
                "libraries, or size each thread with threadbudget's slots"
            )
