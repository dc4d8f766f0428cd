"""GPU benchmark of batches that mix LoRAs (issue 16): the executor with per-row LoRA deltas
against today's executor (each LoRA set a fused batch of its own) and against 8 jobs without
LoRAs batched, on full-size random-weight SD1.5 and SDXL, bf16, 30 steps, rank-32 LoRAs on
every attention projection (speed does not depend on weight values). No model is downloaded
or saved: the pipelines are built on the GPU (bench/gpu_generation.py's configs) and handed
to the executors in this process through their loader; the LoRA files are written to disk
and loaded through the real loading code.

D. SD1.5 512x512: 8 concurrent jobs, each asking for a different LoRA: images/s mixed vs
   split (target >= 3.0) and vs 8 no-LoRA jobs batched (target >= 0.8); max and mean pixel
   difference between each mixed image and its split twin.
E. SDXL 1024x1024: the same (targets >= 1.6 and >= 0.8).
F. SD1.5: 64 distinct LoRAs cycling under 8 closed-loop clients, an adapter budget that holds
   16 of them (so LoRAs are evicted and loaded again): throughput and p50/p99 latency, mixed
   vs split, the same number of seconds each.
G. SDXL with `compile = true` (regional torch.compile): the warm-up's compile time, batch-1
   latency against eager plain diffusers (target <= 0.77), and the graphs compiled by new LoRA
   mixes after warm-up (target 0).

Every stage is timed and skipped when `--budget-s` has run out; the JSON report (stdout's last
line, and `--out`) is written after each. `--tiny` runs everything on the tiny test pipelines
at 64x64 with 2 steps (on the CPU when there is no GPU) to check the code path; its figures
mean nothing.

Usage: python bench/gpu_mixed_loras.py [--tiny] [--quick] [--out PATH] [--budget-s S]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Run as `python bench/gpu_mixed_loras.py`: the repository root, for its sibling.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gpu_generation import (
    Clock,
    Report,
    bench_main,
    full_pipeline,
    lora_targets,
    quiet_libraries,
    versions,
)

SEED = 20261207
PROMPT = "a lighthouse on a cliff at dusk, dramatic sky, highly detailed, oil painting"
TARGETS = {"D_split": 3.0, "D_no_lora": 0.8, "E_split": 1.6, "E_no_lora": 0.8, "G": 0.77}
DEFAULT_BUDGET_S = 285.0
CLIENTS = 8


@dataclass(frozen=True)
class Plan:
    sd15_side: int
    sdxl_side: int
    steps: int
    rank: int
    rounds: int
    f_seconds: float
    f_loras: int
    f_budget_loras: int


def make_plan(*, tiny: bool, quick: bool) -> Plan:
    return Plan(
        sd15_side=64 if tiny else 512,
        sdxl_side=64 if tiny else 1024,
        steps=2 if tiny else 30,
        rank=4 if tiny else 32,
        rounds=1 if quick or not tiny else 2,
        f_seconds=5.0 if tiny else (15.0 if quick else 25.0),
        f_loras=16 if tiny else 64,
        f_budget_loras=4 if tiny else 16,
    )


# --- models and LoRAs -----------------------------------------------------------------------


def build(architecture: str, device: str, workdir: Path, tiny: bool) -> Any:
    if tiny:
        from server.domain.models import Architecture, BaseModelConfig
        from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
        from server.infrastructure.diffusion.registry import load_pipeline

        builder = build_tiny_sdxl if architecture == "SDXL" else build_tiny_sd15
        folder = builder(workdir / architecture)
        arch = Architecture.SDXL if architecture == "SDXL" else Architecture.SD1
        return load_pipeline(BaseModelConfig(architecture, arch, folder), device=device)
    return full_pipeline(architecture, device, workdir / f"_tokenizer_{architecture}")


def write_loras(root: Path, unet: Any, count: int, rank: int, prefix: str) -> list[Path]:
    """`count` peft-format LoRAs on every attention projection of `unet`, in its dtype."""
    import torch
    from safetensors.torch import save_file

    dtype = next(unet.parameters()).dtype
    targets = lora_targets(unet)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(SEED + index)
        tensors: dict[str, torch.Tensor] = {}
        for target in targets:
            down = torch.randn(rank, target.in_features, generator=generator)
            down /= target.in_features**0.5
            up = torch.randn(target.out_features, rank, generator=generator) * 0.01
            tensors[f"unet.{target.module}.lora_A.weight"] = down.to(dtype)
            tensors[f"unet.{target.module}.lora_B.weight"] = up.to(dtype)
        path = root / f"{prefix}-{index}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def resolved(paths: Sequence[Path]) -> list[Any]:
    from server.domain.generation_job import ResolvedLora
    from server.infrastructure.lora_files import sha256_file

    return [ResolvedLora(p.stem, p.stem, p.name, sha256_file(p), p, 0.8) for p in paths]


# --- running jobs ---------------------------------------------------------------------------


@dataclass
class Setup:
    model: Any  # BaseModelConfig
    pipe: Any
    side: int
    steps: int
    guidance: float


def executor(setup: Setup, *, adapter_gb: float, backend: str = "") -> Any:
    """The executor owning `setup.pipe` (one per pipeline: its LoRA cache is the pipeline's);
    `mix_loras` is switched between measurements."""
    from server.infrastructure.diffusion.executor import DiffusionExecutor

    made = DiffusionExecutor(
        device=str(setup.pipe.device),
        max_batch=CLIENTS,
        batch_wait=0.05,
        adapter_budget_gb=adapter_gb,
        calibration_sides=(),
        loader=lambda _model, _device, _dtype: setup.pipe,
        compile_backend=backend or "inductor",
    )
    made.start()
    return made


def job(setup: Setup, index: int, loras: Sequence[Any], steps: int = 0) -> Any:
    from server.domain.generation_job import GenerationJob

    return GenerationJob(
        generation_id=f"bench-{time.monotonic_ns()}-{index}",
        model=setup.model,
        prompt=PROMPT,
        original_prompt=PROMPT,
        width=setup.side,
        height=setup.side,
        steps=steps or setup.steps,
        guidance_scale=setup.guidance,
        seed=SEED + index,
        loras=tuple(loras),
    )


def run_jobs(made: Any, jobs: Sequence[Any]) -> tuple[float, list[bytes]]:
    """Submits the jobs together; (seconds until the last finished, each one's PNG)."""
    from server.domain import generation_events as gen

    began = time.perf_counter()
    handles = [made.submit(j) for j in jobs]
    images = []
    for handle in handles:
        events = list(handle.events())
        if not isinstance(events[-1].payload, gen.Completed):
            raise RuntimeError(f"a job failed: {events[-1].payload}")
        images.append(
            b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
        )
    return time.perf_counter() - began, images


def pixel_difference(a: Sequence[bytes], b: Sequence[bytes]) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    diffs = [
        np.abs(
            np.asarray(Image.open(io.BytesIO(x)), dtype=np.int16)
            - np.asarray(Image.open(io.BytesIO(y)), dtype=np.int16)
        )
        for x, y in zip(a, b, strict=True)
    ]
    return {
        "max": int(max(d.max() for d in diffs)),
        "mean": round(float(statistics.mean(float(d.mean()) for d in diffs)), 4),
    }


def measure_mixed(
    made: Any, setup: Setup, loras: list[Any], rounds: int, clock: Clock
) -> dict[str, Any]:
    """8 jobs with 8 different LoRAs: split vs mixed vs 8 without LoRAs, interleaved."""
    modes = ("split", "mixed", "no_lora")

    def jobs(mode: str) -> list[Any]:
        made.mix_loras = mode != "split"
        return [job(setup, i, [] if mode == "no_lora" else [loras[i]]) for i in range(CLIENTS)]

    for mode in modes:  # warm-up: LoRAs loaded, kernels chosen
        run_jobs(made, [replace(j, steps=2) for j in jobs(mode)])
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    images: dict[str, list[bytes]] = {}
    for _ in range(rounds):
        for mode in modes:
            took, images[mode] = run_jobs(made, jobs(mode))
            seconds[mode].append(took)
            clock.log(f"  {mode}: {CLIENTS / took:.3f} images/s")
    rate = {m: CLIENTS / statistics.median(s) for m, s in seconds.items()}
    return {
        "images_per_second": {m: round(r, 4) for m, r in rate.items()},
        "mixed_over_split": round(rate["mixed"] / rate["split"], 3),
        "mixed_over_no_lora": round(rate["mixed"] / rate["no_lora"], 3),
        "pixel_difference_mixed_vs_split": pixel_difference(images["mixed"], images["split"]),
        "rounds": rounds,
    }


class _ClosedLoop:
    """Clients that each send a job (the next LoRA of the cycle) as soon as the last ended."""

    def __init__(self, made: Any, setup: Setup, loras: list[Any], stop_at: float) -> None:
        self.made, self.setup, self.loras, self.stop_at = made, setup, loras, stop_at
        self.latencies: list[float] = []
        self._lock = threading.Lock()
        self._next = 0

    def client(self) -> None:
        while time.perf_counter() < self.stop_at:
            with self._lock:
                n, self._next = self._next, self._next + 1
            began = time.perf_counter()
            lora = self.loras[n % len(self.loras)]
            run_jobs(self.made, [job(self.setup, n, [lora])])
            with self._lock:
                self.latencies.append(time.perf_counter() - began)


def measure_cycling(
    made: Any, setup: Setup, loras: list[Any], plan: Plan, clock: Clock
) -> dict[str, Any]:
    """64 LoRAs cycling under 8 closed-loop clients, a budget of 16: mixed vs split."""
    out: dict[str, Any] = {"loras": len(loras), "adapter_budget_loras": plan.f_budget_loras}
    for mode in ("split", "mixed"):
        made.mix_loras = mode == "mixed"
        stats = made.stats
        counted = (
            stats.adapters.loads,
            stats.adapters.evictions,
            stats.adapter_wait_seconds,
            stats.mixed_batches,
        )
        loop = _ClosedLoop(made, setup, loras, time.perf_counter() + plan.f_seconds)
        began = time.perf_counter()
        threads = [threading.Thread(target=loop.client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        latencies, finished = sorted(loop.latencies), len(loop.latencies)
        out[mode] = {
            "images_per_second": round(finished / elapsed, 4),
            "p50_s": round(latencies[len(latencies) // 2], 3),
            "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
            "images": finished,
            "lora_loads": stats.adapters.loads - counted[0],
            "lora_evictions": stats.adapters.evictions - counted[1],
            "lora_wait_s": round(stats.adapter_wait_seconds - counted[2], 2),
            "mixed_batches": stats.mixed_batches - counted[3],
        }
        clock.log(f"  {mode}: {out[mode]}")
    out["throughput_mixed_over_split"] = round(
        out["mixed"]["images_per_second"] / out["split"]["images_per_second"], 3
    )
    return out


def measure_compiled(
    compiled: Setup, plain_pipe: Any, loras: list[Any], plan: Plan, clock: Clock, backend: str
) -> dict[str, Any]:
    """SDXL compiled (`compiled.model.compile`): warm-up, batch-1 latency against eager
    plain diffusers on a bare pipeline of its own, and the graphs new LoRA mixes compile."""
    import torch

    from server.infrastructure.diffusion.compilation import compile_count

    made = executor(compiled, adapter_gb=8.0, backend=backend)
    try:
        began = time.perf_counter()
        graphs_before = compile_count()
        # Warm-up: the shapes a run sees (8 rows with 8 and with 4 distinct LoRA sets; 1 row
        # without LoRAs, once LoRA layers exist).
        run_jobs(made, [job(compiled, i, [loras[i]], steps=2) for i in range(CLIENTS)])
        run_jobs(made, [job(compiled, i, [loras[i % 4]], steps=2) for i in range(CLIENTS)])
        run_jobs(made, [job(compiled, 0, [])])
        warmup_s = time.perf_counter() - began
        warmed = compile_count()
        clock.log(f"  compile warm-up {warmup_s:.1f} s, {warmed - graphs_before} graphs")
        service: list[float] = []
        plain: list[float] = []
        generator = torch.Generator(device="cpu")
        for _ in range(max(plan.rounds, 2)):
            took, _ = run_jobs(made, [job(compiled, 0, [])])
            service.append(took)
            began = time.perf_counter()
            plain_pipe(  # eager diffusers, its own call
                PROMPT,
                width=compiled.side,
                height=compiled.side,
                num_inference_steps=compiled.steps,
                guidance_scale=compiled.guidance,
                generator=generator.manual_seed(SEED),
            )
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            plain.append(time.perf_counter() - began)
        mixes = [[loras[(i * 3 + r) % len(loras)] for i in range(CLIENTS)] for r in range(2)]
        for mix in mixes:
            run_jobs(made, [job(compiled, i, [lora]) for i, lora in enumerate(mix)])
        recompiles = compile_count() - warmed
    finally:
        made.stop()
    return {
        "backend": backend or "inductor",
        "warmup_s": round(warmup_s, 1),
        "graphs_at_warmup": warmed - graphs_before,
        "batch1_compiled_s": round(statistics.median(service), 3),
        "batch1_eager_plain_s": round(statistics.median(plain), 3),
        "compiled_over_eager": round(statistics.median(service) / statistics.median(plain), 3),
        "recompiles_after_warmup": recompiles,
    }


# --- the run ----------------------------------------------------------------------------------


def free(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    def at_least(name: str, value: float | None) -> dict[str, Any]:
        target = TARGETS[name]
        return {
            "value": value,
            "target": target,
            "pass": None if value is None else value >= target,
        }

    d, e, g = data.get("D", {}), data.get("E", {}), data.get("G", {})
    ratio = g.get("compiled_over_eager")
    recompiles = g.get("recompiles_after_warmup")
    return {
        "D_mixed_vs_split": at_least("D_split", d.get("mixed_over_split")),
        "D_mixed_vs_no_lora": at_least("D_no_lora", d.get("mixed_over_no_lora")),
        "E_mixed_vs_split": at_least("E_split", e.get("mixed_over_split")),
        "E_mixed_vs_no_lora": at_least("E_no_lora", e.get("mixed_over_no_lora")),
        "G_compiled_vs_eager": {
            "value": ratio,
            "target": TARGETS["G"],
            "pass": None if ratio is None else ratio <= TARGETS["G"],
        },
        "G_recompiles": {
            "value": recompiles,
            "target": 0,
            "pass": None if recompiles is None else recompiles == 0,
        },
    }


def run(args: argparse.Namespace, clock: Clock, report: Report) -> bool:
    import torch

    from server.domain.models import Architecture, BaseModelConfig

    quiet_libraries()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise RuntimeError("no CUDA device: run with --tiny to check the code on the CPU")
    device = "cuda" if cuda else "cpu"
    plan = make_plan(tiny=args.tiny, quick=args.quick)
    report.set("device", torch.cuda.get_device_name(0) if cuda else "cpu")
    report.set("versions", versions())
    report.set("plan", plan.__dict__)
    stages: dict[str, float] = {}
    deadline = args.budget_s

    def due(name: str) -> bool:
        if clock.elapsed() > deadline:
            clock.log(f"{name}: skipped, the budget of {deadline:g} s has run out")
            report.set(name, {"skipped": "budget"})
            return False
        return True

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with clock.stage("build_sd15", stages):
            sd15_pipe = build("SD1", device, root, args.tiny)
            sd15 = Setup(
                BaseModelConfig("sd15", Architecture.SD1, root / "sd15"),
                sd15_pipe,
                plan.sd15_side,
                plan.steps,
                7.0,
            )
            paths = write_loras(root / "loras", sd15_pipe.unet, plan.f_loras, plan.rank, "sd15")
            sd15_loras = resolved(paths)
            # Room for f_budget_loras LoRAs: D's 8 stay loaded, F's 64 cycle through it.
            budget_gb = plan.f_budget_loras * paths[0].stat().st_size / 2**30
            made = executor(sd15, adapter_gb=budget_gb)
        try:
            if due("D"):
                with clock.stage("D", stages):
                    report.set("D", measure_mixed(made, sd15, sd15_loras, plan.rounds, clock))
            if due("F"):
                with clock.stage("F", stages):
                    report.set("F", measure_cycling(made, sd15, sd15_loras, plan, clock))
        finally:
            made.stop()
        del made, sd15, sd15_pipe
        free(cuda)
        if due("E"):
            with clock.stage("build_sdxl", stages):
                xl_pipe = build("SDXL", device, root, args.tiny)
                model = BaseModelConfig("sdxl", Architecture.SDXL, root / "sdxl")
                sdxl = Setup(model, xl_pipe, plan.sdxl_side, plan.steps, 5.0)
                paths = write_loras(root / "loras", xl_pipe.unet, CLIENTS, plan.rank, "sdxl")
                xl_loras = resolved(paths)
                made = executor(sdxl, adapter_gb=8.0)
            try:
                with clock.stage("E", stages):
                    report.set("E", measure_mixed(made, sdxl, xl_loras, plan.rounds, clock))
            finally:
                made.stop()
            del made, sdxl, xl_pipe
            free(cuda)
            if due("G"):
                with clock.stage("G", stages):
                    compiled = Setup(
                        replace(model, name="sdxl-compiled", compile=True),
                        build("SDXL", device, root, args.tiny),
                        plan.sdxl_side,
                        plan.steps,
                        5.0,
                    )
                    plain_pipe = build("SDXL", device, root, args.tiny)
                    plain_pipe.set_progress_bar_config(disable=True)
                    backend = "" if cuda else "eager"
                    report.set(
                        "G", measure_compiled(compiled, plain_pipe, xl_loras, plan, clock, backend)
                    )
    report.set("stage_seconds", stages)
    return True


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter stage F (15 s per mode)")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny pipelines at 64x64, 2 steps: checks the code"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="skip the stages not yet started after this many seconds "
        f"(default {DEFAULT_BUDGET_S:g})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return bench_main("gpu_mixed_loras", args, run, (RuntimeError, OSError), verdicts)


if __name__ == "__main__":
    sys.exit(main())
