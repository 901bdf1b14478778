"""Tests for pinning one-token slots to CPUs (``CpuSlots(pin=...)``, threadbudget._pinning).

They change real thread affinity with ``sched_setaffinity`` and read it back, so they need two
CPUs in this process's mask (this project's machines have them); every test checks that the
threads it pinned are back on the mask they started with.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings
from typing import Any

import pytest

from threadbudget import CpuSlots, ThreadBudgetWarning
from threadbudget._pinning import CpuPinning, pinning_cpus

from .conftest import run_json_probe

JOIN = 10.0
MASK = sorted(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def _two_cpus_and_the_mask_restored() -> Any:
    assert len(MASK) >= 2, f"these tests pin two threads apart and need 2 CPUs, have {MASK}"
    yield
    assert sorted(os.sched_getaffinity(0)) == MASK, "a test left the main thread pinned"


def affinity() -> list[int]:
    return sorted(os.sched_getaffinity(0))


# --- what pin= accepts ------------------------------------------------------------------------


def test_pin_false_is_off() -> None:
    assert pinning_cpus(False, 2) is None
    assert CpuSlots(2).pinned_cpus is None


def test_pin_true_takes_the_affinity_mask_when_it_matches_the_budget() -> None:
    assert pinning_cpus(True, len(MASK)) == tuple(MASK)
    assert CpuSlots(len(MASK), pin=True).pinned_cpus == tuple(MASK)


def test_pin_true_with_a_mask_wider_than_the_budget_names_both_counts() -> None:
    with pytest.raises(ValueError, match=rf"{len(MASK)} CPUs for a budget of 1.*pin=\[cpu"):
        CpuSlots(1, pin=True)


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ("01", "iterable of CPU numbers, got '01'"),
        (3, "iterable of CPU numbers, got 3"),
        ([0, "1"], r"must list CPU numbers \(int\), got \[0, '1'\]"),
        ([0, True], r"must list CPU numbers \(int\)"),
        ([MASK[0], MASK[0]], "more than once"),
        ([MASK[0], 10_000], r"CPUs \[10000\] that this process may not run on"),
        ([MASK[0]], "lists 1 CPUs for a budget of 2"),
    ],
)
def test_bad_pin_values_raise_naming_the_value(pin: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CpuSlots(2, pin=pin)


def test_pin_needs_native_limits() -> None:
    with pytest.raises(ValueError, match="pin needs native_limits=True"):
        CpuSlots(2, pin=MASK[:2], native_limits=False)


def test_explicit_cpus_may_be_more_than_the_budget() -> None:
    assert CpuSlots(1, pin=MASK[:2]).pinned_cpus == tuple(MASK[:2])


# --- what a slot does with them ---------------------------------------------------------------


def test_one_token_slot_runs_on_one_cpu_and_gets_its_mask_back() -> None:
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    with slots.slot() as grant:
        assert int(grant) == 1
        inside = affinity()
    assert len(inside) == 1
    assert inside[0] in MASK[:2]
    assert affinity() == MASK
    assert slots.native_limits is not None


def test_concurrent_one_token_slots_get_different_cpus() -> None:
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    both_inside = threading.Barrier(2, timeout=JOIN)
    seen: dict[str, list[int]] = {}

    def work(name: str) -> None:
        with slots.slot():
            seen[name] = affinity()
            both_inside.wait()
        seen[name + " after"] = affinity()

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert sorted(seen["a"] + seen["b"]) == MASK[:2]
    assert seen["a after"] == seen["b after"] == MASK


def test_grant_of_more_than_one_thread_is_not_pinned() -> None:
    slots = CpuSlots(2, pin=MASK[:2])  # elastic: a lone slot gets the whole budget
    with slots.slot() as grant:
        assert int(grant) == 2
        assert affinity() == MASK


def test_elastic_slot_that_asks_for_one_token_is_pinned_once_when_nested() -> None:
    slots = CpuSlots(2, pin=MASK[:2])
    with slots.slot(1), slots.slot(1):  # nested: the inner slot reuses the outer grant
        assert len(affinity()) == 1
    assert affinity() == MASK


def test_a_thread_with_its_own_mask_gets_that_mask_back() -> None:
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    result: dict[str, list[int]] = {}

    def work() -> None:
        os.sched_setaffinity(0, MASK[:2])
        with slots.slot():
            result["inside"] = affinity()
        result["after"] = affinity()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(JOIN)
    assert len(result["inside"]) == 1
    assert result["after"] == MASK[:2]


def test_a_cpu_comes_back_when_the_work_raises() -> None:
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    pinning = slots.native_limits._pinning if slots.native_limits else None
    assert pinning is not None
    with pytest.raises(ZeroDivisionError), slots.slot():
        1 / 0  # noqa: B018
    assert pinning.free_cpus() == 2
    assert affinity() == MASK


def test_executor_jobs_run_pinned_to_different_cpus() -> None:
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    both_running = threading.Barrier(2, timeout=JOIN)

    def job() -> list[int]:
        mask = affinity()
        both_running.wait()
        return mask

    with slots.executor() as pool:
        masks = [f.result(JOIN) for f in [pool.submit(job), pool.submit(job)]]
    assert sorted(m for mask in masks for m in mask) == MASK[:2]


def test_with_no_cpu_free_a_thread_stays_unpinned() -> None:
    pinning = CpuPinning((MASK[0],))
    first_pinned, second_done = threading.Event(), threading.Event()
    result: dict[str, list[int]] = {}

    def second() -> None:
        # Started before the first pin: a thread inherits the affinity of the one that starts it.
        assert first_pinned.wait(JOIN)
        undo = pinning.pin()
        result["inside"] = affinity()
        undo()
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    first = pinning.pin()
    try:
        first_pinned.set()
        assert second_done.wait(JOIN)
        assert affinity() == [MASK[0]]
    finally:
        first()
        thread.join(JOIN)
    assert result["inside"] == MASK
    assert pinning.free_cpus() == 1


def test_affinity_refused_by_the_kernel_warns_once_and_runs_unpinned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(pid: int, mask: Any) -> None:
        raise OSError(22, "Invalid argument")

    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with slots.slot():
                pass
    monkeypatch.undo()
    messages = [str(w.message) for w in caught if issubclass(w.category, ThreadBudgetWarning)]
    assert len(messages) == 1, messages
    assert "could not pin a slot to CPU" in messages[0]
    assert "Invalid argument" in messages[0]
    pinning = slots.native_limits._pinning if slots.native_limits else None
    assert pinning is not None
    assert pinning.free_cpus() == 2


FORK_WHILE_PINNED = r"""
import json, os, signal, sys, warnings
warnings.filterwarnings("ignore", category=DeprecationWarning)
signal.alarm(60)
import threadbudget

