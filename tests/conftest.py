from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.bootstrap import Container
from tests.support import make_container


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    """The real application on a fresh SQLite file (the embedded default)."""
    c = make_container(tmp_path)
    yield c
    c.close()


@pytest.fixture
def memory_container(tmp_path: Path) -> Iterator[Container]:
    """The real application on in-memory storage: the eventsourcing POPO recorder and an
    in-memory SQLite read model. Fast, for unit tests of the use cases."""
    c = make_container(tmp_path, "memory://")
    yield c
    c.close()
