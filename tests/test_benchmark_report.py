"""``benchmarks/coordination.py --report``: a saved run summarised again from its raw cells."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .scripts import BENCHMARKS, load_benchmark

SAVED_RUN = BENCHMARKS / "results" / "coordination-2026-12-02.json"


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks, written out here independently of the
    benchmark."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_p99(run: dict[str, Any]) -> float:
    return quantile([v / 1000 for v in run["latencies_us"]], 0.99)


def spread(values: list[int]) -> float:
    """p99 / p50."""
    as_floats = [float(v) for v in values]
    return quantile(as_floats, 0.99) / quantile(as_floats, 0.50)


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
        expected = [run_p99(elastic[r]) / run_p99(best[r]) for r in sorted(elastic)]
        assert comparison["p99_round_ratios"] == pytest.approx(expected)
    for summary in rebuilt["summaries"]:
        runs = raw[(summary["workload"], summary["mode"], summary["concurrency"])].values()
        expected_spread = statistics.median(spread(run["service_us"]) for run in runs)
        assert summary["service_ratio"] == pytest.approx(expected_spread)

    markdown = saved.with_suffix(".md").read_text()
    assert markdown.startswith("# Coordination benchmark, 2026-12-02")
    assert "| req/s ratio per round | p99 ratio per round: median [min-max] |" in markdown
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


def summary(
    mode: str, label: str, level: int, by_round: list[float], p99_by_round: list[float]
) -> Any:
    return {
        "workload": "numpy",
        "mode": mode,
        "label": label,
        "concurrency": level,
        "throughput": statistics.median(by_round),
        "throughput_by_round": {str(r): t for r, t in enumerate(by_round)},
        "p99_ms": max(p99_by_round),
        "p99_ms_by_round": {str(r): p for r, p in enumerate(p99_by_round)},
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
        summary("static-1", "static C=2 T=1", 4, [100, 120, 110], [40.0, 50.0, 45.0]),
        summary("static-2", "static C=1 T=2", 4, [80, 90, 85], [70.0, 60.0, 65.0]),
        summary("elastic", "elastic", 4, [99, 121, 100], [44.0, 55.0, 36.0]),
        summary("static-1-copy", "static C=2 T=1 (copy)", 4, [130, 90, 125], [70.0, 30, 45]),
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
    # p99 paired round by round, for elastic and for the copy alike.
    assert verdict["p99_round_ratios"] == pytest.approx([1.1, 1.1, 0.8])
    assert verdict["control_p99_round_ratios"] == pytest.approx([1.75, 0.6, 1.0])

    # Without a copy of the winning split, no control figures are made up.
    (plain,) = bench.compare(summaries[:3], bench.all_modes(2), 2, ["numpy"])
    assert "control_throughput_ratio" not in plain


def test_pinned_run_pins_every_slot_mode_and_compares_pinned_with_pinned() -> None:
    bench = load_benchmark()
    modes = bench.all_modes(2, control=True, pin=True)
    assert [(m.key, m.pinned) for m in modes] == [
        ("default", False),
        ("omp1", False),
        ("static-1+pin", True),
        ("static-2+pin", True),
        ("elastic+pin", True),
        ("static-1-copy+pin", True),
        ("static-2-copy+pin", True),
    ]
    assert all(bench.mode_from_key(m.key) == m for m in modes)
    assert modes[5].label(2) == "static C=2 T=1, pinned (copy)"
    with pytest.raises(ValueError, match="only slot modes can be pinned"):
        bench.mode_from_key("omp1+pin")

    summaries = [
        summary("static-1+pin", "static C=2 T=1, pinned", 4, [100, 120, 110], [40.0, 50.0]),
        summary("elastic+pin", "elastic, pinned", 4, [99, 121, 100], [44.0, 55.0]),
        summary("static-1-copy+pin", "static C=2 T=1, pinned (copy)", 4, [90, 90, 99], [45, 45]),
    ]
    (verdict,) = bench.compare(summaries, modes, 2, ["numpy"])
    assert verdict["best_static"] == "static C=2 T=1, pinned"
    assert verdict["throughput_ratio"] == pytest.approx(100 / 110)
    assert verdict["control_throughput_ratio"] == pytest.approx(90 / 110)


def rebuild_saved_run(name: str, tmp_path: Path) -> tuple[dict[str, Any], str]:
    """A saved run of benchmarks/results summarised again by ``--report`` in *tmp_path*."""
    saved = tmp_path / name
    shutil.copy(BENCHMARKS / "results" / name, saved)
    assert load_benchmark().main(["--report", str(saved)]) == 0
    return json.loads(saved.read_text()), saved.with_suffix(".md").read_text()


def target_misses(verdicts: list[dict[str, Any]], prefix: str = "") -> int:
    """Throughput and p99 targets missed, counted independently of the report's wording."""
    return sum((not v[f"{prefix}throughput_met"]) + (not v[f"{prefix}p99_met"]) for v in verdicts)


