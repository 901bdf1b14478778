"""``benchmarks/coordination.py --report``: a saved run summarised again from its raw cells."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SAVED_RUN = BENCHMARKS / "results" / "coordination-2026-12-02.json"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "coordination_bench", BENCHMARKS / "coordination.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def spread(values: list[int]) -> float:
    """p99 / p50 with linear interpolation, written out here independently of the benchmark."""
    ordered = sorted(values)

    def at(q: float) -> float:
        rank = (len(ordered) - 1) * q
        low, high = math.floor(rank), math.ceil(rank)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    return at(0.99) / at(0.50)


def test_report_rebuilds_tables_with_round_ratios_and_service_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / SAVED_RUN.name
    shutil.copy(SAVED_RUN, saved)
    report = json.loads(saved.read_text())
    for comparison in report["comparisons"]:
        comparison.pop("round_ratios", None)
    for summary in report["summaries"]:
        summary.pop("service_ratio", None)
    saved.write_text(json.dumps(report))
    saved.with_suffix(".md").write_text("stale")

    assert load_benchmark().main(["--report", str(saved)]) == 0

    rebuilt = json.loads(saved.read_text())
    raw: dict[tuple[str, str, int], dict[int, Any]] = {}
    for run in rebuilt["raw_cells"]:
        raw.setdefault((run["workload"], run["mode"], run["concurrency"]), {})[run["round"]] = run
    labels = {mode["label"]: mode["key"] for mode in rebuilt["modes"]}
    assert len(rebuilt["comparisons"]) == 10
    for comparison in rebuilt["comparisons"]:
        cell = (comparison["workload"], comparison["concurrency"])
        elastic = raw[(cell[0], "elastic", cell[1])]
        best = raw[(cell[0], labels[comparison["best_static"]], cell[1])]
        expected = [elastic[r]["throughput"] / best[r]["throughput"] for r in sorted(elastic)]
        assert comparison["round_ratios"] == pytest.approx(expected)
    for summary in rebuilt["summaries"]:
        runs = raw[(summary["workload"], summary["mode"], summary["concurrency"])].values()
        expected_spread = statistics.median(spread(run["service_us"]) for run in runs)
        assert summary["service_ratio"] == pytest.approx(expected_spread)

    markdown = saved.with_suffix(".md").read_text()
    assert markdown.startswith("# Coordination benchmark, 2026-12-02")
    assert "| req/s ratio per round |" in markdown
    assert "| run p99 / p50, per run (median) |" in markdown
    assert markdown in capsys.readouterr().out


def test_report_of_something_else_says_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_run = tmp_path / "batching.json"
    not_a_run.write_text(json.dumps({"benchmark": "batching"}))
    assert load_benchmark().main(["--report", str(not_a_run)]) == 2
    error = capsys.readouterr().err
    assert str(not_a_run) in error
    assert "not a coordination report" in error


def summary(mode: str, label: str, level: int, by_round: list[float], p99_ms: float) -> Any:
    return {
        "workload": "numpy",
        "mode": mode,
        "label": label,
        "concurrency": level,
        "throughput": statistics.median(by_round),
        "throughput_by_round": {str(r): t for r, t in enumerate(by_round)},
        "p99_ms": p99_ms,
        "other_cores": 0.0,
        "probe_slowdown_max": 1.0,
        "grants_by_size": {},
    }


def test_control_copies_are_compared_with_their_split_and_never_chosen_as_best() -> None:
    bench = load_benchmark()
    modes = bench.all_modes(2, control=True)
    keys = [mode.key for mode in modes]
    assert keys == [
        "default",
        "omp1",
        "static-1",
        "static-2",
        "elastic",
        "static-1-copy",
        "static-2-copy",
    ]
    copy = bench.mode_from_key("static-1-copy")
    assert (copy.kind, copy.threads, copy.control) == ("static", 1, True)
    assert copy.label(2) == "static C=2 T=1 (copy)"
    assert [m.key for m in bench.all_modes(2)] == keys[:5]
    with pytest.raises(ValueError, match="elastic-copy"):
        bench.mode_from_key("elastic-copy")

    # The copy has the highest throughput of all: it must still not be the "best static".
    summaries = [
        summary("static-1", "static C=2 T=1", 4, [100, 120, 110], 50.0),
        summary("static-2", "static C=1 T=2", 4, [80, 90, 85], 70.0),
        summary("elastic", "elastic", 4, [99, 121, 100], 55.0),
        summary("static-1-copy", "static C=2 T=1 (copy)", 4, [130, 90, 125], 70.0),
    ]
    (verdict,) = bench.compare(summaries, modes, 2, ["numpy"])
    assert verdict["best_static"] == "static C=2 T=1"
    assert verdict["best_any"] == "static C=2 T=1"
    assert verdict["throughput_ratio"] == pytest.approx(100 / 110)
    assert verdict["control_throughput_ratio"] == pytest.approx(125 / 110)
    assert verdict["control_p99_ratio"] == pytest.approx(70 / 50)
    assert verdict["control_throughput_met"] is True
    assert verdict["control_p99_met"] is False
    assert verdict["control_round_ratios"] == pytest.approx([1.3, 0.75, 125 / 110])

    # Without a copy of the winning split, no control figures are made up.
    (plain,) = bench.compare(summaries[:3], bench.all_modes(2), 2, ["numpy"])
    assert "control_throughput_ratio" not in plain


def test_report_of_a_control_run_counts_the_misses_of_elastic_and_of_the_copy(
    tmp_path: Path,
) -> None:
    saved = tmp_path / "control.json"
    shutil.copy(BENCHMARKS / "results" / "coordination-2026-12-02-control.json", saved)
    assert load_benchmark().main(["--report", str(saved)]) == 0

    rebuilt = json.loads(saved.read_text())
    assert rebuilt["control"] is True
    markdown = saved.with_suffix(".md").read_text()
    for workload in ("numpy", "minilm"):
        verdicts = [v for v in rebuilt["comparisons"] if v["workload"] == workload]
        elastic_misses = sum((not v["throughput_met"]) + (not v["p99_met"]) for v in verdicts)
        copy_misses = sum(
            (not v["control_throughput_met"]) + (not v["control_p99_met"]) for v in verdicts
        )
        assert f"### {workload}: the best static split against a second process of itself" in (
            markdown
        )
        assert (
            f"Of these 10 throughput and p99 targets, elastic missed {elastic_misses} and the "
            f"copy {copy_misses}."
        ) in markdown
    # Copies are measured and listed, but never the split elastic is judged against.
    assert all("(copy)" not in v["best_static"] for v in rebuilt["comparisons"])
    assert "| 4 | static C=2 T=1 (copy) |" in markdown
