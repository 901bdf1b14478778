"""Fork safety, in fresh interpreters that really fork.

* Forking over a started torch pool warns once per process (naming torch and GCC bug 60035);
  forking with no native library loaded says nothing.
* A child starts with a fresh token pool: tokens held and waiters queued by parent threads, and
  locks a parent thread held at the fork, are not inherited; a slot the forking thread itself
  held releases nothing in the child, and the parent's pool is unaffected.

Every probe runs under a subprocess timeout, and every forked child arms ``alarm()`` so that a
child stuck on an inherited lock dies instead of outliving the test.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from .conftest import PYTHON, python_env

TIMEOUT = 120  # seconds for one probe (the torch probes import torch)

# Shared by every probe: fork, run check() in the child, get its JSON back through a pipe.
COMMON = r"""
import json, os, signal, sys, threading, time, warnings
warnings.filterwarnings("ignore", category=DeprecationWarning)  # 3.12+: fork() with threads
signal.alarm(60)  # the probe itself never outlives a minute
import threadbudget


def fork_and_check(check):
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a child stuck on an inherited lock dies instead of lingering
        os.close(read_end)
        code = 0
        try:
            out = check()
        except BaseException as error:
            out, code = {"error": repr(error)}, 1
        os.write(write_end, json.dumps(out).encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    return {"child": json.loads(data) if data else None, "code": os.waitstatus_to_exitcode(status)}


def snap(pool):
    s = pool.snapshot()
    return {"in_use": s.in_use, "holders": s.holders, "waiting": s.waiting, "free": s.free}


def take_whole(pool):
    # the whole budget, with a bounded wait: the pool must be free at once in the child
    started = time.monotonic()
    with pool.slot(pool.budget, timeout=1) as grant:
        inside = snap(pool)
        return {"grant": int(grant), "inside": inside, "took": time.monotonic() - started}
"""


def run_probe(body: str, *args: str) -> tuple[dict[str, Any], str]:
    result = subprocess.run(
        [PYTHON, "-c", COMMON + body, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=python_env(),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


# --- the before-fork warning -------------------------------------------------------------------

TORCH_FORK = r"""
warnings.simplefilter("always")  # so that only threadbudget's own once-per-process rule counts
import torch

slots = threadbudget.CpuSlots(2)  # installs the at-fork handlers
x = torch.randn(2_000_000)
(x * 2).sum()  # an ATen parallel loop: starts the OpenMP pool
torch.ones(256, 256) @ torch.ones(256, 256)
native = threadbudget.count_os_threads() - threading.active_count()
print("FIRST FORK", file=sys.stderr, flush=True)
with slots.slot(2):  # forking while holding the whole budget: the child holds none of it
    first = fork_and_check(lambda: {**snap(slots), "grant": slots.current_grant()})
print("SECOND FORK", file=sys.stderr, flush=True)
second = fork_and_check(lambda: snap(slots))
print(json.dumps({"native": native, "first": first, "second": second, "after": snap(slots)}))
"""


@pytest.mark.torch
def test_fork_after_torch_started_its_pool_warns_once() -> None:
    pytest.importorskip("torch")
    out, stderr = run_probe(TORCH_FORK)
    assert out["native"] > 0, out  # the pool really runs threads
    assert out["first"]["code"] == 0, out
    assert out["second"]["code"] == 0, out
    assert out["first"]["child"] == {
        "in_use": 0,
        "holders": 0,
        "waiting": 0,
        "free": 2,
        "grant": None,
    }, out
    assert out["after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}, out

    before_first, _, rest = stderr.partition("FIRST FORK")
    between, _, after_second = rest.partition("SECOND FORK")
    assert "ThreadBudgetWarning" not in before_first, stderr
    assert "ThreadBudgetWarning" in between, stderr
    assert "torch" in between
    assert "GCC bug 60035" in between
    assert "native thread(s)" in between
    # once per process, even though the second fork is as unsafe as the first
    assert "ThreadBudgetWarning" not in after_second, stderr
    assert stderr.count("ThreadBudgetWarning") == 1, stderr


PLAIN_FORK = r"""
warnings.simplefilter("always")
slots = threadbudget.CpuSlots(2)
threadbudget.install_fork_safety()
loaded = [name for name in ("torch", "numpy", "scipy") if name in sys.modules]
results = [fork_and_check(lambda: snap(slots)) for _ in range(2)]
print(json.dumps({"loaded": loaded, "results": results}))
"""


def test_fork_without_native_libraries_says_nothing() -> None:
    out, stderr = run_probe(PLAIN_FORK)
    assert out["loaded"] == [], out  # importing threadbudget loads no native library
    assert [result["code"] for result in out["results"]] == [0, 0]
    assert stderr == ""


IDEMPOTENT = r"""
registered = []
real_register = os.register_at_fork


def counting(**hooks):
    registered.append({name: getattr(f, "__module__", "") for name, f in hooks.items()})
    return real_register(**hooks)


os.register_at_fork = counting
for _ in range(3):
    threadbudget.install_fork_safety()
pools = [threadbudget.CpuSlots(2), threadbudget.TokenPool(2), threadbudget.CpuSlots(1)]
threadbudget.install_fork_safety()
os.register_at_fork = real_register
ours = [hooks for hooks in registered if "threadbudget._forksafety" in hooks.values()]
first = fork_and_check(lambda: [pool._epoch for pool in pools])


def grandchild():
    # the handlers are inherited: a fork in the child resets the pools once more
    return fork_and_check(lambda: [pool._epoch for pool in pools])


second = fork_and_check(grandchild)
print(json.dumps({"ours": ours, "first": first, "second": second,
                  "parent": [pool._epoch for pool in pools]}))
"""


def test_install_fork_safety_registers_the_handlers_once() -> None:
    out, _ = run_probe(IDEMPOTENT)
    # one registration however often it is called (explicitly or by each pool) ...
    assert len(out["ours"]) == 1, out
    # ... so each fork resets every pool exactly once
    assert out["first"]["child"] == [1, 1, 1], out
    assert out["second"]["child"]["child"] == [2, 2, 2], out
    assert out["parent"] == [0, 0, 0]


# --- tokens, waiters and locks are not inherited -------------------------------------------------

HELD_BY_A_THREAD = r"""
pool = threadbudget.CpuSlots(2)
entered, done = threading.Event(), threading.Event()


def hold():
    with pool.slot(2):
        entered.set()
        done.wait(30)


holder = threading.Thread(target=hold)
holder.start()
assert entered.wait(30)
parent_before = snap(pool)


def check():
    return {"before": snap(pool), "take": take_whole(pool), "after": snap(pool),
            "grant_here": pool.current_grant()}


result = fork_and_check(check)
parent_during = snap(pool)
done.set()
holder.join(30)
print(json.dumps({"parent_before": parent_before, "result": result,
                  "parent_during": parent_during, "parent_after": snap(pool),
                  "parent_grants": pool.snapshot().grants_total}))
"""


def test_child_of_a_parent_whose_thread_holds_the_budget_starts_free() -> None:
    out, _ = run_probe(HELD_BY_A_THREAD)
    assert out["parent_before"] == {"in_use": 2, "holders": 1, "waiting": 0, "free": 0}
    result = out["result"]
    assert result["code"] == 0, result
    child = result["child"]
    assert child["before"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert child["take"]["grant"] == 2
    assert child["take"]["inside"]["in_use"] == 2
    assert child["take"]["took"] < 1
    assert child["after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert child["grant_here"] is None
    # the parent's books are its own: the holder still holds, then releases exactly once
    assert out["parent_during"] == out["parent_before"]
    assert out["parent_after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert out["parent_grants"] == 1


HELD_BY_THE_FORKING_THREAD = r"""
pool = threadbudget.CpuSlots(2)
read_end, write_end = os.pipe()
sys.stdout.flush()
with pool.slot(2) as grant:
    parent_inside = snap(pool)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        child_inside = {"snap": snap(pool), "grant_here": pool.current_grant()}
if pid == 0:
    # the slot above was entered before the fork: leaving it released nothing here
    child = {"inside": child_inside, "after_exit": snap(pool)}
    try:
        child["take"] = take_whole(pool)
        child["final"] = snap(pool)
    except BaseException as error:
        child["error"] = repr(error)
    os.write(write_end, json.dumps(child).encode())
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end, "rb") as pipe:
    child = json.loads(pipe.read())
