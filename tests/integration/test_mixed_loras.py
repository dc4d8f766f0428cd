"""Batches that mix LoRAs (row_loras.py), on the tiny SD1.5 and SDXL pipelines through the
executor: every image of a mixed batch equals the same job run alone with its LoRAs fused
(within 1 per 8-bit value: fp32 rounding of W x + B(A x) against (W + BA) x), the base
weights are never modified, and LoRAs that cannot be computed per row run apart, fused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain import generation_events as gen
from server.domain.generation_job import GenerationJob, ResolvedLora
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.executor import DiffusionExecutor
from server.infrastructure.diffusion.placeholder import build_tiny_sd15, build_tiny_sdxl
from server.infrastructure.diffusion.registry import load_pipeline
from server.infrastructure.lora_files import sha256_file
from tests.support import generation_job, image_of

torch.set_num_threads(1)

LONG = ", ".join(["a red fox in the snow"] * 14)  # two 75-token chunks: a group of its own


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseModelConfig]:
    root = tmp_path_factory.mktemp("models")
    return {
        "sd15": BaseModelConfig("sd15", Architecture.SD1, build_tiny_sd15(root / "sd15")),
        "sdxl": BaseModelConfig("sdxl", Architecture.SDXL, build_tiny_sdxl(root / "sdxl")),
    }


@pytest.fixture(scope="module")
def loras(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, BaseModelConfig]
) -> dict[str, dict[str, Path]]:
    """Per model: peft files of ranks 4 and 2, and a kohya one of rank 8 with alpha 4 (its
    delta halved) that for SD1 also changes the 1x1 convolutions proj_in/proj_out."""
    root = tmp_path_factory.mktemp("loras")
    out: dict[str, dict[str, Path]] = {}
    for name, model in models.items():
        pipe = load_pipeline(model, device="cpu")
        out[name] = {
            "a": write_lora_for_pipeline(pipe, root / f"{name}-a.safetensors", rank=4, seed=1),
            "c": write_lora_for_pipeline(pipe, root / f"{name}-c.safetensors", rank=2, seed=3),
            "k": write_lora_for_pipeline(
                pipe,
                root / f"{name}-k.safetensors",
                fmt="kohya",
                rank=8,
                alpha=4,
                seed=2,
                convs=name == "sd15",
            ),
        }
    return out


def lora(path: Path, weight: float = 1.0) -> ResolvedLora:
    return ResolvedLora(path.stem, path.stem, path.name, sha256_file(path), path, weight)


class Recording:
    """The executor's loader, keeping the pipelines it loads."""

    def __init__(self) -> None:
        self.pipes: list[Any] = []

    def __call__(self, model: BaseModelConfig, device: str, dtype: str) -> Any:
        pipe = load_pipeline(model, device=device)
        self.pipes.append(pipe)
        return pipe


@pytest.fixture
def executor() -> Iterator[tuple[DiffusionExecutor, Recording]]:
    loader = Recording()
    # A batch window long enough for the jobs submitted together to join the first batch.
    made = DiffusionExecutor(device="cpu", max_batch=8, batch_wait=0.5, loader=loader)
    made.start()
    yield made, loader
    made.stop()


def run_together(executor: DiffusionExecutor, jobs: list[GenerationJob]) -> list[np.ndarray]:
    handles = [executor.submit(job) for job in jobs]
    return [pixels_of(list(handle.events())) for handle in handles]


def pixels_of(events: list[gen.GenerationEvent]) -> np.ndarray:
    assert isinstance(events[-1].payload, gen.Completed), events[-1].payload
    return np.asarray(image_of(events), dtype=np.int16)


