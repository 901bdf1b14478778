"""CPUs this process may run on, and how many physical cores they belong to."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ._cgroup import parse_cpu_list

__all__ = ["Topology", "read_topology"]


@dataclass(frozen=True)
class Topology:
    """The affinity mask, the online CPUs and the physical cores inside the mask."""

    affinity: frozenset[int]
    online_cpus: int
    physical_cores: int | None
    files_read: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_topology(root: Path | str = "/", affinity: frozenset[int] | None = None) -> Topology:
    """Read affinity (``sched_getaffinity`` unless given) and core topology below *root*.

    Physical cores are the distinct ``core_cpus_list`` sets (``thread_siblings_list`` on older
    kernels) among the CPUs in the mask: psutil and ``/proc/cpuinfo`` count the whole host and
    ignore the mask. Never raises.
    """
    base = Path(root)
    files: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []

    online_text = _read_text(base / "sys/devices/system/cpu/online")
    online: frozenset[int] | None = None
    if online_text is not None:
        files.append("/sys/devices/system/cpu/online")
        try:
            online = parse_cpu_list(online_text) or None
        except ValueError as error:
            warnings.append(f"/sys/devices/system/cpu/online: {error}; ignored")

    if affinity is None:
        if hasattr(os, "sched_getaffinity"):
            affinity = frozenset(os.sched_getaffinity(0))
        else:
            count = os.cpu_count() or 1
            affinity = frozenset(range(count))
            notes.append(
                f"{sys.platform} has no sched_getaffinity: using the OS CPU count ({count})"
            )
    if not affinity:
        affinity = frozenset({0})
        warnings.append("the affinity mask is empty; assuming one CPU")
    online_count = len(online) if online else (os.cpu_count() or len(affinity))

    cores: set[str] = set()
    unreadable = 0
    for cpu in sorted(affinity):
        topology = base / f"sys/devices/system/cpu/cpu{cpu}/topology"
        for name in ("core_cpus_list", "thread_siblings_list"):
            text = _read_text(topology / name)
            if text is not None and text.strip():
                files.append(f"/sys/devices/system/cpu/cpu{cpu}/topology/{name}")
                try:
                    cores.add(",".join(map(str, sorted(parse_cpu_list(text)))))
                except ValueError as error:
                    warnings.append(f"cpu{cpu}/topology/{name}: {error}; ignored")
                    unreadable += 1
                break
        else:
            unreadable += 1
    physical: int | None = len(cores) if cores and not unreadable else None
    if physical is None:
        notes.append("core topology is not readable: physical cores unknown")
    return Topology(
        affinity=affinity,
        online_cpus=online_count,
        physical_cores=physical,
        files_read=tuple(files),
        warnings=tuple(warnings),
        notes=tuple(notes),
    )
