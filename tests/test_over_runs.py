"""``benchmarks/over_runs.py``: one cell of several saved runs, round by round."""

from __future__ import annotations

import importlib
import itertools
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from .scripts import BENCHMARKS, run_benchmark

RESULTS = BENCHMARKS / "results"
LATE_RUN = RESULTS / "coordination-2026-12-03-late-control.json"
NUMPY_RUN = RESULTS / "coordination-2026-12-03-numpy-control.json"
NO_CONTROL_RUN = RESULTS / "coordination-2026-12-01.json"


@pytest.fixture
def over_runs(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its neighbours as a script does
    return importlib.import_module("over_runs")


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return run_benchmark("over_runs.py", *args)


@pytest.mark.parametrize("rounds", [1, 5, 10, 13])
def test_sign_test_is_the_two_sided_tail_of_every_outcome(
    over_runs: ModuleType, rounds: int
) -> None:
    """Checked against enumerating every sequence of better and worse rounds."""
    outcomes = list(itertools.product((0, 1), repeat=rounds))
    for worse in range(rounds + 1):
        extreme = abs(worse - rounds / 2)
        as_extreme = sum(1 for o in outcomes if abs(sum(o) - rounds / 2) >= extreme)
        expected = as_extreme / len(outcomes)
        assert over_runs.sign_test(worse, rounds) == pytest.approx(expected)
    assert over_runs.sign_test(0, 0) == 1.0
    with pytest.raises(ValueError, match="6 worse of 5 rounds"):
        over_runs.sign_test(6, 5)


def _row(stdout: str, name: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith(f"| {name} |"))
    return [field.strip() for field in line.strip("|").split("|")]


def test_the_rows_match_the_report_s_own_comparisons_and_raw_cells() -> None:
    """Per-round ratios from the summaries agree with those the benchmark saved, and the
    extra steal with the raw cells read here independently."""
    result = run_script("--workload", "numpy", "--clients", "1", str(LATE_RUN), str(NUMPY_RUN))
    assert result.returncode == 0, result.stderr
    for path in (LATE_RUN, NUMPY_RUN):
        report = json.loads(path.read_text())
        comparison = next(
            c for c in report["comparisons"] if c["workload"] == "numpy" and c["concurrency"] == 1
        )
        fields = _row(result.stdout, path.stem)
        rounds = len(comparison["round_ratios"])
        assert fields[1] == comparison["best_static"] == "static C=1 T=2"
        assert fields[2] == "obt 20, spin 10000"
        assert fields[3] == str(rounds)
        assert float(fields[4]) == pytest.approx(
            statistics.median(comparison["round_ratios"]), abs=0.006
        )
        assert float(fields[5]) == pytest.approx(
            statistics.median(comparison["control_round_ratios"]), abs=0.006
        )
        slower = sum(r < 1 for r in comparison["round_ratios"])
        assert fields[6] == f"{slower} of {rounds}"
        p99_higher = sum(r > 1 for r in comparison["control_p99_round_ratios"])
        assert fields[11] == f"{p99_higher} of {rounds}"

        def steal(mode: str, report: dict[str, object] = report) -> dict[int, float]:
            cells = report["raw_cells"]
            assert isinstance(cells, list)
            return {
                c["round"]: c["steal_cores"]
                for c in cells
                if c["workload"] == "numpy" and c["concurrency"] == 1 and c["mode"] == mode
            }

        elastic, split = steal("elastic"), steal("static-2")
        extra = statistics.median(elastic[r] - split[r] for r in split)
        assert float(fields[12]) == pytest.approx(extra, abs=0.0006)
    assert "All 2 runs together" in result.stdout


def test_pooled_counts_add_the_runs_up() -> None:
    both = run_script("--workload", "numpy", "--clients", "1", str(LATE_RUN), str(NUMPY_RUN))
    assert both.returncode == 0, both.stderr
    slower = [_row(both.stdout, p.stem)[6].split(" of ") for p in (LATE_RUN, NUMPY_RUN)]
    worse, rounds = sum(int(s[0]) for s in slower), sum(int(s[1]) for s in slower)
    pooled = next(line for line in both.stdout.splitlines() if line.startswith("  elastic:"))
    assert f"slower than the split in {worse} of {rounds} rounds (p = " in pooled


def test_without_clients_every_cell_pools_its_rounds_as_the_one_cell_view_does() -> None:
    every = run_script(str(LATE_RUN), str(NUMPY_RUN))
    assert every.returncode == 0, every.stderr
    rows = [line for line in every.stdout.splitlines() if line.startswith("| numpy |")]
    assert [row.split(" | ")[1] for row in rows] == ["1", "2", "4", "10", "32"]
    minilm = [line for line in every.stdout.splitlines() if line.startswith("| minilm |")]
    assert len(minilm) == 5  # only the late run has MiniLM: one run per row
    assert all(row.split(" | ")[2] == "1" for row in minilm)
    for row in rows:
        clients = row.split(" | ")[1]
        one = run_script("--workload", "numpy", "--clients", clients, str(LATE_RUN), str(NUMPY_RUN))
        pooled = next(line for line in one.stdout.splitlines() if line.startswith("  elastic:"))
        fields = [field.strip() for field in row.strip("|").split("|")]
        assert fields[2:4] == ["2", "20"]  # runs, rounds
        assert f"slower than the split in {fields[4].replace(' (p', ' rounds (p')}" in pooled
        assert f"median ratio {fields[7]};" in pooled
        head_to_head = next(line for line in one.stdout.splitlines() if "than the copy" in line)
        assert head_to_head.endswith(fields[6].replace(" (p", " rounds (p"))

    numpy_only = run_script("--workload", "numpy", str(LATE_RUN))
    assert "| minilm |" not in numpy_only.stdout


def test_steal_counts_take_the_rounds_apart_by_the_margin() -> None:
    report = json.loads(LATE_RUN.read_text())
    steal = {
        (c["mode"], c["round"]): c["steal_cores"]
        for c in report["raw_cells"]
        if c["workload"] == "minilm" and c["concurrency"] == 1
    }
    extra = [steal[("elastic", r)] - steal[("static-2", r)] for r in range(10)]
    above, below = sum(x >= 0.1 for x in extra), sum(x <= -0.1 for x in extra)
    assert above + below > 0  # the saved run has rounds that far apart
    result = run_script("--workload", "minilm", "--clients", "1", str(LATE_RUN))
    pooled = next(line for line in result.stdout.splitlines() if line.startswith("  elastic:"))
    assert (
        f"steal 0.1 core or more above the split's in {above} of {above + below} rounds" in pooled
    )

    wide = run_script(
        "--workload", "minilm", "--clients", "1", "--steal-margin", "2", str(LATE_RUN)
    )
    assert "steal never 2 core or more apart" in wide.stdout


def test_mode_sets_a_variant_against_the_split_instead_of_elastic() -> None:
    variant_run = RESULTS / "coordination-2026-12-03-active-obt20-obt24-control-n1-2.json"
    report = json.loads(variant_run.read_text())
    comparison = next(
        c for c in report["comparisons"] if c["workload"] == "numpy" and c["concurrency"] == 1
    )
    ratios = comparison["variants"]["elastic+obt20"]["round_ratios"]
    result = run_script(
        "--mode", "elastic+obt20", "--workload", "numpy", "--clients", "1", str(variant_run)
    )
    assert result.returncode == 0, result.stderr
    fields = _row(result.stdout, variant_run.stem)
    assert fields[2] == "obt 20, spin 10000"  # the variant's own worker environment
    assert float(fields[4]) == pytest.approx(statistics.median(ratios), abs=0.006)
    assert fields[6] == f"{sum(r < 1 for r in ratios)} of {len(ratios)}"
    assert "  elastic+obt20: slower than the split in" in result.stdout

    missing = run_script("--mode", "elastic+obt20", str(LATE_RUN))
    assert missing.returncode == 1
    assert f"skipped {LATE_RUN.name}: no mode 'elastic+obt20'" in missing.stderr


def test_ties_are_left_out_of_the_sign_test(over_runs: ModuleType) -> None:
    signs = over_runs.Signs.of([0.2, 0.0, -0.1, 0.0, 0.3])
    assert (signs.worse, signs.better) == (2, 1)
    assert signs.text(" rounds") == f"2 of 3 rounds (p = {over_runs.sign_test(2, 3):.3f})"
    assert over_runs.Signs.of([0.0, 0.0]).text() == "-"
    assert over_runs.Signs(10, 0).text() == "10 of 10 (p = 0.002)"
    assert over_runs.Signs(12, 0).text() == "12 of 12 (p < 0.001)"


def test_holm_adjusts_a_worked_example(over_runs: ModuleType) -> None:
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06.
    adjusted = over_runs.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert over_runs.holm([0.2]) == [0.2]
    assert over_runs.holm([]) == []
    assert over_runs.holm([0.6, 0.7]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="p-values must lie in"):
        over_runs.holm([0.1, 1.5])


@pytest.fixture(scope="module")
def holm() -> Callable[[list[float]], list[float]]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        function: Callable[[list[float]], list[float]] = importlib.import_module("over_runs").holm
        return function


@given(pvalues=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=12))
def test_holm_keeps_exactly_what_the_step_down_procedure_rejects(
    holm: Callable[[list[float]], list[float]], pvalues: list[float]
) -> None:
    """Holm at 0.05: walk the p-values from the smallest, reject while p < 0.05 / (tests
    left), stop at the first that is not; the adjusted p-values below 0.05 are those."""
    adjusted = holm(pvalues)
    rejected: set[int] = set()
    for rank, index in enumerate(sorted(range(len(pvalues)), key=lambda i: pvalues[i])):
        if pvalues[index] * (len(pvalues) - rank) >= 0.05:
            break
        rejected.add(index)
    assert {i for i, q in enumerate(adjusted) if q < 0.05} == rejected
    assert all(q >= p for p, q in zip(pvalues, adjusted, strict=True))