def base_weights(pipe: Any) -> dict[str, torch.Tensor]:
    """Every parameter of the LoRA components, as the bare model names them."""
    out: dict[str, torch.Tensor] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, param in model.named_parameters():
            if "lora_" not in name:
                out[f"{component}.{name.replace('.base_layer', '')}"] = param.detach().clone()
    return out


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_each_image_of_a_mixed_batch_equals_its_job_run_alone_with_its_loras_fused(
    name: str,
    models: dict[str, BaseModelConfig],
    loras: dict[str, dict[str, Path]],
    executor: tuple[DiffusionExecutor, Recording],
) -> None:
    model, files = models[name], loras[name]
    run, loader = executor
    sets: list[tuple[ResolvedLora, ...]] = [
        (lora(files["a"]),),
        (lora(files["k"]),),
        (lora(files["a"], 0.7), lora(files["c"], -0.5)),  # two on one row, weights folded
        (),  # no LoRA: zeros gathered
        (lora(files["c"]),),
    ]
    jobs = [
        generation_job(model, loras=loras_, seed=10 + i, prompt=LONG if i == 4 else "a fox")
        for i, loras_ in enumerate(sets)
    ]
    mixed = run_together(run, jobs)
    assert run.stats.mixed_batches == 1
    assert run.stats.batches == 1
    assert run.stats.batch_sizes == [len(jobs)]
    assert run.stats.distinct_loras == [3]
    assert run.stats.adapters.prefetched == 3  # read by the loader thread while they waited
    fresh = base_weights(load_pipeline(model, device="cpu"))
    after = base_weights(loader.pipes[0])
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[key], fresh[key]) for key in fresh), "base weights changed"

    alone = [pixels_of(list(run.submit(job).events())) for job in jobs]
    assert run.stats.mixed_batches == 1  # each of those ran as a batch of its own
    for i, (together, single) in enumerate(zip(mixed, alone, strict=True)):
        difference = np.abs(together - single).max()
        assert difference <= 1, f"row {i} differs by {difference}"
    bare = alone[3]
    for i in (0, 1, 2, 4):
        if i != 4:  # the long prompt is another image anyway
            assert np.abs(alone[i] - bare).max() > 8, f"LoRA set {i} changes nothing"
    assert np.abs(alone[0] - alone[2]).max() > 8  # weights and the second LoRA count


def test_a_mixed_batch_with_a_lora_that_cannot_load_fails_only_its_jobs(
    models: dict[str, BaseModelConfig],
    loras: dict[str, dict[str, Path]],
    tmp_path: Path,
    executor: tuple[DiffusionExecutor, Recording],
) -> None:
    model, files = models["sd15"], loras["sd15"]
    run, _ = executor
    other = loras["sdxl"]["a"]  # an SDXL LoRA: its shapes do not fit SD1
    jobs = [
        generation_job(model, loras=(lora(files["a"]),)),
        generation_job(model, loras=(lora(other),)),
        generation_job(model, loras=(lora(files["c"]),), seed=3),
    ]
    handles = [run.submit(job) for job in jobs]
    outcomes = [list(h.events())[-1].payload for h in handles]
    assert isinstance(outcomes[1], gen.Failed)
    assert outcomes[1].reason == "LORA_LOAD_FAILED"
    assert isinstance(outcomes[0], gen.Completed)
    assert isinstance(outcomes[2], gen.Completed)
    assert run.stats.mixed_batches == 1


def test_a_dora_lora_cannot_be_computed_per_row_so_the_sets_run_apart_fused(
    models: dict[str, BaseModelConfig],
    loras: dict[str, dict[str, Path]],
    tmp_path: Path,
    executor: tuple[DiffusionExecutor, Recording],
) -> None:
    model, files = models["sd15"], loras["sd15"]
    tensors = load_file(str(files["a"]))
    for key in list(tensors):
        if key.endswith("lora_B.weight"):
            magnitude = key.replace("lora_B.weight", "lora_magnitude_vector")
            tensors[magnitude] = torch.ones(tensors[key].shape[0], dtype=tensors[key].dtype)
    dora = tmp_path / "dora.safetensors"
    save_file(tensors, str(dora))
    run, _ = executor
    jobs = [
        generation_job(model, loras=(lora(dora),)),
        generation_job(model, loras=(lora(files["c"]),), seed=3),
    ]
    together = run_together(run, jobs)
    assert run.stats.mixed_batches == 0
    assert run.stats.batches == 2  # one per LoRA set
    alone = [pixels_of(list(run.submit(job).events())) for job in jobs]
    for i in range(2):
        assert np.abs(together[i] - alone[i]).max() <= 1


