"""Worker processes share the budget: worker_share, the worker settings of make_plan,
apply_worker_budget, and a real ``uvicorn --workers 2`` whose workers read their share from inside.

The helpers at the top (a free 127.0.0.1 port, a server process in its own session that is always
stopped, bounded waits) are also used by ``test_gunicorn`` and ``test_celery``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadbudget import (
    NATIVE_ENV_VARS,
    Plan,
    ThreadBudgetWarning,
    apply_worker_budget,
    make_plan,
    worker_share,
)

from .conftest import PYTHON, python_env

PROPERTY = settings(max_examples=300, deadline=None)

# --- helpers shared with test_gunicorn and test_celery -----------------------------------------

HOST = "127.0.0.1"
START_TIMEOUT = 90.0  # seconds for a server to come up: it imports torch in every worker


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory that is removed afterwards (pytest's tmp_path keeps old runs)."""
    with tempfile.TemporaryDirectory(prefix="threadbudget-test-") as path:
        yield Path(path)


def pythonpath(*first: Path) -> str:
    """PYTHONPATH for a server started in another directory: *first*, then the caller's
    PYTHONPATH, then the directory this threadbudget was imported from (works uninstalled)."""
    import threadbudget

    entries = [str(path) for path in first]
    entries += [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    entries.append(str(Path(threadbudget.__file__).resolve().parent.parent))
    return os.pathsep.join(entries)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float, check: Callable[[], None]
) -> None:
    """Poll *predicate* until it holds; *check* raises early (a server died), then time out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        check()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie, dead and waiting to be reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group *pgid*.

    Orphans that died stay zombies until init reaps them, and a zombie still counts for
    ``killpg``, so /proc is read instead.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_group(
    process: subprocess.Popen[bytes],
    signals: Sequence[signal.Signals] = (signal.SIGTERM,),
    grace: float = 20.0,
) -> None:
    """Stop *process*, a master, with each signal in turn, then SIGKILL its whole group.

    The signals go to the master alone, as a supervisor would send them: signalling its workers
    too makes a Celery master replace them while it shuts down. The process was started with
    ``start_new_session=True``, so its process group is its own pid and holds its workers;
    stragglers (workers of a master that died first) are killed at the end.
    """
    pgid = process.pid
    for sig in signals:
        if process.poll() is not None:
            break
        process.send_signal(sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        process.wait(grace)
    # Workers of the group that outlived their master.
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert not _group_alive(pgid), f"processes of group {pgid} survived SIGKILL"


class Server:
    """A process started in its own session with its output in a log file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"process exited with {code}:\n{self.output()[-6000:]}")


@contextmanager
def running(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    stop_signals: Sequence[signal.Signals] = (signal.SIGTERM,),
) -> Iterator[Server]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Server(process, log)
    finally:
        stop_group(process, stop_signals)


def http_get_json(port: int, path: str = "/", timeout: float = 30.0) -> Any:
    import httpx

    # trust_env=False: no proxy from the environment for a server on 127.0.0.1
    response = httpx.get(f"http://{HOST}:{port}{path}", timeout=timeout, trust_env=False)
    response.raise_for_status()
    return response.json()


def wait_for_http(server: Server, port: int, timeout: float = START_TIMEOUT) -> None:
    def answers() -> bool:
        import httpx

        try:
            http_get_json(port, timeout=5)
        except (httpx.HTTPError, OSError, ValueError):
            return False
        return True

    wait_until(answers, f"http://{HOST}:{port}/", timeout, server.check_alive)


def read_reports(directory: Path) -> list[dict[str, Any]]:
    """The JSON files workers wrote (each written to a temporary name, then renamed)."""
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


# What every probe reports about its process, from inside it. Written to a temporary name and
# renamed, so a reader never sees half a file.
NUMBERS = r"""
import json, os, pathlib
import numpy
import torch
from threadpoolctl import threadpool_info


def numbers():
    return {
        "pid": os.getpid(),
        "torch": torch.get_num_threads(),
        "pools": {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()},
        "workers": os.environ.get("THREADBUDGET_WORKERS"),
        "index": os.environ.get("THREADBUDGET_WORKER_INDEX"),
        "concurrency": os.environ.get("THREADBUDGET_CONCURRENCY"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }


def report_startup():
    directory = pathlib.Path(os.environ["PROBE_DIR"])
    partial = directory / f"{os.getpid()}.partial"
    partial.write_text(json.dumps(numbers()))
    os.replace(partial, directory / f"{os.getpid()}.json")
"""


