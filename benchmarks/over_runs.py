"""Cells of several saved coordination runs, round by round: elastic and the split's copy.

Run ``python benchmarks/over_runs.py [--workload numpy] [--clients 1] REPORT.json ...`` (reads
the reports' summaries and raw cells; runs nothing).

A single run's ratio at one cell moves with the host from run to run, so a cell that misses a
target in one run and meets it in the next says little by itself. Every run with ``--control``
also ran a second process of the best split, which differs from it in nothing, so the rounds of
many runs together can say whether elastic falls behind the split more often than the copy does.

With ``--workload`` and ``--clients``, for each report that has the cell, elastic as deployed
and the copy, this prints:

* elastic's and the copy's median per-round ratio to the best split (throughput and p99), and
  in how many rounds each did worse than the split (lower throughput, higher p99);
* how much more of the machine the hypervisor took (steal, in cores) during elastic's cell than
  during the split's in the same round, the copy's likewise, and Spearman's correlation between
  elastic's per-round throughput ratio and that difference;
* the environment elastic's worker ran with (OpenBLAS's timeout, libgomp's spin count), since
  the runs span changes of the passive plan;

then the rounds of all reports together, with two-sided sign tests against "as likely worse
as better". Without ``--clients``, the pooled counts of every cell, a row each, then the
table's sign tests taken together (which stay below 0.05 after Holm's adjustment for their
number) and a calibration: whether the copy's rounds, which differ from the split's in
nothing, spread as independent rounds would. Steal counts take the rounds in which the two
cells' steal differed by ``--steal-margin`` cores or more. Reports from before the benchmark
recorded steal show "-" there.

With ``--clients``, it also counts the slow requests of each process in the cell: those that
took more than ``--slow-factor`` times the median of their own round, in the rounds whose cell
lost at most ``--steal-limit`` cores to steal. A pooled p99 of a few hundred requests is set
by its few slowest, so whether one process has more of them, and whether they come in more
rounds or in longer bursts within a round, says what sets its p99 when steal does not.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coordination  # this directory is on sys.path when run as a script
from service_times import spearman

WORKLOAD_ORDER = {"numpy": 0, "minilm": 1}
WAIT_VARIABLES = {"OPENBLAS_THREAD_TIMEOUT": "obt", "GOMP_SPINCOUNT": "spin"}
REPORT_LISTS = ("comparisons", "summaries", "modes", "raw_cells")
# What a malformed report raises anywhere in reading it: it is skipped and named.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError)


def sign_test(worse: int, rounds: int) -> float:
    """Two-sided exact binomial p of *worse* of *rounds* under p = 1/2 (1.0 for no rounds)."""
    if not 0 <= worse <= rounds:
        raise ValueError(f"{worse} worse of {rounds} rounds")
    tail = min(worse, rounds - worse)
    probability = sum(math.comb(rounds, k) for k in range(tail + 1)) / (1 << rounds)
    return min(1.0, 2 * probability)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of *pvalues* for testing them together, in their order.

    The smallest p is multiplied by the number of tests, the next by one fewer, and so on, each
    at least the one before: an adjusted p below 0.05 holds at 0.05 for the whole family,
    where a table of many raw p-values shows some below 0.05 by chance alone.
    """
    if any(not 0 <= p <= 1 for p in pvalues):
        raise ValueError(f"p-values must lie in [0, 1], got {list(pvalues)}")
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


@dataclass(frozen=True)
class Signs:
    """Rounds worse and better, ties left out, as a sign test takes them."""

    worse: int = 0
    better: int = 0

    @classmethod
    def of(cls, differences: Sequence[float]) -> Signs:
        """*differences*: positive where worse, negative where better, 0 a tie."""
        return cls(sum(d > 0 for d in differences), sum(d < 0 for d in differences))

    def __add__(self, other: Signs) -> Signs:
        return Signs(self.worse + other.worse, self.better + other.better)

    @property
    def counted(self) -> int:
        return self.worse + self.better

    @property
    def p(self) -> float:
        return sign_test(self.worse, self.counted)

    def text(self, unit: str = "") -> str:
        """ "worse of (worse + better)[unit] (p = ...)"; "-" where no round counts."""
        if not self.counted:
            return "-"
        return f"{self.worse} of {self.counted}{unit} ({_p_text(self.p)})"


