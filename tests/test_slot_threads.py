"""Inside a slot of k tokens the work runs exactly k native threads, counted as OS threads.

Each case runs in a fresh interpreter with nothing applied beforehand, so every native pool
starts at its default (one thread per CPU here) and only the slot can bring it to k.
"""

from __future__ import annotations

import os

import pytest

from .conftest import run_json_probe

BUDGET = len(os.sched_getaffinity(0))

PROBE = r"""
import json, sys, time
import anyio
import threadbudget

library, k, entry = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if library == "torch":
    import torch
    x = torch.randn(1200, 1200)
    op = lambda: [x @ x for _ in range(6)]
else:
    import numpy
    x = numpy.random.default_rng(0).standard_normal((1200, 1200))
    op = lambda: [x @ x for _ in range(6)]
op()
slots = threadbudget.CpuSlots(int(sys.argv[4]))

def busy():
    # Idle pool threads spin for a while after their last job (OpenBLAS ~0.1 s by default);
    # let them fall asleep so only this operation's threads are counted.
    time.sleep(0.4)
    return threadbudget.measure_busy_threads(op)[1].busy_count

if entry == "sync":
    with slots.executor(1, k=k) as executor:
        inside = executor.submit(busy).result(timeout=120)
else:
    async def main():
        return await slots.run_sync(busy, k=k)
    inside = anyio.run(main)
after = busy()  # the main thread, outside any slot, after the slot was left
print(json.dumps({"inside": inside, "after": after}))
"""


def run_probe(library: str, k: int, entry: str) -> dict[str, int]:
    return run_json_probe(PROBE, library, k, entry, BUDGET)


@pytest.fixture(params=[pytest.param("torch", marks=pytest.mark.torch), "numpy"])
def library(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    pytest.importorskip(name)
    return name


@pytest.mark.parametrize("entry", ["sync", "async"])
@pytest.mark.parametrize("k", [1, BUDGET], ids=["k=1", "k=budget"])
def test_slot_of_k_runs_k_native_threads(library: str, k: int, entry: str) -> None:
    assert BUDGET >= 2, "needs at least two CPUs to tell k=1 from k=budget"
    counts = run_probe(library, k, entry)
    assert counts["inside"] == k
    # The main thread never entered a slot: per-thread pools keep their default there. A
    # process-wide pool rests at one thread under slots, is raised by a whole-budget grant and
    # stays there until a smaller grant starts.
    assert counts["after"] == (BUDGET if library == "torch" else k)
