"""Running a script of ``benchmarks/`` as a user would, for the tests of its command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(
    script: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python benchmarks/<script> <args>``, output captured; its exit status is not checked."""
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