@dataclass(frozen=True)
class Pairing:
    """One mode's rounds against the best split's rounds of the same run, round order."""

    rounds: list[str]
    throughput: list[float]  # the mode's over the split's, per round
    p99: list[float]
    extra_steal: list[float]  # cores, the mode's cell minus the split's; empty if not recorded

    @property
    def slower(self) -> Signs:
        return Signs.of([1 - r for r in self.throughput])

    @property
    def slower_p99(self) -> Signs:
        return Signs.of([r - 1 for r in self.p99])

    def more_steal(self, margin: float) -> Signs:
        """Rounds whose two cells' steal was *margin* cores or more apart: the mode's above
        (worse) or below. Nearer than that is a tie: /proc/stat counts whole ticks."""
        return Signs.of([s if abs(s) >= margin else 0.0 for s in self.extra_steal])

    def correlation(self) -> str:
        """Spearman's rho of the throughput ratio with the extra steal, over the rounds."""
        if not self.extra_steal:
            return "-"
        rho = spearman(self.throughput, self.extra_steal)
        return "-" if math.isnan(rho) else f"{rho:.2f}"


@dataclass(frozen=True)
class SlowRequests:
    """One process's requests in a cell that took more than a factor times their round's
    median, over the rounds counted."""

    slow: int = 0
    requests: int = 0
    rounds_with_slow: int = 0
    rounds: int = 0

    def __add__(self, other: SlowRequests) -> SlowRequests:
        return SlowRequests(
            self.slow + other.slow,
            self.requests + other.requests,
            self.rounds_with_slow + other.rounds_with_slow,
            self.rounds + other.rounds,
        )

    @property
    def share(self) -> float:
        return self.slow / self.requests if self.requests else 0.0

    def text(self) -> str:
        if not self.requests:
            return "no round counted"
        return (
            f"{self.slow} of {self.requests} ({100 * self.share:.2f} %), "
            f"in {self.rounds_with_slow} of {self.rounds} rounds"
        )


def slow_requests(
    report: dict[str, Any],
    workload: str,
    clients: int,
    mode: str,
    *,
    factor: float,
    steal_limit: float,
) -> SlowRequests:
    """*mode*'s slow requests in the cell; rounds from before steal was recorded count."""
    total = SlowRequests()
    for run in report["raw_cells"]:
        if not (
            run.get("kind") == "cell"
            and run["workload"] == workload
            and run["concurrency"] == clients
            and run["mode"] == mode
            and run["latencies_us"]
        ):
            continue
        if run.get("steal_cores") is not None and float(run["steal_cores"]) > steal_limit:
            continue
        latencies = [float(x) for x in run["latencies_us"]]
        limit = factor * statistics.median(latencies)
        slow = sum(x > limit for x in latencies)
        total += SlowRequests(slow, len(latencies), int(slow > 0), 1)
    return total


@dataclass(frozen=True)
class SlowTails:
    """The slow requests of the mode, the split and the copy in one run's cell."""

    mode: SlowRequests = SlowRequests()
    split: SlowRequests = SlowRequests()
    copy: SlowRequests = SlowRequests()

    def __add__(self, other: SlowTails) -> SlowTails:
        return SlowTails(self.mode + other.mode, self.split + other.split, self.copy + other.copy)


@dataclass(frozen=True)
class RunCell:
    name: str
    best: str
    env: str
    pinned: bool
    elastic: Pairing  # elastic as deployed, or the mode of --mode
    copy: Pairing
    slow: SlowTails = SlowTails()  # counted only where asked for (--clients)

    def head_to_head(self) -> Signs:
        """Rounds in which the mode served fewer requests/s than the copy: both ratios share
        the split's round as denominator, so comparing them compares the two processes."""
        copy = dict(zip(self.copy.rounds, self.copy.throughput, strict=True))
        return Signs.of(
            [
                copy[r] - ours
                for r, ours in zip(self.elastic.rounds, self.elastic.throughput, strict=True)
                if r in copy
            ]
        )


