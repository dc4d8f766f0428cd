"""Starts a real `loracle-server` process on a free loopback port, for the demo and the
end-to-end tests: the server prints "(port N)" once it serves; its log goes to a file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client import LoracleClient


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


def launch(
    args: list[str], log_path: Path, ready: str, timeout: float = 60
) -> tuple[subprocess.Popen[str], re.Match[str], list[str]]:
    """Runs `python -m ARGS` with stderr to `log_path`; returns once a stdout line matches
    `ready` (the match, and the lines read until then), or raises with the log."""
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        match = re.search(ready, line)
        if match:
            return process, match, lines
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"{args[0]} did not start:\n{log_path.read_text()}")


def start_server(data_dir: Path, *extra: str) -> RunningServer:
    lora_root = data_dir / "loras"
    lora_root.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{time.monotonic_ns()}.log"
    args = ["server", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *extra]
    process, match, _ = launch(args, log_path, r"\(port (\d+)\)")
    return RunningServer(process, f"127.0.0.1:{match.group(1)}", data_dir, lora_root, log_path)


def wait_for_models(client: LoracleClient, timeout: float = 120.0) -> None:
    """Until every configured model is ready (models load or build in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        models = client.list_base_models()
        if models and all(m.ready for m in models):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"models not ready: {[(m.name, m.error) for m in models]}")
        time.sleep(0.2)
