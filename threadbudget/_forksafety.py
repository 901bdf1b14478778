"""Fork safety: warn before forking over started native pools, reset our state in children.

libgomp is not fork-safe once its thread pool has started (GCC bug 60035): a child that enters
a parallel region can wait forever for pool threads that were not copied (pytorch#17199). It
bites gunicorn with ``preload_app`` and Celery's prefork pool when torch or numpy are imported
in the parent. And any lock or token a parent thread held at the fork would stay held forever
in the child, so every tracked object is rebuilt there.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from typing import Any

from ._threads import count_os_threads
from ._warnings import warn

__all__ = ["install_fork_safety", "native_threads_before_fork", "track_for_fork"]

logger = logging.getLogger("threadbudget")

# Modules whose native pools are known to break across fork, and what they load.
_FORK_UNSAFE = {"torch": "torch (libgomp / MKL)", "numpy": "numpy (OpenBLAS)", "scipy": "scipy"}

_lock = threading.Lock()
_installed = False
_warned = False
_tracked: weakref.WeakSet[Any] = weakref.WeakSet()


def install_fork_safety() -> None:
    """Register the at-fork handlers (once per process; later calls do nothing)."""
    global _installed
    with _lock:
        if _installed or not hasattr(os, "register_at_fork"):
            return
        _installed = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def track_for_fork(obj: Any) -> None:
    """Have ``obj._after_fork_in_child()`` run in every child forked from now on."""
    _tracked.add(obj)
    install_fork_safety()


def native_threads_before_fork() -> tuple[int, list[str]]:
    """Native threads running now, and the fork-unsafe libraries loaded (both empty if safe)."""
    loaded = [label for module, label in _FORK_UNSAFE.items() if module in sys.modules]
    if not loaded:
        return 0, []
    native = count_os_threads() - threading.active_count()
    return max(native, 0), loaded if native > 0 else []


def _before_fork() -> None:
    global _warned
    if _warned:
        return
    native, libraries = native_threads_before_fork()
    if not libraries:
        return
    _warned = True
    warn(
        f"forking while {native} native thread(s) run and {', '.join(libraries)} "
        "are loaded: an OpenMP pool that started before fork can hang the child in its first "
        "parallel region (GCC bug 60035, pytorch#17199). Import these libraries in the child "
        "instead: gunicorn preload_app = False, Celery: import them inside tasks or in "
        "worker_process_init, multiprocessing: the 'spawn' start method.",
        stacklevel=3,
    )


def _after_fork_in_child() -> None:
    global _warned
    _warned = False
    for obj in list(_tracked):
        try:
            obj._after_fork_in_child()
        except Exception:  # a child must start even if one object cannot be reset
            logger.exception("threadbudget: resetting %r after fork failed", obj)
