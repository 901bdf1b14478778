"""A pytest plugin that fails tests whose code runs more OS threads than allowed.

Installed with threadbudget and registered through the ``pytest11`` entry point, it does
nothing until a limit is set: ``--max-threads N``, ``THREADBUDGET_MAX_THREADS`` or the
``threadbudget_max_threads`` ini option for every test, ``@pytest.mark.max_threads(N)`` for one.

What it counts: the OS threads of the test process, native ones included, that *used CPU*
during the test's call phase, read from ``/proc/self/task`` by a sampling thread. Counting
threads that merely exist would measure pool sizes instead: OpenMP and BLAS pools keep their
threads alive, asleep, long after their last parallel operation. See ``docs/pytest-plugin.md``.

PYTEST_DONT_REWRITE: the module has no assert to rewrite, and importing it before pytest loads
it as a plugin (from a conftest, say) must not warn.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import pytest

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_MIN_CPU_MS",
    "DEFAULT_MIN_SHARE",
    "DEFAULT_SETTLE",
    "ENV_MAX_THREADS",
    "ENV_SAMPLE_INTERVAL",
    "BusyThread",
    "ThreadLimitExceeded",
    "ThreadSampler",
    "ThreadSamplingWarning",
]

ENV_MAX_THREADS = "THREADBUDGET_MAX_THREADS"
ENV_SAMPLE_INTERVAL = "THREADBUDGET_THREAD_SAMPLE_INTERVAL"
INI_MAX_THREADS = "threadbudget_max_threads"
INI_SAMPLE_INTERVAL = "threadbudget_thread_sample_interval"
CLI_MAX_THREADS = "--max-threads"
CLI_SAMPLE_INTERVAL = "--thread-sample-interval"
MARKER = "max_threads"

#: Seconds between samples. Threads that live shorter than this can be missed entirely.
DEFAULT_INTERVAL = 0.005
#: A thread counts only when it used at least this much CPU during the call phase...
DEFAULT_MIN_CPU_MS = 2.0
#: ...and at least this share of the busiest thread's CPU, so that a helper thread that woke up
#: briefly during a long test is not counted as running alongside it.
DEFAULT_MIN_SHARE = 0.05
#: Most seconds to wait, before measuring, for threads still spinning from earlier work
#: (OpenBLAS spins ~0.1 s after its last job, Intel/LLVM OpenMP 0.2 s by default).
DEFAULT_SETTLE = 0.3
#: Before a window opens, other threads must have used less than this share of one CPU...
_QUIET_SHARE = 0.1
#: ...in every reading of the last this many seconds.
_QUIET_SPAN = 0.02
#: Unattributed CPU up to this is jitter between the per-thread and process clock readings.
_LOST_NOTICE_MS = 5.0

_MIN_INTERVAL = 0.001
_MAX_INTERVAL = 60.0
_TASKS = "/proc/self/task"
_WHOLE = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]*)?|\.[0-9]+")
_AVAILABLE = os.path.isdir(_TASKS)


# -- reading per-thread CPU time -----------------------------------------------------------


def _clock_cpu_ns(tid: int) -> int:
    # The per-thread CPU clock of *tid*, encoded as glibc's pthread_getcpuclockid() does
    # (kernel ABI: ~tid << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED). Unlike schedstat, it
    # includes the time a thread running right now has used since the last scheduler tick, and
    # costs one system call instead of an open/read/close.
    return time.clock_gettime_ns((~tid << 3) | 6)


def _proc_cpu_ns(tid: int) -> int:
    from ._threads import _cpu_ns

    return _cpu_ns(Path(_TASKS) / str(tid))


def _pick_reader() -> Callable[[int], int]:
    if not _AVAILABLE or not hasattr(time, "clock_gettime_ns"):
        return _proc_cpu_ns
    try:
        # Sanity check on this thread, whose CPU time Python reads by the documented route.
        own = _clock_cpu_ns(threading.get_native_id())
        if abs(own - time.thread_time_ns()) < 1_000_000_000:
            return _clock_cpu_ns
    except (OSError, OverflowError, ValueError):
        pass
    return _proc_cpu_ns


_read_cpu_ns = _pick_reader()


def _cpu_by_thread() -> dict[int, int]:
    """CPU nanoseconds used so far by every OS thread of this process, by thread id."""
    try:
        entries = os.listdir(_TASKS)
    except OSError:
        return {}
    cpu: dict[int, int] = {}
    for entry in entries:
        try:
            tid = int(entry)
            cpu[tid] = _read_cpu_ns(tid)
        except (OSError, ValueError, IndexError):
            continue  # the thread ended while we looked
    return cpu


def _comm(tid: int) -> str:
    try:
        with open(f"{_TASKS}/{tid}/comm", encoding="utf-8", errors="replace") as file:
            return file.read().strip()
    except OSError:
        return "?"


def _python_names() -> dict[int, str]:
    # Native threads inherit their creator's comm ("python"), so for threads started with
    # ``threading`` the Python name says much more about where they came from.
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


# Native ids of every running sampler thread, in any sampler: none of them is ever counted,
# also when two samplers overlap (the automatic check and the fixture in one test).
_sampler_tids: set[int] = set()
_sampler_tids_lock = threading.Lock()


def _samplers() -> frozenset[int]:
    with _sampler_tids_lock:
        return frozenset(_sampler_tids)


def _forget_sampler(tid: int | None) -> None:
    # join() returns before the OS thread has quite exited; until its task entry is gone, a
    # later window would count it among the threads alive.
    deadline = time.monotonic() + 0.05
    while tid is not None and os.path.exists(f"{_TASKS}/{tid}") and time.monotonic() < deadline:
        time.sleep(0.0002)
    with _sampler_tids_lock:
        _sampler_tids.discard(tid or 0)


class _Activity:
    """When each thread was last seen using CPU, from every reading any sampler takes.

    Pools keep spinning after their last job (OpenBLAS ~0.1 s, Intel/LLVM OpenMP 0.2 s), and
    a spinning thread can look idle over a few milliseconds when the machine is busy, so a
    window opens only after other threads have been quiet for a while, judged over all
    readings since the previous window rather than one short look.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._time: float | None = None
        self._cpu: dict[int, int] = {}
        self._active: dict[int, float] = {}

    def record(self, now: float, cpu: dict[int, int]) -> None:
        with self._lock:
            if self._time is not None and now < self._time:
                return  # a reading overtaken by a later one
            if self._time is None:
                # Nothing known yet: every thread may be spinning.
                self._active = dict.fromkeys(cpu, now)
            else:
                # Capped, so that spinning at the end of a long gap is not averaged away.
                limit = _QUIET_SHARE * min(now - self._time, _QUIET_SPAN) * 1e9
                for tid, ns in cpu.items():
                    if ns - self._cpu.get(tid, 0) > limit:
                        self._active[tid] = now
                self._active = {tid: t for tid, t in self._active.items() if tid in cpu}
            self._time, self._cpu = now, cpu

    def active_since(self, now: float, ignore: frozenset[int]) -> list[int]:
        """Threads not in *ignore* seen using CPU less than the quiet span before *now*."""
        with self._lock:
            return [
                tid
                for tid, seen in self._active.items()
                if tid not in ignore and now - seen < _QUIET_SPAN
            ]