_, status = os.waitpid(pid, 0)
print(json.dumps({"parent_inside": parent_inside, "parent_after": snap(pool), "child": child,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def test_slot_held_across_fork_releases_nothing_in_the_child() -> None:
    out, _ = run_probe(HELD_BY_THE_FORKING_THREAD)
    assert out["code"] == 0, out
    child = out["child"]
    assert "error" not in child, child
    assert child["inside"]["snap"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert child["inside"]["grant_here"] is None
    # no over-release: free stays at the budget, holders at 0
    assert child["after_exit"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert child["take"]["grant"] == 2
    assert child["final"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert out["parent_inside"]["in_use"] == 2
    assert out["parent_after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}


WAITER_QUEUED = r"""
pool = threadbudget.CpuSlots(2)
entered, done = threading.Event(), threading.Event()
outcome = {}


def hold():
    with pool.slot(2):
        entered.set()
        done.wait(30)


def wait_for_tokens():
    with pool.slot(2, timeout=30) as grant:
        outcome["waiter_grant"] = int(grant)


holder = threading.Thread(target=hold)
holder.start()
assert entered.wait(30)
waiter = threading.Thread(target=wait_for_tokens)
waiter.start()
deadline = time.monotonic() + 30
while pool.snapshot().waiting != 1:
    assert time.monotonic() < deadline, "the waiter never queued"
    time.sleep(0.01)
parent_before = snap(pool)


def check():
    return {"before": snap(pool), "take": take_whole(pool), "after": snap(pool)}


result = fork_and_check(check)
done.set()
holder.join(30)
waiter.join(30)
print(json.dumps({"parent_before": parent_before, "result": result, "outcome": outcome,
                  "parent_after": snap(pool)}))
"""


def test_child_of_a_parent_with_a_queued_waiter_has_no_waiters() -> None:
    out, _ = run_probe(WAITER_QUEUED)
    assert out["parent_before"] == {"in_use": 2, "holders": 1, "waiting": 1, "free": 0}
    result = out["result"]
    assert result["code"] == 0, result
    child = result["child"]
    assert child["before"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert child["take"]["grant"] == 2
    assert child["after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    # in the parent the waiter still gets its turn
    assert out["outcome"] == {"waiter_grant": 2}
    assert out["parent_after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}


LOCK_HELD = r"""
pool = threadbudget.CpuSlots(2)
which = sys.argv[1]
lock = pool._lock if which == "pool" else pool.native_limits._lock
locked, release = threading.Event(), threading.Event()


def hold_lock():
    with lock:
        locked.set()
        release.wait(30)


holder = threading.Thread(target=hold_lock)
holder.start()
assert locked.wait(30)


def check():
    # in a helper thread, so that a lock inherited as held shows as a hang, not a dead child
    taken = {}

    def take():
        taken.update(take_whole(pool))

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(5)
    return {"entered": not thread.is_alive(), "take": taken, "after": snap(pool)}


result = fork_and_check(check)
release.set()
holder.join(30)
print(json.dumps({"result": result, "parent_after": snap(pool)}))
"""


@pytest.mark.parametrize("which", ["pool", "native"])
def test_lock_held_by_a_parent_thread_at_fork_is_free_in_the_child(which: str) -> None:
    out, _ = run_probe(LOCK_HELD, which)
    result = out["result"]
    assert result["code"] == 0, result
    child = result["child"]
    assert child["entered"] is True, child
    assert child["take"]["grant"] == 2
    assert child["take"]["took"] < 1
    assert child["after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
    assert out["parent_after"] == {"in_use": 0, "holders": 0, "waiting": 0, "free": 2}
