"""The slot-overhead measurement of ``benchmarks/coordination.py``: interleaved repeats, the
lock yardstick and the table read against it."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter

from .scripts import BENCHMARKS, load_benchmark, run_benchmark


def test_every_pool_is_timed_once_per_repeat_and_leads_in_turn() -> None:
    bench = load_benchmark()
    names = ["a", "b", "c"]
    orders = bench._rotated(names, 7)
    assert len(orders) == 7
    assert all(sorted(order) == names for order in orders)
    assert [order[0] for order in orders] == ["a", "b", "c", "a", "b", "c", "a"]
    # Over one full cycle each pool holds each position once.
    for position in range(len(names)):
        assert Counter(order[position] for order in orders[:3]) == Counter(names)


def test_the_worker_reports_every_repeat_of_every_pool_and_the_yardstick() -> None:
    bench = load_benchmark()
    done = run_benchmark(
        "coordination.py", "--overhead-worker", "bare", "--budget", "2", "--quick", timeout=300
    )
    assert done.returncode == 0, done.stderr
    records = [
        json.loads(line[len(bench.MARK) :])
        for line in done.stdout.splitlines()
        if line.startswith(bench.MARK)
    ]
    [record] = [r for r in records if r["kind"] == "overhead"]
    repeats = bench.QUICK.overhead_repeats
    assert record["repeats"] == repeats
    assert record["variant"] == "bare"
    assert record["numpy_loaded"] is False
    pools = [r["pool"] for r in record["results"]]
    assert pools[0] == bench.YARDSTICK
    assert {"TokenPool (plain)", "CpuSlots elastic (grant = whole budget)"} <= set(pools)
    for result in record["results"]:
        for key in ("sync", "async"):
            runs = result[f"{key}_runs_us"]
            assert len(runs) == repeats
            assert all(math.isfinite(v) and v > 0 for v in runs)
            assert result[f"{key}_us"] == statistics.median(runs)


def _variant(name: str, yardstick: str | None, yardstick_us: float = 0.5) -> dict[str, object]:
    results = [{"pool": "TokenPool (plain)", "sync_us": 3.0, "async_us": 8.0}]
    if yardstick is not None:
        results.insert(0, {"pool": yardstick, "sync_us": yardstick_us, "async_us": 2.0})
    return {"variant": name, "repeats": 15, "loop_us": 0.02, "results": results}


def test_the_table_divides_each_pool_by_the_yardstick_of_its_own_process() -> None:
    bench = load_benchmark()
    lines = bench._overhead_table(
        [_variant("bare", bench.YARDSTICK, 0.5), _variant("numpy", bench.YARDSTICK, 0.6)]
    )
    text = "\n".join(lines)
    assert "| process | pool | sync us | async us | sync x ys | async x ys |" in text
    assert "15 short repeats" in text
    assert "| no numpy, no torch | TokenPool (plain) | 3.00 | 8.00 | 6.0 | 4.0 |" in text
    assert "| numpy loaded | TokenPool (plain) | 3.00 | 8.00 | 5.0 | 4.0 |" in text
    assert "units of a lock taken in Python" in text


def test_a_run_saved_before_the_yardstick_keeps_its_microseconds_alone() -> None:
    bench = load_benchmark()
    mixed = bench._overhead_table([_variant("bare", bench.YARDSTICK), _variant("numpy", None)])
    assert "| process | pool | sync us | async us |" in mixed
    assert "x ys" not in "\n".join(mixed)
    saved = json.loads(
        (BENCHMARKS / "results" / "coordination-2026-12-04-control.json").read_text()
    )
    old = "\n".join(bench._overhead_table(saved["overhead"]))
    assert "x ys" not in old
    assert "short repeats" not in old
    assert "| numpy loaded | CpuSlots elastic (grant = whole budget) |" in old
