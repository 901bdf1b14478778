"""How long a slot stands empty when it passes from one holder to a queued thread.

Run ``python benchmarks/handoff.py [--levels 2,3,4,32] [--rounds 3] [--seconds 5] [--pin]
[--policies static,elastic]`` (about a minute on 2 CPUs; each pinning and policy adds one).

N threads in a closed loop each hash 8 MiB (hashlib releases the GIL, as a native kernel does)
inside a slot of a static ``TokenPool(budget)``, one token per request, so at most ``budget``
run at once and the others queue. The pool's public ``on_exit`` hook stamps each release and
``on_enter`` each grant. The **hand-off gap** is a grant's start minus the latest release
before it. From N = budget + 1 up, nearly every grant goes to a thread that was parked in the
queue, so the gap is what waking it costs: the kernel running it again and the GIL coming back
to it. Printed per level: the cores the process used (median over rounds), how much of the
time the slots were held, the gap's p50, p90 and p99 over all rounds, and how long the client
threads stood runnable on a run queue without a CPU, per request (the kernel's own count, from
``/proc/self/task/<tid>/schedstat``; blank where the kernel does not keep it). At N = budget
nobody queues; it is the reference.

``--pin`` runs every level a second time with each slot's thread pinned to CPUs of its own while
it holds the slot (``sched_setaffinity`` in the hooks; one CPU per token), which tells a wake-up
put on a busy CPU's queue apart from one that is slow for other reasons.

``--policies static,elastic`` runs every level under each policy in turn, in the same rounds.
Elastic grants a lone thread the whole budget and one token each once the queue is long; with
the same grants the two differ only in the pool's own work at each grant and release (the
elastic rule and its demand tracking), so the cores used and the gaps side by side say whether
that work leaves a CPU idle.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal, cast, get_args

from coordination import parse_levels  # this directory is on sys.path when run as a script

Policy = Literal["static", "elastic"]  # TokenPool's policy argument

DATA = bytes(8 << 20)


@dataclass
class Cell:
    """What one level measured in one round."""

    cores: float
    held: float  # share of the slots' time they were held
    gaps: list[float]  # microseconds from a release to the next grant
    queued_ms: float | None  # run-queue wait per request, None where unknown


def run_queue_ns() -> int | None:
    """Nanoseconds this thread has spent runnable but not running, per the kernel."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as stat:
            return int(stat.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


def run_cell(
    budget: int, clients: int, seconds: float, *, pin: bool = False, policy: Policy = "static"
) -> Cell:
    import threadbudget

    clock = time.perf_counter
    last_release = [0.0]
    gaps: list[float] = []
    held = [0.0]
    every_cpu = sorted(os.sched_getaffinity(0)) if pin else []
    free_cpus = every_cpu[:budget]
    cpus_lock = threading.Lock()

    def entered(k: int) -> tuple[float, list[int]]:
        now = clock()
        if last_release[0]:
            gaps.append((now - last_release[0]) * 1e6)  # list.append is atomic under the GIL
        mine: list[int] = []
        if pin:
            with cpus_lock:
                mine = [free_cpus.pop() for _ in range(k)]
            os.sched_setaffinity(0, mine)
        return now, mine

    def leaving(restore: object) -> None:
        since, mine = cast(tuple[float, list[int]], restore)
        if mine:
            os.sched_setaffinity(0, every_cpu)
            with cpus_lock:
                free_cpus.extend(mine)
        now = clock()
        held[0] += now - since
        last_release[0] = now

    pool = threadbudget.TokenPool(budget, policy=policy, on_enter=entered, on_exit=leaving)
    deadline = clock() + seconds
    # One (requests, run-queue ns or None) per client; list.append is atomic, `+=` is not.
    per_client: list[tuple[int, int | None]] = []

    def client() -> None:
        queued_before = run_queue_ns()
        done = 0
        while clock() < deadline:
            with pool.slot():
                hashlib.sha256(DATA).digest()
            done += 1
        queued_after = run_queue_ns()
        if queued_before is None or queued_after is None:
            per_client.append((done, None))
        else:
            per_client.append((done, queued_after - queued_before))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu_started, started = time.process_time(), clock()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = clock() - started
    cores = (time.process_time() - cpu_started) / elapsed
    requests = sum(done for done, _ in per_client)
    queued = [ns for _, ns in per_client if ns is not None]
    queued_ms = sum(queued) / 1e6 / requests if requests and len(queued) == clients else None
    return Cell(cores, held[0] / (budget * elapsed), gaps, queued_ms)


def parse_policies(text: str) -> list[Policy]:
    known = get_args(Policy)
    policies = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in policies if p not in known]
    if not policies or unknown:
        raise argparse.ArgumentTypeError(
            f"policies must be a comma-separated list of {', '.join(known)}, got {text!r}"
        )
    if len(set(policies)) != len(policies):
        raise argparse.ArgumentTypeError(f"a policy is named twice in {text!r}")
    return cast(list[Policy], policies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", type=parse_levels, default=[2, 3, 4, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one cell")
    parser.add_argument(
        "--pin", action="store_true", help="also run each level with slots pinned to CPUs"
    )
    parser.add_argument(
        "--policies",
        type=parse_policies,
        default=["static"],
        help="comma-separated pool policies to run side by side (default static)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")

    from threadbudget import detect_budget

    budget = detect_budget().budget
    if args.pin and len(os.sched_getaffinity(0)) < budget:
        parser.error(f"--pin needs {budget} CPUs in this process's affinity mask")
    variants = [
        (level, pin, policy)
        for level in args.levels
        for pin in ([False, True] if args.pin else [False])
        for policy in args.policies
    ]
    results: dict[tuple[int, bool, Policy], list[Cell]] = {variant: [] for variant in variants}
    for round_no in range(args.rounds):
        for level, pin, policy in variants:
            cell = run_cell(budget, level, args.seconds, pin=pin, policy=policy)
            results[level, pin, policy].append(cell)
        print(f"[round {round_no + 1}/{args.rounds}] done", flush=True)

    print()
    print(f"budget {budget}; {args.rounds} round(s) of {args.seconds:g} s per level")
    print(
        "| N | pinned | policy | cores used | slots held | hand-offs | gap p50 us | gap p90 us"
        " | gap p99 us | run-queue wait per request ms |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (level, pin, policy), cells in results.items():
        pinned = "yes" if pin else "no"
        gaps = sorted(g for cell in cells for g in cell.gaps)
        queued = [cell.queued_ms for cell in cells if cell.queued_ms is not None]
        queued_text = f"{statistics.median(queued):.2f}" if len(queued) == len(cells) else ""
        if not gaps:
            print(f"| {level} | {pinned} | {policy} | | | 0 | | | | {queued_text} |")
            continue
        quantiles = statistics.quantiles(gaps, n=100, method="inclusive") if len(gaps) > 1 else []
        p90, p99 = (quantiles[89], quantiles[98]) if quantiles else (gaps[0], gaps[0])
        print(
            f"| {level} | {pinned} | {policy} | {statistics.median(c.cores for c in cells):.2f} | "
            f"{statistics.median(c.held for c in cells):.1%} | {len(gaps)} | "
            f"{statistics.median(gaps):.0f} | {p90:.0f} | {p99:.0f} | {queued_text} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
