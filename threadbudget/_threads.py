"""Observe the OS threads of this process, native ones included.

``threading.enumerate()`` cannot see OpenMP or BLAS workers; ``/proc/self/task`` can, and its
``schedstat`` says how long each thread ran, which tells the threads that did the work of an
operation from those that merely exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["ThreadActivity", "ThreadSample", "count_os_threads", "measure_busy_threads", "sample"]

R = TypeVar("R")
_TASKS = Path("/proc/self/task")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ThreadSample:
    tid: int
    name: str
    cpu_ns: int


def count_os_threads() -> int:
    """OS threads of this process now (native pools included)."""
    try:
        return len(os.listdir(_TASKS))
    except OSError:
        import threading

        return threading.active_count()


def stat_fields(process: Path) -> list[str]:
    """The fields of ``<process>/stat`` after the command name, which may hold spaces and
    parentheses: index 0 is the state (field 3 of proc(5)), index 19 the start time."""
    return (process / "stat").read_text().rpartition(")")[2].split()


def _cpu_ns(task: Path) -> int:
    try:
        return int((task / "schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    # Kernels without schedstats: utime + stime from stat, in clock ticks.
    fields = stat_fields(task)
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLOCK_TICKS


def sample() -> dict[int, ThreadSample]:
    """Every OS thread of this process with its name and CPU time so far."""
    samples: dict[int, ThreadSample] = {}
    try:
        entries = os.listdir(_TASKS)
    except OSError:
        return samples
    for entry in entries:
        task = _TASKS / entry
        try:
            name = (task / "comm").read_text().strip()
            samples[int(entry)] = ThreadSample(int(entry), name, _cpu_ns(task))
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we looked
    return samples


@dataclass(frozen=True)
class ThreadActivity:
    """Which OS threads ran, and for how long, while an operation ran."""

    busy: tuple[ThreadSample, ...]
    threads_before: int
    threads_after: int

    @property
    def busy_count(self) -> int:
        return len(self.busy)


def measure_busy_threads(
    operation: Callable[[], R], *, min_share: float = 1 / 3, min_cpu_ns: int = 2_000_000
) -> tuple[R, ThreadActivity]:
    """Run *operation* and count the OS threads that did a real share of its CPU work.

    A thread counts when its CPU time grew by at least *min_cpu_ns* and by at least *min_share*
    of the busiest thread's growth, so idle pool threads waking briefly are not counted.
    Threads that start and end inside the operation are not seen. Pool threads that spin after
    an earlier operation (OpenBLAS and OpenMP do, for up to ~0.2 s) can be counted: measure
    after a short pause.
    """
    before = sample()
    result = operation()
    after = sample()
    grown = {
        tid: ThreadSample(tid, s.name, s.cpu_ns - before[tid].cpu_ns if tid in before else s.cpu_ns)
        for tid, s in after.items()
    }
    peak = max((s.cpu_ns for s in grown.values()), default=0)
    busy = tuple(
        sorted(
            (s for s in grown.values() if s.cpu_ns >= max(min_cpu_ns, min_share * peak)),
            key=lambda s: -s.cpu_ns,
        )
    )
    return result, ThreadActivity(busy=busy, threads_before=len(before), threads_after=len(after))
