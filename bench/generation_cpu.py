"""Generation benchmark on the CPU: what the service adds to a job, and how fast it streams images.

Three figures, each measured side by side with a bare baseline in one run, interleaved A/B over
several rounds, and reported as medians and ratios (the development machine is small and noisy,
so absolute times drift between runs; the ratios are the figures to compare):

a) Per-job overhead. Plain diffusers in this process (the same model folder loaded with the
   server's `load_pipeline`, one torch thread like the executor, PNG encoded with Pillow)
   against a real `loracle-server` process reached through `LoracleClient.generate_image`, the
   events consumed and the image reassembled and checked against its SHA-256. Same model, spec
   and seed, so the two images should have the same pixels; the JSON says whether they do.
b) Chunk streaming. The time from an image's first ImageChunk to its last, through Loracle,
   against a bare grpc.aio server (its own process, this file with a hidden `_echo` argument)
   that replays the very GenerateImage responses Loracle sent, in the same 64 KiB chunks, to
   the same client code.
c) img2img overhead. As (a), for the same job made again from its own image at strength 0.5,
   against diffusers' img2img pipeline built from the same components (`from_pipe`).
d) ControlNet overhead. As (a), for the same job steered by a tiny random-weight ControlNet
   (configured in the server, `controls` in the spec) with the job's own image as the control
   image, against diffusers' StableDiffusionControlNetPipeline built from the same components
   and the same ControlNet folder. The control image is already at the job's size, so the
   server's crop-and-resize changes nothing and both sides get the same image.

Usage: .venv/bin/python bench/generation_cpu.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc

from client import LoracleClient
from loracle.v1 import command_service_pb2, types_pb2
from server.devtools.bench_support import (
    Children,
    log,
    plain_png,
    run_bench,
    same_pixels,
    serve_echo,
)
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.infrastructure.diffusion.placeholder import build_tiny_controlnet

SEED = 1234
PROMPT = "a lighthouse at dusk, detailed, oil painting"
# (a) the embedded tiny SD1.5 as the server's placeholder would run it.
JOB_MODEL = "tiny-sd15"
JOB_SIDE = 64
JOB_STEPS = 4
JOB_GUIDANCE = 7.0
IMG2IMG_STRENGTH = 0.5
JOBS_PER_ROUND = 2
# (d) a tiny random-weight ControlNet made from JOB_MODEL's UNet.
CONTROLNET = "tiny-controlnet"
# (b) tiny_sd15's text encoder with an 8x VAE and an attention-free UNet (tiny_sd15's own VAE
# upsamples only 2x and its UNet attends over every latent pixel: a 1024x1024 image would take
# many minutes). One step, no classifier-free guidance: only the bytes matter here. The PNG of
# its noise is about 2.6 MB, 40-odd chunks.
STREAM_MODEL = "tiny-sd15-stream"
STREAM_SIDE = 1024
STREAM_STEPS = 1
STREAM_GUIDANCE = 1.0
CHUNK_BYTES = 64 * 1024
SERVICE = "loracle.v1.CommandService"


# --- models ---------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """Keeps diffusers' progress bars and deprecation notes out of the benchmark's output."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def build_models(workdir: Path) -> dict[str, Path]:
    """The two tiny model folders the server and the in-process baseline both load."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from server.infrastructure.diffusion.placeholder import build_tiny_sd15

    job_model = build_tiny_sd15(workdir / JOB_MODEL)
    stream_model = build_tiny_sd15(workdir / STREAM_MODEL)
    # An 8x VAE and a UNet without attention, narrow enough that a 1024x1024 image takes
    # about a second; the tokenizer and text encoder stay tiny_sd15's.
    AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=STREAM_SIDE,
        mid_block_add_attention=False,
    ).save_pretrained(stream_model / "vae", safe_serialization=True)
    UNet2DConditionModel(
        sample_size=STREAM_SIDE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).save_pretrained(stream_model / "unet", safe_serialization=True)
    return {JOB_MODEL: job_model, STREAM_MODEL: stream_model}


def write_settings(path: Path, models: dict[str, Path], controlnet: Path) -> None:
    """A TOML settings file with one [[models]] table per model and the SD1 ControlNet
    (json.dumps quotes like TOML)."""
    lines = ['log_level = "WARNING"']
    for name, folder in models.items():
        lines += [
            "",
            "[[models]]",
            f"name = {json.dumps(name)}",
            'architecture = "SD1"',
            f"path = {json.dumps(str(folder))}",
            'dtype = "float32"',
        ]
    lines += [
        "",
        "[[controlnets]]",
        f"name = {json.dumps(CONTROLNET)}",
        'architecture = "SD1"',
        f"path = {json.dumps(str(controlnet))}",
    ]
    path.write_text("\n".join(lines) + "\n")


# --- one job each way -----------------------------------------------------------------------


@dataclass
class ServiceImage:
    """What one generation streamed back, reassembled and verified."""

    data: bytes
    seconds: float
    timings: types_pb2.StageTimings
    # Per image: (bytes after the first chunk, seconds from its first chunk to its last).
    windows: list[tuple[int, float]]
    events: list[types_pb2.GenerationEvent]


def generate(client: LoracleClient, spec: types_pb2.GenerationSpec) -> ServiceImage:
    """Consumes a whole GenerateImage stream; raises unless it completed with verified images."""
    images: dict[int, bytearray] = {}
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    events: list[types_pb2.GenerationEvent] = []
    started = time.perf_counter()
    for event in client.generate_image(spec):
        kind = event.WhichOneof("event")
        if kind == "image_chunk":
            now = time.perf_counter()
            chunk = event.image_chunk
            first.setdefault(chunk.image_index, now)
            last[chunk.image_index] = now
            buffer = images.setdefault(chunk.image_index, bytearray())
            if chunk.offset != len(buffer):
                raise RuntimeError(f"chunk at offset {chunk.offset}, expected {len(buffer)}")
            buffer.extend(chunk.data)
        elif kind == "image_complete":
            info = event.image_complete
            if hashlib.sha256(images.get(info.index, b"")).hexdigest() != info.sha256:
                raise RuntimeError(f"image {info.index}: SHA-256 mismatch")
        elif kind in ("failed", "cancelled"):
            raise RuntimeError(f"generation {kind}: {event.failed.error}")
        events.append(event)
    seconds = time.perf_counter() - started
    if not events or not events[-1].HasField("completed") or not images:
        raise RuntimeError("the stream ended without a completed generation")
    first_chunks = {
        e.image_chunk.image_index: len(e.image_chunk.data)
        for e in events
        if e.HasField("image_chunk") and e.image_chunk.offset == 0
    }
    windows = [(len(images[i]) - first_chunks[i], last[i] - first[i]) for i in sorted(images)]
    return ServiceImage(bytes(images[0]), seconds, events[-1].completed.timings, windows, events)


# --- (a) per-job overhead -------------------------------------------------------------------


def job_spec() -> types_pb2.GenerationSpec:
    return types_pb2.GenerationSpec(
        model=JOB_MODEL,
        prompt=PROMPT,
        width=JOB_SIDE,
        height=JOB_SIDE,
        steps=JOB_STEPS,
        guidance_scale=JOB_GUIDANCE,
        seed=SEED,
        num_images=1,
    )


def img2img_spec(init_png: bytes) -> types_pb2.GenerationSpec:
    """The same job as img2img at strength 0.5 (so half the steps run)."""
    spec = job_spec()
    spec.init_image.data = init_png
    spec.strength = IMG2IMG_STRENGTH
    return spec


def controlnet_spec(control_png: bytes) -> types_pb2.GenerationSpec:
    """The same job steered by the configured ControlNet (scale 1, every step: the defaults)."""
    spec = job_spec()
    spec.controls.add(controlnet=CONTROLNET).image.data = control_png
    return spec


def plain_controlnet_png(pipe: Any, spec: types_pb2.GenerationSpec) -> tuple[bytes, float]:
    """`plain_png` for a ControlNet spec: the control image decoded as the server decodes it
    (already at the job's size, so the server's crop-and-resize keeps it as it is) and passed
    with diffusers' defaults, which are the spec's."""
    import io

    import torch
    from PIL import Image

    began = time.perf_counter()
    control = Image.open(io.BytesIO(spec.controls[0].image.data)).convert("RGB")
    result = pipe(
        prompt=spec.prompt,
        negative_prompt=None,
        image=[control],
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        num_images_per_prompt=1,
        generator=[torch.Generator(device="cpu").manual_seed(spec.seed)],
    )
    buffer = io.BytesIO()
    result.images[0].save(buffer, format="PNG")
    return buffer.getvalue(), time.perf_counter() - began


PlainJob = Callable[[types_pb2.GenerationSpec], tuple[bytes, float]]


def load_plain(model_dir: Path) -> Any:
    import torch

    from server.domain.models import Architecture, BaseModelConfig
    from server.infrastructure.diffusion.registry import load_pipeline

    torch.set_num_threads(1)  # as the executor's worker thread does
    pipe = load_pipeline(
        BaseModelConfig(JOB_MODEL, Architecture.SD1, model_dir, dtype="float32"), device="cpu"
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_jobs(
    client: LoracleClient, plain: PlainJob, spec: types_pb2.GenerationSpec, rounds: int, label: str
) -> dict[str, Any]:
    """`spec` through the service against `plain`, the same job in plain diffusers."""
    baseline, _ = plain(spec)  # warm-up
    service = generate(client, spec)  # warm-up; the server loads the model now
    log(f"({label}) warm-up done: the first service job took {service.seconds * 1000:.0f} ms")
    identical = same_pixels(baseline, service.data)

    per_round: list[dict[str, float]] = []
    stages: list[types_pb2.StageTimings] = []
    for number in range(rounds):
        order = ("plain", "service") if number % 2 == 0 else ("service", "plain")
        ms: dict[str, float] = {}
        for target in order:
            total = 0.0
            for _ in range(JOBS_PER_ROUND):
                if target == "plain":
                    total += plain(spec)[1]
                else:
                    image = generate(client, spec)
                    total += image.seconds
                    stages.append(image.timings)
            ms[target] = total / JOBS_PER_ROUND * 1000
        per_round.append(ms)
        log(
            f"({label}) round {number + 1}: plain {ms['plain']:.1f} ms/job, service "
            f"{ms['service']:.1f} ms/job, ratio {ms['service'] / ms['plain']:.3f}"
        )

    def stage_ms(name: str) -> float:
        return round(statistics.median(float(getattr(t, name)) for t in stages) * 1000, 2)

    plain_ms = statistics.median(r["plain"] for r in per_round)
    service_ms = statistics.median(r["service"] for r in per_round)
    return {
        "plain_ms": round(plain_ms, 2),
        "service_ms": round(service_ms, 2),
        # Medians of the paired per-round figures: both sides of a round saw the same load.
        "overhead_ms": round(statistics.median(r["service"] - r["plain"] for r in per_round), 2),
        "ratio": round(statistics.median(r["service"] / r["plain"] for r in per_round), 4),
        "same_pixels": identical,
        "service_stage_ms": {
            "queue": stage_ms("queue_seconds"),
            "text_encoding": stage_ms("text_encoding_seconds"),
            "denoising": stage_ms("denoising_seconds"),
            "decoding": stage_ms("decoding_seconds"),
        },
        "rounds": [{k: round(v, 2) for k, v in r.items()} for r in per_round],
        "jobs_per_round": JOBS_PER_ROUND,
        "size": JOB_SIDE,
        "steps": JOB_STEPS,
    }


# --- (b) chunk streaming --------------------------------------------------------------------


async def _echo_server(blobs: list[str]) -> None:
    """Serves CommandService.GenerateImage by replaying Loracle's recorded responses.

    Each response is serialized on every call, as in Loracle, so the only thing missing is
    Loracle's own work between the generated image and the wire.
    """
    responses = [
        command_service_pb2.GenerateImageResponse.FromString(base64.b64decode(b)) for b in blobs
    ]

    async def generate_image(
        _request: command_service_pb2.GenerateImageRequest,
        _context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[command_service_pb2.GenerateImageResponse]:
        for response in responses:
            yield response

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "GenerateImage": grpc.unary_stream_rpc_method_handler(
            generate_image,
            request_deserializer=command_service_pb2.GenerateImageRequest.FromString,
            response_serializer=command_service_pb2.GenerateImageResponse.SerializeToString,
        ),
    }
    await serve_echo(SERVICE, handlers)


def _rate(windows: list[tuple[int, float]]) -> float:
    """MB/s over the chunks after each image's first (its arrival starts the clock)."""
    size = sum(b for b, _ in windows)
    seconds = sum(s for _, s in windows)
    return size / seconds / 1e6 if seconds > 0 else float("inf")


