"""apply_plan: environment variables for libraries not loaded yet, runtime limits for the rest.

Environment tests use a plain dict as ``environ=`` and ``runtime=False``. Tests with real numpy
and torch run in a fresh interpreter, since this process may have loaded them already.
Controller tests swap the registry for their own controllers and put it back afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import threadbudget
from threadbudget import (
    AppliedBudget,
    EnvConflict,
    RuntimeChange,
    RuntimeController,
    ThreadBudgetWarning,
    apply_plan,
    make_plan,
    register_controller,
    registered_controllers,
    unregister_controller,
)
from threadbudget._envvars import APPLIED_MARKER, planned_values

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_NUMPY = importlib.util.find_spec("numpy") is not None
CPUS = len(os.sched_getaffinity(0))
needs_numpy_and_torch = pytest.mark.skipif(
    not (HAS_TORCH and HAS_NUMPY) or CPUS < 2,
    reason="needs numpy, torch and 2 CPUs (so that T=1 differs from the default pools)",
)
THREAD_VARS = [var.name for var in threadbudget.NATIVE_ENV_VARS if var.role == "threads"]


def quiet_apply(
    budget: int | None = None, *, runtime: bool = False, **kwargs: Any
) -> AppliedBudget:
    """apply_plan without runtime controllers by default; any warning fails the test.

    With *budget*, the plan is made from that count (so no CPU count is asked of this host);
    without it, apply_plan makes the plan itself from its arguments.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if budget is None:
            return apply_plan(runtime=runtime, **kwargs)
        environ = kwargs.pop("environ")
        plan = make_plan(budget, environ={}, **kwargs)
        return apply_plan(plan, runtime=runtime, environ=environ)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without any thread or threadbudget setting."""
    names = {var.name for var in threadbudget.NATIVE_ENV_VARS}
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in names and not key.startswith("THREADBUDGET_")
    }
    env.update(extra)
    return env


def run_python(code: str, *args: str, **extra_env: str) -> dict[str, Any]:
    """Run *code* in a fresh interpreter; it must print one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(**extra_env),
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- environment -----------------------------------------------------------------------------


def test_sets_every_planned_variable_on_an_empty_environment() -> None:
    environ: dict[str, str] = {}
    applied = quiet_apply(8, concurrency=2, environ=environ)
    planned = planned_values(applied.plan)
    assert applied.plan.threads == 4
    assert planned
    for name, value in planned.items():
        assert environ[name] == value, name
    assert applied.env_set == planned
    assert applied.env_kept == {}
    assert applied.env_conflicts == []
    assert applied.runtime_changes == []
    assert environ["OMP_NUM_THREADS"] == "4"
    assert set(environ) == {*planned, APPLIED_MARKER}


def test_an_explicit_plan_is_applied_as_is() -> None:
    plan = make_plan(6, concurrency=2, environ={})
    environ: dict[str, str] = {}
    applied = quiet_apply(plan=plan, environ=environ)
    assert applied.plan is plan
    assert environ["OMP_NUM_THREADS"] == "3"
    assert environ["PYTHON_CPU_COUNT"] == "6"


def test_user_value_is_kept_and_a_difference_is_a_conflict() -> None:
    environ = {"MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE", "OTHER": "x"}
    applied = quiet_apply(8, concurrency=2, environ=environ)
    # 1 thread is within the share, so no warning; both values differ from the plan.
    assert environ["MKL_NUM_THREADS"] == "1"
    assert environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert environ["OTHER"] == "x"
    assert applied.env_kept == {"MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    assert sorted(applied.env_conflicts, key=lambda c: c.name) == [
        EnvConflict("MKL_NUM_THREADS", "1", "4"),
        EnvConflict("OMP_WAIT_POLICY", "ACTIVE", "PASSIVE"),
    ]
    assert "MKL_NUM_THREADS" not in applied.env_set
    assert "OMP_WAIT_POLICY" not in applied.env_set
    assert environ["OMP_NUM_THREADS"] == "4"