_activity = _Activity()


# -- the sampler ---------------------------------------------------------------------------


class BusyThread(NamedTuple):
    """A thread that used CPU in the measured window: thread id, name, CPU milliseconds."""

    tid: int
    name: str
    cpu_ms: float


class ThreadLimitExceeded(AssertionError):
    """More threads used CPU in the measured window than allowed; the message says which."""


class ThreadSamplingWarning(pytest.PytestWarning):
    """A checked test passed, but threads that ended between samples used enough CPU to hide
    a thread from the count; the message says how much."""


@dataclass
class _Track:
    tid: int
    comm: str
    python_name: str | None
    start_ns: int
    last_ns: int

    @property
    def name(self) -> str:
        return self.python_name or self.comm

    @property
    def grown_ns(self) -> int:
        return self.last_ns - self.start_ns


class ThreadSampler:
    """Watch which OS threads of this process use CPU between :meth:`start` and :meth:`stop`.

    A daemon thread reads every thread's CPU time each *interval* seconds, so threads that
    start and end inside the window are seen too, with the CPU they had used at their last
    sample. :attr:`busy_threads` are those whose CPU time grew by at least *min_cpu_ms* and by
    at least *min_share* of the busiest thread's growth. Before the window opens, :meth:`start`
    waits up to *settle* seconds for other threads to go quiet, so a pool still spinning after
    earlier work is not charged to this window. While running, every property reads the threads
    afresh. Sampler threads are never counted.
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        *,
        min_cpu_ms: float = DEFAULT_MIN_CPU_MS,
        min_share: float = DEFAULT_MIN_SHARE,
        settle: float = DEFAULT_SETTLE,
    ) -> None:
        if not (_MIN_INTERVAL <= interval <= _MAX_INTERVAL):
            raise ValueError(
                f"interval must be between {_MIN_INTERVAL:g} and {_MAX_INTERVAL:g} seconds, "
                f"got {interval!r}"
            )
        if min_cpu_ms < 0 or not 0 <= min_share <= 1 or settle < 0:
            raise ValueError("min_cpu_ms and settle must be >= 0 and min_share within 0..1")
        self.interval = interval
        self.min_cpu_ms = min_cpu_ms
        self.min_share = min_share
        self.settle = settle
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tracks: dict[int, _Track] = {}
        self._ended: list[_Track] = []
        self._excluded: set[int] = set()
        self._peak = 0
        self._at_start = 0
        self._busy_at_start: list[tuple[int, str]] = []
        self._settled_s = 0.0
        self._started = False
        self._fresh: dict[int, float] = {}
        # The process's CPU clock (every thread, live or ended) at the first and last reading:
        # what the per-thread tracks do not add up to went to threads that ended unobserved.
        self._process_start_ns = 0
        self._process_last_ns = 0
        self._alive_tids: set[int] = set()  # thread ids in the latest reading

    # - lifecycle -

    def start(self) -> ThreadSampler:
        """Wait for other threads to go quiet (at most *settle* s), then open the window."""
        if self._started:
            raise RuntimeError("this ThreadSampler is already started; use reset()")
        baseline, process_ns = self._settle()
        names = _python_names()
        with self._lock:
            self._process_start_ns = self._process_last_ns = process_ns
            self._alive_tids = set(baseline)
            self._tracks = {
                tid: _Track(tid, _comm(tid), names.get(tid), ns, ns) for tid, ns in baseline.items()
            }
            self._ended = []
            self._fresh = {}
            self._excluded = set(_samplers())
            self._at_start = self._peak = self._alive(baseline)
            self._stop.clear()
            self._started = True
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="threadbudget-sampler", daemon=True
        )
        self._thread.start()
        # Its id must be excluded before anyone reads a sample that contains it.
        ready.wait()
        return self

    def stop(self) -> None:
        """Close the window: a last exact reading in this thread, then the sampler ends."""
        if not self._started:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            _forget_sampler(self._thread.native_id)
            self._thread = None
        self._take()
        with self._lock:
            self._started = False
            # Names may have been set after a thread first appeared.
            names = _python_names()
            for track in self._tracks.values():
                track.python_name = names.get(track.tid, track.python_name)

    def reset(self) -> None:
        """Start a new window now, e.g. after warming up the code under test."""
        self.stop()
        self.start()

    def __enter__(self) -> ThreadSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        me = threading.get_native_id()
        with _sampler_tids_lock:
            _sampler_tids.add(me)
        with self._lock:
            self._excluded.add(me)
        ready.set()
        # stop() removes the id from _sampler_tids once the OS thread is gone.
        while not self._stop.wait(self.interval):
            self._take()

    def _settle(self) -> tuple[dict[int, int], int]:
        """Wait until no thread but this one and the samplers uses CPU; return that reading
        with the process's CPU clock read right after it."""
        me = threading.get_native_id()
        began = time.monotonic()
        while True:
            now = time.monotonic()
            current = _cpu_by_thread()
            process_ns = time.process_time_ns()
            _activity.record(now, current)
            busy = _activity.active_since(now, _samplers() | {me})
            if not busy or now - began >= self.settle:
                break
            # Short steps whatever the sample interval: each step is a reading _activity judges.
            time.sleep(min(self.interval, _QUIET_SPAN / 4))
        self._settled_s = now - began
        self._busy_at_start = [(tid, _comm(tid)) for tid in busy]
        return current, process_ns

    def _take(self) -> dict[int, int]:
        # Held across the reading, so two readings (the sampler's and a caller's) never apply
        # out of order, which would look like a thread id reused by a new thread.
        with self._lock:
            cpu = _cpu_by_thread()
            self._process_last_ns = time.process_time_ns()
            self._alive_tids = set(cpu)
            now = time.monotonic()
            _activity.record(now, cpu)
            self._excluded |= _samplers()
            new = [tid for tid in cpu if tid not in self._tracks]
            names = _python_names() if new or self._fresh else {}
            # A thread seen in its first microseconds may not have its Python name yet; keep
            # looking for a couple of intervals.
            for tid, seen in list(self._fresh.items()):
                track = self._tracks.get(tid)
                if track is not None and track.python_name is None:
                    track.python_name = names.get(tid)
                if track is None or track.python_name or now - seen > 2 * self.interval:
                    del self._fresh[tid]
            self._fresh.update(dict.fromkeys(new, now))
            for tid, ns in cpu.items():
                track = self._tracks.get(tid)
                if track is not None and ns >= track.last_ns:
                    track.last_ns = ns
                    continue
                if track is not None:  # the id was reused by a thread born since
                    self._ended.append(track)
                self._tracks[tid] = _Track(tid, _comm(tid), names.get(tid), 0, ns)
            self._peak = max(self._peak, self._alive(cpu))
        return cpu

    def _alive(self, cpu: Mapping[int, int]) -> int:
        return sum(1 for tid in cpu if tid not in self._excluded)

    def _refresh(self) -> None:
        if self._started:
            self._take()

    # - results -

    @property
    def peak_threads(self) -> int:
        """Most OS threads alive at once in the window (sampled; sampler threads not counted)."""
        self._refresh()
        return self._peak

    @property
    def threads_at_start(self) -> int:
        """OS threads alive when the window opened (sampler threads not counted)."""
        return self._at_start

    def _grown(self) -> list[_Track]:
        with self._lock:
            tracks = [*self._ended, *self._tracks.values()]
            return [t for t in tracks if t.tid not in self._excluded and t.grown_ns > 0]

    @property
    def busy_threads(self) -> list[BusyThread]:
        """Threads that used a real share of CPU in the window, busiest first."""
        self._refresh()
        return self._busy(self._grown())

    @property
    def busy_count(self) -> int:
        return len(self.busy_threads)

    @property
    def unattributed_cpu_ms(self) -> float:
        """CPU the process used in the window that no sampled thread accounts for.

        It went to threads that ended between two samples, after their last one: threads
        shorter than the interval, or threads the sampler could not look at in time because
        they kept the GIL busy (pure-Python CPU work in several threads). A large value means
        :attr:`busy_threads` may be short of a thread.
        """
        self._refresh()
        with self._lock:
            tracks = [*self._ended, *self._tracks.values()]  # samplers included: they used it
            used = self._process_last_ns - self._process_start_ns
            return max(0.0, (used - sum(t.grown_ns for t in tracks)) / 1e6)

    def _sampling_gap(self, busy: list[BusyThread]) -> str | None:
        """Why the count may be short, when unobserved CPU could have been a thread of its own
        (it passes the floor busy threads pass); None otherwise."""
        lost_ms = self.unattributed_cpu_ms
        top = busy[0].cpu_ms if busy else 0.0
        with self._lock:
            ended = len(self._ended) + sum(1 for tid in self._tracks if tid not in self._alive_tids)
        # Each thread that ended may have run up to one interval after its last sample.
        allowance_ms = _LOST_NOTICE_MS + ended * self.interval * 1e3
        if lost_ms < allowance_ms + max(self.min_cpu_ms, self.min_share * top):
            return None
        return (
            f"{lost_ms:.1f} ms of CPU went to threads that ended between samples (every "
            f"{self.interval:g} s) and is not attributed to any thread, so the count may be "
            "short. Threads that live shorter than the interval, or several threads running "
            "pure-Python code (the GIL keeps the sampler from its turn), cause this; keep worker "
            "threads alive until the test ends, or lower the sample interval."
        )

    def _busy(self, grown: list[_Track]) -> list[BusyThread]:
        top = max((t.grown_ns for t in grown), default=0)
        floor = max(self.min_cpu_ms * 1e6, self.min_share * top)
        return [
            BusyThread(t.tid, t.name, t.grown_ns / 1e6)
            for t in sorted(grown, key=lambda t: -t.grown_ns)
            if t.grown_ns >= floor and t.grown_ns > 0
        ]

    def check(self, max_threads: int, *, source: str | None = None) -> None:
        """Raise :class:`ThreadLimitExceeded` with :meth:`report` if too many threads ran."""
        __tracebackhide__ = True  # the failure belongs to the test's line that called check()
        if self.busy_count > max_threads:
            raise ThreadLimitExceeded(
                self.report(max_threads, source or f"ThreadSampler.check({max_threads})")
            )

    def report(self, max_threads: int, source: str) -> str:
        """What ran, against *max_threads* set by *source*, and which native pools are loaded."""
        self._refresh()
        grown = self._grown()
        busy = self._busy(grown)
        python_ids = {t.tid for t in grown if t.python_name is not None}
        lines = [
            f"{len(busy)} thread(s) used CPU during the test; the limit is {max_threads} "
            f"(from {source}).",
            f"Counted: OS threads of this process, native ones included, that used at least "
            f"{self.min_cpu_ms:g} ms of CPU and at least {self.min_share:.0%} of the busiest "
            f"thread's CPU (sampled every {self.interval:g} s; the sampler is not counted).",
        ]
        for item in busy:
            kind = "Python thread" if item.tid in python_ids else "native thread"
            lines.append(f"  tid {item.tid:<8} {item.name:<28} {item.cpu_ms:9.1f} ms CPU  ({kind})")
        counted = {b.tid for b in busy}
        quiet = sorted((t for t in grown if t.tid not in counted), key=lambda t: -t.grown_ns)
        if quiet:
            shown = ", ".join(f"{t.name} {t.grown_ns / 1e6:.1f} ms" for t in quiet[:5])
            more = f" and {len(quiet) - 5} more" if len(quiet) > 5 else ""
            lines.append(f"  below the threshold, not counted: {shown}{more}")
        gap = self._sampling_gap(busy)
        if gap is not None:
            lines.append(gap)
        lines.append(
            f"Peak OS threads alive: {self._peak} ({self._at_start} when the test started)."
        )
        if self._busy_at_start:
            names = ", ".join(f"tid {tid} {comm}" for tid, comm in self._busy_at_start)
            lines.append(
                f"Still using CPU when the test started, after waiting {self._settled_s:.2f} s "
                f"for them to go quiet: {names}."
            )
        lines.append("Native thread pools loaded:")
        lines.extend(f"  {line}" for line in _pool_lines())
        lines.append(
            "Native pools start one thread per CPU by default. Size them before they load "
            "(`threadbudget run --threads N -- pytest ...`, or threadbudget.apply_plan() in "
            "conftest.py before importing them), or limit them in the test."
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return f"<ThreadSampler {state} interval={self.interval:g} peak_threads={self._peak}>"


def _pool_lines() -> list[str]:
    from ._controllers import registered_controllers

    lines: list[str] = []
    for controller in registered_controllers():
        try:
            # threadpoolctl warns about some library mixes; in a project that turns warnings
            # into errors, that must not cost the report its list of pools.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pools = controller.pools()
        except Exception as error:  # the report must come out even if a controller breaks
            lines.append(f"{controller.name}: could not be listed ({error!r})")
            continue
        lines.extend(_describe_pool(controller.name, pool) for pool in pools)
    return lines or ["none found (threadpoolctl sees no BLAS or OpenMP library; no torch)"]


def _describe_pool(controller: str, pool: Mapping[str, Any]) -> str:
    label = str(pool.get("prefix") or pool.get("library") or controller)
    apis = [str(pool[key]) for key in ("internal_api", "user_api") if pool.get(key)]
    if apis:
        label += f" ({', '.join(dict.fromkeys(apis))})"
    details = [
        f"{key}={pool[key]}"
        for key in ("num_threads", "num_interop_threads", "threading_layer", "version")
        if pool.get(key) is not None
    ]
    return f"{label}: {', '.join(details)}"


# -- settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Value:
    value: Any
    source: str  # e.g. "--max-threads on the command line", "@pytest.mark.max_threads(2)"


@dataclass(frozen=True)
class _Settings:
    limit: _Value | None
    interval: _Value


_SETTINGS = pytest.StashKey[_Settings]()
_ITEM_LIMIT = pytest.StashKey[_Value]()


def _parse_max_threads(raw: str) -> int:
    text = raw.strip()
    if not _WHOLE.fullmatch(text) or int(text) < 1:
        raise ValueError("must be a whole number >= 1")
    return int(text)


def _parse_interval(raw: str) -> float:
    text = raw.strip()
    value = float(text) if _DECIMAL.fullmatch(text) else math.nan
    if not _MIN_INTERVAL <= value <= _MAX_INTERVAL:
        raise ValueError(
            f"must be a number of seconds between {_MIN_INTERVAL:g} and {_MAX_INTERVAL:g}"
        )
    return value


def _resolve(
    config: pytest.Config, cli: str, env: str, ini: str, parse: Callable[[str], object]
) -> _Value | None:
    """The first of command line, environment and ini file that sets the value, validated."""
    overrides = config.getoption("override_ini", None) or []
    if any(item.partition("=")[0].strip() == ini for item in overrides):
        ini_where, ini_preposition = "-o/--override-ini", "given with"
    elif config.inipath:
        ini_where, ini_preposition = f"ini file {config.inipath}", "in the"
    else:
        ini_where, ini_preposition = "ini options", "in the"
    candidates = (
        (config.getoption(cli.lstrip("-").replace("-", "_")), cli, "command line", "on the"),
        (os.environ.get(env), env, "environment", "in the"),
        (config.getini(ini), ini, ini_where, ini_preposition),
    )
    for raw, name, where, preposition in candidates:
        # An empty value is unset: CI templates often export VAR="" for "no value".
        if raw is None or not str(raw).strip():
            continue
        try:
            return _Value(parse(str(raw)), f"{name} {preposition} {where}")
        except ValueError as error:
            raise pytest.UsageError(f"{name}={str(raw)!r} ({where}): {error}") from None
    return None


def _marker_limit(item: pytest.Item) -> _Value | None:
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    args = marker.args
    valid = not marker.kwargs and len(args) == 1
    if valid and args[0] is None:
        return _Value(None, f"@pytest.mark.{MARKER}(None)")
    if valid and isinstance(args[0], int) and not isinstance(args[0], bool) and args[0] >= 1:
        return _Value(args[0], f"@pytest.mark.{MARKER}({args[0]})")
    shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in marker.kwargs.items())])
    pytest.fail(
        f"@pytest.mark.{MARKER}({shown}) on {item.nodeid}: takes one whole number >= 1, "
        "or None to turn the check off for this test",
        pytrace=False,
    )