def test_report_of_a_control_run_counts_the_misses_of_elastic_and_of_the_copy(
    tmp_path: Path,
) -> None:
    rebuilt, markdown = rebuild_saved_run("coordination-2026-12-02-control.json", tmp_path)
    assert rebuilt["control"] is True
    for workload in ("numpy", "minilm"):
        verdicts = [v for v in rebuilt["comparisons"] if v["workload"] == workload]
        elastic_misses = target_misses(verdicts)
        copy_misses = target_misses(verdicts, "control_")
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


SPIN_THEN_IDLE = """
import sys, time
print("spinning", flush=True)
began = time.perf_counter()
while time.perf_counter() - began < float(sys.argv[1]):
    pass
time.sleep(60)
"""


def test_cells_wait_for_a_spinning_worker_to_go_quiet() -> None:
    bench = load_benchmark()
    child = subprocess.Popen(
        [sys.executable, "-c", SPIN_THEN_IDLE, "0.6"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "spinning"
        waited = bench.wait_until_quiet([child.pid])
        # It waits out most of the spin, but not the whole allowance of a busy machine.
        assert 0.3 <= waited < bench.QUIET_WAIT_S
        # Now idle: one window is enough.
        assert bench.wait_until_quiet([child.pid]) < 3 * bench.QUIET_WINDOW_S + 0.5
    finally:
        child.kill()
        child.wait()
    # A process that has ended is quiet, not an error.
    assert bench.wait_until_quiet([child.pid]) < 3 * bench.QUIET_WINDOW_S + 0.5


def test_report_says_whether_cells_waited_for_quiet_workers(tmp_path: Path) -> None:
    saved = tmp_path / SAVED_RUN.name
    report = json.loads(SAVED_RUN.read_text())
    saved.write_text(json.dumps(report))
    assert load_benchmark().main(["--report", str(saved)]) == 0
    assert "did not wait for the previous mode's native pools" in (
        saved.with_suffix(".md").read_text()
    )

    for index, cell in enumerate(report["raw_cells"]):
        cell["settle_s"] = 0.05 if index % 2 else 0.25
    saved.write_text(json.dumps(report))
    assert load_benchmark().main(["--report", str(saved)]) == 0
    markdown = saved.with_suffix(".md").read_text()
    assert "each cell waits until no worker process uses CPU" in markdown
    assert "median 150 ms, max 250 ms" in markdown


def test_modes_take_each_cell_in_a_seeded_shuffled_order_that_varies_the_predecessor() -> None:
    bench = load_benchmark()
    modes = [m.key for m in bench.all_modes(2, control=True, pin=True)]
    orders = [bench.cell_order(modes, "numpy", r, level) for r in range(10) for level in (1, 32)]
    for order in orders:
        assert sorted(order) == sorted(modes)
    assert bench.cell_order(modes, "numpy", 3, 1) == bench.cell_order(modes, "numpy", 3, 1)
    elastic = "elastic+pin"
    predecessors = {order[order.index(elastic) - 1] for order in orders if order[0] != elastic}
    # A rotation gave elastic one predecessor in every cell; the shuffle gives it several.
    assert len(predecessors) >= 4, predecessors


def test_report_names_the_cell_order_and_what_idle_workers_used(tmp_path: Path) -> None:
    saved = tmp_path / SAVED_RUN.name
    report = json.loads(SAVED_RUN.read_text())
    saved.write_text(json.dumps(report))
    assert load_benchmark().main(["--report", str(saved)]) == 0
    markdown = saved.with_suffix(".md").read_text()
    assert "one cyclic order: a fixed predecessor" in markdown
    assert "other modes' workers max" not in markdown

    report["order"] = "shuffled"
    for index, cell in enumerate(report["raw_cells"]):
        cell["sibling_cores"] = 0.5 if index == 0 else 0.01
        cell["steal_cores"] = 0.25
    first = report["raw_cells"][0]
    saved.write_text(json.dumps(report))
    assert load_benchmark().main(["--report", str(saved)]) == 0
    markdown = saved.with_suffix(".md").read_text()
    assert "the order shuffled from cell to cell" in markdown
    assert any(
        line.startswith(f"| {first['concurrency']} | ") and "other modes' workers max 0.50" in line
        for line in markdown.splitlines()
    )
    assert markdown.count("other modes' workers max 0.01") >= 5
    assert "steal max 0.25; other modes' workers max" in markdown


def test_a_cell_says_how_many_cores_it_got_and_what_the_machine_lost_to_others() -> None:
    bench = load_benchmark()
    cell = bench.run_cell(lambda: sum(range(20_000)), contextlib.nullcontext, 2, 20, 10.0)
    assert cell["requests"] >= 20
    assert 0.0 < cell["cores_used"] <= 2.5
    assert cell["other_cores"] >= 0.0
    # Stolen time is a part of the others' busy time, never more than the machine's CPUs.
    assert 0.0 <= cell["steal_cores"] <= os.cpu_count()
    busy, steal = bench.busy_cpu_seconds()
    assert busy >= steal >= 0.0
    assert busy > 0.0


def test_quiet_start_compares_a_cell_right_after_a_spinning_pool_with_one_after_the_wait() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quiet_start.py"), "--rounds", "1", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| elastic's cell of lone numpy requests | p50 ms | p99 ms |")
    right_after, after_quiet = (row.split(" | ") for row in rows[1:])
    from threadbudget import detect_budget

    split = f"static C=1 T={detect_budget().budget}"
    assert right_after[0] == f"| right after {split}"
    assert after_quiet[0] == f"| after quiet {split}"
    assert float(right_after[-1].rstrip(" |")) == 0  # no wait when it is not asked for
    assert all(float(value) > 0 for value in after_quiet[1:3])


def test_levels_are_chosen_on_the_command_line_and_reported_as_measured(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = load_benchmark()
    assert bench.parse_levels("32") == [32]
    assert bench.parse_levels("10, 2,10") == [2, 10]
    for bad in ("", "0", "four", "2,-1"):
        with pytest.raises(SystemExit) as exited:
            bench.main(["--levels", bad])
        assert exited.value.code == 2
        assert f"--levels wants whole numbers >= 1 separated by commas, got {bad!r}" in (
            capsys.readouterr().err
        )

    # A level outside the default grid is summarised and compared like any other.
    modes = bench.all_modes(2)
    summaries = [
        summary("static-1", "static C=2 T=1", 16, [100, 110], [40.0, 50.0]),
        summary("elastic", "elastic", 16, [105, 99], [44.0, 45.0]),
    ]
    (verdict,) = bench.compare(summaries, modes, 2, ["numpy"])
    assert verdict["concurrency"] == 16
    assert verdict["throughput_ratio"] == pytest.approx(102 / 105)


def run_handoff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "handoff.py"),
            "--rounds",
            "1",
            "--seconds",
            "0.5",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_handoff_reports_the_gap_between_a_release_and_the_next_grant() -> None:
    done = run_handoff("--levels", "1,3", "--pin", "--policies", "static,elastic")
    assert done.returncode == 0, done.stderr
    rows = {
        (cells[0], cells[1], cells[2]): cells
        for line in done.stdout.splitlines()
        if line.startswith("| ") and (cells := line.strip(" |").split(" | "))[0].isdigit()
    }
    assert sorted(rows) == sorted(
        (level, pinned, policy)
        for level in ("1", "3")
        for pinned in ("no", "yes")
        for policy in ("static", "elastic")
    )
    for cells in rows.values():
        _level, _pinned, _policy, cores, held, handoffs, *gaps, queued_ms = cells
        assert int(handoffs) > 0
        assert 0 < float(held.rstrip("%")) <= 100
        assert float(cores) > 0
        assert len(gaps) == 3
        # This host is Linux with schedstats, so the kernel's run-queue count must be there.
        assert float(queued_ms) >= 0
    # One client never waits for a CPU behind another client; the count is the kernel's.
    assert float(rows["1", "no", "static"][-1]) < 0.5


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ("static,fair", "policies must be a comma-separated list of static, elastic"),
        ("elastic,elastic", "a policy is named twice in 'elastic,elastic'"),
        (",", "got ','"),
    ],
)
def test_handoff_names_a_bad_policy_list(policies: str, message: str) -> None:
    done = run_handoff("--levels", "1", "--policies", policies)
    assert done.returncode == 2
    assert message in done.stderr


