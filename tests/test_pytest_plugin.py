"""The pytest plugin: inert until configured, settings with their sources, and the thread count.

Runs of pytest inside these tests use ``pytester``: in this process where only Python threads
are involved, in a fresh subprocess where numpy or torch must load their pools from scratch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import threading
import time

import pytest

from threadbudget import NATIVE_ENV_VARS, detect_budget
from threadbudget.pytest_plugin import ThreadLimitExceeded, ThreadSampler

pytest_plugins = ["pytester"]

HAS_ENTRY_POINT = any(
    entry.value == "threadbudget.pytest_plugin"
    for entry in importlib.metadata.entry_points(group="pytest11")
)
# Once the entry point is installed pytest loads the plugin by itself (clean_env makes sure
# autoloading is on), and `-p` naming the module would register it a second time, an error.
LOAD = () if HAS_ENTRY_POINT else ("-p", "threadbudget.pytest_plugin")
# no:hypothesispytest is for speed only: pytester drops the modules a run imported, so that
# plugin would import hypothesis's core afresh (about a second) in every run.
PLUGIN = (*LOAD, "-p", "no:hypothesispytest")
# Checked without importing: pytester takes modules imported during a test out of sys.modules
# again, and numpy and torch cannot be imported twice in one process.
NEEDS_NUMPY = pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="needs numpy")
NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
TWO_CPUS = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="default pools need at least 2 CPUs to use 2 threads"
)

BURNERS = """
import hashlib
import os
import threading
import time

import pytest

CHUNK = bytes(1 << 20)


def burn(seconds=0.1):
    # CPU time, not wall time: the same work however loaded the machine is. Hashing a large
    # buffer releases the GIL, as numpy and torch do, so burners run side by side like native
    # workers and the sampler gets its turns (pure-Python burners keep it from them).
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        hashlib.sha256(CHUNK).digest()


