"""Batches that mix LoRAs, on the CPU: the cost model of per-row LoRA deltas (row_loras.py),
measured side by side in one run, interleaved over several rounds, reported as medians and
ratios (this machine is small and noisy; the ratios are the figures to compare).

a) Through the executor, tiny SD1.5 and tiny SDXL (64x64, 4 steps, CFG), 8 jobs submitted
   together, each asking for a different rank-8 LoRA (peft and kohya files):
   - split: `mix_loras=False`, today's behaviour before mixing: one fused batch per LoRA set,
     a fuse/restore switch between them;
   - mixed: one batch, base weights unfused, each row adding its own LoRA's delta;
   - no LoRA: the same 8 jobs without LoRAs, one batch (the ceiling).
   Images/s of each, mixed/split and mixed/no-LoRA, and the largest pixel difference between
   each mixed image and its split twin (fp32: at most 1 expected).
b) One linear layer (640 -> 640, 8 rows of 1,024 tokens, rank 32, 8 different LoRAs), the
   delta alone: row_loras' two bmm over stacks gathered per row; peft's own mixed-batch forward
   (`adapter_names=`, a loop over the adapters present); and one matmul pair per row group
   (what the split path computes, without its fuse cost). Milliseconds and ratios; this is
   the measurement behind the choice recorded in docs/decisions.md.

Tiny models make the denoiser cheap, so (a) shows the fixed costs (fusing, switching, per-call
overhead) more than a GPU would; bench/gpu_generation.py stages D-G measure full-size models.

Usage: .venv/bin/python bench/mixed_loras_cpu.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain import generation_events as gen
from server.domain.generation_job import GenerationJob, ResolvedLora
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.placeholder import (
    build_tiny_sd15,
    build_tiny_sdxl,
)
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.lora_files import sha256_file

JOBS = 8


def job(model: BaseModelConfig, index: int, loras: tuple[ResolvedLora, ...]) -> GenerationJob:
    return GenerationJob(
        generation_id=f"bench-{time.monotonic_ns()}-{index}",
        model=model,
        prompt="a fox in the snow",
        original_prompt="a fox in the snow",
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.0,
        seed=100 + index,
        loras=loras,
    )


def run(executor: DiffusionExecutor, jobs: list[GenerationJob]) -> tuple[float, list[Any]]:
    began = time.perf_counter()
    handles = [executor.submit(j) for j in jobs]
    images = []
    for handle in handles:
        events = list(handle.events())
        if not isinstance(events[-1].payload, gen.Completed):
            raise SystemExit(f"a job failed: {events[-1].payload}")
        chunks = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
        images.append(chunks)
    return time.perf_counter() - began, images


def pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def stage_a(name: str, model: BaseModelConfig, root: Path, rounds: int) -> dict[str, Any]:
    pipe = load_pipeline(model, device="cpu")
    files = [
        write_lora_for_pipeline(
            pipe, root / f"{name}-{i}.safetensors", rank=8, seed=i, fmt="kohya" if i % 2 else "peft"
        )
        for i in range(JOBS)
    ]
    del pipe
    loras = [
        (ResolvedLora(f"l{i}", f"l{i}", p.name, sha256_file(p), p, 0.8),)
        for i, p in enumerate(files)
    ]
    executors = {
        mode: DiffusionExecutor(
            device="cpu",
            max_batch=JOBS,
            batch_wait=0.5,
            mix_loras=mode != "split",
            calibration_sides=(),
        )
        for mode in ("split", "mixed", "no_lora")
    }
    for executor in executors.values():
        executor.start()
    try:

        def jobs_for(mode: str) -> list[GenerationJob]:
            return [job(model, i, () if mode == "no_lora" else loras[i]) for i in range(JOBS)]

        for mode, executor in executors.items():  # warm-up: load the model and the LoRAs
            run(executor, jobs_for(mode))
        seconds: dict[str, list[float]] = {mode: [] for mode in executors}
        last: dict[str, list[Any]] = {}
        for _ in range(rounds):
            for mode, executor in executors.items():
                took, images = run(executor, jobs_for(mode))
                seconds[mode].append(took)
                last[mode] = images
        difference = max(
            int(np.abs(pixels(a) - pixels(b)).max())
            for a, b in zip(last["mixed"], last["split"], strict=True)
        )
        stats = {m: e.stats for m, e in executors.items()}
    finally:
        for executor in executors.values():
            executor.stop()
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    rate = {mode: JOBS / value for mode, value in median.items()}
    return {
        "model": name,
        "images_per_second": {m: round(r, 3) for m, r in rate.items()},
        "mixed_over_split": round(rate["mixed"] / rate["split"], 3),
        "mixed_over_no_lora": round(rate["mixed"] / rate["no_lora"], 3),
        "max_pixel_difference_mixed_vs_split": difference,
        "batches_per_round": {
            m: (s.batches - 1) // rounds if m != "split" else None for m, s in stats.items()
        },
        "mixed_batches": stats["mixed"].mixed_batches,
        "rounds": rounds,
    }


def stage_b(rounds: int) -> dict[str, Any]:
    from peft import LoraConfig, inject_adapter_in_model

    from server.infrastructure.diffusion.row_loras import RowLoras

    torch.manual_seed(0)
    width, tokens, rank = 640, 1024, 32

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(width, width)

    holder = Holder()
    names = [f"l{i}" for i in range(JOBS)]
    for name in names:
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["proj"], init_lora_weights=False
        )
        inject_adapter_in_model(config, holder, adapter_name=name)
    layer: Any = holder.proj
    layer.set_adapter(names)
    x = torch.randn(JOBS, tokens, width)
    # RowLoras reads the components off a pipeline; a stand-in holds the one layer.
    pipe = type("Pipe", (), {"proj_model": holder})()
    plan = RowLoras(pipe, ["proj_model"]).plan({n: ((n, 1.0),) for n in names})
    layer.enable_adapters(False)  # the hook adds the deltas to the base output

    def ours() -> Any:
        with plan.rows(list(range(1, JOBS + 1))):
            return layer(x)

    def peft_mixed() -> Any:
        layer.enable_adapters(True)
        layer.set_adapter(names)
        try:
            with plan.rows([0] * JOBS):  # our hook adds nothing
                return layer(x, adapter_names=names)
        finally:
            layer.enable_adapters(False)

    def per_group() -> Any:
        base = layer.base_layer(x)
        for i, name in enumerate(names):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            base[i] += (x[i] @ a.T) @ b.T * layer.scaling[name]
        return base

    def base_only() -> Any:
        return layer.base_layer(x)

    with torch.no_grad():
        reference = peft_mixed()
        assert torch.allclose(ours(), reference, atol=1e-4), "row_loras differs from peft"
        assert torch.allclose(per_group(), reference, atol=1e-4)
        timings: dict[str, list[float]] = {
            "row_loras_bmm": [],
            "peft_mixed_batch": [],
            "per_row_group": [],
            "base_only": [],
        }
        functions = {
            "row_loras_bmm": ours,
            "peft_mixed_batch": peft_mixed,
            "per_row_group": per_group,
            "base_only": base_only,
        }
        for _ in range(3):
            for f in functions.values():
                f()
        for _ in range(rounds * 5):
            for label, f in functions.items():
                began = time.perf_counter()
                f()
                timings[label].append(time.perf_counter() - began)
    plan.close()
    ms = {k: round(statistics.median(v) * 1000, 2) for k, v in timings.items()}
    return {
        "layer": f"{width}->{width}, {JOBS} rows x {tokens} tokens, rank {rank}, {JOBS} LoRAs",
        "milliseconds": ms,
        "delta_ms": {k: round(v - ms["base_only"], 2) for k, v in ms.items() if k != "base_only"},
        "peft_over_row_loras": round(ms["peft_mixed_batch"] / ms["row_loras_bmm"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, CPU"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {
            "sd15": BaseModelConfig("sd15", Architecture.SD1, build_tiny_sd15(root / "sd15")),
            "sdxl": BaseModelConfig("sdxl", Architecture.SDXL, build_tiny_sdxl(root / "sdxl")),
        }
        report["a"] = [stage_a(n, m, root, args.rounds) for n, m in models.items()]
    report["b"] = stage_b(args.rounds)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for row in report["a"]:
        rates = row["images_per_second"]
        print(
            f"a) {row['model']}: 8 jobs, 8 different LoRAs: split {rates['split']} img/s, "
            f"mixed {rates['mixed']}, no LoRA {rates['no_lora']}; mixed/split "
            f"{row['mixed_over_split']}, mixed/no-LoRA {row['mixed_over_no_lora']}; "
            f"max pixel difference mixed vs split {row['max_pixel_difference_mixed_vs_split']}"
        )
    b = report["b"]
    print(f"b) {b['layer']}: {b['milliseconds']} ms; peft/row_loras {b['peft_over_row_loras']}")


if __name__ == "__main__":
    main()
