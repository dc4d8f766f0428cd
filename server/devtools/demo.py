"""`make demo`: a real server on embedded defaults, a handful of synthetic LoRA files with
kohya-style metadata, imported and listed through the `loracle` CLI, then a graceful stop."""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

from client import LoracleClient
from client.cli import main as cli
from server.devtools.local_server import start_server
from server.devtools.synthetic_loras import write_demo_loras

DATA = Path("demo-data")


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
    running = start_server(DATA, "--log-level", "WARNING")
    address = running.address
    print(f"  listening on {address}; its log: {running.log_path}")
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
        print(f"  server exited with {running.stop(signal.SIGTERM, timeout=30)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
