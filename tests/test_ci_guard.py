"""CI's no-skip rule (tests/conftest.py): with THREADBUDGET_REQUIRE_REAL=1 any skip fails."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_runs="def test_passes():\n    pass\n",
        test_skips_at_run_time="import pytest\n\ndef test_skips():\n    pytest.skip('no torch')\n",
        test_skips_at_collection=(
            "import pytest\n\npytest.importorskip('a_module_nobody_has')\n\n"
            "def test_never_collected():\n    pass\n"
        ),
    )
    return pytester


def test_skips_fail_the_session_when_required(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THREADBUDGET_REQUIRE_REAL", "1")
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*tests skipped, which CI does not allow*",
            "SKIPPED but required: test_skips_at_collection.py (at collection)",
            "SKIPPED but required: test_skips_at_run_time.py::test_skips",
        ]
    )


def test_skips_are_only_skips_otherwise(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THREADBUDGET_REQUIRE_REAL", raising=False)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.no_fnmatch_line("*CI does not allow*")
