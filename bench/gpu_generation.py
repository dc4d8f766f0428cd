"""GPU generation benchmark: Loracle against plain diffusers on full-size SD1.5 and SDXL.

No model is downloaded. Full-size pipelines with random weights are built on the GPU from the
configs below (speed does not depend on weight values), saved in diffusers format, and loaded
by a real `loracle-server` process through its own loading code. Three measurements, each
interleaved A/B after a warm-up of both sides:

A. Batch 1, SD1.5 512x512, 30 steps: plain diffusers in this process (the same folder loaded
   with the server's `load_pipeline`, the executor's call, PNG encoded) against the service end
   to end (`LoracleClient.generate_image`, image reassembled and checked). Images/s both.
B. 8 concurrent clients of one SD1.5 image each (distinct seeds, same everything else, so the
   executor may batch them) against plain diffusers making the 8 images one at a time.
C. SDXL 1024x1024, 30 steps, through the service: two registered rank-32 LoRAs (weights 0.8
   and 0.6) against none.
D. SDXL img2img at strength 0.5 (1024x1024, 30 steps, so 15 run) from an SDXL image, through
   the service against diffusers' StableDiffusionXLImg2ImgPipeline built from the same
   folder's components, interleaved.
E. SDXL hires fix, 1024 -> 1536 (1.5x, "Latent", denoising strength 0.5, 30 + 15 steps),
   through the service against the same two calls in plain diffusers (latents out, bilinear
   upscale, img2img), interleaved.

Progress lines (stderr) carry timestamps; every figure is printed as it is measured, and the
last stdout line is one JSON object with the device, versions, figures, targets and pass/fail.
`--out PATH` also writes that JSON (after every stage, so a run cut short still leaves one)
and the server's log beside it. `--tiny` runs the same code on the tiny SD1.5/SDXL test
pipelines at 64x64 with 2 steps, on the CPU when there is no GPU, to catch mistakes before a
GPU run; it also instantiates the full-size configs on the meta device.

Usage: python bench/gpu_generation.py [--quick] [--tiny] [--out PATH] [--budget-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from client import AsyncLoracleClient, LoracleClient, LoracleError
from loracle.v1 import types_pb2
from server.devtools.bench_support import plain_png, raise_system_exit, same_pixels
from server.devtools.local_server import RunningServer, start_server, wait_for_models
from server.domain.models import Architecture

SEED = 20261126
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed, oil painting"
SD15_GUIDANCE = 7.0
SDXL_GUIDANCE = 5.0
LORA_WEIGHTS = (0.8, 0.6)
# Settings the server runs with (explicit, so the JSON says what was measured).
MAX_BATCH = 8
BATCH_WAIT_MS = 10
TARGETS = {"A": 0.97, "B": 3.0, "C": 0.9, "D": 0.97, "E": 0.97}
HIRES_SCALE = 1.5
HIRES_STRENGTH = 0.5
IMG2IMG_STRENGTH = 0.5
DEFAULT_BUDGET_S = 225.0

# --- full-size configs (those of the published SD1.5 and SDXL base checkpoints) -------------

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE: dict[str, Any] = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
# (hidden, layers, heads, intermediate, activation): CLIP ViT-L/14 and OpenCLIP ViT-bigG/14.
CLIP_L = (768, 12, 12, 3072, "quick_gelu")
CLIP_BIG_G = (1280, 32, 20, 5120, "gelu")
# The LoRA's targets: the attention projections of every transformer block.
LORA_MODULE = re.compile(r"transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$")


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run."""

    sd15_side: int
    sdxl_side: int
    steps: int
    warmup_steps: int
    a_images: int
    b_clients: int
    b_rounds: int
    c_images: int
    lora_rank: int


def make_plan(*, tiny: bool, quick: bool) -> Plan:
    return Plan(
        sd15_side=64 if tiny else 512,
        sdxl_side=64 if tiny else 1024,
        steps=2 if tiny else 30,
        warmup_steps=2 if tiny else 5,
        a_images=3 if quick else 10,
        b_clients=8,
        b_rounds=1 if quick else 2,
        c_images=2 if quick else 3,
        lora_rank=4 if tiny else 32,
    )


# --- progress and the report ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[gpu-bench {stamp} +{self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, seconds: dict[str, float]) -> Iterator[None]:
        began = time.monotonic()
        self.log(f"{name}: start")
        try:
            yield
        finally:
            seconds[name] = round(time.monotonic() - began, 2)
            self.log(f"{name}: {seconds[name]:.1f} s")