# -- hooks ---------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("threadbudget", "thread counts (threadbudget)")
    group.addoption(
        CLI_MAX_THREADS,
        metavar="N",
        default=None,
        help=(
            "fail each test whose call phase ran more than N OS threads that used CPU, native "
            f"threads included (env {ENV_MAX_THREADS}, ini {INI_MAX_THREADS}; "
            f"@pytest.mark.{MARKER}(N) overrides it per test)"
        ),
    )
    group.addoption(
        CLI_SAMPLE_INTERVAL,
        metavar="SECONDS",
        default=None,
        help=(
            f"seconds between samples of the threads (default {DEFAULT_INTERVAL:g}; env "
            f"{ENV_SAMPLE_INTERVAL}, ini {INI_SAMPLE_INTERVAL})"
        ),
    )
    if pytest.version_tuple[:2] >= (9, 2):
        # Native TOML ([tool.pytest]) keeps numbers as numbers; a "string" option rejects them.
        parser.addini(INI_MAX_THREADS, f"default of {CLI_MAX_THREADS}", int | str, default="")
        parser.addini(
            INI_SAMPLE_INTERVAL, f"default of {CLI_SAMPLE_INTERVAL}", float | str, default=""
        )
    else:
        parser.addini(INI_MAX_THREADS, f"default of {CLI_MAX_THREADS}", default="")
        parser.addini(INI_SAMPLE_INTERVAL, f"default of {CLI_SAMPLE_INTERVAL}", default="")