def test_the_family_sentence_names_what_holds_after_adjustment(over_runs: ModuleType) -> None:
    strong, weak, tie = over_runs.Signs(20, 0), over_runs.Signs(9, 1), over_runs.Signs(0, 0)
    held = over_runs.family_sentence([("a", strong), ("b", weak), ("c", tie)])
    # Two tests count (c has no rounds): 20 of 20 adjusted x2, 9 of 10 (p = 0.021) x1 -> 0.021.
    assert held.startswith("Taken together: 2 sign tests in the comparison columns, 2 with")
    assert "below 0.05: a (p < 0.001, adjusted p < 0.001); b (p = 0.021, adjusted p = 0.021)" in (
        held
    )
    many = [("x", weak), *[(f"n{i}", over_runs.Signs(5, 5)) for i in range(9)]]
    none = over_runs.family_sentence(many)
    assert "10 sign tests in the comparison columns, 1 with p < 0.05" in none
    assert "none is below 0.05; the smallest is x (p = 0.021, adjusted p = 0.215)" in none
    assert over_runs.family_sentence([("c", tie)]).startswith("No sign test")
    # Every adjusted p at 1.0: the smallest raw p is named, not the first name.
    even = over_runs.Signs(5, 5)
    tied = over_runs.family_sentence(
        [("a", even), ("b", even), ("z", over_runs.Signs(6, 2)), ("c", even)]
    )
    assert "the smallest is z (p = 0.289, adjusted p = 1.000)" in tied


