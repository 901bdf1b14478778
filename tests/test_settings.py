"""Overrides: arguments raise on bad values, environment variables warn and fall back.

Detection runs against a checked-in fake root with a 1.5 CPU cgroup v2 quota on a 4-CPU
affinity mask, so it gives 1 with the default floor rounding and 2 with ceil; any override is
easy to tell from detection. The environment is always passed as a dict (``environ=``); the one
test of ``os.environ`` goes through monkeypatch.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from threadbudget import CpuBudget, ThreadBudgetWarning, detect_budget
from threadbudget._detect import Override
from threadbudget._settings import (
    MAX_CPUS,
    parse_positive_int,
    parse_reserve,
    parse_rounding,
    resolve,
)

ROOT = Path(__file__).parent / "fixtures" / "cgroups" / "v2" / "fraction-1.5"
AFFINITY = frozenset(range(4))
DETECTED = 1  # floor(1.5)

CPUS_VARS = ("THREADBUDGET_CPUS", "PYTHON_CPU_COUNT")
ALL_VARS = (*CPUS_VARS, "THREADBUDGET_ROUNDING", "THREADBUDGET_RESERVE")

GARBAGE = [
    "abc",
    "0",
    "-1",
    "1.5",
    "nan",
    "inf",
    "1e9",
    "\x00",
    "0x10",
    "+3",
    "4 4",
    "4cpus",
    "\u0663",
    "1_0",
]
# Valid reserves (a number of CPUs >= 0) are not garbage for THREADBUDGET_RESERVE.
GARBAGE_FOR = {
    "THREADBUDGET_CPUS": GARBAGE,
    "PYTHON_CPU_COUNT": GARBAGE,
    "THREADBUDGET_ROUNDING": [*GARBAGE, "", "  ", "default", "up", "FLOORED"],
    "THREADBUDGET_RESERVE": [
        *(value for value in GARBAGE if value not in ("0", "1.5", "+3")),
        "",
        "  ",
        "-0.5",
        "default",
        "1e300",
    ],
}


def detect(**kwargs: object) -> CpuBudget:
    kwargs.setdefault("root", ROOT)
    kwargs.setdefault("affinity", AFFINITY)
    kwargs.setdefault("environ", {})
    return detect_budget(**kwargs)  # type: ignore[arg-type]


def test_the_fixture_detects_one_cpu_without_overrides() -> None:
    budget = detect()
    assert budget.quota == pytest.approx(1.5)
    assert (budget.budget, budget.rounding, budget.reserve) == (DETECTED, "floor", 0.0)
    assert budget.overrides == ()
    assert budget.warnings == ()


# ------------------------------------------------------------------ garbage in the environment


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name in ALL_VARS for value in GARBAGE_FOR[name]],
    ids=repr,
)
def test_garbage_env_value_warns_naming_variable_and_value(name: str, value: str) -> None:
    with pytest.warns(ThreadBudgetWarning) as record:
        budget = detect(environ={name: value})
    messages = [str(item.message) for item in record]
    assert any(f"{name}={value!r}" in message for message in messages), messages
    # Detection takes over: nothing of the bad value survives.
    assert budget.budget == DETECTED
    assert budget.rounding == "floor"
    assert budget.reserve == 0.0
    assert budget.overrides == ()
    assert budget.binding == "cgroup v2 quota"
    assert any(f"{name}={value!r}" in warning for warning in budget.warnings)


@pytest.mark.parametrize("name", ALL_VARS)
def test_every_garbage_value_is_reported_once(name: str) -> None:
    for value in GARBAGE_FOR[name]:
        budget = detect(environ={name: value}, emit_warnings=False)
        assert [w for w in budget.warnings if name in w] == [
            w for w in budget.warnings if f"{name}={value!r}" in w
        ]
        assert len([w for w in budget.warnings if f"{name}={value!r}" in w]) == 1


def test_warning_points_at_the_caller() -> None:
    with pytest.warns(ThreadBudgetWarning) as record:
        detect(environ={"THREADBUDGET_CPUS": "abc"})
    assert record[0].filename == __file__


def test_several_bad_variables_give_one_warning_each() -> None:
    environ = {
        "THREADBUDGET_CPUS": "many",
        "PYTHON_CPU_COUNT": "-3",
        "THREADBUDGET_ROUNDING": "up",
        "THREADBUDGET_RESERVE": "lots",
    }
    with pytest.warns(ThreadBudgetWarning) as record:
        budget = detect(environ=environ)
    messages = [str(item.message) for item in record]
    assert len(messages) == 4
    for name, value in environ.items():
        assert sum(f"{name}={value!r}" in message for message in messages) == 1
    assert budget.budget == DETECTED


@pytest.mark.parametrize("name", CPUS_VARS)
@pytest.mark.parametrize("value", ["", "  ", "\t\n"])
def test_empty_cpu_count_is_unset_like_cpython(name: str, value: str) -> None:
    """An empty ``PYTHON_CPU_COUNT`` is 'not set' to CPython (and an empty GOMAXPROCS to Go).

    threadbudget treats both CPU-count variables the same way: silently, as unset.
    """
    budget = detect(environ={name: value})  # a warning would fail this test
    assert budget.budget == DETECTED
    assert budget.overrides == ()
    assert budget.warnings == ()


@pytest.mark.parametrize("value", ["default", "DEFAULT", " default\n"])
def test_python_cpu_count_default_is_silently_ignored(value: str) -> None:
    budget = detect(environ={"PYTHON_CPU_COUNT": value})
    assert budget.budget == DETECTED
    assert budget.overrides == ()
    assert budget.warnings == ()


def test_python_cpu_count_default_does_not_hide_threadbudget_cpus() -> None:
    budget = detect(environ={"THREADBUDGET_CPUS": "3", "PYTHON_CPU_COUNT": "default"})
    assert budget.budget == 3
    assert budget.overrides == (Override("cpus", "3", "env:THREADBUDGET_CPUS"),)


# ------------------------------------------------------------------ precedence


def test_argument_beats_both_variables() -> None:
    budget = detect(cpus=3, environ={"THREADBUDGET_CPUS": "2", "PYTHON_CPU_COUNT": "4"})
    assert budget.budget == 3
    assert budget.binding == "override (argument)"
    assert budget.overrides == (Override("cpus", "3", "argument"),)
    assert any(f"detection alone would give {DETECTED}" in note for note in budget.notes)
    assert budget.warnings == ()


def test_argument_ignores_garbage_in_the_environment() -> None:
    budget = detect(cpus=2, environ={"THREADBUDGET_CPUS": "junk", "PYTHON_CPU_COUNT": "junk"})
    assert budget.budget == 2
    assert budget.warnings == ()


def test_threadbudget_cpus_beats_python_cpu_count() -> None:
    budget = detect(environ={"THREADBUDGET_CPUS": "2", "PYTHON_CPU_COUNT": "4"})
    assert budget.budget == 2
    assert budget.binding == "override (env:THREADBUDGET_CPUS)"
    assert budget.overrides == (Override("cpus", "2", "env:THREADBUDGET_CPUS"),)


def test_python_cpu_count_beats_detection() -> None:
    budget = detect(environ={"PYTHON_CPU_COUNT": " 4\n"})
    assert budget.budget == 4
    assert budget.binding == "override (env:PYTHON_CPU_COUNT)"
    assert budget.overrides == (Override("cpus", "4", "env:PYTHON_CPU_COUNT"),)


def test_bad_threadbudget_cpus_falls_back_to_python_cpu_count() -> None:
    with pytest.warns(ThreadBudgetWarning, match=re.escape("THREADBUDGET_CPUS='zero'")):
        budget = detect(environ={"THREADBUDGET_CPUS": "zero", "PYTHON_CPU_COUNT": "3"})
    assert budget.budget == 3
    assert budget.overrides == (Override("cpus", "3", "env:PYTHON_CPU_COUNT"),)


def test_detection_when_nothing_is_set() -> None:
    budget = detect(environ={"UNRELATED": "1"})
    assert budget.budget == DETECTED
    assert budget.binding == "cgroup v2 quota"
    assert budget.overrides == ()


@pytest.mark.parametrize("source", ["argument", "env"])
def test_override_above_the_affinity_is_honoured_with_a_warning(source: str) -> None:
    kwargs: dict[str, object] = (
        {"cpus": 8} if source == "argument" else {"environ": {"THREADBUDGET_CPUS": "8"}}
    )
    with pytest.warns(
        ThreadBudgetWarning, match="asks for 8 CPUs but this process may run on only 4"
    ):
        budget = detect(**kwargs)
    assert budget.budget == 8


def test_rounding_and_reserve_from_the_environment_are_recorded() -> None:
    budget = detect(environ={"THREADBUDGET_ROUNDING": " CEIL ", "THREADBUDGET_RESERVE": "0.5"})
    # (1.5 - 0.5) rounded up.
    assert (budget.budget, budget.rounding, budget.reserve) == (1, "ceil", 0.5)
    assert budget.overrides == (
        Override("rounding", "ceil", "env:THREADBUDGET_ROUNDING"),
        Override("reserve", "0.5", "env:THREADBUDGET_RESERVE"),
    )


def test_rounding_argument_beats_the_environment() -> None:
    budget = detect(rounding="ceil", environ={"THREADBUDGET_ROUNDING": "floor"})
    assert (budget.budget, budget.rounding) == (2, "ceil")
    assert budget.overrides == (Override("rounding", "ceil", "argument"),)


def test_reserve_argument_beats_the_environment() -> None:
    budget = detect(reserve=0, rounding="ceil", environ={"THREADBUDGET_RESERVE": "1"})
    assert (budget.budget, budget.reserve) == (2, 0.0)
    assert Override("reserve", "0.0", "argument") in budget.overrides


def test_reserve_larger_than_the_quota_keeps_one_cpu_and_warns() -> None:
    with pytest.warns(ThreadBudgetWarning, match="reserve 2 leaves less than one of 1.5"):
        budget = detect(environ={"THREADBUDGET_RESERVE": "2"})
    assert budget.budget == 1
    assert budget.available == 0.0


def test_environ_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHON_CPU_COUNT", "3")
    budget = detect_budget(root=ROOT, affinity=AFFINITY)
    assert budget.budget == 3
    assert budget.overrides == (Override("cpus", "3", "env:PYTHON_CPU_COUNT"),)


# ------------------------------------------------------------------ bad arguments raise


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("cpus", 0),
        ("cpus", -1),
        ("cpus", "x"),
        ("cpus", ""),
        ("cpus", True),
        ("cpus", False),
        ("cpus", 1.5),
        ("cpus", 2.0),
        ("cpus", MAX_CPUS + 1),
        ("cpus", [4]),
        ("rounding", "up"),
        ("rounding", ""),
        ("rounding", 1),
        ("rounding", True),
        ("reserve", -1),
        ("reserve", -0.5),
        ("reserve", float("nan")),
        ("reserve", float("inf")),
        ("reserve", True),
        ("reserve", "x"),
        ("reserve", [1]),
    ],
    ids=repr,
)
def test_invalid_argument_raises_value_error_naming_it(argument: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{argument} must") as info:
        detect(**{argument: value}, environ={"THREADBUDGET_CPUS": "2"})
    assert repr(value) in str(info.value)


def test_invalid_argument_raises_before_reading_anything(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ValueError, match="cpus"):
        detect_budget(cpus=0, root=missing, environ={})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"cpus": 2}, 2),
        ({"cpus": "3"}, 3),
        ({"cpus": MAX_CPUS}, MAX_CPUS),
        ({"rounding": "nearest"}, 2),
        ({"rounding": " Ceil "}, 2),
        ({"reserve": 0.5}, 1),
        ({"reserve": "0"}, 1),
    ],
    ids=repr,
)
def test_valid_arguments_are_accepted(kwargs: dict[str, object], expected: int) -> None:
    budget = detect(**kwargs, emit_warnings=False)
    assert budget.budget == expected


# ------------------------------------------------------------------ parsers and resolve()


def test_parse_positive_int_bounds() -> None:
    assert parse_positive_int(1, "x") == 1
    assert parse_positive_int(f" {MAX_CPUS} ", "x") == MAX_CPUS
    for bad in (0, MAX_CPUS + 1, "1234567890", "-0", True):
        with pytest.raises(ValueError, match=r"^x must"):
            parse_positive_int(bad, "x")


def test_parse_rounding_and_reserve() -> None:
    assert parse_rounding("NEAREST\n", "r") == "nearest"
    assert parse_reserve(" 1.25 ", "s") == 1.25
    assert parse_reserve(0, "s") == 0.0
    with pytest.raises(ValueError, match=r"^s must"):
        parse_reserve(MAX_CPUS + 1, "s")


def test_resolve_reports_sources_and_problems() -> None:
    setting = resolve(
        None,
        ("A", "B"),
        parse_positive_int,
        None,
        argument_name="n",
        environ={"A": "bad", "B": "7"},
    )
    assert (setting.value, setting.source, setting.overridden) == (7, "env:B", True)
    assert len(setting.problems) == 1
    assert "A='bad'" in setting.problems[0]

    default = resolve(None, ("A",), parse_positive_int, 5, argument_name="n", environ={})
    assert (default.value, default.source, default.overridden) == (5, "default", False)
    assert default.problems == ()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(ALL_VARS),
        st.one_of(st.text(max_size=12), st.integers(-5, 70000).map(str), st.floats().map(str)),
    )
)
def test_any_environment_gives_a_budget_and_never_raises(environ: dict[str, str]) -> None:
    budget = detect(environ=environ, emit_warnings=False)
    assert budget.budget >= 1
    assert budget.rounding in ("floor", "ceil", "nearest")
    assert budget.reserve >= 0
    # Every override names a variable that was set, and every variable is either an override,
    # a warning naming it, or silently ignored as unset.
    for override in budget.overrides:
        assert override.source.removeprefix("env:") in environ
    for name, value in environ.items():
        used = any(override.source == f"env:{name}" for override in budget.overrides)
        warned = any(f"{name}={value!r}" in warning for warning in budget.warnings)
        shadowed = name == "PYTHON_CPU_COUNT" and any(
            override.source == "env:THREADBUDGET_CPUS" for override in budget.overrides
        )
        unset = name in CPUS_VARS and value.strip().lower() in ("", "default")
        assert used or warned or shadowed or unset, (name, value, budget.warnings)


def test_python_cpu_count_exported_by_threadbudget_is_not_an_override() -> None:
    """A child of ``threadbudget run`` detects again instead of echoing its parent's budget."""
    own = {"PYTHON_CPU_COUNT": "2", "THREADBUDGET_APPLIED": "OMP_NUM_THREADS=1,PYTHON_CPU_COUNT=2"}
    budget = detect(environ=own)
    assert budget.overrides == ()
    assert budget.budget == 1
    users = {"PYTHON_CPU_COUNT": "2", "THREADBUDGET_APPLIED": "PYTHON_CPU_COUNT=3"}
    assert detect(environ=users).overrides[0].source == "env:PYTHON_CPU_COUNT"