def test_user_value_equal_to_the_plan_is_kept_without_conflict() -> None:
    environ = {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": " 4 "}
    applied = quiet_apply(8, concurrency=2, environ=environ)
    assert applied.env_kept == {"OMP_NUM_THREADS": "4", "OPENBLAS_NUM_THREADS": " 4 "}
    assert applied.env_conflicts == []
    assert environ["OPENBLAS_NUM_THREADS"] == " 4 "
    assert "OMP_NUM_THREADS" not in applied.env_set


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"])
def test_user_thread_count_above_the_share_warns(name: str) -> None:
    environ = {name: "16"}
    with pytest.warns(ThreadBudgetWarning, match=rf"{name}=16 was set by the user") as record:
        applied = apply_plan(
            make_plan(8, concurrency=2, environ={}), runtime=False, environ=environ
        )
    assert len(record) == 1
    assert environ[name] == "16"
    assert applied.env_conflicts == [EnvConflict(name, "16", "4")]
    assert any(name in message for message in applied.warnings)


def test_user_thread_count_one_above_the_share_warns() -> None:
    environ = {"OMP_NUM_THREADS": "5"}  # the share is 8 CPUs / 2 tasks = 4
    with pytest.warns(ThreadBudgetWarning, match=r"OMP_NUM_THREADS=5 was set by the user"):
        apply_plan(make_plan(8, concurrency=2, environ={}), runtime=False, environ=environ)


def test_user_thread_count_within_the_share_does_not_warn() -> None:
    environ = {"OMP_NUM_THREADS": "2"}
    applied = quiet_apply(8, concurrency=2, environ=environ)
    assert applied.env_conflicts == [EnvConflict("OMP_NUM_THREADS", "2", "4")]
    assert applied.warnings == []


def test_user_process_cap_is_not_a_thread_count_warning() -> None:
    # OMP_THREAD_LIMIT has role "process": a large value is a conflict, not oversubscription.
    environ = {"OMP_THREAD_LIMIT": "64"}
    applied = quiet_apply(8, concurrency=2, environ=environ)
    assert applied.env_conflicts == [EnvConflict("OMP_THREAD_LIMIT", "64", "8")]


def test_restore_puts_the_environment_back_exactly() -> None:
    environ = {
        "PATH": "/bin",
        "MKL_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "3",
        "OMP_WAIT_POLICY": "ACTIVE",
    }
    original = dict(environ)
    with pytest.warns(ThreadBudgetWarning, match="OMP_NUM_THREADS=3"):
        applied = apply_plan(
            make_plan(4, concurrency=4, environ={}), runtime=False, environ=environ
        )
    assert environ != original
    assert not applied.restored
    applied.restore()
    assert applied.restored
    assert environ == original
    applied.restore()  # idempotent
    assert environ == original


def test_restore_on_an_empty_environment_removes_everything() -> None:
    environ: dict[str, str] = {}
    applied = quiet_apply(cpus=1, environ=environ)
    assert environ
    applied.restore()
    assert environ == {}


def test_restore_is_idempotent_even_after_later_changes() -> None:
    environ: dict[str, str] = {"KEEP": "1"}
    applied = quiet_apply(cpus=1, environ=environ)
    applied.restore()
    environ["OMP_NUM_THREADS"] = "9"  # the user's change after restoring must survive
    applied.restore()
    assert environ == {"KEEP": "1", "OMP_NUM_THREADS": "9"}


def test_context_manager_restores_on_exit_and_on_error() -> None:
    environ = {"A": "b"}
    with quiet_apply(cpus=1, environ=environ) as applied:
        assert isinstance(applied, AppliedBudget)
        assert environ["OMP_NUM_THREADS"] == "1"
    assert environ == {"A": "b"}
    assert applied.restored

    seen: list[str] = []

    def fail_inside() -> None:
        with quiet_apply(cpus=1, environ=environ):
            seen.append(environ["OMP_NUM_THREADS"])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert seen == ["1"]
    assert environ == {"A": "b"}


def test_previous_apply_is_replanned_not_kept() -> None:
    environ: dict[str, str] = {"USER_VAR": "1"}
    first = quiet_apply(4, concurrency=4, environ=environ)
    assert environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS=1" in environ[APPLIED_MARKER]
    after_first = dict(environ)

    second = quiet_apply(4, concurrency=2, environ=environ)
    assert second.env_kept == {}
    assert second.env_conflicts == []
    assert environ["OMP_NUM_THREADS"] == "2"
    assert environ["MKL_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS=2" in environ[APPLIED_MARKER]

    second.restore()
    assert environ == after_first
    first.restore()
    assert environ == {"USER_VAR": "1"}


def test_marker_from_a_parent_process_marks_values_as_ours() -> None:
    # As a child of `threadbudget run` sees it: values and the marker that lists them.
    environ = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        APPLIED_MARKER: "MKL_NUM_THREADS=1,OMP_NUM_THREADS=1",
    }
    applied = quiet_apply(4, environ=environ)
    assert applied.env_kept == {}
    assert environ["OMP_NUM_THREADS"] == "4"
    assert environ["MKL_NUM_THREADS"] == "4"


def test_value_changed_after_our_apply_is_the_users() -> None:
    environ = {"OMP_NUM_THREADS": "2", APPLIED_MARKER: "OMP_NUM_THREADS=1"}
    applied = quiet_apply(4, concurrency=2, environ=environ)
    assert applied.env_kept == {"OMP_NUM_THREADS": "2"}
    assert environ["OMP_NUM_THREADS"] == "2"
    assert applied.env_conflicts == []


def test_replanning_drops_variables_the_new_plan_no_longer_sets() -> None:
    environ: dict[str, str] = {}
    quiet_apply(4, concurrency=4, environ=environ)  # T=1, passive
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert environ["TOKENIZERS_PARALLELISM"] == "false"

    second = quiet_apply(4, concurrency=1, environ=environ)  # T=4, not passive
    assert not second.plan.passive_wait
    assert environ["OMP_NUM_THREADS"] == "4"
    stale = {
        name: environ[name]
        for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "TOKENIZERS_PARALLELISM")
        if name in environ
    }
    assert stale == {}