def run_threads(count):
    threads = [threading.Thread(target=burn, name=f"burner-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # join() returns when the Python side is done; the OS thread can linger a moment longer,
    # and a reading taken then would rightly count it. Wait (briefly) until the kernel is done.
    ids = {str(thread.native_id) for thread in threads}
    deadline = time.monotonic() + 5
    while ids & set(os.listdir("/proc/self/task")) and time.monotonic() < deadline:
        time.sleep(0.001)
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread or threadbudget setting from the caller's environment reaches the runs."""
    for name in [
        *(var.name for var in NATIVE_ENV_VARS),
        "PYTEST_ADDOPTS",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD",
    ]:
        monkeypatch.delenv(name, raising=False)
    for name in [name for name in os.environ if name.startswith("THREADBUDGET_")]:
        monkeypatch.delenv(name)


def header_line(result: pytest.RunResult) -> str | None:
    return next((line for line in result.outlines if line.startswith("threadbudget:")), None)


# -- inert until configured -----------------------------------------------------------------


def test_inert_without_configuration(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
def test_four_threads():
    assert not [t for t in threading.enumerate() if t.name.startswith("threadbudget")]
    run_threads(4)
"""
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1)
    assert header_line(result) is None
    # Only pytest's own list of installed plugins may name it.
    assert not [
        line for line in result.outlines if "threadbudget" in line and "plugins:" not in line
    ]


def test_marker_is_registered_for_strict_markers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.max_threads(None)
def test_marked():
    pass
"""
    )
    pytester.runpytest(*PLUGIN, "--strict-markers").assert_outcomes(passed=1)
    result = pytester.runpytest(*PLUGIN, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.max_threads(n): fail the test when more than n*"])


# -- settings: command line > environment > ini file ----------------------------------------


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected"),
    [
        ("3", "4", "5", "max_threads 3 (from --max-threads on the command line)"),
        (None, "4", "5", "max_threads 4 (from THREADBUDGET_MAX_THREADS in the environment)"),
        (None, None, "5", "max_threads 5 (from threadbudget_max_threads in the ini file *tox.ini)"),
        # An empty variable is unset, as CI templates often export them.
        (None, " ", "5", "max_threads 5 (from threadbudget_max_threads in the ini file *tox.ini)"),
        # A lower source is never read, so its bad value does no harm.
        ("3", "abc", "x", "max_threads 3 (from --max-threads on the command line)"),
    ],
)
def test_max_threads_precedence(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    *,
    cli: str | None,
    env: str | None,
    ini: str,
    expected: str,
) -> None:
    pytester.makeini(f"[pytest]\nthreadbudget_max_threads = {ini}\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    if env is not None:
        monkeypatch.setenv("THREADBUDGET_MAX_THREADS", env)
    result = pytester.runpytest(*PLUGIN, *(["--max-threads", cli] if cli else []))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"threadbudget: {expected}; sample interval 0.005 s (default);*"])


@pytest.mark.parametrize(
    ("cli", "env", "expected"),
    [
        ("0.02", "0.03", "0.02 s (--thread-sample-interval on the command line)"),
        (None, "0.03", "0.03 s (THREADBUDGET_THREAD_SAMPLE_INTERVAL in the environment)"),
        (None, None, "0.04 s (threadbudget_thread_sample_interval in the ini file *tox.ini)"),
    ],
)
def test_sample_interval_precedence(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    *,
    cli: str | None,
    env: str | None,
    expected: str,
) -> None:
    pytester.makeini("[pytest]\nthreadbudget_thread_sample_interval = 0.04\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    if env is not None:
        monkeypatch.setenv("THREADBUDGET_THREAD_SAMPLE_INTERVAL", env)
    cli_args = ["--thread-sample-interval", cli] if cli else []
    result = pytester.runpytest(*PLUGIN, "--max-threads=2", *cli_args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"threadbudget: max_threads 2 *; sample interval {expected};*"])


@pytest.mark.parametrize(
    ("source", "name", "raw", "message"),
    [
        (
            "cli",
            "--max-threads",
            "0",
            "--max-threads='0' (command line): must be a whole number >= 1",
        ),
        (
            "env",
            "THREADBUDGET_MAX_THREADS",
            "abc",
            "THREADBUDGET_MAX_THREADS='abc' (environment): must be a whole number >= 1",
        ),
        (
            "ini",
            "threadbudget_max_threads",
            "2.5",
            "threadbudget_max_threads='2.5' (ini file *tox.ini): must be a whole number >= 1",
        ),
        (
            "cli",
            "--thread-sample-interval",
            "0",
            "--thread-sample-interval='0' (command line): must be a number of seconds between "
            "0.001 and 60",
        ),
        (
            "env",
            "THREADBUDGET_THREAD_SAMPLE_INTERVAL",
            "fast",
            "THREADBUDGET_THREAD_SAMPLE_INTERVAL='fast' (environment): must be a number of "
            "seconds between 0.001 and 60",
        ),
        (
            "ini",
            "threadbudget_thread_sample_interval",
            "nan",
            "threadbudget_thread_sample_interval='nan' (ini file *tox.ini): must be a number of "
            "seconds between 0.001 and 60",
        ),
    ],
)
def test_invalid_values_name_their_source(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    *,
    source: str,
    name: str,
    raw: str,
    message: str,
) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    args: list[str] = []
    if source == "cli":
        args = [f"{name}={raw}"]
    elif source == "env":
        monkeypatch.setenv(name, raw)
    else:
        pytester.makeini(f"[pytest]\n{name} = {raw}\n")
    result = pytester.runpytest(*PLUGIN, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_header_shows_limit_interval_and_cpu_budget(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    detected = detect_budget(emit_warnings=False)
    result = pytester.runpytest(*PLUGIN, "--max-threads=2")
    assert header_line(result) == (
        "threadbudget: max_threads 2 (from --max-threads on the command line); sample interval "
        f"0.005 s (default); CPU budget {detected.budget} (bound by {detected.binding})"
    )
    monkeypatch.setenv("THREADBUDGET_CPUS", "1")
    result = pytester.runpytest(*PLUGIN, "--max-threads=2")
    line = header_line(result)
    assert line is not None
    assert line.endswith("; CPU budget 1 (bound by override (env:THREADBUDGET_CPUS))")


# -- markers ----------------------------------------------------------------------------------


def test_marker_overrides_the_global_limit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
def test_global():
    run_threads(3)

@pytest.mark.max_threads(4)
def test_raised():
    run_threads(3)

@pytest.mark.max_threads(None)
def test_off():
    run_threads(3)
"""
    )
    result = pytester.runpytest(*PLUGIN, "--max-threads=2")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_global _*",
            "3 thread(s) used CPU during the test; the limit is 2 "
            "(from --max-threads on the command line).",
        ]
    )


def test_marker_alone_checks_only_the_marked_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
@pytest.mark.max_threads(2)
def test_marked():
    run_threads(3)

def test_unmarked():
    assert not [t for t in threading.enumerate() if t.name.startswith("threadbudget")]
    run_threads(3)
"""
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1, failed=1)
    assert header_line(result) is None
    result.stdout.fnmatch_lines(["FAILED *::test_marked*"])


def test_invalid_marker_is_an_error_at_setup(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
import pytest

@pytest.mark.max_threads(0)
def test_zero():
    pass

@pytest.mark.max_threads("2")
def test_text():
    pass

@pytest.mark.max_threads(True)
def test_bool():
    pass

@pytest.mark.max_threads(n=2)
def test_keyword():
    pass
"""
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(errors=4)
    for marker, test in [("0", "zero"), ("'2'", "text"), ("True", "bool"), ("n=2", "keyword")]:
        result.stdout.fnmatch_lines(
            [
                f"@pytest.mark.max_threads({marker}) on *::test_{test}: takes one whole number "
                ">= 1, or None to turn the check off for this test"
            ]
        )


# -- what is counted --------------------------------------------------------------------------


def test_python_threads_fail_over_the_limit_and_pass_within_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
@pytest.mark.max_threads(2)
def test_over():
    run_threads(3)

@pytest.mark.max_threads(4)
def test_within():
    run_threads(3)
"""
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_over _*",
            "3 thread(s) used CPU during the test; the limit is 2 "
            "(from @pytest.mark.max_threads(2)).",
            "Counted: OS threads of this process, native ones included, that used at least 2 ms "
            "of CPU and at least 5% of the busiest thread's CPU (sampled every 0.005 s; *",
        ]
    )
    report = result.stdout.str()
    for name in ("burner-0", "burner-1", "burner-2"):
        assert re.search(rf"tid \d+ +{name} +\d+\.\d ms CPU  \(Python thread\)", report), report
    result.stdout.fnmatch_lines(["Peak OS threads alive: *", "Native thread pools loaded:"])


def test_a_failing_test_keeps_its_own_failure(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
@pytest.mark.max_threads(1)
def test_fails_anyway():
    run_threads(3)
    raise AssertionError("the test's own failure")
"""
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E * AssertionError: the test's own failure"])
    result.stdout.no_fnmatch_line("*used CPU during the test*")


def test_sampler_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
from threadbudget.pytest_plugin import ThreadLimitExceeded

def test_sampler(thread_budget_sampler):
    run_threads(3)
    busy = thread_budget_sampler.busy_threads
    assert {"burner-0", "burner-1", "burner-2"} <= {name for _, name, _ in busy}
    assert all(cpu_ms >= 50 for _, name, cpu_ms in busy if name.startswith("burner"))
    assert thread_budget_sampler.peak_threads >= 4
    # In-process pytester: the main thread runs pytest itself and may count as a fourth.
    counted = len(busy)
    assert counted in (3, 4)
    thread_budget_sampler.check(counted)
    with pytest.raises(ThreadLimitExceeded, match=rf"{counted} thread\\(s\\) used CPU"):
        thread_budget_sampler.check(2)

def test_reset_opens_a_new_window(thread_budget_sampler):
    run_threads(2)
    thread_budget_sampler.reset()
    names = {name for _, name, _ in thread_budget_sampler.busy_threads}
    assert not {"burner-0", "burner-1"} & names
"""
    )
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=2)


