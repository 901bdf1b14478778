"""Pinning single-thread slots to CPUs of their own.

When every token is busy and a slot is handed to a waiting thread, the kernel wakes that thread
on the CPU it last ran on, which is often still busy with the thread that released the slot,
while another CPU idles: measured on 2 CPUs, up to 3 ms of run-queue wait per request and a
fifth of a CPU lost (``benchmarks/handoff.py``). A thread that holds a one-token grant runs all
of its native work itself, so pinning it to a CPU that no other slot of this process holds puts
it where a CPU is free. Grants of more than one thread are not pinned: OpenMP and pthreads
workers keep the affinity they were created with, and a team created inside a pinned slot
would stay on that slot's CPUs after they were handed to someone else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

from ._forksafety import track_for_fork
from ._warnings import warn

__all__ = ["CpuPinning", "pinning_cpus"]

_Undo = Callable[[], None]


def _nothing_to_undo() -> None:
    return None


def pinning_cpus(pin: bool | Iterable[int], budget: int) -> tuple[int, ...] | None:
    """The CPUs that *pin* asks single-thread slots to be spread over, checked; ``None``: off.

    ``True`` means this process's affinity mask, which must then hold exactly *budget* CPUs:
    with more (a CPU quota below the cpuset, or sibling workers sharing the machine) every
    process would pin to the same CPUs, so the caller has to say which ones are its own.
    """
    if pin is False:
        return None
    allowed = os.sched_getaffinity(0)
    if pin is True:
        if len(allowed) != budget:
            raise ValueError(
                f"pin=True pins one slot per CPU of this process's affinity mask, which has "
                f"{len(allowed)} CPUs for a budget of {budget}; pass pin=[cpu, ...] with the "
                f"{budget} or more CPUs this process owns (see docs/coordination.md#pinning)"
            )
        return tuple(sorted(allowed))
    if isinstance(pin, (str, bytes)) or not isinstance(pin, Iterable):
        raise ValueError(f"pin must be True, False or an iterable of CPU numbers, got {pin!r}")
    cpus = list(pin)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
        raise ValueError(f"pin must list CPU numbers (int), got {cpus!r}")
    if len(set(cpus)) != len(cpus):
        raise ValueError(f"pin lists a CPU more than once: {cpus!r}")
    outside = sorted(set(cpus) - allowed)
    if outside:
        raise ValueError(
            f"pin lists CPUs {outside} that this process may not run on "
            f"(its affinity mask is {sorted(allowed)})"
        )
    if len(cpus) < budget:
        raise ValueError(
            f"pin lists {len(cpus)} CPUs for a budget of {budget}: every token needs a CPU"
        )
    return tuple(cpus)


class CpuPinning:
    """Hands each single-thread slot a CPU no other slot of this pool holds, and takes it back."""

    def __init__(self, cpus: tuple[int, ...]) -> None:
        self._cpus = cpus
        self._lock = threading.Lock()
        self._free = list(reversed(cpus))
        self._warned = False
        track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        # Only the forking thread lives on in the child; no other slot holds a CPU there.
        self._lock = threading.Lock()
        self._free = list(reversed(self._cpus))

    @property
    def cpus(self) -> tuple[int, ...]:
        return self._cpus

    def free_cpus(self) -> int:
        with self._lock:
            return len(self._free)

    def pin(self) -> _Undo:
        """Pin the calling thread to a free CPU; the result puts its affinity back.

        The most recently returned CPU goes first: its previous holder has just left the slot
        and is about to block, so that CPU is the one about to fall idle. With no CPU free (a
        grant shared by several threads, as ``call_sized`` allows) the thread stays unpinned.
        """
        with self._lock:
            if not self._free:
                return _nothing_to_undo
            cpu = self._free.pop()
        try:
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, (cpu,))
        except OSError as error:  # CPU taken offline, cpuset changed under the process
            self._give_back(cpu)
            self._warn_once(f"could not pin a slot to CPU {cpu}: {error}; slots run unpinned")
            return _nothing_to_undo

        def unpin() -> None:
            try:
                os.sched_setaffinity(0, before)
            except OSError as error:
                self._warn_once(f"could not restore a thread's CPU affinity: {error}")
            finally:
                self._give_back(cpu)

        return unpin

    def _give_back(self, cpu: int) -> None:
        with self._lock:
            # A slot held across a fork finds its CPU already free in the child.
            if cpu not in self._free:
                self._free.append(cpu)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warn(message)