def test_the_table_counts_five_tests_per_cell() -> None:
    every = run_script(str(LATE_RUN), str(NUMPY_RUN))
    rows = [
        line for line in every.stdout.splitlines() if line.startswith(("| numpy |", "| minilm |"))
    ]
    assert f"Taken together: {5 * len(rows)} sign tests" in every.stdout


@pytest.mark.parametrize(
    ("statistic", "degrees", "upper"),
    # Critical values from chi-square tables: the 5 % and 1 % upper points.
    [(3.841, 1, 0.05), (18.307, 10, 0.05), (23.209, 10, 0.01), (124.342, 100, 0.05)],
)
def test_the_chi_square_tail_meets_the_tables(
    over_runs: ModuleType, statistic: float, degrees: int, upper: float
) -> None:
    assert over_runs.chi_square_upper(statistic, degrees) == pytest.approx(upper, abs=0.005)
    assert over_runs.chi_square_upper(0.0, degrees) == 1.0
    with pytest.raises(ValueError, match="degrees of freedom must be 1 or more, got 0"):
        over_runs.chi_square_upper(1.0, 0)


def test_the_calibration_counts_the_copy_s_rounds_of_every_run_cell(
    over_runs: ModuleType,
) -> None:
    """Recomputed from the copy's per-round ratios that each report saved itself."""
    every = run_script(str(LATE_RUN), str(NUMPY_RUN))
    statistic, cells, below = 0.0, 0, 0
    for path in (LATE_RUN, NUMPY_RUN):
        for comparison in json.loads(path.read_text())["comparisons"]:
            ratios = comparison["control_round_ratios"]
            slower, counted = sum(r < 1 for r in ratios), sum(r != 1 for r in ratios)
            statistic += (slower - counted / 2) ** 2 / (counted / 4)
            cells += 1
            below += over_runs.sign_test(slower, counted) < 0.05
    line = next(line for line in every.stdout.splitlines() if line.startswith("Calibration:"))
    assert f"over {cells} run cells" in line
    assert f"spread {statistic / cells:.2f} times" in line
    assert f"chi-square {statistic:.1f} on {cells} degrees of freedom" in line
    assert f"and {below} cells have a sign test below 0.05" in line