@dataclass
class Report:
    """The JSON result; written to --out after every change so a cut-short run leaves it."""

    out: Path | None
    data: dict[str, Any] = field(default_factory=dict)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".tmp")
        partial.write_text(json.dumps(self.data, indent=1) + "\n")
        partial.replace(self.out)


# --- building the pipelines -----------------------------------------------------------------


@dataclass(frozen=True)
class LoraTarget:
    module: str
    in_features: int
    out_features: int


def lora_targets(unet: Any) -> list[LoraTarget]:
    import torch

    return [
        LoraTarget(name, module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if LORA_MODULE.search(name) and isinstance(module, torch.nn.Linear)
    ]


def _clip(spec: tuple[int, int, int, int, str], *, projection: bool) -> Any:
    """A CLIP text encoder whose token ids match placeholder's byte-level tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden, layers, heads, intermediate, act = spec
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def full_pipeline(architecture: str, device: str, tokenizer_dir: Path) -> Any:
    """SD1.5 ("SD1") or SDXL with random weights, built on `device` (meta: shapes only)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from server.infrastructure.diffusion.placeholder import _tokenizer

    tokenizer = _tokenizer(tokenizer_dir)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    xl = architecture == "SDXL"
    # Default initialisation on the device itself: quick, finite, and never in host memory.
    with torch.device(device):
        unet = UNet2DConditionModel(**(SDXL_UNET if xl else SD15_UNET))
        vae = AutoencoderKL(**(SDXL_VAE if xl else SD_VAE))
        text_encoder = _clip(CLIP_L, projection=False)
        text_encoder_2 = _clip(CLIP_BIG_G, projection=True) if xl else None
    parts = [unet, vae, text_encoder] + ([text_encoder_2] if xl else [])
    for part in parts:
        part.to(torch.bfloat16).eval()
    if xl:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _params_m(module: Any) -> float:
    return round(sum(int(p.numel()) for p in module.parameters()) / 1e6, 2)


def check_full_configs(workdir: Path, clock: Clock) -> dict[str, Any]:
    """Instantiates the full-size pipelines on the meta device: configs and LoRA targets."""
    counts: dict[str, Any] = {}
    for architecture in ("SD1", "SDXL"):
        pipe = full_pipeline(architecture, "meta", workdir / f"_tokenizer_{architecture}")
        parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
        if architecture == "SDXL":
            parts["text_encoder_2"] = pipe.text_encoder_2
            counts["sdxl_lora_targets"] = len(lora_targets(pipe.unet))
        counts[architecture] = {name: _params_m(part) for name, part in parts.items()}
        clock.log(f"full-size {architecture} on meta, parameters (M): {counts[architecture]}")
    clock.log(f"full-size SDXL LoRA targets: {counts['sdxl_lora_targets']} attention projections")
    return counts


def build_models(
    workdir: Path, *, tiny: bool, device: str, clock: Clock
) -> tuple[dict[str, Path], list[LoraTarget], dict[str, float]]:
    """Saves the SD1.5 and SDXL folders; returns them, the SDXL LoRA targets and timings."""
    import torch

    folders = {"sd15": workdir / "models" / "sd15", "sdxl": workdir / "models" / "sdxl"}
    seconds: dict[str, float] = {}
    if tiny:
        from diffusers import UNet2DConditionModel

        from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl

        build_tiny_sd15(folders["sd15"])
        build_tiny_sdxl(folders["sdxl"])
        unet = UNet2DConditionModel.from_pretrained(str(folders["sdxl"] / "unet"))
        return folders, lora_targets(unet), seconds

    targets: list[LoraTarget] = []
    for name, architecture in (("sd15", "SD1"), ("sdxl", "SDXL")):
        began = time.monotonic()
        pipe = full_pipeline(architecture, device, workdir / f"_tokenizer_{name}")
        torch.cuda.synchronize()
        seconds[f"{name}_build"] = round(time.monotonic() - began, 2)
        if architecture == "SDXL":
            targets = lora_targets(pipe.unet)
        began = time.monotonic()
        pipe.save_pretrained(str(folders[name]), safe_serialization=True)
        seconds[f"{name}_save"] = round(time.monotonic() - began, 2)
        size = sum(f.stat().st_size for f in folders[name].rglob("*") if f.is_file())
        clock.log(
            f"{name}: built in {seconds[f'{name}_build']:.1f} s, saved {size / 2**30:.2f} GiB "
            f"in {seconds[f'{name}_save']:.1f} s"
        )
        del pipe
        gc.collect()
        torch.cuda.empty_cache()
    return folders, targets, seconds


def write_loras(
    root: Path, targets: list[LoraTarget], *, rank: int, dtype_name: str
) -> dict[str, Path]:
    """Two LoRAs in diffusers/peft format on every SDXL attention projection, kohya metadata."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for index, name in enumerate(("bench_lora_a", "bench_lora_b")):
        generator = torch.Generator().manual_seed(SEED + index)
        tensors: dict[str, torch.Tensor] = {}
        for target in targets:
            # A few per cent of the layer's own weights, about what a trained LoRA adds.
            down = torch.randn(rank, target.in_features, generator=generator)
            down /= target.in_features**0.5
            up = torch.randn(target.out_features, rank, generator=generator) * 0.01
            tensors[f"unet.{target.module}.lora_A.weight"] = down.to(dtype)
            tensors[f"unet.{target.module}.lora_B.weight"] = up.to(dtype)
        path = root / f"{name}.safetensors"
        save_file(
            tensors,
            str(path),
            metadata={
                "ss_base_model_version": "sdxl_base_v1-0",
                "ss_output_name": name,
                "ss_network_dim": str(rank),
            },
        )
        files[name] = path
    return files


def write_settings(path: Path, folders: dict[str, Path], dtype: str) -> None:
    """TOML settings: batching explicit, one [[models]] table each (json.dumps quotes as TOML)."""
    lines = [
        'log_level = "INFO"',
        f"max_batch = {MAX_BATCH}",
        f"batch_wait_ms = {BATCH_WAIT_MS}",
    ]
    for name, architecture in (("sd15", "SD1"), ("sdxl", "SDXL")):
        lines += [
            "",
            "[[models]]",
            f"name = {json.dumps(name)}",
            f"architecture = {json.dumps(architecture)}",
            f"path = {json.dumps(str(folders[name]))}",
            f"dtype = {json.dumps(dtype)}",
        ]
    path.write_text("\n".join(lines) + "\n")


# --- one image each way ---------------------------------------------------------------------


@dataclass
class Streamed:
    """One generation as a client saw it: images verified against their SHA-256."""

    seconds: float
    images: int
    batch_size: int
    timings: types_pb2.StageTimings
    png: bytes  # the first image


class _Assembler:
    """Reassembles images from chunks and checks them; shared by the sync and async paths."""

    def __init__(self) -> None:
        self.buffers: dict[int, bytearray] = {}
        self.verified = 0
        self.batch_size = 0
        self.timings: types_pb2.StageTimings | None = None

    def add(self, event: types_pb2.GenerationEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "started":
            self.batch_size = event.started.batch_size
        elif kind == "image_chunk":
            chunk = event.image_chunk
            buffer = self.buffers.setdefault(chunk.image_index, bytearray())
            if chunk.offset != len(buffer):
                raise RuntimeError(f"chunk at offset {chunk.offset}, expected {len(buffer)}")
            buffer.extend(chunk.data)
        elif kind == "image_complete":
            info = event.image_complete
            if hashlib.sha256(self.buffers.get(info.index, b"")).hexdigest() != info.sha256:
                raise RuntimeError(f"image {info.index}: SHA-256 mismatch")
            self.verified += 1
        elif kind == "completed":
            self.timings = event.completed.timings
        elif kind == "failed":
            raise RuntimeError(f"generation failed: {event.failed.error}")
        elif kind == "cancelled":
            raise RuntimeError("generation cancelled")

    def result(self, seconds: float) -> Streamed:
        if self.timings is None or not self.verified:
            raise RuntimeError("the stream ended without a completed generation")
        png = bytes(self.buffers[min(self.buffers)])
        return Streamed(seconds, self.verified, self.batch_size, self.timings, png)


def service_image(client: LoracleClient, spec: types_pb2.GenerationSpec) -> Streamed:
    assembler = _Assembler()
    began = time.perf_counter()
    for event in client.generate_image(spec):
        assembler.add(event)
    return assembler.result(time.perf_counter() - began)


async def _concurrent(
    address: str, specs: list[types_pb2.GenerationSpec]
) -> tuple[float, list[Streamed]]:
    """One client per spec, all connected first; wall seconds until the last image is in."""
    clients = [AsyncLoracleClient(address, timeout=60.0) for _ in specs]
    try:
        await asyncio.gather(*(client.list_base_models() for client in clients))

        async def one(client: AsyncLoracleClient, spec: types_pb2.GenerationSpec) -> Streamed:
            assembler = _Assembler()
            began = time.perf_counter()
            async for event in client.generate_image(spec):
                assembler.add(event)
            return assembler.result(time.perf_counter() - began)

        began = time.perf_counter()
        results = await asyncio.gather(*(one(c, s) for c, s in zip(clients, specs, strict=True)))
        return time.perf_counter() - began, list(results)
    finally:
        await asyncio.gather(*(client.close() for client in clients))


def job_spec(model: str, plan: Plan) -> types_pb2.GenerationSpec:
    """One image of PROMPT at SEED on "sd15" or "sdxl", at the plan's size and steps."""
    side = plan.sdxl_side if model == "sdxl" else plan.sd15_side
    return types_pb2.GenerationSpec(
        model=model,
        prompt=PROMPT,
        width=side,
        height=side,
        steps=plan.steps,
        guidance_scale=SDXL_GUIDANCE if model == "sdxl" else SD15_GUIDANCE,
        seed=SEED,
        num_images=1,
    )


def _with(spec: types_pb2.GenerationSpec, **changes: Any) -> types_pb2.GenerationSpec:
    copy = types_pb2.GenerationSpec()
    copy.CopyFrom(spec)
    for name, value in changes.items():
        setattr(copy, name, value)
    return copy


def _interleaved(count: int) -> Iterator[tuple[str, str]]:
    """A/B, B/A, A/B...: a drift over the run lands on both sides alike."""
    for index in range(count):
        yield ("a", "b") if index % 2 == 0 else ("b", "a")


def _median_timings(timings: list[types_pb2.StageTimings]) -> dict[str, float]:
    names = ("queue_seconds", "text_encoding_seconds", "denoising_seconds", "decoding_seconds")
    return {n: round(statistics.median(float(getattr(t, n)) for t in timings), 4) for n in names}


PlainJob = Callable[[types_pb2.GenerationSpec], tuple[bytes, float]]


@dataclass
class Paired:
    """One spec timed in plain diffusers and through the service, image for image."""

    stage: str
    first: Streamed  # the service's warm-up job
    same_pixels: bool  # whether the two warm-up images agree to the bit
    plain_seconds: list[float] = field(default_factory=list)
    service: list[Streamed] = field(default_factory=list)

    @property
    def plain_ips(self) -> float:
        return len(self.plain_seconds) / sum(self.plain_seconds)

    @property
    def service_ips(self) -> float:
        return len(self.service) / sum(s.seconds for s in self.service)

    def figures(self) -> dict[str, Any]:
        """The keys every A/B stage reports first."""
        return {
            "plain_images_per_s": round(self.plain_ips, 4),
            "service_images_per_s": round(self.service_ips, 4),
            "ratio": round(self.service_ips / self.plain_ips, 4),
            "plain_seconds": [round(s, 4) for s in self.plain_seconds],
            "service_seconds": [round(s.seconds, 4) for s in self.service],
        }

    def summary(self, title: str = "") -> str:
        return (
            f"{self.stage}: {title}plain {self.plain_ips:.3f} img/s, service "
            f"{self.service_ips:.3f} img/s, ratio {self.figures()['ratio']:.4f} "
            f"(target >= {TARGETS[self.stage]})"
        )


def measure_paired(
    stage: str,
    plain: PlainJob,
    client: LoracleClient,
    spec: types_pb2.GenerationSpec,
    *,
    images: int,
    plan: Plan,
    clock: Clock,
    loads_model: bool = False,
) -> Paired:
    """Warms both sides up at the plan's warm-up steps, then times `images` of `spec` each
    way, interleaved. `loads_model`: the warm-up is the model's first service job (logged)."""
    warm = _with(spec, steps=plan.warmup_steps)
    baseline, _ = plain(warm)
    first = service_image(client, warm)
    # Informative: bf16 kernels in two processes usually, not necessarily, agree to the bit.
    paired = Paired(stage, first, same_pixels(baseline, first.png))
    loaded = (
        f"the service's first job (model load) took {first.seconds:.1f} s; " if loads_model else ""
    )
    clock.log(
        f"{stage}: warm-up done; {loaded}same pixels as plain diffusers: {paired.same_pixels}"
    )
    for index, order in enumerate(_interleaved(images)):
        for side in order:
            if side == "a":
                paired.plain_seconds.append(plain(spec)[1])
            else:
                paired.service.append(service_image(client, spec))
        clock.log(
            f"{stage}: image {index + 1}: plain {paired.plain_seconds[-1]:.3f} s, "
            f"service {paired.service[-1].seconds:.3f} s"
        )
    return paired


# --- the measurements ---------------------------------------------------------------------------


def measure_a(pipe: Any, client: LoracleClient, plan: Plan, clock: Clock) -> dict[str, Any]:
    spec = job_spec("sd15", plan)
    paired = measure_paired(
        "A",
        lambda s: plain_png(pipe, s),
        client,
        spec,
        images=plan.a_images,
        plan=plan,
        clock=clock,
        loads_model=True,
    )
    timings = [image.timings for image in paired.service]
    result = {
        **paired.figures(),
        "service_stage_seconds": _median_timings(timings),
        "service_denoising_seconds": [round(t.denoising_seconds, 4) for t in timings],
        "median_ratio": round(
            statistics.median(paired.plain_seconds)
            / statistics.median(s.seconds for s in paired.service),
            4,
        ),
        "service_first_job_seconds": round(paired.first.seconds, 2),
        "same_pixels_as_plain": paired.same_pixels,
        "images": plan.a_images,
        "size": plan.sd15_side,
        "steps": plan.steps,
    }
    clock.log(f"{paired.summary()}; service stages (median s): {result['service_stage_seconds']}")
    return result


def measure_b(pipe: Any, address: str, plan: Plan, clock: Clock) -> dict[str, Any]:
    spec = job_spec("sd15", plan)  # each client's seed is set below
    clients = plan.b_clients

    def specs(base_seed: int, steps: int) -> list[types_pb2.GenerationSpec]:
        return [_with(spec, seed=base_seed + k, steps=steps) for k in range(clients)]

    _, warm = asyncio.run(_concurrent(address, specs(SEED + 1000, plan.warmup_steps)))
    clock.log(f"B: warm-up done, batch sizes {sorted(r.batch_size for r in warm)}")
    rounds: list[dict[str, Any]] = []
    for index, order in enumerate(_interleaved(plan.b_rounds)):
        figures: dict[str, Any] = {}
        for side in order:
            seeds = SEED + 100 * (index + 1)
            if side == "a":
                figures["plain_seconds"] = round(
                    sum(plain_png(pipe, s)[1] for s in specs(seeds, plan.steps)), 4
                )
            else:
                wall, results = asyncio.run(_concurrent(address, specs(seeds, plan.steps)))
                figures["service_seconds"] = round(wall, 4)
                figures["batch_sizes"] = sorted(r.batch_size for r in results)
        figures["plain_images_per_s"] = round(clients / figures["plain_seconds"], 4)
        figures["service_images_per_s"] = round(clients / figures["service_seconds"], 4)
        figures["ratio"] = round(figures["plain_seconds"] / figures["service_seconds"], 4)
        rounds.append(figures)
        clock.log(
            f"B: round {index + 1}: {clients} sequential plain {figures['plain_images_per_s']:.3f}"
            f" img/s, {clients} concurrent service {figures['service_images_per_s']:.3f} img/s "
            f"(batch sizes {figures['batch_sizes']}), ratio {figures['ratio']:.3f} "
            f"(target >= {TARGETS['B']})"
        )
    return {
        "rounds": rounds,
        "ratios": [r["ratio"] for r in rounds],
        "clients": clients,
        "size": plan.sd15_side,
        "steps": plan.steps,
    }


def measure_c(
    client: LoracleClient, lora_files: dict[str, Path], lora_root: Path, plan: Plan, clock: Clock
) -> dict[str, Any]:
    ids: list[str] = []
    for name, path in lora_files.items():
        response = client.register_lora(path.relative_to(lora_root).as_posix())
        lora = response.lora
        architecture = types_pb2.Architecture.Name(lora.base_model.architecture)
        clock.log(f"C: registered {name} as {lora.id} ({architecture}, rank {lora.rank})")
        if lora.base_model.architecture != types_pb2.ARCHITECTURE_SDXL:
            raise RuntimeError(f"{name} was catalogued as {architecture}, not SDXL")
        ids.append(lora.id)
    none = job_spec("sdxl", plan)
    with_loras = _with(none)
    for lora_id, weight in zip(ids, LORA_WEIGHTS, strict=True):
        with_loras.loras.add(lora=lora_id, weight=weight)

    first = service_image(client, _with(none, steps=plan.warmup_steps))
    clock.log(f"C: the first SDXL job (model load) took {first.seconds:.1f} s")
    first_lora = service_image(client, _with(with_loras, steps=plan.warmup_steps))
    # Same seed and steps: unless the LoRAs were applied, the pixels are the same.
    applied = not same_pixels(first.png, first_lora.png)
    clock.log(
        f"C: the first job with both LoRAs took {first_lora.seconds:.1f} s; "
        f"the LoRAs changed the image: {applied}"
    )
    if not applied:
        raise RuntimeError("the image with both LoRAs has the same pixels as the one without")
    # Steady state, as a busy service with repeated LoRA sets runs: blocks of the same set
    # (none, LoRAs, LoRAs, none). The first image of each block pays the switch (restoring or
    # fusing weights); it is reported as the switch cost and left out of the ratio.
    block = plan.c_images + 1
    blocks: dict[str, list[list[float]]] = {"none": [], "loras": []}
    for key in ("none", "loras", "loras", "none"):
        spec = none if key == "none" else with_loras
        times = [service_image(client, spec).seconds for _ in range(block)]
        blocks[key].append(times)
        clock.log(f"C: block {key}: {', '.join(f'{t:.3f}' for t in times)} s")
    seconds = {key: [t for b in runs for t in b[1:]] for key, runs in blocks.items()}
    switch = {
        key: round(
            statistics.mean(b[0] for b in runs) - statistics.mean(t for b in runs for t in b[1:]),
            4,
        )
        for key, runs in blocks.items()
    }
    clock.log(f"C: extra seconds of the first job after a LoRA-set switch: {switch}")
    none_ips = len(seconds["none"]) / sum(seconds["none"])
    loras_ips = len(seconds["loras"]) / sum(seconds["loras"])
    result = {
        "none_images_per_s": round(none_ips, 4),
        "loras_images_per_s": round(loras_ips, 4),
        "ratio": round(loras_ips / none_ips, 4),
        "none_seconds": [round(s, 4) for s in seconds["none"]],
        "loras_seconds": [round(s, 4) for s in seconds["loras"]],
        "blocks": {k: [[round(t, 4) for t in b] for b in v] for k, v in blocks.items()},
        "switch_extra_seconds": switch,
        "first_job_seconds": round(first.seconds, 2),
        "first_lora_job_seconds": round(first_lora.seconds, 2),
        "loras_changed_image": applied,
        "lora_weights": list(LORA_WEIGHTS),
        "lora_rank": plan.lora_rank,
        "images": plan.c_images,
        "size": plan.sdxl_side,
        "steps": plan.steps,
    }
    clock.log(
        f"C: no LoRA {none_ips:.3f} img/s, two LoRAs {loras_ips:.3f} img/s, ratio "
        f"{result['ratio']:.4f} (target >= {TARGETS['C']})"
    )
    return result


def measure_d(
    pipe: Any, client: LoracleClient, init_png: bytes, plan: Plan, clock: Clock
) -> dict[str, Any]:
    """SDXL img2img at strength 0.5 from an SDXL image, through the service against plain
    diffusers' img2img pipeline (`pipe`, built from a plain SDXL pipeline's components),
    interleaved as in A."""
    spec = _with(job_spec("sdxl", plan), strength=IMG2IMG_STRENGTH)
    spec.init_image.data = init_png
    paired = measure_paired(
        "D",
        lambda s: plain_png(pipe, s),
        client,
        spec,
        images=plan.c_images,
        plan=plan,
        clock=clock,
    )
    clock.log(paired.summary("SDXL img2img "))
    return {
        **paired.figures(),
        "same_pixels_as_plain": paired.same_pixels,
        "strength": IMG2IMG_STRENGTH,
        "images": plan.c_images,
        "size": plan.sdxl_side,
        "steps": plan.steps,
    }


def plain_hires(text2img: Any, img2img: Any, spec: types_pb2.GenerationSpec) -> tuple[bytes, float]:
    """A1111's hires fix in plain diffusers: the first pass's latents, bilinear-upscaled,
    painted again by the img2img pipeline, with the image's one generator; PNG-encoded."""
    import io

    import torch

    began = time.perf_counter()
    generator = [torch.Generator(device="cpu").manual_seed(spec.seed)]
    common = {"prompt": spec.prompt, "guidance_scale": spec.guidance_scale, "generator": generator}
    latents = text2img(
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        output_type="latent",
        **common,
    ).images
    factor = text2img.vae_scale_factor
    size = (int(spec.height * spec.hires.scale) // 8 * 8 // factor,
            int(spec.width * spec.hires.scale) // 8 * 8 // factor)  # fmt: skip
    upscaled = torch.nn.functional.interpolate(latents, size=size, mode="bilinear")
    image = img2img(
        image=upscaled,
        strength=spec.hires.denoising_strength,
        num_inference_steps=spec.hires.steps or spec.steps,
        **common,
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), time.perf_counter() - began


def measure_e(
    text2img: Any, img2img: Any, client: LoracleClient, plan: Plan, clock: Clock
) -> dict[str, Any]:
    """SDXL hires fix, 1024 -> 1536 (1.5x, latent, strength 0.5), through the service against
    the same two calls in plain diffusers, interleaved as in A."""
    spec = job_spec("sdxl", plan)
    spec.hires.scale = HIRES_SCALE
    spec.hires.denoising_strength = HIRES_STRENGTH
    spec.hires.upscaler = "Latent"
    paired = measure_paired(
        "E",
        lambda s: plain_hires(text2img, img2img, s),
        client,
        spec,
        images=plan.c_images,
        plan=plan,
        clock=clock,
    )
    clock.log(paired.summary("SDXL hires fix "))
    return {
        **paired.figures(),
        "same_pixels_as_plain": paired.same_pixels,
        "scale": HIRES_SCALE,
        "denoising_strength": HIRES_STRENGTH,
        "images": plan.c_images,
        "size": plan.sdxl_side,
        "steps": plan.steps,
    }


# --- orchestration --------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers
    from google import protobuf

    found = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda),
        "diffusers": str(diffusers.__version__),
        "transformers": str(transformers.__version__),
        "grpcio": str(grpc.__version__),
        "protobuf": str(protobuf.__version__),
    }
    with contextlib.suppress(ImportError):
        import peft

        found["peft"] = str(peft.__version__)
    return found


