"""`make demo`: a real server on embedded defaults, a handful of synthetic LoRA files with
kohya-style metadata, imported and listed through the `loracle` CLI, then a graceful stop."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

from client import LoracleClient
from client.cli import main as cli
from server.devtools.local_server import start_server, wait_for_models
from server.devtools.synthetic_loras import write_demo_loras
from server.infrastructure.diffusion.runtime import quiet_libraries

DATA = Path("demo-data")


def write_embedded_model_lora(data: Path) -> Path:
    """A LoRA with kohya-style metadata whose shapes fit the embedded placeholder model."""
    from server.devtools.tiny_loras import write_lora_for_pipeline
    from server.domain.models import Architecture, BaseModelConfig
    from server.infrastructure.diffusion.registry import EMBEDDED_NAME, load_pipeline

    folder = data / "models" / EMBEDDED_NAME
    pipe = load_pipeline(BaseModelConfig(EMBEDDED_NAME, Architecture.SD1, folder))
    frequency = {"inkwash style": 30, "ink wash painting": 24, "monochrome": 12, "brush": 9}
    path = data / "loras" / "styles" / "ink_wash_tiny.safetensors"
    return write_lora_for_pipeline(
        pipe,
        path,
        seed=7,
        metadata={
            "ss_output_name": "Ink Wash (tiny placeholder)",
            "ss_base_model_version": "sd_v1",
            "ss_tag_frequency": json.dumps({"1_dataset": frequency}),
            "modelspec.trigger_phrase": "inkwash style",
            "modelspec.tags": "ink wash painting, monochrome, brush, sumi-e",
        },
    )


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def main() -> int:
    # The demo loads the placeholder itself (to fit a LoRA to it): no library progress bars
    # or advisories between its steps, as in the server's log.
    quiet_libraries()
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
        with LoracleClient(address) as client:
            wait_for_models(client)
        cli([*server, "models"])
        # The synthetic library has real SD1.5/SDXL shapes, which the tiny placeholder cannot
        # take; this one is fitted to it, so the demo can apply a recommended LoRA for real.
        ink = write_embedded_model_lora(DATA)
        step(f"loracle loras import  (adds {ink.name}, fitted to the placeholder model)")
        if cli([*server, "loras", "import"]) != 0:
            raise SystemExit("demo: `loracle loras import` failed")
        prompt = "ink wash painting of a lighthouse at dusk"
        step(f'loracle recommend "{prompt}" --base-model tiny-sd15')
        if cli([*server, "recommend", prompt, "--base-model", "tiny-sd15"]) != 0:
            raise SystemExit("demo: `loracle recommend` failed")
        with LoracleClient(address) as client:
            recs = client.recommend_loras(prompt, "tiny-sd15", max_loras=3).recommendations
        top = recs[0] if recs else None
        if top is None or top.lora.file_name != ink.stem:
            raise SystemExit(f"demo: expected {ink.stem} to be recommended first, got {top}")
        chosen = [f"{top.lora.file_name}:{top.weight:g}"]
        out = DATA / "lighthouse.png"
        lora_args = [arg for choice in chosen for arg in ("--lora", choice)]
        step(
            f'loracle generate "{prompt}" {" ".join(lora_args)} --seed 7 -o {out}'
            "  (placeholder model: noise)"
        )
        if cli([*server, "generate", prompt, *lora_args, "--seed", "7", "-o", str(out)]) != 0:
            raise SystemExit("demo: `loracle generate` failed")
        print(f"  image written to {out.resolve()}")
        step("loracle generations  (each job is recorded; see also `loracle events`)")
        cli([*server, "generations", "--limit", "5"])
    finally:
        step("stopping the server (SIGTERM, graceful)")
        print(f"  server exited with {running.stop(signal.SIGTERM, timeout=30)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