def test_plan_plus_arguments_is_a_type_error() -> None:
    plan = make_plan(4, environ={})
    environ: dict[str, str] = {}
    for kwargs in ({"concurrency": 2}, {"workers": 2}, {"threads": 1}, {"cpus": 2}):
        with pytest.raises(TypeError, match="either a plan"):
            apply_plan(plan, runtime=False, environ=environ, **kwargs)  # type: ignore[arg-type]
    assert environ == {}


def test_threadbudget_env_vars_configure_the_plan() -> None:
    environ = {"THREADBUDGET_CPUS": "1", "THREADBUDGET_WAIT_POLICY": "passive"}
    applied = quiet_apply(environ=environ)
    assert applied.plan.budget == 1
    assert applied.plan.sources["wait_policy"] == "env:THREADBUDGET_WAIT_POLICY"
    assert environ["PYTHON_CPU_COUNT"] == "1"
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_arguments_make_the_plan_when_none_is_given() -> None:
    environ = {"THREADBUDGET_CONCURRENCY": "1"}
    applied = quiet_apply(cpus=1, concurrency=3, threads=2, environ=environ)
    assert applied.plan.budget == 1
    assert (applied.plan.concurrency, applied.plan.threads) == (3, 2)
    assert applied.plan.sources["concurrency"] == "argument"
    assert environ["OMP_NUM_THREADS"] == "2"


def test_to_dict_is_json_serialisable() -> None:
    environ = {"MKL_NUM_THREADS": "1"}
    applied = quiet_apply(4, concurrency=2, environ=environ)
    data = json.loads(json.dumps(applied.to_dict()))
    assert data["env_set"]["OMP_NUM_THREADS"] == "2"
    assert data["env_kept"] == {"MKL_NUM_THREADS": "1"}
    assert data["env_conflicts"] == [
        {"name": "MKL_NUM_THREADS", "user_value": "1", "planned_value": "2"}
    ]


# --- runtime controllers (fakes) -------------------------------------------------------------


class RecordingController(RuntimeController):
    def __init__(self, name: str, *, before: int | None = None, loaded: bool = True) -> None:
        self.name = name
        self.before = before
        self.loaded = loaded
        self.calls: list[int] = []
        self.undone = 0

    def is_loaded(self) -> bool:
        return self.loaded

    def pools(self) -> list[dict[str, Any]]:
        return [{"num_threads": self.calls[-1] if self.calls else 0}]

    def limit(self, threads: int) -> list[RuntimeChange]:
        self.calls.append(threads)

        def undo() -> None:
            self.undone += 1

        return [RuntimeChange(self.name, f"{self.name}-lib", self.before, threads, undo)]