def measure_streaming(
    client: LoracleClient, children: Children, workdir: Path, rounds: int
) -> dict[str, Any]:
    spec = types_pb2.GenerationSpec(
        model=STREAM_MODEL,
        prompt=PROMPT,
        width=STREAM_SIDE,
        height=STREAM_SIDE,
        steps=STREAM_STEPS,
        guidance_scale=STREAM_GUIDANCE,
        seed=SEED,
        num_images=1,
        chunk_size_bytes=CHUNK_BYTES,
    )
    recorded = generate(client, spec)  # warm-up; loads the model; its responses feed the echo
    chunks = [e for e in recorded.events if e.HasField("image_chunk")]
    log(
        f"(b) {STREAM_SIDE}x{STREAM_SIDE} PNG of {len(recorded.data)} bytes in {len(chunks)} "
        f"chunks of {CHUNK_BYTES // 1024} KiB (generation took {recorded.seconds:.2f} s)"
    )
    blobs = [
        base64.b64encode(
            command_service_pb2.GenerateImageResponse(event=e).SerializeToString()
        ).decode()
        for e in recorded.events
    ]
    (workdir / "responses.json").write_text(json.dumps(blobs))
    echo = children.start("echo", [str(Path(__file__).resolve()), "_echo", str(workdir)])
    echo_address = f"127.0.0.1:{echo.wait_for_port()}"

    per_round: list[dict[str, float]] = []
    with LoracleClient(echo_address, timeout=30.0) as bare:
        generate(bare, spec)  # warm-up
        for number in range(rounds):
            order = ("service", "bare") if number % 2 == 0 else ("bare", "service")
            rates = {
                target: _rate(generate(client if target == "service" else bare, spec).windows)
                for target in order
            }
            per_round.append(rates)
            log(
                f"(b) round {number + 1}: service {rates['service']:.1f} MB/s, bare "
                f"{rates['bare']:.1f} MB/s, ratio {rates['service'] / rates['bare']:.3f}"
            )
    return {
        "service_mb_s": round(statistics.median(r["service"] for r in per_round), 2),
        "bare_mb_s": round(statistics.median(r["bare"] for r in per_round), 2),
        "ratio": round(statistics.median(r["service"] / r["bare"] for r in per_round), 4),
        "rounds": [{k: round(v, 2) for k, v in r.items()} for r in per_round],
        "image_bytes": len(recorded.data),
        "chunks": len(chunks),
        "chunk_bytes": CHUNK_BYTES,
        "size": STREAM_SIDE,
    }


