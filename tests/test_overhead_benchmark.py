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


def _timed(variant: str, yardstick_us: float) -> dict[str, object]:
    bench = load_benchmark()
    return {
        "kind": "overhead",
        "variant": variant,
        "repeats": 15,
        "loop_us": 0.02,
        "results": [
            {"pool": bench.YARDSTICK, "sync_us": yardstick_us, "async_us": 1.0},
            {"pool": "CpuSlots elastic (grant = whole budget)", "sync_us": 3.0, "async_us": 7.0},
        ],
    }


class _Host:
    """Stands in for the overhead processes: each call returns the next yardstick of a script."""

    def __init__(self, yardsticks: dict[str, list[float]]) -> None:
        self.yardsticks = {name: list(speeds) for name, speeds in yardsticks.items()}
        self.calls: list[str] = []

    def __call__(self, variant: str) -> dict[str, object] | None:
        self.calls.append(variant)
        speeds = self.yardsticks[variant]
        return _timed(variant, speeds.pop(0)) if speeds else None


def test_a_process_timed_on_a_slowed_host_is_timed_again_and_the_faster_attempt_kept() -> None:
    bench = load_benchmark()
    host = _Host({"bare": [0.50], "numpy": [0.95, 0.52], "torch": [0.56]})
    kept, discarded = bench.time_overhead(host)
    assert host.calls == ["bare", "numpy", "torch", "numpy"]
    assert [r["variant"] for r in kept] == ["bare", "numpy", "torch"]
    assert [bench._yardstick_sync_us(r) for r in kept] == [0.50, 0.52, 0.56]
    assert [r["attempt"] for r in kept] == [1, 2, 1]
    [slow] = discarded
    assert (slow["variant"], slow["attempt"], bench._yardstick_sync_us(slow)) == ("numpy", 1, 0.95)


def test_a_host_that_stays_slow_gets_at_most_the_allowed_attempts_and_the_fastest_is_kept() -> None:
    bench = load_benchmark()
    host = _Host({"bare": [0.5], "numpy": [0.95, 0.80, 0.90, 0.51]})
    kept, discarded = bench.time_overhead(host, variants=("bare", "numpy"), attempts=3)
    assert host.calls.count("numpy") == 3  # the fourth, fast one is never asked for
    numpy = next(r for r in kept if r["variant"] == "numpy")
    assert (numpy["attempt"], bench._yardstick_sync_us(numpy)) == (2, 0.80)
    assert sorted(r["attempt"] for r in discarded) == [1, 3]


def test_processes_within_the_factor_are_timed_once() -> None:
    bench = load_benchmark()
    limit = bench.PROBE_SLOWDOWN
    host = _Host({"bare": [0.40], "numpy": [0.40 * limit], "torch": [0.40 * limit * 0.99]})
    kept, discarded = bench.time_overhead(host)
    assert host.calls == ["bare", "numpy", "torch"]
    assert discarded == []
    assert all(r["attempt"] == 1 for r in kept)
    assert bench._overhead_attempts_sentence(kept, discarded).endswith("No process needed it.")


def test_a_faster_retry_makes_the_others_slow_by_comparison_and_they_are_timed_again() -> None:
    bench = load_benchmark()
    # Processes slowed alike cannot be told apart from a slower host type: none is timed again.
    host = _Host({"bare": [0.9], "numpy": [0.9], "torch": [0.9]})
    _, discarded = bench.time_overhead(host)
    assert discarded == []
    # One slow process whose retry is fast sets a new fastest, so the next round times again
    # those that were within the factor of the old one but not of the new.
    host = _Host({"bare": [0.60], "numpy": [0.80, 0.40], "torch": [0.55, 0.41]})
    kept, discarded = bench.time_overhead(host)
    assert host.calls == ["bare", "numpy", "torch", "numpy", "bare", "torch"]
    assert [bench._yardstick_sync_us(r) for r in kept] == [0.60, 0.40, 0.41]
    bare = next(r for r in kept if r["variant"] == "bare")
    assert bare["attempt"] == 1  # its own retry failed (no record), so the first is kept


def test_a_failed_process_is_left_out_without_stopping_the_others() -> None:
    bench = load_benchmark()
    host = _Host({"bare": [0.5], "numpy": [], "torch": [0.5]})
    kept, discarded = bench.time_overhead(host)
    assert [r["variant"] for r in kept] == ["bare", "torch"]
    assert discarded == []


def test_the_report_names_every_attempt_of_a_process_timed_again() -> None:
    bench = load_benchmark()
    host = _Host({"bare": [0.50], "numpy": [0.95, 0.52], "torch": [0.56]})
    kept, discarded = bench.time_overhead(host)
    sentence = bench._overhead_attempts_sentence(kept, discarded)
    assert "more than 1.25 times the fastest process's was timed again" in sentence
    assert (
        "Timed again: numpy loaded: attempt 1 (yardstick 0.95 us, set aside), "
        "attempt 2 (yardstick 0.52 us, reported)." in sentence
    )
    assert "no numpy, no torch:" not in sentence


def test_a_run_saved_before_attempts_has_no_sentence_about_them() -> None:
    bench = load_benchmark()
    saved = json.loads(
        (BENCHMARKS / "results" / "coordination-2026-12-05-late-evening-control.json").read_text()
    )
    assert bench._overhead_attempts_sentence(saved["overhead"], []) == ""