# --- worker_share --------------------------------------------------------------------------------


@PROPERTY
@given(budget=st.integers(1, 512), workers=st.integers(1, 64))
def test_worker_shares_split_the_budget_exactly(budget: int, workers: int) -> None:
    shares = [worker_share(budget, workers, index) for index in range(workers)]

    assert all(share >= 1 for share in shares)
    if workers <= budget:
        assert sum(shares) == budget
        assert max(shares) - min(shares) <= 1
        # the remainder goes to the first workers
        assert shares == sorted(shares, reverse=True)
        assert shares.count(budget // workers + 1) == budget % workers
    else:
        assert shares == [1] * workers
    # a worker that does not know its rank takes the floor, which never oversubscribes
    assert worker_share(budget, workers) == max(1, budget // workers)
    assert worker_share(budget, workers) * workers <= max(budget, workers)


@pytest.mark.parametrize(
    ("budget", "workers", "expected"),
    [(3, 2, [2, 1]), (8, 3, [3, 3, 2]), (2, 2, [1, 1]), (2, 5, [1] * 5), (7, 1, [7])],
)
def test_worker_share_examples(budget: int, workers: int, expected: list[int]) -> None:
    assert [worker_share(budget, workers, i) for i in range(workers)] == expected


@pytest.mark.parametrize("index", [-1, True, False, 1.0, "0"])
def test_worker_share_refuses_a_bad_index(index: object) -> None:
    with pytest.raises(ValueError, match="worker_index"):
        worker_share(4, 2, index)  # type: ignore[arg-type]


# --- make_plan's worker settings ---------------------------------------------------------------


def plan_quietly(*args: Any, **kwargs: Any) -> Plan:
    kwargs.setdefault("environ", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make_plan(*args, **kwargs)


def test_workers_fall_back_to_web_concurrency() -> None:
    plan = plan_quietly(4, environ={"WEB_CONCURRENCY": "2"})
    assert plan.workers == 2
    assert plan.sources["workers"] == "env:WEB_CONCURRENCY"
    assert plan.process_budget == 2
    assert plan.threads == 2


def test_threadbudget_workers_wins_over_web_concurrency() -> None:
    plan = plan_quietly(8, environ={"WEB_CONCURRENCY": "8", "THREADBUDGET_WORKERS": "2"})
    assert plan.workers == 2
    assert plan.sources["workers"] == "env:THREADBUDGET_WORKERS"
    assert plan.process_budget == 4


def test_workers_argument_wins_over_both_variables() -> None:
    plan = plan_quietly(8, workers=1, environ={"WEB_CONCURRENCY": "8", "THREADBUDGET_WORKERS": "4"})
    assert plan.workers == 1
    assert plan.sources["workers"] == "argument"


def test_no_worker_variable_means_one_worker() -> None:
    plan = plan_quietly(4)
    assert plan.workers == 1
    assert plan.sources["workers"] == "default"
    assert plan.process_budget == 4


@pytest.mark.parametrize("name", ["THREADBUDGET_WORKERS", "WEB_CONCURRENCY"])
@pytest.mark.parametrize("garbage", ["two", "0", "-2", "1.5", ""])
def test_a_garbage_worker_count_warns_naming_its_variable(name: str, garbage: str) -> None:
    with pytest.warns(ThreadBudgetWarning, match=name) as caught:
        plan = make_plan(4, environ={name: garbage})
    assert plan.workers == 1
    assert plan.process_budget == 4
    assert any(repr(garbage) in str(w.message) for w in caught)


def test_garbage_threadbudget_workers_falls_back_to_web_concurrency() -> None:
    with pytest.warns(ThreadBudgetWarning, match="THREADBUDGET_WORKERS"):
        plan = make_plan(4, environ={"THREADBUDGET_WORKERS": "lots", "WEB_CONCURRENCY": "4"})
    assert plan.workers == 4
    assert plan.sources["workers"] == "env:WEB_CONCURRENCY"
    assert plan.process_budget == 1


@pytest.mark.parametrize(("index", "share"), [("0", 2), ("1", 1), (" 1 ", 1)])
def test_worker_index_variable_gives_the_exact_share(index: str, share: int) -> None:
    plan = plan_quietly(
        3, environ={"THREADBUDGET_WORKERS": "2", "THREADBUDGET_WORKER_INDEX": index}
    )
    assert plan.process_budget == share
    assert plan.threads == share


def test_worker_index_argument_wins_over_the_variable() -> None:
    plan = plan_quietly(3, workers=2, worker_index=0, environ={"THREADBUDGET_WORKER_INDEX": "1"})
    assert plan.process_budget == 2


@pytest.mark.parametrize("garbage", ["-1", "first", "1.0", "", "0x1"])
def test_a_garbage_worker_index_warns_and_takes_the_floor(garbage: str) -> None:
    with pytest.warns(ThreadBudgetWarning, match="THREADBUDGET_WORKER_INDEX") as caught:
        plan = make_plan(3, workers=2, environ={"THREADBUDGET_WORKER_INDEX": garbage})
    assert plan.process_budget == 1  # 3 // 2: the share of a worker that does not know its rank
    assert any(repr(garbage) in str(w.message) for w in caught)


def test_a_bad_worker_index_argument_raises() -> None:
    with pytest.raises(ValueError, match="worker_index"):
        make_plan(3, workers=2, worker_index=-1, environ={})


# --- apply_worker_budget --------------------------------------------------------------------


@pytest.fixture
def no_runtime_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No controllers for apply_plan: the test process's own pools (numpy or torch that other
    tests loaded) stay as they are. The runtime side is tested in fresh interpreters below."""
    monkeypatch.setattr("threadbudget._apply.registered_controllers", list)


def _only_the_override_warning(caught: list[warnings.WarningMessage], cpus: int) -> None:
    """THREADBUDGET_CPUS above this host's CPU count is honoured with a warning; nothing else."""
    for warning in caught:
        message = str(warning.message)
        assert warning.category is ThreadBudgetWarning, message
        assert f"asks for {cpus} CPUs" in message, message


def _planned_variables(environ: Mapping[str, str]) -> dict[str, str]:
    names = {var.name for var in NATIVE_ENV_VARS}
    return {
        name: value
        for name, value in environ.items()
        if name in names or name.startswith("THREADBUDGET_")
    }


@pytest.mark.parametrize(("index", "share"), [(0, 2), (1, 1), (None, 1)])
@pytest.mark.usefixtures("no_runtime_changes")
def test_apply_worker_budget_exports_the_worker_settings(index: int | None, share: int) -> None:
    environ = {"THREADBUDGET_CPUS": "3"}
    before = _planned_variables(os.environ)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = apply_worker_budget(index, 2, environ=environ)
        try:
            assert applied.plan.workers == 2
            assert applied.plan.process_budget == share
            assert applied.plan.threads == share
            assert environ["THREADBUDGET_WORKERS"] == "2"
            if index is None:
                assert "THREADBUDGET_WORKER_INDEX" not in environ
            else:
                assert environ["THREADBUDGET_WORKER_INDEX"] == str(index)
            assert "THREADBUDGET_CONCURRENCY" not in environ
            assert environ["OMP_NUM_THREADS"] == str(share)
            # a later plan in the same process (CpuSlots(), threadbudget.auto) gets the same share
            later = make_plan(environ=environ)
            assert later.process_budget == share
            assert later.workers == 2
        finally:
            applied.restore()
    _only_the_override_warning(caught, 3)
    # only the mapping passed in was touched
    assert _planned_variables(os.environ) == before


@pytest.mark.usefixtures("no_runtime_changes")
def test_apply_worker_budget_with_concurrency_exports_it() -> None:
    environ = {"THREADBUDGET_CPUS": "4"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = apply_worker_budget(0, 1, concurrency=2, environ=environ)
        applied.restore()
    _only_the_override_warning(caught, 4)
    assert applied.plan.concurrency == 2
    assert applied.plan.threads == 2
    assert environ["THREADBUDGET_CONCURRENCY"] == "2"
    assert environ["THREADBUDGET_WORKERS"] == "1"


APPLY_THEN_IMPORT = (
    r"""
import sys, json
import threadbudget

index = None if sys.argv[1] == "none" else int(sys.argv[1])
applied = threadbudget.apply_worker_budget(index, int(sys.argv[2]))
"""
    + NUMBERS
    + r"""
out = numbers()
out["share"] = applied.plan.process_budget
out["slots"] = threadbudget.CpuSlots().budget
print(json.dumps(out))
"""
)


@pytest.mark.torch
@pytest.mark.parametrize(
    ("index", "workers", "share"), [("0", "2", 2), ("1", "2", 1), ("none", "2", 1)]
)
def test_torch_imported_after_apply_worker_budget_has_the_share(
    index: str, workers: str, share: int
) -> None:
    pytest.importorskip("torch")
    result = subprocess.run(
        [PYTHON, "-c", APPLY_THEN_IMPORT, index, workers],
        capture_output=True,
        text=True,
        timeout=120,
        env=python_env(THREADBUDGET_CPUS="3"),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["share"] == share
    assert out["torch"] == share
    assert out["omp"] == str(share)
    assert out["workers"] == workers
    assert out["index"] == (None if index == "none" else index)
    assert out["pools"], out
    assert set(out["pools"].values()) == {share}, out
    assert out["slots"] == share
    # applied before the import: nothing came too late
    assert "too late" not in result.stderr


# --- a real uvicorn --workers 2 -------------------------------------------------------------------

UVICORN_APP = (
    r'''
"""Imports threadbudget.auto before torch, reports its numbers at startup and per request."""
import threadbudget.auto  # noqa: F401  (first: the plan reaches torch through the environment)
'''
    + NUMBERS
    + r"""
_numbers = numbers


def numbers():
    out = _numbers()
    out["plan_workers"] = threadbudget.auto.applied.plan.workers
    out["process_budget"] = threadbudget.auto.applied.plan.process_budget
    return out


report_startup()


async def app(scope, receive, send):
    assert scope["type"] == "http"
    body = json.dumps(numbers()).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""
)


def uvicorn_reports(
    workdir: Path, env: dict[str, str], flags: list[str], workers: int
) -> tuple[dict[int, Any], list[Any], str]:
    """Run UVICORN_APP under a real uvicorn until every worker reported; a few requests too."""
    (workdir / "probeapp.py").write_text(UVICORN_APP)
    reports = Path(env["PROBE_DIR"])
    port = free_port()
    argv = [
        PYTHON,
        "-m",
        "uvicorn",
        "probeapp:app",
        "--app-dir",
        str(workdir),
        "--host",
        HOST,
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--no-access-log",
        "--timeout-graceful-shutdown",
        "5",
        *flags,
    ]
    with running(argv, cwd=workdir, env=env, log=workdir / "uvicorn.log") as server:
        wait_until(
            lambda: len(list(reports.glob("*.json"))) >= workers,
            f"{workers} uvicorn workers to report",
            START_TIMEOUT,
            server.check_alive,
        )
        wait_for_http(server, port)
        started = {report["pid"]: report for report in read_reports(reports)}
        served = [http_get_json(port) for _ in range(4)]
        output = server.output()
    return started, served, output


def uvicorn_env(workdir: Path, cpus: str, **variables: str) -> dict[str, str]:
    reports = workdir / "reports"
    reports.mkdir()
    # The budget is set rather than detected so that the shares do not depend on the host.
    env = python_env(PROBE_DIR=str(reports), PYTHONPATH=pythonpath(workdir), THREADBUDGET_CPUS=cpus)
    env.pop("WEB_CONCURRENCY", None)
    env.update(variables)
    return env


@pytest.mark.torch
@pytest.mark.parametrize(
    ("variables", "flags"),
    [
        pytest.param({"THREADBUDGET_WORKERS": "2"}, ["--workers", "2"], id="workers-flag"),
        pytest.param({"WEB_CONCURRENCY": "2"}, [], id="web-concurrency"),
    ],
)
def test_uvicorn_workers_each_get_their_share(
    workdir: Path, variables: dict[str, str], flags: list[str]
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    env = uvicorn_env(workdir, "2", **variables)
    started, served, output = uvicorn_reports(workdir, env, flags, workers=2)

    assert len(started) == 2, (started, output)
    for report in started.values():
        # budget 2 // 2 workers: one thread each, in every pool
        assert report["workers"] == variables.get("THREADBUDGET_WORKERS"), report
        assert report["plan_workers"] == 2, report
        assert report["process_budget"] == 1, report
        assert report["torch"] == 1, report
        assert report["omp"] == "1", report
        assert report["pools"], report
        assert set(report["pools"].values()) == {1}, report
    for answer in served:
        assert answer["pid"] in started, (answer, started)
        assert answer["torch"] == 1
        assert set(answer["pools"].values()) == {1}, answer
    assert "too late" not in output, output


@pytest.mark.torch
def test_uvicorn_workers_take_free_indexes_and_spread_the_remainder(workdir: Path) -> None:
    # 3 CPUs over 2 workers: uvicorn gives them no index, so each takes the lowest one no
    # sibling holds, and the shares are 2 and 1 instead of 1 and 1 (one CPU left idle).
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    env = uvicorn_env(workdir, "3", THREADBUDGET_WORKERS="2")
    started, served, output = uvicorn_reports(workdir, env, ["--workers", "2"], workers=2)

    assert len(started) == 2, (started, output)
    by_index = {report["index"]: report for report in started.values()}
    assert set(by_index) == {"0", "1"}, (started, output)
    assert {index: report["process_budget"] for index, report in by_index.items()} == {
        "0": 2,
        "1": 1,
    }
    assert {index: report["torch"] for index, report in by_index.items()} == {"0": 2, "1": 1}
    for answer in served:
        assert answer["torch"] == started[answer["pid"]]["torch"]


def test_sibling_indexes_are_the_lowest_free_ones(tmp_path: Path) -> None:
    # Within one process each claim opens the lock file anew, so it behaves as a sibling would.
    from threadbudget import _siblings

    claims = [_siblings.claim_sibling_index(3, directory=tmp_path) for _ in range(4)]
    assert claims == [0, 1, 2, None]
    held = _siblings._held[-3:]
    os.close(held[1])  # the worker holding index 1 exits
    _siblings._held.remove(held[1])
    assert _siblings.claim_sibling_index(3, directory=tmp_path) == 1
    for fd in _siblings._held[-3:]:
        os.close(fd)
    del _siblings._held[-3:]
    assert _siblings.claim_sibling_index(1, directory=tmp_path / "missing" / "dir") == 0
    os.close(_siblings._held.pop())


def test_server_helpers_clean_up_a_process_group(workdir: Path) -> None:
    """stop_group kills a master that ignores SIGTERM and its child."""
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = workdir / "group.log"
    with running([PYTHON, "-c", script], cwd=workdir, env=python_env(), log=log) as server:
        wait_until(lambda: log.read_text().strip() != "", "the child", 30, server.check_alive)
        child = int(log.read_text().split()[0])
        pgid = server.process.pid
        stop_group(server.process, grace=1)
    assert not _group_alive(pgid)
    assert not process_alive(child)


def test_every_native_thread_variable_is_planned_per_worker() -> None:
    """The variables a worker exports come from its share, not the whole budget."""
    environ: dict[str, str] = {}
    plan = plan_quietly(3, workers=2, worker_index=1, environ=environ)
    from threadbudget._envvars import planned_values

    values = planned_values(plan)
    threads_vars = [var.name for var in NATIVE_ENV_VARS if var.role == "threads"]
    assert {values[name] for name in threads_vars} == {"1"}
    assert values["PYTHON_CPU_COUNT"] == "3"


def test_claiming_an_index_removes_the_locks_of_exited_servers(tmp_path: Path) -> None:
    import fcntl

    from threadbudget import _siblings

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_parent = int(gone.stdout)
    stale = tmp_path / f"{dead_parent}-12345-0.lock"
    stale.touch()
    # A worker of an exited server that is still running keeps its file.
    orphaned = tmp_path / f"{dead_parent}-12345-1.lock"
    orphan_fd = os.open(orphaned, os.O_CREAT | os.O_RDWR)
    fcntl.flock(orphan_fd, fcntl.LOCK_EX)
    # A server that exited and whose pid now belongs to a live process: another start time.
    reused = tmp_path / f"{os.getppid()}-1-0.lock"
    reused.touch()
    unrelated = tmp_path / "notes.txt"
    unrelated.touch()
    try:
        assert _siblings.claim_sibling_index(2, directory=tmp_path) == 0
        ours = _siblings._held.pop()
        try:
            remaining = sorted(path.name for path in tmp_path.iterdir())
            parent = os.getppid()
            mine = f"{parent}-{_siblings._start_time(parent)}-0.lock"
            assert remaining == sorted([mine, orphaned.name, "notes.txt"])
        finally:
            os.close(ours)
    finally:
        os.close(orphan_fd)
