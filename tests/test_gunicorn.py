"""A real gunicorn with threadbudget's ``post_fork`` hook: every worker reads its share from inside.

``gunicorn.conf.py`` imports ``pre_fork`` and ``post_fork``; the app is not preloaded, so each
worker imports torch after the hook set the variables. Workers report at startup (a JSON file
named by pid) and per request.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PYTHON, python_env
from .test_workers import (
    HOST,
    NUMBERS,
    START_TIMEOUT,
    free_port,
    http_get_json,
    process_alive,
    pythonpath,
    read_reports,
    running,
    wait_for_http,
    wait_until,
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="threadbudget-gunicorn-") as path:
        yield Path(path)


CONFIG = """\
from threadbudget.gunicorn import post_fork, pre_fork  # noqa: F401
"""

# Torch is imported at module level: without preload_app the worker imports this module after
# post_fork ran in it.
ASGI_APP = (
    NUMBERS
    + r"""
report_startup()


async def app(scope, receive, send):
    assert scope["type"] in ("http", "lifespan")
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps(numbers()).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""
)

WSGI_APP = (
    NUMBERS
    + r"""
import threading

report_startup()


def app(environ, start_response):
    out = numbers()
    # the request runs in one of the gthread worker's threads, not the one that imported torch
    out["thread"] = threading.current_thread().name
    body = json.dumps(out).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
"""
)

# No torch: only the share that post_fork applied in this worker.
LIGHT_APP = r"""
import json, os, pathlib

import threadbudget.gunicorn as hook

directory = pathlib.Path(os.environ["PROBE_DIR"])
report = {
    "pid": os.getpid(),
    "index": os.environ.get("THREADBUDGET_WORKER_INDEX"),
    "share": hook.applied.plan.process_budget,
}
(directory / f"{os.getpid()}.partial").write_text(json.dumps(report))
os.replace(directory / f"{os.getpid()}.partial", directory / f"{os.getpid()}.json")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    return [b"{}"]
"""


def gunicorn_argv(workdir: Path, port: int, *options: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "gunicorn",
        "--config",
        str(workdir / "gunicorn.conf.py"),
        "--chdir",
        str(workdir),
        "--bind",
        f"{HOST}:{port}",
        "--graceful-timeout",
        "5",
        # importing torch on a busy machine must not look like a hung worker
        "--timeout",
        "120",
        *options,
        "probeapp:app",
    ]


def _setup(workdir: Path, app: str) -> Path:
    (workdir / "gunicorn.conf.py").write_text(CONFIG)
    (workdir / "probeapp.py").write_text(app)
    reports = workdir / "reports"
    reports.mkdir()
    return reports


