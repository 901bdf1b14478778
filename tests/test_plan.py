"""make_plan splits a budget into workers x in-flight tasks x threads; planned_values maps it
onto the native libraries' environment variables.

Everything here is pure: budgets are plain counts and the environment is a dict passed as
``environ=``, so nothing is detected and no process state changes.
"""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadbudget import NATIVE_ENV_VARS, Plan, ThreadBudgetWarning, make_plan
from threadbudget._envvars import planned_values

BUDGETS = st.integers(1, 256)
CONCURRENCY = st.integers(1, 64)
WORKERS = st.integers(1, 16)
PROPERTY = settings(max_examples=300, deadline=None)

VARS_BY_ROLE = {
    role: [var.name for var in NATIVE_ENV_VARS if var.role == role]
    for role in ("threads", "process", "budget", "passive", "single", "report")
}


def plan_quietly(*args: object, **kwargs: object) -> Plan:
    """make_plan that fails the test on any warning (the environment is always a dict)."""
    kwargs.setdefault("environ", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make_plan(*args, **kwargs)  # type: ignore[arg-type]


# --- the core property -----------------------------------------------------------------------


@PROPERTY
@given(budget=BUDGETS, concurrency=CONCURRENCY, workers=WORKERS)
def test_derived_threads_fill_the_budget_without_exceeding_it(
    budget: int, concurrency: int, workers: int
) -> None:
    plan = plan_quietly(budget, concurrency=concurrency, workers=workers)

    assert plan.budget == budget
    assert plan.concurrency == concurrency
    assert plan.workers == workers
    assert plan.process_budget == max(1, budget // workers)
    assert plan.threads >= 1
    assert plan.total_threads == concurrency * workers * plan.threads
    assert plan.sources["threads"] == "default"

    if concurrency * workers <= budget:
        assert concurrency * workers * plan.threads <= budget
        # maximal: one more thread per task would not fit this process's share
        assert concurrency * (plan.threads + 1) > budget // workers
        assert not plan.oversubscribed
        assert plan.notes == ()
    else:
        assert plan.threads == 1
        assert plan.oversubscribed
        assert any(
            "exceeds the budget" in note and str(concurrency * workers) in note
            for note in plan.notes
        ), plan.notes


@PROPERTY
@given(budget=BUDGETS, concurrency=CONCURRENCY, workers=WORKERS, threads=st.integers(1, 64))
def test_explicit_threads_win_and_are_noted_when_too_many(
    budget: int, concurrency: int, workers: int, threads: int
) -> None:
    derived = plan_quietly(budget, concurrency=concurrency, workers=workers).threads
    plan = plan_quietly(budget, concurrency=concurrency, workers=workers, threads=threads)

    assert plan.threads == threads
    assert plan.sources["threads"] == "argument"
    assert plan.oversubscribed == (concurrency * workers * threads > budget)
    too_many_notes = [note for note in plan.notes if f"threads={threads}" in note]
    if threads > derived:
        assert len(too_many_notes) == 1
        assert str(derived) in too_many_notes[0]
        assert plan.oversubscribed
    else:
        assert too_many_notes == []


@pytest.mark.parametrize(
    ("budget", "workers", "expected"),
    [(8, 1, 8), (8, 2, 4), (8, 3, 2), (7, 2, 3), (2, 2, 1), (2, 5, 1), (1, 16, 1)],
)
def test_process_budget_is_the_per_worker_share(budget: int, workers: int, expected: int) -> None:
    plan = plan_quietly(budget, workers=workers)
    assert plan.process_budget == expected


def test_more_workers_than_cpus_is_noted() -> None:
    plan = plan_quietly(2, workers=5)
    assert plan.process_budget == 1
    assert plan.threads == 1
    assert plan.oversubscribed
    assert any("5 worker processes exceed the budget of 2" in note for note in plan.notes)


def test_known_plans() -> None:
    assert plan_quietly(16, concurrency=4).threads == 4
    assert plan_quietly(16, concurrency=3).threads == 5
    assert plan_quietly(16, concurrency=4, workers=2).threads == 2
    assert plan_quietly(2).threads == 2
    assert plan_quietly(2, concurrency=2).threads == 1


# --- wait policy -----------------------------------------------------------------------------


@PROPERTY
@given(budget=BUDGETS, concurrency=CONCURRENCY, workers=WORKERS)
def test_auto_wait_policy_is_passive_iff_more_than_one_task_runs(
    budget: int, concurrency: int, workers: int
) -> None:
    plan = plan_quietly(budget, concurrency=concurrency, workers=workers)
    assert plan.wait_policy == "auto"
    assert plan.sources["wait_policy"] == "default"
    assert plan.passive_wait == (concurrency * workers > 1)


@pytest.mark.parametrize(("concurrency", "workers"), [(1, 1), (4, 1), (1, 3), (2, 2)])
def test_explicit_wait_policy_is_honoured(concurrency: int, workers: int) -> None:
    passive = plan_quietly(8, concurrency=concurrency, workers=workers, wait_policy="passive")
    active = plan_quietly(8, concurrency=concurrency, workers=workers, wait_policy="active")
    assert passive.passive_wait is True
    assert passive.wait_policy == "passive"
    assert active.passive_wait is False
    assert active.wait_policy == "active"
    assert passive.sources["wait_policy"] == active.sources["wait_policy"] == "argument"


# --- environment variables -------------------------------------------------------------------


def test_env_vars_are_used_and_recorded_as_sources() -> None:
    environ = {
        "THREADBUDGET_CONCURRENCY": "3",
        "THREADBUDGET_WORKERS": " 2 ",
        "THREADBUDGET_THREADS": "5",
        "THREADBUDGET_WAIT_POLICY": "Active",
    }
    plan = plan_quietly(64, environ=environ)
    assert (plan.concurrency, plan.workers, plan.threads) == (3, 2, 5)
    assert plan.wait_policy == "active"
    assert plan.passive_wait is False
    assert plan.sources == {
        "concurrency": "env:THREADBUDGET_CONCURRENCY",
        "workers": "env:THREADBUDGET_WORKERS",
        "threads": "env:THREADBUDGET_THREADS",
        "wait_policy": "env:THREADBUDGET_WAIT_POLICY",
    }


def test_arguments_beat_env_vars() -> None:
    environ = {
        "THREADBUDGET_CONCURRENCY": "3",
        "THREADBUDGET_WORKERS": "2",
        "THREADBUDGET_THREADS": "5",
        "THREADBUDGET_WAIT_POLICY": "active",
    }
    plan = plan_quietly(
        64, concurrency=4, workers=1, threads=2, wait_policy="passive", environ=environ
    )
    assert (plan.concurrency, plan.workers, plan.threads) == (4, 1, 2)
    assert plan.passive_wait is True
    assert set(plan.sources.values()) == {"argument"}


def test_defaults_are_recorded_as_sources() -> None:
    plan = plan_quietly(4)
    assert (plan.concurrency, plan.workers, plan.threads) == (1, 1, 4)
    assert dict(plan.sources) == {
        "concurrency": "default",
        "workers": "default",
        "threads": "default",
        "wait_policy": "default",
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("THREADBUDGET_CONCURRENCY", "abc"),
        ("THREADBUDGET_CONCURRENCY", "0"),
        ("THREADBUDGET_CONCURRENCY", "-2"),
        ("THREADBUDGET_CONCURRENCY", ""),
        ("THREADBUDGET_WORKERS", "2.5"),
        ("THREADBUDGET_WORKERS", "many"),
        ("THREADBUDGET_WORKERS", "99999999"),
        ("THREADBUDGET_THREADS", "0"),
        ("THREADBUDGET_THREADS", "four"),
        ("THREADBUDGET_WAIT_POLICY", "lazy"),
        ("THREADBUDGET_WAIT_POLICY", "1"),
    ],
)
def test_garbage_env_value_warns_and_falls_back(name: str, value: str) -> None:
    expected = plan_quietly(8, concurrency=2)  # concurrency 2: passive by default
    environ = {"THREADBUDGET_CONCURRENCY": "2", name: value}
    if name == "THREADBUDGET_CONCURRENCY":
        environ = {name: value}
        expected = plan_quietly(8)
    with pytest.warns(ThreadBudgetWarning) as record:
        plan = make_plan(8, environ=environ)
    messages = [str(item.message) for item in record]
    assert len(messages) == 1, messages
    assert name in messages[0]
    assert repr(value) in messages[0]
    key = name.removeprefix("THREADBUDGET_").lower()
    assert plan.sources[key] == "default"
    assert plan.to_dict() | {"sources": None} == expected.to_dict() | {"sources": None}
    assert (plan.concurrency, plan.workers, plan.threads, plan.passive_wait) == (
        expected.concurrency,
        expected.workers,
        expected.threads,
        expected.passive_wait,
    )


@PROPERTY
@given(
    concurrency=st.sampled_from(["x", "0", "-1", "1.5", " ", "1e3"]),
    workers=st.sampled_from(["none", "0", "3.0", "0x2"]),
    threads=st.sampled_from(["auto", "0", "-4"]),
    wait=st.sampled_from(["spin", "on", "passiv"]),
)
def test_all_garbage_env_values_give_the_default_plan(
    concurrency: str, workers: str, threads: str, wait: str
) -> None:
    environ = {
        "THREADBUDGET_CONCURRENCY": concurrency,
        "THREADBUDGET_WORKERS": workers,
        "THREADBUDGET_THREADS": threads,
        "THREADBUDGET_WAIT_POLICY": wait,
    }
    with pytest.warns(ThreadBudgetWarning) as record:
        plan = make_plan(12, environ=environ)
    messages = " | ".join(str(item.message) for item in record)
    assert len(record) == 4, messages
    for name, value in environ.items():
        assert f"{name}={value!r}" in messages
    assert (plan.concurrency, plan.workers, plan.threads, plan.wait_policy) == (1, 1, 12, "auto")
    assert set(plan.sources.values()) == {"default"}


def test_emit_warnings_false_is_silent_but_still_falls_back() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = make_plan(4, environ={"THREADBUDGET_CONCURRENCY": "abc"}, emit_warnings=False)
    assert plan.concurrency == 1


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": 4, "concurrency": 0}, "concurrency"),
        ({"budget": 4, "concurrency": -1}, "concurrency"),
        ({"budget": 4, "concurrency": "two"}, "concurrency"),
        ({"budget": 4, "workers": 0}, "workers"),
        ({"budget": 4, "workers": 1.0}, "workers"),
        ({"budget": 4, "threads": 0}, "threads"),
        ({"budget": 4, "threads": False}, "threads"),
        ({"budget": 4, "wait_policy": "lazy"}, "wait_policy"),
        ({"budget": 4, "wait_policy": 1}, "wait_policy"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(
    kwargs: dict[str, object], argument: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{argument} "):
        make_plan(**kwargs, environ={})  # type: ignore[arg-type]


def test_bad_argument_raises_even_when_env_is_valid() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        make_plan(4, concurrency=0, environ={"THREADBUDGET_CONCURRENCY": "2"})


# --- serialisation ---------------------------------------------------------------------------


@PROPERTY
@given(
    budget=BUDGETS,
    concurrency=CONCURRENCY,
    workers=WORKERS,
    threads=st.none() | st.integers(1, 32),
    wait=st.sampled_from(["auto", "passive", "active"]),
)
def test_to_dict_is_json_serialisable_and_complete(
    budget: int, concurrency: int, workers: int, threads: int | None, wait: str
) -> None:
    plan = plan_quietly(
        budget, concurrency=concurrency, workers=workers, threads=threads, wait_policy=wait
    )
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["budget"] == budget
    assert data["concurrency"] == concurrency
    assert data["workers"] == workers
    assert data["threads"] == plan.threads
    assert data["process_budget"] == plan.process_budget
    assert data["wait_policy"] == wait
    assert data["passive_wait"] == plan.passive_wait
    assert data["oversubscribed"] == plan.oversubscribed
    assert data["total_threads"] == plan.total_threads
    assert data["sources"] == dict(plan.sources)
    assert data["notes"] == list(plan.notes)
    assert "cpu_budget" not in data


def test_explain_states_the_numbers() -> None:
    text = plan_quietly(8, concurrency=2, workers=2).explain()
    assert "2 worker process(es) x 2 in-flight task(s) x 2 thread(s) = 8" in text
    assert "4 CPU(s)" in text
    assert "passively" in text


# --- planned_values --------------------------------------------------------------------------


@PROPERTY
@given(
    budget=BUDGETS,
    concurrency=CONCURRENCY,
    workers=WORKERS,
    threads=st.none() | st.integers(1, 64),
    wait=st.sampled_from(["auto", "passive", "active"]),
)
def test_planned_values_follow_the_plan(
    budget: int, concurrency: int, workers: int, threads: int | None, wait: str
) -> None:
    plan = plan_quietly(
        budget, concurrency=concurrency, workers=workers, threads=threads, wait_policy=wait
    )
    values = planned_values(plan)
    t = str(plan.threads)

    assert set(values) <= {var.name for var in NATIVE_ENV_VARS}
    assert all(isinstance(value, str) for value in values.values())
    for name in VARS_BY_ROLE["threads"]:
        assert values[name] == t, name
    assert values["OMP_THREAD_LIMIT"] == str(max(plan.process_budget, plan.threads))
    if threads is None:
        assert values["OMP_THREAD_LIMIT"] == str(plan.process_budget)
    for name in VARS_BY_ROLE["process"]:
        assert values[name] == values["OMP_THREAD_LIMIT"], name
    assert values["PYTHON_CPU_COUNT"] == str(budget)

    passive_names = set(VARS_BY_ROLE["passive"])
    assert passive_names == {
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "KMP_BLOCKTIME",
        "OPENBLAS_THREAD_TIMEOUT",
    }
    if plan.passive_wait:
        assert passive_names <= set(values)
        assert values["OMP_WAIT_POLICY"] == "PASSIVE"
        assert values["GOMP_SPINCOUNT"] == "10000"
        assert values["KMP_BLOCKTIME"] == "0"
        assert values["OPENBLAS_THREAD_TIMEOUT"] == "20"
    else:
        assert passive_names.isdisjoint(values)

    if plan.threads == 1:
        assert values["TOKENIZERS_PARALLELISM"] == "false"
    else:
        assert "TOKENIZERS_PARALLELISM" not in values
    assert "MKL_DYNAMIC" not in values
    for name in VARS_BY_ROLE["report"]:
        assert name not in values


def test_native_env_var_table_is_well_formed() -> None:
    names = [var.name for var in NATIVE_ENV_VARS]
    assert len(names) == len(set(names))
    assert {"OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"} <= set(
        VARS_BY_ROLE["threads"]
    )
    assert VARS_BY_ROLE["budget"] == ["PYTHON_CPU_COUNT"]
    assert VARS_BY_ROLE["single"] == ["TOKENIZERS_PARALLELISM"]
    assert "MKL_DYNAMIC" in VARS_BY_ROLE["report"]
    assert all(var.readers for var in NATIVE_ENV_VARS)


def test_planned_workers_reads_the_environment_as_make_plan_does() -> None:
    from threadbudget._plan import planned_workers

    assert planned_workers({}) == 1
    assert planned_workers({"WEB_CONCURRENCY": "3"}) == 3
    assert planned_workers({"WEB_CONCURRENCY": "3", "THREADBUDGET_WORKERS": "2"}) == 2
    assert planned_workers({"THREADBUDGET_WORKERS": "lots"}) == 1
    for environ in ({"WEB_CONCURRENCY": "3"}, {"THREADBUDGET_WORKERS": "2"}):
        assert planned_workers(environ) == make_plan(4, environ=environ).workers
