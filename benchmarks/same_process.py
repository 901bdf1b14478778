"""Elastic against every static split inside one process: the policy alone, the host paired out.

Run ``python benchmarks/same_process.py [--workloads numpy,minilm] [--rounds 10] [--out DIR]``
(defaults: about 12 minutes on 2 CPUs).

``coordination.py`` compares deployments: each mode is its own process with its own plan, as a
service would run it. On a shared host that comparison carries two noises besides the policy:
the host's speed drifts between cells measured seconds apart, and two processes of the *same*
configuration differ by a few per cent (its ``--control`` run measures both). This script
measures what is left when both are taken out. One process per workload, deployed as elastic
is (the plan for ``budget`` requests at once applied before numpy and torch load), holds one
``CpuSlots`` per policy: every static split of ``coordination.py``'s grid and the elastic
default. At each concurrency the pools take short blocks in turn, the order rotated from round
to round, so each round compares the policies within a second or two of each other, on the
same native libraries, the same memory and the same threads. Between blocks the next pool
resets the process-wide pools to its resting size (``NativeThreadLimits.refresh``), as it would
find them in a process of its own.

For each concurrency it prints elastic's throughput against the best static split's (the ratio
of the totals and the median of the per-round ratios), the p99 ratio over the pooled latencies,
and under saturation the p99 / p50 of the pooled slot waits of elastic and of that split. It
answers "does the elastic rule choose as well as the best fixed split?", not "does a service
deployed for elastic slots run as fast as one deployed for a fixed split?", which is
``coordination.py``'s question.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

Json = dict[str, Any]
HERE = Path(__file__).resolve().parent
MARK = "@@same_process "


def coordination() -> ModuleType:
    """``coordination.py`` as a module: its workloads, closed loop and statistics are reused."""
    spec = importlib.util.spec_from_file_location("coordination", HERE / "coordination.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while a class is built
    spec.loader.exec_module(module)
    return module


def block_requests(workload: str, level: int) -> int:
    """Measured requests per block: short, so the policies alternate within seconds."""
    return max(4 * level, 40) if workload == "numpy" else max(level, 8)


def worker_main(workload: str, budget: int, rounds: int) -> int:
    bench = coordination()
    import threadbudget

    threadbudget.apply_plan(threadbudget.make_plan(budget, concurrency=budget))
    pools: dict[str, Any] = {
        f"static-{t}": threadbudget.CpuSlots(budget, policy="static", threads=t)
        for t in bench.static_grid(budget)
    }
    pools["elastic"] = threadbudget.CpuSlots(budget)
    labels = {key: bench.mode_from_key(key).label(budget) for key in pools}
    request = bench.load_workload(workload)
    names = list(pools)
    for pool in pools.values():  # lazy imports, native setters, then the pools' threads
        pool.native_limits.refresh()
        bench.run_cell(request, pool.slot, 1, 3, 60.0)
        bench.run_cell(request, pool.slot, budget, 2 * budget, 60.0)
    turn = 0
    for level in bench.LEVELS:
        blocks: list[Json] = []
        for round_no in range(rounds):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                pool = pools[name]
                pool.native_limits.refresh()
                before = dict(pool.snapshot().grants_by_size)
                cell = bench.run_cell(
                    request, pool.slot, level, block_requests(workload, level), 60.0
                )
                after = pool.snapshot().grants_by_size
                cell["grants_by_size"] = {
                    str(k): n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)
                }
                blocks.append({"pool": name, "round": round_no, **cell})
            turn += 1
        record = {"workload": workload, "concurrency": level, "labels": labels, "blocks": blocks}
        print(MARK + json.dumps(record), flush=True)
        print(f"{workload} N={level}: {len(blocks)} blocks", file=sys.stderr, flush=True)
    return 0


def summarise(record: Json, budget: int, percentile: Any) -> Json:
    """Totals, pooled percentiles and paired per-round ratios of one (workload, level)."""
    by_pool: dict[str, list[Json]] = {}
    for block in record["blocks"]:
        by_pool.setdefault(block["pool"], []).append(block)

    def stats(blocks: list[Json]) -> Json:
        latencies = [v / 1000 for b in blocks for v in b["latencies_us"]]
        waits = [v / 1000 for b in blocks for v in b["waits_us"]]
        wait_p50 = percentile(waits, 50)
        grants: dict[str, int] = {}
        for b in blocks:
            for size, n in b["grants_by_size"].items():
                grants[size] = grants.get(size, 0) + n
        return {
            # Completions over time, summed over the blocks: every block weighs by its length.
            "throughput": sum(b["throughput"] * b["elapsed_s"] for b in blocks)
            / sum(b["elapsed_s"] for b in blocks),
            "by_round": {b["round"]: b["throughput"] for b in blocks},
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "wait_spread": percentile(waits, 99) / wait_p50 if wait_p50 > 0 else float("nan"),
            "grants": grants,
        }

    pools = {name: stats(blocks) for name, blocks in by_pool.items()}
    statics = {name: s for name, s in pools.items() if name.startswith("static-")}
    best_name = max(statics, key=lambda name: statics[name]["throughput"])
    best, elastic = statics[best_name], pools["elastic"]
    per_round = [
        elastic["by_round"][r] / best["by_round"][r]
        for r in sorted(elastic["by_round"])
        if r in best["by_round"]
    ]
    return {
        "workload": record["workload"],
        "concurrency": record["concurrency"],
        "best_static": record["labels"][best_name],
        "pools": {record["labels"][name]: s for name, s in pools.items()},
        "throughput_ratio": elastic["throughput"] / best["throughput"],
        "round_ratio_median": statistics.median(per_round),
        "round_ratios": per_round,
        "p99_ratio": elastic["p99_ms"] / best["p99_ms"],
        "saturated": record["concurrency"] > budget,
        "elastic_wait_spread": elastic["wait_spread"],
        "best_wait_spread": best["wait_spread"],
    }


def render(report: Json) -> str:
    lines = [
        f"# Elastic against the static splits in one process, {report['started_at']}",
        "",
        f"Budget {report['budget']}; {report['rounds']} rounds of one short block per policy at "
        "each concurrency (numpy: max(4N, 40) measured requests a block, MiniLM: max(N, 8)), "
        "the order rotated from round to round; one process per workload, deployed as elastic "
        "is. Throughput: completions over time summed over a policy's blocks; per round: "
        "elastic's block over the best static's in the same round. p99 and the waits' "
        f"p99 / p50: pooled over all blocks. Wall time {report['wall_s'] / 60:.1f} min.",
    ]
    for workload in report["workloads"]:
        lines += [
            "",
            f"## {workload}",
            "",
            "| N | best static | req/s ratio (totals) | per round: median [min-max] "
            "| p99 ratio | wait p99/p50: elastic | the best static | elastic grants |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for s in report["summaries"]:
            if s["workload"] != workload:
                continue
            grants = s["pools"]["elastic"]["grants"]
            spreads = (
                f"{s['elastic_wait_spread']:.2f} | {s['best_wait_spread']:.2f}"
                if s["saturated"]
                else " | "
            )
            lines.append(
                f"| {s['concurrency']} | {s['best_static']} | {s['throughput_ratio']:.3f} "
                f"| {s['round_ratio_median']:.3f} [{min(s['round_ratios']):.2f}-"
                f"{max(s['round_ratios']):.2f}] | {s['p99_ratio']:.2f} | {spreads} "
                f"| {' '.join(f'{k}:{v}' for k, v in sorted(grants.items()))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workloads", default="numpy,minilm", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=0, help="override the detected budget")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + .md")
    parser.add_argument("--worker", metavar="WORKLOAD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be a whole number >= 1, got {args.rounds}")
    bench = coordination()
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(workloads) - set(bench.WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    from threadbudget import detect_budget

    budget = args.budget or detect_budget().budget
    if args.worker:
        return worker_main(args.worker, budget, args.rounds)

    started_at = datetime.now(UTC)
    records: list[Json] = []
    for workload in workloads:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", workload]
        command += [f"--budget={budget}", f"--rounds={args.rounds}"]
        done = subprocess.run(
            command, env=bench.base_env(), stdout=subprocess.PIPE, text=True, check=False
        )
        if done.returncode != 0:
            print(f"{workload}: worker exited {done.returncode}", file=sys.stderr)
            return 1
        records += [
            json.loads(line.removeprefix(MARK))
            for line in done.stdout.splitlines()
            if line.startswith(MARK)
        ]
    report = {
        "benchmark": "same_process",
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": (datetime.now(UTC) - started_at).total_seconds(),
        "budget": budget,
        "rounds": args.rounds,
        "workloads": workloads,
        "summaries": [summarise(r, budget, bench.percentile) for r in records],
        "raw": records,
    }
    markdown = render(report)
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"same_process-{started_at:%Y-%m-%d}"
    (out / f"{stem}.json").write_text(json.dumps(report) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(f"wrote {out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