class BrokenController(RecordingController):
    def limit(self, threads: int) -> list[RuntimeChange]:
        self.calls.append(threads)
        raise RuntimeError("library exploded")


@contextmanager
def only_controllers(*controllers: RuntimeController) -> Iterator[None]:
    """Replace the registry by *controllers*; the original registry comes back afterwards."""
    saved = registered_controllers()
    try:
        for controller in saved:
            unregister_controller(controller.name)
        for controller in controllers:
            register_controller(controller)
        yield
    finally:
        for controller in registered_controllers():
            unregister_controller(controller.name)
        for controller in saved:
            register_controller(controller)


def test_builtin_controllers_are_registered() -> None:
    names = [controller.name for controller in registered_controllers()]
    assert "threadpoolctl" in names
    assert "torch" in names


def test_custom_controller_is_called_with_t_and_undone_on_restore() -> None:
    custom = RecordingController("test-custom")
    with only_controllers(custom):
        assert [c.name for c in registered_controllers()] == ["test-custom"]
        environ: dict[str, str] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            applied = apply_plan(make_plan(6, concurrency=2, environ={}), environ=environ)
        assert custom.calls == [3]
        assert [change.controller for change in applied.runtime_changes] == ["test-custom"]
        assert custom.undone == 0
        applied.restore()
        assert custom.undone == 1
        applied.restore()
        assert custom.undone == 1
    assert "test-custom" not in [c.name for c in registered_controllers()]


def test_runtime_false_calls_no_controller() -> None:
    custom = RecordingController("test-custom")
    with only_controllers(custom):
        quiet_apply(2, environ={}, runtime=False)
    assert custom.calls == []


def test_controller_of_an_unloaded_library_is_not_asked_to_limit() -> None:
    custom = RecordingController("test-unloaded", loaded=False)
    with only_controllers(custom):
        applied = quiet_apply(2, environ={}, runtime=True)
    assert custom.calls == []
    assert applied.runtime_changes == []


def test_changed_runtime_pool_warns_that_the_env_came_too_late() -> None:
    custom = RecordingController("test-late", before=8)
    with only_controllers(custom), pytest.warns(ThreadBudgetWarning, match="too late") as record:
        applied = apply_plan(make_plan(4, concurrency=4, environ={}), environ={})
    assert custom.calls == [1]
    assert any("test-late-lib" in str(item.message) for item in record)
    assert applied.runtime_changes[0].before == 8


def test_failing_controller_warns_by_name_and_others_still_run() -> None:
    broken = BrokenController("test-broken")
    healthy = RecordingController("test-healthy")
    with (
        only_controllers(broken, healthy),
        pytest.warns(ThreadBudgetWarning, match="'test-broken'") as record,
    ):
        applied = apply_plan(make_plan(2, environ={}), environ={})
    assert broken.calls == [2]
    assert healthy.calls == [2]
    assert [c.controller for c in applied.runtime_changes] == ["test-healthy"]
    assert any("library exploded" in str(item.message) for item in record)
    applied.restore()
    assert healthy.undone == 1


def test_register_controller_replaces_one_of_the_same_name() -> None:
    first = RecordingController("test-same")
    second = RecordingController("test-same")
    with only_controllers(first):
        register_controller(second)
        assert registered_controllers() == [second]


def test_unregister_unknown_controller_raises_key_error() -> None:
    with pytest.raises(KeyError, match="no-such-controller"):
        unregister_controller("no-such-controller")


@pytest.mark.parametrize("thing", [object(), "threadpoolctl", RecordingController])
def test_register_non_controller_raises_type_error(thing: object) -> None:
    before = registered_controllers()
    with pytest.raises(TypeError, match="RuntimeController"):
        register_controller(thing)  # type: ignore[arg-type]
    assert registered_controllers() == before


def test_register_controller_without_a_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="name"):
        register_controller(RecordingController(""))


# --- real numpy and torch, each in a fresh interpreter ---------------------------------------

