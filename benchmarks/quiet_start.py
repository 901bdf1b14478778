"""Why coordination.py waits for quiet workers: a cell started beside a pool that still spins.

Run ``python benchmarks/quiet_start.py [--rounds 8] [--workload numpy]`` (about 1 minute for
numpy on 2 CPUs).

Two of ``coordination.py``'s live worker processes, deployed exactly as there: the C=1 T=2
split (the whole budget per request, the libraries' default spin after a call) and elastic
slots (passive waiting). In every round the split runs a cell of lone requests, then elastic
runs one *right after* it (only the capacity probe between them, as coordination.py ran before
it waited); then the split runs again, the parent waits as coordination.py now does
(``wait_until_quiet``: the two processes use under a tenth of a core over 50 ms), probes, and
elastic runs one *after quiet*. Printed per condition, the median over rounds: elastic's p50
and p99 (within each cell), the mean of its first dozen requests over the median of the rest,
and how long the wait took.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import coordination  # this directory is on sys.path when run as a script

FIRST = 12  # requests at the start of a cell that a predecessor's spinning pool can reach


def describe(cell: dict[str, Any], settle_s: float) -> dict[str, float]:
    latencies = [v / 1000 for v in cell["latencies_us"]]  # in issue order at one client
    head = min(FIRST, len(latencies) // 2)  # --quick cells of MiniLM hold only 8
    return {
        "p50": statistics.median(latencies),
        "p99": coordination.percentile(latencies, 99),
        "first": statistics.mean(latencies[:head]) / statistics.median(latencies[head:]),
        "settle": settle_s * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workload", choices=("numpy", "minilm"), default="numpy")
    parser.add_argument("--quick", action="store_true", help="coordination.py's --quick sizes")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    from threadbudget import detect_budget

    budget = detect_budget().budget
    split_mode = coordination.Mode(f"static-{budget}", "static", budget)
    split = coordination.Worker(args.workload, split_mode, budget, args.quick)
    elastic_mode = coordination.Mode("elastic", "elastic")
    elastic = coordination.Worker(args.workload, elastic_mode, budget, args.quick)
    workers = (split, elastic)
    results: dict[str, list[dict[str, float]]] = {"right after": [], "after quiet": []}
    try:
        if not all((w.next_record(600) or {}).get("kind") == "ready" for w in workers):
            print("a worker did not start", file=sys.stderr)
            return 1
        pids = [w.process.pid for w in workers]
        reference = min(coordination.capacity_probe() for _ in range(5))
        for round_no in range(args.rounds):
            for condition, settle in (("right after", False), ("after quiet", True)):
                coordination.wait_until_quiet(pids)  # the split's cell starts quiet either way
                split.ask(f"cell 1 {round_no}", 600)
                settle_s = coordination.wait_until_quiet(pids) if settle else 0.0
                coordination.wait_for_capacity(reference)
                cell = elastic.ask(f"cell 1 {round_no}", 600)
                if cell is None or cell.get("kind") != "cell":
                    print("elastic's worker gave no cell", file=sys.stderr)
                    return 1
                results[condition].append(describe(cell, settle_s))
            line = "  ".join(
                f"{c}: p99 {r[-1]['p99']:.1f} ms, first {FIRST} {r[-1]['first']:.2f}x"
                for c, r in results.items()
            )
            print(f"[round {round_no + 1}/{args.rounds}] {line}", flush=True)
    finally:
        for worker in workers:
            worker.close()

    print()
    print(
        f"| elastic's cell of lone {args.workload} requests | p50 ms | p99 ms | "
        f"first {FIRST} / the rest | waited for quiet, ms |"
    )
    print("|---|---:|---:|---:|---:|")
    for condition, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"| {condition} {split_mode.label(budget)} | {median['p50']:.2f} | "
            f"{median['p99']:.2f} | {median['first']:.2f} | {median['settle']:.0f} |"
        )
    # The two cells of a round ran seconds apart: their ratio is the paired comparison.
    paired = [
        after["p99"] / quiet["p99"]
        for after, quiet in zip(results["right after"], results["after quiet"], strict=True)
    ]
    higher = sum(ratio > 1 for ratio in paired)
    print()
    print(
        f"p99 right after / after quiet, per round: median {statistics.median(paired):.2f} "
        f"[{min(paired):.2f}-{max(paired):.2f}]; higher right after in {higher} of "
        f"{len(paired)} rounds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
