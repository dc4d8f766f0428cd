"""GPU benchmark of the transformer families: Loracle against plain diffusers on full-size
random-weight FLUX.1-dev and SD3.5-large, and fp8 quantization on load against bf16.

No model is downloaded: full-size pipelines (FLUX.1-dev: a 12B transformer, T5-XXL, CLIP-L and
the 16-channel VAE; SD3.5-large: an 8B MMDiT, CLIP-L, CLIP-G and T5-XXL) are built with random
weights on the GPU from the published configs below (speed does not depend on weight values),
saved in diffusers format, and loaded by a real `loracle-server` process through its own
loading code. Per family (stage letters F for FLUX, S for SD3.5), each interleaved A/B after a
warm-up of both sides:

1. Batch 1, 1024x1024, 28 steps: the service end to end against plain diffusers in this
   process (the same folder loaded with the server's `load_pipeline`, PNG encoded).
4. One request of 4 images against plain diffusers making the same 4 in one call.
L. Batch 1 with a rank-32 LoRA on every attention projection of the transformer, the service
   (fused, as it runs LoRAs) against plain diffusers with the same LoRA loaded and fused.
Q. fp8 weight-only quantization on load (`quantize = "fp8"`, torchao) against bf16, in plain
   diffusers through the server's `load_pipeline`: seconds per image and peak GPU memory each.

The target for 1, 4 and L is a service/plain ratio of at least 0.97. Progress lines go to
stderr; the last stdout line is one JSON object (device, versions, figures, targets). `--out
PATH` also writes the JSON after every stage and the server's log beside it. `--tiny` runs the
same code on the tiny FLUX and SD3 test pipelines at 64x64 with 2 steps on the CPU, and
instantiates the full-size configs on the meta device (parameter counts), to catch mistakes
before a GPU run. `--families flux,sd35` picks the families (the full run of both takes longer
than 15 minutes of an H100; FLUX alone about 9).

Usage: python bench/gpu_transformer_families.py [--tiny] [--quick] [--families F] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from client import LoracleClient, LoracleError
from loracle.v1 import types_pb2
from server.devtools.local_server import RunningServer, start_server, wait_for_models

# Run as `python bench/gpu_transformer_families.py`: the repository root, for its sibling.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_generation import (
    Clock,
    Report,
    Streamed,
    _interleaved,
    _with,
    bench_main,
    quiet_libraries,
    service_image,
    versions,
)

SEED = 20261207
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed, oil painting"
TARGET = 0.97
LORA_RANK = 32
DEFAULT_BUDGET_S = 840.0

# --- full-size configs (those published with FLUX.1-dev and SD3.5-large) -----------------------

FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
SD35_LARGE_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
VAE16: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# (scaling, shift) of each family's VAE.
VAE_SCALING = {"flux": (0.3611, 0.1159), "sd35": (1.5305, 0.0609)}
# T5 v1.1 XXL's encoder; (hidden, layers, heads, intermediate, activation) of CLIP-L and -bigG.
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
CLIP_L = (768, 12, 12, 3072, "quick_gelu")
CLIP_BIG_G = (1280, 32, 20, 5120, "gelu")
# Each family's architecture (as its [[models]] entry says it) and its published guidance.
ARCHITECTURES = {"flux": "Flux.1 D", "sd35": "SD 3.5 Large"}
GUIDANCE = {"flux": 3.5, "sd35": 3.5}


@dataclass(frozen=True)
class Plan:
    side: int
    steps: int
    warmup_steps: int
    images: int  # per side in stages 1 and L
    batch_rounds: int  # stage 4's requests of 4 per side
    quant_images: int


def make_plan(*, tiny: bool, quick: bool) -> Plan:
    return Plan(
        side=64 if tiny else 1024,
        steps=2 if tiny else 28,
        warmup_steps=2 if tiny else 4,
        images=2 if quick else 3,
        batch_rounds=1 if quick else 2,
        quant_images=1 if quick else 2,
    )


# --- building the pipelines ---------------------------------------------------------------------


def _clip(spec: tuple[int, int, int, int, str], *, projection: bool) -> Any:
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


def full_pipeline(family: str, device: str, tokenizer_dir: Path) -> Any:
    """FLUX.1-dev or SD3.5-large with random weights, built on `device` (meta: shapes only),
    with the byte-level CLIP and T5 tokenizers the tiny test pipelines use."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from server.infrastructure.diffusion.placeholder import _t5_tokenizer, _tokenizer

    tokenizer, t5_tokenizer = _tokenizer(tokenizer_dir), _t5_tokenizer()
    scaling, shift = VAE_SCALING[family]
    with torch.device(device):
        vae = AutoencoderKL(**VAE16, scaling_factor=scaling, shift_factor=shift)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        clip_l = _clip(CLIP_L, projection=family == "sd35")
        if family == "flux":
            transformer: Any = FluxTransformer2DModel(**FLUX_TRANSFORMER)
        else:
            transformer = SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER)
            clip_g = _clip(CLIP_BIG_G, projection=True)
    parts = [vae, t5, clip_l, transformer] + ([clip_g] if family == "sd35" else [])
    for part in parts:
        part.to(torch.bfloat16).eval()
    if family == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=clip_l,
            tokenizer=tokenizer,
            text_encoder_2=t5,
            tokenizer_2=t5_tokenizer,
            transformer=transformer,
        )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
        transformer=transformer,
    )