def pytest_configure(config: pytest.Config) -> None:
    # Registered unconditionally so that --strict-markers accepts the marker in any run.
    config.addinivalue_line(
        "markers",
        f"{MARKER}(n): fail the test when more than n OS threads (native included) used CPU "
        "during its call phase; None turns a global limit off for this test (threadbudget)",
    )
    limit = _resolve(config, CLI_MAX_THREADS, ENV_MAX_THREADS, INI_MAX_THREADS, _parse_max_threads)
    interval = _resolve(
        config, CLI_SAMPLE_INTERVAL, ENV_SAMPLE_INTERVAL, INI_SAMPLE_INTERVAL, _parse_interval
    ) or _Value(DEFAULT_INTERVAL, "default")
    config.stash[_SETTINGS] = _Settings(limit, interval)


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or settings.limit is None:
        return None
    try:
        from ._detect import detect_budget

        budget = detect_budget(emit_warnings=False)
        detected = f"CPU budget {budget.budget} (bound by {budget.binding})"
    except Exception as error:  # the header is informational; never stop the run for it
        detected = f"CPU budget unknown ({error!r})"
    line = (
        f"threadbudget: max_threads {settings.limit.value} (from {settings.limit.source}); "
        f"sample interval {settings.interval.value:g} s ({settings.interval.source}); {detected}"
    )
    if not _AVAILABLE:
        line += f"; thread counts unavailable here (no {_TASKS}), so nothing is checked"
    return [line]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Resolved here so that a bad marker is an error at setup, before the test runs.
    limit = _marker_limit(item)
    if limit is None:
        settings = item.config.stash.get(_SETTINGS, None)
        limit = settings.limit if settings is not None else None
    if limit is not None and limit.value is not None:
        item.stash[_ITEM_LIMIT] = limit


