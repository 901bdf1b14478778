"""Shared helpers: real cgroups made and removed by tests, and CI's no-skip rule.

Tests that need real cgroups, torch, numpy, real servers or the installed entry point skip
where the host cannot run them, but CI sets ``THREADBUDGET_REQUIRE_REAL=1`` and then any skip
fails the session, at collection (a module's ``importorskip``) or at run time: a green CI run
means every test really ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CPU_V1 = Path("/sys/fs/cgroup/cpu")
CPUSET_V1 = Path("/sys/fs/cgroup/cpuset")

_required_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _required_skips.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module skipped at import, e.g. pytest.importorskip("celery")
        _required_skips.append(f"{report.nodeid} (at collection)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("THREADBUDGET_REQUIRE_REAL") == "1" and _required_skips:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if os.environ.get("THREADBUDGET_REQUIRE_REAL") == "1" and _required_skips:
        terminalreporter.section("tests skipped, which CI does not allow", red=True)
        for nodeid in _required_skips:
            terminalreporter.line(f"SKIPPED but required: {nodeid}", red=True)


def can_make_cgroups(base: Path = CPU_V1) -> bool:
    return os.geteuid() == 0 and (base / "cpu.cfs_quota_us").exists() and os.access(base, os.W_OK)


requires_cgroups = pytest.mark.skipif(
    not can_make_cgroups(),
    reason="needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu",
)


def _remove_tree(path: Path) -> None:
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _remove_tree(child)
    path.rmdir()


@contextmanager
def cpu_cgroup(*quotas: int | None, period: int = 100_000) -> Iterator[list[Path]]:
    """Nested v1 cpu cgroups, outermost first; ``None`` leaves that level unlimited."""
    top = CPU_V1 / f"threadbudget-test-{uuid.uuid4().hex[:10]}"
    paths: list[Path] = []
    current = top
    try:
        for quota in quotas:
            current.mkdir()
            paths.append(current)
            (current / "cpu.cfs_period_us").write_text(str(period))
            (current / "cpu.cfs_quota_us").write_text(str(-1 if quota is None else quota))
            current = current / "child"
        yield paths
    finally:
        if top.exists():
            _remove_tree(top)


@contextmanager
def cpuset_cgroup(cpus: str) -> Iterator[Path]:
    path = CPUSET_V1 / f"threadbudget-test-{uuid.uuid4().hex[:10]}"
    path.mkdir()
    try:
        (path / "cpuset.mems").write_text((CPUSET_V1 / "cpuset.mems").read_text())
        (path / "cpuset.cpus").write_text(cpus)
        yield path
    finally:
        path.rmdir()


def run_in_cgroups(
    cgroups: Sequence[Path],
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run *argv* with its process placed in every cgroup of *cgroups* before it execs.

    A shell moves itself first, so nothing of the child runs outside the cgroups, and no
    ``preexec_fn`` runs in a threaded pytest process.
    """
    moves = "".join(f'echo $$ > "{cgroup}/cgroup.procs" && ' for cgroup in cgroups)
    script = f'{moves}exec "$@"'
    return subprocess.run(
        ["/bin/sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def python_env(**extra: str) -> dict[str, str]:
    """The test process's environment without thread settings that would hide defaults."""
    env = {k: v for k, v in os.environ.items() if not _is_thread_var(k)}
    env.update(extra)
    return env


def _is_thread_var(name: str) -> bool:
    from threadbudget import NATIVE_ENV_VARS

    return name.startswith("THREADBUDGET_") or name in {var.name for var in NATIVE_ENV_VARS}


PYTHON = sys.executable


def run_json_probe(code: str, *args: object, timeout: float = 240) -> dict[str, Any]:
    """Run *code* in a fresh interpreter (native pools start from scratch there) and return the
    JSON object on its last line of output."""
    result = subprocess.run(
        [PYTHON, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=python_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(data, dict), data
    return data
