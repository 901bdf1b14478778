"""Real kernel: make cgroups under /sys/fs/cgroup/cpu, run a process inside, read its budget."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from .conftest import (
    PYTHON,
    cpu_cgroup,
    cpuset_cgroup,
    python_env,
    requires_cgroups,
    run_in_cgroups,
)

pytestmark = [pytest.mark.real_kernel, requires_cgroups]

HOST_CPUS = len(os.sched_getaffinity(0))


def info_json(cgroups: list[Path], *args: str, **env: str) -> dict[str, object]:
    result = run_in_cgroups(
        cgroups, [PYTHON, "-m", "threadbudget", "info", "--json", *args], env=python_env(**env)
    )
    assert result.returncode == 0, result.stderr
    budget = json.loads(result.stdout)["budget"]
    assert isinstance(budget, dict)
    return budget


@pytest.mark.parametrize(
    ("quota", "cpus", "floor", "ceil"),
    [
        (50_000, 0.5, 1, 1),
        (100_000, 1.0, 1, 1),
        (150_000, 1.5, 1, 2),
        (250_000, 2.5, HOST_CPUS, HOST_CPUS),
    ],
    ids=["half", "one", "one-and-a-half", "wider-than-host"],
)
def test_quota_is_detected_inside_the_cgroup(
    quota: int, cpus: float, floor: int, ceil: int
) -> None:
    with cpu_cgroup(quota) as (cgroup,):
        detected = info_json([cgroup])
        assert detected["quota"] == pytest.approx(cpus)
        assert detected["quota_path"] == str(cgroup)
        assert detected["quota_version"] == 1
        assert detected["budget"] == min(floor, HOST_CPUS)
        assert f"{cgroup}/cpu.cfs_quota_us" in detected["files_read"]  # type: ignore[operator]
        binding = "affinity" if cpus >= HOST_CPUS else "cgroup v1 quota"
        assert detected["binding"] == binding

        assert info_json([cgroup], "--rounding", "ceil")["budget"] == ceil
        from_env = info_json([cgroup], THREADBUDGET_ROUNDING="ceil")
        assert from_env["budget"] == ceil
        assert {"name": "rounding", "value": "ceil", "source": "env:THREADBUDGET_ROUNDING"} in (
            from_env["overrides"]  # type: ignore[operator]
        )


def test_limit_on_a_parent_binds_an_unlimited_child() -> None:
    with cpu_cgroup(100_000, None) as (parent, child):
        detected = info_json([child])
        assert detected["quota"] == pytest.approx(1.0)
        assert detected["quota_path"] == str(parent)
        assert detected["budget"] == 1
        assert f"{child}/cpu.cfs_quota_us" in detected["files_read"]  # type: ignore[operator]


def test_lowest_quota_on_the_path_wins() -> None:
    with cpu_cgroup(150_000, 50_000) as (_parent, child):
        detected = info_json([child])
        assert detected["quota"] == pytest.approx(0.5)
        assert detected["quota_path"] == str(child)
        assert detected["budget"] == 1


def test_one_cpu_cpuset_limits_affinity() -> None:
    with cpuset_cgroup("0") as cpuset:
        detected = info_json([cpuset])
        assert detected["affinity"] == [0]
        assert detected["cpuset"] == [0]
        assert detected["cpuset_path"] == f"{cpuset}/cpuset.effective_cpus"
        assert detected["quota"] is None
        assert detected["budget"] == 1
        assert detected["physical_cores"] == 1


def test_outside_any_limit_the_budget_is_the_host() -> None:
    with cpu_cgroup(None) as (cgroup,):
        detected = info_json([cgroup])
        assert detected["quota"] is None
        assert detected["budget"] == HOST_CPUS


def test_cgroups_made_by_tests_are_removed() -> None:
    with cpu_cgroup(100_000, None) as paths:
        assert all(path.is_dir() for path in paths)
    assert not any(path.exists() for path in paths)


@pytest.mark.torch
def test_run_gives_torch_the_budget_of_a_one_cpu_cgroup() -> None:
    pytest.importorskip("torch")
    probe = [PYTHON, "-c", "import torch; print(torch.get_num_threads())"]
    with cpu_cgroup(100_000) as (cgroup,):
        plain = run_in_cgroups([cgroup], probe, env=python_env())
        assert plain.returncode == 0, plain.stderr
        budgeted = run_in_cgroups(
            [cgroup], [PYTHON, "-m", "threadbudget", "run", "--", *probe], env=python_env()
        )
        assert budgeted.returncode == 0, budgeted.stderr
    # torch sizes itself by the host's physical cores and ignores the quota...
    assert plain.stdout.strip() == str(psutil.cpu_count(logical=False))
    # ...threadbudget run hands it the budget.
    assert budgeted.stdout.strip() == "1"
    assert "budget 1 (cgroup v1 quota)" in budgeted.stderr
