"""Running a script of ``benchmarks/`` as a user would, or loading it as a module, for the
tests of its command line and its helpers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def load_benchmark() -> ModuleType:
    """``benchmarks/coordination.py`` as a module, for tests of its helpers."""
    spec = importlib.util.spec_from_file_location(
        "coordination_bench", BENCHMARKS / "coordination.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
