"""A real loracle-server process per test module, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.devtools.local_server import RunningServer, start_server
from server.devtools.synthetic_loras import write_demo_loras


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("server")
    write_demo_loras(data_dir / "loras")
    running = start_server(data_dir)
    yield running
    running.stop()
