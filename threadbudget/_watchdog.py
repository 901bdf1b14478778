"""An opt-in sampler that notices persistent oversubscription and says which pools cause it.

Every ``interval`` seconds it counts this process's runnable threads (state ``R`` in
``/proc/self/task/*/stat``, native threads included). When more threads than the budget stay
runnable for ``persist`` seconds, it logs one warning naming the native pools and their sizes:
the "240 threads on 24 cores" diagnosis, automated. Reading a few hundred small files once a
second costs well under 1 % of one CPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ._controllers import registered_controllers
from ._detect import detect_budget
from ._forksafety import track_for_fork
from ._settings import parse_positive_int

__all__ = ["Watchdog", "WatchdogSnapshot", "runnable_threads"]

logger = logging.getLogger("threadbudget")
_TASKS = Path("/proc/self/task")


def runnable_threads(exclude: int | None = None) -> tuple[int, int, Counter[str]]:
    """(runnable threads, all threads, runnable threads by name) of this process now."""
    runnable = 0
    total = 0
    names: Counter[str] = Counter()
    try:
        entries = os.listdir(_TASKS)
    except OSError:
        return 0, 0, names
    for entry in entries:
        if exclude is not None and entry == str(exclude):
            continue
        try:
            stat = (_TASKS / entry / "stat").read_text()
        except OSError:
            continue  # the thread ended while we looked
        total += 1
        name, _, rest = stat.partition(" (")[2].rpartition(") ")
        if rest[:1] == "R":
            runnable += 1
            names[name] += 1
    return runnable, total, names


@dataclass(frozen=True)
class WatchdogSnapshot:
    """What the watchdog has seen so far."""

    budget: int
    samples: int
    last_runnable: int
    peak_runnable: int
    peak_threads: int
    oversubscribed_samples: int
    oversubscribed_seconds: float
    warnings: int
    last_diagnosis: str | None


class Watchdog:
    """Samples runnable threads in a daemon thread; use as a context manager or start()/stop().

    *budget* defaults to the detected budget. A warning is logged (logger ``threadbudget``) when
    runnable threads exceed the budget in every sample for *persist* seconds; at most
    *max_warnings* times per process, and again only after the process has been within its
    budget for *persist* seconds.
    """

    def __init__(
        self,
        budget: int | None = None,
        *,
        interval: float = 1.0,
        persist: float = 5.0,
        max_warnings: int = 1,
    ) -> None:
        self.budget = (
            detect_budget().budget if budget is None else parse_positive_int(budget, "budget")
        )
        for name, value in (("interval", interval), ("persist", persist)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(max_warnings, bool) or not isinstance(max_warnings, int) or max_warnings < 0:
            raise ValueError(f"max_warnings must be a whole number >= 0, got {max_warnings!r}")
        self.interval = float(interval)
        self.persist = float(persist)
        self.max_warnings = max_warnings
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._last = 0
        self._peak = 0
        self._peak_threads = 0
        self._over_samples = 0
        self._over_seconds = 0.0
        self._warnings = 0
        self._diagnosis: str | None = None
        self._over_since: float | None = None
        self._within_since: float | None = None
        self._armed = True
        track_for_fork(self)

    def _after_fork_in_child(self) -> None:
        # The sampling thread does not exist in a child; the child starts one if it wants.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> Watchdog:
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this watchdog is already running")
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="threadbudget-watchdog", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def snapshot(self) -> WatchdogSnapshot:
        with self._lock:
            return WatchdogSnapshot(
                budget=self.budget,
                samples=self._samples,
                last_runnable=self._last,
                peak_runnable=self._peak,
                peak_threads=self._peak_threads,
                oversubscribed_samples=self._over_samples,
                oversubscribed_seconds=self._over_seconds,
                warnings=self._warnings,
                last_diagnosis=self._diagnosis,
            )

    def _run(self) -> None:
        me = threading.get_native_id()
        while not self._stop.wait(self.interval):
            try:
                self.sample(exclude=me)
            except Exception:  # the watchdog must never take the process down
                logger.exception("threadbudget watchdog: sampling failed")

    def sample(self, exclude: int | None = None, now: float | None = None) -> int:
        """Take one sample (the sampling thread calls this; tests may too). Returns runnable."""
        runnable, total, names = runnable_threads(exclude)
        now = time.monotonic() if now is None else now
        diagnosis = None
        with self._lock:
            self._samples += 1
            self._last = runnable
            self._peak = max(self._peak, runnable)
            self._peak_threads = max(self._peak_threads, total)
            if runnable > self.budget:
                self._over_samples += 1
                self._over_seconds += self.interval
                self._within_since = None
                if self._over_since is None:
                    self._over_since = now
                persisted = now - self._over_since >= self.persist
                if persisted and self._armed and self._warnings < self.max_warnings:
                    self._armed = False
                    self._warnings += 1
                    diagnosis = "pending"
            else:
                self._over_since = None
                if self._within_since is None:
                    self._within_since = now
                if now - self._within_since >= self.persist:
                    self._armed = True
        if diagnosis is not None:
            message = self._diagnose(runnable, total, names)
            with self._lock:
                self._diagnosis = message
            logger.warning("%s", message)
        return runnable

    def _diagnose(self, runnable: int, total: int, names: Counter[str]) -> str:
        pools = []
        for controller in registered_controllers():
            try:
                if not controller.is_loaded():
                    continue
                for pool in controller.pools():
                    label = pool.get("prefix") or pool.get("library") or controller.name
                    pools.append(f"{label} {pool.get('num_threads')} thread(s)")
            except Exception as error:  # keep the diagnosis even if one controller fails
                pools.append(f"{controller.name}: unreadable ({error!r})")
        busiest = ", ".join(f"{name} x{count}" for name, count in names.most_common(3))
        return (
            f"oversubscribed for {self.persist:g} s: {runnable} runnable thread(s) for a budget "
            f"of {self.budget} CPU(s), {total} thread(s) in the process (runnable: {busiest}). "
            f"Native pools: {'; '.join(pools) or 'none loaded'}. Apply threadbudget's plan "
            "before importing native libraries (threadbudget run / import threadbudget.auto) "
            "and admit work through CpuSlots."
        )
