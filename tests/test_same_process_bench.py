"""``benchmarks/same_process.py``: its statistics and report, on blocks made up here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def block(pool: str, round_no: int, throughput: float, elapsed_s: float, **extra: Any) -> Any:
    return {
        "pool": pool,
        "round": round_no,
        "throughput": throughput,
        "elapsed_s": elapsed_s,
        "latencies_us": extra.get("latencies_us", [10_000, 20_000]),
        "waits_us": extra.get("waits_us", [1_000, 2_000]),
        "grants_by_size": extra.get("grants", {"1": 2}),
    }


LABELS = {"static-1": "static C=2 T=1", "static-2": "static C=1 T=2", "elastic": "elastic"}


def test_summary_pairs_elastic_with_the_best_static_split_round_by_round() -> None:
    bench = load("same_process")
    record = {
        "workload": "numpy",
        "concurrency": 4,
        "labels": LABELS,
        "blocks": [
            # static-1 totals (100 * 1 + 50 * 3) / 4 = 62.5 req/s; static-2 60 req/s.
            block("static-1", 0, 100, 1.0, latencies_us=[10_000, 30_000]),
            block("static-1", 1, 50, 3.0, latencies_us=[10_000, 30_000]),
            block("static-2", 0, 60, 1.0),
            block("static-2", 1, 60, 1.0),
            block("elastic", 0, 90, 1.0, waits_us=[1_000, 1_000, 1_000, 3_000]),
            block("elastic", 1, 55, 2.0, grants={"1": 3, "2": 1}),
        ],
    }
    summary = bench.summarise(record, 2, load("coordination").percentile)
    assert summary["best_static"] == "static C=2 T=1"
    assert summary["pools"]["static C=2 T=1"]["throughput"] == pytest.approx(62.5)
    assert summary["throughput_ratio"] == pytest.approx(((90 + 110) / 3) / 62.5)
    assert summary["round_ratios"] == pytest.approx([0.9, 1.1])
    assert summary["round_ratio_median"] == pytest.approx(1.0)
    assert summary["saturated"] is True
    # The elastic waits pooled: 1, 1, 1, 3 and 1, 2 ms; p50 1 ms.
    waits = sorted([1.0, 1.0, 1.0, 3.0, 1.0, 2.0])
    rank = 0.99 * (len(waits) - 1)
    p99 = waits[math.floor(rank)] + (waits[math.ceil(rank)] - waits[math.floor(rank)]) * (
        rank - math.floor(rank)
    )
    assert summary["elastic_wait_spread"] == pytest.approx(p99 / 1.0)
    assert summary["pools"]["elastic"]["grants"] == {"1": 5, "2": 1}

    report = {
        "started_at": "2026-12-02T06:00:00+00:00",
        "budget": 2,
        "rounds": 2,
        "wall_s": 60.0,
        "workloads": ["numpy"],
        "summaries": [summary],
    }
    markdown = bench.render(report)
    assert markdown.startswith("# Elastic against the static splits in one process")
    assert "| 4 | static C=2 T=1 | 1.067 | 1.000 [0.90-1.10] |" in markdown
    assert "| 1:5 2:1 |" in markdown


def test_bad_rounds_and_workloads_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("same_process")
    with pytest.raises(SystemExit):
        bench.main(["--rounds", "0"])
    assert "--rounds must be a whole number >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--workloads", "numpy,resnet"])
    assert "unknown workload(s): resnet" in capsys.readouterr().err
