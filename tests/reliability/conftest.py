"""Prints how many fuzz cases ran (tests/reliability/test_fuzz.py), in pytest's summary."""

from __future__ import annotations

import pytest

from tests.reliability.support import FUZZ_COUNTS, fuzz_report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FUZZ_COUNTS:
        return
    report = fuzz_report(FUZZ_COUNTS)
    terminalreporter.section("fuzz cases tried")
    per_method = report["per_method"]
    assert isinstance(per_method, dict)
    for name, count in per_method.items():
        terminalreporter.write_line(f"{name:<48} {count:>6}")
    terminalreporter.write_line(f"{'total':<48} {report['total']:>6}")
