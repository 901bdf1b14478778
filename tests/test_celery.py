"""A real Celery worker (prefork, 2 children) with ``setup_celery()``: each child reads its share.

The broker is kombu's filesystem transport and the result backend a directory, both in a private
temporary directory, so no server is needed. Tasks import torch inside the task, after the
child's ``worker_process_init`` set the variables. billiard numbers pool children from 0
(``Pool._create_worker_process(i)`` for ``i in range(processes)``, and a replacement takes the
lowest free index), so with ``THREADBUDGET_CPUS=3`` child 0 gets 2 CPUs and child 1 gets 1.
"""

from __future__ import annotations

import re
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from threadbudget import worker_share

from .conftest import PYTHON, python_env
from .test_workers import Server, pythonpath, running, wait_until

celery = pytest.importorskip("celery")

RESULT_TIMEOUT = 60.0  # seconds for one task's result (a child's first task imports torch)
SHARES = {"0": 2, "1": 1}
# SIGTERM: warm shutdown (running tasks finish); SIGQUIT: cold shutdown; then SIGKILL.
STOP = (signal.SIGTERM, signal.SIGQUIT)

TASKS = r'''
"""Tasks for the threadbudget Celery test; the broker and backend live in PROBE_DIR."""
import os
import time

from celery import Celery

from threadbudget.celery import setup_celery

BASE = os.environ["PROBE_DIR"]

app = Celery("tasksmod", broker="filesystem://", backend=f"file://{BASE}/results")
app.conf.broker_transport_options = {
    "data_folder_in": f"{BASE}/queue",
    "data_folder_out": f"{BASE}/queue",
    "processed_folder": f"{BASE}/processed",
    "control_folder": f"{BASE}/control",
    "store_processed": False,
    "polling_interval": 0.1,
}
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True
app.conf.broker_connection_retry_on_startup = True
setup_celery()


@app.task
def probe(pause=0.0):
    import numpy  # noqa: F401  (OpenBLAS, for threadpoolctl to see)
    import torch
    from threadpoolctl import threadpool_info

    time.sleep(pause)  # hold this child so the next task goes to the other one
    pools = {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()}
    return {
        "pid": os.getpid(),
        "torch": torch.get_num_threads(),
        "index": os.environ.get("THREADBUDGET_WORKER_INDEX"),
        "workers": os.environ.get("THREADBUDGET_WORKERS"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "openblas": pools.get("openblas"),
        "pools": pools,
    }


@app.task
def slots_budget(pause=0.0):
    from threadbudget import CpuSlots

    time.sleep(pause)
    slots = CpuSlots()
    with slots.slot() as grant:
        return {
            "pid": os.getpid(),
            "index": os.environ.get("THREADBUDGET_WORKER_INDEX"),
            "workers": os.environ.get("THREADBUDGET_WORKERS"),
            "budget": slots.budget,
            "grant": int(grant),
        }
'''


@dataclass
class Worker:
    server: Server
    client: Any  # a Celery app that only sends tasks and reads results


def _client(base: Path) -> Any:
    app = celery.Celery(
        "client", broker="filesystem://", backend=f"file://{base}/results", set_as_current=False
    )
    app.conf.broker_transport_options = {
        "data_folder_in": f"{base}/queue",
        "data_folder_out": f"{base}/queue",
        "processed_folder": f"{base}/processed",
        # kombu's default is "control" in the working directory; keep it in the test's dir.
        "control_folder": f"{base}/control",
        "store_processed": False,
    }
    return app