@pytest.mark.torch
def test_uvicorn_workers_get_their_exact_shares(workdir: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    reports = _setup(workdir, ASGI_APP)
    port = free_port()
    # 3 CPUs over 2 workers: index 0 gets 2, index 1 gets 1. Above this host's CPU count the
    # override is honoured with a warning, which each worker just prints.
    env = python_env(PROBE_DIR=str(reports), PYTHONPATH=pythonpath(workdir), THREADBUDGET_CPUS="3")
    env.pop("WEB_CONCURRENCY", None)
    argv = gunicorn_argv(
        workdir, port, "--workers", "2", "--worker-class", "uvicorn.workers.UvicornWorker"
    )
    with running(argv, cwd=workdir, env=env, log=workdir / "gunicorn.log") as server:
        wait_until(
            lambda: len(list(reports.glob("*.json"))) >= 2,
            "both gunicorn workers to report",
            START_TIMEOUT,
            server.check_alive,
        )
        wait_for_http(server, port)
        started = read_reports(reports)
        served = [http_get_json(port) for _ in range(4)]
        output = server.output()

    by_index = {report["index"]: report for report in started}
    assert len(started) == 2, (started, output)
    assert set(by_index) == {"0", "1"}, (started, output)
    assert {index: report["torch"] for index, report in by_index.items()} == {"0": 2, "1": 1}
    for index, report in by_index.items():
        share = {"0": 2, "1": 1}[index]
        assert report["workers"] == "2", report
        assert report["omp"] == str(share), report
        assert report["pools"].get("openblas") == share, report
        assert set(report["pools"].values()) == {share}, report
    pids = {report["pid"]: report for report in started}
    for answer in served:
        assert answer["pid"] in pids, (answer, started)
        assert answer["torch"] == pids[answer["pid"]]["torch"]
    # the hook logged each worker's share; nothing came too late
    assert output.count("threadbudget: worker") == 2, output
    assert "too late" not in output, output


@pytest.mark.torch
def test_gthread_worker_plans_for_its_threads(workdir: Path) -> None:
    pytest.importorskip("torch")
    reports = _setup(workdir, WSGI_APP)
    port = free_port()
    env = python_env(PROBE_DIR=str(reports), PYTHONPATH=pythonpath(workdir), THREADBUDGET_CPUS="2")
    env.pop("WEB_CONCURRENCY", None)
    argv = gunicorn_argv(
        workdir, port, "--workers", "1", "--worker-class", "gthread", "--threads", "2"
    )
    with running(argv, cwd=workdir, env=env, log=workdir / "gunicorn.log") as server:
        wait_until(
            lambda: len(list(reports.glob("*.json"))) >= 1,
            "the gunicorn worker to report",
            START_TIMEOUT,
            server.check_alive,
        )
        wait_for_http(server, port)
        started = read_reports(reports)
        served = [http_get_json(port) for _ in range(4)]
        output = server.output()

    assert len(started) == 1, (started, output)
    (report,) = started
    # budget 2, one worker, 2 requests in flight: 1 thread per request
    assert report["index"] == "0"
    assert report["workers"] == "1"
    assert report["concurrency"] == "2"
    assert report["torch"] == 1, report
    assert report["omp"] == "1", report
    assert set(report["pools"].values()) == {1}, report
    for answer in served:
        assert answer["pid"] == report["pid"]
        assert answer["torch"] == 1, answer
        assert set(answer["pools"].values()) == {1}, answer
    assert "too late" not in output, output


def test_a_replacement_worker_takes_the_index_of_the_one_it_replaces(workdir: Path) -> None:
    # pre_fork (in the master) gives the replacement the lowest index no live worker holds.
    reports = _setup(workdir, LIGHT_APP)
    port = free_port()
    env = python_env(PROBE_DIR=str(reports), PYTHONPATH=pythonpath(workdir), THREADBUDGET_CPUS="3")
    env.pop("WEB_CONCURRENCY", None)
    argv = gunicorn_argv(workdir, port, "--workers", "2", "--worker-class", "sync")
    with running(argv, cwd=workdir, env=env, log=workdir / "gunicorn.log") as server:
        wait_until(
            lambda: len(list(reports.glob("*.json"))) >= 2,
            "both gunicorn workers to report",
            START_TIMEOUT,
            server.check_alive,
        )
        first = read_reports(reports)
        assert sorted(report["index"] for report in first) == ["0", "1"], first
        (victim,) = [report for report in first if report["index"] == "1"]
        os.kill(victim["pid"], signal.SIGTERM)  # a worker of the server this test started
        wait_until(
            lambda: len(list(reports.glob("*.json"))) >= 3 and not process_alive(victim["pid"]),
            "gunicorn to replace the stopped worker",
            START_TIMEOUT,
            server.check_alive,
        )
        live = [report for report in read_reports(reports) if process_alive(report["pid"])]
    assert len(live) == 2, live
    assert sorted(report["index"] for report in live) == ["0", "1"], live
    assert sum(report["share"] for report in live) == 3, live


# Preloaded: the master imports the app, and torch starts its OpenMP pool there before any fork.
PRELOADED_TORCH_APP = r"""
import torch

torch.ones(256, 256) @ torch.ones(256, 256)  # the master's pool is now running


def app(environ, start_response):
    # No torch here: a child forked over a started libgomp pool may hang in a parallel region.
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
    return [b"{}"]
"""


@pytest.mark.torch
def test_preloading_torch_in_the_master_warns_before_the_fork(workdir: Path) -> None:
    pytest.importorskip("torch")
    _setup(workdir, PRELOADED_TORCH_APP)
    port = free_port()
    env = python_env(PYTHONPATH=pythonpath(workdir), THREADBUDGET_CPUS="2")
    env.pop("WEB_CONCURRENCY", None)
    argv = gunicorn_argv(workdir, port, "--workers", "2", "--worker-class", "sync", "--preload")
    with running(argv, cwd=workdir, env=env, log=workdir / "gunicorn.log") as server:
        wait_until(
            lambda: server.output().count("threadbudget: worker") >= 2,
            "both workers' post_fork to log",
            START_TIMEOUT,
            server.check_alive,
        )
        wait_for_http(server, port)
        output = server.output()
    assert "forking while" in output, output
    assert "torch (libgomp / MKL)" in output, output
    assert "gunicorn preload_app = False" in output, output
    # Once per master, not once per fork.
    assert output.count("forking while") == 1, output