def test_elastic_against_the_copy_counts_the_rounds_where_its_ratio_is_lower() -> None:
    report = json.loads(LATE_RUN.read_text())
    comparison = next(
        c for c in report["comparisons"] if c["workload"] == "numpy" and c["concurrency"] == 32
    )
    pairs = zip(comparison["round_ratios"], comparison["control_round_ratios"], strict=True)
    worse = better = 0
    for ours, copy in pairs:
        worse += ours < copy
        better += ours > copy
    result = run_script("--workload", "numpy", "--clients", "32", str(LATE_RUN))
    assert f"  elastic slower than the copy in {worse} of {worse + better} rounds" in (
        result.stdout
    )


def test_pinned_runs_are_left_out_unless_asked_for() -> None:
    pinned = RESULTS / "coordination-2026-12-03-pinned-control.json"
    default = run_script("--workload", "numpy", "--clients", "1", str(pinned), str(LATE_RUN))
    assert f"skipped {pinned.name}: no unpinned elastic mode" in default.stderr
    assert "All 1 runs together" in default.stdout
    asked = run_script(
        "--mode", "elastic+pin", "--workload", "numpy", "--clients", "1", str(pinned)
    )
    assert asked.returncode == 0, asked.stderr
    assert _row(asked.stdout, pinned.stem)[1] == "static C=1 T=2, pinned"


def test_runs_that_differ_in_plan_or_split_are_pointed_out() -> None:
    older = RESULTS / "coordination-2026-12-03-active-control-n1.json"  # OpenBLAS timeout 2^16
    result = run_script("--workload", "numpy", "--clients", "1", str(older), str(LATE_RUN))
    assert result.returncode == 0, result.stderr
    assert "note: numpy at 1 clients pools runs that differ in wait variables: " in result.stderr
    assert "obt 16, spin 10000, obt 20, spin 10000" in result.stderr
    same = run_script("--workload", "numpy", "--clients", "1", str(NUMPY_RUN), str(LATE_RUN))
    assert "note:" not in same.stderr


def test_a_bad_report_among_good_ones_is_named_and_skipped(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    broken = tmp_path / "broken.json"
    report = json.loads(LATE_RUN.read_text())
    report["workers"] = ["not a worker"]  # what a hand-edited report might hold
    report["summaries"][0]["throughput_by_round"] = None
    broken.write_text(json.dumps(report))
    result = run_script(str(empty), str(broken), str(LATE_RUN))
    assert result.returncode == 0, result.stderr
    assert f"{empty}: not a coordination.py report (no list comparisons" in result.stderr
    assert f"{broken}: not a coordination.py report (" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{LATE_RUN}: not a" not in result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| numpy |")]
    assert all(row.split(" | ")[2] == "1" for row in rows)  # the late run alone


def test_reports_without_the_cell_or_a_copy_are_skipped_and_named() -> None:
    result = run_script("--workload", "numpy", "--clients", "1", str(NO_CONTROL_RUN), str(LATE_RUN))
    assert result.returncode == 0, result.stderr
    assert f"skipped {NO_CONTROL_RUN.name}: no copy of the best split" in result.stderr
    assert "All 1 runs together" in result.stdout

    alone = run_script("--workload", "numpy", "--clients", "1", str(NO_CONTROL_RUN))
    assert alone.returncode == 1
    assert "no report has numpy at 1 clients with elastic and a copy" in alone.stderr


