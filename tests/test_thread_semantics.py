"""The plan reaches the threads that do the work, counted as OS threads that really ran.

Each case runs in a fresh interpreter: a ThreadPoolExecutor worker and an anyio worker thread,
both started after the plan was applied, run a parallel torch or numpy matmul while
``measure_busy_threads`` reads ``/proc/self/task/*/schedstat``.
"""

from __future__ import annotations

import pytest

from .conftest import run_json_probe

PROBE = r"""
import json, sys, time, warnings
from concurrent.futures import ThreadPoolExecutor

library, order, cpus, concurrency, kind = sys.argv[1:6]
concurrency = int(concurrency)
warnings.simplefilter("ignore")  # the late-env warning is tested elsewhere
import threadbudget

def load():
    if library == "torch":
        import torch
        if kind == "elementwise":  # an ATen parallel loop: OpenMP only, no MKL
            v = torch.rand(4_000_000)
            return lambda: [torch.exp(v) for _ in range(40)]
        x = torch.randn(1200, 1200)
        return lambda: [x @ x for _ in range(6)]
    import numpy
    x = numpy.random.default_rng(0).standard_normal((1200, 1200))
    return lambda: [x @ x for _ in range(6)]

if order == "after-import":
    op = load()
if order != "default":
    threadbudget.apply_plan(cpus=int(cpus), concurrency=concurrency)
if order != "after-import":
    op = load()
op()  # let every pool start before measuring

def busy():
    time.sleep(0.4)  # let pool threads still spinning from the warm-up fall asleep
    return threadbudget.measure_busy_threads(op)[1].busy_count

with ThreadPoolExecutor(1) as pool:
    executor_busy = pool.submit(busy).result(timeout=120)

import anyio
async def in_anyio_thread():
    return await anyio.to_thread.run_sync(busy)
anyio_busy = anyio.run(in_anyio_thread)
print(json.dumps({"executor": executor_busy, "anyio": anyio_busy}))
"""


def busy_threads(
    library: str, order: str, cpus: int = 2, concurrency: int = 1, kind: str = "matmul"
) -> dict[str, int]:
    return run_json_probe(PROBE, library, order, cpus, concurrency, kind)


LIBRARIES = [
    pytest.param("torch", marks=pytest.mark.torch),
    pytest.param("numpy"),
]


@pytest.fixture(params=LIBRARIES)
def library(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    pytest.importorskip(name)
    return name


def test_without_threadbudget_every_call_uses_all_cpus(library: str) -> None:
    assert busy_threads(library, "default") == {"executor": 2, "anyio": 2}


@pytest.mark.parametrize("order", ["before-import", "after-import"])
def test_one_thread_per_task_reaches_later_threads(library: str, order: str) -> None:
    # budget 2, two tasks in flight -> 1 thread each
    assert busy_threads(library, order, cpus=2, concurrency=2) == {"executor": 1, "anyio": 1}


@pytest.mark.torch
def test_runtime_limits_reach_later_threads_exactly() -> None:
    pytest.importorskip("torch")
    # An explicit budget of 3 on this 2-CPU host: 3 is neither the default nor 1, so only a
    # plan that really reached the worker thread can produce it. MKL and OpenBLAS never run
    # more threads than cores, and torch caps its env-derived default at MKL's, so this needs
    # the runtime path and an ATen loop, which follows OpenMP exactly.
    counts = busy_threads("torch", "after-import", cpus=3, kind="elementwise")
    assert counts == {"executor": 3, "anyio": 3}


@pytest.mark.torch
def test_elementwise_default_uses_all_cpus() -> None:
    pytest.importorskip("torch")
    assert busy_threads("torch", "default", kind="elementwise") == {"executor": 2, "anyio": 2}