def burn_without_the_gil(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        hashlib.sha256(CHUNK).digest()


CHUNK = bytes(1 << 20)


def test_thread_sampler_outside_pytest_hooks() -> None:
    def burn() -> None:
        burn_without_the_gil(0.05)

    with ThreadSampler() as sampler:
        threads = [threading.Thread(target=burn, name=f"sampled-{i}") for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert {"sampled-0", "sampled-1"} <= {item.name for item in sampler.busy_threads}
    assert not any(item.name == "threadbudget-sampler" for item in sampler.busy_threads)
    with pytest.raises(ThreadLimitExceeded):
        sampler.check(1)


def test_cpu_of_threads_that_ended_unobserved_is_reported() -> None:
    # With a 10 s interval nothing is sampled between start and stop: the two threads start and
    # end unseen, and only the process's CPU clock knows what they did.
    with ThreadSampler(interval=10.0) as sampler:
        threads = [
            threading.Thread(target=burn_without_the_gil, args=(0.1,), name=f"unseen-{i}")
            for i in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # join() returns when the Python thread is done, a moment before its OS thread exits;
        # the closing reading must not find them still there (then it would see their CPU).
        gone_by = time.monotonic() + 5.0
        while any(os.path.exists(f"/proc/self/task/{t.native_id}") for t in threads):
            assert time.monotonic() < gone_by, "the burner threads did not exit within 5 s"
            time.sleep(0.001)
    assert not [item for item in sampler.busy_threads if item.name.startswith("unseen")]
    assert sampler.unattributed_cpu_ms >= 150
    report = sampler.report(1, "a test")
    assert re.search(r"^\d+\.\d ms of CPU went to threads that ended between samples", report, re.M)


def test_no_unattributed_cpu_when_nothing_ran() -> None:
    with ThreadSampler() as sampler:
        time.sleep(0.05)
    assert sampler.unattributed_cpu_ms < 5
    assert "ended between samples" not in sampler.report(1, "a test")


def test_a_count_that_may_be_short_warns_or_says_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        BURNERS
        + """
@pytest.fixture
def release():
    event = threading.Event()
    yield event
    event.set()


@pytest.mark.max_threads(1)
def test_short_threads_pass_with_a_warning():
    run_threads(3)  # over before the first sample


@pytest.mark.max_threads(1)
def test_over_the_limit_says_it_may_be_more(release):
    burned = threading.Event()

    def keep():
        burn()
        burned.set()
        release.wait(30)  # alive at the last reading, so it is seen

    keeper = threading.Thread(target=keep, name="keeper")
    keeper.start()
    burn()
    run_threads(3)
    assert burned.wait(30)
"""
    )
    result = pytester.runpytest(*PLUGIN, "--thread-sample-interval=10")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*ThreadSamplingWarning: * thread(s) counted against the limit of 1 (from "
            "@pytest.mark.max_threads(1)); * ms of CPU went to threads that ended between "
            "samples (every 10 s) *",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ test_over_the_limit_says_it_may_be_more _*",
            "2 thread(s) used CPU during the test; the limit is 1 *",
            "* ms of CPU went to threads that ended between samples *",
        ]
    )


# -- native pools, in a fresh process ---------------------------------------------------------

NUMPY_TESTS = """
import time

import numpy as np
import pytest

X = np.random.default_rng(0).standard_normal((1500, 1500))


@pytest.mark.max_threads(1)
def test_matmul():
    for _ in range(3):
        X @ X


@pytest.mark.max_threads(1)
def test_after_matmul():
    # OpenBLAS's workers spin for ~0.1 s after test_matmul; that must not be charged here,
    # while this thread does enough work to count.
    start = time.thread_time()
    while time.thread_time() - start < 0.05:
        pass
"""

TORCH_TESTS = NUMPY_TESTS.replace("import numpy as np", "import torch").replace(
    "np.random.default_rng(0).standard_normal((1500, 1500))", "torch.randn(1500, 1500)"
)


def busy_count(result: pytest.RunResult) -> int:
    found = re.search(r"^(\d+) thread\(s\) used CPU during the test", result.stdout.str(), re.M)
    assert found, result.stdout.str()
    return int(found.group(1))


@NEEDS_NUMPY
@TWO_CPUS
def test_default_numpy_pool_fails_max_threads_1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(NUMPY_TESTS)
    result = pytester.runpytest_subprocess(*PLUGIN, timeout=120)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_matmul _*",
            "* thread(s) used CPU during the test; the limit is 1 "
            "(from @pytest.mark.max_threads(1)).",
            "  tid *(native thread)",
            "Native thread pools loaded:",
            "  *openblas (openblas, blas): num_threads=*",
        ]
    )
    assert busy_count(result) >= 2


