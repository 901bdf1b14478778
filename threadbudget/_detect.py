"""Turn cgroup limits, affinity and overrides into one CPU budget with its explanation."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._cgroup import read_cgroup_limits
from ._settings import (
    ENV_CPUS,
    ENV_RESERVE,
    ENV_ROUNDING,
    Rounding,
    Setting,
    parse_positive_int,
    parse_reserve,
    parse_rounding,
    resolve,
    set_by_us,
)
from ._topology import read_topology
from ._warnings import warn

__all__ = ["CpuBudget", "Override", "detect_budget", "round_cpus"]


@dataclass(frozen=True)
class Override:
    """A setting the user chose, and where: ``argument`` or ``env:NAME``."""

    name: str
    value: str
    source: str


@dataclass(frozen=True)
class CpuBudget:
    """How many CPUs this process should keep busy, and why.

    ``budget`` is what the rest of threadbudget plans with. ``quota`` is the raw cgroup quota in
    CPUs (``None``: no quota anywhere on the path), ``binding`` names the constraint that set
    the budget.
    """

    budget: int
    binding: str
    quota: float | None
    quota_path: str | None
    quota_version: int | None
    affinity: tuple[int, ...]
    cpuset: tuple[int, ...] | None
    cpuset_path: str | None
    online_cpus: int
    physical_cores: int | None
    shares: int | None
    shares_path: str | None
    rounding: Rounding
    reserve: float
    available: float
    overrides: tuple[Override, ...]
    files_read: tuple[str, ...]
    warnings: tuple[str, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["explanation"] = self.explain()
        return data

    def explain(self) -> str:
        """A few sentences a person can check against the files named in them."""
        lines = [f"CPU budget: {self.budget} (bound by {self.binding})."]
        mask = _format_cpus(self.affinity)
        lines.append(
            f"Affinity: {len(self.affinity)} CPU(s) [{mask}] of {self.online_cpus} online; "
            + (
                f"{self.physical_cores} physical core(s) among them."
                if self.physical_cores is not None
                else "physical cores unknown."
            )
        )
        if self.quota is not None:
            lines.append(
                f"cgroup v{self.quota_version} quota: {self.quota:g} CPU(s), set at "
                f"{self.quota_path}."
            )
        else:
            lines.append("cgroup quota: none on the path from this process's cgroup to the root.")
        if self.cpuset is not None:
            lines.append(
                f"cpuset: {len(self.cpuset)} CPU(s) [{_format_cpus(self.cpuset)}] from "
                f"{self.cpuset_path}."
            )
        if self.shares is not None:
            lines.append(
                f"CPU shares/weight {self.shares} at {self.shares_path} (reported only: shares are "
                "a relative weight, not a number of CPUs)."
            )
        if self.reserve:
            lines.append(f"Reserve: {self.reserve:g} CPU(s) held back.")
        lines.append(
            f"Available: {self.available:g} CPU(s), rounded with policy {self.rounding!r} "
            "(minimum 1)."
        )
        lines.extend(
            f"Override: {item.name}={item.value} from {item.source}." for item in self.overrides
        )
        lines.extend(f"Note: {note}" for note in self.notes)
        lines.extend(f"Warning: {warning}" for warning in self.warnings)
        return "\n".join(lines)


def _format_cpus(cpus: tuple[int, ...] | frozenset[int]) -> str:
    ordered = sorted(cpus)
    ranges: list[str] = []
    start = previous = None
    for cpu in ordered:
        if previous is not None and cpu == previous + 1:
            previous = cpu
            continue
        if start is not None:
            ranges.append(f"{start}-{previous}" if start != previous else f"{start}")
        start = previous = cpu
    if start is not None:
        ranges.append(f"{start}-{previous}" if start != previous else f"{start}")
    return ",".join(ranges)


def round_cpus(available: float, rounding: Rounding) -> int:
    """Round a fractional CPU amount by *rounding*; never below 1.

    Floor is the default because a ceiled team overruns its quota and the kernel throttles the
    whole OpenMP team at its next barrier; ``nearest`` rounds halves up.
    """
    if rounding == "floor":
        value = math.floor(available + 1e-9)
    elif rounding == "ceil":
        value = math.ceil(available - 1e-9)
    else:
        value = math.floor(available + 0.5)
    return max(1, value)


def detect_budget(
    *,
    cpus: int | None = None,
    rounding: Rounding | None = None,
    reserve: float | None = None,
    environ: Mapping[str, str] | None = None,
    root: Path | str = "/",
    pid: str = "self",
    affinity: frozenset[int] | None = None,
    emit_warnings: bool = True,
) -> CpuBudget:
    """Detect the CPU budget of this process.

    Precedence for the count: *cpus* argument, ``THREADBUDGET_CPUS``, ``PYTHON_CPU_COUNT``, then
    detection: the lowest cgroup quota on the path to the root, capped by the affinity mask and
    the cpuset, less *reserve*, rounded by *rounding*. Invalid arguments raise ``ValueError``;
    invalid environment values and unreadable cgroup files become warnings
    (:class:`ThreadBudgetWarning`) and are ignored. *root*, *pid* and *affinity* exist for tests.
    """
    env = os.environ if environ is None else environ
    # PYTHON_CPU_COUNT that threadbudget exported is its own output, not the user's choice.
    own_count = set_by_us("PYTHON_CPU_COUNT", env)
    cpus_setting: Setting[int | None] = resolve(
        cpus,
        (ENV_CPUS,) if own_count else (ENV_CPUS, "PYTHON_CPU_COUNT"),
        parse_positive_int,
        None,
        argument_name="cpus",
        environ=environ,
        ignore_env_values=frozenset({"", "default"}),
    )
    rounding_setting: Setting[Rounding] = resolve(
        rounding,
        (ENV_ROUNDING,),
        parse_rounding,
        "floor",
        argument_name="rounding",
        environ=environ,
    )
    reserve_setting: Setting[float] = resolve(
        reserve, (ENV_RESERVE,), parse_reserve, 0.0, argument_name="reserve", environ=environ
    )

    limits = read_cgroup_limits(root, pid)
    topology = read_topology(root, affinity)
    warnings_found = [
        *cpus_setting.problems,
        *rounding_setting.problems,
        *reserve_setting.problems,
        *limits.warnings,
        *topology.warnings,
    ]
    notes = [*limits.notes, *topology.notes]

    candidates: list[tuple[float, str]] = [(float(len(topology.affinity)), "affinity")]
    if limits.cpuset is not None:
        candidates.append((float(len(limits.cpuset)), "cpuset"))
    if limits.quota is not None:
        candidates.append((limits.quota, f"cgroup v{limits.quota_version} quota"))
    # A tie goes to the earliest entry, so a quota equal to the CPU count binds as "affinity".
    available_raw, binding = min(candidates, key=lambda item: item[0])
    reserve_value = reserve_setting.value
    available = max(available_raw - reserve_value, 0.0)
    if reserve_value and available_raw - reserve_value < 1:
        warnings_found.append(
            f"reserve {reserve_value:g} leaves less than one of {available_raw:g} CPU(s); "
            "the budget stays at its minimum of 1"
        )
    budget = min(round_cpus(available, rounding_setting.value), len(topology.affinity))

    overrides = tuple(
        Override(name, str(setting.value), setting.source)
        for name, setting in (
            ("cpus", cpus_setting),
            ("rounding", rounding_setting),
            ("reserve", reserve_setting),
        )
        if setting.overridden
    )
    if cpus_setting.value is not None:
        detected = budget
        budget = cpus_setting.value
        binding = f"override ({cpus_setting.source})"
        if budget > len(topology.affinity):
            warnings_found.append(
                f"{cpus_setting.source} asks for {budget} CPUs but this process may run on only "
                f"{len(topology.affinity)}; honouring it as asked"
            )
        notes.append(f"detection alone would give {detected}")

    if emit_warnings:
        for message in warnings_found:
            warn(message)
    return CpuBudget(
        budget=budget,
        binding=binding,
        quota=limits.quota,
        quota_path=limits.quota_path,
        quota_version=limits.quota_version,
        affinity=tuple(sorted(topology.affinity)),
        cpuset=tuple(sorted(limits.cpuset)) if limits.cpuset is not None else None,
        cpuset_path=limits.cpuset_path,
        online_cpus=topology.online_cpus,
        physical_cores=topology.physical_cores,
        shares=limits.shares,
        shares_path=limits.shares_path,
        rounding=rounding_setting.value,
        reserve=reserve_value,
        available=available,
        overrides=overrides,
        files_read=limits.files_read + topology.files_read,
        warnings=tuple(warnings_found),
        notes=tuple(notes),
    )
