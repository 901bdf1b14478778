"""``benchmarks/service_times.py``: the service times under a saved run's slot waits."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import statistics
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .scripts import BENCHMARKS, run_benchmark

SAVED_RUN = BENCHMARKS / "results" / "coordination-2026-12-03-numpy-control.json"


@pytest.fixture
def service_times(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports coordination as a script does
    return importlib.import_module("service_times")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return run_benchmark("service_times.py", *args)


def test_spearman_orders_ranks_and_shares_ties(service_times: ModuleType) -> None:
    assert service_times.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert service_times.spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # Ties take their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3).
    assert service_times.spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(0.866, abs=1e-3)
    assert math.isnan(service_times.spearman([1, 1, 1], [1, 2, 3]))  # no order on one side
    assert math.isnan(service_times.spearman([1, 2], [1, 2]))  # too few to rank
    with pytest.raises(ValueError, match="3 values against 2"):
        service_times.spearman([1, 2, 3], [1, 2])


@pytest.mark.parametrize(("n", "slow"), [(6, 2), (7, 3), (9, 4), (10, 1)])
def test_slow_runs_expectation_is_the_mean_over_every_placement(
    service_times: ModuleType, n: int, slow: int
) -> None:
    """The expected count of slow requests beside another slow one, checked by enumerating
    every placement of *slow* slow requests among *n*."""
    seen = []
    for places in itertools.combinations(range(n), slow):
        service = [10.0 if i in places else 1.0 for i in range(n)]
        count, neighboured, expected = service_times.slow_runs(service, 1.4)
        assert count == slow  # under half are slow: the median is a fast request
        seen.append((neighboured, expected))
    assert len({expected for _, expected in seen}) == 1  # it depends on the counts alone
    assert statistics.mean(s for s, _ in seen) == pytest.approx(seen[0][1])


def test_slow_runs_counts_neighbours_in_completion_order(service_times: ModuleType) -> None:
    service = [1.0, 5.0, 5.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 5.0]
    count, neighboured, _ = service_times.slow_runs(service, 1.4)
    assert (count, neighboured) == (4, 2)


def _independent_row(run_cells: list[dict[str, Any]]) -> tuple[float, float]:
    """Median over rounds of the median service time (ms) and of the first 8 over the rest."""
    speeds = [statistics.median(c["service_us"]) / 1000 for c in run_cells]
    heads = [
        statistics.median(c["service_us"][:8]) / statistics.median(c["service_us"][8:])
        for c in run_cells
    ]
    return statistics.median(speeds), statistics.median(heads)


def test_the_table_rows_match_the_saved_raw_cells() -> None:
    result = run_script(str(SAVED_RUN), "--workload", "numpy", "--clients", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads(SAVED_RUN.read_text())
    rows = [line for line in result.stdout.splitlines() if line.startswith("| numpy | 4 |")]
    modes = {m["key"] for m in report["modes"]} - {"default", "omp1"}
    assert sorted(row.split(" | ")[2] for row in rows) == sorted(modes)
    for row in rows:
        mode = row.split(" | ")[2]
        cells = [
            c
            for c in report["raw_cells"]
            if c["workload"] == "numpy" and c["concurrency"] == 4 and c["mode"] == mode
        ]
        speed, head = _independent_row(cells)
        fields = row.strip("|").split("|")
        assert fields[4].strip().startswith(f"{speed:.1f} [")
        assert float(fields[7]) == pytest.approx(head, abs=0.006)
    assert "numpy at 4 clients: Spearman" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slow", "1"], "--slow must be above 1, got 1.0"),
        (["--clients", "2"], "no saturated slot cells match"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    result = run_script(str(SAVED_RUN), *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_a_file_that_is_not_a_report_is_named(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"raw_cells": []}')
    result = run_script(str(bogus))
    assert result.returncode == 1
    assert f"{bogus}: not a coordination.py report" in result.stderr
