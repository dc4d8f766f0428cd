"""A real loracle-server process per test module, on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.devtools.synthetic_loras import write_demo_loras


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    address: str
    data_dir: Path
    lora_root: Path
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text()


def start_server(data_dir: Path, *extra: str) -> RunningServer:
    lora_root = data_dir / "loras"
    lora_root.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{time.monotonic_ns()}.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"\(port (\d+)\)", line)
        if match:
            return RunningServer(
                process, f"127.0.0.1:{match.group(1)}", data_dir, lora_root, log_path
            )
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("server")
    write_demo_loras(data_dir / "loras")
    running = start_server(data_dir)
    yield running
    running.stop()