def _env_text(report: dict[str, Any], workload: str, mode: str) -> str:
    """The wait variables the mode's worker ran with; reports before they were kept say so."""
    for worker in report.get("workers", []):
        if worker.get("workload") == workload and worker.get("mode") == mode:
            env = worker.get("env") or {}
            if not all(name in env for name in WAIT_VARIABLES):
                return "not recorded"
            return ", ".join(
                f"{short} {env[name] or 'unset'}" for name, short in WAIT_VARIABLES.items()
            )
    return "not recorded"


def _mode_and_copy(
    report: dict[str, Any], best: str, mode: str | None
) -> tuple[coordination.Mode | None, str | None]:
    """*mode* (default: elastic as deployed, unpinned) and the key of the copy of the split
    *best*, where the run has them."""
    modes = [coordination.mode_from_key(m["key"]) for m in report["modes"]]
    ours = next(
        (m for m in modes if (m.key == mode if mode else m.is_elastic and not m.pinned)), None
    )
    return ours, coordination.copy_key(modes, coordination.mode_from_key(best))


def _pair(
    report: dict[str, Any], workload: str, clients: int, mode: str, best: str
) -> Pairing | None:
    summaries = {
        s["mode"]: s
        for s in report["summaries"]
        if s["workload"] == workload and s["concurrency"] == clients
    }
    ours, theirs = summaries.get(mode), summaries.get(best)
    if ours is None or theirs is None:
        return None
    # The order coordination._round_ratios gives its ratios in.
    rounds = [
        r
        for r in sorted(ours["throughput_by_round"], key=int)
        if r in theirs["throughput_by_round"]
    ]
    steal: dict[tuple[str, int], float] = {}
    for run in report["raw_cells"]:
        if (
            run.get("kind") == "cell"
            and run["workload"] == workload
            and run["concurrency"] == clients
            and run.get("steal_cores") is not None
        ):
            steal[(run["mode"], int(run["round"]))] = float(run["steal_cores"])
    recorded = all((m, int(r)) in steal for m in (mode, best) for r in rounds)
    return Pairing(
        rounds=rounds,
        throughput=coordination._round_ratios(ours, theirs),
        p99=coordination._round_ratios(ours, theirs, "p99_ms_by_round"),
        extra_steal=[steal[(mode, int(r))] - steal[(best, int(r))] for r in rounds]
        if recorded
        else [],
    )


def read_cell(
    name: str,
    report: dict[str, Any],
    workload: str,
    clients: int,
    mode: str | None = None,
    *,
    slow_factor: float | None = None,
    steal_limit: float = 0.05,
) -> RunCell | str:
    """The cell of one report, with *mode* (default: elastic as deployed) against the best
    split, or why it has none; with *slow_factor*, each process's slow requests too."""
    comparison = next(
        (
            c
            for c in report["comparisons"]
            if c["workload"] == workload and c["concurrency"] == clients
        ),
        None,
    )
    if comparison is None:
        return "no such cell"
    label = comparison["best_static"]
    best = next(
        (
            s["mode"]
            for s in report["summaries"]
            if s["label"] == label and s["workload"] == workload
        ),
        None,
    )
    if best is None:
        return f"no summary for {label!r}"
    if any(
        "throughput_by_round" not in s or "p99_ms_by_round" not in s for s in report["summaries"]
    ):
        return "no per-round figures (a report from before they were kept)"
    ours, copy_key = _mode_and_copy(report, best, mode)
    if ours is None:
        return f"no mode {mode!r}" if mode else "no unpinned elastic mode"
    if copy_key is None:
        return "no copy of the best split (a run without --control)"
    elastic = _pair(report, workload, clients, ours.key, best)
    copy = _pair(report, workload, clients, copy_key, best)
    if elastic is None or copy is None:
        return f"{ours.key} or the copy did not run this cell"
    env = _env_text(report, workload, ours.key)
    slow = (
        SlowTails(
            *(
                slow_requests(
                    report, workload, clients, key, factor=slow_factor, steal_limit=steal_limit
                )
                for key in (ours.key, best, copy_key)
            )
        )
        if slow_factor is not None
        else SlowTails()
    )
    return RunCell(name, label, env, ours.pinned, elastic, copy, slow)