def check_full_configs(workdir: Path, families: Sequence[str], clock: Clock) -> dict[str, Any]:
    """The full-size pipelines on the meta device: their parameter counts (B)."""
    counts: dict[str, Any] = {}
    for family in families:
        pipe = full_pipeline(family, "meta", workdir / f"_tokenizer_{family}")
        counts[family] = {
            name: round(sum(p.numel() for p in part.parameters()) / 1e9, 3)
            for name, part in pipe.components.items()
            if hasattr(part, "parameters")
        }
        clock.log(f"full-size {family} on meta, parameters (B): {counts[family]}")
    return counts


def build_model(workdir: Path, family: str, *, tiny: bool, device: str, clock: Clock) -> Path:
    folder = workdir / "models" / family
    if tiny:
        from server.infrastructure.diffusion.placeholder import build_tiny_flux, build_tiny_sd3

        (build_tiny_flux if family == "flux" else build_tiny_sd3)(folder)
        return folder
    import torch

    began = time.monotonic()
    pipe = full_pipeline(family, device, workdir / f"_tokenizer_{family}")
    torch.cuda.synchronize()
    built = time.monotonic() - began
    pipe.save_pretrained(str(folder), safe_serialization=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    clock.log(
        f"{family}: built in {built:.1f} s, saved {size / 2**30:.1f} GiB in "
        f"{time.monotonic() - began - built:.1f} s"
    )
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def write_lora(root: Path, pipe: Any, family: str, *, tiny: bool) -> Path:
    """A rank-32 (tiny: 4) LoRA in diffusers/peft format on every attention projection of the
    transformer, a few per cent of each layer's own weights, with its family's metadata."""
    import torch
    from safetensors.torch import save_file

    from server.devtools.tiny_loras import _TRANSFORMER_TARGET

    rank = 4 if tiny else LORA_RANK
    generator = torch.Generator().manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in pipe.transformer.named_modules():
        if not (_TRANSFORMER_TARGET.search(name) and isinstance(module, torch.nn.Linear)):
            continue
        down = torch.randn(rank, module.in_features, generator=generator)
        down /= module.in_features**0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.01
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(torch.bfloat16)
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(torch.bfloat16)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"bench_{family}.safetensors"
    meta = {"flux": "flux-1-dev/lora", "sd35": "stable-diffusion-v3.5-large/lora"}[family]
    save_file(tensors, str(path), metadata={"modelspec.architecture": meta})
    return path


def write_settings(path: Path, folders: dict[str, Path], dtype: str) -> None:
    lines = ['log_level = "INFO"', "max_batch = 4", "batch_wait_ms = 10"]
    for family, folder in folders.items():
        lines += [
            "",
            "[[models]]",
            f"name = {json.dumps(family)}",
            f"architecture = {json.dumps(ARCHITECTURES[family])}",
            f"path = {json.dumps(str(folder))}",
            f"dtype = {json.dumps(dtype)}",
        ]
    path.write_text("\n".join(lines) + "\n")


# --- plain diffusers ----------------------------------------------------------------------------


def load_plain(family: str, folder: Path, device: str, dtype: str, quantize: str = "") -> Any:
    from server.domain.models import Architecture, BaseModelConfig
    from server.infrastructure.diffusion.registry import load_pipeline

    architecture = Architecture.FLUX if family == "flux" else Architecture.SD3
    config = BaseModelConfig(family, architecture, folder, dtype=dtype, quantize=quantize)
    pipe = load_pipeline(config, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_images(pipe: Any, spec: types_pb2.GenerationSpec) -> tuple[bytes, float]:
    """`spec.num_images` images in one call, a CPU generator per image seeded as the executor
    seeds them (seed + index), PNG-encoded; the first image's PNG and the seconds."""
    import torch

    began = time.perf_counter()
    count = max(spec.num_images, 1)
    result = pipe(
        prompt=[spec.prompt] * count,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        generator=[torch.Generator().manual_seed(spec.seed + i) for i in range(count)],
    )
    pngs = []
    for image in result.images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs[0], time.perf_counter() - began


# --- the measurements ---------------------------------------------------------------------------


def paired(
    name: str,
    plain: Callable[[types_pb2.GenerationSpec], tuple[bytes, float]],
    client: LoracleClient,
    spec: types_pb2.GenerationSpec,
    *,
    rounds: int,
    plan: Plan,
    clock: Clock,
) -> dict[str, Any]:
    """Both sides warmed up, then `rounds` of `spec` each way, interleaved; images per second."""
    warm = _with(spec, steps=plan.warmup_steps)
    plain(warm)
    first = service_image(client, warm)
    clock.log(f"{name}: warm-up done (the service's took {first.seconds:.1f} s)")
    plain_seconds: list[float] = []
    service: list[Streamed] = []
    for index, order in enumerate(_interleaved(rounds)):
        for side in order:
            if side == "a":
                plain_seconds.append(plain(spec)[1])
            else:
                service.append(service_image(client, spec))
        clock.log(
            f"{name}: round {index + 1}: plain {plain_seconds[-1]:.3f} s, "
            f"service {service[-1].seconds:.3f} s"
        )
    images = max(spec.num_images, 1)
    plain_ips = images * len(plain_seconds) / sum(plain_seconds)
    service_ips = sum(s.images for s in service) / sum(s.seconds for s in service)
    ratio = round(service_ips / plain_ips, 4)
    clock.log(
        f"{name}: plain {plain_ips:.4f} img/s, service {service_ips:.4f} img/s, ratio {ratio} "
        f"(target >= {TARGET})"
    )
    return {
        "plain_images_per_s": round(plain_ips, 4),
        "service_images_per_s": round(service_ips, 4),
        "ratio": ratio,
        "target": TARGET,
        "pass": ratio >= TARGET,
        "plain_seconds": [round(s, 3) for s in plain_seconds],
        "service_seconds": [round(s.seconds, 3) for s in service],
        "service_batch_sizes": [s.batch_size for s in service],
    }


def measure_quantized(
    family: str, folder: Path, device: str, plan: Plan, spec: types_pb2.GenerationSpec, clock: Clock
) -> dict[str, Any]:
    """The model at full precision (bf16 on CUDA, fp32 on the CPU) against fp8 on load, in
    plain diffusers through `load_pipeline`: seconds per image after a warm-up, and the peak
    GPU memory of loading plus generating."""
    import torch

    dtype = "bfloat16" if device == "cuda" else "float32"
    out: dict[str, Any] = {"full_dtype": dtype}
    for label, quantize in (("full", ""), ("fp8", "fp8")):
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        pipe = load_plain(family, folder, device, dtype, quantize)
        plain_images(pipe, _with(spec, steps=plan.warmup_steps))
        seconds = [plain_images(pipe, spec)[1] for _ in range(plan.quant_images)]
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
        out[label] = {
            "seconds_per_image": round(min(seconds), 3),
            "peak_gpu_gib": round(peak / 2**30, 2),
        }
        clock.log(f"{family} {label} ({quantize or dtype}): {out[label]}")
        del pipe
    out["fp8_speedup"] = round(
        out["full"]["seconds_per_image"] / out["fp8"]["seconds_per_image"], 3
    )
    if out["full"]["peak_gpu_gib"]:
        out["fp8_memory_share"] = round(out["fp8"]["peak_gpu_gib"] / out["full"]["peak_gpu_gib"], 3)
    return out


def attempt(
    args: argparse.Namespace,
    clock: Clock,
    report: Report,
    failures: dict[str, str],
    name: str,
    body: Callable[[], dict[str, Any]],
) -> None:
    """One stage: skipped past the time budget, its failure recorded without ending the run."""
    if clock.elapsed() > args.budget_s:
        clock.log(f"{name}: skipped, {clock.elapsed():.0f} s used of {args.budget_s:.0f} s")
        report.set(name, {"skipped": "time budget"})
        return
    try:
        report.set(name, body())
    except (LoracleError, RuntimeError, grpc.RpcError, OSError, ValueError) as exc:
        failures[name] = f"{type(exc).__name__}: {exc}"
        clock.log(f"{name}: FAILED: {failures[name]}")
        report.set(name, {"error": failures[name]})


Attempt = Callable[[str, Callable[[], dict[str, Any]]], None]


def measure_family(
    family: str,
    folder: Path,
    client: LoracleClient,
    lora_root: Path,
    device: str,
    dtype: str,
    plan: Plan,
    *,
    attempt: Attempt,
    clock: Clock,
) -> None:
    """Stages 1, 4, L and Q of one family (letters F for FLUX, S for SD3.5)."""
    import torch

    letter = "F" if family == "flux" else "S"
    spec = types_pb2.GenerationSpec(
        model=family,
        prompt=PROMPT,
        width=plan.side,
        height=plan.side,
        steps=plan.steps,
        guidance_scale=GUIDANCE[family],
        seed=SEED,
        num_images=1,
    )
    # Held in a list so that it can be dropped before stage Q loads the model twice more.
    held = [load_plain(family, folder, device, dtype)]
    lora = write_lora(lora_root, held[0], family, tiny=plan.side < 256)

    def plain(s: types_pb2.GenerationSpec) -> tuple[bytes, float]:
        return plain_images(held[0], s)

    def stage(name: str, job: types_pb2.GenerationSpec, rounds: int) -> dict[str, Any]:
        return paired(name, plain, client, job, rounds=rounds, plan=plan, clock=clock)

    attempt(f"{letter}1", lambda: stage(f"{letter}1", spec, plan.images))
    batch = _with(spec, num_images=4)
    attempt(f"{letter}4", lambda: stage(f"{letter}4", batch, plan.batch_rounds))

    def with_lora() -> dict[str, Any]:
        registered = client.register_lora(lora.relative_to(lora_root).as_posix())
        held[0].load_lora_weights(str(lora), adapter_name="bench")
        held[0].fuse_lora(adapter_names=["bench"], lora_scale=1.0)
        selected = _with(spec)
        selected.loras.add(lora=registered.lora.id, weight=1.0)
        return stage(f"{letter}L", selected, plan.images)

    attempt(f"{letter}L", with_lora)
    held.clear()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    attempt(f"{letter}Q", lambda: measure_quantized(family, folder, device, plan, spec, clock))


def run(args: argparse.Namespace, clock: Clock, report: Report) -> bool:
    import torch

    quiet_libraries()
    tiny: bool = args.tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise RuntimeError("no CUDA device: run with --tiny for the CPU check")
    dtype = "bfloat16" if device == "cuda" else "float32"
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(ARCHITECTURES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}: choose from {sorted(ARCHITECTURES)}")
    plan = make_plan(tiny=tiny, quick=args.quick)
    report.set("device", torch.cuda.get_device_name() if device == "cuda" else "cpu")
    report.set("versions", versions())
    report.set("plan", {**plan.__dict__, "families": families, "tiny": tiny})
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="loracle-tf-bench-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        if tiny:
            report.set("full_size_params_b", check_full_configs(workdir, families, clock))
        folders = {
            f: build_model(workdir, f, tiny=tiny, device=device, clock=clock) for f in families
        }
        lora_root = workdir / "data" / "loras"
        settings = workdir / "settings.toml"
        write_settings(settings, folders, dtype)
        server: RunningServer | None = None
        try:
            server = start_server(workdir / "data", "--config", str(settings))
            with LoracleClient(server.address, timeout=600.0) as client:
                wait_for_models(client, timeout=120)
                for family in families:
                    measure_family(
                        family,
                        folders[family],
                        client,
                        lora_root,
                        device,
                        dtype,
                        plan,
                        attempt=lambda name, body: attempt(
                            args, clock, report, failures, name, body
                        ),
                        clock=clock,
                    )
        finally:
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop(timeout=60)
                if args.out is not None:
                    with contextlib.suppress(OSError):
                        import shutil

                        shutil.copy(server.log_path, args.out.with_suffix(".server.log"))
    report.set("failures", failures)
    return not failures


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--families", default="flux,sd35", help="comma-separated: flux,sd35")
    parser.add_argument("--out", type=Path, help="also write the JSON result (and server log)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    errors = (RuntimeError, ValueError, LoracleError, grpc.RpcError, OSError)
    return bench_main("gpu_transformer_families", args, run, errors)


if __name__ == "__main__":
    sys.exit(main())