# --- orchestration --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loracle-gen-bench-") as tmp:
        workdir = Path(tmp)
        children = Children(workdir)
        server: RunningServer | None = None
        try:
            quiet_libraries()
            log("building the tiny models")
            models = build_models(workdir / "models")
            controlnet = build_tiny_controlnet(workdir / "models" / CONTROLNET, models[JOB_MODEL])
            settings = workdir / "settings.toml"
            write_settings(settings, models, controlnet)
            server = start_server(workdir / "data", "--config", str(settings))
            log(f"Loracle serving on {server.address}")
            with LoracleClient(server.address, timeout=30.0) as client:
                wait_for_models(client, timeout=60)
                pipe = load_plain(models[JOB_MODEL])
                jobs = measure_jobs(client, partial(plain_png, pipe), job_spec(), args.rounds, "a")
                # (c) img2img from the text-to-image job's own image, against diffusers'
                # img2img pipeline made from the same components.
                from diffusers import (
                    ControlNetModel,
                    StableDiffusionControlNetPipeline,
                    StableDiffusionImg2ImgPipeline,
                )

                init = generate(client, job_spec()).data
                img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
                img2img.set_progress_bar_config(disable=True)
                image_jobs = measure_jobs(
                    client, partial(plain_png, img2img), img2img_spec(init), args.rounds, "c"
                )
                # (d) the same job with its own image as the control image, against
                # diffusers' ControlNet pipeline with the same ControlNet folder.
                controlled = StableDiffusionControlNetPipeline.from_pipe(
                    pipe, controlnet=ControlNetModel.from_pretrained(controlnet)
                )
                controlled.set_progress_bar_config(disable=True)
                control_jobs = measure_jobs(
                    client,
                    partial(plain_controlnet_png, controlled),
                    controlnet_spec(init),
                    args.rounds,
                    "d",
                )
                del pipe, img2img, controlled
                streaming = measure_streaming(client, children, workdir, args.rounds)
        except BaseException:
            if server is not None:
                with contextlib.suppress(OSError):
                    log(f"server log tail:\n{server.log()[-3000:]}")
            raise
        finally:
            children.stop_all()
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
    result = {
        "per_job": jobs,
        "img2img": image_jobs,
        "controlnet": control_jobs,
        "streaming": streaming,
        "rounds": args.rounds,
        "seconds": round(time.perf_counter() - begin, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if not args.json:
        print_table(result)
    return result


def _print_jobs(heading: str, plain_label: str, jobs: dict[str, Any]) -> None:
    """One job measurement's rows (measure_jobs' figures) under its heading."""
    print(heading)
    print(f"  {plain_label:<27} {jobs['plain_ms']:9.1f} ms/job")
    print(f"  Loracle end to end          {jobs['service_ms']:9.1f} ms/job")
    print(
        f"  overhead                    {jobs['overhead_ms']:9.1f} ms/job   ratio "
        f"{jobs['ratio']:.3f} (service / plain)   same pixels: {jobs['same_pixels']}"
    )


def print_table(result: dict[str, Any]) -> None:
    jobs, stream = result["per_job"], result["streaming"]
    _print_jobs(
        f"Per job ({jobs['size']}x{jobs['size']}, {jobs['steps']} steps, tiny SD1.5, "
        f"{jobs['jobs_per_round']} jobs x {result['rounds']} interleaved rounds, medians):",
        "plain diffusers in-process",
        jobs,
    )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in jobs["service_stage_ms"].items())
    print(f"  service stages (ms)         {stages}")
    _print_jobs(
        f"img2img (the same job from its own image, strength {IMG2IMG_STRENGTH}, medians):",
        "plain diffusers img2img",
        result["img2img"],
    )
    _print_jobs(
        "ControlNet (the same job, its own image as the control image, scale 1, medians):",
        "plain diffusers ControlNet",
        result["controlnet"],
    )
    print(
        f"Chunk streaming ({stream['size']}x{stream['size']} PNG, {stream['image_bytes']} bytes, "
        f"{stream['chunks']} chunks of {stream['chunk_bytes'] // 1024} KiB, first to last chunk):"
    )
    print(f"  Loracle                     {stream['service_mb_s']:9.1f} MB/s")
    print(f"  bare grpc.aio replay        {stream['bare_mb_s']:9.1f} MB/s")
    print(f"  ratio                       {stream['ratio']:9.3f}   (Loracle / bare)")
    print(
        f"{result['machine']['cpus']} CPUs, Python {result['machine']['python']}, "
        f"{result['seconds']:.0f} s"
    )
    print()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure what Loracle adds to a generation job and to image streaming, "
        "side by side with plain diffusers and a bare gRPC stream, on tiny CPU models."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        choices=range(1, 51),
        metavar="N",
        default=5,
        help="interleaved rounds per measurement (default 5)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON line on stdout, no table"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_echo"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_echo_server(json.loads((Path(argv[1]) / "responses.json").read_text())))
        return 0

    args = parse_args(argv)
    return run_bench(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