REPORT = r"""
import json, threading
def report(new_thread=False):
    from threadpoolctl import threadpool_info
    import torch
    out = {
        "pools": {p["internal_api"]: p["num_threads"] for p in threadpool_info()},
        "torch": torch.get_num_threads(),
    }
    if new_thread:
        def look():
            out["torch_new_thread"] = torch.get_num_threads()
            x = torch.ones(64, 64)
            out["matmul_ok"] = bool(((x @ x) == 64).all())
        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
    return out
"""

IMPORT_THEN_APPLY = (
    REPORT
    + r"""
import sys, warnings
import numpy, torch
import threadbudget
new_thread_while_applied = sys.argv[1:] == ["new-thread"]
before = report(new_thread=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    applied = threadbudget.apply_plan(cpus=2, concurrency=2)
during = report(new_thread=new_thread_while_applied)
changes = [[c.controller, c.library, c.before, c.after] for c in applied.runtime_changes]
applied.restore()
after = report(new_thread=True)
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    "before": before, "during": during, "after": after, "changes": changes,
}))
"""
)


@pytest.mark.torch
@needs_numpy_and_torch
def test_apply_after_import_resizes_loaded_pools_and_restores_them() -> None:
    out = run_python(IMPORT_THEN_APPLY)
    before, during, after = out["before"], out["during"], out["after"]
    # With 2 CPUs the pools start at 2, so T=1 is a real change.
    assert before["pools"].get("openblas", 0) > 1, before
    assert before["torch"] > 1, before

    late = [
        message
        for category, message in out["warnings"]
        if category == "ThreadBudgetWarning" and "too late" in message
    ]
    assert len(late) >= 1, out["warnings"]
    assert "openblas" in " ".join(late)
    assert "torch" in " ".join(late)

    assert during["pools"], during
    assert set(during["pools"].values()) == {1}, during
    assert during["torch"] == 1

    assert after["pools"] == before["pools"]
    assert after["torch"] == before["torch"]
    # torch keeps a process-wide count that threads started later apply: it must be restored
    # too, not just this thread's OpenMP value.
    assert after["torch_new_thread"] == before["torch_new_thread"]
    torch_changes = [change for change in out["changes"] if change[0] == "torch"]
    assert torch_changes, out["changes"]
    assert torch_changes[0][2] == before["torch"]


@pytest.mark.torch
@needs_numpy_and_torch
def test_threads_started_while_applied_run_torch_with_t_threads() -> None:
    # A thread started after the apply gets T from torch and runs a matmul without crashing
    # (MKL's thread-local setter is called in it), and restore() undoes that for later threads.
    out = run_python(IMPORT_THEN_APPLY, "new-thread")
    during = out["during"]
    assert during["torch_new_thread"] == 1
    assert during["matmul_ok"] is True
    assert out["after"]["torch_new_thread"] == out["before"]["torch_new_thread"]


APPLY_THEN_IMPORT = (
    REPORT
    + r"""
import warnings
import threadbudget
warnings.simplefilter("error", threadbudget.ThreadBudgetWarning)
applied = threadbudget.apply_plan(cpus=2, concurrency=2)
import numpy, torch
now = report(new_thread=True)
print(json.dumps({"warnings": applied.warnings, "changes": len(applied.runtime_changes),
                  "now": now}))
"""
)


@pytest.mark.torch
@needs_numpy_and_torch
def test_apply_before_import_needs_no_runtime_change() -> None:
    out = run_python(APPLY_THEN_IMPORT)
    assert out["warnings"] == []
    assert out["changes"] == 0
    now = out["now"]
    assert "openblas" in now["pools"], now
    assert set(now["pools"].values()) == {1}, now
    assert now["torch"] == 1
    assert now["torch_new_thread"] == 1
    assert now["matmul_ok"] is True


@pytest.mark.skipif(not HAS_NUMPY or CPUS < 2, reason="needs numpy and 2 CPUs")
def test_numpy_alone_default_is_above_the_plan() -> None:
    # The control for the tests above: without threadbudget, numpy's pool is larger than T=1.
    out = run_python(
        "import json, numpy\nfrom threadpoolctl import threadpool_info\n"
        "print(json.dumps({p['internal_api']: p['num_threads'] for p in threadpool_info()}))"
    )
    assert out.get("openblas", 0) > 1, out