@NEEDS_NUMPY
def test_numpy_within_the_budget_passes_max_threads_1(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "import threadbudget\n\n"
        "# Before numpy loads, so OpenBLAS starts with one thread.\n"
        "threadbudget.apply_plan(cpus=1)\n"
    )
    pytester.makepyfile(NUMPY_TESTS)
    result = pytester.runpytest_subprocess(*PLUGIN, timeout=120)
    result.assert_outcomes(passed=2)


@pytest.mark.torch
@NEEDS_TORCH
@TWO_CPUS
def test_default_torch_pool_fails_max_threads_1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TORCH_TESTS)
    result = pytester.runpytest_subprocess(*PLUGIN, timeout=180)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_matmul _*",
            "* thread(s) used CPU during the test; the limit is 1 "
            "(from @pytest.mark.max_threads(1)).",
            "Native thread pools loaded:",
            "  torch: num_threads=*",
        ]
    )
    assert busy_count(result) >= 2


@pytest.mark.torch
@NEEDS_TORCH
def test_torch_under_threadbudget_run_passes_max_threads_1(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TORCH_TESTS)
    result = pytester.run(
        sys.executable,
        "-m",
        "threadbudget",
        "run",
        "--cpus",
        "1",
        "--",
        sys.executable,
        "-m",
        "pytest",
        *PLUGIN,
        "-p",
        "no:cacheprovider",
        f"--basetemp={pytester.path / 'basetemp'}",
        timeout=180,
    )
    result.assert_outcomes(passed=2)


# -- the entry point, once installed ----------------------------------------------------------


@pytest.mark.skipif(not HAS_ENTRY_POINT, reason="the pytest11 entry point is not installed")
def test_entry_point_loads_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--max-threads=3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["threadbudget: max_threads 3 (from --max-threads*"])
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess("-p", "threadbudget", "--max-threads=3")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["threadbudget: max_threads 3 (from --max-threads*"])