# trylast: the innermost wrapper, so other plugins' work around the call is not measured.
@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    limit = item.stash.get(_ITEM_LIMIT, None)
    if limit is None or not _AVAILABLE:
        return (yield)
    settings = item.config.stash[_SETTINGS]
    sampler = ThreadSampler(settings.interval.value)
    sampler.start()
    try:
        result = yield
    finally:
        sampler.stop()
    # Only a test that passed is judged: its own failure says more than a thread count.
    busy = sampler.busy_threads
    if len(busy) > limit.value:
        pytest.fail(sampler.report(limit.value, limit.source), pytrace=False)
    gap = sampler._sampling_gap(busy)
    if gap is not None:
        item.warn(
            ThreadSamplingWarning(
                f"{len(busy)} thread(s) counted against the limit of {limit.value} (from "
                f"{limit.source}); {gap}"
            )
        )
    return result


@pytest.fixture
def thread_budget_sampler(request: pytest.FixtureRequest) -> Iterator[ThreadSampler]:
    """A started :class:`ThreadSampler`; read ``.busy_threads``, ``.peak_threads``, ``.check(n)``.

    Its window opens when the fixture is set up (call ``.reset()`` to open it later, e.g.
    after a warm-up) and closes at teardown; its interval follows the plugin's settings.
    """
    if not _AVAILABLE:
        pytest.skip(f"thread_budget_sampler needs {_TASKS} (Linux)")
    settings = request.config.stash.get(_SETTINGS, None)
    interval = settings.interval.value if settings is not None else DEFAULT_INTERVAL
    sampler = ThreadSampler(interval).start()
    try:
        yield sampler
    finally:
        sampler.stop()
