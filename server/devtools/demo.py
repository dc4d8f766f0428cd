"""`make demo`: a real server on embedded defaults, a handful of synthetic LoRA files with
kohya-style metadata, imported and listed through the `loracle` CLI, then a graceful stop."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from client import LoracleClient
from client.cli import main as cli
from server.devtools.synthetic_loras import write_demo_loras

DATA = Path("demo-data")


def start_server(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"\(port (\d+)\)", line)
        if match:
            return process, f"127.0.0.1:{match.group(1)}"
        if not line and process.poll() is not None:
            break
    process.kill()
    raise SystemExit("demo: the server did not start")


def wait_for_models(address: str, timeout: float = 120) -> None:
    with LoracleClient(address) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(m.ready or not m.is_placeholder for m in client.list_base_models()):
                return
            time.sleep(0.5)


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main() -> int:
    shutil.rmtree(DATA, ignore_errors=True)
    step(f"writing synthetic LoRA files under {DATA / 'loras'}")
    for path in write_demo_loras(DATA / "loras"):
        print(f"  {path.relative_to(DATA / 'loras')}  ({path.stat().st_size:,} bytes)")
    step("starting loracle-server (SQLite in demo-data/)")
    process, address = start_server(DATA)
    print(f"  listening on {address}")
    try:
        server = ["--server", address]
        steps = [
            (
                "loracle loras import  (scans the LoRA root, reads headers and sidecars)",
                ["loras", "import"],
            ),
            ("loracle loras list", ["loras", "list"]),
            ("loracle loras list --base-model SDXL", ["loras", "list", "--base-model", "SDXL"]),
            ("loracle events  (the audit trail)", ["events", "--limit", "10"]),
        ]
        for title, args in steps:
            step(title)
            if cli([*server, *args]) != 0:
                raise SystemExit(f"demo: `loracle {' '.join(args)}` failed")
        step('loracle recommend "pixel art, a knight on a horse" --base-model "SD 1.5"')
        if (
            cli([*server, "recommend", "pixel art, a knight on a horse", "--base-model", "SD 1.5"])
            != 0
        ):
            raise SystemExit("demo: `loracle recommend` failed")
        step("loracle models  (the embedded tiny SD1.5 placeholder is built on first start)")
        wait_for_models(address)
        cli([*server, "models"])
        out = DATA / "lighthouse.png"
        step(
            f'loracle generate "a lighthouse at dusk" --seed 7 -o {out}  (placeholder model: noise)'
        )
        if cli([*server, "generate", "a lighthouse at dusk", "--seed", "7", "-o", str(out)]) != 0:
            raise SystemExit("demo: `loracle generate` failed")
        print(f"  image written to {out.resolve()}")
    finally:
        step("stopping the server (SIGTERM, graceful)")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        print(f"  server exited with {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
