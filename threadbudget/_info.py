"""Everything ``threadbudget info`` reports: budget, plan, env vars, loaded pools, warnings."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ._controllers import registered_controllers
from ._detect import CpuBudget, detect_budget
from ._envvars import NATIVE_ENV_VARS, planned_values, set_by_us
from ._plan import Plan
from ._version import __version__

__all__ = ["collect_info", "format_info"]


def _env_rows(plan: Plan, environ: Mapping[str, str]) -> list[dict[str, Any]]:
    planned = planned_values(plan)
    rows = []
    for var in NATIVE_ENV_VARS:
        value = environ.get(var.name)
        if value is None:
            source = "unset"
        elif set_by_us(var.name, environ):
            source = "threadbudget"
        else:
            source = "user"
        rows.append(
            {
                "name": var.name,
                "value": value,
                "source": source,
                "planned": planned.get(var.name),
                # What apply_plan leaves: a value the user set is kept whatever the plan says.
                "after_apply": value if source == "user" else planned.get(var.name),
                "role": var.role,
                "readers": var.readers,
            }
        )
    return rows


def _pools() -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    pools: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    for controller in registered_controllers():
        try:
            if controller.is_loaded():
                pools[controller.name] = controller.pools()
        except Exception as error:
            problems.append(
                f"controller {controller.name!r} could not describe its pools: {error!r}"
            )
    return pools, problems


def _default_threads_warnings(
    budget: CpuBudget, plan: Plan, environ: Mapping[str, str], pools: Mapping[str, Any]
) -> list[str]:
    """Say, in numbers, what each library would do if left alone."""
    found: list[str] = []
    limit = f"the budget is {budget.budget} CPU(s)"
    if budget.quota is not None:
        limit = f"the quota is {budget.quota:g} CPU(s) (budget {budget.budget})"
    per_task = plan.threads
    for pool in pools.get("threadpoolctl", []):
        threads = int(pool.get("num_threads") or 0)
        if threads > per_task:
            scope = (
                "per calling thread" if pool.get("user_api") == "openmp" else "in its shared pool"
            )
            found.append(
                f"{pool.get('prefix')} ({pool.get('internal_api')}) will run {threads} threads "
                f"{scope}, but the plan gives each task {per_task} and {limit}"
            )
    for pool in pools.get("torch", []):
        threads = int(pool["num_threads"])
        if threads > per_task:
            found.append(
                f"torch will start {threads} threads per calling thread, but the plan gives each "
                f"task {per_task} and {limit}"
            )
    torch_env = any(environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    if "torch" not in pools and not torch_env and importlib.util.find_spec("torch") is not None:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        if physical > per_task:
            found.append(
                f"torch will start {physical} threads per calling thread (its default is the "
                f"host's physical core count), but {limit}; apply the budget before "
                "importing torch"
            )
    if not environ.get("OMP_NUM_THREADS") and "threadpoolctl" not in pools:
        default = len(budget.affinity)
        if default > per_task:
            found.append(
                f"OpenMP and OpenBLAS will start {default} threads (one per CPU in the affinity "
                f"mask) for each calling thread or pool, but {limit}"
            )
    if plan.concurrency > 1 and plan.concurrency * plan.workers > budget.budget:
        found.append(
            f"{plan.concurrency} in-flight task(s) x {plan.workers} worker(s) exceed the budget "
            f"of {budget.budget}: admission control is needed to keep the CPUs from thrashing"
        )
    return found


def collect_info(
    plan: Plan, *, imports: Sequence[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A JSON-able report; *imports* are imported first so their pools show up."""
    env = os.environ if environ is None else environ
    budget = plan.cpu_budget or detect_budget(environ=env, emit_warnings=False)
    import_errors = []
    for module in imports:
        try:
            importlib.import_module(module)
        except Exception as error:
            import_errors.append(f"cannot import {module!r}: {error!r}")
    pools, problems = _pools()
    return {
        "threadbudget_version": __version__,
        "budget": budget.to_dict(),
        "plan": plan.to_dict(),
        "plan_explanation": plan.explain(),
        "env": _env_rows(plan, env),
        "pools": pools,
        "imported": list(imports),
        "warnings": [
            *budget.warnings,
            *import_errors,
            *problems,
            *_default_threads_warnings(budget, plan, env, pools),
        ],
    }


def format_info(info: Mapping[str, Any]) -> str:
    """The report for people: explanation first, then the tables."""
    lines = [f"threadbudget {info['threadbudget_version']}", ""]
    lines.append(info["budget"]["explanation"])
    lines += ["", info["plan_explanation"], "", "Environment (value / source -> planned):"]
    for row in info["env"]:
        value = "-" if row["value"] is None else row["value"]
        if row["planned"] is None:
            planned = "leave"
        elif row["source"] == "user" and row["value"].strip() != row["planned"]:
            planned = f"{row['planned']}, but the user's value is kept"
        else:
            planned = row["planned"]
        lines.append(f"  {row['name']:<24} {value:>8} / {row['source']:<12} -> {planned}")
    lines += ["", "Loaded native pools:"]
    if not info["pools"]:
        lines.append("  none loaded (use -i MODULE to import modules first)")
    for controller, pools in info["pools"].items():
        for pool in pools:
            if controller == "torch":
                lines.append(
                    f"  torch {pool['version']}: {pool['num_threads']} intra-op, "
                    f"{pool['num_interop_threads']} inter-op thread(s)"
                )
            else:
                lines.append(
                    f"  {pool.get('prefix')} ({pool.get('internal_api')}, "
                    f"{pool.get('threading_layer', pool.get('user_api'))}): "
                    f"{pool.get('num_threads')} thread(s)  {pool.get('filepath')}"
                )
    if info["warnings"]:
        lines += ["", "Warnings:"]
        lines.extend(f"  - {warning}" for warning in info["warnings"])
    return "\n".join(lines)
