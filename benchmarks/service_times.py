"""Where a saved coordination run's slot-wait spread comes from: the service times under it.

Run ``python benchmarks/service_times.py benchmarks/results/coordination-....json
[--workload numpy] [--clients 4]`` (reads the report's raw cells; runs nothing).

At C clients on a budget of B one-thread slots, a waiting request is served when one of the B
requests ahead of it ends, so its wait is about one service time and the waits spread as the
service times do. This prints, for each slot mode of every saturated cell (clients > budget),
the medians over rounds of:

* the cell's median service time (with the slowest and fastest round: how far the host's speed
  moved between rounds);
* the spread of service times and of waits (p99 / p50 within a round, as the report's wait
  target is computed), and how closely the two follow each other over every slot mode's rounds
  of one cell (Spearman's rank correlation);
* the first requests of the measured window over the median of the rest: elastic grants the
  whole budget once as a run starts (inside the warm-up, which is not measured) and lowers the
  process-wide pools again on the next grant; a cost of that move would show up here;
* the share of slow requests (slower than ``--slow`` x the round's median) and how many of them
  sit next to another slow one in completion order, against what the same number placed at
  random would give: slow requests that come in runs are a transient event (another guest of
  the host), not a cost every request of the policy pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import coordination  # this directory is on sys.path when run as a script

HEAD = 8  # requests at the start of the measured window


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (nan for fewer than 3 pairs or a constant side)."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} values against {len(ys)}")
    if len(xs) < 3:
        return float("nan")
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx > 0 and vy > 0 else float("nan")


def slow_runs(service_us: Sequence[float], slow: float) -> tuple[int, int, float]:
    """(slow requests, slow ones next to another slow one, the expected count of the latter if
    the same number were placed at random) in one round, in completion order."""
    n = len(service_us)
    threshold = slow * statistics.median(service_us)
    flags = [v > threshold for v in service_us]
    count = sum(flags)
    neighboured = sum(
        1
        for i, flag in enumerate(flags)
        if flag and ((i > 0 and flags[i - 1]) or (i + 1 < n and flags[i + 1]))
    )
    if count < 2 or n < 3:
        return count, neighboured, 0.0
    # Placed at random, a slow request sits inside (two neighbours) with probability
    # (n - 2) / n and at an edge (one) otherwise; the other count - 1 fill n - 1 places.
    both_fast = (n - count) * (n - count - 1) / ((n - 1) * (n - 2))
    edge_slow = (count - 1) / (n - 1)
    expected = count * ((n - 2) / n * (1 - both_fast) + 2 / n * edge_slow)
    return count, neighboured, expected


def describe_round(run: dict[str, Any], slow: float) -> dict[str, float]:
    service = [float(v) for v in run["service_us"]]
    waits = [float(v) for v in run["waits_us"]]
    head = min(HEAD, len(service) // 2)
    count, neighboured, expected = slow_runs(service, slow)
    return {
        "service_ms": statistics.median(service) / 1000,
        # The report's own p99 / p50 (nan where the median is 0), so the figures match it.
        "service_spread": coordination._spread(service),
        "wait_spread": coordination._spread(waits),
        "head": statistics.median(service[:head]) / statistics.median(service[head:]),
        "slow": count / len(service),
        "neighboured": neighboured,
        "slow_count": count,
        "expected": expected,
    }


def saturated_cells(
    report: dict[str, Any], workload: str | None, clients: int | None
) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """Rounds of every slot mode's saturated cells, by (workload, clients, mode)."""
    budget = int(report["machine"]["budget"])
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in report["raw_cells"]:
        if run.get("kind") != "cell" or "grants_by_size" not in run:
            continue  # no slots in default and omp1: they have no waits to explain
        if run["concurrency"] <= budget:
            continue
        if workload is not None and run["workload"] != workload:
            continue
        if clients is not None and run["concurrency"] != clients:
            continue
        cells.setdefault((run["workload"], run["concurrency"], run["mode"]), []).append(run)
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("report", type=Path, help="a coordination.py run's .json")
    parser.add_argument("--workload", choices=("numpy", "minilm"))
    parser.add_argument("--clients", type=int, help="one concurrency level (default: all)")
    parser.add_argument(
        "--slow", type=float, default=1.4, help="slow: over this x the round's median (1.4)"
    )
    args = parser.parse_args(argv)
    if args.slow <= 1:
        parser.error(f"--slow must be above 1, got {args.slow}")
    try:
        report = json.loads(args.report.read_text())
        cells = saturated_cells(report, args.workload, args.clients)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{args.report}: not a coordination.py report ({error!r})", file=sys.stderr)
        return 1
    if not cells:
        print(f"{args.report}: no saturated slot cells match", file=sys.stderr)
        return 1

    print(
        "| workload | N | mode | rounds | median service ms [fastest-slowest round] | "
        "service p99/p50 | wait p99/p50 | first "
        f"{HEAD} / the rest | slow (>{args.slow:g}x) | slow next to slow: seen / at random |"
    )
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|")
    spreads: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for (workload, clients, mode), runs in sorted(cells.items()):
        rounds = [describe_round(run, args.slow) for run in runs]
        spreads.setdefault((workload, clients), []).extend(
            (r["service_spread"], r["wait_spread"]) for r in rounds
        )
        speeds = [r["service_ms"] for r in rounds]

        def median(key: str, rounds: list[dict[str, float]] = rounds) -> float:
            return statistics.median(r[key] for r in rounds)

        seen = sum(r["neighboured"] for r in rounds)
        expected = sum(r["expected"] for r in rounds)
        print(
            f"| {workload} | {clients} | {mode} | {len(rounds)} | "
            f"{median('service_ms'):.1f} [{min(speeds):.1f}-{max(speeds):.1f}] | "
            f"{median('service_spread'):.2f} | {median('wait_spread'):.2f} | "
            f"{median('head'):.2f} | {100 * median('slow'):.1f} % | "
            f"{seen} of {sum(int(r['slow_count']) for r in rounds)} / {expected:.0f} |"
        )
    print()
    print("Wait spread against service spread, every slot mode's rounds of a cell together:")
    for (workload, clients), pairs in sorted(spreads.items()):
        service, waits = zip(*pairs, strict=True)
        print(
            f"  {workload} at {clients} clients: Spearman {spearman(service, waits):.2f} "
            f"over {len(pairs)} rounds"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