@contextmanager
def celery_worker(concurrency: str, **variables: str) -> Iterator[Worker]:
    """A prefork worker in a private directory; stopped and removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="threadbudget-celery-") as path:
        base = Path(path)
        for folder in ("queue", "processed", "results"):
            (base / folder).mkdir()
        (base / "tasksmod.py").write_text(TASKS)
        env = python_env(PROBE_DIR=str(base), PYTHONPATH=pythonpath(base), THREADBUDGET_CPUS="3")
        env.update(variables)
        argv = [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "tasksmod",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            concurrency,
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname",
            f"threadbudget-test-{time.monotonic_ns()}@localhost",
        ]
        with running(
            argv,
            cwd=base,
            env=env,
            log=base / "worker.log",
            stop_signals=STOP,
        ) as server:
            client = _client(base)
            try:
                wait_until(
                    lambda: "ready." in server.output(),
                    "the Celery worker to be ready",
                    90,
                    server.check_alive,
                )
                yield Worker(server, client)
            finally:
                client.close()


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with celery_worker("2") as started:
        yield started


def _collect(
    worker: Worker, task: str, until: int = 2, rounds: int = 6
) -> dict[str | None, dict[str, Any]]:
    """Results by child index: batches of tasks that pause, until *until* children answered.

    Each child must report its own index (a pid seen under two indexes, or two pids under one,
    fails), so the result has one entry per child.
    """
    by_pid: dict[int, dict[str, Any]] = {}
    for _ in range(rounds):
        results = [
            worker.client.send_task(f"tasksmod.{task}", args=(0.5,)) for _ in range(2 * until)
        ]
        for result in results:
            try:
                value = result.get(timeout=RESULT_TIMEOUT)
            except Exception as error:
                raise AssertionError(
                    f"{task} failed: {error!r}\n{worker.server.output()[-6000:]}"
                ) from error
            seen = by_pid.setdefault(value["pid"], value)
            assert seen["index"] == value["index"], (seen, value)
        if len(by_pid) >= until:
            break
        worker.server.check_alive()
    by_index = {report["index"]: report for report in by_pid.values()}
    assert len(by_index) == len(by_pid), f"children share an index: {by_pid}"
    return by_index


@pytest.mark.torch
def test_each_prefork_child_gets_its_share(worker: Worker) -> None:
    pytest.importorskip("torch")
    by_index = _collect(worker, "probe")
    output = worker.server.output()
    assert set(by_index) == set(SHARES), (by_index, output)
    assert by_index["0"]["pid"] != by_index["1"]["pid"]
    for index, share in SHARES.items():
        report = by_index[index]
        assert report["workers"] == "2", report
        assert report["torch"] == share, report
        assert report["omp"] == str(share), report
        assert report["openblas"] == share, report
        assert set(report["pools"].values()) == {share}, report
    assert "too late" not in output, output


def test_cpu_slots_in_a_task_have_the_childs_share(worker: Worker) -> None:
    by_index = _collect(worker, "slots_budget")
    assert set(by_index) == set(SHARES), by_index
    for index, share in SHARES.items():
        assert by_index[index]["workers"] == "2", by_index
        assert by_index[index]["budget"] == share, by_index
        # a lone slot under the elastic policy takes the whole share
        assert by_index[index]["grant"] == share, by_index


def test_auto_concurrency_children_share_the_budget() -> None:
    # Fix: keep the WorkController that worker_init passes (_record_pool_size) and, in the
    # forked child, read its concurrency, which Celery has resolved to an int by then, when
    # THREADBUDGET_WORKERS was not recorded.
    with celery_worker("auto") as auto:
        match = re.search(r"concurrency: (\d+)", auto.server.output())
        assert match, auto.server.output()
        pool_size = int(match.group(1))
        by_index = _collect(auto, "slots_budget", until=pool_size)
    assert len(by_index) == pool_size, by_index
    for index, report in by_index.items():
        assert index is not None, report
        assert report["workers"] == str(pool_size), report
        assert report["budget"] == worker_share(3, pool_size, int(index)), report


def test_garbage_worker_count_still_gives_each_child_its_share() -> None:
    # Fix: parse THREADBUDGET_WORKERS with _settings.parse_positive_int in _apply_child_share
    # (and _record_pool_size), warn about a bad value and fall back to the pool size.
    with celery_worker("2", THREADBUDGET_WORKERS="two") as started:
        by_index = _collect(started, "slots_budget")
        output = started.server.output()
    assert "THREADBUDGET_WORKERS" in output  # the bad value is reported
    assert set(by_index) == set(SHARES), by_index
    for index, share in SHARES.items():
        assert by_index[index]["budget"] == share, by_index
