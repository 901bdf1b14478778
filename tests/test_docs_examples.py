"""The outputs quoted in docs/ are what threadbudget really prints for those scenarios."""

from __future__ import annotations

from pathlib import Path

import threadbudget

DOCS = Path(__file__).parent.parent / "docs"


def kubernetes_pod(root: Path) -> Path:
    """A pod limited to 1500m on a 64-CPU node (32 cores x 2 threads), seen from inside."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("0::/\n")
    (root / "proc/self/mountinfo").write_text(
        "1000 990 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup "
        "rw,nsdelegate,memory_recursiveprot\n"
    )
    cgroup = root / "sys/fs/cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "cpu.max").write_text("150000 100000\n")
    (cgroup / "cpu.weight").write_text("59\n")
    cpus = root / "sys/devices/system/cpu"
    (cpus).mkdir(parents=True, exist_ok=True)
    (cpus / "online").write_text("0-63\n")
    for cpu in range(64):
        topology = cpus / f"cpu{cpu}/topology"
        topology.mkdir(parents=True)
        core = cpu % 32
        (topology / "core_cpus_list").write_text(f"{core},{core + 32}\n")
    return root


def test_kubernetes_page_shows_what_is_detected(tmp_path: Path) -> None:
    budget = threadbudget.detect_budget(
        root=kubernetes_pod(tmp_path), affinity=frozenset(range(64)), environ={}
    )
    page = (DOCS / "kubernetes.md").read_text()
    explanation = budget.explain().splitlines()
    assert budget.budget == 1
    assert budget.quota == 1.5
    for line in explanation[:3] + explanation[-1:]:
        assert line in page, line
    assert "CPU shares/weight 59 at /sys/fs/cgroup/cpu.weight (reported only:" in page
    assert explanation[3].startswith("CPU shares/weight 59 at /sys/fs/cgroup/cpu.weight")
