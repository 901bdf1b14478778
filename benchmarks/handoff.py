"""How long a slot stands empty when it passes from one holder to a queued thread.

Run ``python benchmarks/handoff.py [--levels 2,3,4,32] [--rounds 3] [--seconds 5]`` (about a
minute on 2 CPUs).

N threads in a closed loop each hash 8 MiB (hashlib releases the GIL, as a native kernel does)
inside a slot of a static ``TokenPool(budget)``, one token per request, so at most ``budget``
run at once and the others queue. The pool's public ``on_exit`` hook stamps each release and
``on_enter`` each grant. The **hand-off gap** is a grant's start minus the latest release
before it. From N = budget + 1 up, nearly every grant goes to a thread that was parked in the
queue, so the gap is what waking it costs: the kernel running it again and the GIL coming back
to it. Printed per level: the cores the process used (median over rounds), how much of the
time the slots were held, and the gap's p50, p90 and p99 over all rounds. At N = budget
nobody queues; it is the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import threading
import time

from coordination import parse_levels  # this directory is on sys.path when run as a script

DATA = bytes(8 << 20)


def run_cell(budget: int, clients: int, seconds: float) -> tuple[float, float, list[float]]:
    """(cores used, share of slot time held, hand-off gaps in microseconds)."""
    import threadbudget

    clock = time.perf_counter
    last_release = [0.0]
    gaps: list[float] = []
    held = [0.0]

    def entered(k: int) -> float:
        now = clock()
        if last_release[0]:
            gaps.append((now - last_release[0]) * 1e6)  # list.append is atomic under the GIL
        return now

    def leaving(since: object) -> None:
        now = clock()
        assert isinstance(since, float)
        held[0] += now - since
        last_release[0] = now

    pool = threadbudget.TokenPool(budget, on_enter=entered, on_exit=leaving)
    deadline = clock() + seconds

    def client() -> None:
        while clock() < deadline:
            with pool.slot():
                hashlib.sha256(DATA).digest()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu_started, started = time.process_time(), clock()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = clock() - started
    cores = (time.process_time() - cpu_started) / elapsed
    return cores, held[0] / (budget * elapsed), gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--levels", type=parse_levels, default=[2, 3, 4, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one cell")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")

    from threadbudget import detect_budget

    budget = detect_budget().budget
    results: dict[int, list[tuple[float, float, list[float]]]] = {n: [] for n in args.levels}
    for round_no in range(args.rounds):
        for level in args.levels:
            results[level].append(run_cell(budget, level, args.seconds))
        print(f"[round {round_no + 1}/{args.rounds}] done", flush=True)

    print()
    print(f"budget {budget}; {args.rounds} round(s) of {args.seconds:g} s per level")
    print("| N | cores used | slots held | hand-offs | gap p50 us | gap p90 us | gap p99 us |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for level, runs in results.items():
        gaps = sorted(g for _, _, run_gaps in runs for g in run_gaps)
        if not gaps:
            print(f"| {level} | | | 0 | | | |")
            continue
        quantiles = statistics.quantiles(gaps, n=100, method="inclusive") if len(gaps) > 1 else []
        p90, p99 = (quantiles[89], quantiles[98]) if quantiles else (gaps[0], gaps[0])
        print(
            f"| {level} | {statistics.median(r[0] for r in runs):.2f} | "
            f"{statistics.median(r[1] for r in runs):.1%} | {len(gaps)} | "
            f"{statistics.median(gaps):.0f} | {p90:.0f} | {p99:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