def _median(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{round(statistics.median(values), digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"


@dataclass(frozen=True)
class Pooled:
    """One mode's rounds of a cell over every run, against the best split."""

    rounds: int
    slower: Signs
    slower_p99: Signs
    more_steal: Signs
    throughput: str  # median per-round ratios
    p99: str

    @classmethod
    def of(cls, pairings: Sequence[Pairing], margin: float) -> Pooled:
        return cls(
            rounds=sum(len(p.throughput) for p in pairings),
            slower=sum((p.slower for p in pairings), Signs()),
            slower_p99=sum((p.slower_p99 for p in pairings), Signs()),
            more_steal=sum((p.more_steal(margin) for p in pairings), Signs()),
            throughput=_median([r for p in pairings for r in p.throughput]),
            p99=_median([r for p in pairings for r in p.p99]),
        )

    def sentence(self, which: str, margin: float) -> str:
        steal = (
            f"steal {margin:g} core or more above the split's in "
            + self.more_steal.text(" rounds where the two were that far apart")
            if self.more_steal.worse + self.more_steal.better
            else f"steal never {margin:g} core or more apart (or not recorded)"
        )
        return (
            f"  {which}: slower than the split in {self.slower.text(' rounds')}, "
            f"median ratio {self.throughput}; p99 higher in "
            f"{self.slower_p99.text(' rounds')}, median ratio {self.p99}; {steal}"
        )


def head_to_head(cells: Sequence[RunCell]) -> Signs:
    return sum((cell.head_to_head() for cell in cells), Signs())


def _rounds(cell: RunCell) -> str:
    ours, copy = len(cell.elastic.rounds), len(cell.copy.rounds)
    return str(ours) if ours == copy else f"{ours} ({copy} for the copy)"


def print_runs(cells: Sequence[RunCell], margin: float, who: str) -> None:
    """One cell: a row per run, then the rounds pooled; *who* names the mode set against the
    split (elastic, or a variant's key)."""
    print(
        f"| run | best split | {who} env | rounds | median req/s ratio: {who} | the copy | "
        f"slower rounds: {who} | the copy | median p99 ratio: {who} | the copy | "
        f"p99 higher: {who} | the copy | median extra steal, cores: {who} | the copy | "
        f"Spearman(ratio, extra steal): {who} | the copy |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---:|---:|---|---|---:|---:|---:|---:|")
    for cell in cells:
        e, c = cell.elastic, cell.copy

        def counted(signs: Signs) -> str:
            return f"{signs.worse} of {signs.worse + signs.better}"

        print(
            f"| {cell.name} | {cell.best} | {cell.env} | {_rounds(cell)} | "
            f"{_median(e.throughput)} | {_median(c.throughput)} | "
            f"{counted(e.slower)} | {counted(c.slower)} | "
            f"{_median(e.p99)} | {_median(c.p99)} | "
            f"{counted(e.slower_p99)} | {counted(c.slower_p99)} | "
            f"{_median(e.extra_steal, 3)} | {_median(c.extra_steal, 3)} | "
            f"{e.correlation()} | {c.correlation()} |"
        )
    print()
    print(f"All {len(cells)} runs together (medians of per-round ratios; sign tests two-sided):")
    print(Pooled.of([cell.elastic for cell in cells], margin).sentence(who, margin))
    print(Pooled.of([cell.copy for cell in cells], margin).sentence("copy", margin))
    print(f"  {who} slower than the copy in {head_to_head(cells).text(' rounds')}")


def print_slow(cells: Sequence[RunCell], factor: float, steal_limit: float, who: str) -> None:
    """The slow requests of one cell pooled over the runs, and in how many runs the mode had
    the larger share."""
    pooled = sum((cell.slow for cell in cells), SlowTails())
    print()
    print(
        f"Requests over {factor:g}x their round's median, in rounds whose cell lost at most "
        f"{steal_limit:g} core to steal:"
    )
    print(f"  {who}: {pooled.mode.text()}")
    print(f"  the split: {pooled.split.text()}")
    print(f"  the copy: {pooled.copy.text()}")
    counted = [cell.slow for cell in cells if cell.slow.mode.requests]
    above_split = Signs.of([s.mode.share - s.split.share for s in counted if s.split.requests])
    above_copy = Signs.of([s.mode.share - s.copy.share for s in counted if s.copy.requests])
    print(
        f"  runs in which {who}'s share was above the split's: "
        f"{above_split.text(' that differ')}; above the copy's: "
        f"{above_copy.text(' that differ')}"
    )


def print_cells(by_cell: dict[tuple[str, int], list[RunCell]], margin: float, who: str) -> None:
    """Every cell: its rounds over every run pooled, a row per cell."""
    print(
        f"| workload | N | runs | rounds | slower than the split: {who} | the copy | "
        f"{who} slower than the copy | "
        f"median req/s ratio: {who} | the copy | p99 higher: {who} | the copy | "
        f"median p99 ratio: {who} | the copy | steal {margin:g}+ core above: {who} | "
        "the copy |"
    )
    print("|---|---:|---:|---:|---|---|---|---:|---:|---|---|---:|---:|---|---|")
    family: list[tuple[str, Signs]] = []
    for (workload, clients), cells in by_cell.items():
        e = Pooled.of([cell.elastic for cell in cells], margin)
        c = Pooled.of([cell.copy for cell in cells], margin)
        versus_copy = head_to_head(cells)
        where = f"{workload} at {clients}"
        family += [
            (f"{where}: {who} slower than the split", e.slower),
            (f"{where}: the copy slower than the split", c.slower),
            (f"{where}: {who} slower than the copy", versus_copy),
            (f"{where}: {who}'s p99 higher than the split's", e.slower_p99),
            (f"{where}: the copy's p99 higher than the split's", c.slower_p99),
        ]
        print(
            f"| {workload} | {clients} | {len(cells)} | {e.rounds} | {e.slower.text()} | "
            f"{c.slower.text()} | {versus_copy.text()} | {e.throughput} | "
            f"{c.throughput} | {e.slower_p99.text()} | {c.slower_p99.text()} | {e.p99} | "
            f"{c.p99} | {e.more_steal.text()} | {c.more_steal.text()} |"
        )
    print()
    print(
        "Rounds pooled over the runs, ties left out; p: two-sided sign test against as likely "
        f"worse as better; steal above: rounds in which the mode's cell lost {margin:g} core or "
        "more to steal beyond the split's, of those in which the two were that far apart."
    )
    print()
    print(family_sentence(family))
    print()
    print(calibration_sentence([cell for cells in by_cell.values() for cell in cells]))


def family_sentence(family: Sequence[tuple[str, Signs]], alpha: float = 0.05) -> str:
    """What the table's sign tests say together: how many fall below *alpha* as printed, and
    which still do after Holm's adjustment for their number (the steal columns are a
    diagnosis, not a comparison, and are left out)."""
    tested = [(what, signs.p) for what, signs in family if signs.counted]
    if not tested:
        return "No sign test in this table counted a round."
    adjusted = holm([p for _, p in tested])
    below = sum(p < alpha for _, p in tested)
    # By adjusted p, then raw p: adjusted values tie (at 1.0, or where a larger raw p takes
    # the running maximum), and the raw p says which of the tied is the stronger.
    ranked = sorted(
        ((q, p, what) for (what, p), q in zip(tested, adjusted, strict=True)),
        key=lambda item: item[:2],
    )
    held = [item for item in ranked if item[0] < alpha]
    head = (
        f"Taken together: {len(tested)} sign tests in the comparison columns, {below} with "
        f"p < {alpha:g} as printed (at most {alpha * len(tested):.1f} expected by chance alone). "
    )
    if held:
        return (
            head
            + f"After Holm's adjustment for {len(tested)} tests, below {alpha:g}: "
            + ("; ".join(f"{what} ({_p_text(p)}, adjusted {_p_text(q)})" for q, p, what in held))
        )
    q, p, what = ranked[0]
    return head + (
        f"After Holm's adjustment for {len(tested)} tests, none is below {alpha:g}; the "
        f"smallest is {what} ({_p_text(p)}, adjusted {_p_text(q)})."
    )


def chi_square_upper(statistic: float, degrees: int) -> float:
    """P(chi-square with *degrees* degrees of freedom >= *statistic*), by Wilson and
    Hilferty's cube-root normal approximation (within 0.01 from a few degrees up)."""
    if degrees < 1:
        raise ValueError(f"degrees of freedom must be 1 or more, got {degrees}")
    if statistic <= 0:
        return 1.0
    spread = 2 / (9 * degrees)
    z = ((statistic / degrees) ** (1 / 3) - (1 - spread)) / math.sqrt(spread)
    return 0.5 * math.erfc(z / math.sqrt(2))


def calibration_sentence(cells: Sequence[RunCell]) -> str:
    """How far the copy's rounds behave as the sign tests assume.

    The copy runs the split's very configuration, so in each run's cell the number of rounds it
    was slower is binomial (n, 1/2) if rounds are independent. A process that is lastingly
    faster or slower than another of the same configuration (placement, memory layout) would
    make a run's rounds agree with each other, and these counts spread wider than that: the
    dispersion index (chi-square over its degrees of freedom) rises above 1.
    """
    counts = [signs for signs in (c.copy.slower for c in cells) if signs.counted]
    if not counts:
        return "Calibration: no run cell of the copy counted a round."
    statistic = sum((s.worse - s.counted / 2) ** 2 / (s.counted / 4) for s in counts)
    below = sum(s.p < 0.05 for s in counts)
    p = chi_square_upper(statistic, len(counts))
    return (
        f"Calibration: the copy against the split (one configuration in two processes), over "
        f"{len(counts)} run cells: its slower-round counts spread {statistic / len(counts):.2f} "
        f"times as widely as independent rounds would make them (chi-square {statistic:.1f} on "
        f"{len(counts)} degrees of freedom, {_p_text(p)} for wider), and {below} cells have a "
        f"sign test below 0.05 (at most {0.05 * len(counts):.1f} by chance alone)."
    )


def mixed_runs(cells: Sequence[RunCell]) -> str | None:
    """What differs between the runs pooled in one cell, if anything does."""
    differences = [
        f"{what}: {', '.join(sorted(values))}"
        for what, values in (
            ("best split", {cell.best for cell in cells}),
            ("wait variables", {cell.env for cell in cells}),
            ("pinned", {str(cell.pinned) for cell in cells}),
        )
        if len(values) > 1
    ]
    return "; ".join(differences) or None


def _levels(reports: Sequence[dict[str, Any]], workload: str | None) -> list[tuple[str, int]]:
    return sorted(
        {
            (c["workload"], int(c["concurrency"]))
            for report in reports
            for c in report["comparisons"]
            if workload is None or c["workload"] == workload
        },
        key=lambda cell: (WORKLOAD_ORDER.get(cell[0], len(WORKLOAD_ORDER)), cell),
    )


def load_report(path: Path) -> dict[str, Any]:
    """A report's JSON, checked for the lists this reads (ValueError naming what is missing)."""
    report = json.loads(path.read_text())
    if not isinstance(report, dict):
        raise ValueError(f"a JSON {type(report).__name__}, not an object")
    missing = [key for key in REPORT_LISTS if not isinstance(report.get(key), list)]
    if missing:
        raise ValueError(f"no list {', '.join(missing)}")
    return report


def _check_mode(key: str) -> str:
    try:
        mode = coordination.mode_from_key(key)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if mode.kind != "elastic":
        raise argparse.ArgumentTypeError(
            f"--mode takes elastic or one of its variants (elastic+active, elastic+obt20, "
            f"elastic+spin300000, ...); {key!r} is a {mode.kind} mode"
        )
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("reports", type=Path, nargs="+", help="coordination.py runs' .json")
    parser.add_argument("--workload", choices=tuple(WORKLOAD_ORDER), help="default: both")
    parser.add_argument(
        "--clients", type=int, help="one concurrency level: a row per run (default: every cell)"
    )
    parser.add_argument(
        "--mode",
        type=_check_mode,
        help="the elastic mode set against the best split, by its key, e.g. elastic+spin300000 "
        "or elastic+pin (default: elastic as deployed, unpinned)",
    )
    parser.add_argument(
        "--steal-margin",
        type=float,
        default=0.1,
        help="cores of steal by which two cells must differ to count (0.1)",
    )
    parser.add_argument(
        "--slow-factor",
        type=float,
        default=1.4,
        help="with --clients: a request is slow above this many times its round's median (1.4)",
    )
    parser.add_argument(
        "--steal-limit",
        type=float,
        default=0.05,
        help="with --clients: rounds whose cell lost more cores than this to steal are left out "
        "of the slow-request counts (0.05)",
    )
    args = parser.parse_args(argv)
    if not 1 < args.slow_factor <= 100:
        parser.error(f"--slow-factor must be above 1 and at most 100, got {args.slow_factor}")
    if not 0 <= args.steal_limit <= 2:
        parser.error(f"--steal-limit must be 0 to 2 cores, got {args.steal_limit}")
    if not 0 < args.steal_margin <= 2:
        parser.error(f"--steal-margin must be above 0 and at most 2 cores, got {args.steal_margin}")
    if args.clients is not None and args.workload is None:
        parser.error("--clients needs --workload: a row per run is for one cell")
    if args.clients is not None and args.clients < 1:
        parser.error(f"--clients must be 1 or more, got {args.clients}")
    who = args.mode or "elastic"

    reports: list[tuple[Path, dict[str, Any]]] = []
    for path in args.reports:
        try:
            reports.append((path, load_report(path)))
        except (OSError, ValueError) as error:
            print(f"{path}: not a coordination.py report ({error}); skipped", file=sys.stderr)
    by_cell: dict[tuple[str, int], list[RunCell]] = {}
    used: set[Path] = set()
    why: dict[Path, str] = {}
    for path, report in reports:
        try:
            wanted = (
                [(args.workload, args.clients)]
                if args.clients is not None
                else _levels([report], args.workload)
            )
            found_cells = [
                (
                    (workload, clients),
                    read_cell(
                        path.stem,
                        report,
                        workload,
                        clients,
                        args.mode,
                        slow_factor=args.slow_factor if args.clients is not None else None,
                        steal_limit=args.steal_limit,
                    ),
                )
                for workload, clients in wanted
            ]
        except MALFORMED as error:
            print(f"{path}: not a coordination.py report ({error!r}); skipped", file=sys.stderr)
            continue
        for cell, found in found_cells:
            if isinstance(found, str):
                why.setdefault(path, found)
            else:
                by_cell.setdefault(cell, []).append(found)
                used.add(path)
    for path, reason in why.items():
        if path not in used:
            print(f"skipped {path.name}: {reason}", file=sys.stderr)
    if not by_cell:
        cell_text = (
            f"{args.workload} at {args.clients} clients" if args.clients is not None else "a cell"
        )
        print(f"no report has {cell_text} with {who} and a copy of the split", file=sys.stderr)
        return 1
    by_cell = dict(sorted(by_cell.items(), key=lambda i: (WORKLOAD_ORDER.get(i[0][0], 9), i[0][1])))
    for (workload, clients), cells in by_cell.items():
        if mixed := mixed_runs(cells):
            print(
                f"note: {workload} at {clients} clients pools runs that differ in {mixed}",
                file=sys.stderr,
            )
    if args.clients is not None:
        cells = by_cell[(args.workload, args.clients)]
        print_runs(cells, args.steal_margin, who)
        print_slow(cells, args.slow_factor, args.steal_limit, who)
    else:
        print_cells(by_cell, args.steal_margin, who)
    return 0


if __name__ == "__main__":
    sys.exit(main())
