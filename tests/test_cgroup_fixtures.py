"""Every checked-in fake root under tests/fixtures/cgroups against its expected.json.

Each scenario directory is a fake ``/``: ``proc/self/mountinfo``, ``proc/self/cgroup``, the cgroup
files at the paths the mountinfo points to and, where the scenario is about topology,
``sys/devices/system/cpu``. ``expected.json`` holds:

- ``limits``: the expected ``CgroupLimits`` fields (quota, quota_path, quota_version, cpuset as
  a sorted list or null, shares);
- ``cases``: affinity masks with the expected budget for each rounding policy, and optionally
  ``physical_cores``, ``online_cpus`` and ``binding`` (checked with the default rounding);
- ``warnings``: substrings that must each appear in some warning; an empty list means that no
  warning at all may be produced;
- ``notes``: substrings that must each appear in some note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from threadbudget import ThreadBudgetWarning, detect_budget
from threadbudget._cgroup import read_cgroup_limits

FIXTURES = Path(__file__).parent / "fixtures" / "cgroups"
SCENARIOS = sorted(path.parent for path in FIXTURES.glob("*/*/expected.json"))
ROUNDINGS = ("floor", "ceil", "nearest")


def _scenario_id(path: Path) -> str:
    return path.relative_to(FIXTURES).as_posix()


def _expected(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "expected.json").read_text(encoding="utf-8"))
    return data


def _contains(haystack: tuple[str, ...] | list[str], needle: str) -> bool:
    return any(needle in item for item in haystack)


def test_there_are_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 30, [_scenario_id(path) for path in SCENARIOS]


def test_every_scenario_has_the_files_it_needs() -> None:
    for root in SCENARIOS:
        expected = _expected(root)
        assert set(expected) >= {"description", "limits", "cases", "warnings", "notes"}, root
        assert set(expected["limits"]) == {
            "quota",
            "quota_path",
            "quota_version",
            "cpuset",
            "shares",
        }, root
        for case in expected["cases"]:
            assert set(case["budgets"]) <= set(ROUNDINGS), root


@pytest.mark.parametrize("root", SCENARIOS, ids=_scenario_id)
def test_cgroup_limits(root: Path) -> None:
    expected = _expected(root)
    want = expected["limits"]
    limits = read_cgroup_limits(root)

    if want["quota"] is None:
        assert limits.quota is None
    else:
        assert limits.quota == pytest.approx(want["quota"])
    assert limits.quota_path == want["quota_path"]
    assert limits.quota_version == want["quota_version"]
    assert (sorted(limits.cpuset) if limits.cpuset is not None else None) == want["cpuset"]
    assert limits.shares == want["shares"]

    if limits.quota_path is not None:
        quota_file = "cpu.max" if limits.quota_version == 2 else "cpu.cfs_quota_us"
        assert f"{limits.quota_path}/{quota_file}" in limits.files_read
        if limits.quota_version == 1:
            assert f"{limits.quota_path}/cpu.cfs_period_us" in limits.files_read
    if limits.cpuset_path is not None:
        assert limits.cpuset_path in limits.files_read
    if limits.shares_path is not None:
        assert limits.shares_path in limits.files_read
    # Every file read lies inside the fake root (nothing leaks from the real host).
    for path in limits.files_read:
        assert (root / path.lstrip("/")).exists(), path

    for note in expected["notes"]:
        budget_notes = detect_budget(
            root=root, affinity=frozenset({0}), environ={}, emit_warnings=False
        ).notes
        assert _contains(budget_notes, note), (note, budget_notes)


@pytest.mark.parametrize("root", SCENARIOS, ids=_scenario_id)
def test_budgets(root: Path) -> None:
    expected = _expected(root)
    seen_warnings: set[str] = set(read_cgroup_limits(root).warnings)
    for case in expected["cases"]:
        affinity = frozenset(case["affinity"])
        for rounding, want in case["budgets"].items():
            budget = detect_budget(
                root=root,
                affinity=affinity,
                rounding=rounding,
                environ={},
                emit_warnings=False,
            )
            assert budget.budget == want, (rounding, sorted(affinity), budget.explain())
            assert 1 <= budget.budget <= len(affinity)
            assert budget.rounding == rounding
            assert budget.affinity == tuple(sorted(affinity))
            seen_warnings.update(budget.warnings)
            if "physical_cores" in case:
                assert budget.physical_cores == case["physical_cores"]
            if "online_cpus" in case:
                assert budget.online_cpus == case["online_cpus"]
            # Shares are reported, never turned into a count (JDK-8281181).
            assert budget.shares == expected["limits"]["shares"]
        if "binding" in case:
            default = detect_budget(root=root, affinity=affinity, environ={}, emit_warnings=False)
            assert default.binding == case["binding"]

    if expected["warnings"]:
        for needle in expected["warnings"]:
            assert _contains(sorted(seen_warnings), needle), (needle, sorted(seen_warnings))
    else:
        assert not seen_warnings


@pytest.mark.parametrize("root", SCENARIOS, ids=_scenario_id)
def test_emitted_warnings_match_recorded_ones(root: Path) -> None:
    """With emit_warnings=True every recorded warning is emitted once, and nothing else."""
    expected = _expected(root)
    if expected["warnings"]:
        with pytest.warns(ThreadBudgetWarning) as record:
            budget = detect_budget(root=root, affinity=frozenset({0, 1}), environ={})
        assert [str(item.message) for item in record] == list(budget.warnings)
    else:
        budget = detect_budget(root=root, affinity=frozenset({0, 1}), environ={})
        assert budget.warnings == ()