def test_elastic_variants_are_compared_with_the_best_split_but_are_never_elastic() -> None:
    bench = load_benchmark()
    modes = bench.all_modes(2, control=True, active_elastic=True, openblas_timeouts=[20, 24])
    assert [m.key for m in modes] == [
        "default",
        "omp1",
        "static-1",
        "static-2",
        "elastic",
        "elastic+active",
        "elastic+obt20",
        "elastic+obt24",
        "static-1-copy",
        "static-2-copy",
    ]
    active = bench.mode_from_key("elastic+active")
    assert (active.kind, active.wait, active.is_elastic) == ("elastic", "active", False)
    assert active.label(2) == "elastic, active wait"
    timeout = bench.mode_from_key("elastic+obt20")
    assert (timeout.wait, timeout.openblas_timeout, timeout.is_elastic) == ("auto", 20, False)
    assert timeout.label(2) == "elastic, OpenBLAS timeout 2^20"
    assert bench.mode_env(timeout)["OPENBLAS_THREAD_TIMEOUT"] == "20"
    assert "OPENBLAS_THREAD_TIMEOUT" not in bench.mode_env(bench.mode_from_key("elastic"))
    for bad in ("elastic+obt3", "elastic+obt31", "elastic+obtx"):
        with pytest.raises(ValueError, match="unknown mode"):
            bench.mode_from_key(bad)
    pinned = bench.all_modes(2, pin=True, active_elastic=True, openblas_timeouts=[20])
    assert [m.key for m in pinned if m.kind == "elastic"] == [
        "elastic+pin",
        "elastic+active+pin",
        "elastic+obt20+pin",
    ]
    assert all(bench.mode_from_key(m.key) == m for m in modes + pinned)

    summaries = [
        summary("static-2", "static C=1 T=2", 1, [100, 110, 120], [10.0, 12.0, 11.0]),
        summary("elastic", "elastic", 1, [60, 108, 40], [30.0, 12.0, 40.0]),
        summary("elastic+active", "elastic, active wait", 1, [99, 112, 118], [10.0, 13.0, 11.0]),
        summary("elastic+obt20", "elastic, OpenBLAS timeout 2^20", 1, [90, 99, 100], [20, 20]),
    ]
    (verdict,) = bench.compare(summaries, modes, 2, ["numpy"])
    # The passive elastic is the one judged; each variant is reported beside it.
    assert verdict["throughput_ratio"] == pytest.approx(60 / 110)
    spinning = verdict["variants"]["elastic+active"]
    assert spinning["throughput_ratio"] == pytest.approx(112 / 110)
    assert spinning["throughput_met"] is True
    assert spinning["p99_met"] is True
    assert spinning["round_ratios"] == pytest.approx([0.99, 112 / 110, 118 / 120])
    longer = verdict["variants"]["elastic+obt20"]
    assert longer["throughput_ratio"] == pytest.approx(99 / 110)
    assert longer["throughput_met"] is False
    assert longer["p99_ratio"] == pytest.approx(20 / 12)
    assert "control_throughput_ratio" not in verdict

    (plain,) = bench.compare(summaries[:2], bench.all_modes(2), 2, ["numpy"])
    assert "variants" not in plain


