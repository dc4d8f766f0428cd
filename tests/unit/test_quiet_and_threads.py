"""Start-up choices a user meets first: how many torch threads a worker gets, and a LoRA load
error in one line whatever form torch's report takes."""

from __future__ import annotations

import pytest

from server.config import cpu_threads


def test_configured_threads_are_kept() -> None:
    assert cpu_threads(3) == 3


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (16, 15)])
def test_auto_threads_leave_one_cpu(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected: int
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cpus)), raising=False)
    assert cpu_threads(0) == expected
