"""The public surface: ``__all__``, docstrings, side-effect-free import, ``threadbudget.auto``."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import threadbudget
from threadbudget import NATIVE_ENV_VARS, NativeEnvVar, detect_budget, make_plan

HAS_NUMPY = importlib.util.find_spec("numpy") is not None


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any thread or threadbudget setting."""
    names = {var.name for var in NATIVE_ENV_VARS}
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in names and not key.startswith("THREADBUDGET_")
    }
    env.update(extra)
    return env


def run_python(code: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**extra_env),
        check=False,
    )


def last_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- __all__ ---------------------------------------------------------------------------------


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then Classes, then everything else, each alphabetical."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_all_is_sorted_without_duplicates() -> None:
    names = list(threadbudget.__all__)
    assert names, "empty __all__"
    assert len(names) == len(set(names))
    assert names == sorted(names, key=_isort_key)


def test_every_name_in_all_exists_and_is_importable() -> None:
    for name in threadbudget.__all__:
        assert hasattr(threadbudget, name), name
        namespace: dict[str, Any] = {}
        exec(f"from threadbudget import {name}", namespace)
        assert namespace[name] is getattr(threadbudget, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from threadbudget import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(threadbudget.__all__)


def test_no_public_name_is_missing_from_all() -> None:
    public = {
        name
        for name, value in vars(threadbudget).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public - {"annotations"} <= set(threadbudget.__all__)


def _documented_params() -> list[Any]:
    params = []
    for name in threadbudget.__all__:
        obj = getattr(threadbudget, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        params.append(pytest.param(name, id=name))
    return params


@pytest.mark.parametrize("name", _documented_params())
def test_public_class_or_function_has_its_own_docstring(name: str) -> None:
    obj = getattr(threadbudget, name)
    doc = obj.__doc__  # not inspect.getdoc: that would inherit a base class's docstring
    assert doc is not None, f"{name} has no docstring"
    assert doc.strip(), f"{name} has an empty docstring"
    # A dataclass without a docstring gets its signature as __doc__; that documents nothing.
    assert not doc.startswith(f"{name}("), f"{name} only has the generated dataclass docstring"


def test_documented_params_cover_the_callables() -> None:
    ids = {param.id for param in _documented_params()}
    assert {"apply_plan", "make_plan", "detect_budget", "Plan", "AppliedBudget"} <= ids
    assert "NATIVE_ENV_VARS" not in ids


def test_constants_have_the_documented_types() -> None:
    assert isinstance(NATIVE_ENV_VARS, tuple)
    assert all(isinstance(var, NativeEnvVar) for var in NATIVE_ENV_VARS)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?([a-z]+\d+)?(\.dev\d+)?", threadbudget.__version__)


def test_warning_category_is_a_user_warning() -> None:
    assert issubclass(threadbudget.ThreadBudgetWarning, UserWarning)


def test_py_typed_marker_is_shipped() -> None:
    package = Path(threadbudget.__file__).parent
    assert (package / "py.typed").is_file()


# --- importing changes nothing ---------------------------------------------------------------

IMPORT_PROBE = r"""
import json, os, sys, threading
env_before = dict(os.environ)
threads_before = threading.active_count()
import threadbudget
import threadbudget._cli, threadbudget._info
print(json.dumps({
    "env_same": dict(os.environ) == env_before,
    "env_added": sorted(set(os.environ) - set(env_before)),
    "threads_same": threading.active_count() == threads_before,
    "profile": repr(threading.getprofile()),
    "loaded": sorted(m for m in ("numpy", "torch", "threadpoolctl") if m in sys.modules),
}))
"""


def test_importing_threadbudget_changes_nothing() -> None:
    out = last_json(run_python(IMPORT_PROBE))
    assert out["env_added"] == []
    assert out["env_same"] is True
    assert out["loaded"] == []
    assert out["threads_same"] is True
    assert out["profile"] == "None"


def test_importing_threadbudget_changes_nothing_even_with_settings() -> None:
    result = run_python(IMPORT_PROBE, THREADBUDGET_CONCURRENCY="2", THREADBUDGET_CPUS="1")
    out = last_json(result)
    assert out["env_same"] is True
    assert out["loaded"] == []
    assert result.stderr == ""


# --- threadbudget.auto -----------------------------------------------------------------------

AUTO_PROBE = r"""
import json, os
import threadbudget.auto as auto
applied = auto.applied
print(json.dumps({
    "omp": os.environ.get("OMP_NUM_THREADS"),
    "applied": None if applied is None else {
        "threads": applied.plan.threads,
        "concurrency": applied.plan.concurrency,
        "budget": applied.plan.budget,
        "sources": dict(applied.plan.sources),
        "restored": applied.restored,
    },
}))
"""


def test_auto_applies_the_plan_from_env_vars() -> None:
    result = run_python(AUTO_PROBE, THREADBUDGET_CONCURRENCY="2")
    out = last_json(result)
    assert result.stderr == ""
    expected = make_plan(
        detect_budget(environ={}, emit_warnings=False), concurrency=2, environ={}
    ).threads
    applied = out["applied"]
    assert applied is not None
    assert applied["concurrency"] == 2
    assert applied["sources"]["concurrency"] == "env:THREADBUDGET_CONCURRENCY"
    assert applied["threads"] == expected
    assert applied["restored"] is False
    assert out["omp"] == str(expected)


def test_auto_honours_the_cpus_env_var() -> None:
    out = last_json(run_python(AUTO_PROBE, THREADBUDGET_CPUS="1", THREADBUDGET_CONCURRENCY="1"))
    assert out["applied"]["budget"] == 1
    assert out["omp"] == "1"


def test_auto_keeps_a_users_thread_setting() -> None:
    out = last_json(run_python(AUTO_PROBE, THREADBUDGET_CPUS="1", OMP_NUM_THREADS="1 "))
    assert out["omp"] == "1 "


@pytest.mark.skipif(not HAS_NUMPY, reason="needs numpy")
def test_auto_before_numpy_sizes_its_pool() -> None:
    code = (
        "import json, threadbudget.auto, numpy\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps({p['internal_api']: p['num_threads'] for p in threadpool_info()}))"
    )
    result = run_python(code, THREADBUDGET_CPUS="1")
    assert last_json(result).get("openblas") == 1
    assert result.stderr == ""


def test_auto_with_garbage_env_vars_warns_and_still_imports() -> None:
    result = run_python(AUTO_PROBE, THREADBUDGET_CPUS="abc", THREADBUDGET_CONCURRENCY="zero")
    assert result.returncode == 0, result.stderr
    assert "ThreadBudgetWarning" in result.stderr
    assert "THREADBUDGET_CPUS='abc'" in result.stderr
    assert "THREADBUDGET_CONCURRENCY='zero'" in result.stderr
    out = last_json(result)
    assert out["applied"] is not None
    assert out["applied"]["concurrency"] == 1
    assert out["applied"]["sources"]["concurrency"] == "default"
    assert out["omp"] == str(out["applied"]["threads"])


def test_auto_exposes_applied_in_its_namespace() -> None:
    code = (
        "import json, threadbudget.auto as auto\n"
        "print(json.dumps({'all': auto.__all__, "
        "'type': type(auto.applied).__name__}))"
    )
    out = last_json(run_python(code, THREADBUDGET_CPUS="1"))
    assert out == {"all": ["applied"], "type": "AppliedBudget"}