def test_openblas_timeouts_on_the_command_line_are_checked() -> None:
    bench = load_benchmark()
    assert bench.parse_openblas_timeouts("24, 20,20") == [20, 24]
    for bad in ("", "3", "31", "20,x"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 4 to 30"):
            bench.parse_openblas_timeouts(bad)


def test_gomp_spincount_variants_set_the_count_and_the_plan_keeps_it() -> None:
    bench = load_benchmark()
    modes = bench.all_modes(2, openblas_timeouts=[20], gomp_spincounts=[100000, 300000])
    assert [m.key for m in modes if m.kind == "elastic"] == [
        "elastic",
        "elastic+obt20",
        "elastic+spin100000",
        "elastic+spin300000",
    ]
    spin = bench.mode_from_key("elastic+spin300000")
    assert (spin.kind, spin.gomp_spincount, spin.is_elastic) == ("elastic", 300000, False)
    assert spin.label(2) == "elastic, GOMP spin count 300000"
    assert bench.mode_from_key("elastic+spin0+pin").gomp_spincount == 0
    title, text, short = bench._variant_text("elastic+spin300000", 2)
    assert title == "elastic, GOMP spin count 300000 against the best static"
    assert "keeps GOMP_SPINCOUNT=300000" in text
    assert short == "GOMP spin count 300000 variant"
    assert all(bench.mode_from_key(m.key) == m for m in modes)
    env = bench.mode_env(spin)
    assert env["GOMP_SPINCOUNT"] == "300000"
    assert "GOMP_SPINCOUNT" not in bench.mode_env(bench.mode_from_key("elastic"))
    for bad in ("elastic+spin", "elastic+spin-1", "elastic+spin1000000001", "elastic+spinx"):
        with pytest.raises(ValueError, match="unknown mode"):
            bench.mode_from_key(bad)
    assert bench.parse_gomp_spincounts("300000, 0,0") == [0, 300000]
    for text in ("", "-5", "1000000001", "1e5"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 1000000000"):
            bench.parse_gomp_spincounts(text)

    # The worker's passive plan keeps the count it was started with, as for a user's own.
    from threadbudget import apply_plan, make_plan
    from threadbudget._envvars import planned_values

    plan = make_plan(2, concurrency=2, wait_policy=spin.wait)
    assert planned_values(plan)["GOMP_SPINCOUNT"] == "10000"
    worker_env = dict(env)
    apply_plan(plan, runtime=False, environ=worker_env, emit_warnings=False)
    assert worker_env["GOMP_SPINCOUNT"] == "300000"
    assert worker_env["OMP_WAIT_POLICY"] == "PASSIVE"  # the rest of the passive plan applies
    plain_env = bench.mode_env(bench.mode_from_key("elastic"))
    apply_plan(plan, runtime=False, environ=plain_env, emit_warnings=False)
    assert plain_env["GOMP_SPINCOUNT"] == "10000"


def test_active_elastic_worker_leaves_the_wait_variables_to_the_libraries() -> None:
    """The twin differs from elastic in its plan's wait policy and nothing else."""
    bench = load_benchmark()
    from threadbudget import make_plan
    from threadbudget._envvars import planned_values

    passive = planned_values(make_plan(2, concurrency=2, wait_policy="auto"))
    twin = bench.mode_from_key("elastic+active")
    active = planned_values(make_plan(2, concurrency=2, wait_policy=twin.wait))
    assert {k: v for k, v in passive.items() if k not in bench.WAIT_VARS} == active
    assert set(bench.WAIT_VARS) <= set(passive)
    assert not set(bench.WAIT_VARS) & set(active)


def test_report_of_a_run_with_an_elastic_variant_gives_it_a_table_of_its_own(
    tmp_path: Path,
) -> None:
    rebuilt, markdown = rebuild_saved_run(
        "coordination-2026-12-03-active-control-n1-2.json", tmp_path
    )
    for workload in ("numpy", "minilm"):
        verdicts = [v for v in rebuilt["comparisons"] if v["workload"] == workload]
        twins = [v["variants"]["elastic+active"] for v in verdicts]
        assert len(twins) == 2  # one and two clients
        elastic_misses = target_misses(verdicts)
        twin_misses = target_misses(twins)
        assert f"### {workload}: elastic, active wait against the best static" in markdown
        assert (
            f"Of these 4 throughput and p99 targets, elastic missed {elastic_misses} and the "
            f"active wait variant {twin_misses}."
        ) in markdown
        for v, twin in zip(verdicts, twins, strict=True):
            assert twin["throughput_ratio"] == pytest.approx(
                twin_throughput(rebuilt, workload, v["concurrency"]) / v["best_static_throughput"]
            )


def twin_throughput(report: dict[str, Any], workload: str, level: int) -> float:
    """Median of the active twin's per-run throughputs, from the raw cells."""
    runs = [
        c["throughput"]
        for c in report["raw_cells"]
        if c["workload"] == workload and c["mode"] == "elastic+active" and c["concurrency"] == level
    ]
    return statistics.median(runs)


def test_report_of_a_run_with_gomp_spin_variants_reads_each_against_the_best_split(
    tmp_path: Path,
) -> None:
    rebuilt, markdown = rebuild_saved_run(
        "coordination-2026-12-04-spin100000-spin300000-control-n1-2.json", tmp_path
    )
    envs = {w["mode"]: w["env"]["GOMP_SPINCOUNT"] for w in rebuilt["workers"]}
    assert envs["elastic"] == "10000"  # the passive plan's own count
    assert envs["elastic+spin100000"] == "100000"
    assert envs["elastic+spin300000"] == "300000"
    for spins in (100000, 300000):
        key = f"elastic+spin{spins}"
        assert f"### minilm: elastic, GOMP spin count {spins} against the best static" in markdown
        for verdict in rebuilt["comparisons"]:
            runs = [
                c["throughput"]
                for c in rebuilt["raw_cells"]
                if c["mode"] == key and c["concurrency"] == verdict["concurrency"]
            ]
            assert verdict["variants"][key]["throughput_ratio"] == pytest.approx(
                statistics.median(runs) / verdict["best_static_throughput"]
            )
