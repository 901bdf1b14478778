"""The ``threadbudget`` command, run as a real subprocess: ``info`` and ``run``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import threadbudget
from threadbudget import NATIVE_ENV_VARS, make_plan
from threadbudget._envvars import APPLIED_MARKER, planned_values

HAS_NUMPY = importlib.util.find_spec("numpy") is not None
PRINT_OMP = "import os; print(os.environ['OMP_NUM_THREADS'])"
PRINT_NATIVE_ENV = (
    "import json, os, sys; names = sys.argv[1].split(','); "
    "print(json.dumps({n: os.environ[n] for n in names if n in os.environ}))"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any thread or threadbudget setting."""
    names = {var.name for var in NATIVE_ENV_VARS}
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in names and not key.startswith("THREADBUDGET_")
    }
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, program: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(program or [sys.executable, "-m", "threadbudget"]), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env() if env is None else env,
        check=False,
    )


def info_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = cli("info", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


# --- info ------------------------------------------------------------------------------------


def test_info_json_has_every_section() -> None:
    info = info_json()
    assert {"budget", "plan", "env", "pools", "warnings"} <= set(info)
    budget = info["budget"]
    for key in (
        "budget",
        "quota",
        "quota_path",
        "affinity",
        "physical_cores",
        "rounding",
        "binding",
        "files_read",
        "overrides",
        "warnings",
        "explanation",
    ):
        assert key in budget, key
    assert isinstance(budget["budget"], int)
    assert budget["budget"] >= 1
    assert budget["budget"] <= len(budget["affinity"])
    assert budget["rounding"] == "floor"
    assert budget["overrides"] == []
    assert budget["explanation"].startswith(f"CPU budget: {budget['budget']} ")
    assert "/proc/self/cgroup" in budget["files_read"]

    plan = info["plan"]
    assert plan["budget"] == budget["budget"]
    assert plan["concurrency"] == 1
    assert plan["threads"] == budget["budget"]
    assert isinstance(info["warnings"], list)
    assert isinstance(info["pools"], dict)


def test_info_json_env_has_one_row_per_native_variable() -> None:
    info = info_json("--cpus", "1", env=clean_env(MKL_NUM_THREADS="3"))
    rows = info["env"]
    assert [row["name"] for row in rows] == [var.name for var in NATIVE_ENV_VARS]
    for row in rows:
        assert {"name", "value", "source", "planned"} <= set(row)
    by_name = {row["name"]: row for row in rows}
    expected = planned_values(make_plan(1, environ={}))
    for name, row in by_name.items():
        assert row["planned"] == expected.get(name), name
    assert by_name["MKL_NUM_THREADS"]["value"] == "3"
    assert by_name["MKL_NUM_THREADS"]["source"] == "user"
    assert by_name["OMP_NUM_THREADS"]["value"] is None
    assert by_name["OMP_NUM_THREADS"]["source"] == "unset"
    assert by_name["MKL_DYNAMIC"]["planned"] is None


def test_info_says_a_user_value_is_kept_over_the_plan() -> None:
    env = clean_env(GOMP_SPINCOUNT="300000", MKL_NUM_THREADS="1")
    rows = {
        row["name"]: row for row in info_json("--cpus", "2", "--concurrency", "2", env=env)["env"]
    }
    assert rows["GOMP_SPINCOUNT"]["planned"] == "10000"
    assert rows["GOMP_SPINCOUNT"]["after_apply"] == "300000"
    assert rows["OMP_NUM_THREADS"]["after_apply"] == "1"
    text = cli("info", "--cpus", "2", "--concurrency", "2", env=env).stdout
    spin_line = next(line for line in text.splitlines() if "GOMP_SPINCOUNT" in line)
    assert " ".join(spin_line.split()) == (
        "GOMP_SPINCOUNT 300000 / user -> 10000, but the user's value is kept"
    )
    # Same value as the plan: nothing to point out.
    mkl_line = next(line for line in text.splitlines() if "MKL_NUM_THREADS" in line)
    assert " ".join(mkl_line.split()) == "MKL_NUM_THREADS 1 / user -> 1"


def test_info_marks_values_threadbudget_exported() -> None:
    env = clean_env(OMP_NUM_THREADS="1", **{APPLIED_MARKER: "OMP_NUM_THREADS=1"})
    info = info_json(env=env)
    row = next(row for row in info["env"] if row["name"] == "OMP_NUM_THREADS")
    assert row["source"] == "threadbudget"


@pytest.mark.skipif(not HAS_NUMPY, reason="needs numpy")
def test_info_import_numpy_lists_an_openblas_pool() -> None:
    info = info_json("-i", "numpy")
    pools = info["pools"].get("threadpoolctl", [])
    openblas = [pool for pool in pools if pool.get("internal_api") == "openblas"]
    assert openblas, info["pools"]
    assert openblas[0]["num_threads"] >= 1


def test_info_without_imports_lists_no_numpy_pool() -> None:
    info = info_json()
    pools = info["pools"].get("threadpoolctl", [])
    assert not [pool for pool in pools if pool.get("internal_api") == "openblas"]


HAS_TORCH = importlib.util.find_spec("torch") is not None


def torch_default_threads() -> int:
    """torch's default intra-op threads (the physical cores); skips below 2 (nothing to warn)."""
    import psutil

    physical = psutil.cpu_count(logical=False)
    assert physical is not None
    if physical < 2:
        pytest.skip("needs 2 physical cores for torch's default to exceed a 1-CPU budget")
    return int(physical)


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_info_import_torch_warns_of_its_threads_per_calling_thread() -> None:
    physical = torch_default_threads()
    info = info_json("-i", "torch", "--cpus", "1")
    (torch_pool,) = info["pools"]["torch"]
    assert torch_pool["num_threads"] == physical
    warning = (
        f"torch will start {physical} threads per calling thread, but the plan gives each task 1"
    )
    assert any(w.startswith(warning) for w in info["warnings"]), info["warnings"]
    text = cli("info", "-i", "torch", "--cpus", "1")
    assert text.returncode == 0, text.stderr
    assert warning in text.stdout


@pytest.mark.torch
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_info_warns_about_torch_before_it_is_imported() -> None:
    physical = torch_default_threads()
    info = info_json("--cpus", "1")
    assert "torch" not in info["pools"]
    assert any(
        w.startswith(f"torch will start {physical} threads per calling thread (its default is")
        and w.endswith("apply the budget before importing torch")
        for w in info["warnings"]
    ), info["warnings"]
    # Once the budget is in the environment, torch would start within it: no warning.
    applied = info_json("--cpus", "1", env=clean_env(OMP_NUM_THREADS="1"))
    assert not any(w.startswith("torch will start") for w in applied["warnings"])


def test_info_import_of_a_missing_module_is_a_warning() -> None:
    info = info_json("-i", "no_such_module_xyz")
    assert any("no_such_module_xyz" in warning for warning in info["warnings"])


def test_info_text_explains_the_budget() -> None:
    result = cli("info", "--cpus", "1")
    assert result.returncode == 0, result.stderr
    assert "CPU budget: 1" in result.stdout
    assert "OMP_NUM_THREADS" in result.stdout
    assert "Plan:" in result.stdout


def test_cpus_option_overrides_the_budget() -> None:
    info = info_json("--cpus", "1")
    assert info["budget"]["budget"] == 1
    assert info["budget"]["overrides"] == [{"name": "cpus", "value": "1", "source": "argument"}]
    assert "argument" in info["budget"]["binding"]
    assert info["plan"]["threads"] == 1


def test_cpus_env_var_overrides_the_budget() -> None:
    info = info_json(env=clean_env(THREADBUDGET_CPUS="1"))
    assert info["budget"]["budget"] == 1
    assert info["budget"]["overrides"] == [
        {"name": "cpus", "value": "1", "source": "env:THREADBUDGET_CPUS"}
    ]


def test_option_beats_env_var() -> None:
    info = info_json("--concurrency", "1", env=clean_env(THREADBUDGET_CONCURRENCY="2"))
    assert info["plan"]["concurrency"] == 1
    assert info["plan"]["sources"]["concurrency"] == "argument"


def test_plan_options_reach_the_plan() -> None:
    info = info_json("--cpus", "1", "-c", "3", "-w", "2", "--wait-policy", "active")
    plan = info["plan"]
    assert (plan["budget"], plan["concurrency"], plan["workers"], plan["threads"]) == (1, 3, 2, 1)
    assert plan["wait_policy"] == "active"
    assert plan["oversubscribed"] is True
    assert any("admission control" in warning for warning in info["warnings"])


@pytest.mark.parametrize(
    ("args", "option", "value"),
    [
        (["--cpus", "0"], "--cpus", "0"),
        (["--cpus", "abc"], "--cpus", "abc"),
        (["--rounding", "up"], "--rounding", "up"),
        (["--concurrency", "-1"], "--concurrency", "-1"),
        (["--workers", "0"], "--workers", "0"),
        (["--reserve", "-2"], "--reserve", "-2"),
        (["--wait-policy", "spin"], "--wait-policy", "spin"),
    ],
)
@pytest.mark.parametrize("command", ["info", "run"])
def test_bad_option_value_exits_2_naming_option_and_value(
    command: str, args: list[str], option: str, value: str
) -> None:
    tail = ["--", sys.executable, "-c", "pass"] if command == "run" else []
    result = cli(command, *args, *tail)
    assert result.returncode == 2
    assert option in result.stderr
    assert repr(value) in result.stderr
    assert result.stdout == ""


def test_garbage_env_var_is_a_warning_not_an_error() -> None:
    result = cli("info", "--json", env=clean_env(THREADBUDGET_CPUS="abc"))
    assert result.returncode == 0, result.stderr
    assert "ThreadBudgetWarning" in result.stderr
    assert "THREADBUDGET_CPUS='abc'" in result.stderr
    info = json.loads(result.stdout)
    assert info["budget"]["overrides"] == []
    assert any("THREADBUDGET_CPUS" in warning for warning in info["warnings"])


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"threadbudget {threadbudget.__version__}"


def test_no_subcommand_is_a_usage_error() -> None:
    result = cli()
    assert result.returncode == 2
    assert "usage:" in result.stderr


# --- run -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"), [(["--cpus", "2", "--concurrency", "2"], "1"), (["--cpus", "2"], "2")]
)
def test_run_exports_the_planned_thread_count(args: list[str], expected: str) -> None:
    result = cli("run", *args, "--", sys.executable, "-c", PRINT_OMP)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_run_exports_every_planned_value() -> None:
    names = ",".join(var.name for var in NATIVE_ENV_VARS)
    result = cli(
        "run", "-q", "--cpus", "2", "-c", "2", "--", sys.executable, "-c", PRINT_NATIVE_ENV, names
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == planned_values(make_plan(2, concurrency=2, environ={}))


def test_run_hands_its_choices_to_the_child() -> None:
    code = (
        "import os; print(os.environ.get('THREADBUDGET_CPUS'), "
        "os.environ.get('THREADBUDGET_CONCURRENCY'), os.environ.get('THREADBUDGET_WORKERS'), "
        f"'{APPLIED_MARKER}' in os.environ)"
    )
    result = cli("run", "-q", "--cpus", "2", "-c", "2", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2", "None", "True"]


def test_user_thread_var_survives_run() -> None:
    result = cli(
        "run",
        "--cpus",
        "2",
        "--",
        sys.executable,
        "-c",
        PRINT_OMP,
        env=clean_env(OMP_NUM_THREADS="7"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7"
    assert "kept 1 set by you" in result.stderr


def test_nested_run_replans_the_parents_values() -> None:
    result = cli(
        "run",
        "-q",
        "--cpus",
        "2",
        "-c",
        "2",
        "--",
        sys.executable,
        "-m",
        "threadbudget",
        "run",
        "-q",
        "-c",
        "1",
        "--",
        sys.executable,
        "-c",
        PRINT_OMP,
    )
    assert result.returncode == 0, result.stderr
    # The inner run re-plans with 1 task on the 2 CPUs the outer one handed down.
    assert result.stdout.strip() == "2"


def test_run_execs_the_command_itself_without_a_shell() -> None:
    # The command replaces the threadbudget process (same pid, nothing in between), and its
    # arguments reach it as they are: no shell expands or splits them.
    literal = "$HOME; echo injected `id` *"
    code = "import os, sys; print(os.getpid()); print(sys.argv[1])"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "threadbudget",
            "run",
            "-q",
            "--",
            sys.executable,
            "-c",
            code,
            literal,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    pid, argument = out.splitlines()
    assert int(pid) == process.pid
    assert argument == literal


def test_run_passes_the_exit_status_through() -> None:
    result = cli("run", "-q", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert result.returncode == 3


def test_run_without_a_command_exits_2() -> None:
    for args in (["run"], ["run", "--"], ["run", "--cpus", "1", "--"]):
        result = cli(*args)
        assert result.returncode == 2, args
        assert "no command" in result.stderr


def test_run_of_a_missing_command_exits_127() -> None:
    result = cli("run", "-q", "--", "definitely-not-a-command")
    assert result.returncode == 127
    assert "definitely-not-a-command" in result.stderr
    assert "not found" in result.stderr


def test_run_prints_a_summary_unless_quiet() -> None:
    loud = cli("run", "--cpus", "2", "-c", "2", "--", sys.executable, "-c", "pass")
    assert loud.returncode == 0
    assert "threadbudget: budget 2" in loud.stderr
    assert "2 task(s) x 1 thread(s)" in loud.stderr

    quiet = cli("run", "-q", "--cpus", "2", "-c", "2", "--", sys.executable, "-c", "pass")
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    assert quiet.stdout == ""


def test_console_script() -> None:
    script = Path(sys.executable).parent / "threadbudget"
    if not script.exists():
        found = shutil.which("threadbudget")
        if found is None:
            pytest.fail("the threadbudget console script is not installed")
        script = Path(found)
    version = cli("--version", program=[str(script)])
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"threadbudget {threadbudget.__version__}"
    result = cli(
        "run", "-q", "--cpus", "1", "--", sys.executable, "-c", PRINT_OMP, program=[str(script)]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