mask = sorted(os.sched_getaffinity(0))[:2]
slots = threadbudget.CpuSlots(2, policy="static", pin=mask)
pinning = slots.native_limits._pinning
read_end, write_end = os.pipe()
sys.stdout.flush()
with slots.slot():
    parent_free = pinning.free_cpus()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        in_child = pinning.free_cpus()
if pid == 0:
    # the slot entered before the fork gave its CPU back to a list that already had it
    child = {"inside": in_child, "after": pinning.free_cpus()}
    with slots.slot(), slots.slot(1):
        child["nested"] = len(os.sched_getaffinity(0))
    child["final"] = pinning.free_cpus()
    os.write(write_end, json.dumps(child).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    child = json.loads(pipe.read())
os.waitpid(pid, 0)
print(json.dumps({"parent_inside": parent_free, "parent_after": pinning.free_cpus(),
                  "child": child}))
"""


def test_a_child_forked_inside_a_pinned_slot_has_every_cpu_free() -> None:
    out = run_json_probe(FORK_WHILE_PINNED, timeout=120)
    assert out["parent_inside"] == 1
    assert out["parent_after"] == 2
    assert out["child"] == {"inside": 2, "after": 2, "nested": 1, "final": 2}


def test_many_threads_never_share_a_pinned_cpu() -> None:
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    holders: dict[int, int] = {}
    lock = threading.Lock()
    clashes: list[str] = []

    def work() -> None:
        for _ in range(200):
            with slots.slot():
                (cpu,) = os.sched_getaffinity(0)
                with lock:
                    if cpu in holders:
                        clashes.append(f"CPU {cpu} held twice")
                    holders[cpu] = threading.get_ident()
                with lock:
                    del holders[cpu]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(work) for _ in range(6)]:
            future.result(JOIN * 3)
    assert clashes == []


def test_a_thread_started_inside_a_pinned_slot_inherits_the_pin() -> None:
    # Documented caveat (docs/coordination.md#pinning): Linux copies the mask to a new thread,
    # and the pool cannot unpin a thread it did not pin.
    slots = CpuSlots(2, policy="static", pin=MASK[:2])
    seen: dict[str, list[int]] = {}

    def child() -> None:
        seen["child"] = affinity()

    with slots.slot():
        seen["slot"] = affinity()
        thread = threading.Thread(target=child)
        thread.start()
        thread.join(JOIN)
    assert len(seen["slot"]) == 1
    assert seen["child"] == seen["slot"]


def test_run_sync_pins_the_worker_thread_and_async_slots_pin_nothing() -> None:
    import anyio

    slots = CpuSlots(2, policy="static", pin=MASK[:2])

    async def main() -> tuple[list[int], list[int], list[int]]:
        async with slots.async_slot():
            in_the_loop = affinity()  # the event loop's thread is shared: never pinned
        worker = await slots.run_sync(affinity)
        after = await anyio.to_thread.run_sync(affinity, limiter=slots.thread_limiter())
        return in_the_loop, worker, after

    in_the_loop, worker, after = anyio.run(main)
    assert in_the_loop == MASK
    assert len(worker) == 1
    assert worker[0] in MASK[:2]
    assert after == MASK  # the same worker threads, their mask given back