def _slow_by_hand(
    report: dict[str, object], mode: str, factor: float, steal_limit: float
) -> tuple[int, int, int, int]:
    """Slow requests, requests, rounds with one, rounds: read from the raw cells here."""
    cells = report["raw_cells"]
    assert isinstance(cells, list)
    slow = requests = rounds_with = rounds = 0
    for c in cells:
        if (c["workload"], c["concurrency"], c["mode"]) != ("minilm", 1, mode):
            continue
        if c["steal_cores"] > steal_limit:
            continue
        median = statistics.median(c["latencies_us"])
        n = sum(x > factor * median for x in c["latencies_us"])
        slow, requests = slow + n, requests + len(c["latencies_us"])
        rounds_with, rounds = rounds_with + (n > 0), rounds + 1
    return slow, requests, rounds_with, rounds


def test_slow_requests_are_counted_per_round_and_pooled_over_the_runs() -> None:
    """Each process's requests over the factor times its round's median, rounds with more
    steal than the limit left out, as read from the raw cells independently."""
    runs = (LATE_RUN, RESULTS / "coordination-2026-12-05-late-night-control.json")
    for factor, steal_limit in ((1.4, 0.05), (1.2, 2.0)):
        result = run_script(
            "--workload", "minilm", "--clients", "1",
            "--slow-factor", str(factor), "--steal-limit", str(steal_limit),
            *map(str, runs),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (
            f"Requests over {factor:g}x their round's median, in rounds whose cell lost at most "
            f"{steal_limit:g} core to steal:"
        ) in result.stdout
        reports = [json.loads(path.read_text()) for path in runs]
        shares = {}
        for who, mode in (
            ("elastic", "elastic"),
            ("the split", "static-2"),
            ("the copy", "static-2-copy"),
        ):
            per_run = [_slow_by_hand(r, mode, factor, steal_limit) for r in reports]
            slow, requests, rounds_with, rounds = (sum(x) for x in zip(*per_run, strict=True))
            assert requests > 0
            line = (
                f"  {who}: {slow} of {requests} ({100 * slow / requests:.2f} %), "
                f"in {rounds_with} of {rounds} rounds"
            )
            assert line in result.stdout.splitlines()
            shares[mode] = [s / n for s, n, _, _ in per_run]
        if steal_limit == 2.0:
            assert rounds == 20  # nothing left out
        above = sum(e > s for e, s in zip(shares["elastic"], shares["static-2"], strict=True))
        differ = sum(e != s for e, s in zip(shares["elastic"], shares["static-2"], strict=True))
        assert f"share was above the split's: {above} of {differ} that differ" in result.stdout


def test_a_factor_above_every_request_finds_none_slow() -> None:
    result = run_script(
        "--workload", "minilm", "--clients", "1", "--slow-factor", "100", str(LATE_RUN)
    )
    assert result.returncode == 0, result.stderr
    assert "  elastic: 0 of " in result.stdout
    assert "  the split: 0 of " in result.stdout
    assert "share was above the split's: -; above the copy's: -" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clients", "1"], "--clients needs --workload: a row per run is for one cell"),
        (["--workload", "numpy", "--clients", "x"], "invalid int value: 'x'"),
        (["--workload", "torch", "--clients", "1"], "invalid choice: 'torch'"),
        (["--steal-margin", "0"], "--steal-margin must be above 0 and at most 2 cores, got 0.0"),
        (["--mode", "static-2"], "'static-2' is a static mode"),
        (["--mode", "elastic+fast"], "unknown mode 'elastic+fast'"),
        (["--workload", "numpy", "--clients", "0"], "--clients must be 1 or more, got 0"),
        (["--slow-factor", "1"], "--slow-factor must be above 1 and at most 100, got 1.0"),
        (["--steal-limit", "-0.1"], "--steal-limit must be 0 to 2 cores, got -0.1"),
    ],
)
def test_bad_arguments_are_named(args: list[str], message: str) -> None:
    result = run_script(*args, str(LATE_RUN))
    assert result.returncode == 2
    assert message in result.stderr


def test_a_file_that_is_not_a_report_is_named(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"comparisons": [{"workload": "numpy"}]}')
    result = run_script("--workload", "numpy", "--clients", "1", str(bogus))
    assert result.returncode == 1
    assert f"{bogus}: not a coordination.py report" in result.stderr
