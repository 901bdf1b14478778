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
as better". Without ``--clients``, the pooled counts of every cell, a row each. Steal counts
take the rounds in which the two cells' steal differed by ``--steal-margin`` cores or more.
Reports from before the benchmark recorded steal show "-" there.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def sign_test(worse: int, rounds: int) -> float:
    """Two-sided exact binomial p of *worse* of *rounds* under p = 1/2 (1.0 for no rounds)."""
    if not 0 <= worse <= rounds:
        raise ValueError(f"{worse} worse of {rounds} rounds")
    tail = min(worse, rounds - worse)
    probability = sum(math.comb(rounds, k) for k in range(tail + 1)) / (1 << rounds)
    return min(1.0, 2 * probability)


@dataclass(frozen=True)
class Pairing:
    """One mode's rounds against the best split's rounds of the same run."""

    throughput: list[float]  # per-round ratios, round order
    p99: list[float]
    extra_steal: list[float]  # cores, the mode's cell minus the split's; empty if not recorded

    @property
    def slower(self) -> int:
        return sum(r < 1 for r in self.throughput)

    @property
    def slower_p99(self) -> int:
        return sum(r > 1 for r in self.p99)

    def more_steal(self, margin: float) -> int:
        """Rounds in which the mode's cell lost at least *margin* cores more to steal."""
        return sum(s >= margin for s in self.extra_steal)

    def less_steal(self, margin: float) -> int:
        return sum(s <= -margin for s in self.extra_steal)


@dataclass(frozen=True)
class RunCell:
    name: str
    best: str
    env: str
    elastic: Pairing
    copy: Pairing


def _env_text(report: dict[str, Any], workload: str, elastic: str) -> str:
    """The wait variables elastic's worker ran with; reports before they were kept say so."""
    for worker in report.get("workers", []):
        if worker.get("workload") == workload and worker.get("mode") == elastic:
            env = worker.get("env") or {}
            if not all(name in env for name in WAIT_VARIABLES):
                return "not recorded"
            return ", ".join(
                f"{short} {env[name] or 'unset'}" for name, short in WAIT_VARIABLES.items()
            )
    return "not recorded"


def _elastic_and_copy(
    report: dict[str, Any], best: str, mode: str | None
) -> tuple[str | None, str | None]:
    """Keys of *mode* (default: elastic as deployed) and of the copy of the split *best*,
    where the run has them."""
    modes = [coordination.mode_from_key(m["key"]) for m in report["modes"]]
    split = dataclasses.replace(coordination.mode_from_key(best), key="")
    elastic = next((m.key for m in modes if (m.key == mode if mode else m.is_elastic)), None)
    copy = next(
        (
            m.key
            for m in modes
            if m.control and dataclasses.replace(m, key="", control=False) == split
        ),
        None,
    )
    return elastic, copy


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
    rounds = sorted(set(ours["throughput_by_round"]) & set(theirs["throughput_by_round"]), key=int)
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
        throughput=[
            ours["throughput_by_round"][r] / theirs["throughput_by_round"][r] for r in rounds
        ],
        p99=[ours["p99_ms_by_round"][r] / theirs["p99_ms_by_round"][r] for r in rounds],
        extra_steal=[steal[(mode, int(r))] - steal[(best, int(r))] for r in rounds]
        if recorded
        else [],
    )


def read_cell(
    name: str, report: dict[str, Any], workload: str, clients: int, mode: str | None = None
) -> RunCell | str:
    """The cell of one report, with *mode* (default: elastic as deployed) against the best
    split, or why it has none."""
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
    if any("throughput_by_round" not in s for s in report["summaries"]):
        return "no per-round figures (a report from before they were kept)"
    elastic_key, copy_key = _elastic_and_copy(report, best, mode)
    if elastic_key is None:
        return f"no mode {mode!r}" if mode else "no elastic mode"
    if copy_key is None:
        return "no copy of the best split (a run without --control)"
    elastic = _pair(report, workload, clients, elastic_key, best)
    copy = _pair(report, workload, clients, copy_key, best)
    if elastic is None or copy is None:
        return f"{mode or 'elastic'} or the copy did not run this cell"
    return RunCell(name, label, _env_text(report, workload, elastic_key), elastic, copy)