def test_a_compiled_denoiser_keeps_its_graphs_whatever_loras_a_batch_mixes(
    models: dict[str, BaseModelConfig], loras: dict[str, dict[str, Path]]
) -> None:
    """torch.compile's graph capture (dynamo, with the eager backend so that no code is
    generated on this CPU) of the SD1 UNet's blocks with the per-row hooks inside: after a
    warm-up that sees the shapes change once, new LoRA mixes compile nothing."""
    from server.infrastructure.diffusion.compilation import compile_count

    model = replace(models["sd15"], name="compiled", compile=True)
    files = loras["sd15"]
    a, c, k = lora(files["a"]), lora(files["c"]), lora(files["k"])
    run = DiffusionExecutor(device="cpu", max_batch=8, batch_wait=0.5, compile_backend="eager")
    run.start()
    try:
        before = compile_count()
        for sets in ([(a,), (k,), ()], [(c,), (c,), (a,)]):  # 4 slots, then 3
            run_together(run, [generation_job(model, loras=s, seed=i) for i, s in enumerate(sets)])
        warmed = compile_count()
        assert warmed > before  # the blocks were compiled
        for sets in ([(k,), (c,), (a, c)], [(c,), (k,), (k,)], [(a,), (), (k, a)]):
            run_together(run, [generation_job(model, loras=s, seed=i) for i, s in enumerate(sets)])
        assert compile_count() == warmed, "a new LoRA mix recompiled"
        assert run.stats.mixed_batches == 5
    finally:
        run.stop()


@pytest.mark.parametrize("family", ["FLUX", "SD3", "QWEN_IMAGE", "Z_IMAGE"])
def test_transformer_families_mix_loras_in_one_batch_as_alone(
    family: str, tmp_path: Path, executor: tuple[DiffusionExecutor, Recording]
) -> None:
    """FLUX (no CFG), SD3 (CFG, three text encoders), Qwen-Image (true CFG: two calls) and
    Z-Image: a row with one LoRA, one with another at 0.7, one without, as alone."""
    from server.infrastructure.diffusion import placeholder

    builders = {
        "FLUX": placeholder.build_tiny_flux,
        "SD3": placeholder.build_tiny_sd3,
        "QWEN_IMAGE": placeholder.build_tiny_qwen_image,
        "Z_IMAGE": placeholder.build_tiny_z_image,
    }
    model = BaseModelConfig(family, Architecture[family], builders[family](tmp_path / family))
    pipe = load_pipeline(model, device="cpu")
    one = write_lora_for_pipeline(pipe, tmp_path / "one.safetensors", rank=4, seed=1, scale=2.0)
    two = write_lora_for_pipeline(pipe, tmp_path / "two.safetensors", rank=2, seed=2, scale=2.0)
    del pipe
    run, _ = executor
    jobs = [
        generation_job(model, loras=(lora(one),), seed=1),
        generation_job(model, loras=(lora(two, 0.7),), seed=2),
        generation_job(model, seed=3),
    ]
    mixed = run_together(run, jobs)
    assert run.stats.mixed_batches == 1
    alone = [pixels_of(list(run.submit(job).events())) for job in jobs]
    for i in range(3):
        assert np.abs(mixed[i] - alone[i]).max() <= 1, f"row {i}"
    base = pixels_of(list(run.submit(replace(jobs[0], loras=())).events()))
    assert np.abs(alone[0] - base).max() > 8, "the LoRA changes nothing"
