"""The environment variables native libraries read when they load, and what a plan puts in them.

Each library reads its variables once, at load time, so these only help before the import;
``_apply`` handles libraries that are already loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._plan import Plan
from ._settings import APPLIED_MARKER, parse_marker, set_by_us

__all__ = [
    "APPLIED_MARKER",
    "NATIVE_ENV_VARS",
    "NativeEnvVar",
    "parse_marker",
    "planned_values",
    "set_by_us",
]

Role = Literal["threads", "process", "budget", "passive", "single", "report"]


@dataclass(frozen=True)
class NativeEnvVar:
    """One variable: who reads it and which number of the plan it receives."""

    name: str
    role: Role
    readers: str


# role: threads = T per unit of work; process = this process's share of the budget (caps that
# leave room for elastic grants); budget = the whole budget; passive = only when waiting must
# not spin; single = only when T is 1; report = shown, never set.
NATIVE_ENV_VARS: tuple[NativeEnvVar, ...] = (
    NativeEnvVar(
        "OMP_NUM_THREADS",
        "threads",
        "every OpenMP runtime; fallback of OpenBLAS, MKL, numexpr and torch",
    ),
    NativeEnvVar(
        "MKL_NUM_THREADS", "threads", "MKL (takes precedence over OMP_NUM_THREADS in torch)"
    ),
    NativeEnvVar(
        "OPENBLAS_NUM_THREADS", "threads", "OpenBLAS (before GOTO_NUM_THREADS and OMP_NUM_THREADS)"
    ),
    NativeEnvVar("GOTO_NUM_THREADS", "threads", "OpenBLAS (legacy name)"),
    NativeEnvVar("BLIS_NUM_THREADS", "threads", "BLIS"),
    NativeEnvVar("VECLIB_MAXIMUM_THREADS", "threads", "Apple Accelerate"),
    NativeEnvVar("NUMEXPR_NUM_THREADS", "threads", "numexpr"),
    NativeEnvVar("NUMBA_NUM_THREADS", "threads", "numba"),
    NativeEnvVar("TF_NUM_INTRAOP_THREADS", "threads", "TensorFlow intra-op pool"),
    NativeEnvVar("TF_NUM_INTEROP_THREADS", "threads", "TensorFlow inter-op pool"),
    NativeEnvVar("RAYON_NUM_THREADS", "threads", "Rust rayon pools (polars, tokenizers, ...)"),
    NativeEnvVar("RAYON_RS_NUM_CPUS", "threads", "Hugging Face tokenizers (its rayon pool)"),
    NativeEnvVar("POLARS_MAX_THREADS", "threads", "polars"),
    NativeEnvVar("OMP_THREAD_LIMIT", "process", "OpenMP: the most threads one team may hold"),
    NativeEnvVar("NUMEXPR_MAX_THREADS", "process", "numexpr: upper bound of its pool"),
    NativeEnvVar("LOKY_MAX_CPU_COUNT", "process", "loky / joblib / scikit-learn cpu_count()"),
    NativeEnvVar(
        "PYTHON_CPU_COUNT", "budget", "os.cpu_count() and os.process_cpu_count() on Python 3.13+"
    ),
    NativeEnvVar("OMP_WAIT_POLICY", "passive", "OpenMP: PASSIVE idles threads instead of spinning"),
    NativeEnvVar(
        "GOMP_SPINCOUNT",
        "passive",
        "libgomp (GCC OpenMP, torch on Linux): spin iterations before sleeping",
    ),
    NativeEnvVar(
        "KMP_BLOCKTIME",
        "passive",
        "Intel/LLVM OpenMP: milliseconds a thread spins (200 by default)",
    ),
    NativeEnvVar(
        "OPENBLAS_THREAD_TIMEOUT",
        "passive",
        "OpenBLAS: 2^N cycles its threads spin before sleeping (4..30)",
    ),
    NativeEnvVar("TOKENIZERS_PARALLELISM", "single", "Hugging Face tokenizers"),
    NativeEnvVar(
        "MKL_DYNAMIC",
        "report",
        "MKL: TRUE (its default) lets MKL use fewer threads "
        "than asked, which never oversubscribes, so threadbudget leaves it alone",
    ),
)

_PASSIVE_VALUES = {
    "OMP_WAIT_POLICY": "PASSIVE",
    # A brief spin (well under a millisecond) rather than none: it bridges the back-to-back
    # parallel regions of one model call, which 0 makes pay a wake-up each (6 % of a
    # 2-thread all-MiniLM-L6-v2 request here, lower in 8 of 8 paired runs), and it ends long
    # before anything else could want the CPU.
    "GOMP_SPINCOUNT": "10000",
    "KMP_BLOCKTIME": "0",
    # 2^20 cycles (some 0.4 ms): the back-to-back BLAS calls of one request, and the next
    # request of a busy client, find the pool awake. 2^4 made 20 matmuls of 256x256 with 2
    # threads ~5 % slower; 2^16 (20-30 us) let a lone request's threads fall asleep between
    # calls, and on a virtual machine under steal each wake-up came late (elastic at one numpy
    # client 0.91x the spinning split, 0.53x in one round; 2^20 1.01x, in the same rounds).
    # OpenBLAS's own default, 2^28, spins ~0.1 s after the last call: at two clients that cost
    # 4-7 % of throughput, 2^20 nothing measurable (benchmarks/coordination.py
    # --elastic-openblas-timeouts, results of 2026-12-03).
    "OPENBLAS_THREAD_TIMEOUT": "20",
}


def planned_values(plan: Plan) -> dict[str, str]:
    """The value each variable should have under *plan* (variables it leaves alone are absent)."""
    values: dict[str, str] = {}
    for var in NATIVE_ENV_VARS:
        if var.role == "threads":
            values[var.name] = str(plan.threads)
        elif var.role == "process":
            values[var.name] = str(max(plan.process_budget, plan.threads))
        elif var.role == "budget":
            values[var.name] = str(plan.budget)
        elif var.role == "passive" and plan.passive_wait:
            values[var.name] = _PASSIVE_VALUES[var.name]
        elif var.role == "single" and plan.threads == 1:
            values[var.name] = "false"
    return values
