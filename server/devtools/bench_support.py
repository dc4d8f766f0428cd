"""What the benchmarks share: child processes that cannot block on a full pipe and are always
stopped, the catalog (the real one by path, or seeded synthetic records of its shape), and the
plain-diffusers baseline of the generation benchmarks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from client import LoracleError, read_catalog_jsonl
from loracle.v1 import types_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CATALOG = REPO_ROOT.parent / "shared" / "eval" / "civitai_loras.jsonl"
SYNTHETIC_RECORDS = 7955
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
PORT_LINE = re.compile(r"\(port (\d+)\)")


def log(message: str) -> None:
    """Progress goes to stderr so that stdout stays the table plus one JSON line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- subprocesses -------------------------------------------------------------------------


@dataclass
class Child:
    """A subprocess whose stdout and stderr go to files, so a chatty child never blocks."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def tail(self, limit: int = 4000) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-limit:])
        return "\n".join(parts)

    def wait_for_port(self, timeout: float = START_TIMEOUT) -> int:
        """Polls stdout for "(port N)", the line the servers print once they serve."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = PORT_LINE.search(self.stdout_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def wait_for_stderr(self, pattern: re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.stderr_path.read_text(errors="replace"))
            if match:
                return match
            if time.monotonic() >= deadline or self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: no line matching {pattern.pattern!r}")
            time.sleep(0.05)

    def rss_mib(self) -> float:
        """Resident memory of the server process (VmRSS), in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"no VmRSS in /proc/{self.process.pid}/status")
        return int(match.group(1)) / 1024

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


@dataclass
class Children:
    """Every subprocess started, stopped in reverse order whatever happens."""

    workdir: Path
    started: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        share_stderr: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """`share_stderr` lets the child's progress lines reach the terminal as they happen;
        `env` adds to (or overrides) the environment it inherits."""
        stdout_path = self.workdir / f"{name}.stdout"
        stderr_path = self.workdir / f"{name}.stderr"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=None if share_stderr else err,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        child = Child(name, process, stdout_path, stderr_path)
        self.started.append(child)
        return child

    def stop_all(self) -> None:
        for child in reversed(self.started):
            with contextlib.suppress(Exception):
                child.stop()


def server_args(workdir: Path, storage_args: Sequence[str]) -> list[str]:
    """Arguments of a benchmark's Loracle server process: an empty data directory under
    `workdir` (made here), any port, no embedded model, the store `storage_args` names."""
    data_dir = workdir / "data"
    (data_dir / "loras").mkdir(parents=True)
    return [
        "-m",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        "--no-embedded-model",
        *storage_args,
    ]


def raise_system_exit(signum: int, _frame: object) -> NoReturn:
    """Turns SIGTERM into an exception so that the `finally` blocks stop the children."""
    log("terminated")
    raise SystemExit(128 + signum)


def run_bench(run: Callable[[], dict[str, Any]]) -> int:
    """A benchmark's `main`: SIGTERM and Ctrl-C stop it through its `finally` blocks, a
    failure is one line on stderr, and the result is one JSON line on stdout."""
    signal.signal(signal.SIGTERM, raise_system_exit)
    try:
        result = run()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, LoracleError, grpc.RpcError, OSError) as exc:
        log(f"failed: {exc}")
        return 1
    print(json.dumps(result), flush=True)
    return 0


# --- catalog and queries ------------------------------------------------------------------


_WORDS = (
    "anime",
    "portrait",
    "detailed",
    "style",
    "girl",
    "character",
    "concept",
    "fantasy",
    "city",
    "night",
    "realistic",
    "painting",
    "watercolor",
    "cyberpunk",
    "mecha",
    "dress",
    "forest",
    "castle",
    "dragon",
    "flower",
    "ocean",
    "sunset",
    "photo",
    "cinematic",
)


def synthetic_catalog(count: int = SYNTHETIC_RECORDS) -> list[dict[str, Any]]:
    """Records shaped like the civitai export (field sizes and base-model mix), seeded."""
    rng = random.Random(count)
    records = []
    for index in range(count):
        base_model = rng.choices(("SD 1.5", "Other", "SD 2.1"), weights=(88, 11, 1))[0]
        words = rng.sample(_WORDS, 3)
        records.append(
            {
                "source_id": f"synthetic:{index}",
                "name": f"{' '.join(words).title()} {index}",
                "base_model": base_model,
                "tags": rng.sample(_WORDS, rng.randint(3, 8)),
                "trigger_words": [f"{w}{index}" for w in rng.sample(_WORDS, rng.randint(0, 4))],
                "file_name": f"{'_'.join(words)}_{index}",
                "description": " ".join(rng.choices(_WORDS, k=rng.randint(40, 90))),
                "downloads": rng.randint(0, 130_000),
            }
        )
    return records


def load_catalog(path: Path) -> tuple[list[dict[str, Any]], str]:
    if path.is_file():
        return list(read_catalog_jsonl(path)), "shared/eval"
    log(f"{path} not found: using {SYNTHETIC_RECORDS} synthetic records instead")
    return synthetic_catalog(), "synthetic"


def plain_png(pipe: Any, spec: types_pb2.GenerationSpec) -> tuple[bytes, float]:
    """A job as the executor runs it (a CPU generator per image), on a pipeline in this
    process, then PNG-encoded: the baseline the generation benchmarks compare against. A
    spec with an init image is run as img2img (resized as the executor resizes it), on the
    img2img pipeline the caller passes."""
    import torch

    began = time.perf_counter()
    size: dict[str, Any] = {"width": spec.width, "height": spec.height}
    if spec.HasField("init_image"):  # img2img: `pipe` is the img2img pipeline
        from PIL import Image

        init = Image.open(io.BytesIO(spec.init_image.data)).convert("RGB")
        resample = Image.Resampling.LANCZOS
        size = {
            "image": [init.resize((spec.width, spec.height), resample)],
            "strength": spec.strength,
        }
    result = pipe(
        prompt=spec.prompt,
        negative_prompt=None,
        **size,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        num_images_per_prompt=1,
        generator=[torch.Generator(device="cpu").manual_seed(spec.seed)],
    )
    buffer = io.BytesIO()
    result.images[0].save(buffer, format="PNG")
    return buffer.getvalue(), time.perf_counter() - began


def same_pixels(png_a: bytes, png_b: bytes) -> bool:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png_a)).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(png_b)).convert("RGB"))
    return a.shape == b.shape and bool((a == b).all())


async def serve_echo(service: str, handlers: dict[str, Any]) -> None:
    """Serves a bare baseline server until SIGTERM (or its parent dies), printing its port the
    way loracle-server does. Handlers are registered as generated add_*Servicer_to_server code
    registers them, as Loracle's are, so both sides pay the same dispatch."""
    import asyncio

    import grpc

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo serving (port {port})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    while not stop.is_set() and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    await server.stop(1.0)