def quiet_libraries() -> None:
    """Keeps progress bars and deprecation notes out of the log."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def targets(report: dict[str, Any]) -> dict[str, Any]:
    def verdict(name: str, value: float | None) -> dict[str, Any]:
        target = TARGETS[name]
        return {
            "value": value,
            "target": target,
            "pass": None if value is None else value >= target,
        }

    a, b, c = report.get("A", {}), report.get("B", {}), report.get("C", {})
    return {
        "A_service_vs_plain_batch1": verdict("A", a.get("ratio")),
        # Every round must reach it; both are reported.
        "B_batched_vs_sequential": {
            **verdict("B", min(b["ratios"]) if b.get("ratios") else None),
            "rounds": b.get("ratios", []),
        },
        "C_two_loras_vs_none": verdict("C", c.get("ratio")),
        "D_sdxl_img2img_service_vs_plain": verdict("D", report.get("D", {}).get("ratio")),
        "E_sdxl_hires_fix_service_vs_plain": verdict("E", report.get("E", {}).get("ratio")),
    }


def run(args: argparse.Namespace, clock: Clock, report: Report) -> bool:
    """Runs every stage it has time for; False when one of them failed."""
    import torch

    quiet_libraries()
    tiny: bool = args.tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise RuntimeError("no CUDA device: run with --tiny for the CPU check")
    dtype = "bfloat16" if device == "cuda" else "float32"
    plan = make_plan(tiny=tiny, quick=args.quick)
    report.set("device", torch.cuda.get_device_name() if device == "cuda" else "cpu")
    report.set("versions", versions())
    report.set("tiny", tiny)
    report.set("quick", args.quick)
    report.set("plan", plan.__dict__)
    report.set("settings", {"max_batch": MAX_BATCH, "batch_wait_ms": BATCH_WAIT_MS, "dtype": dtype})
    clock.log(f"device {report.data['device']}, versions {report.data['versions']}")
    torch.set_num_threads(1)  # as the executor's worker thread does
    stage_seconds: dict[str, float] = {}
    failures: dict[str, str] = {}

    def attempt(name: str, body: Callable[[], dict[str, Any]]) -> None:
        if clock.elapsed() > args.budget_s:
            clock.log(f"{name}: skipped, {clock.elapsed():.0f} s used of {args.budget_s:.0f} s")
            report.set(name, {"skipped": "time budget"})
            return
        try:
            with clock.stage(name, stage_seconds):
                report.set(name, body())
        except (LoracleError, RuntimeError, grpc.RpcError, OSError, ValueError) as exc:
            message = f"{type(exc).__name__}: {exc}"
            clock.log(f"{name}: FAILED: {message}")
            failures[name] = message
            report.set(name, {"error": message})
        report.set("stage_seconds", stage_seconds)

    with tempfile.TemporaryDirectory(
        prefix="loracle-gpu-bench-", ignore_cleanup_errors=True
    ) as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "data"
        lora_root = data_dir / "loras"
        server: RunningServer | None = None
        try:
            with clock.stage("build", stage_seconds):
                if tiny:
                    report.set("full_size_params_m", check_full_configs(workdir, clock))
                folders, sdxl_targets, build_seconds = build_models(
                    workdir, tiny=tiny, device=device, clock=clock
                )
                lora_dtype = "float16" if tiny else "bfloat16"
                lora_files = write_loras(
                    lora_root, sdxl_targets, rank=plan.lora_rank, dtype_name=lora_dtype
                )
                report.set("build_seconds", build_seconds)
                clock.log(
                    f"LoRAs: 2 x {len(sdxl_targets)} modules, rank {plan.lora_rank}, {lora_dtype}"
                    f", {lora_files['bench_lora_a'].stat().st_size / 2**20:.0f} MiB each"
                )
            settings = workdir / "settings.toml"
            write_settings(settings, folders, dtype)
            with clock.stage("start", stage_seconds), ThreadPoolExecutor(1) as pool:
                # The server imports torch and diffusers while this process loads its pipeline.
                starting = pool.submit(start_server, data_dir, "--config", str(settings))
                try:
                    pipe = _load_plain(folders["sd15"], device, dtype)
                finally:
                    server = starting.result()  # kept for the `finally` below to stop it
                clock.log(f"Loracle serving on {server.address}")
            with LoracleClient(server.address, timeout=60.0) as client:
                wait_for_models(client, timeout=60)
                attempt("A", lambda: measure_a(pipe, client, plan, clock))
                address = server.address
                attempt("B", lambda: measure_b(pipe, address, plan, clock))
                pipe = None  # frees this process's GPU memory before SDXL
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                attempt("C", lambda: measure_c(client, lora_files, lora_root, plan, clock))

                def img2img() -> dict[str, Any]:
                    from diffusers import StableDiffusionXLImg2ImgPipeline

                    sdxl = _load_plain(folders["sdxl"], device, dtype, Architecture.SDXL)
                    plain = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
                    plain.set_progress_bar_config(disable=True)
                    start = types_pb2.GenerationSpec(
                        model="sdxl",
                        prompt=PROMPT,
                        width=plan.sdxl_side,
                        height=plan.sdxl_side,
                        steps=plan.warmup_steps,
                        seed=SEED,
                    )
                    plains["sdxl"], plains["sdxl_img2img"] = sdxl, plain
                    return measure_d(plain, client, service_image(client, start).png, plan, clock)

                plains: dict[str, Any] = {}
                attempt("D", img2img)
                if plains:
                    attempt(
                        "E",
                        lambda: measure_e(
                            plains["sdxl"], plains["sdxl_img2img"], client, plan, clock
                        ),
                    )
        finally:
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop(timeout=60)
                if args.out is not None:
                    with contextlib.suppress(OSError):
                        shutil.copy(server.log_path, args.out.with_suffix(".server.log"))
    report.set("failures", failures)
    return not failures


def _load_plain(
    folder: Path, device: str, dtype: str, architecture: Architecture = Architecture.SD1
) -> Any:
    from server.domain.models import BaseModelConfig
    from server.infrastructure.diffusion.registry import load_pipeline

    config = BaseModelConfig(architecture.value, architecture, folder, dtype=dtype)
    pipe = load_pipeline(config, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure Loracle against plain diffusers on full-size random-weight SD1.5 "
        "and SDXL on one GPU: batch-1 overhead, batching of concurrent clients, and LoRA cost."
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer images: A 3, B 1 round, C 2 (default 6, 2, 3)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny test pipelines at 64x64, 2 steps (runs on the CPU): checks the code path",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON result (and server log)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="skip the measurements not yet started after this many seconds "
        f"(default {DEFAULT_BUDGET_S:g})",
    )
    return parser.parse_args(argv)


def bench_main(
    name: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Clock, Report], bool],
    errors: tuple[type[Exception], ...],
    targets: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """How each GPU benchmark runs: SIGTERM ends it as Ctrl-C does, an expected error is
    reported in one line, and whatever happens the JSON report (with the targets' verdicts)
    is written to --out and printed as the last stdout line."""
    signal.signal(signal.SIGTERM, raise_system_exit)
    clock = Clock()
    report = Report(args.out, {"bench": name, "status": "running"})
    ok = False
    try:
        ok = run(args, clock, report)
    except KeyboardInterrupt:
        clock.log("interrupted")
        report.set("status", "interrupted")
        return 130
    except errors as exc:
        clock.log(f"failed: {type(exc).__name__}: {exc}")
        report.set("error", f"{type(exc).__name__}: {exc}")
    finally:
        if targets is not None:
            report.data["targets"] = targets(report.data)
        report.data["total_seconds"] = round(clock.elapsed(), 1)
        if report.data["status"] == "running":
            report.data["status"] = "complete" if ok else "failed"
        report.write()
        print(json.dumps(report.data), flush=True)
    for target, verdict in report.data.get("targets", {}).items():
        clock.log(f"target {target}: {verdict}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    errors = (RuntimeError, LoracleError, grpc.RpcError, OSError)
    return bench_main("gpu_generation", args, run, errors, targets)


if __name__ == "__main__":
    sys.exit(main())
