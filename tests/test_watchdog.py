"""The watchdog: real oversubscription is diagnosed once, a process within budget is left alone."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest

import threadbudget
from threadbudget import _watchdog
from threadbudget._watchdog import Watchdog, runnable_threads

from .conftest import run_json_probe


def fake_samples(monkeypatch: pytest.MonkeyPatch, runnable: list[int]) -> None:
    values = iter(runnable)

    def sample(exclude: int | None = None) -> tuple[int, int, Counter[str]]:
        count = next(values)
        return count, count + 3, Counter({"python": count})

    monkeypatch.setattr(_watchdog, "runnable_threads", sample)


def test_warns_once_when_oversubscription_persists(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_samples(monkeypatch, [5] * 10)
    watchdog = Watchdog(2, interval=1.0, persist=3.0)
    with caplog.at_level(logging.WARNING, logger="threadbudget"):
        for second in range(10):
            watchdog.sample(now=float(second))
    snapshot = watchdog.snapshot()
    assert snapshot.warnings == 1
    assert snapshot.oversubscribed_samples == 10
    assert snapshot.peak_runnable == 5
    assert snapshot.peak_threads == 8
    messages = [r.getMessage() for r in caplog.records if r.name == "threadbudget"]
    assert len(messages) == 1
    assert "5 runnable thread(s) for a budget of 2 CPU(s)" in messages[0]
    assert snapshot.last_diagnosis == messages[0]


def test_a_short_burst_is_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_samples(monkeypatch, [5, 5, 1, 5, 5, 1, 5, 5])
    watchdog = Watchdog(2, interval=1.0, persist=3.0)
    for second in range(8):
        watchdog.sample(now=float(second))
    assert watchdog.snapshot().warnings == 0
    assert watchdog.snapshot().oversubscribed_samples == 6


def test_warns_again_only_after_a_calm_period(monkeypatch: pytest.MonkeyPatch) -> None:
    pattern = [5] * 4 + [1] * 2 + [5] * 4 + [1] * 4 + [5] * 4
    fake_samples(monkeypatch, pattern)
    watchdog = Watchdog(2, interval=1.0, persist=3.0, max_warnings=5)
    for second in range(len(pattern)):
        watchdog.sample(now=float(second))
    # First episode warns; the 2 s calm is shorter than persist, so the second does not;
    # after 4 s of calm the third warns again.
    assert watchdog.snapshot().warnings == 2


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("budget", 0),
        ("interval", 0),
        ("persist", -1),
        ("interval", True),
        ("max_warnings", -1),
    ],
)
def test_bad_arguments_raise_naming_the_value(argument: str, value: object) -> None:
    kwargs: dict[str, object] = {"budget": 2, argument: value}
    with pytest.raises(ValueError, match=argument):
        Watchdog(**kwargs)  # type: ignore[arg-type]


def test_counts_this_process_threads() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    threads = [threading.Thread(target=spin) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.05)
        seen = max(runnable_threads()[0] for _ in range(20))
        total = runnable_threads()[1]
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    # Three spinning threads share the GIL, so not all are runnable in every sample, but the
    # kernel reports at least one of them plus the sampling thread.
    assert seen >= 2
    assert total >= 4


def test_start_stop_and_context_manager() -> None:
    with Watchdog(2, interval=0.05, persist=10.0) as watchdog:
        time.sleep(0.3)
        assert any(t.name == "threadbudget-watchdog" for t in threading.enumerate())
        with pytest.raises(RuntimeError, match="already running"):
            watchdog.start()
    assert watchdog.snapshot().samples >= 2
    assert not any(t.name == "threadbudget-watchdog" for t in threading.enumerate())


PROBE = r"""
import json, logging, sys, threading, time
records = []
class Keep(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger("threadbudget").addHandler(Keep())
import torch
import threadbudget
apply = sys.argv[1] == "budgeted"
slots = threadbudget.CpuSlots(2) if apply else None
x = torch.randn(700, 700)
deadline = time.monotonic() + 3.0
def work():
    while time.monotonic() < deadline:
        if slots is None:
            x @ x
        else:
            with slots.slot():
                x @ x
watchdog = threadbudget.Watchdog(2, interval=0.1, persist=1.0).start()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join(30)
watchdog.stop()
snapshot = watchdog.snapshot()
print(json.dumps({"warnings": snapshot.warnings, "peak": snapshot.peak_runnable,
                  "records": records}))
"""


def run_probe(mode: str) -> dict[str, object]:
    return run_json_probe(PROBE, mode, timeout=120)


@pytest.mark.torch
def test_diagnoses_real_oversubscription_and_names_the_pools() -> None:
    pytest.importorskip("torch")
    oversubscribed = run_probe("default")
    assert oversubscribed["warnings"] == 1
    (message,) = oversubscribed["records"]  # type: ignore[misc]
    assert "budget of 2 CPU(s)" in message
    assert "torch 2 thread(s)" in message
    assert "libgomp" in message
    # Six request threads x two OpenMP threads each, on two CPUs.
    assert int(oversubscribed["peak"]) > 4  # type: ignore[call-overload]


@pytest.mark.torch
def test_stays_quiet_when_slots_keep_the_budget() -> None:
    pytest.importorskip("torch")
    budgeted = run_probe("budgeted")
    assert budgeted["warnings"] == 0
    assert budgeted["records"] == []


def test_watchdog_is_exported() -> None:
    assert threadbudget.Watchdog is Watchdog
