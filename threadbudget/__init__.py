"""threadbudget: one CPU budget for native thread pools and request concurrency.

Importing this package changes nothing; call :func:`apply_plan`, import ``threadbudget.auto``
or use the ``threadbudget`` command to apply a budget.
"""

from __future__ import annotations

from ._apply import AppliedBudget as AppliedBudget
from ._apply import EnvConflict as EnvConflict
from ._apply import apply_plan as apply_plan
from ._batching import BatcherSnapshot as BatcherSnapshot
from ._batching import BatchQueueFull as BatchQueueFull
from ._batching import MicroBatcher as MicroBatcher
from ._batching import batched as batched
from ._controllers import RuntimeChange as RuntimeChange
from ._controllers import RuntimeController as RuntimeController
from ._controllers import ThreadpoolctlController as ThreadpoolctlController
from ._controllers import ThreadSetter as ThreadSetter
from ._controllers import TorchController as TorchController
from ._controllers import register_controller as register_controller
from ._controllers import registered_controllers as registered_controllers
from ._controllers import unregister_controller as unregister_controller
from ._coordinate import CpuExecutor as CpuExecutor
from ._coordinate import CpuSlots as CpuSlots
from ._coordinate import NativeThreadLimits as NativeThreadLimits
from ._coordinate import set_default_thread_limiter as set_default_thread_limiter
from ._coordinate import sized_by_grant as sized_by_grant
from ._detect import CpuBudget as CpuBudget
from ._detect import Override as Override
from ._detect import detect_budget as detect_budget
from ._detect import round_cpus as round_cpus
from ._envvars import NATIVE_ENV_VARS as NATIVE_ENV_VARS
from ._envvars import NativeEnvVar as NativeEnvVar
from ._forksafety import install_fork_safety as install_fork_safety
from ._info import collect_info as collect_info
from ._plan import Plan as Plan
from ._plan import make_plan as make_plan
from ._plan import worker_share as worker_share
from ._slots import WAIT_BUCKETS as WAIT_BUCKETS
from ._slots import ElasticRule as ElasticRule
from ._slots import Grant as Grant
from ._slots import PoolSnapshot as PoolSnapshot
from ._slots import TokenPool as TokenPool
from ._threads import ThreadActivity as ThreadActivity
from ._threads import count_os_threads as count_os_threads
from ._threads import measure_busy_threads as measure_busy_threads
from ._version import __version__ as __version__
from ._warnings import ThreadBudgetWarning as ThreadBudgetWarning
from ._watchdog import Watchdog as Watchdog
from ._watchdog import WatchdogSnapshot as WatchdogSnapshot
from ._workers import apply_worker_budget as apply_worker_budget

__all__ = [
    "NATIVE_ENV_VARS",
    "WAIT_BUCKETS",
    "AppliedBudget",
    "BatchQueueFull",
    "BatcherSnapshot",
    "CpuBudget",
    "CpuExecutor",
    "CpuSlots",
    "ElasticRule",
    "EnvConflict",
    "Grant",
    "MicroBatcher",
    "NativeEnvVar",
    "NativeThreadLimits",
    "Override",
    "Plan",
    "PoolSnapshot",
    "RuntimeChange",
    "RuntimeController",
    "ThreadActivity",
    "ThreadBudgetWarning",
    "ThreadSetter",
    "ThreadpoolctlController",
    "TokenPool",
    "TorchController",
    "Watchdog",
    "WatchdogSnapshot",
    "__version__",
    "apply_plan",
    "apply_worker_budget",
    "batched",
    "collect_info",
    "count_os_threads",
    "detect_budget",
    "install_fork_safety",
    "make_plan",
    "measure_busy_threads",
    "register_controller",
    "registered_controllers",
    "round_cpus",
    "set_default_thread_limiter",
    "sized_by_grant",
    "unregister_controller",
    "worker_share",
]
