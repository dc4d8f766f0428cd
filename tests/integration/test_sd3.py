"""SD3.5 as a family, on a tiny random-weight StableDiffusion3Pipeline built locally (an MMDiT
transformer, a 16-channel VAE, two CLIPs and a T5 with local tokenizers) loaded through the
real loading code: text to image with classifier-free guidance and a negative prompt,
img2img and inpainting, the hires fix, previews, a LoRA applied and removed exactly, the same
image whatever the batch, and an SD sampler refused before queueing."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.application.commands import (
    GenerateImageCommand,
    GenerationRequest,
    HiresRequest,
    ImageInput,
    ImportLoRAsCommand,
    LoraChoice,
    SubmitGenerationCommand,
)
from server.application.context import DispatchContext
from server.application.queries import ListBaseModelsQuery
from server.bootstrap import Container, bootstrap
from server.config import Settings
from server.devtools.tiny_loras import write_lora_for_pipeline
from server.domain import generation_events as gen
from server.domain.errors import ValidationError
from server.domain.models import Architecture, BaseModelConfig
from server.infrastructure.diffusion.placeholder import build_tiny_sd3
from server.infrastructure.diffusion.registry import load_pipeline
from tests.hostile_images import noise

ALICE = DispatchContext(principal="alice", scopes=frozenset({"read", "generate"}))
# What a kohya or diffusers SD3 LoRA says about itself; its keys alone could be FLUX's.
SD3_META = {"modelspec.architecture": "stable-diffusion-v3-medium/lora"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> BaseModelConfig:
    folder = build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "sd3-tiny")
    return BaseModelConfig("sd35", Architecture.SD3, folder)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory, model: BaseModelConfig) -> Path:
    root = tmp_path_factory.mktemp("sd3-loras")
    path = root / "ink_sd3.safetensors"
    write_lora_for_pipeline(load_pipeline(model), path, seed=6, metadata=SD3_META)
    return root


@pytest.fixture
def c(tmp_path: Path, model: BaseModelConfig, lora_root: Path) -> Iterator[Container]:
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=(model,),
        batch_wait_ms=300,
        lora_roots=(lora_root,),
    )
    container = bootstrap(settings)
    yield container
    container.close()


def request(**spec: Any) -> GenerationRequest:
    base = GenerationRequest(model="sd35", prompt="a red fox", steps=4, seed=5, width=64, height=64)
    return dataclasses.replace(base, **spec)


def events_of(c: Container, **spec: Any) -> list[gen.GenerationEvent]:
    events = list(c.commands.stream(GenerateImageCommand(request=request(**spec)), ALICE))
    failed = [e.payload for e in events if isinstance(e.payload, gen.Failed)]
    assert not failed, failed
    return events


def image_of(events: list[gen.GenerationEvent]) -> Image.Image:
    data = b"".join(e.payload.data for e in events if isinstance(e.payload, gen.ImageChunk))
    return Image.open(io.BytesIO(data))


def pixels(events: list[gen.GenerationEvent]) -> np.ndarray[Any, np.dtype[np.int16]]:
    return np.asarray(image_of(events), dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_sd35_is_listed_and_generates_with_a_negative_prompt_and_previews(c: Container) -> None:
    (info,) = c.queries.dispatch(ListBaseModelsQuery(), ALICE).data.models
    assert info.ready, info.error
    assert info.schedulers == ("flow_euler",)
    assert info.takes_negative_prompt
    events = events_of(c, preview_every_n_steps=2)
    image = image_of(events)
    assert image.size == (64, 64)
    assert "CFG scale: 3.5" in image.info["parameters"]
    previews = [e.payload for e in events if isinstance(e.payload, gen.Preview)]
    assert [p.step for p in previews] == [2]
    assert Image.open(io.BytesIO(previews[0].jpeg)).size == (32, 32)  # 16 channels, 2x VAE
    plain = pixels(events)
    assert np.array_equal(pixels(events_of(c)), plain)
    assert not np.array_equal(pixels(events_of(c, negative_prompt="blurry")), plain)


def test_img2img_inpainting_and_the_same_image_whatever_the_batch(c: Container) -> None:
    init = png(noise(64, 64, 3))
    assert image_of(events_of(c, init_image=ImageInput(data=init), strength=0.5)).size == (64, 64)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    painted = events_of(
        c, init_image=ImageInput(data=init), mask_image=ImageInput(data=png(mask)), mask_blur=0
    )
    kept = np.asarray(mask) == 0
    assert np.array_equal(pixels(painted)[kept], np.asarray(Image.open(io.BytesIO(init)))[kept])
    specs: list[dict[str, Any]] = [{"seed": 1}, {"seed": 2, "prompt": "a hare"}]
    alone = [pixels(events_of(c, **s)) for s in specs]
    submitted = [
        c.commands.dispatch(SubmitGenerationCommand(request=request(**s)), ALICE).unwrap()[0]
        for s in specs
    ]
    for gid, expected in zip(submitted, alone, strict=True):
        handle = c.generations.handle(str(gid))
        assert handle is not None
        events = list(handle.events())
        assert any(isinstance(e.payload, gen.Started) and e.payload.batch_size == 2 for e in events)
        assert np.abs(pixels(events) - expected).max() <= 1


def test_an_sd3_lora_is_applied_and_removed_exactly(c: Container) -> None:
    updates = list(c.commands.stream(ImportLoRAsCommand(directory=""), ALICE))
    assert updates[-1].totals.registered == 1, updates[-1]
    c.projector.catch_up()
    (lora,) = c.read_model.find_by_file_name("ink_sd3")
    assert lora.metadata.base_model.architecture is Architecture.SD3
    plain = pixels(events_of(c))
    assert not np.array_equal(pixels(events_of(c, loras=(LoraChoice("ink_sd3", 1.0),))), plain)
    assert np.array_equal(pixels(events_of(c)), plain)


def test_a_model_without_t5_loads_and_generates(tmp_path: Path) -> None:
    folder = build_tiny_sd3(tmp_path / "sd3-no-t5", t5=False)
    assert not (folder / "text_encoder_3").exists()
    settings = Settings(
        data_dir=tmp_path,
        storage_url="memory://",
        models=(BaseModelConfig("sd35", Architecture.SD3, folder),),
    )
    container = bootstrap(settings)
    try:
        assert image_of(events_of(container)).size == (64, 64)
    finally:
        container.close()


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a_hires_fix_counts_the_steps_flow_matching_runs(c: Container, upscaler: str) -> None:
    hires = HiresRequest(scale=2.0, steps=4, upscaler=upscaler)  # second pass at 0.7
    events = events_of(c, hires=hires)
    assert image_of(events).size == (128, 128)
    progress = [
        (e.payload.step, e.payload.total_steps)
        for e in events
        if isinstance(e.payload, gen.Progress)
    ]
    # 4 first-pass steps, then the 3 that SD3's img2img runs at 0.7 (SD would run 2): one
    # total from the first event on.
    assert progress == [(step, 7) for step in range(1, 8)]


def test_an_sd_sampler_is_refused(c: Container) -> None:
    with pytest.raises(ValidationError) as err:
        events_of(c, scheduler="dpmpp_2m")
    assert err.value.violations[0].field == "spec.scheduler"