def _median(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return f"{round(statistics.median(values), digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"


def _counted(worse: int, rounds: int) -> str:
    return f"{worse} of {rounds}" if rounds else "-"


def _correlation(pairing: Pairing) -> str:
    if not pairing.extra_steal:
        return "-"
    rho = spearman(pairing.throughput, pairing.extra_steal)
    return "-" if math.isnan(rho) else f"{rho:.2f}"


@dataclass(frozen=True)
class Pooled:
    """One mode's rounds of a cell over every run, against the best split."""

    rounds: int
    slower: int
    slower_p99: int
    steal_rounds: int  # rounds where the two cells' steal differed by the margin or more
    more_steal: int
    throughput: str  # median per-round ratios
    p99: str

    @classmethod
    def of(cls, pairings: Sequence[Pairing], margin: float) -> Pooled:
        return cls(
            rounds=sum(len(p.throughput) for p in pairings),
            slower=sum(p.slower for p in pairings),
            slower_p99=sum(p.slower_p99 for p in pairings),
            steal_rounds=sum(p.more_steal(margin) + p.less_steal(margin) for p in pairings),
            more_steal=sum(p.more_steal(margin) for p in pairings),
            throughput=_median([r for p in pairings for r in p.throughput]),
            p99=_median([r for p in pairings for r in p.p99]),
        )

    def count(self, worse: int, of: int | None = None, unit: str = "") -> str:
        """ "*worse* of *of* [unit] (p = sign test)", *of* defaulting to every round."""
        of = self.rounds if of is None else of
        return f"{worse} of {of}{unit} (p = {sign_test(worse, of):.3f})" if of else "-"

    def sentence(self, which: str, margin: float) -> str:
        steal = (
            f"steal {margin:g} core or more above the split's in "
            + self.count(
                self.more_steal, self.steal_rounds, " rounds where it was that far above or below"
            )
            if self.steal_rounds
            else f"steal never {margin:g} core apart (or not recorded)"
        )
        return (
            f"  {which}: slower than the split in {self.count(self.slower, unit=' rounds')}, "
            f"median ratio {self.throughput}; p99 higher in "
            f"{self.count(self.slower_p99, unit=' rounds')}, median ratio {self.p99}; {steal}"
        )


def print_runs(cells: Sequence[RunCell], margin: float, who: str) -> None:
    """One cell: a row per run, then the rounds pooled; *who* names the mode set against the
    split (elastic, or a variant's key)."""
    print(
        f"| run | best split | {who} env | rounds | req/s ratio: {who} | the copy | "
        f"slower rounds: {who} | the copy | p99 ratio: {who} | the copy | "
        f"p99 higher: {who} | the copy | extra steal, cores: {who} | the copy | "
        f"Spearman({who} ratio, extra steal) |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---:|---:|---|---|---:|---:|---:|")
    for cell in cells:
        e, c = cell.elastic, cell.copy
        print(
            f"| {cell.name} | {cell.best} | {cell.env} | {len(e.throughput)} | "
            f"{_median(e.throughput)} | {_median(c.throughput)} | "
            f"{_counted(e.slower, len(e.throughput))} | {_counted(c.slower, len(c.throughput))} | "
            f"{_median(e.p99)} | {_median(c.p99)} | "
            f"{_counted(e.slower_p99, len(e.p99))} | {_counted(c.slower_p99, len(c.p99))} | "
            f"{_median(e.extra_steal, 3)} | {_median(c.extra_steal, 3)} | {_correlation(e)} |"
        )
    print()
    print(f"All {len(cells)} runs together (medians of per-round ratios; sign tests two-sided):")
    print(Pooled.of([cell.elastic for cell in cells], margin).sentence(who, margin))
    print(Pooled.of([cell.copy for cell in cells], margin).sentence("copy", margin))


def print_cells(by_cell: dict[tuple[str, int], list[RunCell]], margin: float, who: str) -> None:
    """Every cell: its rounds over every run pooled, a row per cell."""
    print(
        f"| workload | N | runs | rounds | slower than the split: {who} | the copy | "
        f"median req/s ratio: {who} | the copy | p99 higher: {who} | the copy | "
        f"median p99 ratio: {who} | the copy | steal {margin:g}+ core above: {who} | "
        "the copy |"
    )
    print("|---|---:|---:|---:|---|---|---:|---:|---|---|---:|---:|---|---|")
    for (workload, clients), cells in by_cell.items():
        e = Pooled.of([cell.elastic for cell in cells], margin)
        c = Pooled.of([cell.copy for cell in cells], margin)
        print(
            f"| {workload} | {clients} | {len(cells)} | {e.rounds} | {e.count(e.slower)} | "
            f"{c.count(c.slower)} | {e.throughput} | {c.throughput} | "
            f"{e.count(e.slower_p99)} | {c.count(c.slower_p99)} | {e.p99} | {c.p99} | "
            f"{e.count(e.more_steal, e.steal_rounds)} | {c.count(c.more_steal, c.steal_rounds)} |"
        )
    print()
    print(
        "Rounds pooled over the runs; p: two-sided sign test against as likely worse as "
        f"better; steal above: rounds in which the mode's cell lost {margin:g} core or more "
        "to steal beyond the split's, of those in which the two were that far apart."
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("reports", type=Path, nargs="+", help="coordination.py runs' .json")
    parser.add_argument("--workload", choices=tuple(WORKLOAD_ORDER), help="default: both")
    parser.add_argument(
        "--clients", type=int, help="one concurrency level: a row per run (default: every cell)"
    )
    parser.add_argument(
        "--mode",
        help="the mode set against the best split, by its key, e.g. elastic+spin300000 "
        "(default: elastic as deployed)",
    )
    parser.add_argument(
        "--steal-margin",
        type=float,
        default=0.1,
        help="cores of steal by which two cells must differ to count (0.1)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.steal_margin <= 2:
        parser.error(f"--steal-margin must be above 0 and at most 2 cores, got {args.steal_margin}")
    if args.clients is not None and args.workload is None:
        parser.error("--clients needs --workload: a row per run is for one cell")
    reports: list[tuple[Path, dict[str, Any]]] = []
    for path in args.reports:
        try:
            reports.append((path, json.loads(path.read_text())))
        except (OSError, ValueError) as error:
            print(f"{path}: not a coordination.py report ({error!r})", file=sys.stderr)
            return 1
    try:
        wanted = (
            [(args.workload, args.clients)]
            if args.clients is not None
            else _levels([report for _, report in reports], args.workload)
        )
        by_cell: dict[tuple[str, int], list[RunCell]] = {}
        used: set[Path] = set()
        why: dict[Path, str] = {}
        for workload, clients in wanted:
            for path, report in reports:
                cell = read_cell(path.stem, report, workload, clients, args.mode)
                if isinstance(cell, str):
                    why.setdefault(path, cell)
                else:
                    by_cell.setdefault((workload, clients), []).append(cell)
                    used.add(path)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        print(f"{path}: not a coordination.py report ({error!r})", file=sys.stderr)
        return 1
    for path, reason in why.items():
        if path not in used:
            print(f"skipped {path.name}: {reason}", file=sys.stderr)
    who = args.mode or "elastic"
    if not by_cell:
        cell_text = f"{args.workload} at {args.clients} clients" if args.clients else "a cell"
        print(f"no report has {cell_text} with a copy", file=sys.stderr)
        return 1
    if args.clients is not None:
        print_runs(by_cell[(args.workload, args.clients)], args.steal_margin, who)
    else:
        print_cells(by_cell, args.steal_margin, who)
    return 0


if __name__ == "__main__":
    sys.exit(main())
